"""Preference data: each layout read unmodified from a fixture written in it, bad rows skipped with one line,
the prompt rendered once with only the final answer labelled, and [chosen..., rejected...] batches with each
pair's images once (dataset/pref_formats.py, dataset/pref_data.py)."""

from __future__ import annotations

import logging

import pytest
import torch
from qwenvl_lab.dataset.pref_data import PairCollator, PrefDataset, render_pair
from qwenvl_lab.dataset.pref_formats import read_pairs
from qwenvl_lab.dataset.rendering import IGNORE_INDEX, render
from tiny_data import tiny_processor, tiny_tokenizer, write_json, write_jsonl, write_rgb

Q = "What colour is the square?"

# One pair per layout, spelled as each project writes it (field names, role spellings, nesting).
LAYOUTS = {
    "lf_sharegpt": {
        "conversations": [{"from": "human", "value": f"<image>{Q}"}],
        "chosen": {"from": "gpt", "value": "red"}, "rejected": {"from": "gpt", "value": "blue"},
        "images": ["a.png"]},
    "lf_messages": {
        "chosen_messages": [{"role": "user", "content": f"<image>{Q}"}, {"role": "assistant", "content": "red"}],
        "rejected_messages": [{"role": "user", "content": f"<image>{Q}"}, {"role": "assistant", "content": "blue"}],
        "images": ["a.png"]},
    "rlaif_v": {"ds_name": "shapes", "image": "a.png", "question": Q, "chosen": "red", "rejected": "blue",
                "origin_dataset": "x", "idx": 7},
    "trl": {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "blue"}]}],
            "images": ["a.png"]},
    "swift": {"messages": [{"role": "user", "content": f"<image>{Q}"}, {"role": "assistant", "content": "red"}],
              "rejected_response": "blue", "images": ["a.png"]},
    "swift_messages": {
        "messages": [{"role": "user", "content": f"<image>{Q}"}, {"role": "assistant", "content": "red"}],
        "rejected_messages": [{"role": "user", "content": f"<image>{Q}"}, {"role": "assistant", "content": "blue"}],
        "images": ["a.png"]},
    "llava_rlhf": {"id": "q1", "image": "a.png",
                   "conversations": [{"from": "human", "value": f"<image>\n{Q}"}],
                   "output_1": {"from": "llava", "value": "blue"}, "output_2": {"from": "llava", "value": "red"},
                   "preference": 2},
}


@pytest.fixture()
def folder(tmp_path):
    write_rgb(tmp_path / "a.png", size=(10, 10), color=(220, 20, 20))
    write_rgb(tmp_path / "b.png", size=(12, 8), color=(20, 20, 220))
    return tmp_path


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_loads_unmodified(folder, layout):
    path = write_jsonl(folder / f"{layout}.jsonl", [LAYOUTS[layout]])
    pairs, skipped = read_pairs(str(path))
    assert skipped == [] and len(pairs) == 1
    p = pairs[0]
    assert (p.chosen, p.rejected) == ("red", "blue")
    assert p.images == [str(folder / "a.png")]
    assert [m["role"] for m in p.prompt] == ["user"]
    assert p.prompt[0]["content"].count("<image>") == 1 and Q in p.prompt[0]["content"]
    assert p.layout == ("swift" if layout == "swift_messages" else layout)


def test_llava_rlhf_preference_1_picks_output_1_and_json_lists_read(folder):
    rec = dict(LAYOUTS["llava_rlhf"], preference=1)
    pairs, skipped = read_pairs(str(write_json(folder / "rlhf.json", [rec])))
    assert not skipped and (pairs[0].chosen, pairs[0].rejected) == ("blue", "red")
    assert pairs[0].id == "q1" and pairs[0].source == (str(folder / "rlhf.json"), 0)


def test_multi_turn_prompt_and_string_trl(folder):
    rec = {"conversations": [{"from": "human", "value": "<image>first?"}, {"from": "gpt", "value": "one"},
                             {"from": "human", "value": "<image>second?"}],
           "chosen": {"from": "gpt", "value": "two"}, "rejected": {"from": "gpt", "value": "three"},
           "images": ["a.png", "b.png"], "system": "be brief"}
    plain = {"prompt": "no image here?", "chosen": "yes", "rejected": "no"}
    pairs, skipped = read_pairs(str(write_jsonl(folder / "multi.jsonl", [rec, plain])))
    assert not skipped
    assert [m["role"] for m in pairs[0].prompt] == ["system", "user", "assistant", "user"]
    assert len(pairs[0].images) == 2 and pairs[1].images == [] and pairs[1].layout == "trl"


