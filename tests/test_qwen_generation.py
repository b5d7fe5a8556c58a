"""Generation: cache vs no cache, left-padded batches, stops, streaming, sampling filters, chat."""

import math

import pytest
import torch
from qwenvl_lab.qwen import QWenLMHeadModel, load_tokenizer
from qwenvl_lab.qwen.chat import chat
from qwenvl_lab.qwen.generation import process_logits
from tiny_qwen import tiny_qwen_config, write_tiny_vocab


def _model(arch="qwen1", **kw):
    torch.manual_seed(0)
    m = QWenLMHeadModel(tiny_qwen_config(arch, **kw)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "ln" not in name and "norm" not in name:
                p.normal_(0, 0.1)
    return m


PROMPTS = [[5, 17, 99, 230, 41, 8, 77], [12, 250], [3, 3, 60, 70]]


@pytest.mark.parametrize("arch", ["qwen1", "qwen2", "qwen3"])
def test_cached_generation_equals_uncached(arch):
    model = _model(arch)
    cached = model.generate(PROMPTS, max_new_tokens=8)
    uncached = model.generate(PROMPTS, max_new_tokens=8, use_cache=False)
    assert cached == uncached and all(len(r) == 8 for r in cached)


def test_cached_sampling_equals_uncached_with_same_seed():
    model = _model("qwen3")
    kw = dict(max_new_tokens=6, do_sample=True, temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.3)
    a = model.generate(PROMPTS, generator=torch.Generator().manual_seed(3), **kw)
    b = model.generate(PROMPTS, use_cache=False, generator=torch.Generator().manual_seed(3), **kw)
    assert a == b


def test_left_padded_batch_generation_equals_separate_runs():
    model = _model("qwen1")
    batch = model.generate(PROMPTS, max_new_tokens=6)
    for p, out in zip(PROMPTS, batch):
        assert model.generate(torch.tensor([p]), max_new_tokens=6)[0] == out


def test_stop_token_excluded_and_streamer_sees_every_token():
    model = _model("qwen2")
    free = model.generate([PROMPTS[0]], max_new_tokens=6)[0]
    stop = free[3]
    first = free.index(stop)
    streamed = []
    out = model.generate([PROMPTS[0]], max_new_tokens=6, stop_token_ids=[stop],
                         streamer=lambda b, t: streamed.append((b, t)))[0]
    assert out == free[:first]
    assert streamed == [(0, t) for t in out]


def test_top_k_one_sampling_is_greedy():
    model = _model("qwen1")
    greedy = model.generate(PROMPTS, max_new_tokens=5)
    sampled = model.generate(PROMPTS, max_new_tokens=5, do_sample=True, top_k=1, temperature=0.7,
                             generator=torch.Generator().manual_seed(0))
    assert greedy == sampled


def test_generation_with_image_features_cached_equals_uncached():
    model = _model("qwen1")
    img = model.config.image_token_id
    prompt = [[5, img, img, 9, 40], [img, 7]]
    feats = torch.randn(3, model.config.hidden_size)
    a = model.generate(prompt, max_new_tokens=5, image_features=feats)
    b = model.generate(prompt, max_new_tokens=5, image_features=feats, use_cache=False)
    assert a == b
    assert a != model.generate(prompt, max_new_tokens=5, image_features=torch.zeros_like(feats))


def test_generation_from_inputs_embeds_equals_ids():
    model = _model("qwen3")
    ids = torch.tensor([PROMPTS[0]])
    emb = model.get_input_embeddings()(ids).detach()
    assert model.generate(inputs_embeds=emb, input_ids=None, max_new_tokens=5) == model.generate(
        ids, max_new_tokens=5)
    assert model.generate(inputs_embeds=emb, input_ids=None, max_new_tokens=5, use_cache=False) == \
        model.generate(ids, max_new_tokens=5)


def test_logit_filters_from_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    seen = torch.tensor([[True, True, False, False]])
    pen = process_logits(logits, seen, 1.0, 0, 1.0, 2.0)
    assert torch.equal(pen, torch.tensor([[1.0, -2.0, 0.5, 1.0]]))  # /2 if positive, *2 if negative
    assert torch.equal(process_logits(logits, None, 2.0, 0, 1.0, 1.0), logits / 2)
    topk = process_logits(logits, None, 1.0, 2, 1.0, 1.0)
    assert torch.isinf(topk).tolist() == [[False, True, True, False]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    topp = process_logits(probs.log(), None, 1.0, 0, 0.6, 1.0)  # keep the smallest set with mass >= 0.6
    assert torch.isinf(topp).tolist() == [[False, False, True, True]]
    assert math.isclose(torch.softmax(topp, -1)[0, 0].item(), 0.5 / 0.8, rel_tol=1e-6)


def test_chat_turn_decodes_reply(tmp_path):
    tok = load_tokenizer(write_tiny_vocab(tmp_path).parent)
    model = _model("qwen1")
    reply = chat(model, tok, "the cat", max_new_tokens=4)
    assert isinstance(reply, str)


def test_generation_rejects_bad_sampling_args():
    model = _model("qwen1")
    with pytest.raises(ValueError, match="temperature"):
        model.generate(PROMPTS, do_sample=True, temperature=0.0)
