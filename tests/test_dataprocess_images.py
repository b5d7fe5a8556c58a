"""process_image: pad / resize / crop into a cache, bad files reported while the rest is processed."""

import io
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from qwenvl_lab.core.errors import UserError
from qwenvl_lab.dataprocess import process_image
from qwenvl_lab.dataprocess.image_io import ImageError, load_rgb, parse_fill, square

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def close(px, rgb, tol=30) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(px, rgb))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's header; no real pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path) -> tuple[Path, set[str], set[str]]:
    """A source folder with good images of many modes (nested) and bad files; returns (src, good, bad)."""
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (40, 30), RED).save(src / "rgb.jpg")
    Image.new("RGBA", (20, 20), (0, 0, 255, 0)).save(src / "a" / "rgba.png")  # fully transparent -> white
    Image.new("P", (16, 16), 3).save(src / "a" / "p.png")
    Image.new("L", (16, 32), 128).save(src / "a" / "b" / "l.png")
    Image.new("I;16", (16, 16), 65535).save(src / "a" / "b" / "i16.png")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(src / "cmyk.jpg")
    (src / "notes.txt").write_text("not an image")  # not an image extension: ignored
    good = {"rgb.jpg", "a/rgba.png", "a/p.png", "a/b/l.png", "a/b/i16.png", "cmyk.jpg"}
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    full = jpeg_bytes(Image.effect_noise((64, 64), 50).convert("RGB"))
    (src / "a" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (src / "empty.png").write_bytes(b"")
    (src / "bomb.png").write_bytes(png_header_only(30000, 30000))
    bad = {"corrupt.jpg", "a/truncated.jpg", "empty.png", "bomb.png"}
    return src, good, bad


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_files_reported_rest_processed(folder, tmp_path, workers):
    src, good, bad = folder
    dst = tmp_path / f"cache{workers}"
    s = process_image.process_folder(src, dst, size=24, mode="pad", workers=workers)
    assert set(s.written) == good and s.up_to_date == []
    assert {rel for rel, _ in s.failed} == bad
    for rel, reason in s.failed:
        assert rel in reason  # the message names the file
    for rel in good:
        with Image.open(dst / rel) as out:
            assert out.size == (24, 24) and out.mode == "RGB"
    for rel in bad:
        assert not (dst / rel).exists()
    with Image.open(dst / "a" / "rgba.png") as out:  # transparent pixels land on white
        assert close(out.getpixel((12, 12)), (255, 255, 255), tol=2)
    with Image.open(dst / "a" / "b" / "i16.png") as out:  # 16-bit max is scaled to white, not clipped wrongly
        assert close(out.getpixel((12, 12)), (255, 255, 255), tol=2)
    with Image.open(dst / "cmyk.jpg") as out:  # CMYK (0,255,255,0) is red
        assert close(out.getpixel((12, 12)), RED, tol=40)


def test_up_to_date_outputs_skipped(folder, tmp_path):
    src, good, _ = folder
    dst = tmp_path / "cache"
    process_image.process_folder(src, dst, size=16)
    again = process_image.process_folder(src, dst, size=16)
    assert again.written == [] and set(again.up_to_date) == good
    # a source newer than its output is redone
    later = os.path.getmtime(dst / "rgb.jpg") + 10
    os.utime(src / "rgb.jpg", (later, later))
    third = process_image.process_folder(src, dst, size=16)
    assert third.written == ["rgb.jpg"]


def test_pad_resize_crop_geometry():
    # 40x20: blue x<10, red 10<=x<30, green x>=30
    img = Image.new("RGB", (40, 20), RED)
    img.paste(BLUE, (0, 0, 10, 20))
    img.paste(GREEN, (30, 0, 40, 20))
    fill = (10, 200, 10)
    padded = square(img, 20, "pad", fill)
    # 40x40 canvas with the image at rows 10..30 -> scaled by 1/2: rows 0..5 are pad, rows 5..15 image
    assert padded.size == (20, 20)
    assert close(padded.getpixel((10, 1)), fill, 2) and close(padded.getpixel((10, 18)), fill, 2)
    assert close(padded.getpixel((10, 10)), RED) and close(padded.getpixel((1, 10)), BLUE)
    resized = square(img, 20, "resize")  # whole image squeezed: stripes kept
    assert close(resized.getpixel((1, 10)), BLUE) and close(resized.getpixel((18, 10)), GREEN)
    cropped = square(img, 20, "crop")  # shortest side already 20: the centre 20 columns are all red
    assert all(close(cropped.getpixel((x, 10)), RED) for x in (0, 10, 19))
    with pytest.raises(ValueError, match="unknown mode") as e:
        square(img, 20, "stretch")
    assert not isinstance(e.value, UserError)  # unreachable from the CLI: a bug, so a traceback


def test_parse_fill():
    assert parse_fill("white") == (255, 255, 255)
    # LLaVA's pad colour: int(x * 255) of CLIP's normalisation mean
    assert parse_fill("mean") == tuple(int(v * 255) for v in (0.48145466, 0.4578275, 0.40821073))
    assert parse_fill("1,2,3") == (1, 2, 3)
    with pytest.raises(ValueError, match="pad colour"):
        parse_fill("1,2,300")


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (20, 10), RED)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree turn, so width and height swap
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_rgb(tmp_path / "rot.jpg").size == (10, 20)
    with pytest.raises(ImageError, match="missing.jpg"):
        load_rgb(tmp_path / "missing.jpg")


def test_cli_reports_and_strict(folder, tmp_path, capsys):
    src, good, bad = folder
    dst = tmp_path / "cache"
    assert process_image.main([str(src), str(dst), "--size", "16", "--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert f"written {len(good)}, up to date 0, failed {len(bad)}" in captured.out
    assert all(rel in captured.err for rel in bad)
    listed = (dst / process_image.FAILED_LIST).read_text(encoding="utf-8").splitlines()
    assert {line.split("\t")[0] for line in listed} == bad
    assert process_image.main([str(src), str(dst), "--size", "16", "--workers", "1", "--strict"]) == 1
    with pytest.raises(ValueError, match="must differ"):
        process_image.process_folder(src, src)
    with pytest.raises(ValueError, match="not lie inside"):
        process_image.process_folder(src, src / "cache")


def test_real_photos(shared_images, tmp_path):
    s = process_image.process_folder(shared_images, tmp_path / "cache", size=32, mode="crop", workers=2)
    assert s.failed == [] and len(s.written) >= 1
    for rel in s.written:
        with Image.open(tmp_path / "cache" / rel) as out, Image.open(shared_images / rel) as src:
            assert out.size == (32, 32)
            # a centre crop of a photo keeps its overall colour: compare mean RGB of both
            src_mean = src.convert("RGB").resize((32, 32)).resize((1, 1), Image.BOX).getpixel((0, 0))
            out_mean = out.resize((1, 1), Image.BOX).getpixel((0, 0))
            assert close(src_mean, out_mean, tol=60)
