"""Bad data end to end, and safe loading.

* A training run over the shapes data salted with one of each bad input finishes, and data_report.json
  lists exactly the salted samples, each with its reason.
* Nothing in the source tree passes `trust_remote_code`; every `torch.load` uses `weights_only=True`.
* Media paths stay inside the configured folder unless `allow_absolute_paths` (default False);
  `max_pixels` from the config reaches the image checks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests import tiny_data as td
from tests.tiny_train import make_tiny_data, tiny_train_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("shapes"))


def _salted(data: Path, tmp: Path) -> tuple[Path, dict[str, str]]:
    """16 good shapes samples + one of each bad input; returns (jsonl, salted id -> expected kind)."""
    good = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()][:16]
    td.write_bad_images(data / "bad")
    (tmp / "outside.png").parent.mkdir(parents=True, exist_ok=True)
    td.write_rgb(tmp / "outside.png")  # a real image, but outside the image folder

    def ask(sid, image, content="<image>\nWhat colour is the shape?"):
        rec = {"id": sid, "messages": [{"role": "user", "content": content},
                                       {"role": "assistant", "content": "red"}]}
        if image is not None:
            rec["images"] = image if isinstance(image, list) else [image]
        return rec

    ok_image = good[0]["images"][0]
    salted = {
        "missing": (ask("missing", "bad/missing.jpg"), "missing_file"),
        "empty": (ask("empty", "bad/empty.jpg"), "bad_image"),
        "corrupt": (ask("corrupt", "bad/corrupt.jpg"), "bad_image"),
        "truncated": (ask("truncated", "bad/truncated.jpg"), "bad_image"),
        "not_an_image": (ask("not_an_image", "bad/text.png"), "bad_image"),
        "bomb": (ask("bomb", "bad/bomb.png"), "too_large"),
        "escape": (ask("escape", "../" * 8 + str(tmp / "outside.png").lstrip("/")), "bad_path"),
        "absolute": (ask("absolute", str(tmp / "outside.png")), "bad_path"),
        "too_many_markers": (ask("too_many_markers", ok_image, "<image><image>"), "bad_record"),
        "too_few_markers": (ask("too_few_markers", [ok_image, ok_image]), "bad_record"),
        "empty_conv": ({"id": "empty_conv", "messages": []}, "bad_record"),
        "assistant_first": ({"id": "assistant_first", "messages": [{"role": "assistant", "content": "a"}]},
                            "bad_record"),
        "bad_role": ({"id": "bad_role", "messages": [{"role": "robot", "content": "a"}]}, "bad_record"),
        "too_long": (ask("too_long", ok_image, "<image>" + " word" * 300), "too_long"),
    }
    records = good[:8] + [r for r, _ in salted.values()] + good[8:]
    path = data / "salted.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + '{"id": "broken json"\n')  # and one line that is not JSON
    kinds = {k: kind for k, (_, kind) in salted.items()}
    return path, kinds


def test_salted_dataset_run_reports_exactly_the_salted_samples(tmp_path, data):
    from qwenvl_lab.trainer.run import train

    path, kinds = _salted(data, tmp_path / "elsewhere")
    # One whole epoch, so the images whose header reads fine but whose pixels are broken are met too.
    result = train(tiny_train_config(tmp_path, data, data_path=[str(path)], max_steps=-1, num_train_epochs=1,
                                     per_device_train_batch_size=6, save_steps=1000))
    report = json.loads((result.output_dir / "data_report.json").read_text())
    n_salted = len(kinds) + 1  # + the broken JSON line
    assert result.skipped == report["skipped"] == len(report["samples"]) == n_salted, report
    by_id = {r["id"]: r for r in report["samples"]}
    for sid, kind in kinds.items():
        assert by_id[sid]["kind"] == kind, (sid, by_id[sid])
        assert by_id[sid]["reason"] and "salted.jsonl" in by_id[sid]["reason"], by_id[sid]
    broken = [r for r in report["samples"] if r["kind"] == "bad_json"]
    assert len(broken) == 1 and broken[0]["reason"]
    assert sum(report["by_kind"].values()) == n_salted
    assert (result.output_dir / "final" / "model.safetensors").is_file()


def _source_files():
    skip = {".venv", "runs", "data", ".git", "__pycache__", "node_modules"}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT)
        if not skip & set(rel.parts) and p.name != Path(__file__).name:
            yield rel, p.read_text(encoding="utf-8", errors="replace")


def _call_text(text: str, open_paren: int) -> str:
    """The argument text of a call, from its "(" to the matching ")"."""
    depth = 0
    for i in range(open_paren, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_paren: i + 1]
    return text[open_paren:]


def test_no_remote_code_and_no_unsafe_torch_load():
    files = dict(_source_files())
    assert len(files) > 50 and Path("trainer/hf_trainer.py") in files  # the walk sees the tree
    offenders = [str(rel) for rel, text in files.items() if "trust_remote_code" in text]
    assert offenders == [], offenders
    for rel, text in files.items():
        for m in re.finditer(r"torch\.load\(", text):
            call = _call_text(text, m.end() - 1)
            assert "weights_only=True" in call, (str(rel), call)
        assert not re.search(r"\bpickle\.loads?\(", text) or rel.parts[0] == "tests", rel


def test_config_defaults_are_safe():
    from qwenvl_lab.model.train_config import TrainConfig

    cfg = TrainConfig()
    assert cfg.allow_absolute_paths is False
    from qwenvl_lab.dataset.images import MAX_PIXELS

    assert cfg.max_pixels == MAX_PIXELS


def test_paths_and_pixel_limit_come_from_the_config(tmp_path, data):
    from qwenvl_lab.trainer.run import build_datasets, build_model

    td.write_rgb(tmp_path / "outside.png", size=(32, 32))
    rows = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()][:4]
    rows[0] = dict(rows[0], images=[str(tmp_path / "outside.png")])
    path = tmp_path / "abs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    cfg = tiny_train_config(tmp_path, data, data_path=[str(path)])
    vlm = build_model(cfg)
    ds, _ = build_datasets(cfg, vlm)
    assert len(ds) == 3 and [r["kind"] for r in ds.skipped.values()] == ["bad_path"]

    ds, _ = build_datasets(tiny_train_config(tmp_path, data, data_path=[str(path)], allow_absolute_paths=True), vlm)
    assert len(ds) == 4 and not ds.skipped

    side = 32  # the shapes images are 32 x 32
    ds, _ = build_datasets(tiny_train_config(tmp_path, data, data_path=[str(data / "train.jsonl")],
                                             max_pixels=side * side), vlm)
    assert not ds.skipped
    with pytest.raises(ValueError, match="no usable sample.*too_large"):
        build_datasets(tiny_train_config(tmp_path, data, data_path=[str(data / "train.jsonl")],
                                         max_pixels=side * side - 1), vlm)


def _two_image_conversation(i: int, img: str) -> dict:
    """LLaMA-Factory's mllm_demo layout: an image in the first and in a later user turn."""
    return {"messages": [
        {"role": "user", "content": f"<image>Who is shape {i}?"}, {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "<image>And this one?"}, {"role": "assistant", "content": "A blue square."}],
        "images": [img, img]}


