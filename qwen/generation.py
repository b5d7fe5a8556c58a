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
* Greedy decoding on a CPU (no sampling, no repetition penalty, an fp32 bias-free `nn.Linear` head, torch
  built with FBGEMM; `screen_head=False` turns it off) picks each token with `ScreenedHead`: the logits
  are first computed against an fp16 copy of the head (half the bytes of the memory-bound head read),
  every token whose logit could still be the maximum given a rigorous bound on that approximation's
  error is a candidate (almost always one), and the candidates' logits are recomputed in fp32 from the
  real weight. The token is the argmax of fp32 logits, as without screening; the copy costs
  2 bytes per head weight and is rebuilt when the weight changes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from .cache import QWenCache


class ScreenedHead:
    """Exact greedy argmax of `hidden @ W^T` (fp32) reading W mostly in fp16 (see the module docstring).

    Bound: with u = 2^-24 and gamma = K u / (1 - K u) (K = hidden size), every fp32 dot product of `h` with
    a row is within gamma |h| |w| of the true value, and the fp16 row w^ adds |h| |w - w^|; so a token v
    can hold the fp32 maximum only if approx_v + b_v >= max_u (approx_u - b_u), b = |h| (|w - w^| +
    2 gamma |w|). Only those candidates are recomputed in fp32."""

    def __init__(self, weight: torch.Tensor):
        w = weight.detach()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch marks the fbgemm fp16 ops deprecated; 2.14 has them
            self.packed = torch.fbgemm_pack_gemm_matrix_fp16(w)
        K = w.shape[1]
        gamma = K * 2.0**-24 / (1 - K * 2.0**-24)
        self.slack = (w - w.half().float()).norm(dim=1) + 2 * gamma * w.norm(dim=1)  # [V]
        self.zero = w.new_zeros(w.shape[0])
        self.key = (w.data_ptr(), w._version, tuple(w.shape))

    @staticmethod
    def usable(head: nn.Module, device: torch.device) -> bool:
        return (type(head) is nn.Linear and head.bias is None and head.weight.dtype == torch.float32
                and device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines
                and hasattr(torch, "fbgemm_linear_fp16_weight"))

    @classmethod
    def for_head(cls, head: nn.Linear) -> ScreenedHead:
        """The head's screen, built once and rebuilt when the weight changes (training, loading)."""
        w = head.weight
        cur = getattr(head, "_screened_head", None)
        if cur is None or cur.key != (w.data_ptr(), w._version, tuple(w.shape)):
            cur = cls(w)
            head._screened_head = cur  # a plain attribute: not a parameter, never saved
        return cur

    def argmax(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] fp32 -> [B] token ids of the fp32 logits' maxima."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            approx = torch.fbgemm_linear_fp16_weight(hidden, self.packed, self.zero)  # [B, V]
        bound = hidden.norm(dim=1, keepdim=True) * self.slack[None]  # [B, V]
        floor = (approx - bound).max(dim=1, keepdim=True).values  # [B, 1]
        cand = (approx + bound) >= floor  # [B, V], almost always one True per row
        out = []
        for b in range(hidden.shape[0]):
            idx = cand[b].nonzero()[:, 0]  # [n]
            exact = weight[idx] @ hidden[b]  # [n] fp32 logits of the candidates
            out.append(idx[exact.argmax()])
        return torch.stack(out)


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
