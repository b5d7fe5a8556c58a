"""Autoregressive generation for `QWenLMHeadModel` (greedy / sampling, KV cache, left-padded batches).

Contract
--------
`generate(model, input_ids, attention_mask=None, max_new_tokens=32, do_sample=False, temperature=1.0,
top_p=1.0, top_k=0, repetition_penalty=1.0, stop_token_ids=None, streamer=None, image_features=None,
inputs_embeds=None, use_cache=True, generator=None) -> list[list[int]]`
* `input_ids`: `[B, T]` tensor (left-padded, with `attention_mask`) or a list of id lists (left-padded
  here). Returns the new tokens of each row, the stop token excluded.
* Repetition penalty as in CTRL / transformers: over the prompt's real tokens and generated tokens, a
  positive logit is divided by the penalty, a negative one multiplied.
* `streamer(batch_index, token_id)` is called once per emitted token.
* `use_cache=False` recomputes the whole sequence every step (the reference the cache is tested against).
* Speed: the KV cache is static (`QWenCache(max_length=prompt + max_new_tokens)`: written in place, never
  concatenated), and each step computes the logits of the last position only (`logits_to_keep=1`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qwen.modeling import QWenCache


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
) -> list[list[int]]:
    if do_sample and temperature <= 0:
        raise ValueError(f"generate: temperature must be > 0 when sampling, got {temperature}")
    if repetition_penalty <= 0:
        raise ValueError(f"generate: repetition_penalty must be > 0, got {repetition_penalty}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
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
    attention_mask = attention_mask.to(device).long()
    stops = set(stop_token_ids or [])
    V = model.config.vocab_size

    seen = torch.zeros((B, V), dtype=torch.bool, device=device)
    if input_ids is not None:
        input_ids = input_ids.to(device)
        seen.scatter_(1, input_ids.clamp(0, V - 1), attention_mask.bool())  # real prompt tokens only

    # Only the last position's logits are ever read (logits_to_keep=1).
    cache = QWenCache(model.config.num_hidden_layers, max_length=T + max_new_tokens) if use_cache else None
    out = model(input_ids=None if inputs_embeds is not None else input_ids, inputs_embeds=inputs_embeds,
                attention_mask=attention_mask, image_features=image_features, use_cache=use_cache,
                past_key_values=cache, logits_to_keep=1)
    results: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    full_ids, full_embeds = input_ids, inputs_embeds
    for step in range(max_new_tokens):
        logits = process_logits(out.logits[:, -1].float(), seen, temperature if do_sample else 1.0,
                                top_k if do_sample else 0, top_p if do_sample else 1.0, repetition_penalty)
        if do_sample:
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
        else:
            nxt = logits.argmax(dim=-1)  # [B]
        for b, tok in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if tok in stops:
                done[b] = True
                continue
            results[b].append(tok)
            if streamer is not None:
                streamer(b, tok)
        if all(done) or step == max_new_tokens - 1:
            break
        seen[torch.arange(B, device=device), nxt] = True
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((B, 1))], dim=1)
        if use_cache:
            out = model(input_ids=nxt[:, None], attention_mask=attention_mask,
                        past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        elif full_embeds is not None:
            new = model.get_input_embeddings()(nxt[:, None]).to(full_embeds.dtype)
            full_embeds = torch.cat([full_embeds, new], dim=1)
            out = model(inputs_embeds=full_embeds, attention_mask=attention_mask, logits_to_keep=1)
        else:
            full_ids = torch.cat([full_ids, nxt[:, None]], dim=1)
            out = model(input_ids=full_ids, attention_mask=attention_mask, image_features=image_features,
                        logits_to_keep=1)
    model.train(was_training)
    return results
