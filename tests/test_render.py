"""dataset/rendering.py: exact ids and labels (tiny and real Qwen-1 vocabularies), masks, truncation."""

import functools
import itertools
import re

import pytest
import tiny_data as td
from qwenvl_lab.dataset.formats import normalize
from qwenvl_lab.dataset.rendering import IGNORE_INDEX, estimate_length, render
from qwenvl_lab.dataset.sample import BadSampleError, Sample
from tiny_qwen import tiny_n_ranks

N = 3  # tokens per image in the tiny tests


@pytest.fixture
def tok(tmp_path):
    return td.tiny_tokenizer(tmp_path / "tok")


@functools.lru_cache(maxsize=1)
def _real_tokenizer(path):
    from qwenvl_lab.qwen.tokenizer import load_tokenizer

    return load_tokenizer(path)


def _sample(messages, images=(), videos=()):
    return Sample(id="t", messages=messages, images=list(images), videos=list(videos), source=("t.jsonl", 1))


def _expected(tok, messages, images_n=N, k=4):
    """ChatML ids + labels built piece by piece from encode() and the special ids (independent of render)."""
    ids, labels = [], []

    def add(x, train):
        ids.extend(x)
        labels.extend(x if train else [IGNORE_INDEX] * len(x))

    span = [tok.image_start_id] + [tok.image_token_id] * images_n + [tok.image_end_id]
    for m in messages:
        train = m["role"] == "assistant"
        add([tok.im_start_id] + tok.encode(m["role"]) + tok.encode("\n"), False)
        for part in re.split(r"(<image>|<video>)", m["content"]):
            if part == "<image>":
                add(span, False)
            elif part == "<video>":
                add(span * k, False)
            elif part:
                add(tok.encode(part), train)
        add([tok.im_end_id], train)
        add(tok.encode("\n"), False)
    return ids, labels


def test_tiny_special_ids_follow_the_ranks(tok):
    n = tiny_n_ranks()
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (n, n + 1, n + 2)
    assert (tok.image_token_id, tok.image_start_id, tok.image_end_id) == (n + 3, n + 4, n + 5)


def test_two_images_two_turns_exact_ids_and_labels(tok):
    s = normalize(td.records_in_every_format()["llava"], 0, "x.jsonl", image_folder="/imgs")
    r = render(s, tok, N)
    ids, labels = _expected(tok, td.EXPECTED_MESSAGES)
    assert r.input_ids == ids and r.labels == labels
    assert r.n_images == 2 and r.n_frames == 0
    assert r.media == [("image", "/imgs/a.png"), ("image", "/imgs/b.png")]
    # Decoding gives back the ChatML text with the spans exactly where the markers stood.
    span = "<|extra_1|>" + "<|extra_0|>" * N + "<|extra_2|>"
    assert tok.decode(r.input_ids) == (
        f"<|im_start|>system\n{td.SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{span}\n{td.Q1}<|im_end|>\n<|im_start|>assistant\n{td.A1}<|im_end|>\n"
        f"<|im_start|>user\nCompare {span}\n{td.Q2}<|im_end|>\n<|im_start|>assistant\n{td.A2}<|im_end|>\n")
    # Labels: only assistant content + its <|im_end|>.
    assert tok.decode([t for t in r.labels if t != IGNORE_INDEX]) == f"{td.A1}<|im_end|>{td.A2}<|im_end|>"


