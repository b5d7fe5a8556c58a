"""LM backbones: one class per language-model family, behind the one interface the VLM uses (the
vision side's counterpart is visual/base.py).

A backbone holds a family's rules, not its weights: the weights stay in `vlm.lm` (so parameter names,
freeze regexes and checkpoints do not depend on the backbone), and every method takes that module (plain
or wrapped by peft). `model/model.py`'s `LM_BACKBONES` names the classes.

Contract (`LMBackbone`, an abstract base class): a family subclasses it, sets `name` (its key in
`LM_BACKBONES`) and must implement the three abstract methods `load_lm`, `hidden_states` and `generate` (a
family without one of them cannot be instantiated); everything else below has a default here that a family
may override.
- `load_lm(config) -> nn.Module` and `load_tokenizer(config) -> tokenizer | None` (classmethods) build the
  LM (a checkpoint, or random from `lm_config` for `lm="scratch"`) and its tokenizer (`config.tokenizer`,
  else the LM directory's, else none for a scratch LM).
- `LMBackbone(config, lm, tokenizer)` binds them: it resolves the special ids (image placeholder, image
  start/end if any, end of turn, pad, end of text) and the chat template, adding what the tokenizer lacks:
  an image placeholder `<image>` (and, with `image_delimiters=true`, `<image_start>` / `<image_end>`),
  growing the embedding table when the new ids do not fit (new rows = the mean row, deterministic).
  `added_tokens` lists them; `trainable_tokens` / `trainable_token_ids` the tokens whose input-embedding
  rows train (`config.trainable_tokens`; by default the tokens added here, the placeholder excepted
  since its rows are always replaced by image features).
- `chat_format`: the `dataset.rendering.ChatFormat` that renders training samples and prompts (None
  without a tokenizer); `image_token_id`, `pad_token_id`, `stop_token_ids`. A transformers tokenizer whose
  own Jinja template none of ours matches (LLaVA-1.5's "USER: ... ASSISTANT:") renders with that template
  as it is (`chat_template="own"`, `ChatFormat.jinja`; ids equal its processor's, generation stops at eos).
- `embedding(lm)`, `hidden_states(lm, embeds [B, T, D], attention_mask, **kw) -> (hidden [B, T, D],
  past_key_values)`, `output_head(lm)` (logits = head(hidden) when `plain_head(lm)`; otherwise
  `full_logits(lm, embeds, mask, **kw)` runs the LM's own forward, e.g. Gemma-2's soft-capping).
- `generate(lm, input_ids, embeds, attention_mask, **gen_kw) -> list[list[int]]` (new tokens only, cut
  at `stop_token_ids`); gen_kw: max_new_tokens, do_sample, temperature, top_p, top_k,
  repetition_penalty, stop_token_ids, streamer(batch_index, token_id).
- `default_lora_targets(lm)`: module-name suffixes joined by "|", or "all-linear";
  `all_linear_targets(lm)`: every Linear of the LM but its output head. `gradient_checkpointing_enable(lm)`.
- `prepare_attention(lm, device, dtypes) -> str | None`: resolves the LM's attention implementation for
  each compute dtype once the LM is on `device` (our Qwen: `kernels.prepare_attention`, the GPU
  self-test for `auto`); None for LMs whose attention is not ours (transformers picks its own).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from ..core.errors import UserError
from ..dataset.chat_templates import OWN, TEMPLATES, detect_template
from ..dataset.rendering import ChatFormat
from ..dataset.sample import IMAGE_MARKER
from ..kernels.prepare import prepare_attention
from ..qwen import QWenConfig, QWenLMHeadModel, load_tokenizer
from .config import VLMConfig
from .dtypes import built_in, torch_dtype
from .tokenizers import TOKENIZER_FILES, has_tokenizer_files, load_lm_tokenizer

log = logging.getLogger(__name__)

IMAGE_TOKEN = IMAGE_MARKER  # the placeholder token added to a tokenizer that has none (as transformers' Llava)
IMAGE_DELIMITERS = ("<image_start>", "<image_end>")
# Placeholder / start / end triples a tokenizer may already have, in order of preference.
KNOWN_IMAGE_TOKENS = (("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"),
                      ("<|extra_0|>", "<|extra_1|>", "<|extra_2|>"),
                      ("<image_soft_token>", "<start_of_image>", "<end_of_image>"),
                      (IMAGE_TOKEN, None, None))
# LoRA targets by transformers model_type; other architectures get "all-linear".
_ATTN_MLP = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
HF_LORA_TARGETS = {
    **{t: _ATTN_MLP for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                              "smollm3", "olmo", "olmo2", "granite", "cohere", "starcoder2")},
    "phi3": "qkv_proj|o_proj|gate_up_proj|down_proj",
    "gpt2": "c_attn|c_proj|c_fc",
}
# Config attributes with which a transformers LM changes its logits after the output head.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def unwrap(lm: nn.Module) -> nn.Module:
    """The LM under a peft wrapper (LoRA layers live inside it, so calling its parts applies them)."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def _tokenizer_path(config: VLMConfig) -> str | None:
    path = config.tokenizer
    if path is None:
        if config.is_scratch_lm or (Path(config.lm).exists() and not has_tokenizer_files(config.lm)):
            return None
        path = config.lm
    if not Path(path).exists():
        # A hub id named by the user: fetch (or find in the cache) only the tokenizer files.
        path = snapshot_download(path, allow_patterns=list(TOKENIZER_FILES) + ["*.txt", "*.json"])
    return str(path)


