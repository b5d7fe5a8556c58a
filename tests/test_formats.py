"""dataset/formats.py: reading JSON / JSONL and normalising every record format to one Sample."""

import json
import os

import pytest
import tiny_data as td
from qwenvl_lab.dataset.formats import DataFileError, normalize, read_records
from qwenvl_lab.dataset.sample import BadSampleError


@pytest.mark.parametrize("fmt", sorted(td.records_in_every_format()))
def test_every_format_gives_the_same_sample(tmp_path, fmt):
    rec = td.records_in_every_format()[fmt]
    s = normalize(rec, 3, str(tmp_path / "d.jsonl"), image_folder=str(tmp_path / "img"))
    assert s.id == "s1"
    assert s.messages == td.EXPECTED_MESSAGES
    assert s.images == [str(tmp_path / "img" / "a.png"), str(tmp_path / "img" / "b.png")]
    assert s.videos == []
    assert s.source == (str(tmp_path / "d.jsonl"), 3)


def test_json_list_and_jsonl_read_the_same(tmp_path):
    recs = [td.simple_record(i) for i in range(3)]
    a = read_records(td.write_json(tmp_path / "d.json", recs))
    b = read_records(td.write_jsonl(tmp_path / "d.jsonl", recs))
    assert [r for _, r in a] == [r for _, r in b] == recs
    assert [p for p, _ in a] == [0, 1, 2]  # list index
    assert [p for p, _ in b] == [1, 2, 3]  # line number


def test_invalid_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(td.simple_record(0)) + "\n" + '{"id": "x", "messages": [\n' +
                 json.dumps(td.simple_record(2)) + "\n")
    with pytest.raises(DataFileError, match=r"bad\.jsonl line 2"):
        read_records(p)
    bad = []
    recs = read_records(p, bad)  # collecting mode: the good lines survive
    assert [pos for pos, _ in recs] == [1, 3]
    assert len(bad) == 1 and bad[0][0] == 2 and "bad.jsonl line 2" in str(bad[0][1])


def test_non_utf8_file_names_the_file(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(json.dumps({"id": "é"}).encode("ascii") + b"\n" + '{"id": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(DataFileError, match=r"latin1\.jsonl: not UTF-8.*line 2"):
        read_records(p)


def _msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


BAD_RECORDS = {
    "too_many_markers": ({"id": "m1", "images": ["a.png"],
                          "messages": _msgs(("user", "<image><image> hi"), ("assistant", "x"))},
                         r"2 <image> marker\(s\) in the text but 1 image"),
    "too_few_markers": ({"id": "m2", "images": ["a.png", "b.png"],
                         "messages": _msgs(("user", "<image> hi"), ("assistant", "x"))},
                        r"1 <image> marker\(s\) in the text but 2 image"),
    "llava_too_few_markers": ({"id": "m3", "image": ["a.png", "b.png"],
                               "conversations": [{"from": "human", "value": "<image> hi"},
                                                 {"from": "gpt", "value": "x"}]},
                              r"1 <image> marker\(s\) in the text but 2 image"),
    "video_mismatch": ({"id": "v1", "videos": ["a.mp4"],
                        "messages": _msgs(("user", "hi"), ("assistant", "x"))},
                       r"0 <video> marker\(s\) in the text but 1 video"),
    "empty_conversation": ({"id": "e1", "messages": []}, "empty conversation"),
    "only_system": ({"id": "e2", "messages": _msgs(("system", "s"))}, "empty conversation"),
    "assistant_first": ({"id": "a1", "messages": _msgs(("assistant", "x"), ("user", "y"))},
                        "starts with 'assistant'"),
    "assistant_first_after_system": ({"id": "a2", "conversations": [
        {"from": "system", "value": "s"}, {"from": "gpt", "value": "x"}]}, "starts with 'assistant'"),
    "unknown_role": ({"id": "r1", "messages": _msgs(("user", "q"), ("bot", "a"))}, "unknown role 'bot'"),
    "non_string_content": ({"id": "c1", "messages": [{"role": "user", "content": 5},
                                                      {"role": "assistant", "content": "a"}]},
                           "content must be a string"),
    "null_value": ({"id": "c2", "conversations": [{"from": "human", "value": None},
                                                  {"from": "gpt", "value": "a"}]},
                   "content must be a string"),
    "missing_conversations": ({"id": "f1", "image": "a.png"}, "missing field 'conversations'"),
    "missing_role": ({"id": "f2", "messages": [{"content": "q"}]}, "missing 'role'"),
    "missing_value": ({"id": "f3", "conversations": [{"from": "human"}]}, "missing 'content' / 'value'"),
    "two_user_turns": ({"id": "t1", "messages": _msgs(("user", "q"), ("user", "q2"), ("assistant", "a"))},
                       "two user turns"),
    "bad_image_field": ({"id": "i1", "images": [3],
                         "messages": _msgs(("user", "<image>"), ("assistant", "a"))},
                        "'images' must be a path or a list of paths"),
    "remote_url": ({"id": "u1", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
        {"role": "assistant", "content": "a"}]}, "remote / inline media"),
    "unknown_block": ({"id": "b1", "messages": [
        {"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]},
        {"role": "assistant", "content": "a"}]}, "unknown type 'audio'"),
    "inline_and_field": ({"id": "q1", "images": ["a.png"], "conversations": [
        {"from": "user", "value": "<img>b.png</img> q"}, {"from": "assistant", "value": "a"}]},
        "both in the text"),
    "not_an_object": (["a", "b"], "must be a JSON object"),
}


@pytest.mark.parametrize("name", sorted(BAD_RECORDS))
def test_bad_records_raise_naming_file_index_and_id(tmp_path, name):
    rec, pattern = BAD_RECORDS[name]
    src = str(tmp_path / "data.jsonl")
    with pytest.raises(BadSampleError, match=pattern) as ei:
        normalize(rec, 7, src, image_folder=str(tmp_path))
    msg = str(ei.value)
    assert f"{src} line 7" in msg
    if isinstance(rec, dict):
        assert f"id {rec['id']!r}" in msg


def test_llava_without_marker_puts_images_first(tmp_path):
    rec = {"id": "p", "image": ["a.png", "b.png"],
           "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Two."},
                             {"from": "human", "value": "More?"}, {"from": "gpt", "value": "No."}]}
    s = normalize(rec, 0, str(tmp_path / "d.json"), image_folder=str(tmp_path))
    assert s.messages[0] == {"role": "user", "content": "<image>\n<image>\nDescribe."}
    assert s.messages[2]["content"] == "More?"
    # The LLaMA-Factory shape does not guess: a missing marker is an error there.
    rec2 = {"id": "p2", "images": ["a.png"], "messages": _msgs(("user", "Describe."), ("assistant", "x"))}
    with pytest.raises(BadSampleError, match="0 <image> marker"):
        normalize(rec2, 0, str(tmp_path / "d.json"), image_folder=str(tmp_path))


