"""ChatML prompts for Qwen chat models.

Contract
--------
`build_prompt_ids(tokenizer, messages, add_generation_prompt=True) -> list[int]`:
`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then `<|im_start|>assistant\\n` when
`add_generation_prompt`. Role and content are encoded separately (as the original Qwen-1 code does) and
as plain text, so a user typing "<|im_end|>" never produces the special token. No system prompt is
added unless the messages contain one. `messages_from_history` builds the message list from Qwen-1's
(query, history, system) call style. Generation for chat stops at `stop_ids(tokenizer)`.
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant")


def build_prompt_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    nl = tokenizer.encode("\n")
    ids: list[int] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', got {msg!r}")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise ValueError(f"messages[{i}]: role {role!r} is not one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}]: content must be a string, got {type(content).__name__}")
        ids += [tokenizer.im_start_id] + tokenizer.encode(role) + nl + tokenizer.encode(content)
        ids += [tokenizer.im_end_id] + nl
    if add_generation_prompt:
        ids += [tokenizer.im_start_id] + tokenizer.encode("assistant") + nl
    return ids


def messages_from_history(query: str, history: list[tuple[str, str]] | None = None,
                          system: str | None = None) -> list[dict]:
    """Qwen-1 style (query, [(q, a), ...], system) -> messages. `system=None` adds no system turn."""
    msgs = [] if system is None else [{"role": "system", "content": system}]
    for q, a in history or []:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": query})
    return msgs


def stop_ids(tokenizer) -> list[int]:
    """Chat generation stops at <|im_end|> or <|im_start|>."""
    return [tokenizer.im_end_id, tokenizer.im_start_id]


def chat(model, tokenizer, query: str, history=None, system: str | None = None, **generate_kwargs) -> str:
    """One chat turn: render, generate (greedy unless told otherwise), decode the reply."""
    import torch

    ids = build_prompt_ids(tokenizer, messages_from_history(query, history, system))
    generate_kwargs.setdefault("stop_token_ids", stop_ids(tokenizer))
    generate_kwargs.setdefault("max_new_tokens", 512)
    out = model.generate(torch.tensor([ids]), **generate_kwargs)[0]
    return tokenizer.decode(out, skip_special_tokens=True)
