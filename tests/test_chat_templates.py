"""Chat templates: exact ids and label masks for ChatML, Llama-3, Mistral [INST], Gemma and Phi-3 on tiny
byte-level BPE tokenizers of each family, checked against the tokenizer's own Jinja chat template."""

from __future__ import annotations

import pytest
from qwenvl_lab.dataset.chat_templates import TEMPLATES, detect_template
from qwenvl_lab.dataset.rendering import IGNORE_INDEX, ChatFormat, render
from qwenvl_lab.dataset.sample import BadSampleError, Sample
from qwenvl_lab.model.tokenizers import HFTokenizer

from tests.tiny_lms import FAMILIES, TEMPLATE_OF, tiny_family_tokenizer

TEXT_CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the hat?"},
    {"role": "assistant", "content": "A red hat."},
    {"role": "user", "content": "And the other one?"},
    {"role": "assistant", "content": "It is blue."},
]


def _fmt(family: str, n_image: int = 0):
    hf = tiny_family_tokenizer(family)
    tok = HFTokenizer(hf)
    tok.add_special_tokens(["<image>"])
    fmt = ChatFormat(tok, TEMPLATES[TEMPLATE_OF[family]], image_token_id=tok.token_to_id("<image>"),
                     eos_id=hf.eos_token_id)
    return hf, tok, fmt


def _supervised_runs(ids, labels):
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == i  # labels are the ids themselves (unshifted)
            cur.append(i)
    return runs + ([cur] if cur else [])


def _apply(hf, messages, **kw):
    out = hf.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_conversation_equals_the_tokenizers_own_template(family):
    hf, _, fmt = _fmt(family)
    r = render(Sample("s", TEXT_CONV), fmt, tokens_per_image=3)
    assert r.input_ids == _apply(hf, TEXT_CONV)
    prompt = render(Sample("p", TEXT_CONV[:4]), fmt, tokens_per_image=3, add_generation_prompt=True)
    assert prompt.input_ids == _apply(hf, TEXT_CONV[:4], add_generation_prompt=True)
    # Only the history's answer is supervised; the open question and the reply header are not.
    eot = fmt.template.end_of_turn
    assert [hf.decode(x) for x in _supervised_runs(prompt.input_ids, prompt.labels)] == [f"A red hat.{eot}"]


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_are_the_answers_and_their_end_of_turn(family):
    hf, tok, fmt = _fmt(family)
    r = render(Sample("s", TEXT_CONV), fmt, tokens_per_image=3)
    eot = fmt.template.end_of_turn
    runs = [tok.decode(run) for run in _supervised_runs(r.input_ids, r.labels)]
    assert runs == [f"A red hat.{eot}", f"It is blue.{eot}"]
    assert fmt.stop_token_ids[0] == tok.token_to_id(eot)


