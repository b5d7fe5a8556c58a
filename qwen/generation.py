"""Autoregressive generation for `QWenLMHeadModel` (greedy / sampling, KV cache, left-padded batches).

Contract
--------
`generate(model, input_ids, attention_mask=None, max_new_tokens=32, do_sample=False, temperature=1.0,
top_p=1.0, top_k=0, repetition_penalty=1.0, stop_token_ids=None, streamer=None, image_features=None,
inputs_embeds=None, use_cache=True, generator=None, screen_head=True) -> list[list[int]]`
* `input_ids`: `[B, T]` tensor (left-padded, with `attention_mask`) or a list of id lists (left-padded
  here). Returns the new tokens of each row, the stop token excluded.
* Repetition penalty as in CTRL / transformers: over the prompt's real tokens and generated tokens, a
  positive logit is divided by the penalty, a negative one multiplied.
* `streamer(batch_index, token_id)` is called once per emitted token.
* `use_cache=False` recomputes the whole sequence every step (the reference the cache is tested against).
* Speed: the KV cache is static (`QWenCache(max_length=prompt + max_new_tokens)`: written in place, never
  concatenated), and each step computes the logits of the last position only (`logits_to_keep=1`).
* Greedy decoding on a CPU (no sampling, no repetition penalty, an fp32 bias-free `nn.Linear` head;
  `screen_head=False` turns it off) picks each token with `ScreenedHead`: the logits are first computed
  against a copy of the head in fewer bytes (fp16, bf16 or int8, whichever is fastest on this CPU for the
  batch's rows; the head read is memory-bound for one row), every token whose logit could still be the
  maximum given a rigorous bound on that approximation's error is a candidate (almost always one), and the
  candidates' logits are recomputed in fp32 from the real weight. The token is the argmax of fp32 logits,
  as without screening; the copies cost 1-3 bytes per head weight and are rebuilt when the weight changes.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..core.cpu import cpu_int8_dot, cpu_native_bf16
from .cache import QWenCache


@functools.cache
def _int_mm_exact() -> bool:
    """Whether `torch._int_mm` sums int8 products exactly here: a CPU with an int8 dot product
    (`core.cpu.cpu_int8_dot`), and the kernels this process runs (ONEDNN_MAX_CPU_ISA can hold them back)
    exact on worst-case inputs (+-127 everywhere: saturating int16 pair sums are off by thousands)."""
    if not hasattr(torch, "_int_mm") or not cpu_int8_dot():
        return False
    g = torch.Generator().manual_seed(0)
    for rows, k, n in ((1, 128, 256), (4, 128, 256), (16, 1024, 2048), (64, 1024, 2048)):  # small and head-like
        a = torch.randint(-127, 128, (rows, k), generator=g, dtype=torch.int8)
        a[:, ::2], a[0] = 127, -127
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        w[:, :k // 2] = 127
        try:
            if not torch.equal(torch._int_mm(a, w.T).long(), a.long() @ w.long().T):
                return False
        except RuntimeError:  # no CPU kernel in this build
            return False
    return True


class ScreenedHead:
    """Exact greedy argmax of `hidden @ W^T` (fp32) from a cheaper approximate pass over W.

    A screen computes approximate logits `a` with a copy of W in fewer bytes (or W itself) and gives a
    rigorous per-row bound E >= |a_v - f_v| for every token v, f being any fp32 evaluation of the logits
    (u = 2^-24, gamma = (K + 2) u / (1 - (K + 2) u), K = hidden size; ^ marks a rounded copy):
    E_v = |h - h^| max|w^| + |h| max|w - w^| + gamma (|h^| max|w^| + |h| max|w|) + 2^-8 |a_v| (the last
    term where the output is rounded to bf16). The fp32 maximum then lies within 2E of max(a), so only
    those candidates (a handful, found by `candidates`) are recomputed in fp32 from the real weight, each
    with the same elementwise dot product whichever screen found it: the token never depends on the screen.
    Screens: `fp32` (W itself), `fp16` (fbgemm's fp16 GEMM), `bf16` (a bf16 copy, where the CPU has native
    bf16), `int8` (per-row int8 with bf16 scales, `_weight_int8pack_mm` on bf16 activations), `int8x8` (W in
    int8 with one scale, each row of h in int8 with its own: `torch._int_mm`, exact int32 sums, half the
    bytes of bf16; its logits stay in units of the row's two scales, which keeps their order). Which one
    runs is timed on this CPU once per head for one row (`small`, up to `SMALL_ROWS` rows) and, at the
    first larger batch or `prepare(rows)`, for 16 rows (`large`); only the copies the chosen screens need
    are kept."""

    SMALL_ROWS = 4
    BLOCK = 128  # candidates are found through the maxima of blocks of this many tokens
    SCREENS = ("fp32", "fp16", "bf16", "int8", "int8x8")

    def __init__(self, weight: torch.Tensor, screens: tuple[str, ...] | None = None):
        w = weight.detach()
        self.key = (w.data_ptr(), w._version, tuple(w.shape))
        self.weight, (self.V, self.K) = w, w.shape
        n = self.K + 2
        self.gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
        self.w_max = float(w.norm(dim=1).max())
        self.offered = tuple(screens or self.available())
        self.copies: dict[str, tuple] = {}
        self.small: str | None = None
        self.large: str | None = None  # chosen when the first batch of more than SMALL_ROWS rows comes
        self.small = self._fastest(1)

    def _fastest(self, rows: int) -> str:
        """The fastest offered screen for `rows` rows, timed here on random hidden states (whose logits lie
        closer together than a model's own: more candidates, see benchmarks/screen_head.py --from-model),
        the whole pick (screen and candidates), the best of two runs after a warm-up;
        the copies built for the timing and not chosen are dropped again."""
        for name in self.offered:
            if name not in self.copies:
                self.copies[name] = self._copy(name, self.weight)
        best = self.offered[0]
        if len(self.offered) > 1:
            h = torch.randn(rows, self.K, generator=torch.Generator().manual_seed(0))
            times = {}
            for name in self.offered:
                self.argmax(h, self.weight, name)
                times[name] = min(self._timed(name, h) for _ in range(2))
            best = min(times, key=times.get)
        keep = {best, self.small, self.large}
        self.copies = {k: v for k, v in self.copies.items() if k in keep}
        return best

    def _timed(self, name: str, hidden: torch.Tensor) -> float:
        start = time.perf_counter()
        self.argmax(hidden, self.weight, name)  # the whole pick: the screen's pass and its candidates
        return time.perf_counter() - start

    @staticmethod
    def supported(name: str) -> bool:
        """Whether this torch build has screen `name`'s kernel (bf16 runs everywhere, emulated on some CPUs)."""
        if name == "fp16":
            return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch, "fbgemm_linear_fp16_weight")
        if name == "int8x8":
            return _int_mm_exact()
        return name in ("fp32", "bf16") or (name == "int8" and hasattr(torch, "_weight_int8pack_mm"))

    @classmethod
    def available(cls) -> tuple[str, ...]:
        """The screens worth timing on this CPU: bf16 only where it is native (emulated bf16 is far slower
        than fp32), and then fp16 is left out (the bf16 GEMM beats fbgemm's fp16 one at every row count)."""
        names = ("fp32", "bf16" if cpu_native_bf16()[0] else "fp16", "int8", "int8x8")
        return tuple(n for n in names if cls.supported(n))

    def _copy(self, name: str, w: torch.Tensor) -> tuple:
        """(the screen's weight data, max over rows of |w^|, max over rows of |w - w^|)."""
        if name == "fp32":
            return (w,), self.w_max, 0.0
        if name == "fp16":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch marks the fbgemm fp16 ops deprecated; 2.14 has them
                data = (torch.fbgemm_pack_gemm_matrix_fp16(w), w.new_zeros(self.V))
            approx = w.half().float()
        elif name == "bf16":
            data = (w.bfloat16(),)
            approx = data[0].float()
        elif name == "int8x8":
            scale = float(w.abs().max()) / 127 or torch.finfo(torch.float32).tiny
            q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)  # [V, K]
            data = (q, scale)
            approx = q.float() * scale
        else:
            scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).bfloat16()  # [V]
            q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)  # [V, K]
            data = (q, scale)
            approx = q.float() * scale.float()[:, None]
        return data, float(approx.norm(dim=1).max()), float((w - approx).norm(dim=1).max())

    def _approx(self, name: str, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(approximate logits a [B, V], E0 [B], c) of `hidden` [B, K] fp32 with screen `name`: every
        |a_v - f_v| <= E0 + c |a_v|."""
        data, approx_max, err_max = self.copies[name]
        h_norm = hidden.norm(dim=1)  # [B]
        if name in ("fp32", "fp16"):
            if name == "fp32":
                a = hidden @ data[0].T
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    a = torch.fbgemm_linear_fp16_weight(hidden, data[0], data[1])
            return a, self._bound(hidden, h_norm, hidden, approx_max, err_max), 0.0  # activations not rounded
        if name == "int8x8":
            return self._approx_int8x8(hidden, h_norm, data, approx_max, err_max)
        hb = hidden.bfloat16()
        a = hb @ data[0].T if name == "bf16" else torch._weight_int8pack_mm(hb, data[0], data[1])  # [B, V] bf16
        bound = self._bound(hidden, h_norm, hb.float(), approx_max, err_max)
        return a, bound, 2.0**-8  # bf16 output: relative rounding 2^-9, counted twice

    def _bound(self, hidden: torch.Tensor, h_norm: torch.Tensor, h_hat: torch.Tensor, approx_max: float,
               err_max: float) -> torch.Tensor:
        """E0 [B] of the class docstring's formula for activations rounded to `h_hat` (`hidden` itself where
        the screen does not round them)."""
        return ((hidden - h_hat).norm(dim=1) * approx_max + h_norm * err_max
                + self.gamma * (h_hat.norm(dim=1) * approx_max + h_norm * self.w_max))

    def _approx_int8x8(self, hidden: torch.Tensor, h_norm: torch.Tensor, data: tuple, approx_max: float,
                       err_max: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        """int32 logits [B, V] in units of u_b = (row b's scale) x (W's scale), and the bound in those units.
        The sums are exact (|sum| <= K 127^2 < 2^31); dividing the bound by u_b and comparing the int32
        logits with float thresholds round by about 2^-23 each: the bound is widened by 2^-10 and c is
        2^-22 (far more than they need)."""
        q, w_scale = data
        scale = (hidden.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # [B]
        qh = torch.round(hidden / scale[:, None]).clamp(-127, 127).to(torch.int8)  # [B, K]
        a = torch._int_mm(qh, q.T)  # [B, V] int32
        bound = self._bound(hidden, h_norm, qh.float() * scale[:, None], approx_max, err_max)
        return a, bound * (1 + 2.0**-10) / (scale * w_scale), 2.0**-22

    @staticmethod
    def floor(top: torch.Tensor, e0: torch.Tensor, c: float) -> torch.Tensor:
        """The lowest approximate logit [B] that can still hold a row's fp32 maximum, given the row's largest
        approximate logit `top` [B]: f_v >= f_u for the max-approx token u needs a_v + e0 + c|a_v| >= a_u - e0
        - c|a_u|, and x + c|x| grows with x, so that is a_v >= the inverse of the right-hand side."""
        top = top.float()
        rhs = top - 2 * e0 - c * top.abs()
        return torch.where(rhs >= 0, rhs / (1 + c), rhs / (1 - c))

    @staticmethod
    def usable(head: nn.Module, device: torch.device) -> bool:
        return (type(head) is nn.Linear and head.bias is None and head.weight.dtype == torch.float32
                and device.type == "cpu")

    @classmethod
    def for_head(cls, head: nn.Linear) -> ScreenedHead:
        """The head's screen, built once and rebuilt when the weight changes (training, loading)."""
        w = head.weight
        cur = getattr(head, "_screened_head", None)
        if cur is None or cur.key != (w.data_ptr(), w._version, tuple(w.shape)):
            cur = cls(w)
            head._screened_head = cur  # a plain attribute: not a parameter, never saved
        return cur

    def prepare(self, rows: int) -> None:
        """Choose (time) the screen for batches of `rows` rows now, if not yet chosen: a server calls this
        for its largest batch at start, so its first busy moment does not pay for the timing."""
        if rows > self.SMALL_ROWS and self.large is None:
            self.large = self._fastest(16)

    def candidates(self, a: torch.Tensor, e0: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Every (row [n], token [n]) whose approximate logit in `a` [B, V] (a screen's output) reaches its row's
        floor (almost always one per row), found through the maxima of blocks of BLOCK tokens: one max-reduction
        over `a` (no sort, no [B, V] mask), then a look inside the few blocks that reach the floor. bf16 logits
        are copied to fp32 first (bf16 reductions are slow); int32 ones (int8x8) are compared as they are."""
        if a.dtype == torch.bfloat16:
            a = a.float()
        B, V = a.shape
        n_full = V // self.BLOCK
        parts = [a[:, :n_full * self.BLOCK].view(B, n_full, self.BLOCK).amax(dim=2)] if n_full else []
        if V % self.BLOCK:
            parts.append(a[:, n_full * self.BLOCK:].amax(dim=1, keepdim=True))  # the short last block
        block_max = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # [B, blocks]
        floor = self.floor(block_max.amax(dim=1), e0, c)  # [B]; NaN for a non-finite row: no candidate
        rows, blocks = (block_max >= floor[:, None]).nonzero(as_tuple=True)  # [m] each
        tokens = blocks[:, None] * self.BLOCK + torch.arange(self.BLOCK, device=a.device)  # [m, BLOCK]
        inside = tokens < V
        tokens = tokens.clamp(max=V - 1)
        keep = inside & (a[rows[:, None], tokens] >= floor[rows, None])  # [m, BLOCK]
        return rows[:, None].expand_as(tokens)[keep], tokens[keep]

    def argmax(self, hidden: torch.Tensor, weight: torch.Tensor, screen: str | None = None) -> torch.Tensor:
        """hidden [B, H] fp32 -> [B] token ids of the fp32 logits' maxima."""
        B = hidden.shape[0]
        if screen is None:
            self.prepare(B)
        name = screen or (self.small if B <= self.SMALL_ROWS else self.large)
        a, e0, c = self._approx(name, hidden)
        rows, tokens = self.candidates(a, e0, c)
        exact = (weight[tokens] * hidden[rows]).sum(dim=1)  # [n] fp32 logits of the candidates
        best = exact.new_full((B,), float("-inf")).scatter_reduce(0, rows, exact, "amax")  # [B]
        first = torch.where(exact == best[rows], tokens, self.V)  # the lowest id among equal maxima
        out = tokens.new_full((B,), self.V).scatter_reduce(0, rows, first, "amin")  # [B]
        lost = out == self.V  # no candidate: a non-finite hidden state
        if bool(lost.any()):
            out[lost] = (hidden[lost] @ weight.T).argmax(dim=1)
        return out


def left_pad(seqs: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists -> (input_ids [B, T], attention_mask [B, T])."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("left_pad: every prompt must have at least one token")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[b, T - len(s):] = 1
    return ids, mask


def process_logits(logits: torch.Tensor, seen: torch.Tensor | None, temperature: float, top_k: int,
                   top_p: float, repetition_penalty: float) -> torch.Tensor:
    """logits [B, V] fp32 -> filtered logits (-inf outside top-k / top-p). `seen` bool [B, V]."""
    if repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the strictly better tokens
        drop = mass_before > top_p  # the first token is always kept (mass_before = 0)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def _batch_and_mask(input_ids, attention_mask: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                    device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor, int, int]:
    """(input_ids, a list of prompts left-padded into a tensor; the attention mask [B, T], long, on `device`;
    B; T)."""
    if isinstance(input_ids, list):
        if attention_mask is not None:
            raise ValueError("generate: pass attention_mask only with a padded input_ids tensor")
        input_ids, attention_mask = left_pad(input_ids)
    if input_ids is None and inputs_embeds is None:
        raise ValueError("generate: give input_ids or inputs_embeds")
    ref = input_ids if input_ids is not None else inputs_embeds
    B, T = ref.shape[0], ref.shape[1]
    if attention_mask is None:
        attention_mask = torch.ones((B, T), dtype=torch.long, device=device)
    return input_ids, attention_mask.to(device).long(), B, T


def _choose_next(screen, head, last_hidden: torch.Tensor | None, last_logits: torch.Tensor | None,
                 seen: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
                 repetition_penalty: float, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of every row [B]: the screened head's argmax, or sampled / argmax from the logits."""
    if screen is not None:
        return screen.argmax(last_hidden.float(), head.weight)  # [B]
    logits = process_logits(last_logits, seen, temperature if do_sample else 1.0,
                            top_k if do_sample else 0, top_p if do_sample else 1.0, repetition_penalty)
    if do_sample:
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
    return logits.argmax(dim=-1)  # [B]


def _record_tokens(nxt: torch.Tensor, results: list[list[int]], done: list[bool], stops: set[int],
                   streamer: Callable[[int, int], None] | None) -> None:
    """Appends each unfinished row's token to its answer (and streams it); a stop token finishes the row."""
    for b, tok in enumerate(nxt.tolist()):
        if done[b]:
            continue
        if tok in stops:
            done[b] = True
            continue
        results[b].append(tok)
        if streamer is not None:
            streamer(b, tok)


@torch.no_grad()
def generate(
    model,
    input_ids,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    stop_token_ids: list[int] | None = None,
    streamer: Callable[[int, int], None] | None = None,
    image_features: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    screen_head: bool = True,
) -> list[list[int]]:
    if do_sample and temperature <= 0:
        raise ValueError(f"generate: temperature must be > 0 when sampling, got {temperature}")
    if repetition_penalty <= 0:
        raise ValueError(f"generate: repetition_penalty must be > 0, got {repetition_penalty}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    input_ids, attention_mask, B, T = _batch_and_mask(input_ids, attention_mask, inputs_embeds, device)
    stops = set(stop_token_ids or [])
    V = model.config.vocab_size

    seen = torch.zeros((B, V), dtype=torch.bool, device=device)
    if input_ids is not None:
        input_ids = input_ids.to(device)
        seen.scatter_(1, input_ids.clamp(0, V - 1), attention_mask.bool())  # real prompt tokens only

    head = model.get_output_embeddings()
    screen = None
    if screen_head and not do_sample and repetition_penalty == 1.0 and ScreenedHead.usable(head, device):
        screen = ScreenedHead.for_head(head)

    def forward(**kw):
        """(past_key_values, last position's logits [B, V] or None, its hidden state [B, H] or None)."""
        if screen is None:
            o = model(**kw, logits_to_keep=1)  # only the last position's logits are ever read
            return o.past_key_values, o.logits[:, -1].float(), None
        o = model.transformer(**kw)  # the screened head picks the token from the hidden state
        return o.past_key_values, None, o.last_hidden_state[:, -1]

    cache = QWenCache(model.config.num_hidden_layers, max_length=T + max_new_tokens) if use_cache else None
    past, last_logits, last_hidden = forward(
        input_ids=None if inputs_embeds is not None else input_ids, inputs_embeds=inputs_embeds,
        attention_mask=attention_mask, image_features=image_features, use_cache=use_cache, past_key_values=cache)
    results: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    full_ids, full_embeds = input_ids, inputs_embeds
    for step in range(max_new_tokens):
        nxt = _choose_next(screen, head, last_hidden, last_logits, seen, do_sample, temperature, top_k, top_p,
                           repetition_penalty, generator)
        _record_tokens(nxt, results, done, stops, streamer)
        if all(done) or step == max_new_tokens - 1:
            break
        seen[torch.arange(B, device=device), nxt] = True
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((B, 1))], dim=1)
        if use_cache:
            past, last_logits, last_hidden = forward(input_ids=nxt[:, None], attention_mask=attention_mask,
                                                     past_key_values=past, use_cache=True)
        elif full_embeds is not None:
            new = model.get_input_embeddings()(nxt[:, None]).to(full_embeds.dtype)
            full_embeds = torch.cat([full_embeds, new], dim=1)
            past, last_logits, last_hidden = forward(inputs_embeds=full_embeds, attention_mask=attention_mask)
        else:
            full_ids = torch.cat([full_ids, nxt[:, None]], dim=1)
            past, last_logits, last_hidden = forward(input_ids=full_ids, attention_mask=attention_mask,
                                                     image_features=image_features)
    model.train(was_training)
    return results