def _token_id(tokenizer, token: str | None) -> int | None:
    if token is None:
        return None
    try:
        return int(tokenizer.token_to_id(token))
    except KeyError:
        return None


class LMBackbone(ABC):
    """Abstract base: one LM family's rules. Subclasses implement `load_lm`, `hidden_states`, `generate`."""

    name = "base"
    # `hidden_states(..., output_rows=[B, T] bool)` returns the final hidden states at those positions only
    # ([N, H]): a training forward then runs the LM's last block for its target positions alone.
    rows_at_targets = False

    # ----- building --------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def load_lm(cls, config: VLMConfig) -> nn.Module:
        """The LM of `config.lm` (a checkpoint), or random weights from `lm_config` for `lm="scratch"`."""

    @classmethod
    def load_tokenizer(cls, config: VLMConfig):
        path = _tokenizer_path(config)
        return None if path is None else load_lm_tokenizer(path)

    def __init__(self, config: VLMConfig, lm: nn.Module, tokenizer: Any) -> None:
        self.config, self.tokenizer = config, tokenizer
        self.added_tokens: list[str] = []
        start = end = None
        if tokenizer is None:
            lm_id = config.image_token_id
            lm_id = getattr(unwrap(lm).config, "image_token_id", None) if lm_id is None else lm_id
            if lm_id is None:
                raise UserError("no image placeholder id: set VLMConfig.image_token_id (there is no tokenizer "
                                 "and the LM config has none)")
            self.image_token_id = int(lm_id)
        else:
            self.image_token_id, start, end = self._image_tokens(tokenizer, config.image_token_id)
        if config.image_delimiters and tokenizer is not None and start is None:
            self._add_tokens(list(IMAGE_DELIMITERS))
            start, end = (tokenizer.token_to_id(t) for t in IMAGE_DELIMITERS)
        if tokenizer is not None:
            self._fit_embeddings(lm)
        self.chat_format: ChatFormat | None = None
        self._no_format = "this VLM has no tokenizer: set VLMConfig.tokenizer to a directory holding one"
        if config.chat_template is not None and config.chat_template not in (*TEMPLATES, OWN.name):
            raise UserError(f"chat_template={config.chat_template!r}; valid: {', '.join(TEMPLATES)}, {OWN.name} "
                            "(the tokenizer's own Jinja template)")
        if tokenizer is not None:
            # Logits need no template: a missing one's error waits for whoever renders text.
            try:
                name = self._template_name(lm)
                template = OWN if name == OWN.name else TEMPLATES[name]
            except UserError as e:
                self._no_format = str(e)
            else:
                own = tokenizer.chat_template if template is OWN else None  # spans are the template's own
                fmt = ChatFormat(tokenizer, template, self.image_token_id, eos_id=self._eos_id(),
                                 image_start_id=None if own else start, image_end_id=None if own else end,
                                 jinja=own)
                if fmt.missing_specials:
                    self._no_format = (f"chat template {template.name!r} needs the token(s) "
                                       f"{fmt.missing_specials}, which the tokenizer of {self.config.lm} lacks; "
                                       f"set chat_template to the LM's own ({', '.join(TEMPLATES)})")
                else:
                    self.chat_format = fmt
        self.trainable_tokens = self._trainable_tokens()
        self.trainable_token_ids = [int(tokenizer.token_to_id(t)) for t in self.trainable_tokens]

    def _image_tokens(self, tokenizer, forced: int | None) -> tuple[int, int | None, int | None]:
        """(placeholder, start, end) ids: `forced` (VLMConfig.image_token_id) or the tokenizer's own, else
        `<image>` added. Start/end come from the tokenizer's triple of that placeholder, if any."""
        if hasattr(tokenizer, "image_token_id"):  # the Qwen interface names its vision tokens
            pad = tokenizer.image_token_id if forced is None else forced
            return int(pad), tokenizer.image_start_id, tokenizer.image_end_id
        for pad, start, end in KNOWN_IMAGE_TOKENS:
            pad_id = _token_id(tokenizer, pad)
            if pad_id is not None and forced in (None, pad_id):
                return pad_id, _token_id(tokenizer, start), _token_id(tokenizer, end)
        if forced is not None:
            return int(forced), None, None
        self._add_tokens([IMAGE_TOKEN])
        return tokenizer.token_to_id(IMAGE_TOKEN), None, None

    def _add_tokens(self, tokens: list[str]) -> None:
        added = self.tokenizer.add_special_tokens(tokens)
        if added:
            self.added_tokens += added
            log.info("tokenizer: added %s (ids %s)", added, [self.tokenizer.token_to_id(t) for t in added])

    def _fit_embeddings(self, lm: nn.Module) -> None:
        """Grow the embedding table (and an untied head) to the tokenizer when its ids do not fit. The new
        rows are the mean row: deterministic, so rebuilding from a saved config gives the same model."""
        base = unwrap(lm)
        emb = base.get_input_embeddings()
        n_rows, n_tok = emb.weight.shape[0], len(self.tokenizer)
        # Spare rows (e.g. Qwen's 151936 for 151851 tokens) hold new ids; our Qwen LM never grows (its
        # tokenizers add nothing past the spare rows).
        if n_tok <= n_rows or not hasattr(base, "resize_token_embeddings"):
            return
        with torch.no_grad():
            mean_in = emb.weight.float().mean(0)
            head = base.get_output_embeddings()
            mean_out = None if head is None or head.weight is emb.weight else head.weight.float().mean(0)
            base.resize_token_embeddings(n_tok, mean_resizing=False)
            base.get_input_embeddings().weight[n_rows:] = mean_in.to(emb.weight.dtype)
            head = base.get_output_embeddings()
            if mean_out is not None and head is not None:
                head.weight[n_rows:] = mean_out.to(head.weight.dtype)
        log.info("LM embedding table grown from %d to %d rows for the tokenizer", n_rows, n_tok)

    def _template_name(self, lm: nn.Module) -> str:
        name = self.config.chat_template
        text = getattr(self.tokenizer, "chat_template", None)
        if name is None:
            name = detect_template(text, self._model_type(lm))
        if name is None and isinstance(text, str) and hasattr(self.tokenizer, "hf_tokenizer"):
            name = OWN.name  # a template none of ours matches (LLaVA-1.5's): rendered as it is
        if name == OWN.name and not (isinstance(text, str) and hasattr(self.tokenizer, "hf_tokenizer")):
            raise UserError(f"chat_template=own: the tokenizer of {self.config.lm} has no Jinja chat template")
        if name is None:
            raise UserError(
                f"no chat template for {self.config.lm}: its tokenizer has no recognisable chat_template and "
                f"the model type {self._model_type(lm)!r} names none; set chat_template to one of "
                f"{', '.join(TEMPLATES)}")
        return name  # a known name: config.chat_template is checked in __init__, detect_template's are all TEMPLATES

    @staticmethod
    def _model_type(lm: nn.Module) -> str | None:
        cfg = getattr(unwrap(lm), "config", None)
        return getattr(cfg, "model_type", None)

    def _eos_id(self) -> int:
        tok = self.tokenizer
        if hasattr(tok, "eod_id"):
            return int(tok.eod_id)
        if getattr(tok, "eos_token_id", None) is not None:
            return int(tok.eos_token_id)
        raise UserError(f"the tokenizer of {self.config.lm} has no end-of-text (eos) token")

    def _trainable_tokens(self) -> list[str]:
        names = self.config.trainable_tokens
        if names is None:  # default: the tokens added here whose rows are read (not the placeholder)
            return [t for t in self.added_tokens if self.tokenizer.token_to_id(t) != self.image_token_id]
        if names and self.tokenizer is None:
            raise UserError("trainable_tokens needs a tokenizer to look the tokens up")
        for t in names:
            if _token_id(self.tokenizer, t) is None:
                raise UserError(f"trainable_tokens: {t!r} is not a token of this tokenizer")
        return list(names)

    # ----- ids ---------------------------------------------------------------------------------------
    def need_format(self) -> ChatFormat:
        if self.chat_format is None:
            raise UserError(self._no_format)
        return self.chat_format

    @property
    def stop_token_ids(self) -> list[int]:
        return self.need_format().stop_token_ids

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        if tok is None:
            raise UserError("this VLM has no tokenizer: set VLMConfig.tokenizer to a directory holding one")
        if hasattr(tok, "pad_id"):
            return int(tok.pad_id)
        pad = getattr(tok, "pad_token_id", None)
        return int(pad) if pad is not None else self._eos_id()  # padding is masked: any id will do

    # ----- forward pieces ----------------------------------------------------------------------------
    def embedding(self, lm: nn.Module) -> nn.Module:
        return unwrap(lm).get_input_embeddings()

    @abstractmethod
    def hidden_states(self, lm: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor | None, **kw):
        """embeds [B, T, D] -> (last hidden states [B, T, D], past_key_values or None)."""

    def output_head(self, lm: nn.Module) -> nn.Module:
        return unwrap(lm).get_output_embeddings()

    def plain_head(self, lm: nn.Module) -> bool:
        return True

    def full_logits(self, lm: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor | None, **kw):
        hidden, pkv = self.hidden_states(lm, embeds, attention_mask, **kw)
        return self.output_head(lm)(hidden), pkv

    @abstractmethod
    def generate(self, lm, input_ids, embeds, attention_mask, **gen_kw) -> list[list[int]]:
        """New token ids per sample (prompt excluded), cut at `stop_token_ids`."""

    # ----- training ----------------------------------------------------------------------------------
    def default_lora_targets(self, lm: nn.Module) -> str:
        return "all-linear"

    def all_linear_targets(self, lm: nn.Module) -> str:
        base = unwrap(lm)
        head = base.get_output_embeddings()
        names = {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, nn.Linear) and m is not head}
        if not names:
            raise ValueError(f"the LM {type(base).__name__} has no Linear layer besides its output head")
        return "|".join(sorted(names))

    def gradient_checkpointing_enable(self, lm: nn.Module) -> None:
        unwrap(lm).gradient_checkpointing_enable()

    def prepare_attention(self, lm: nn.Module, device: torch.device, dtypes: list[torch.dtype]) -> str | None:
        return None  # transformers LMs run their own attention (`attn_implementation`)