def test_text_only_and_no_default_system(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    r = render(_sample(msgs), tok, N)
    assert (r.input_ids, r.labels) == _expected(tok, msgs)
    assert r.n_images == 0 and r.media == []
    assert tok.decode(r.input_ids).startswith("<|im_start|>user\n")  # nothing added in front
    r2 = render(_sample(msgs), tok, N, system_prompt="Be nice.")
    assert (r2.input_ids, r2.labels) == _expected(tok, [{"role": "system", "content": "Be nice."}] + msgs)
    # The sample's own system prompt wins over the configured one.
    own = [{"role": "system", "content": "Own."}] + msgs
    assert render(_sample(own), tok, N, system_prompt="Be nice.").input_ids == _expected(tok, own)[0]


def test_markers_mid_text_and_in_assistant_turns_are_never_labelled(tok):
    msgs = [{"role": "user", "content": "left<image>right <image>"},
            {"role": "assistant", "content": "see <image> here"}]
    r = render(_sample(msgs, images=["1", "2", "3"]), tok, N)
    assert (r.input_ids, r.labels) == _expected(tok, msgs)
    for i, t in enumerate(r.input_ids):
        if t in (tok.image_token_id, tok.image_start_id, tok.image_end_id):
            assert r.labels[i] == IGNORE_INDEX
    assert [p for _, p in r.media] == ["1", "2", "3"]


def test_video_becomes_k_frame_spans(tok):
    msgs = [{"role": "user", "content": "<image> then <video>?"}, {"role": "assistant", "content": "ok"}]
    r = render(_sample(msgs, images=["a.png"], videos=["v.mp4"]), tok, N, frames_per_video=2)
    assert (r.input_ids, r.labels) == _expected(tok, msgs, k=2)
    assert r.input_ids.count(tok.image_start_id) == 3
    assert (r.n_images, r.n_frames, r.n_spans) == (1, 2, 3)
    assert r.media == [("image", "a.png"), ("video", "v.mp4")]


def test_plain_mode_is_image_plus_caption_plus_eod(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "<image>\nDescribe it."},
            {"role": "assistant", "content": "A red square."}]
    r = render(_sample(msgs, images=["a.png"]), tok, N, mode="plain")
    span = [tok.image_start_id] + [tok.image_token_id] * N + [tok.image_end_id]
    caption = tok.encode("A red square.") + [tok.eod_id]
    assert r.input_ids == span + caption
    assert r.labels == [IGNORE_INDEX] * len(span) + caption
    assert r.media == [("image", "a.png")]


def test_marker_count_mismatch_at_render_names_the_sample(tok):
    msgs = [{"role": "user", "content": "<image><image>"}, {"role": "assistant", "content": "x"}]
    with pytest.raises(BadSampleError, match=r"sample 't' \(t.jsonl line 1\).*more <image> markers"):
        render(_sample(msgs, images=["a"]), tok, N)
    with pytest.raises(BadSampleError, match="1 <image> / 0 <video> markers for 2 images"):
        one = [{"role": "user", "content": "<image>"}, msgs[1]]
        render(_sample(one, images=["a", "b"]), tok, N)


def _three_turns():
    msgs = [{"role": "system", "content": "S"}]
    for t in range(3):
        msgs += [{"role": "user", "content": f"<image>\nquestion number {t}"},
                 {"role": "assistant", "content": f"answer {t} is here"}]
    return _sample(msgs, images=["i0", "i1", "i2"])


def test_truncation_drops_whole_turns_and_never_splits_a_span(tok):
    s = _three_turns()
    full = render(s, tok, N)
    # Turn boundaries of the full rendering = positions right after each "assistant ... <|im_end|>\n".
    ends = [i + 2 for i, t in enumerate(full.input_ids) if t == tok.im_end_id][2::2]
    assert len(ends) == 3 and ends[-1] == len(full.input_ids)
    n_fit_seen = set()
    for max_len in range(1, len(full.input_ids) + 5):
        try:
            r = render(s, tok, N, max_length=max_len)
        except BadSampleError as e:
            assert "too long" in str(e) and max_len < ends[0]
            continue
        assert len(r.input_ids) <= max_len
        kept = max(k for k in range(1, 4) if ends[k - 1] <= max_len)
        n_fit_seen.add(kept)
        # A prefix of the full rendering ending at a turn boundary; images of dropped turns dropped.
        assert r.input_ids == full.input_ids[:ends[kept - 1]] and r.labels == full.labels[:ends[kept - 1]]
        assert [p for _, p in r.media] == ["i0", "i1", "i2"][:kept] and r.n_images == kept
        # Every span is whole: start, N placeholders, end.
        starts = [i for i, t in enumerate(r.input_ids) if t == tok.image_start_id]
        assert len(starts) == kept
        for i in starts:
            assert r.input_ids[i + 1:i + 1 + N] == [tok.image_token_id] * N and r.input_ids[i + 1 + N] == \
                tok.image_end_id
    assert n_fit_seen == {1, 2, 3}


