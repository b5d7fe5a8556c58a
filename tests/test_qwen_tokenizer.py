"""Tokenizers: Qwen-1 tiktoken (tiny + real vocabulary) and Qwen2-style tokenizer.json."""

import pytest
from qwenvl_lab.qwen import HFQwenTokenizer, QWenTokenizer, load_tokenizer
from qwenvl_lab.qwen.chat import build_prompt_ids, messages_from_history
from tiny_qwen import TINY_MERGES, tiny_n_ranks, write_tiny_hf_tokenizer, write_tiny_vocab

TEXTS = ["the cat is in the hat", "Hello,  world!\n\nthe end", "naïve café 123 — ok", ""]


def test_tiny_qwen1_specials_follow_ranks(tmp_path):
    write_tiny_vocab(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, QWenTokenizer)
    n = 256 + len(TINY_MERGES)
    assert tiny_n_ranks() == n
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (n, n + 1, n + 2)
    assert tok.token_to_id("<|extra_0|>") == n + 3 and tok.token_to_id("<|extra_204|>") == n + 3 + 204
    assert (tok.image_token_id, tok.image_start_id, tok.image_end_id, tok.video_token_id) == (
        n + 3, n + 4, n + 5, n + 6)
    assert len(tok) == n + 3 + 205


def test_tiny_qwen1_encode_uses_merges_and_roundtrips(tmp_path):
    tok = load_tokenizer(write_tiny_vocab(tmp_path).parent)
    ids = tok.encode("the")
    assert ids == [256 + TINY_MERGES.index("the")]  # a merged token, not three bytes
    for t in TEXTS:
        assert tok.decode(tok.encode(t)) == t
    assert tok.decode([tok.im_end_id]) == "<|im_end|>"
    assert tok.decode([tok.im_end_id, *tok.encode("a")], skip_special_tokens=True) == "a"


@pytest.mark.parametrize("special", ["<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|extra_0|>"])
def test_user_text_never_becomes_special(tmp_path, special):
    write_tiny_vocab(tmp_path / "q1")
    write_tiny_hf_tokenizer(tmp_path / "hf")
    for tok in (load_tokenizer(tmp_path / "q1"), load_tokenizer(tmp_path / "hf")):
        ids = tok.encode(f"say {special} now")
        assert not set(ids) & tok.special_ids
        assert tok.decode(ids) == f"say {special} now"


def test_tiny_hf_tokenizer_ids_and_agreement_with_tiktoken(tmp_path):
    write_tiny_vocab(tmp_path / "q1")
    write_tiny_hf_tokenizer(tmp_path / "hf")
    q1, hf = load_tokenizer(tmp_path / "q1"), load_tokenizer(tmp_path / "hf")
    assert isinstance(hf, HFQwenTokenizer) and hf.added_vl_tokens == []
    n = tiny_n_ranks()
    # Qwen2's special order: endoftext, im_start, im_end, ..., vision_start (9), vision_end, pad, image_pad (12)
    assert (hf.eod_id, hf.im_start_id, hf.im_end_id) == (n, n + 1, n + 2)
    assert (hf.image_start_id, hf.image_end_id, hf.image_token_id, hf.video_token_id) == (
        n + 9, n + 10, n + 12, n + 13)
    for t in TEXTS:  # same ranks, same split pattern -> same ids
        assert hf.encode(t) == q1.encode(t)
        assert hf.decode(hf.encode(t)) == t


def test_hf_tokenizer_without_vision_tokens_gets_them_added(tmp_path):
    write_tiny_hf_tokenizer(tmp_path, with_vl_tokens=False)
    tok = load_tokenizer(tmp_path)
    assert sorted(tok.added_vl_tokens) == sorted(
        ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"])
    n_base = tiny_n_ranks() + 9  # 14 Qwen2 specials minus the 5 vision ones
    vl = {tok.image_token_id, tok.image_start_id, tok.image_end_id, tok.video_token_id}
    assert len(vl) == 4 and min(vl) >= n_base and len(tok) == n_base + 4
    assert tok.image_token_id not in tok.encode("<|image_pad|>")


def test_missing_vocabulary_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="qwen.tiktoken"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.tiktoken")):
        QWenTokenizer(tmp_path / "nope.tiktoken")


def test_corrupt_vocabulary_names_file_and_line(tmp_path):
    (tmp_path / "qwen.tiktoken").write_text("IQ== 0\nnot-a-valid-line\n")
    with pytest.raises(ValueError, match=r"qwen.tiktoken:2"):
        load_tokenizer(tmp_path)


def test_save_pretrained_roundtrip(tmp_path):
    write_tiny_vocab(tmp_path / "a")
    tok = load_tokenizer(tmp_path / "a")
    tok.save_pretrained(tmp_path / "b")
    assert load_tokenizer(tmp_path / "b").encode("the hat") == tok.encode("the hat")


def test_chatml_no_default_system_prompt(tmp_path):
    tok = load_tokenizer(write_tiny_vocab(tmp_path).parent)
    ids = build_prompt_ids(tok, [{"role": "user", "content": "hi"}])
    nl = tok.encode("\n")
    assert ids == ([tok.im_start_id] + tok.encode("user") + nl + tok.encode("hi") + [tok.im_end_id] + nl
                   + [tok.im_start_id] + tok.encode("assistant") + nl)
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        build_prompt_ids(tok, [{"role": "robot", "content": "x"}])


# ---- the real Qwen-1 vocabulary (skips without ../shared) ----
FACTS_CHATML = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 48, 16,
                151645, 198, 151644, 77091, 198, 32, 16, 151645, 198, 151644, 872, 198, 13048, 1052, 151645, 198,
                151644, 77091, 198]


def test_real_vocab_specials_and_chatml_ids(shared_qwen1):
    tok = load_tokenizer(shared_qwen1)
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (151643, 151644, 151645)
    assert tok.image_token_id == 151646 and tok.token_to_id("<|extra_204|>") == 151850
    assert len(tok) == 151851
    msgs = messages_from_history("Hi there", [("Q1", "A1")], system="You are a helpful assistant.")
    assert build_prompt_ids(tok, msgs) == FACTS_CHATML
    assert 151645 not in tok.encode("<|im_end|>")