def test_truncation_of_multi_image_conversations_is_counted_and_reported(tmp_path, data):
    """Samples whose later turns (with their images) do not fit max_length lose them whole, and the run says
    so: data_report.json counts the samples, turns and images dropped, with examples."""
    from qwenvl_lab.trainer.run import train

    img = "images/train/000000.png"
    recs = [_two_image_conversation(i, img) for i in range(6)] + \
        [{"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}],
          "images": [img]}] * 2
    path = td.write_jsonl(tmp_path / "mllm_demo.jsonl", recs)
    cfg = tiny_train_config(tmp_path, data, data_path=[str(path)], max_steps=1, per_device_train_batch_size=2)
    vlm_tokens = 16  # the tiny tower's 4x4 grid: the first turn pair fits 64 tokens, both pairs do not
    cfg.max_length = 2 * vlm_tokens + 30
    result = train(cfg)
    report = json.loads((result.output_dir / "data_report.json").read_text())
    assert result.model.tokens_per_image == vlm_tokens
    assert (report["truncated_samples"], report["dropped_turns"], report["dropped_images"]) == (6, 12, 6)
    assert report["skipped"] == 0  # shortened, not skipped
    ex = report["truncated_examples"][0]
    assert ex["file"] == str(path) and ex["dropped_images"] == 1 and ex["kept_tokens"] <= cfg.max_length
    assert "shortened to max_length" in (result.output_dir / "train.log").read_text()