def test_too_long_first_turn_and_no_target(tok):
    s = _three_turns()
    with pytest.raises(BadSampleError, match="too long"):
        render(s, tok, N, max_length=10)
    with pytest.raises(BadSampleError, match="too long"):
        render(s, tok, N, mode="plain", max_length=3)
    only_user = _sample([{"role": "user", "content": "hi"}])
    with pytest.raises(BadSampleError, match="no supervised"):
        render(only_user, tok, N)


def test_estimate_length(tok):
    s = _three_turns()
    exact = len(render(s, tok, N).input_ids)
    assert estimate_length(s, N, tokenizer=tok) == exact
    approx = estimate_length(s, N)
    assert approx >= 3 * (N + 2)  # counts the image tokens
    assert 0.5 * exact <= approx <= 2 * exact


# ------------------------------------------------------------------------------- real Qwen-1 vocabulary
def test_real_vocab_text_only_matches_facts(shared_qwen1):
    tok = _real_tokenizer(str(shared_qwen1))
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
    r = render(_sample(msgs), tok, 256)
    # FACTS.md: the ChatML ids of this exact conversation (first 25 ids of its example).
    facts = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 48, 16,
             151645, 198, 151644, 77091, 198, 32, 16, 151645, 198]
    assert r.input_ids == facts
    assert r.labels == [IGNORE_INDEX] * 21 + [32, 16, 151645] + [IGNORE_INDEX]


def test_real_vocab_image_span_is_extra_1_extra_0_extra_2(shared_qwen1):
    tok = _real_tokenizer(str(shared_qwen1))
    msgs = [{"role": "user", "content": "<image>\nQ1"}, {"role": "assistant", "content": "A1"}]
    r = render(_sample(msgs, images=["a.jpg"]), tok, 4)
    assert r.input_ids == [151644, 872, 198, 151647, 151646, 151646, 151646, 151646, 151648,
                           198, 48, 16, 151645, 198, 151644, 77091, 198, 32, 16, 151645, 198]
    assert [t for t in r.labels if t != IGNORE_INDEX] == [32, 16, 151645]


def test_generation_prompt_for_inference(tok):
    msgs = [{"role": "user", "content": "<image>\nWhat is it?"}]
    r = render(_sample(msgs, images=["a.png"]), tok, N, add_generation_prompt=True)
    ids, _ = _expected(tok, msgs)
    assert r.input_ids == ids + [tok.im_start_id] + tok.encode("assistant") + tok.encode("\n")
    assert set(r.labels) == {IGNORE_INDEX} and r.media == [("image", "a.png")]


def test_model_placeholder_overrides_the_tokenizers(tok):
    """An imported Llava keeps its own placeholder id: render (and so training and chat) must use it."""
    s = _sample([{"role": "user", "content": "a <image> b"}, {"role": "assistant", "content": "ok"}], ["x.png"])
    plain = render(s, tok, tokens_per_image=3)
    other = tok.image_token_id + 7
    moved = render(s, tok, tokens_per_image=3, image_token_id=other)
    assert plain.input_ids.count(tok.image_token_id) == 3 and other not in plain.input_ids
    assert moved.input_ids.count(other) == 3 and tok.image_token_id not in moved.input_ids
    swap = [other if t == tok.image_token_id else t for t in plain.input_ids]
    assert moved.input_ids == swap and moved.labels == plain.labels


def test_per_image_token_counts_from_a_function(tok):
    """Variable resolution: each image (and each frame of a video) gets its own count, in marker order."""
    counts = {("image", 0): 3, ("image", 1): 7, ("video", 0): 2}
    msgs = [{"role": "user", "content": "<image>a<video>b<image>"}, {"role": "assistant", "content": "ok"}]
    s = _sample(msgs, images=["x.png", "y.png"], videos=["v.mp4"])
    r = render(s, tok, lambda kind, i: counts[(kind, i)], frames_per_video=2)
    runs = [len(list(g)) for k, g in itertools.groupby(r.input_ids) if k == tok.image_token_id]
    assert runs == [3, 2, 2, 7]
    assert estimate_length(s, lambda kind, i: counts[(kind, i)], frames_per_video=2, tokenizer=tok) == len(r.input_ids)
