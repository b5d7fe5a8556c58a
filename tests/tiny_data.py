"""Builders for tiny test data: image files (good and bad), a tiny video, and one conversation written
in every supported record format.

Everything is written under a caller-given directory (a pytest `tmp_path`) and takes milliseconds.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# -------------------------------------------------------------------------------------------- images


def write_rgb(path: Path, size=(8, 6), color=(200, 30, 10), fmt=None) -> Path:
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def write_bad_images(d: Path) -> dict[str, Path]:
    """Files that must each raise `BadSampleError`; name -> path."""
    d.mkdir(parents=True, exist_ok=True)
    good = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(good, format="JPEG")
    jpeg = good.getvalue()
    out = {
        "missing": d / "missing.jpg",
        "empty": d / "empty.jpg",
        "corrupt_jpeg": d / "corrupt.jpg",
        "truncated": d / "truncated.jpg",
        "not_an_image": d / "text.png",
        "bomb": d / "bomb.png",
    }
    out["empty"].write_bytes(b"")
    # Valid JPEG headers, then a start-of-scan followed by garbage: the header reads, decoding fails.
    sos = jpeg.find(b"\xff\xda")
    out["corrupt_jpeg"].write_bytes(jpeg[:sos] + b"\xff\xda" + bytes(range(256)) * 2)
    # Truncated inside the pixel data (a noisy image, so the entropy-coded data dominates the file).
    noisy = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(noisy, "JPEG")
    out["truncated"].write_bytes(noisy.getvalue()[: len(noisy.getvalue()) * 2 // 3])
    out["not_an_image"].write_text("hello, not a png")
    write_png_header_only(out["bomb"], 30000, 30000)
    return out


def write_png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny valid PNG whose IHDR claims `width` x `height` (CRC patched): a cheap decompression bomb."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    # PNG: 8-byte signature, then IHDR chunk = length(4) "IHDR"(4) data(13) crc(4); width/height first.
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def write_mode_images(d: Path) -> dict[str, tuple[Path, tuple[int, int, int]]]:
    """One 4x4 image per PIL mode, filled so the expected RGB pixel is known: name -> (path, rgb)."""
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    # RGBA fully transparent -> white; half-transparent red over white -> (255, 127/128, 127/128).
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(d / "rgba_clear.png")
    out["rgba_clear"] = (d / "rgba_clear.png", (255, 255, 255))
    Image.new("RGBA", (4, 4), (0, 0, 255, 255)).save(d / "rgba_opaque.png")
    out["rgba_opaque"] = (d / "rgba_opaque.png", (0, 0, 255))
    Image.new("LA", (4, 4), (0, 0)).save(d / "la_clear.png")
    out["la_clear"] = (d / "la_clear.png", (255, 255, 255))
    # P with a transparent palette index 0 and an opaque green at index 1.
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    p.save(d / "p_transparent.png", transparency=0)
    out["p_transparent"] = (d / "p_transparent.png", (255, 255, 255))
    p2 = Image.new("P", (4, 4), 1)
    p2.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    p2.save(d / "p_green.png")
    out["p_green"] = (d / "p_green.png", (0, 255, 0))
    Image.new("L", (4, 4), 77).save(d / "l.png")
    out["l"] = (d / "l.png", (77, 77, 77))
    Image.new("1", (4, 4), 1).save(d / "one.png")
    out["one"] = (d / "one.png", (255, 255, 255))
    # 16-bit grayscale: 65535 is full white; 257 * 100 maps to exactly 100.
    arr = np.full((4, 4), 257 * 100, dtype=np.uint16)
    Image.fromarray(arr).save(d / "i16.png")
    out["i16"] = (d / "i16.png", (100, 100, 100))
    # CMYK all-zero ink is white.
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(d / "cmyk.jpg", quality=100)
    out["cmyk"] = (d / "cmyk.jpg", (255, 255, 255))
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(d / "cmyk.tiff")
    out["cmyk_tiff"] = (d / "cmyk.tiff", (255, 255, 255))
    return out


def write_exif_rotated(path: Path, size=(6, 2), orientation: int = 6) -> Path:
    """A 6x2 (wide) JPEG whose EXIF Orientation=6 says 'rotate 90° clockwise to display' -> 2x6 (or `size`
    and `orientation` given; a .png path writes the eXIf chunk before the image data, as PIL does)."""
    img = Image.new("RGB", size, (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif.tobytes())
    return path


def write_video(path: Path, n_frames: int = 10, size=(32, 32)) -> Path:
    """An mpeg4 video whose frame i is uniformly gray level 20 * i (so a frame's index is readable)."""
    import av

    with av.open(str(path), mode="w") as c:
        s = c.add_stream("mpeg4", rate=5)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(n_frames):
            arr = np.full((size[1], size[0], 3), 20 * i, dtype=np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


# ------------------------------------------------------------------------------------- record formats
# One two-turn conversation with a system prompt and two images (the first inside turn 1, the second in
# turn 2), written in every supported format. Each must normalise to EXPECTED_MESSAGES + ["a.png", "b.png"].
SYSTEM = "Be brief."
Q1, A1, Q2, A2 = "What is this?", "A red square.", "And this one?", "A blue one."
EXPECTED_MESSAGES = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "<image>\n" + Q1},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": "Compare <image>\n" + Q2},
    {"role": "assistant", "content": A2},
]


