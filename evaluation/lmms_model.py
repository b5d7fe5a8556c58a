"""Our VLM as an lmms-eval model (`--model qwenvl_lab --model_args pretrained=RUN_OR_MODEL_DIR`).

Needs the optional lmms-eval package (imported here at the top: this module is only imported by
lmms-eval's registry, or by `evaluation.lmms_eval`, which registers it).

`QwenVLLab(pretrained, device=None, batch_size=1, max_new_tokens=None, dtype=None, **ignored)` loads the
model with `model.model.load_vlm`, the loader `VLM.from_pretrained` forwards to (a run directory resolves
to its `final/` or newest checkpoint), and answers lmms-eval's requests through the VLM's public API only:
- `generate_until`: the context (with one `<image>` per visual unless the context already places them)
  as one user turn, answered in batches of `batch_size` with `vlm.chat_batch` (greedy unless the task asks
  for temperature > 0); each answer is cut at the first of the task's `until` strings;
- `loglikelihood`: `(loss, greedy?)` where loss is the mean negative log-likelihood per token of the
  continuation and the end of turn (`evaluation.likelihood.reply_logprobs`): lmms-eval's convention, as its
  own models return it (its multiple-choice tasks pick the smallest); wrapped in lmms-eval's
  `GenerationResult`, which lmms-eval 0.7.3 needs to pass the pair on unchanged.
Videos and multi-round generation are not supported (a clear error).
"""

from __future__ import annotations

from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from ..model.model import load_vlm
from ..model.paths import resolve_model_dir
from .likelihood import reply_logprobs


def _flatten(visuals: Any) -> list:
    if visuals is None:
        return []
    out = []
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        out += _flatten(v) if isinstance(v, (list, tuple)) else [v]
    return out


class QwenVLLab(lmms):
    is_simple = True

    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str = 1,
                 max_new_tokens: int | None = None, dtype: str | None = None, **ignored: Any) -> None:
        super().__init__()
        if device in (None, "", "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lmms-eval passes cuda by default
        self._device = torch.device(device)
        vlm = load_vlm(resolve_model_dir(pretrained))
        if dtype:
            vlm = vlm.to(getattr(torch, dtype))
        self.vlm = vlm.to(self._device).eval()
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens else None

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list[Image.Image]:
        visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id])) if doc_to_visual else []
        for v in visuals:
            if not isinstance(v, Image.Image):
                raise NotImplementedError(f"qwenvl_lab answers image questions only; task {task} gave a "
                                          f"{type(v).__name__} visual (videos and audio are not supported)")
        return [v.convert("RGB") for v in visuals]

    @staticmethod
    def _messages(context: str, n_images: int) -> list[dict]:
        if context.count("<image>") != n_images:
            context = context.replace("<image>", "").strip()
            context = "<image>\n" * n_images + context
        return [{"role": "user", "content": context}]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out: list[str] = []
        bar = tqdm(total=len(requests), desc="qwenvl_lab", disable=self.rank != 0)
        for start in range(0, len(requests), self.batch_size):
            chunk = [r.args for r in requests[start:start + self.batch_size]]
            convs, cuts, gen_kw = [], [], {}
            for context, kw, doc_to_visual, doc_id, task, split in chunk:
                kw = dict(kw or {})
                until = kw.get("until") or []
                cuts.append([until] if isinstance(until, str) else list(until))
                images = self._visuals(doc_to_visual, task, split, doc_id)
                convs.append((images, self._messages(context, len(images))))
                gen_kw = self._gen_kwargs(kw)  # lmms-eval groups requests with the same generation settings
            for reply, stops in zip(self.vlm.chat_batch(convs, **gen_kw), cuts):
                for s in stops:
                    if s and s in reply:
                        reply = reply.split(s, 1)[0]
                out.append(reply)
            bar.update(len(chunk))
        bar.close()
        return out

    def _gen_kwargs(self, kw: dict) -> dict:
        temperature = float(kw.get("temperature") or 0.0)
        gen = {"max_new_tokens": int(self.max_new_tokens or kw.get("max_new_tokens") or 128)}
        if temperature > 0 and kw.get("do_sample", True):
            gen.update(do_sample=True, temperature=temperature, top_p=float(kw.get("top_p") or 1.0))
        else:
            gen["do_sample"] = False
        return gen

    def loglikelihood(self, requests: list[Instance]) -> list:
        out = []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in tqdm(
                [r.args for r in requests], desc="qwenvl_lab loglikelihood", disable=self.rank != 0):
            cont = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(self.task_dict[task][split][doc_id])
            images = self._visuals(doc_to_visual, task, split, doc_id)
            total, n, greedy = reply_logprobs(self.vlm, images, self._messages(context, len(images)),
                                              [str(cont).strip()])[0]
            # lmms-eval's convention: the continuation's loss (mean negative log-likelihood per token), as its
            # own models return it; its multiple-choice tasks pick the option with the smallest value.
            # lmms-eval 0.7.3 turns every response that is not a str or a GenerationResult into a string, a
            # (loss, greedy) pair included; wrapped, the pair reaches the task unchanged.
            out.append(GenerationResult(text=(-total / n, greedy)))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("qwenvl_lab does not implement lmms-eval's multi-round generation")

