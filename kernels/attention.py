"""One attention entry point for the whole codebase.

Contract
--------
`attention(q, k, v, causal=..., attention_mask=None, cu_seqlens=None, scale=None, impl="auto")`

* Padded layout: q `[B, Hq, Tq, D]`, k/v `[B, Hkv, Tk, D]` with `Hq % Hkv == 0` (GQA is handled
  here; SDPA gets a one-query decode step with the query heads folded onto their KV head instead of a
  copy of the cache expanded to Hq heads). Returns `[B, Hq, Tq, D]`.
* `causal=True` with `Tq < Tk` is bottom-right aligned: query i sits at absolute position
  `Tk - Tq + i` (a chunk fed on top of a KV cache).
* `attention_mask`: optional bool `[B, 1 or Hq, Tq, Tk]`, True = may attend. It is combined with
  `causal` when both are given. A query row with no allowed key returns 0.
* Variable length (`cu_seqlens` int32 `[n + 1]`): q/k/v are `[total, H, D]`, sequences are packed
  back to back and never attend across boundaries. Returns `[total, Hq, D]`.
* `impl`:
  - `torch`: SDPA; `eager`: reference math in fp32 (both run anywhere; varlen by looping).
  - `triton`: the Triton flash kernel (`kernels/triton_attention.py`); masks and varlen in-kernel.
    Needs CUDA tensors, or CPU tensors with `TRITON_INTERPRET=1` set before triton is imported.
  - `cuda`: the CUDA C++ flash kernel (`kernels/csrc/`, built on first use); needs CUDA tensors,
    raises otherwise. It has no mask input: calls with `attention_mask` go to SDPA (logged once);
    varlen loops over the packed sequences.
  - `auto`: SDPA (torch's flash / memory-efficient backends) unless a custom kernel passed its self-test
    on that device in this process (forward and backward against an fp32 reference with masks, GQA and
    varlen) and beat SDPA in a quick micro-benchmark. The self-test (`kernels/selftest.py`'s `verify`)
    never runs inside this function, so never inside a model's forward, a checkpointed region or a
    compiled graph: `kernels.prepare_attention(device, dtype, head_dim)` runs it once per
    (device, dtype, head dim), after the model is on its device and before the first step or generate
    (the trainer, `VLM.generate`, the server and evaluation call it through `VLM.prepare_attention`),
    and stores the choice in `VERIFIED`, which this function only reads. A GPU call with no stored
    choice uses SDPA and says so once. The CUDA extension only takes part when already built;
    `QWENVL_ATTN_SELFTEST=0` skips the self-test, so auto is SDPA. CPU tensors, other dtypes and head
    dims > 128 -> SDPA. The choice and its reason are logged once. Masked calls that picked the CUDA
    extension (which has no mask input) go to SDPA. Packed (varlen) calls take the path the self-test
    verified for them: the chosen kernel's varlen, else torch's flash varlen kernel when it passed and
    is faster, else SDPA one sequence at a time.
* A kernel that fails to build or import never stops a run: the call falls back to SDPA and the
  reason is logged once (warning). Wrong devices or arguments raise.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os

import torch
import torch.nn.functional as F

from . import cuda_attention, cuda_ext
from ._log import log_once

log = logging.getLogger(__name__)

IMPLS = ("auto", "torch", "eager", "triton", "cuda")
SELFTEST_ENV = "QWENVL_ATTN_SELFTEST"  # "0": auto never runs the self-test on a GPU (SDPA)
# What the Triton and CUDA kernels accept; `auto` sends anything else to SDPA.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_MAX_HEAD_DIM = 128
# (device, dtype, head dim) -> the self-test's choice (`kernels.selftest.Choice`: impl, varlen, reason),
# written by `kernels.selftest.verify` (through `kernels.prepare_attention`), read by `auto` below.
VERIFIED: dict[tuple[str, str, int], object] = {}


def verified_key(device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[str, str, int]:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device), str(dtype), int(head_dim)


def _expand_kv(k: torch.Tensor, n_rep: int) -> torch.Tensor:
    # [B, Hkv, T, D] -> [B, Hkv * n_rep, T, D]
    if n_rep == 1:
        return k
    return k.repeat_interleave(n_rep, dim=1)


def _full_mask(
    tq: int, tk: int, causal: bool, attention_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Bool mask [.., Tq, Tk] (True = attend) combining causality and the caller's mask."""
    if not causal:
        return attention_mask
    offset = tk - tq
    qpos = torch.arange(tq, device=device)[:, None] + offset
    kpos = torch.arange(tk, device=device)[None, :]
    causal_mask = kpos <= qpos  # [Tq, Tk]
    if attention_mask is None:
        return causal_mask
    return attention_mask & causal_mask


