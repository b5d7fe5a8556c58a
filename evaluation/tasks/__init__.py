"""The benchmark registry: a plain dict from a task name to its `Task` (loader, scorer, prompt)."""

from . import captions, choice, vqa, yesno
from .common import Task

TASKS: dict[str, Task] = {**vqa.TASKS, **choice.TASKS, **yesno.TASKS, **captions.TASKS}

__all__ = ["TASKS", "Task"]
