"""Starting the real server in a subprocess for tests (`python -m qwenvl_lab.serve` or `python -m qwenvl_lab.serve.web`).

`answer_of_test_py(args, capsys) -> str`: what `python test.py ARGS` prints as its answer (run in-process).
`start_server(module, model_dir, *flags, offline_guard=False) -> Server` picks a free port on 127.0.0.1,
starts the server and waits until `GET /health` answers (failing with the server's output when it exits or
takes too long); `Server.url`, `Server.get(path) -> dict`, `Server.output()`, `Server.stop()`. With
`offline_guard` the server runs under `tests.offline_guard`: any attempt to reach another machine is
refused and logged as an `OUTBOUND ...` line of its output; the hub's offline variables are then left
unset, so that the guard also sees requests they would have hidden.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180  # imports + model load on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(module: str, model_dir: Path, *flags: str, log_dir: Path, offline_guard: bool = False) -> Server:
    port = free_port()
    log = Path(log_dir) / f"{module.replace('.', '_')}_{port}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if offline_guard:  # the guard keeps it offline; without these variables it also sees calls they would hide
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "GRADIO_ANALYTICS_ENABLED"):
            env.pop(name, None)
    run = ["-m", "tests.offline_guard", module] if offline_guard else ["-m", module]
    cmd = [sys.executable, *run, "--model", str(model_dir), "--port", str(port), "--log-level", "warning", *flags]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(proc, port, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{server.output()}")
        try:
            if server.get("/health")["status"] == "ok":
                return server
        except OSError:
            time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"{' '.join(cmd)} did not answer /health within {START_TIMEOUT_S} s:\n{server.output()}")


def entry(name: str):
    """train.py / test.py loaded by path (a bare `import test` could find the standard library's package)."""
    spec = importlib.util.spec_from_file_location(f"entry_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def answer_of_test_py(args: list[str], capsys) -> str:
    module = entry("test")
    capsys.readouterr()
    assert module.main(args) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1]  # test.py prints the answer and a newline