class QwenBackbone(LMBackbone):
    """Our Qwen family (qwen/): Qwen-1 names for every generation, ChatML, `<|extra_0|>` / `<|image_pad|>`."""

    name = "qwen"
    rows_at_targets = True  # QWenModel's `output_rows`

    @classmethod
    def load_lm(cls, config: VLMConfig) -> nn.Module:
        if config.is_scratch_lm:
            with built_in(torch_dtype(config.dtype)):  # random weights in the base dtype: no fp32 copy first
                return QWenLMHeadModel(QWenConfig.from_dict(config.scratch_lm_config()))
        return QWenLMHeadModel.from_pretrained(config.lm, dtype=torch_dtype(config.dtype))

    @classmethod
    def load_tokenizer(cls, config: VLMConfig):
        path = _tokenizer_path(config)
        return None if path is None else load_tokenizer(path)

    def __init__(self, config: VLMConfig, lm: nn.Module, tokenizer: Any) -> None:
        super().__init__(config, lm, tokenizer)
        # QWenModel's own hook (for direct use with `image_features`) agrees with the VLM's placeholder.
        unwrap(lm).config.image_token_id = self.image_token_id

    def _template_name(self, lm: nn.Module) -> str:
        return self.config.chat_template or "chatml"

    def hidden_states(self, lm, embeds, attention_mask, **kw):
        out = unwrap(lm).transformer(inputs_embeds=embeds, attention_mask=attention_mask, **kw)
        return out.last_hidden_state, out.past_key_values

    def generate(self, lm, input_ids, embeds, attention_mask, **gen_kw) -> list[list[int]]:
        # The prompt ids feed the repetition penalty; the embeddings (image rows in place) feed the LM.
        return unwrap(lm).generate(input_ids, attention_mask=attention_mask, inputs_embeds=embeds, **gen_kw)

    def default_lora_targets(self, lm: nn.Module) -> str:
        return "c_attn|attn.c_proj|w1|w2|mlp.c_proj"  # every Linear of a Qwen block

    def prepare_attention(self, lm: nn.Module, device: torch.device, dtypes: list[torch.dtype]) -> str | None:
        cfg = unwrap(lm).config
        chosen = [prepare_attention(device, dt, cfg.head_dim, cfg.attn_impl) for dt in dtypes]
        return ", ".join(f"{str(dt).replace('torch.', '')}: {c}" for dt, c in zip(dtypes, chosen))


