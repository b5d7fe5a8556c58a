"""Starting the real server in a subprocess for tests (`python -m serve` or `python -m serve.web`).

`start_server(module, model_dir, *flags) -> Server` picks a free port on 127.0.0.1, starts the server and
waits until `GET /health` answers (failing with the server's output when it exits or takes too long);
`Server.url`, `Server.get(path) -> dict`, `Server.stop()`.
"""

from __future__ import annotations

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


def start_server(module: str, model_dir: Path, *flags: str, log_dir: Path) -> Server:
    port = free_port()
    log = Path(log_dir) / f"{module.replace('.', '_')}_{port}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", module, "--model", str(model_dir), "--port", str(port),
           "--log-level", "warning", *flags]
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
