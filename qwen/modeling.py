"""The Qwen decoder (Qwen-1, Qwen2/2.5, Qwen3 dense) with Qwen-1 module names.

Contract
--------
* Module names follow Qwen-1 for every arch: `transformer.wte`, `transformer.h.{i}.ln_1`,
  `.attn.c_attn` (fused q,k,v rows = (Hq + 2 Hkv) * head_dim), `.attn.c_proj`, `.attn.q_norm/.k_norm`
  (Qwen3 only), `.ln_2`, `.mlp.w1` (up), `.mlp.w2` (gate), `.mlp.c_proj`, `transformer.ln_f`, `lm_head`.
  MLP = c_proj(w1(x) * silu(w2(x))).
* RMSNorm and rotary run in fp32 and cast back (as the original). Attention goes only through
  `kernels.attention(..., impl=config.attn_impl)`; RMSNorm, rotary and the SwiGLU activation through
  `kernels.rms_norm / apply_rotary / swiglu(..., impl=config.fused_impl)` (`set_fused_impl` changes it).
* Speed (training): a right-padded batch without a KV cache (every row = real tokens, then padding)
  attends causally WITHOUT the padding mask: under causal attention real positions never see the padding
  that follows them, so their outputs are unchanged, and the mask-free path is the fast one (only the
  hidden states AT padded positions differ, and nothing reads them). `compile_blocks()` runs the decoder blocks through `torch.compile` (opt-in).
  `output_rows` [B, T] (no cache): the final hidden states of those positions only, `[N, H]`; the last block
  computes keys and values at every position but its queries, attention output and MLP only there
  (`attend_rows`: causal, within each packed sample, under the padding mask). The VLM's training forward
  passes its target positions: the loss reads nothing else, and on the benchmark mix (a quarter of the
  positions are targets) that is most of one block's work.
* KV cache: `QWenCache` (qwen/cache.py), per layer k/v `[B, Hkv, T, D]`, plus Qwen-1's NTK alpha fixed at prefill. With
  `max_length` (generation knows prompt + new tokens) it is static: each layer's buffer is allocated once
  at `[B, Hkv, max_length, D]` and every step writes in place (no concatenation of the whole cache per
  token); it grows like the dynamic one if a step would overflow it.
* Decoding: the logits of `logits_to_keep` positions go through `core.loss.decode_logits` (on a CPU
  `W @ h^T`, as the VLM's own decoding does); a one-token step with grouped KV heads never expands the
  cache (`kernels.attention` folds the query heads for SDPA).
* `attention_mask` is the `[B, T_cache + T_new]` 0/1 padding mask. Positions are
  `cumsum(attention_mask) - 1` for every arch: a left-padded row then sees positions 0, 1, ... from its
  first real token, exactly as when run alone. (The original Qwen-1 uses 0..kv_len-1 including padding,
  which makes a padded row differ from its unpadded run; the two agree whenever there is no padding.)
* Qwen-1 dynamic NTK (inference only, `use_dynamic_ntk`): per row, with L = real tokens at prefill,
  alpha = max(2^ceil(log2(L / seq_length) + 1) - 1, 1) (1, 3, 7, 15 ... as L passes S, 2S, 4S ...),
  base' = base * alpha^(d / (d - 2)); alpha is kept in the cache for later chunks.
  LogN (inference only, `use_logn_attn`): a query at position p >= seq_length is scaled by
  log(p + 1) / log(seq_length).
* Image hook: `image_features [n_placeholders_total, hidden]` replace the embeddings where
  `input_ids == config.image_token_id` (row-major order over the batch); a count mismatch raises.
* `labels [B, T]` are unshifted; the loss shifts them in `core.loss.shift_targets` (the one shift in
  the codebase), ignore_index -100, mean over target tokens. With labels (and `return_logits` not True)
  logits are computed only at target positions, chunked (`core.loss.supervised_loss`), and
  `QWenOutput.logits` is computed on first access; `return_logits=True` is the full-logits path.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.loss import decode_logits, full_logits_loss, supervised_loss
from ..core.placeholders import scatter_image_features
from ..kernels._log import log_once
from ..kernels.attention import attention, sdpa_attention
from ..kernels.fused import FUSED_IMPLS, apply_rotary, rms_norm, swiglu
from .cache import QWenCache
from .config import QWenConfig
from .generation import generate
from .loading import load_pretrained, save_pretrained

log = logging.getLogger(__name__)


@dataclass
class QWenModelOutput:
    last_hidden_state: torch.Tensor
    past_key_values: QWenCache | None = None


@dataclass(init=False)
class QWenOutput:
    """`loss`, `logits` `[B, T, V]`, `past_key_values`.

    In the supervised-only loss path the logits are not computed by forward: `logits_fn` computes them
    on first access of `.logits` (so training, which never reads them, never holds `[B, T, V]`).
    A dataclass so that DDP finds the loss among its fields.
    """

    loss: torch.Tensor | None
    past_key_values: QWenCache | None
    _logits: torch.Tensor | None
    _logits_fn: object

    def __init__(self, loss: torch.Tensor | None, logits: torch.Tensor | None = None,
                 past_key_values: QWenCache | None = None, logits_fn=None):
        self.loss, self.past_key_values = loss, past_key_values
        self._logits, self._logits_fn = logits, logits_fn

    @property
    def logits(self) -> torch.Tensor | None:
        if self._logits is None and self._logits_fn is not None:
            self._logits = self._logits_fn()  # [B, T, V], computed once on demand
            self._logits_fn = None
        return self._logits


class RMSNorm(nn.Module):
    """`weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype)` via `kernels.rms_norm(impl=self.impl)`."""

    def __init__(self, dim: int, eps: float, impl: str = "auto"):
        super().__init__()
        self.eps = eps
        self.impl = impl
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, impl=self.impl)


def ntk_alpha_for_length(length: int, seq_length: int) -> float:
    """Qwen-1's dynamic-NTK alpha: 1 up to S, then 3, 7, 15 ... as the length passes S, 2S, 4S ..."""
    context_value = math.log(length / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, base: float, ntk_alpha: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[B, T, D]` in fp32 for integer positions `[B, T]` and per-row alpha `[B]` (or None)."""
    B = positions.shape[0]
    exponents = torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim
    if ntk_alpha is None:
        inv_freq = (1.0 / (base**exponents)).expand(B, -1)  # [B, D/2]
    else:
        rows = []
        for a in ntk_alpha.tolist():
            # base' = base * alpha^(d/(d-2)), a Python float as in the original.
            rows.append(1.0 / ((base * a ** (head_dim / (head_dim - 2))) ** exponents))
        inv_freq = torch.stack(rows)
    freqs = positions.float()[:, :, None] * inv_freq[:, None, :]  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, T, D]
    return emb.cos(), emb.sin()


def _right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row of the 0/1 mask `[B, T]` is ones then zeros (no 0 -> 1 step anywhere)."""
    m = attention_mask.bool()
    return not bool((m[:, 1:] & ~m[:, :-1]).any())


def attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Causal attention for the queries at `rows` = (b [N], t [N]) (row-major, as `nonzero` gives them) over
    every key: q [B, Hq, T, D], k / v [B, Hkv, T, D] -> [N, Hq * D]. A query sees the keys at or before it,
    within its own packed sample (`cu_seqlens`) and where the padding `mask` [B, 1, T, T] lets it."""
    b_idx, t_idx = rows
    T = k.shape[2]
    keys = torch.arange(T, device=k.device)
    seg = None if cu_seqlens is None else torch.searchsorted(cu_seqlens[1:], keys, right=True)  # [T]: sample
    outs = []
    for b in torch.unique_consecutive(b_idx).tolist():
        t = t_idx[b_idx == b]  # [n]
        allowed = keys[None, :] <= t[:, None]  # [n, T]
        if seg is not None:
            allowed = allowed & (seg[None, :] == seg[t][:, None])
        if mask is not None:
            allowed = allowed & mask[b, 0, 0][None, :]
        o = sdpa_attention(q[b:b + 1, :, t], k[b:b + 1], v[b:b + 1], attention_mask=allowed[None, None])
        outs.append(o[0].transpose(0, 1).reshape(t.numel(), -1))  # [n, Hq * D]
    return torch.cat(outs)


class QWenAttention(nn.Module):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.c_attn = nn.Linear(config.hidden_size, config.q_dim + 2 * config.kv_dim, bias=config.qkv_bias)
        self.c_proj = nn.Linear(config.q_dim, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.fused_impl)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.fused_impl)

    def forward(self, x, cos, sin, logn, mask, cache, cu_seqlens, rows=None):
        B, T, _ = x.shape
        cfg = self.config
        q, k, v = self.c_attn(x).split([cfg.q_dim, cfg.kv_dim, cfg.kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)  # [B, T, Hq, D]
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if cfg.qk_norm:  # Qwen3: per-head RMSNorm before rotary
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        impl = cfg.fused_impl
        q, k = apply_rotary(q, cos, sin, impl=impl), apply_rotary(k, cos, sin, impl=impl)  # [B, H, T, D]
        if logn is not None:
            q = q * logn[:, None, :, None].to(q.dtype)  # [B, 1, T, 1]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, Hkv, T_total, D]
        if rows is not None:  # queries at `rows` only (every key): [N, Hq * D]
            return self.c_proj(attend_rows(q, k, v, rows, mask, cu_seqlens))
        if cu_seqlens is not None:
            # Packed sequences: [1, H, total, D] -> [total, H, D]
            out = attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), causal=True,
                            cu_seqlens=cu_seqlens, impl=cfg.attn_impl)
            out = out.unsqueeze(0)  # [1, total, Hq, D]
        else:
            out = attention(q, k, v, causal=True, attention_mask=mask, impl=cfg.attn_impl)
            out = out.transpose(1, 2)  # [B, T, Hq, D]
        return self.c_proj(out.reshape(B, T, cfg.q_dim))


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        self.config = config
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # gate
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(swiglu(self.w1(x), self.w2(x), impl=self.config.fused_impl))  # [B, T, H]


class QWenBlock(nn.Module):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.rms_norm_eps, config.fused_impl)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, config.rms_norm_eps, config.fused_impl)
        self.mlp = QWenMLP(config)

    def forward(self, x, cos, sin, logn, mask, cache, cu_seqlens, rows=None):
        """x [B, T, H] -> [B, T, H]; with `rows` (index tensors (b [N], t [N])) only those positions'
        outputs, [N, H]: keys and values still come from every position."""
        a = self.attn(self.ln_1(x), cos, sin, logn, mask, cache, cu_seqlens, rows)
        x = x + a if rows is None else x[rows] + a
        return x + self.mlp(self.ln_2(x))


class QWenModel(nn.Module):
    """Embeddings + blocks + final norm. `forward` returns `QWenModelOutput`."""

    # Speed switches (see the module docstring); class defaults, settable per instance.
    mask_free_right_padding: bool = True

    def __init__(self, config: QWenConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(QWenBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.rms_norm_eps, config.fused_impl)
        self.gradient_checkpointing = False
        self.compiled_blocks: list | None = None  # set by compile_blocks(); used in training mode

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def _place_image_features(self, input_ids, embeds, image_features):
        if image_features is None:  # a text-only call: placeholder ids keep their own embedding rows
            return embeds
        # The one placeholder rule of the project (core/placeholders.py); the VLM uses it for every LM.
        return scatter_image_features(input_ids, embeds, image_features, self.config.image_token_id)

    def _positions(self, B, T, past, attention_mask, position_ids, cu_seqlens, device):
        if position_ids is not None:
            return position_ids
        if cu_seqlens is not None:
            lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            return torch.cat([torch.arange(n, device=device) for n in lens])[None]  # [1, total]
        if attention_mask is not None:
            # cumsum positions: a left-padded row starts at 0 on its first real token (see module doc).
            pos = attention_mask.long().cumsum(-1) - 1
            return pos.clamp(min=0)[:, -T:]
        return torch.arange(past, past + T, device=device)[None].expand(B, T)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: QWenCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        output_rows: torch.Tensor | None = None,
    ) -> QWenModelOutput:
        """`output_rows` [B, T] bool (no cache): the final hidden states of those positions only, `[N, H]`
        in row-major order (`hidden[output_rows]`); the last block then runs its attention output and MLP
        for them alone (a training step needs the hidden states at target positions only)."""
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("QWenModel.forward: give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            if int(input_ids.max()) >= cfg.vocab_size or int(input_ids.min()) < 0:
                raise ValueError(f"input_ids hold ids outside [0, vocab_size={cfg.vocab_size})")
            inputs_embeds = self.wte(input_ids)  # [B, T, H]
        if image_features is not None:
            if input_ids is None:
                raise ValueError("image_features need input_ids to locate the placeholder tokens")
        if input_ids is not None:
            inputs_embeds = self._place_image_features(input_ids, inputs_embeds, image_features)
        B, T, _ = inputs_embeds.shape
        device = inputs_embeds.device

        cache = past_key_values
        if cache is None and use_cache:
            cache = QWenCache(cfg.num_hidden_layers)
        past = 0 if cache is None else cache.get_seq_length()
        if cu_seqlens is not None and (B != 1 or past or attention_mask is not None):
            raise ValueError("cu_seqlens (packed sequences) needs batch size 1, no cache and no attention_mask")
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask must be [B, T_cache + T] = [{B}, {past + T}], "
                             f"got {tuple(attention_mask.shape)}")

        positions = self._positions(B, T, past, attention_mask, position_ids, cu_seqlens, device)  # [B, T]
        inference = not self.training
        ntk_alpha = None
        if cfg.use_dynamic_ntk and inference:
            if cache is not None and cache.ntk_alpha is not None:
                ntk_alpha = cache.ntk_alpha  # fixed at prefill (keys in the cache were rotated with it)
            else:
                lengths = (attention_mask.sum(-1).tolist() if attention_mask is not None else [past + T] * B)
                ntk_alpha = torch.tensor([float(ntk_alpha_for_length(int(n), cfg.seq_length)) for n in lengths])
                if cache is not None:
                    cache.ntk_alpha = ntk_alpha
        cos, sin = rope_cos_sin(positions.expand(B, T), cfg.head_dim, cfg.rope_theta, ntk_alpha)
        logn = None
        if cfg.use_logn_attn and inference:
            p = positions.expand(B, T).double()
            # log(p+1)/log(S) for p >= S, else 1 (computed in float64 like the original's Python list).
            logn = torch.where(p >= cfg.seq_length, torch.log(p + 1) / math.log(cfg.seq_length),
                               torch.ones_like(p)).float()

        mask = None
        if attention_mask is not None and not (past == 0 and self.mask_free_right_padding
                                               and _right_padded(attention_mask)):
            mask = attention_mask.bool()[:, None, None, :].expand(B, 1, T, past + T)  # [B, 1, Tq, Tk]

        if output_rows is not None and (cache is not None or output_rows.shape != (B, T)):
            raise ValueError(f"output_rows must be [B, T] = [{B}, {T}] with no KV cache")
        h = self._blocks(inputs_embeds, cos, sin, logn, mask, cache, cu_seqlens, output_rows)
        return QWenModelOutput(last_hidden_state=self.ln_f(h), past_key_values=cache)

    def _blocks(self, h, cos, sin, logn, mask, cache, cu_seqlens, output_rows):
        rows = None if output_rows is None else output_rows.nonzero(as_tuple=True)  # (b [N], t [N])
        blocks = list(self.compiled_blocks if (self.compiled_blocks and self.training) else self.h)
        if rows is not None:
            blocks[-1] = self.h[-1]  # eager: its row selection has a data-dependent shape
        for i, block in enumerate(blocks):
            at = rows if i == len(blocks) - 1 else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, cos, sin, logn, mask, cache, cu_seqlens, at, use_reentrant=False)
            else:
                h = block(h, cos, sin, logn, mask, cache, cu_seqlens, at)
        return h


class QWenLMHeadModel(nn.Module):
    """`transformer` (QWenModel) + `lm_head`; see module docstring for the contract."""

    loss_chunk_size: int = 1024  # rows of [rows, V] logits alive at once in the supervised-only loss

    def __init__(self, config: QWenConfig):
        super().__init__()
        self.config = config
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, m: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def gradient_checkpointing_enable(self, **_: object) -> None:
        self.transformer.gradient_checkpointing = True

    def set_fused_impl(self, impl: str) -> None:
        """RMSNorm / rotary / SwiGLU implementation for every layer (`kernels.fused`: auto | torch | triton |
        compile)."""
        if impl not in FUSED_IMPLS:
            raise ValueError(f"fused_impl={impl!r}; valid: {', '.join(FUSED_IMPLS)}")
        self.config.fused_impl = impl
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.impl = impl

    def compile_blocks(self, **compile_kw) -> bool:
        """Run the decoder blocks through `torch.compile` (inductor, dynamic shapes) in training mode.

        A small forward + backward probe compiles at once; if that fails (no C++ compiler, an unsupported
        op), the blocks stay eager, the reason is logged once and False is returned."""
        blocks = [torch.compile(b, dynamic=True, **compile_kw) for b in self.transformer.h]
        cfg, ref = self.config, self.transformer.h[0]
        p = next(ref.parameters())
        try:
            x = torch.randn(2, 3, cfg.hidden_size, device=p.device, dtype=p.dtype, requires_grad=True)
            pos = torch.arange(3, device=p.device)[None].expand(2, 3)
            cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, None)
            with torch.enable_grad():
                out = blocks[0](x, cos, sin, None, None, None, None)
                torch.autograd.grad(out.float().sum(), [x])  # compiles the backward; leaves .grad alone
        except Exception as e:  # noqa: BLE001 - any compile failure means "stay eager"
            log_once(log, "compile_blocks", logging.WARNING, "compile_blocks failed, the blocks stay eager: %s: %s",
                     type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.transformer.compiled_blocks = None
            return False
        self.transformer.compiled_blocks = blocks
        return True

    def gradient_checkpointing_disable(self) -> None:
        self.transformer.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: QWenCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        return_logits: bool | None = None,
        logits_to_keep: int = 0,
    ) -> QWenOutput:
        """With `labels` and `return_logits` not True, the loss is computed only at target positions
        (`core.loss.supervised_loss`, chunked) and `.logits` is computed lazily on access; with
        `return_logits=True` (or no labels) the full `[B, T, V]` logits are computed here.
        `logits_to_keep=n > 0` (no labels) computes logits for the last n positions only, as generation
        needs: a prefill then never builds the prompt x vocabulary matrix."""
        out = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
            inputs_embeds=inputs_embeds, image_features=image_features, use_cache=use_cache,
            position_ids=position_ids, cu_seqlens=cu_seqlens,
        )
        hidden = out.last_hidden_state  # [B, T, H]
        if labels is not None and return_logits is not True:
            # Supervised-only logits: the shift and the packed-boundary rule live in core/loss.py.
            loss = supervised_loss(hidden, self.lm_head, labels, cu_seqlens, self.loss_chunk_size)
            return QWenOutput(loss=loss, past_key_values=out.past_key_values,
                              logits_fn=lambda: self.lm_head(hidden))
        if logits_to_keep > 0 and labels is None:
            hidden = hidden[:, -logits_to_keep:]  # [B, n, H]
            logits = decode_logits(hidden, self.lm_head)  # [B, n, V]
        else:
            logits = self.lm_head(hidden)  # [B, T, V]
        loss = None if labels is None else full_logits_loss(logits, labels, cu_seqlens)
        return QWenOutput(loss=loss, logits=logits, past_key_values=out.past_key_values)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, **config_overrides):
        return load_pretrained(cls, path, dtype=dtype, **config_overrides)

    def save_pretrained(self, out_dir: str | Path, max_shard_bytes: int | None = None) -> None:
        save_pretrained(self, out_dir, max_shard_bytes=max_shard_bytes)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **kwargs) -> list[list[int]]:
        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)
