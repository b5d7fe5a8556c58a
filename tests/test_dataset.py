"""dataset/dataset.py, collator.py, sampler.py: items, skipping bad samples, batches, grouped sampling."""

import json
import pickle

import pytest
import tiny_data as td
import torch
from qwenvl_lab.dataset import Collator, LengthGroupedSampler, VLMDataset
from qwenvl_lab.dataset.formats import DataFileError
from qwenvl_lab.dataset.rendering import IGNORE_INDEX, render
from qwenvl_lab.dataset.sample import BadSampleError

N = 2


@pytest.fixture
def tok(tmp_path):
    return td.tiny_tokenizer(tmp_path / "tok")


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    td.write_rgb(d / "red.png", color=(255, 0, 0))
    td.write_rgb(d / "blue.png", color=(0, 0, 255))
    return d


def _ds(path, tok, images, **kw):
    return VLMDataset(path, tok, td.tiny_processor(), N, image_folder=str(images), **kw)


def test_item_has_ids_labels_and_pixels_in_span_order(tmp_path, tok, images):
    rec = {"id": "two", "images": ["blue.png", "red.png"], "messages": [
        {"role": "user", "content": "<image> and <image>?"}, {"role": "assistant", "content": "two"}]}
    path = td.write_jsonl(tmp_path / "d.jsonl", [rec, td.simple_record(1, image=None)])
    ds = _ds(path, tok, images)
    assert len(ds) == 2
    item = ds[0]
    r = render(ds.samples[0], tok, N)
    assert item["input_ids"].tolist() == r.input_ids and item["labels"].tolist() == r.labels
    assert item["pixel_values"].shape == (2, 3, 8, 8) and item["n_images"] == 2
    # blue first, then red: the order of the markers.
    assert item["pixel_values"][0, 2].mean() == 1.0 and item["pixel_values"][1, 0].mean() == 1.0
    text_only = ds[1]
    assert text_only["pixel_values"] is None and text_only["n_images"] == 0


def test_sampling_weights(tmp_path, tok, images):
    a = td.write_jsonl(tmp_path / "a.jsonl", [td.simple_record(i, image="red.png") for i in range(4)])
    b = td.write_jsonl(tmp_path / "b.jsonl", [td.simple_record(10 + i, image=None) for i in range(6)])
    ds = _ds([(a, 2.0), {"path": str(b), "weight": 0.5}], tok, images)
    ids = [ds.samples[k].id for k in ds.index]
    assert len(ds) == 4 * 2 + 3
    assert all(ids.count(f"r{i}") == 2 for i in range(4))
    assert len([i for i in ids if int(i[1:]) >= 10]) == 3


