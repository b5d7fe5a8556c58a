"""README.md's shell commands, read for tests/test_readme.py, and the worker process that runs them.

`readme_commands(text) -> list[str]`: every command of every ```sh block (indented blocks too), one string
per command: backslash-newline continuations joined, a trailing `# comment` dropped (a `#` that starts a
word outside quotes, as in sh), blank and comment-only lines skipped.
`expand_optional(cmd) -> str`: the command with its optional groups filled in: `[--limit 500]` becomes
`--limit 500` (so the flag is tried), a group holding `...` (`[key=value ...]`) is dropped.
`Worker(root)`: one Python process (tests/readme_runner.py) that builds the workspace under `root` (files
named as the README names them; tiny trained runs) and runs commands in it in-process, so the imports are
paid once. `Worker.request(**req) -> dict` sends one request and waits for its answer (at most `timeout_s`).
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_OPTIONAL = re.compile(r"(?<=\s)\[([^\[\]'\"]*)\](?=\s|$)")


def sh_blocks(text: str) -> list[str]:
    """The bodies of the ```sh fences, indentation of the fence removed."""
    blocks, body, indent = [], None, ""
    for line in text.splitlines():
        m = _FENCE.match(line)
        if body is None:
            if m and m.group(2) == "sh":
                body, indent = [], m.group(1)
        elif m and not m.group(2):
            blocks.append("\n".join(body))
            body = None
        else:
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
    return blocks


def strip_comment(line: str) -> str:
    """`line` without a trailing sh comment: a `#` at the start of a word, outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str) -> list[str]:
    commands = []
    for block in sh_blocks(text):
        joined = re.sub(r"\\\n", " ", block)  # a continuation: sh drops backslash-newline, inside quotes too
        for line in joined.splitlines():
            cmd = strip_comment(line.strip())
            if cmd:
                commands.append(re.sub(r"\s+", " ", cmd) if "'" not in cmd and '"' not in cmd else cmd)
    return commands


def expand_optional(cmd: str) -> str:
    return _OPTIONAL.sub(lambda m: "" if "..." in m.group(1) else m.group(1), cmd).replace("  ", " ").strip()


class Worker:
    """The runner process; `request` answers one JSON request (see tests/readme_runner.py for the ops)."""

    def __init__(self, root: Path):
        self.log = Path(root) / "runner.log"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
                   GRADIO_ANALYTICS_ENABLED="False")
        # Answers come back on a pipe of their own: what the commands print goes to the log.
        read_fd, write_fd = os.pipe()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.readme_runner", str(write_fd)], cwd=ROOT,
                                         env=env, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                         pass_fds=(write_fd,), text=True)
        os.close(write_fd)
        self._answers = os.fdopen(read_fd, "r")

    def _read(self, timeout_s: float) -> dict:
        ready, _, _ = select.select([self._answers], [], [], timeout_s)
        if not ready:  # a command that hangs (waiting for input, a server that never answers)
            self.proc.kill()
            raise RuntimeError(f"no answer from the README runner in {timeout_s:.0f} s:\n"
                               f"{self.log.read_text()[-4000:]}")
        line = self._answers.readline()
        if not line:
            raise RuntimeError(f"the README runner exited ({self.proc.poll()}):\n{self.log.read_text()[-4000:]}")
        return json.loads(line)

    def request(self, timeout_s: float = 600, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._answers.close()
