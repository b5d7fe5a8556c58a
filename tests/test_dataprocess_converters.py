"""Converters: each runs on a small fixture in its source format and writes the expected JSONL."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from qwenvl_lab.dataprocess import ai_challenger, coco_captions, image_map, llava_instruct
from qwenvl_lab.dataprocess.common import BRIEF_PROMPTS_EN, BRIEF_PROMPTS_ZH, read_json, read_text

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"id", "messages", "images", "videos"}


def read_jsonl(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def check_schema(sample: dict) -> None:
    """Our JSONL contract, checked independently of the converters' own asserts."""
    assert set(sample) >= KEYS
    assert isinstance(sample["id"], str) and sample["id"]
    assert sample["videos"] == []
    for m in sample["messages"]:
        assert set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant")
        assert isinstance(m["content"], str)
    assert sum(m["content"].count("<image>") for m in sample["messages"]) == len(sample["images"])


# ---------------------------------------------------------------- COCO


COCO = {
    "info": {},
    "images": [{"id": 9, "file_name": "000000000009.jpg"}, {"id": 25, "file_name": "000000000025.jpg"}],
    "annotations": [
        {"id": 1, "image_id": 9, "caption": "A plate of food\n on a table. "},
        {"id": 2, "image_id": 25, "caption": "A giraffe eating leaves."},
        {"id": 3, "image_id": 9, "caption": "Broccoli and rice in a bowl."},
        {"id": 4, "image_id": 77, "caption": "Refers to a missing image."},
        {"id": 5, "image_id": 25, "caption": "   "},
    ],
}


def test_coco_one_per_caption():
    res = coco_captions.convert_coco(COCO, image_prefix="coco/train2017/")
    assert [s["id"] for s in res.samples] == ["coco_9_1", "coco_25_2", "coco_9_3"]
    first = res.samples[0]
    check_schema(first)
    assert first["images"] == ["coco/train2017/000000000009.jpg"]
    user, assistant = first["messages"]
    assert user["role"] == "user" and assistant["role"] == "assistant"
    assert user["content"].startswith("<image>\n")
    assert user["content"][len("<image>\n"):] in BRIEF_PROMPTS_EN
    assert assistant["content"] == "A plate of food on a table."  # whitespace collapsed, ends stripped
    assert sorted(r.split(":")[0] for _, r in res.skipped) == ["empty caption", "unknown image_id"]


def test_coco_one_per_image_and_prompt_determinism():
    res = coco_captions.convert_coco(COCO, one_per_image=True)
    assert [(s["id"], s["messages"][1]["content"]) for s in res.samples] == [
        ("coco_9", "A plate of food on a table."), ("coco_25", "A giraffe eating leaves.")]
    assert res.samples[0]["images"] == ["000000000009.jpg"]
    # the prompt depends on (seed, id) only: the same under a reordered file, stable across calls
    shuffled = dict(COCO, annotations=COCO["annotations"][::-1])
    a = {s["id"]: s["messages"][0]["content"] for s in coco_captions.convert_coco(COCO).samples}
    b = {s["id"]: s["messages"][0]["content"] for s in coco_captions.convert_coco(shuffled).samples}
    assert a == b
    # over many ids several prompts are used, and another seed changes some choices
    many = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(60)],
            "annotations": [{"id": i, "image_id": i, "caption": "x"} for i in range(60)]}
    p0 = [s["messages"][0]["content"] for s in coco_captions.convert_coco(many, seed=0).samples]
    p1 = [s["messages"][0]["content"] for s in coco_captions.convert_coco(many, seed=1).samples]
    assert len(set(p0)) >= 3 and p0 != p1


def test_coco_bad_structure_names_file():
    with pytest.raises(ValueError, match="caps.json"):
        coco_captions.convert_coco({"images": []}, source="caps.json")
    with pytest.raises(ValueError, match=r"annotations\[0\]"):
        coco_captions.convert_coco({"images": [], "annotations": [{"caption": "x"}]})


def test_coco_cli(tmp_path):
    src, out = tmp_path / "captions_train2017.json", tmp_path / "out" / "coco.jsonl"
    src.write_text(json.dumps(COCO), encoding="utf-8")
    assert coco_captions.main([str(src), str(out), "--image-prefix", "coco/train2017"]) == 0
    rows = read_jsonl(out)
    assert len(rows) == 3 and rows[1]["images"] == ["coco/train2017/000000000025.jpg"]
    for r in rows:
        check_schema(r)


# ---------------------------------------------------------------- LLaVA