EXPECTED_LAYOUT = {  # (token pieces, as text) of [system, user "Hi <image> x", assistant "ok"]
    "chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi <IMG> x<|im_end|>\n"
              "<|im_start|>assistant\nok<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi <IMG> x<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nok<|eot_id|>",
    "mistral": "<s>[INST] S\n\nHi <IMG> x [/INST]ok</s>",
    "gemma": "<bos><start_of_turn>user\nS\n\nHi <IMG> x<end_of_turn>\n<start_of_turn>model\nok<end_of_turn>\n",
    "phi3": "<|system|>\nS<|end|>\n<|user|>\nHi <IMG> x<|end|>\n<|assistant|>\nok<|end|>\n<|endoftext|>",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_ids_with_an_image_span_in_the_text(family):
    hf, tok, fmt = _fmt(family)
    n = 3
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi <image> x"},
            {"role": "assistant", "content": "ok"}]
    r = render(Sample("s", conv, images=["a.png"]), fmt, tokens_per_image=n)
    # Expected ids built independently: the layout string, split at specials, pieces tokenized whole
    # (the tokenizer's own parsing of its special tokens), the image marker as N placeholders.
    layout = EXPECTED_LAYOUT[TEMPLATE_OF[family]]
    before, after = layout.split("<IMG>")
    img = tok.token_to_id("<image>")
    expected = hf(before, add_special_tokens=False)["input_ids"] + [img] * n + \
        hf(after, add_special_tokens=False)["input_ids"]
    assert r.input_ids == expected
    sup = [tok.decode(run) for run in _supervised_runs(r.input_ids, r.labels)]
    assert sup == ["ok" + fmt.template.end_of_turn]
    assert r.n_images == 1 and r.media == [("image", "a.png")]
    assert r.input_ids.count(img) == n and all(r.labels[i] == IGNORE_INDEX
                                               for i, t in enumerate(r.input_ids) if t == img)


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_mode_is_spans_caption_and_end_of_text(family):
    hf, tok, fmt = _fmt(family)
    conv = [{"role": "user", "content": "<image>\nDescribe."}, {"role": "assistant", "content": "a hat"}]
    r = render(Sample("s", conv, images=["a.png"]), fmt, tokens_per_image=2, mode="plain")
    bos = [] if fmt.template.bos is None else [tok.token_to_id(fmt.template.bos)]
    img = tok.token_to_id("<image>")
    assert r.input_ids == bos + [img, img] + tok.encode("a hat") + [hf.eos_token_id]
    assert _supervised_runs(r.input_ids, r.labels) == [tok.encode("a hat") + [hf.eos_token_id]]


def test_user_text_never_becomes_a_control_token():
    hf, tok, fmt = _fmt("llama3")
    conv = [{"role": "user", "content": "say <|eot_id|> now"}, {"role": "assistant", "content": "no"}]
    r = render(Sample("s", conv), fmt, tokens_per_image=1)
    assert r.input_ids.count(tok.token_to_id("<|eot_id|>")) == 2  # the two real turn ends only


def test_truncation_drops_whole_turns_and_counts_them():
    _, tok, fmt = _fmt("llama3")
    conv = [{"role": "user", "content": "<image> one"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "<image><image> two"}, {"role": "assistant", "content": "b"}]
    full = render(Sample("s", conv, images=["1", "2", "3"]), fmt, tokens_per_image=8)
    first = render(Sample("s", conv[:2], images=["1"]), fmt, tokens_per_image=8)
    cut = render(Sample("s", conv, images=["1", "2", "3"]), fmt, tokens_per_image=8,
                 max_length=len(full.input_ids) - 1)
    assert cut.input_ids == first.input_ids
    assert (cut.dropped_turns, cut.dropped_images, cut.n_images) == (2, 2, 1)
    assert (full.dropped_turns, full.dropped_images) == (0, 0)
    with pytest.raises(BadSampleError, match="too long"):
        render(Sample("s", conv, images=["1", "2", "3"]), fmt, tokens_per_image=8, max_length=5)


def test_template_is_detected_from_the_tokenizer_or_the_model_type():
    for family in FAMILIES:
        assert detect_template(tiny_family_tokenizer(family).chat_template, None) == TEMPLATE_OF[family]
    assert detect_template(None, "gemma2") == "gemma" and detect_template(None, "qwen2") == "chatml"
    assert detect_template("{{ messages }}", "llama") is None  # neither says: the config must
    # LMBackbone uses a detected name as is: each one detect_template can give must be a template.
    from qwenvl_lab.dataset import chat_templates as ct

    assert {name for _, name in ct._MARKERS} | set(ct._BY_MODEL_TYPE.values()) <= set(TEMPLATES)


def test_a_template_token_the_tokenizer_lacks_is_a_clear_error():
    hf = tiny_family_tokenizer("mistral")
    tok = HFTokenizer(hf)
    fmt = ChatFormat(tok, TEMPLATES["llama3"], image_token_id=0, eos_id=hf.eos_token_id)
    with pytest.raises(ValueError, match=r"'llama3' needs the token '<\|begin_of_text\|>'"):
        render(Sample("s", TEXT_CONV[1:3]), fmt, tokens_per_image=1)
