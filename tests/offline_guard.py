"""Run a module (or a .py file) as `__main__` with every attempt to reach another machine refused and
logged: `python -m tests.offline_guard MODULE_OR_FILE [ARGS...]` (e.g. `... serve.web --model DIR`).

An audit hook sees each `socket.connect`, `socket.getaddrinfo` and `socket.sendto` of the process (every
HTTP client goes through them); one that names an address other than the loopback prints
`OUTBOUND <event> <address>` on stderr and fails with OSError, so nothing leaves the machine and a test
can assert that the log has no such line. Unix sockets and loopback addresses pass.
"""

from __future__ import annotations

import ipaddress
import runpy
import sys

MARK = "OUTBOUND"
LOCAL_NAMES = {"localhost", "ip6-localhost", ""}


def _is_local(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).strip("[]")
    if host.lower() in LOCAL_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False  # a host name other than localhost: resolving it is already a request
    return ip.is_loopback or ip.is_unspecified


def _hook(event: str, args: tuple) -> None:
    if event in ("socket.connect", "socket.sendto"):
        address = args[1]
        host = address[0] if isinstance(address, tuple) else None  # a str / bytes address: a Unix socket
    elif event == "socket.getaddrinfo":
        host, address = args[0], args[:2]
    else:
        return
    if not _is_local(host):
        print(f"{MARK} {event} {address!r}", file=sys.stderr, flush=True)
        raise OSError(f"tests.offline_guard: {event} to {address!r} refused (this process must stay offline)")


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m tests.offline_guard MODULE_OR_FILE [ARGS...]")
    target, sys.argv = sys.argv[1], sys.argv[1:]
    sys.addaudithook(_hook)
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
