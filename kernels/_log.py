"""Log a message once per process per key (dispatch choices and fallbacks must not flood the log)."""

from __future__ import annotations

import logging

_seen: set[str] = set()


def log_once(logger: logging.Logger, key: str, level: int, msg: str, *args) -> bool:
    """Log `msg` under `key` the first time only; returns whether it was logged."""
    if key in _seen:
        return False
    _seen.add(key)
    logger.log(level, msg, *args)
    return True


def reset() -> None:
    """Forget what was logged (tests)."""
    _seen.clear()