def records_in_every_format() -> dict[str, dict]:
    """name -> a record of that format holding the conversation above (images a.png, b.png)."""
    return {
        "llava": {
            "id": "s1", "image": ["a.png", "b.png"],
            "conversations": [
                {"from": "system", "value": SYSTEM},
                {"from": "human", "value": "<image>\n" + Q1}, {"from": "gpt", "value": A1},
                {"from": "human", "value": "Compare <image>\n" + Q2}, {"from": "gpt", "value": A2},
            ],
        },
        "lmms_finetune": {
            "id": "s1", "system_prompt": SYSTEM, "image": ["a.png", "b.png"],
            "conversations": [
                {"from": "human", "value": "<image>\n" + Q1}, {"from": "gpt", "value": A1},
                {"from": "human", "value": "Compare <image>\n" + Q2}, {"from": "gpt", "value": A2},
            ],
        },
        "llama_factory": {
            "id": "s1", "images": ["a.png", "b.png"],
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": "<image>\n" + Q1}, {"role": "assistant", "content": A1},
                {"role": "user", "content": "Compare <image>\n" + Q2}, {"role": "assistant", "content": A2},
            ],
        },
        "ms_swift": {
            "id": "s1", "system": SYSTEM, "images": ["a.png", "b.png"],
            "messages": [
                {"role": "user", "content": "<image>\n" + Q1}, {"role": "assistant", "content": A1},
                {"role": "user", "content": "Compare <image>\n" + Q2}, {"role": "assistant", "content": A2},
            ],
        },
        "openai": {
            "id": "s1",
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "a.png"}},
                    {"type": "text", "text": "\n" + Q1}]},
                {"role": "assistant", "content": [{"type": "text", "text": A1}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "Compare "}, {"type": "image", "image": "b.png"},
                    {"type": "text", "text": "\n" + Q2}]},
                {"role": "assistant", "content": A2},
            ],
        },
        "qwen_vl": {
            "id": "s1",
            "conversations": [
                {"from": "system", "value": SYSTEM},
                {"from": "user", "value": "Picture 1: <img>a.png</img>\n" + Q1},
                {"from": "assistant", "value": A1},
                {"from": "user", "value": "Compare <img>b.png</img>\n" + Q2},
                {"from": "assistant", "value": A2},
            ],
        },
    }


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def simple_record(i: int, image: str | None = "a.png", turns: int = 1, answer: str = "yes") -> dict:
    """Our own JSONL shape: `turns` (user, assistant) pairs, one image in the first user turn."""
    msgs = []
    for t in range(turns):
        q = ("<image>\n" if (image and t == 0) else "") + f"question {i}.{t}?"
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": f"{answer} {i}.{t}"}]
    rec = {"id": f"r{i}", "messages": msgs}
    if image:
        rec["images"] = [image]
    return rec


# ------------------------------------------------------------------------------ tokenizer / processor
def tiny_tokenizer(d: Path):
    """The tiny Qwen-1 vocabulary (tests/tiny_qwen.py) loaded through `qwen.load_tokenizer`."""
    from qwenvl_lab.qwen.tokenizer import load_tokenizer
    from tiny_qwen import write_tiny_vocab

    write_tiny_vocab(d)
    return load_tokenizer(d)


def tiny_processor(size: int = 8):
    """list[PIL RGB] -> FloatTensor [N, 3, size, size] in [0, 1] (a stand-in for a tower's processor)."""
    import torch

    def process(images):
        arrs = [np.asarray(im.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0 for im in images]
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W]

    return process