def eager_attention(q, k, v, causal=False, attention_mask=None, scale=None):
    """Reference attention in fp32: softmax(q k^T * scale + mask) v. Padded layout only."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = _expand_kv(k, n_rep), _expand_kv(v, n_rep)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    mask = _full_mask(q.shape[2], k.shape[2], causal, attention_mask, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # A fully masked row (e.g. a left-padding query) gives NaN; define its output as zero.
    probs = torch.nan_to_num(probs, nan=0.0)
    return torch.matmul(probs, v.float()).to(q.dtype)


def sdpa_attention(q, k, v, causal=False, attention_mask=None, scale=None):
    """torch SDPA; uses its own causal path when there is no extra mask and Tq == Tk."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = _expand_kv(k, n_rep), _expand_kv(v, n_rep)
    tq, tk = q.shape[2], k.shape[2]
    if attention_mask is None and (not causal or tq == tk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    mask = _full_mask(tq, tk, causal, attention_mask, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # Rows with no key to attend to come back as NaN from SDPA; zero them like the reference.
    if attention_mask is not None:
        empty = ~mask.any(dim=-1, keepdim=True)  # [B, 1|H, Tq, 1]
        out = out.masked_fill(empty, 0.0)
    return out


def _grouped_decode(fn, q, k, v, attention_mask, scale):
    """One query position with grouped KV heads: the n_rep query heads that share a KV head become n_rep
    query rows of that head (with one query, causal is moot: it sees every key), so `fn` runs plain
    multi-head attention and the KV cache is never expanded to `[B, Hq, Tk, D]` for a decode step."""
    B, Hq, _, D = q.shape
    Hkv, tk = k.shape[1], k.shape[2]
    n_rep = Hq // Hkv
    mask = attention_mask
    if mask is not None:  # [B, 1|Hq, 1, Tk] -> [B, 1|Hkv, n_rep, Tk]
        mask = (mask.expand(B, 1, n_rep, tk) if mask.shape[1] == 1 else
                mask.reshape(B, Hkv, n_rep, tk))
    out = fn(q.reshape(B, Hkv, n_rep, D), k, v, causal=False, attention_mask=mask, scale=scale)
    return out.reshape(B, Hq, 1, D)


def _varlen_to_padded(fn, q, k, v, cu_seqlens, causal, scale):
    """Run a padded-layout implementation one packed sequence at a time."""
    outs = []
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        # [T, H, D] -> [1, H, T, D]
        qs, ks, vs = (x[s:e].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        outs.append(fn(qs, ks, vs, causal=causal, scale=scale)[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


@functools.cache
def _load_torch_varlen():
    """(torch's flash varlen function, whether it takes `enable_gqa`), imported once (raises ImportError on
    a torch without it). torch 2.11's has no `enable_gqa`: grouped K/V heads are expanded for it."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn, "enable_gqa" in inspect.signature(varlen_attn).parameters


def torch_varlen_attention(q, k, v, cu_seqlens, causal=False, scale=None):
    """torch's flash varlen kernel on packed [total, H, D] tensors (GQA in-kernel where torch has it)."""
    # The longest sequence, read where cu_seqlens lives: no device sync when the caller kept it on the host.
    n = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    fn, takes_gqa = _load_torch_varlen()
    window = (-1, 0) if causal else (-1, -1)
    gqa = q.shape[1] != k.shape[1]
    if gqa and not takes_gqa:  # [total, Hkv, D] -> [total, Hq, D]
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    extra = {"enable_gqa": gqa} if takes_gqa else {}
    return fn(q, k, v, cu, cu, n, n, scale=scale, window_size=window, **extra)


_IMPL_FNS = {"torch": sdpa_attention, "eager": eager_attention}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _is_gpu(x: torch.Tensor | torch.device) -> bool:
    """Whether a tensor (or a device) is a GPU's; tests replace this one function to force the GPU branches."""
    return getattr(x, "device", x).type == "cuda"


def _load_triton():
    """The Triton kernel module, or raise ImportError with the reason (no triton, broken install)."""
    try:
        from . import triton_attention
    except Exception as e:  # noqa: BLE001 - any import-time failure means "not available"
        raise ImportError(f"triton attention unavailable: {type(e).__name__}: {e}") from e
    return triton_attention


def _load_cuda():
    """Build/import the CUDA extension (raises kernels.cuda_ext.CudaExtensionError with the log tail)."""
    cuda_ext.load()
    return cuda_attention


def _fallback(impl: str, err: Exception) -> str:
    log_once(log, f"fallback:{impl}", logging.WARNING,
             "attention impl=%s unavailable, falling back to torch (SDPA): %s", impl, err)
    return "torch"


def _resolve(impl: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """Turn the requested impl into one that can run on `device` (see the module docstring)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; valid: {', '.join(IMPLS)}")
    on_gpu = _is_gpu(device)
    if impl == "cuda":
        if not on_gpu:
            raise RuntimeError(f"attention impl='cuda' needs CUDA tensors, got {device}; "
                               "use impl='auto' or 'torch' on CPU")
        try:
            _load_cuda()
        except Exception as e:  # noqa: BLE001
            return _fallback("cuda", e)
        return "cuda"
    if impl == "triton":
        if not on_gpu and not _interpreting():
            raise RuntimeError(f"attention impl='triton' needs CUDA tensors (got {device}), or "
                               "TRITON_INTERPRET=1 set before triton is imported")
        try:
            _load_triton()
        except ImportError as e:
            return _fallback("triton", e)
        return "triton"
    if impl != "auto":
        return impl
    choice, why = _auto_choice(device, dtype, head_dim) if on_gpu else (None, "tensors are not on a GPU")
    chosen, why = ("torch", why) if choice is None else (choice.impl, choice.reason)
    log_once(log, f"auto:{device}:{dtype}:{chosen}:{why}", logging.INFO, "attention impl=auto -> %s (%s)",
             chosen, why)
    return chosen


def auto_unsupported(dtype: torch.dtype, head_dim: int) -> str:
    """Why `auto` keeps SDPA for these inputs without a self-test ("" when a kernel may take them)."""
    if dtype not in KERNEL_DTYPES or head_dim > KERNEL_MAX_HEAD_DIM:
        return f"dtype {dtype} / head dim {head_dim} not supported by the custom kernels"
    if os.environ.get(SELFTEST_ENV, "1") == "0":
        return f"{SELFTEST_ENV}=0: custom kernels are not self-tested, so not used"
    return ""


def _auto_choice(device: torch.device, dtype: torch.dtype, head_dim: int):
    """(the stored self-test `Choice` for GPU inputs like these, "") or (None, why auto keeps SDPA)."""
    why = auto_unsupported(dtype, head_dim)
    if why:
        return None, why
    choice = VERIFIED.get(verified_key(device, dtype, head_dim))
    if choice is None:
        return None, (f"no kernel was self-tested for {device} / {str(dtype).replace('torch.', '')} / head dim "
                      f"{head_dim} before this call (kernels.prepare_attention runs the self-test outside any "
                      "forward; VLM.prepare_attention calls it)")
    return choice, ""


def _auto_varlen(q: torch.Tensor) -> str:
    """The verified path for packed GPU batches under auto (see the module docstring)."""
    choice = _auto_choice(q.device, q.dtype, q.shape[-1])[0] if _is_gpu(q) else None
    return "torch" if choice is None else choice.varlen


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    if cu_seqlens is not None and attention_mask is not None:
        raise ValueError("attention: give either attention_mask or cu_seqlens, not both")
    requested, impl = impl, _resolve(impl, q.device, q.dtype, q.shape[-1])
    if requested == "auto" and cu_seqlens is not None and _is_gpu(q):
        path = _auto_varlen(q)
        if path == "torch_varlen":
            return torch_varlen_attention(q, k, v, cu_seqlens, causal, scale)
        impl = path
    if impl == "triton":
        tri = _load_triton()
        if cu_seqlens is not None:
            return tri.triton_varlen_attention(q, k, v, cu_seqlens, causal=causal, scale=scale)
        return tri.triton_attention(q, k, v, causal=causal, attention_mask=attention_mask, scale=scale)
    if impl == "cuda":
        if attention_mask is not None:
            log_once(log, "cuda:mask", logging.INFO,
                     "attention impl=%s picked the CUDA kernel, which has no mask input; calls with attention_mask "
                     "use SDPA", requested)
            impl = "torch"
        else:
            fn = _load_cuda().cuda_attention
            if cu_seqlens is not None:
                return _varlen_to_padded(fn, q, k, v, cu_seqlens, causal, scale)
            return fn(q, k, v, causal=causal, scale=scale)
    fn = _IMPL_FNS[impl]
    if cu_seqlens is not None:
        return _varlen_to_padded(fn, q, k, v, cu_seqlens, causal, scale)
    if impl == "torch" and q.shape[2] == 1 and q.shape[1] != k.shape[1]:
        return _grouped_decode(fn, q, k, v, attention_mask, scale)
    return fn(q, k, v, causal=causal, attention_mask=attention_mask, scale=scale)