def _bad_dataset(tmp_path, images):
    """One JSONL with a good sample and one of every bad input; returns (path, expected kinds by id)."""
    bad = td.write_bad_images(images / "bad")
    modes = td.write_mode_images(images / "modes")
    ok = {"id": "ok", "images": ["red.png"], "messages": [
        {"role": "user", "content": "<image>"}, {"role": "assistant", "content": "red"}]}

    def with_image(sid, path):
        return {"id": sid, "images": [str(path)], "messages": [
            {"role": "user", "content": "<image>what?"}, {"role": "assistant", "content": "a"}]}

    recs = [ok]
    kinds = {}
    for name, path in bad.items():
        recs.append(with_image(name, path))
        kinds[name] = {"missing": "missing_file", "bomb": "too_large"}.get(name, "bad_image")
    for name, (path, _) in modes.items():  # odd modes are NOT bad: they load as RGB
        recs.append(with_image("mode_" + name, path))
    recs += [
        {"id": "too_many", "images": ["red.png"], "messages": [
            {"role": "user", "content": "<image><image>"}, {"role": "assistant", "content": "a"}]},
        {"id": "too_few", "images": ["red.png", "blue.png"], "messages": [
            {"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}]},
        {"id": "empty_conv", "messages": []},
        {"id": "asst_first", "messages": [{"role": "assistant", "content": "a"}]},
        {"id": "bad_role", "messages": [{"role": "robot", "content": "a"}]},
        {"id": "non_str", "messages": [{"role": "user", "content": {"x": 1}}]},
        {"id": "long", "images": ["red.png"], "messages": [
            {"role": "user", "content": "<image>" + " word" * 200}, {"role": "assistant", "content": "a"}]},
    ]
    for k in ("too_many", "too_few", "empty_conv", "asst_first", "bad_role", "non_str"):
        kinds[k] = "bad_record"
    kinds["long"] = "too_long"
    path = td.write_jsonl(tmp_path / "mixed.jsonl", recs)
    with open(path, "a") as f:
        f.write('{"id": "broken json"\n')
    return path, kinds


def test_every_bad_input_is_a_counted_skip(tmp_path, tok, images):
    path, kinds = _bad_dataset(tmp_path, images)
    ds = _ds(path, tok, images, max_length=64)
    seen = []
    for i in range(len(ds)):
        item = ds[i]
        seen.append(item["id"])
        assert item["input_ids"].shape == item["labels"].shape
    # Every returned item is a good one; the odd-mode images are good.
    assert set(seen) == {"ok"} | {i for i in seen if i.startswith("mode_")}
    assert len({i for i in seen if i.startswith("mode_")}) == 10
    by_id = {r["id"]: r for r in ds.skipped.values()}
    for sid, kind in kinds.items():
        assert by_id[sid]["kind"] == kind, (sid, by_id[sid])
        assert f"'{sid}'" in by_id[sid]["reason"] and "mixed.jsonl" in by_id[sid]["reason"]
    broken = [r for r in ds.skipped.values() if r["kind"] == "bad_json"]
    assert len(broken) == 1 and "mixed.jsonl line" in broken[0]["reason"]
    report = ds.skip_report()
    assert report["skipped"] == len(kinds) + 1
    assert sum(report["by_kind"].values()) == report["skipped"]
    assert report["by_kind"]["bad_image"] == 4 and report["by_kind"]["too_long"] == 1
    # A second pass (next epoch) does not count the same samples again.
    for i in range(len(ds)):
        ds[i]
    assert ds.skip_report()["skipped"] == report["skipped"]


def test_strict_mode_raises_naming_the_sample(tmp_path, tok, images):
    path, _ = _bad_dataset(tmp_path, images)
    with pytest.raises(DataFileError, match=r"mixed\.jsonl line 25: invalid JSON"):
        _ds(path, tok, images, strict=True)
    lines = open(path).read().splitlines()
    path2 = td.write_jsonl(tmp_path / "strict.jsonl", [json.loads(x) for x in lines[:4]])
    ds = _ds(path2, tok, images, strict=True)  # ok, missing, empty, corrupt: all fine until loaded
    assert ds[0]["id"] == "ok"
    with pytest.raises(BadSampleError, match=r"sample 'missing' \(.*strict\.jsonl line 2\).*not found"):
        ds[1]
    path3 = td.write_jsonl(tmp_path / "strict3.jsonl", [json.loads(lines[0]), json.loads(lines[20])])
    with pytest.raises(BadSampleError, match=r"strict3\.jsonl line 2 \(id 'asst_first'\)"):
        _ds(path3, tok, images, strict=True)


def test_validate_prescans_and_removes_bad_samples(tmp_path, tok, images):
    path, kinds = _bad_dataset(tmp_path, images)
    ds = _ds(path, tok, images, max_length=64)
    approx = ds.lengths
    report = ds.validate()
    # Header checks catch everything except broken pixel data, which only decoding finds.
    ids = [ds.samples[k].id for k in ds.index]
    assert report["skipped"] == len(kinds) + 1 - 2
    assert {"corrupt_jpeg", "truncated"} < set(ids)
    assert "ok" in ids and not {"missing", "empty", "bomb", "long", "not_an_image"} & set(ids)
    exact = ds.lengths
    assert len(exact) == len(ds) < len(approx)
    ok = ds.samples[ds.index[ids.index("ok")]]
    assert exact[ids.index("ok")] == len(render(ok, tok, N).input_ids)
    # The two survivors are skipped when loaded, and the report then counts every bad input.
    for i in range(len(ds)):
        ds[i]
    assert ds.skip_report()["skipped"] == len(kinds) + 1


def test_too_long_carries_the_full_rendered_length(tmp_path, tok, images):
    """Every too_long skip knows the length render gives without max_length, so validate() need not
    render the sample again to report the longest one."""
    from qwenvl_lab.dataset.sample import Sample

    def sample(msgs, images=()):
        return Sample(id="s", messages=msgs, images=list(images), source=("d.jsonl", 1))

    long_q = {"role": "user", "content": "<image>" + " word" * 40}
    answer = {"role": "assistant", "content": "fine"}
    cases = [  # (sample, mode, system prompt, generation prompt)
        (sample([long_q, answer, {"role": "user", "content": "more?"}, answer], ["red.png"]), "chat", None, False),
        (sample([{"role": "user", "content": "hi"}, answer]), "chat", "be brief" + " please" * 40, False),
        (sample([long_q, {"role": "assistant", "content": "fine" * 40}], ["red.png"]), "plain", None, False),
        (sample([long_q, answer, {"role": "user", "content": "and?"}], ["red.png"]), "chat", None, True),
    ]
    for s, mode, system, gen in cases:
        full = len(render(s, tok, N, mode, None, system_prompt=system, add_generation_prompt=gen).input_ids)
        assert full > 20
        with pytest.raises(BadSampleError) as e:
            render(s, tok, N, mode, 20, system_prompt=system, add_generation_prompt=gen)
        assert e.value.kind == "too_long" and e.value.length == full, (mode, system, gen)
    # validate() records it for the no-usable-sample message.
    rec = {"id": "long", "images": ["red.png"], "messages": [long_q, answer]}
    path = td.write_jsonl(tmp_path / "long.jsonl", [rec])
    ds = _ds(path, tok, images, max_length=20)
    with pytest.raises(Exception, match="the longest sample has"):
        ds.validate()
    (skip,) = ds.skipped.values()
    assert skip["length"] == len(render(ds.samples[0], tok, N).input_ids)


def test_collator_right_and_left_padding(tok):
    items = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]),
         "pixel_values": torch.ones(2, 3, 4, 4), "n_images": 2, "id": "a", "skipped": []},
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "pixel_values": None, "n_images": 0,
         "id": "b", "skipped": [{"file": "f", "position": 1, "id": "x", "kind": "bad_image", "reason": "r"}]},
        {"input_ids": torch.tensor([9, 9]), "labels": torch.tensor([9, -100]),
         "pixel_values": torch.zeros(1, 3, 4, 4), "n_images": 1, "id": "c", "skipped": []},
    ]
    b = Collator(pad_id=0)(items)
    assert set(b) == {"input_ids", "attention_mask", "labels", "pixel_values", "image_counts"}
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 9, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100], [9, -100, -100]]
    assert b["pixel_values"].shape == (3, 3, 4, 4)
    assert b["pixel_values"][:2].eq(1).all() and b["pixel_values"][2].eq(0).all()  # sample order
    assert b["image_counts"].tolist() == [2, 0, 1]
    assert b.ids == ["a", "b", "c"] and len(b.skipped) == 1
    b2 = pickle.loads(pickle.dumps(b))  # what a DataLoader worker does
    assert b2.skipped == b.skipped and torch.equal(b2["input_ids"], b["input_ids"])

    left = Collator(pad_id=0, padding_side="left", pad_to_multiple_of=4)(items)
    assert left["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 9, 9]]
    assert left["labels"][1].tolist() == [IGNORE_INDEX] * 3 + [8]
    none = Collator(pad_id=0)([items[1]])
    assert none["pixel_values"] is None and none["image_counts"].tolist() == [0]


def test_dataloader_workers_bring_skips_back(tmp_path, tok, images):
    recs = [td.simple_record(i, image="red.png") for i in range(6)]
    recs[3]["images"] = ["gone.png"]
    path = td.write_jsonl(tmp_path / "d.jsonl", recs)
    ds = _ds(path, tok, images)
    dl = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=Collator(tok.pad_id))
    n, from_workers = 0, []
    for batch in dl:
        n += batch["input_ids"].shape[0]
        assert batch["pixel_values"].shape[0] == batch["image_counts"].sum()
        from_workers += batch.skipped
    assert n == 6
    assert ds.skip_report()["skipped"] == 0  # the skip happened in a worker, not here ...
    ds.absorb(from_workers)
    assert ds.skip_report()["by_kind"] == {"missing_file": 1}  # ... and reached the main process
    assert "gone.png" in ds.skip_report()["examples"][0]