class _CallbackStreamer(BaseStreamer):
    """transformers' streamer protocol -> our `streamer(batch_index, token_id)` callback."""

    def __init__(self, fn, stops: set[int]):
        self.fn, self.stops, self.done = fn, stops, None

    def put(self, value: torch.Tensor) -> None:
        if value.dim() == 2:  # the prompt (empty with inputs_embeds): nothing new
            return
        if self.done is None:
            self.done = [False] * value.shape[0]
        for b, tok in enumerate(value.tolist()):
            if self.done[b] or tok in self.stops:
                self.done[b] = True
                continue
            self.fn(b, tok)

    def end(self) -> None:
        pass


class HFCausalLMBackbone(LMBackbone):
    """Any transformers causal LM (Llama, Mistral, Gemma, Phi-3, Qwen2, SmolLM, ...) fed `inputs_embeds`."""

    name = "hf"

    @classmethod
    def load_lm(cls, config: VLMConfig) -> nn.Module:
        if config.is_scratch_lm:
            cfg = dict(config.scratch_lm_config())
            if "model_type" not in cfg:
                raise UserError("VLMConfig.lm_config for an hf scratch LM needs 'model_type' (e.g. 'llama')")
            with built_in(torch_dtype(config.dtype)):  # random weights in the base dtype: no fp32 copy first
                return AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
        return AutoModelForCausalLM.from_pretrained(config.lm, dtype=torch_dtype(config.dtype))

    def hidden_states(self, lm, embeds, attention_mask, **kw):
        if kw.pop("cu_seqlens", None) is not None:
            raise ValueError("packed sequences (cu_seqlens) need lm_backend='qwen'; the hf LM path takes "
                             "padded batches only (set packing=false)")
        out = unwrap(lm).get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, **kw)
        return out.last_hidden_state, getattr(out, "past_key_values", None)

    def plain_head(self, lm: nn.Module) -> bool:
        """True when the LM's logits are exactly `output_head(hidden states)` (no soft-capping, scaling)."""
        base = unwrap(lm)
        cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        if any(getattr(cfg, name, None) not in (None, 1, 1.0) for name in LOGIT_POSTPROCESSING):
            return False
        return hasattr(base, "get_decoder") and base.get_output_embeddings() is not None

    def full_logits(self, lm, embeds, attention_mask, **kw):
        if kw.pop("cu_seqlens", None) is not None:
            raise ValueError("packed sequences (cu_seqlens) need lm_backend='qwen' (set packing=false)")
        out = lm(inputs_embeds=embeds, attention_mask=attention_mask, **kw)
        return out.logits, getattr(out, "past_key_values", None)

    def generate(self, lm, input_ids, embeds, attention_mask, **gen_kw) -> list[list[int]]:
        stops = list(gen_kw.pop("stop_token_ids", None) or [])
        streamer = gen_kw.pop("streamer", None)
        gen_kw.pop("generator", None)
        if stops:
            gen_kw["eos_token_id"] = stops
        if streamer is not None:
            gen_kw["streamer"] = _CallbackStreamer(streamer, set(stops))
        gen_kw.setdefault("do_sample", False)
        if not gen_kw["do_sample"]:
            for k in ("temperature", "top_p", "top_k"):  # sampling settings mean nothing to greedy decoding
                gen_kw.pop(k, None)
        if self.tokenizer is not None:
            gen_kw.setdefault("pad_token_id", self.pad_token_id)
        # With inputs_embeds only, transformers returns just the new tokens.
        out = lm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **gen_kw)
        stop_set = set(stops)
        results = []
        for seq in out.tolist():
            cut = next((i for i, t in enumerate(seq) if t in stop_set), len(seq))
            results.append(seq[:cut])
        return results

    def default_lora_targets(self, lm: nn.Module) -> str:
        return HF_LORA_TARGETS.get(self._model_type(lm) or "", "all-linear")

    def gradient_checkpointing_enable(self, lm: nn.Module) -> None:
        unwrap(lm).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