LLAVA = [
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
        {"from": "gpt", "value": "The bus in the image is white and red."},
        {"from": "human", "value": "What feature can be seen on the back of the bus?"},
        {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
    {"id": "gqa1", "image": "gqa/images/2354786.jpg", "conversations": [
        {"from": "human", "value": "Is the sky dark?\n<image>"}, {"from": "gpt", "value": "Yes"}]},
    {"id": "text1", "conversations": [
        {"from": "human", "value": "Tell me a joke."}, {"from": "gpt", "value": "No."}]},
    {"id": "two_markers", "image": "ocr_vqa/images/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWho wrote this book?"}, {"from": "gpt", "value": "X"}]},
    {"id": "no_marker", "image": "ocr_vqa/images/2.jpg", "conversations": [
        {"from": "human", "value": "Who wrote this book?"}, {"from": "gpt", "value": "Y"}]},
    {"id": "empty", "image": "a.jpg", "conversations": []},
    {"id": "gpt_first", "conversations": [{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "?"}]},
    {"id": "bad_role", "conversations": [{"from": "bot", "value": "Hi"}]},
    {"id": "bad_value", "conversations": [{"from": "human", "value": ["x"]}, {"from": "gpt", "value": "y"}]},
    {"id": "gqa1", "image": "gqa/images/9.jpg", "conversations": [
        {"from": "system", "value": "Answer briefly."},
        {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red"}]},
]


def test_llava_convert_and_skips():
    res = llava_instruct.convert_llava(LLAVA)
    by_id = {s["id"]: s for s in res.samples}
    assert list(by_id) == ["000000033471", "gqa1", "text1", "gqa1#1"]
    for s in res.samples:
        check_schema(s)
    bus = by_id["000000033471"]
    assert [m["role"] for m in bus["messages"]] == ["user", "assistant", "user", "assistant"]
    assert bus["messages"][0]["content"] == LLAVA[0]["conversations"][0]["value"]  # marker kept in place
    assert bus["images"] == ["coco/train2017/000000033471.jpg"]
    assert by_id["gqa1"]["messages"][0]["content"] == "Is the sky dark?\n<image>"  # trailing marker stays
    assert by_id["text1"]["images"] == [] and by_id["text1"]["messages"][0]["content"] == "Tell me a joke."
    assert by_id["gqa1#1"]["messages"][0] == {"role": "system", "content": "Answer briefly."}
    reasons = {sid: r for sid, r in res.skipped}
    assert set(reasons) == {"two_markers", "no_marker", "empty", "gpt_first", "bad_role", "bad_value"}
    assert reasons["two_markers"].startswith("image count mismatch: 2")
    assert reasons["no_marker"].startswith("image count mismatch: 0")
    assert reasons["empty"] == "empty conversation"
    assert reasons["gpt_first"] == "assistant-first conversation"
    assert reasons["bad_role"].startswith("unknown role")
    assert reasons["bad_value"].startswith("non-string content")


def test_llava_prefix_and_image_root(tmp_path):
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    (tmp_path / "coco" / "train2017" / "000000033471.jpg").write_bytes(b"x")
    res = llava_instruct.convert_llava(LLAVA[:3], image_root=str(tmp_path))
    assert [s["id"] for s in res.samples] == ["000000033471", "text1"]
    assert res.skipped == [("gqa1", "missing image: gqa/images/2354786.jpg")]
    res = llava_instruct.convert_llava(LLAVA[1:2], image_prefix="data/")
    assert res.samples[0]["images"] == ["data/gqa/images/2354786.jpg"]
    with pytest.raises(ValueError, match="mix.json"):
        llava_instruct.convert_llava({"not": "a list"}, source="mix.json")


def test_llava_cli_reports_skips(tmp_path, capsys):
    src, out = tmp_path / "llava_v1_5_mix665k.json", tmp_path / "mix.jsonl"
    src.write_text(json.dumps(LLAVA), encoding="utf-8")
    assert llava_instruct.main([str(src), str(out)]) == 0
    assert len(read_jsonl(out)) == 4
    printed = capsys.readouterr().out
    assert "skipped 6 records" in printed and "image count mismatch x2" in printed


# ---------------------------------------------------------------- AI Challenger

AIC = [
    {"url": "http://x", "image_id": "8f00f3d0f1008e085ab660e70dffced16a8259f6.jpg", "caption": [
        "两个衣着休闲的人在平整的道路上交谈",
        "一个穿着红色上衣的男人和一个穿着灰色裤子的男人站在室外的道路上交谈\n",
        "室外的公园里有两个穿着长裤的男人在交流",
        "街道上有一个穿着 深色外套的男人和一个穿着红色外套的男人在交谈",
        "  "]},
    {"image_id": "b96ff46ea2d2e8b7e0d5f2a1c3.jpg", "caption": ["一只 狗\r\n在草地上奔跑"]},
]


def test_ai_challenger_convert():
    res = ai_challenger.convert_ai_challenger(AIC, image_prefix="aic/train")
    assert len(res.samples) == 5
    assert res.skipped == [("aic_8f00f3d0f1008e085ab660e70dffced16a8259f6_4", "empty caption: record 0 caption 4")]
    s = res.samples[1]
    check_schema(s)
    assert s["id"] == "aic_8f00f3d0f1008e085ab660e70dffced16a8259f6_1"
    assert s["images"] == ["aic/train/8f00f3d0f1008e085ab660e70dffced16a8259f6.jpg"]
    assert s["messages"][1]["content"] == "一个穿着红色上衣的男人和一个穿着灰色裤子的男人站在室外的道路上交谈"
    assert res.samples[3]["messages"][1]["content"] == "街道上有一个穿着深色外套的男人和一个穿着红色外套的男人在交谈"
    assert res.samples[4]["messages"][1]["content"] == "一只狗在草地上奔跑"
    for s in res.samples:
        assert s["messages"][0]["content"].startswith("<image>\n")
        assert s["messages"][0]["content"][len("<image>\n"):] in BRIEF_PROMPTS_ZH
    one = ai_challenger.convert_ai_challenger(AIC, one_per_image=True)
    assert [s["id"] for s in one.samples] == ["aic_8f00f3d0f1008e085ab660e70dffced16a8259f6_0",
                                              "aic_b96ff46ea2d2e8b7e0d5f2a1c3_0"]
    with pytest.raises(ValueError, match="record 0"):
        ai_challenger.convert_ai_challenger([{"caption": ["x"]}])


def test_ai_challenger_cli_keeps_chinese_unescaped(tmp_path):
    src, out = tmp_path / "caption_train_annotations_20170902.json", tmp_path / "aic.jsonl"
    src.write_text(json.dumps(AIC, ensure_ascii=True), encoding="utf-8")
    assert ai_challenger.main([str(src), str(out), "--one-per-image"]) == 0
    raw = out.read_text(encoding="utf-8")
    assert "两个衣着休闲的人" in raw and "\\u" not in raw  # ensure_ascii=False
    assert len(read_jsonl(out)) == 2


# ---------------------------------------------------------------- image_map + captions


def test_image_map_json_and_tsv_agree(tmp_path):
    (tmp_path / "map.json").write_text(json.dumps({"1": "a.jpg", "2": "sub/b.png", "3": "c.jpg"}), "utf-8")
    (tmp_path / "map.tsv").write_text("# id\tfile\n1\ta.jpg\n\n2\tsub/b.png\n3\tc.jpg\n", "utf-8")
    (tmp_path / "caps.json").write_text(
        json.dumps({"1": "A cat.", "2": ["A dog.", "A  brown\ndog."], "9": "orphan"}), "utf-8")
    (tmp_path / "caps.tsv").write_text("1\tA cat.\n2\tA dog.\n2\tA  brown dog.\n9\torphan\n", "utf-8")
    results = []
    for m in ("map.json", "map.tsv"):
        for c in ("caps.json", "caps.tsv"):
            imap = image_map.parse_image_map(read_text(tmp_path / m), m)
            caps = image_map.parse_captions(read_text(tmp_path / c), c)
            res, n_unc = image_map.convert_image_map(imap, caps, image_prefix="imgs")
            results.append(res.samples)
            assert n_unc == 1  # "3" has no caption
            assert res.skipped == [("9_0", "no image: id '9' is not in the image_map")]
    assert all(r == results[0] for r in results)
    samples = results[0]
    assert [s["id"] for s in samples] == ["1_0", "2_0", "2_1"]
    assert [s["images"] for s in samples] == [["imgs/a.jpg"], ["imgs/sub/b.png"], ["imgs/sub/b.png"]]
    assert samples[2]["messages"][1]["content"] == "A brown dog."
    for s in samples:
        check_schema(s)
        assert s["messages"][0]["content"][len("<image>\n"):] in BRIEF_PROMPTS_EN


def test_image_map_errors_and_zh(tmp_path):
    with pytest.raises(ValueError, match=r"map.tsv: line 2 has no tab"):
        image_map.parse_image_map("1\ta.jpg\n2 b.jpg\n", "map.tsv")
    with pytest.raises(ValueError, match="appears twice"):
        image_map.parse_image_map("1\ta.jpg\n1\tb.jpg\n", "map.tsv")
    with pytest.raises(ValueError, match=r"caps.json: invalid JSON at line 1"):
        image_map.parse_captions('{"1": ', "caps.json")
    with pytest.raises(ValueError, match="list of strings"):
        image_map.parse_captions('{"1": 5}', "caps.json")
    (tmp_path / "bad.tsv").write_bytes("1\tété\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"bad.tsv: not valid UTF-8"):
        read_text(tmp_path / "bad.tsv")
    (tmp_path / "m.tsv").write_text("1\ta.jpg\n", "utf-8")
    (tmp_path / "c.tsv").write_text("1\t一只猫。\n", "utf-8")
    out = tmp_path / "o.jsonl"
    assert image_map.main([str(tmp_path / "m.tsv"), str(tmp_path / "c.tsv"), str(out), "--lang", "zh"]) == 0
    (row,) = read_jsonl(out)
    assert row["messages"][0]["content"][len("<image>\n"):] in BRIEF_PROMPTS_ZH
    assert row["messages"][1]["content"] == "一只猫。"


def test_read_json_error_names_file_and_line(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[\n {"id": 1},\n {"id": }\n]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken.json: invalid JSON at line 3"):
        read_json(p)


@pytest.mark.parametrize("name", ["coco_captions", "llava_instruct", "ai_challenger", "image_map",
                                  "process_image", "make_shapes"])
def test_help_runs_as_module(name):
    r = subprocess.run([sys.executable, "-m", f"qwenvl_lab.dataprocess.{name}", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"dataprocess.{name}" in r.stdout


def test_outputs_read_back_by_dataset_reader(tmp_path):
    """Every converter's JSONL (and the shapes set) normalises through dataset/ without an error."""
    formats = pytest.importorskip("qwenvl_lab.dataset.formats")
    if not hasattr(formats, "normalize") or not hasattr(formats, "read_records"):
        pytest.skip("dataset.formats has no normalize/read_records yet")
    from qwenvl_lab.dataprocess import make_shapes

    (tmp_path / "coco.json").write_text(json.dumps(COCO), encoding="utf-8")
    (tmp_path / "llava.json").write_text(json.dumps(LLAVA), encoding="utf-8")
    (tmp_path / "aic.json").write_text(json.dumps(AIC), encoding="utf-8")
    coco_captions.main([str(tmp_path / "coco.json"), str(tmp_path / "coco.jsonl")])
    llava_instruct.main([str(tmp_path / "llava.json"), str(tmp_path / "llava.jsonl")])
    ai_challenger.main([str(tmp_path / "aic.json"), str(tmp_path / "aic.jsonl")])
    make_shapes.make_shapes(tmp_path / "shapes", n_train=10, n_val=0)
    for path in ("coco.jsonl", "llava.jsonl", "aic.jsonl", "shapes/train.jsonl"):
        ours = read_jsonl(tmp_path / path)
        records = formats.read_records(str(tmp_path / path))
        assert len(records) == len(ours) > 0
        for (pos, rec), row in zip(records, ours):
            sample = formats.normalize(rec, pos, str(tmp_path / path), image_folder=str(tmp_path))
            assert sample.id == row["id"]
            assert [m["role"] for m in sample.messages] == [m["role"] for m in row["messages"]]
            assert len(sample.images) == len(row["images"])
            assert [p.endswith(r) for p, r in zip(sample.images, row["images"])] == [True] * len(row["images"])


def test_make_vocab_reads_jsonl_and_json_lists_alike(tmp_path):
    from qwenvl_lab.dataprocess.make_vocab import _texts_from_jsonl
    from qwenvl_lab.dataset.formats import DataFileError

    recs = [{"messages": [{"role": "user", "content": "<image>\nwhat?"}, {"role": "assistant", "content": "red"}]},
            {"messages": [{"role": "user", "content": "<video> and?"}, {"role": "assistant", "content": "blue"}]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps(recs), encoding="utf-8")
    texts = _texts_from_jsonl(tmp_path / "d.jsonl")
    assert texts == [" \nwhat?", "red", "  and?", "blue"]
    assert _texts_from_jsonl(tmp_path / "d.json") == texts
    (tmp_path / "bad.jsonl").write_text(json.dumps(recs[0]) + "\n{broken\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"bad\.jsonl line 2: invalid JSON"):
        _texts_from_jsonl(tmp_path / "bad.jsonl")
