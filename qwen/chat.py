"""ChatML prompts for Qwen chat models (text only).

Contract
--------
`build_prompt_ids(tokenizer, messages, add_generation_prompt=True) -> list[int]`:
`<|im_start|>{role}\n{content}<|im_end|>\n` per message, then `<|im_start|>assistant\n` when
`add_generation_prompt`, rendered by the project's one renderer (`dataset.rendering.render`, ChatML for a
Qwen tokenizer, which also checks each message's role and content): role and content are encoded separately (as the original Qwen-1 code does) and as plain
text, so a user typing "<|im_end|>" never produces the special token. No system prompt is added unless the
messages contain one. `messages_from_history` builds the message list from Qwen-1's (query, history,
system) call style. Generation for chat stops at `stop_ids(tokenizer)`.
"""

from __future__ import annotations

import torch

from ..dataset.rendering import ChatFormat, render
from ..dataset.sample import Sample


def build_prompt_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    sample = Sample(id="chat", messages=list(messages))
    # tokens_per_image is unused: a text chat has no image span.
    return render(sample, ChatFormat.for_qwen(tokenizer), tokens_per_image=1,
                  add_generation_prompt=add_generation_prompt).input_ids


def messages_from_history(query: str, history: list[tuple[str, str]] | None = None,
                          system: str | None = None) -> list[dict]:
    """Qwen-1 style (query, [(q, a), ...], system) -> messages. `system=None` adds no system turn."""
    msgs = [] if system is None else [{"role": "system", "content": system}]
    for q, a in history or []:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": query})
    return msgs


def stop_ids(tokenizer) -> list[int]:
    """Chat generation stops at <|im_end|> or <|im_start|> (or <|endoftext|>)."""
    return ChatFormat.for_qwen(tokenizer).stop_token_ids


def chat(model, tokenizer, query: str, history=None, system: str | None = None, **generate_kwargs) -> str:
    """One chat turn: render, generate (greedy unless told otherwise), decode the reply."""
    ids = build_prompt_ids(tokenizer, messages_from_history(query, history, system))
    generate_kwargs.setdefault("stop_token_ids", stop_ids(tokenizer))
    generate_kwargs.setdefault("max_new_tokens", 512)
    out = model.generate(torch.tensor([ids]), **generate_kwargs)[0]
    return tokenizer.decode(out, skip_special_tokens=True)