def test_length_grouped_sampler():
    lengths = [(i * 37) % 101 + i / 1000 for i in range(40)]  # distinct lengths
    bs, world = 2, 2
    samplers = [LengthGroupedSampler(lengths, bs, world_size=world, rank=r, seed=1, megabatch_mult=10)
                for r in range(world)]
    per_rank = [list(s) for s in samplers]
    assert all(len(p) == len(s) == 20 for p, s in zip(per_rank, samplers, strict=True))
    assert sorted(per_rank[0] + per_rank[1]) == list(range(40))  # disjoint ranks, every index once
    assert list(samplers[0]) == per_rank[0]  # deterministic
    globals_ = samplers[0].global_batches()
    # One megabatch = the whole data: global batches are contiguous runs of the sorted lengths.
    for a in globals_:
        for b in globals_:
            if a is not b:
                la, lb = [lengths[i] for i in a], [lengths[i] for i in b]
                assert max(la) < min(lb) or max(lb) < min(la)
    assert max(lengths) in [lengths[i] for i in globals_[0]]  # the longest batch comes first
    for r in range(world):  # a rank's batch is its slice of the global batch
        assert per_rank[r][:bs] == globals_[0][r * bs:(r + 1) * bs]
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != per_rank[0]
    # Padding: 5 samples, 2 ranks x 2 -> 2 global batches, repeated indices fill the last one.
    small = [list(LengthGroupedSampler([1, 2, 3, 4, 5], 2, world_size=2, rank=r)) for r in range(2)]
    assert len(small[0]) == len(small[1]) == 4 and set(small[0] + small[1]) == {0, 1, 2, 3, 4}
    dropped = LengthGroupedSampler([1, 2, 3, 4, 5], 2, world_size=2, rank=0, drop_last=True)
    assert len(list(dropped)) == len(dropped) == 2


def test_dataset_lengths_feed_the_sampler(tmp_path, tok, images):
    recs = [td.simple_record(i, image="red.png" if i % 2 else None, turns=1 + i % 3) for i in range(8)]
    ds = _ds(td.write_jsonl(tmp_path / "d.jsonl", recs), tok, images)
    ds.validate()
    exact = [len(render(ds.samples[k], tok, N).input_ids) for k in ds.index]
    assert ds.lengths == exact
    dl = torch.utils.data.DataLoader(ds, batch_size=2, sampler=LengthGroupedSampler(ds.lengths, 2, seed=0),
                                     collate_fn=Collator(tok.pad_id))
    assert sum(b["input_ids"].shape[0] for b in dl) == 8
