"""The process behind `tests.readme_commands.Worker`: README commands run in one Python process.

    python -m tests.readme_runner ANSWER_FD

Reads one JSON request per stdin line and writes one JSON answer per line to file descriptor ANSWER_FD.
Ops:
- `{"op": "setup", "root": DIR}`: builds the workspace under DIR (see `build_workspace`); every command
  then runs with DIR as its working directory.
- `{"op": "run", "cmd": TEXT, "stdin": TEXT | null, "serve": bool}`: runs the command. `python -m MOD`,
  `python SCRIPT` and `python -c CODE` run in this process (runpy; SystemExit gives the exit status);
  `sh SCRIPT` runs the real script with `PY` pointing at a recording shim, then each Python command the
  script started runs here (so train.sh / test.sh's own logic is exercised and the heavy imports are paid
  once). With `serve`, the command is a server: it runs in a daemon thread and the answer comes once its
  `/health` answers (or it exits). Answer: `{"rc", "out", "err"}`.
- `{"op": "check", "cmd": TEXT, "hidden": [FLAG...], "help_prefix": [ARG...]}`: for a command that does not
  run here. `make T` -> `make -n T` in the repository; `train.py` -> `train.py --check` (the config keys
  and paths); any other Python module or script -> `--help` exits 0 and names every flag the command uses
  (except `hidden` ones), and, where the module parses with argparse, the command's own arguments parse
  (the program stops right after parsing). `sh` scripts: each Python command they start is checked so.
  Answer: `{"rc", "out", "err", "problems": [TEXT...]}` (rc 0 and no problems: the check passed).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARSED = -100  # exit status standing for "the arguments parsed" in the parse-only mode

SHIM = """#!/bin/sh
# Stands in for the Python interpreter of train.sh / test.sh: records each call (`-c` snippets run for real).
if [ "$1" = "-c" ]; then exec "$REAL_PYTHON" "$@"; fi
{ printf '%s\\037' "$PWD" "${WORLD_SIZE-}" "$@"; printf '\\036'; } >> "$SHIM_LOG"
"""

WS: Path = ROOT  # the workspace, set by the setup op


# ----------------------------------------------------------------------------------------- workspace


def _jpg(src: Path, dst: Path) -> None:
    from PIL import Image

    Image.open(src).convert("RGB").save(dst)


def _link(ws: Path, name: str, target: str | Path) -> None:
    (ws / name).parent.mkdir(parents=True, exist_ok=True)
    (ws / name).symlink_to(target)


def _tiny_config(ws: Path, name: str, output_dir: str) -> None:
    """A tiny training config at ws/name with paths relative to the workspace (CONFIG, CONFIG.yaml)."""
    import yaml

    from tests.tiny_train import tiny_train_config

    cfg = tiny_train_config(ws / ".cfg" / name, Path("data/shapes"), max_steps=1, output_dir=output_dir)
    raw = yaml.safe_load((ws / ".cfg" / name / "tiny_config.yaml").read_text())
    assert cfg.output_dir == output_dir
    (ws / name).write_text(yaml.safe_dump(raw))


def _converter_inputs(ws: Path) -> None:
    """Small inputs for the README's converter commands, in each source's format, under its README name."""
    from tests.tiny_bench import png

    coco = {"images": [{"id": 9, "file_name": "000000000009.jpg"}],
            "annotations": [{"id": 1, "image_id": 9, "caption": "A red square."}]}
    (ws / "annotations").mkdir()
    (ws / "annotations" / "captions_train2017.json").write_text(json.dumps(coco))
    llava = [{"id": "1", "image": "coco/train2017/000000000009.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}]
    (ws / "llava_v1_5_mix665k.json").write_text(json.dumps(llava))
    aic = [{"image_id": "8f00f3d0.jpg", "caption": ["两个人在路上交谈", "一只狗在草地上奔跑"]}]
    (ws / "caption_train_annotations_20170902.json").write_text(json.dumps(aic, ensure_ascii=False))
    (ws / "image_map.tsv").write_text("1\t000001.jpg\n2\t000002.jpg\n")
    captions = {"1": "一个红色的方块", "2": ["蓝色的圆"]}
    (ws / "captions.json").write_text(json.dumps(captions, ensure_ascii=False))
    for k, colour in enumerate([(200, 30, 10), (10, 30, 200)]):
        png(ws / "data" / "coco" / "train2017" / f"00000000000{k}.jpg", colour, size=(40, 30))


def build_workspace(ws: Path) -> dict:
    """Everything README.md's commands name, under `ws`: `data/shapes` (tiny shapes data + vocabulary),
    `runs/demo/stage1` (a tiny VLM trained 2 steps) and `runs/demo/stage2` (a copy of it), the
    placeholders as real files (`RUN_DIR`, `DIR`, `CONFIG`, `CONFIG.yaml`, `a.png`, `a.jpg`, `b.jpg`,
    `img.jpg`, `q.jsonl`, `val.jsonl`), the benchmarks' released files (`vqav2/`, `val2014/`,
    `mmbench_dev_20230712.tsv`, `ScienceQA/data/scienceqa`), the converters' inputs, and links to the
    repository's configs/ and entry points."""
    t0 = time.monotonic()
    from qwenvl_lab.trainer.run import train

    from tests import tiny_bench
    from tests.tiny_train import make_tiny_data, tiny_model_section, tiny_train_config

    times = {"imports": time.monotonic() - t0}
    ws.mkdir(parents=True, exist_ok=True)
    os.chdir(ws)
    for name in ("configs", "train.sh", "test.sh", "train.py", "test.py", "benchmarks"):
        _link(ws, name, ROOT / name)
    data = make_tiny_data(ws / "data" / "shapes")
    times["data"] = time.monotonic() - t0
    stage1, stage2 = ws / "runs" / "demo" / "stage1", ws / "runs" / "demo" / "stage2"
    model = tiny_model_section(data)
    model["lm_config"]["max_position_embeddings"] = 512  # as the demo's: room for the server's default max_tokens
    train(tiny_train_config(ws / ".cfg" / "stage1", data, model=model, output_dir=str(stage1), max_steps=2))
    times["stage1"] = time.monotonic() - t0
    # The demo's stage 2 until `sh train.sh` (the README's line) trains one from this run: a copy of stage 1.
    shutil.copytree(stage1, stage2, symlinks=True)
    _link(ws, "RUN_DIR", "runs/demo/stage2")
    _link(ws, "DIR", "data/shapes")
    _tiny_config(ws, "CONFIG", "runs/config")
    _tiny_config(ws, "CONFIG.yaml", "runs/config_yaml")
    val = data / "images" / "val"
    shutil.copy(val / "000000.png", ws / "a.png")
    for src, name in (("000000.png", "a.jpg"), ("000001.png", "b.jpg"), ("000002.png", "img.jpg")):
        _jpg(val / src, ws / name)
    shutil.copy(data / "val.jsonl", ws / "val.jsonl")
    lines = (data / "val.jsonl").read_text().splitlines()
    (ws / "q.jsonl").write_text("\n".join(lines[:3]) + "\n")
    tiny_bench.write_vqav2(ws / "vqav2")
    _link(ws, "val2014", "vqav2/val2014")
    tiny_bench.write_mmbench(ws)
    tiny_bench.write_scienceqa(ws / "ScienceQA" / "data" / "scienceqa")
    _converter_inputs(ws)
    (ws / ".shim").mkdir()
    (ws / ".shim" / "python").write_text(SHIM)
    (ws / ".shim" / "python").chmod(0o755)
    return {"times": {k: round(v, 1) for k, v in times.items()}}


