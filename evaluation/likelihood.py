"""Log-likelihood of candidate replies, through the VLM's public API only.

`reply_logprobs(vlm, images, messages, replies) -> [(sum_logprob, n_tokens, is_greedy), ...]`: for each
reply, the log-probability that the model answers the conversation `messages` (whose last turn is the
user's; `<image>` markers for `images` in it) with exactly that reply followed by the end-of-turn token,
computed in one forward pass (`vlm(**batch, return_logits=True)`) with every reply as a row. Images take the
model's own path: each image's span is as long as `vlm.image_tokens(images)` says (its resolution rule: fixed,
anyres, native, naflex) and its inputs are `vlm.image_inputs(images)` (`pixel_values` plus the per-image keys),
repeated once per row, each key concatenated row by row.

The reply's ids are found by rendering the conversation with `vlm.chat_ids` without the reply, with an empty
assistant turn and with the reply as an assistant turn: the first rendering must be a prefix of the others
(true of ChatML and every template that writes an assistant turn as header + content + end), and the turn's
end is what the last two end with in common; otherwise a ValueError says so.

`rank_options(vlm, images, messages, options) -> int`: the option whose text has the highest mean
log-probability per token (the mean, so that a long option is not penalised for its length).
"""

from __future__ import annotations

import torch


def _reply_ids(vlm, messages: list[dict], counts: list[int] | None, n_images: int, reply: str, base: list[int],
               tail: list[int]) -> list[int]:
    full = vlm.chat_ids(messages + [{"role": "assistant", "content": reply}], n_images, counts)
    rest = full[len(base):]
    # The turn's end: what the answered conversation and the empty answer's end with in common. Not all of the
    # empty answer's tail: a template whose reply prompt stops before the header's own space (Vicuna's
    # "ASSISTANT:" then "ASSISTANT: " + reply) writes that space as the reply's first character.
    end = 0
    while end < min(len(tail), len(rest) - 1) and tail[len(tail) - 1 - end] == rest[len(rest) - 1 - end]:
        end += 1
    if full[:len(base)] != base or (tail and end == 0):
        raise ValueError("likelihood scoring needs a chat template that renders an assistant turn as a suffix of "
                         "the prompt (prompt ids + reply + end of turn); this model's template does not")
    # Reply tokens plus the first token of the turn's end (the end-of-turn token).
    return rest[:len(rest) - end + 1]


@torch.no_grad()
def reply_logprobs(vlm, images: list, messages: list[dict], replies: list[str]) -> list[tuple[float, int, bool]]:
    """(sum of log-probs, token count, greedy?) of each reply; see the module docstring."""
    if not replies:
        return []
    n_img = len(images)
    counts = vlm.image_tokens(list(images))  # each image's span (None in fixed mode)
    base = vlm.chat_ids(messages, n_img, counts)  # ends with the open reply header
    empty = vlm.chat_ids(messages + [{"role": "assistant", "content": ""}], n_img, counts)
    if empty[:len(base)] != base:
        raise ValueError("likelihood scoring needs a chat template whose prompt is a prefix of the answered "
                         "conversation; this model's template is not")
    tail = empty[len(base):]  # end of turn, then the next reply header
    conts = [_reply_ids(vlm, messages, counts, n_img, r, base, tail) for r in replies]
    rows = [base + c[:-1] for c in conts]  # the last reply token is predicted, never fed
    width = max(len(r) for r in rows)
    device = next(vlm.parameters()).device
    pad = vlm.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)  # [R, T]
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)  # [R, T]
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if n_img:
        # The same images for every row: pixel_values [R * n_crops or patches, 3, s, s], per-image keys [R * n_img, ...]
        inputs = vlm.image_inputs(list(images))
        batch.update({k: torch.cat([v] * len(rows)).to(device) for k, v in inputs.items()})
        batch["image_counts"] = [n_img] * len(rows)
    vlm.prepare_attention()  # outside the forward (cheap after the first call)
    logits = vlm(**batch, return_logits=True).logits  # [R, T, V]
    out = []
    start = len(base) - 1  # the position whose logits predict the first reply token
    for r, cont in enumerate(conts):
        lp = torch.log_softmax(logits[r, start:start + len(cont)].float(), dim=-1)  # [len(cont), V]
        target = torch.tensor(cont, device=lp.device)
        picked = lp.gather(1, target[:, None]).squeeze(1)  # [len(cont)]
        greedy = bool((lp.argmax(dim=-1) == target).all())
        out.append((float(picked.sum()), len(cont), greedy))
    return out


def rank_options(vlm, images: list, messages: list[dict], options: list[str]) -> int:
    """Index of the option with the highest mean log-probability per token."""
    scores = reply_logprobs(vlm, images, messages, options)
    means = [s / n for s, n, _ in scores]
    return max(range(len(means)), key=lambda i: (means[i], -i))  # ties: the first option