def test_bad_rows_are_skipped_with_one_line_each(folder):
    good = LAYOUTS["lf_sharegpt"]
    rows = [
        good,
        {**good, "id": "nochosen", "chosen": None},
        {**good, "id": "same", "rejected": {"from": "gpt", "value": "red"}},
        {**good, "id": "markers", "images": ["a.png", "b.png"]},
        {**LAYOUTS["lf_messages"], "id": "differ",
         "rejected_messages": [{"role": "user", "content": "<image>Another question?"},
                               {"role": "assistant", "content": "blue"}]},
        {**LAYOUTS["llava_rlhf"], "id": "pref3", "preference": 3},
        {**LAYOUTS["rlaif_v"], "idx": "norej", "rejected": ""},
        {"id": "nothing", "text": "hello"},
    ]
    path = write_jsonl(folder / "bad.jsonl", rows)
    with open(path, "a") as f:
        f.write("{not json\n")
    pairs, skipped = read_pairs(str(path))
    assert len(pairs) == 1
    reasons = {pos: str(err) for pos, err in skipped}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8, 9]
    for pos, text in reasons.items():
        assert "\n" not in text and f"bad.jsonl line {pos}" in text
    assert "'nochosen'" in reasons[2] and "missing chosen or rejected" in reasons[2]
    assert "'same'" in reasons[3] and "chosen == rejected" in reasons[3]
    assert "'markers'" in reasons[4] and "1 <image> marker(s) in the text but 2 image(s)" in reasons[4]
    assert "'differ'" in reasons[5] and "prompts differ" in reasons[5]
    assert "'pref3'" in reasons[6] and "'preference' must be 1 or 2" in reasons[6]
    assert "'norej'" in reasons[7] and "missing chosen or rejected" in reasons[7]
    assert "not a preference record" in reasons[8] and "invalid JSON" in reasons[9]


def test_prompt_rendered_once_only_final_answer_labelled(folder):
    tok = tiny_tokenizer(folder)
    rec = {"conversations": [{"from": "human", "value": "<image>first?"}, {"from": "gpt", "value": "one"},
                             {"from": "human", "value": "second?"}],
           "chosen": {"from": "gpt", "value": "two two"}, "rejected": {"from": "gpt", "value": "three"},
           "images": ["a.png"]}
    pair = read_pairs(str(write_jsonl(folder / "p.jsonl", [rec])))[0][0]
    r = render_pair(pair, tok, tokens_per_image=5)
    assert r.n_images == 1 and r.prompt_ids.count(tok.image_token_id) == 5
    for answer, ids, labels in (("two two", r.chosen_ids, r.chosen_labels), ("three", r.rejected_ids, r.rejected_labels)):
        full = render(pair.sample(answer), tok, 5)  # the whole conversation rendered in one go
        assert r.prompt_ids + ids == full.input_ids
        supervised = [t for t in labels if t != IGNORE_INDEX]
        assert supervised == tok.encode(answer) + [tok.im_end_id]  # the final answer and its end of turn
        # the earlier answer "one" is labelled in SFT rendering, not here
        assert sum(t != IGNORE_INDEX for t in full.labels) > len(supervised)


def test_dataset_skips_over_long_pairs_and_collates_chosen_then_rejected(folder, caplog):
    tok = tiny_tokenizer(folder)
    short = LAYOUTS["lf_sharegpt"]
    two = {"conversations": [{"from": "human", "value": "<image><image>both?"}],
           "chosen": {"from": "gpt", "value": "a b"}, "rejected": {"from": "gpt", "value": "c"},
           "images": ["a.png", "b.png"], "id": "two"}
    long = {**short, "id": "long", "chosen": {"from": "gpt", "value": "word " * 200}}
    bad = {**short, "id": "same", "rejected": short["chosen"]}
    path = write_jsonl(folder / "d.jsonl", [short, two, long, bad])
    with caplog.at_level(logging.WARNING):
        ds = PrefDataset(str(path), tok, tiny_processor(8), tokens_per_image=4, max_length=80)
    assert len(ds) == 2
    report = ds.skip_report()
    assert report["skipped"] == 2 and report["by_kind"] == {"too_long": 1, "bad_record": 1}
    assert any("'long'" in r.getMessage() and "too long" in r.getMessage() for r in caplog.records)
    items = [ds[0], ds[1]]
    batch = PairCollator(pad_id=0)(items)
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].shape == batch["input_ids"].shape
    for b, it in enumerate(items):  # rows: chosen 0, chosen 1, rejected 0, rejected 1
        n_c, n_r = len(it["chosen_input_ids"]), len(it["rejected_input_ids"])
        assert torch.equal(batch["input_ids"][b, :n_c], it["chosen_input_ids"])
        assert torch.equal(batch["input_ids"][2 + b, :n_r], it["rejected_input_ids"])
        assert int(batch["attention_mask"][2 + b].sum()) == n_r
    assert batch["pixel_values"].shape == (3, 3, 8, 8)  # 1 + 2 images: each pair's images once
    assert batch["image_counts"].tolist() == [1, 2] and batch.ids == ["d.jsonl#1", "two"]
    # each pair's rows share the same placeholders: the images serve both sides
    slots = (batch["input_ids"] == tok.image_token_id).sum(1).tolist()
    assert slots == [4, 8, 4, 8]


def test_missing_image_mid_run_skips_the_pair(folder):
    tok = tiny_tokenizer(folder)
    gone = {**LAYOUTS["lf_sharegpt"], "id": "gone", "images": ["gone.png"]}
    ok = {**LAYOUTS["lf_sharegpt"], "id": "ok"}
    ds = PrefDataset(str(write_jsonl(folder / "m.jsonl", [gone, ok])), tok, tiny_processor(8), tokens_per_image=4)
    item = ds[0]
    assert item["id"] == "ok" and len(item["skipped"]) == 1
    assert "gone.png" in item["skipped"][0]["reason"] and item["skipped"][0]["kind"] == "missing_file"
