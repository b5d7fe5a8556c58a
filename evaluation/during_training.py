"""Benchmarks during training: `eval_tasks=[{task, data, images, limit}]` answered every `eval_steps`.

Each entry names a task of `evaluation.tasks.TASKS` and its released files (`data`, optional `images`,
`limit`, `prompt`, `split`, `annotations`, `mc_mode`, `batch_size`, `max_new_tokens`, and `name` for the log keys when one
task is listed twice). Every `eval_steps` optimizer steps, the main process answers each entry with the
model being trained (in eval mode, then back), writes `output_dir/eval_tasks/{name}/step-{N}/` (answers,
results.json, chart) and logs the scores through the Trainer as `eval_{name}_{metric}` (so they reach
log.jsonl and TensorBoard as `eval/{name}_{metric}`).
Only rank 0 evaluates; the model's weights must be whole on it (not with FSDP or ZeRO-3, which
`check_eval_tasks` refuses).

The trainer does not import evaluation/ (they are packages of the same layer): train.py checks the entries
(`check_eval_tasks`, right after loading the config) and hands `eval_task_callbacks` to
`trainer.run.train(cfg, callbacks=[eval_task_callbacks])`, which calls it with the config, the Trainer and
the run directory once the Trainer is built.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import TrainerCallback

from ..core.config_io import ConfigError
from ..model.train_config import TrainConfig, fsdp_flag
from .runner import MC_MODES, run_task
from .tasks import TASKS

log = logging.getLogger("qwenvl_lab.trainer")
KEYS = {"task", "data", "images", "limit", "name", "prompt", "split", "annotations", "mc_mode", "batch_size",
        "max_new_tokens"}


def check_eval_tasks(specs: list[dict], eval_steps: int | None, fsdp: bool | str = False,
                     deepspeed: str | None = None) -> None:
    """Raise ConfigError naming the entry and key that cannot work (before anything is built)."""
    if not specs:
        return
    if not eval_steps or eval_steps < 1:
        raise ConfigError("eval_tasks needs eval_steps (how many optimizer steps between evaluations)")
    if fsdp_flag(fsdp):
        raise ConfigError("eval_tasks answers on rank 0 with whole weights; it does not run with FSDP")
    if deepspeed and Path(deepspeed).is_file():
        stage = json.loads(Path(deepspeed).read_text()).get("zero_optimization", {}).get("stage")
        if stage == 3:
            raise ConfigError("eval_tasks answers on rank 0 with whole weights; it does not run with ZeRO-3")
    names = set()
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise ConfigError(f"eval_tasks[{i}] must be a mapping like {{task: vqav2, data: PATH}}")
        unknown = set(spec) - KEYS
        if unknown:
            raise ConfigError(f"eval_tasks[{i}]: unknown key(s) {sorted(unknown)}; valid: {sorted(KEYS)}")
        if spec.get("task") not in TASKS:
            raise ConfigError(f"eval_tasks[{i}]: task {spec.get('task')!r}; valid: {', '.join(sorted(TASKS))}")
        if not spec.get("data"):
            raise ConfigError(f"eval_tasks[{i}] ({spec['task']}): `data` (the benchmark's file or folder) is missing")
        if spec.get("mc_mode", "generate") not in MC_MODES:
            raise ConfigError(f"eval_tasks[{i}]: mc_mode {spec['mc_mode']!r}; valid: {', '.join(MC_MODES)}")
        name = spec.get("name", spec["task"])
        if name in names:
            raise ConfigError(f"eval_tasks[{i}]: the name {name!r} is used twice; give one entry a `name`")
        names.add(name)


class EvalTasksCallback(TrainerCallback):
    """Answers `specs` every `eval_steps` steps and logs the scores through `trainer.log`."""

    def __init__(self, specs: list[dict], eval_steps: int, output_dir: str | Path, trainer):
        self.specs, self.eval_steps, self.output_dir, self.trainer = list(specs), int(eval_steps), Path(output_dir), trainer

    def evaluate(self, model, step: int) -> dict[str, float]:
        scores: dict[str, float] = {}
        for spec in self.specs:
            name = spec.get("name", spec["task"])
            options = {k: spec[k] for k in ("split", "annotations") if spec.get(k) is not None}
            res = run_task(model, spec["task"], spec["data"], images=spec.get("images"),
                           output=self.output_dir / "eval_tasks" / name / f"step-{step}", limit=spec.get("limit"),
                           batch_size=int(spec.get("batch_size", 8)), prompt=spec.get("prompt"),
                           mc_mode=spec.get("mc_mode", "generate"), max_new_tokens=spec.get("max_new_tokens"),
                           options=options, progress=False)
            for metric, value in res["metrics"].items():
                scores[f"eval_{name}_{metric}"] = float(value)
            log.info("step %d: %s %s", step, name, {k: round(v, 4) for k, v in res["metrics"].items()})
        return scores

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.eval_steps or not state.is_world_process_zero:
            return
        scores = self.evaluate(model, state.global_step)
        if scores:
            self.trainer.log(scores)  # -> every logger callback: log.jsonl, TensorBoard, wandb


def eval_task_callbacks(cfg: TrainConfig, trainer, output_dir: str | Path) -> list[TrainerCallback]:
    """The callbacks `cfg.eval_tasks` asks for (none without entries), for `trainer.run.train(cfg, callbacks=...)`."""
    if not cfg.eval_tasks:
        return []
    check_eval_tasks(cfg.eval_tasks, cfg.eval_steps, cfg.fsdp, cfg.deepspeed)  # callers other than train.py
    return [EvalTasksCallback(cfg.eval_tasks, cfg.eval_steps, output_dir, trainer)]