def test_lmms_finetune_video_and_openai_video_blocks(tmp_path):
    a = normalize({"id": "v", "system_prompt": "S", "video": "clip.mp4",
                   "conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                     {"from": "gpt", "value": "A dog runs."}]},
                  0, "x.jsonl", video_folder=str(tmp_path))
    b = normalize({"id": "v", "messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "video", "video": "clip.mp4"},
                                     {"type": "text", "text": "\nWhat happens?"}]},
        {"role": "assistant", "content": "A dog runs."}]}, 0, "x.jsonl", video_folder=str(tmp_path))
    for s in (a, b):
        assert s.videos == [str(tmp_path / "clip.mp4")] and s.images == []
        assert s.messages[0] == {"role": "system", "content": "S"}
        assert s.messages[1]["content"] == "<video>\nWhat happens?"


def test_qwen_vl_several_inline_images_keep_order(tmp_path):
    rec = {"conversations": [
        {"from": "user", "value": "Picture 1: <img>x/1.jpg</img>\nPicture 2: <img>2.jpg</img>\nSame?"},
        {"from": "assistant", "value": "No."}]}
    s = normalize(rec, 4, str(tmp_path / "q.json"), image_folder=str(tmp_path))
    assert s.messages[0]["content"] == "<image>\n<image>\nSame?"
    assert s.images == [str(tmp_path / "x" / "1.jpg"), str(tmp_path / "2.jpg")]
    assert s.id == "q.json#4"  # no id field: file name + position


def test_paths_outside_the_folder_are_refused(tmp_path):
    folder = tmp_path / "imgs"
    def rec(path):
        return {"id": "z", "images": [path], "messages": _msgs(("user", "<image>"), ("assistant", "a"))}
    with pytest.raises(BadSampleError, match="outside the media folder"):
        normalize(rec("../secret.png"), 0, "d.jsonl", image_folder=str(folder))
    with pytest.raises(BadSampleError, match="outside the media folder"):
        normalize(rec("/etc/passwd"), 0, "d.jsonl", image_folder=str(folder))
    ok = normalize(rec("/etc/passwd"), 0, "d.jsonl", image_folder=str(folder), allow_absolute_paths=True)
    assert ok.images == ["/etc/passwd"]
    inside = normalize(rec(str(folder / "sub" / "a.png")), 0, "d.jsonl", image_folder=str(folder))
    assert inside.images == [str(folder / "sub" / "a.png")]


def test_relative_paths_default_to_the_data_files_folder(tmp_path):
    p = td.write_jsonl(tmp_path / "d.jsonl", [td.simple_record(0, image="pics/a.png")])
    (pos, rec), = read_records(p)
    s = normalize(rec, pos, str(p))
    assert s.images == [os.path.join(str(tmp_path), "pics", "a.png")]