# ----------------------------------------------------------------------------------- running commands


class _Parsed(BaseException):
    """Raised right after the program's argparse parse succeeded (parse-only mode)."""


@contextmanager
def parse_only():
    """argparse's outermost parse_args / parse_known_args raises _Parsed once it has returned."""
    depth = [0]
    originals = {name: getattr(argparse.ArgumentParser, name) for name in ("parse_args", "parse_known_args")}

    def wrap(orig):
        def parse(self, *a, **k):
            depth[0] += 1
            try:
                result = orig(self, *a, **k)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                raise _Parsed
            return result
        return parse

    for name, orig in originals.items():
        setattr(argparse.ArgumentParser, name, wrap(orig))
    try:
        yield
    finally:
        for name, orig in originals.items():
            setattr(argparse.ArgumentParser, name, orig)


def _exit_status(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _script(name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else (WS / path if (WS / path).exists() else ROOT / path)


def call_python(args: list[str]) -> int:
    """`python ARGS` in this process; returns its exit status (PARSED in parse-only mode)."""
    try:
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=False)
        elif args[0] == "-c":
            sys.argv = ["-c", *args[2:]]
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            path = _script(args[0])
            sys.argv = [str(path), *args[1:]]
            runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        return _exit_status(e.code)
    except _Parsed:
        return PARSED
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


@contextmanager
def captured(env: dict, stdin: str | None):
    """The command's environment variables, stdin, and its stdout/stderr captured."""
    saved_env, saved_argv, saved_stdin = dict(os.environ), list(sys.argv), sys.stdin
    os.environ.update(env)
    os.chdir(WS)
    sys.stdin = io.StringIO(stdin or "")
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            yield out, err
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv, sys.stdin = saved_argv, saved_stdin
        os.chdir(WS)


def split_command(cmd: str) -> tuple[dict, list[str]]:
    """Leading `NAME=value` words are the environment; the rest is the argument vector."""
    words = shlex.split(cmd)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words


def run_sh(argv: list[str], env: dict) -> tuple[int, str, list[tuple[dict, list[str]]]]:
    """Run a shell script with the recording shim as its Python; its exit status, output and the calls."""
    log = WS / ".shim" / "calls"
    log.unlink(missing_ok=True)
    p = subprocess.run(argv, cwd=WS, capture_output=True, text=True, timeout=120,
                       env={**os.environ, **env, "PY": str(WS / ".shim" / "python"),
                            "REAL_PYTHON": sys.executable, "SHIM_LOG": str(log)})
    calls = []
    for record in (log.read_text().split("\x1e") if log.exists() else []):
        if record:
            pwd, world_size, *args = record.split("\x1f")[:-1]
            assert Path(pwd).resolve() == WS.resolve(), f"{argv[1]} ran Python in {pwd}"
            calls.append(({"WORLD_SIZE": world_size} if world_size else {}, args))
    return p.returncode, p.stdout + p.stderr, calls


def serve_in_thread(args: list[str], timeout_s: float = 180) -> int:
    """Start a server command in a daemon thread; 0 once its /health answers, else its exit status."""
    port = args[args.index("--port") + 1]
    status = []
    thread = threading.Thread(target=lambda: status.append(call_python(args)), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and thread.is_alive():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return 0
        except OSError:
            time.sleep(0.3)
    thread.join(1)
    return status[0] if status else 124


def run_op(req: dict) -> dict:
    env, argv = split_command(req["cmd"])
    with captured(env, req.get("stdin")) as (out, err):
        if argv[0] == "sh":
            rc, text, calls = run_sh(argv, env)
            print(text, file=err)
            for call_env, args in calls if rc == 0 else []:
                os.environ.update(call_env)
                rc = call_python(args)
                if rc:
                    break
        elif argv[0] in ("python", "python3"):
            rc = serve_in_thread(argv[1:]) if req.get("serve") else call_python(argv[1:])
        else:
            print(f"{argv[0]}: not a command this runner runs", file=err)
            rc = 127
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue()}


def _flags(args: list[str]) -> list[str]:
    """The options a command line uses (up to a script it launches, e.g. torchrun's train.py)."""
    flags = []
    for word in args:
        if word.endswith(".py"):
            break
        if re.match(r"--?[A-Za-z]", word):
            flags.append(word.split("=", 1)[0])
    return flags


def check_python(args: list[str], hidden: list[str], help_prefix: list[str]) -> list[str]:
    if args[0].endswith("train.py"):
        args = args if "--check" in args else [args[0], "--check", *args[1:]]
        rc = call_python(args)
        print(f"checked `python {shlex.join(args)}`: exit {rc}", file=sys.stderr)
        return [] if rc == 0 else [f"`python {shlex.join(args)}` exited {rc}"]
    head, rest = (args[:2], args[2:]) if args[0] == "-m" else (args[:1], args[1:])
    out = io.StringIO()
    with redirect_stdout(out):
        rc = call_python(head + help_prefix + ["--help"])
    text = out.getvalue()
    print(text)
    shown = " ".join(head + help_prefix)
    problems = [] if rc == 0 else [f"`python {shown} --help` exited {rc}"]
    print(f"checked `python {shown} --help`: exit {rc}; flags {_flags(rest)}", file=sys.stderr)
    for flag in _flags(rest):
        if flag not in hidden and not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
            problems.append(f"{flag} is not an option of `python {shown}` (not in its --help)")
    if text.lstrip().startswith("usage:"):  # argparse: the command's own arguments must parse
        with parse_only():
            rc = call_python(args)
        print(f"checked that `python {shlex.join(args)}` parses: {'yes' if rc == PARSED else rc}", file=sys.stderr)
        if rc != PARSED:
            problems.append(f"`python {shlex.join(args)}` did not parse its arguments (exit {rc})")
    return problems


def check_op(req: dict) -> dict:
    env, argv = split_command(req["cmd"])
    hidden, prefix = req.get("hidden", []), req.get("help_prefix", [])
    problems: list[str] = []
    with captured(env, None) as (out, err):
        if argv[0] == "make":
            p = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
            print(p.stdout, p.stderr, file=err)
            problems += [] if p.returncode == 0 else [f"`make -n {' '.join(argv[1:])}` exited {p.returncode}"]
        elif argv[0] == "sh":
            rc, text, calls = run_sh(argv, env)
            print(text, file=err)
            problems += [] if rc == 0 else [f"`{shlex.join(argv)}` exited {rc} with the recording interpreter"]
            for call_env, args in calls:
                os.environ.update(call_env)
                problems += check_python(args, hidden, prefix)
        elif argv[0] in ("python", "python3"):
            problems += check_python(argv[1:], hidden, prefix)
        else:
            problems.append(f"{argv[0]}: no check for this program")
    return {"rc": 1 if problems else 0, "out": out.getvalue(), "err": err.getvalue(), "problems": problems}


def main(answer_fd: int) -> None:
    global WS
    warnings.simplefilter("ignore")
    answers = os.fdopen(answer_fd, "w")
    for line in sys.stdin:
        req = json.loads(line)
        t0 = time.monotonic()
        try:
            if req["op"] == "setup":
                WS = Path(req["root"])
                answer = build_workspace(WS)
            else:
                answer = (run_op if req["op"] == "run" else check_op)(req)
        except BaseException:
            answer = {"rc": 1, "out": "", "err": traceback.format_exc(), "problems": ["the runner failed"]}
        answer["seconds"] = round(time.monotonic() - t0, 2)
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
    answers.close()
    os._exit(0)  # servers started by the commands run in threads that never end


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(int(sys.argv[1]))
