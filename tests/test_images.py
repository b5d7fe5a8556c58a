"""dataset/images.py: every bad file is one clear error; every mode becomes RGB; frames are uniform."""

import pytest
import tiny_data as td
from PIL import Image
from qwenvl_lab.dataset.images import load_image, load_video_frames, to_rgb, uniform_indices
from qwenvl_lab.dataset.sample import BadSampleError

BAD = {
    "missing": ("image file not found", "missing_file"),
    "empty": (r"empty \(0 bytes\)", "bad_image"),
    "corrupt_jpeg": ("corrupt or truncated image", "bad_image"),
    "truncated": ("corrupt or truncated image", "bad_image"),
    "not_an_image": ("not a readable image", "bad_image"),
    "bomb": ("above max_pixels=", "too_large"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_images_raise_bad_sample_error_naming_the_file(tmp_path, name):
    path = td.write_bad_images(tmp_path)[name]
    pattern, kind = BAD[name]
    with pytest.raises(BadSampleError, match=pattern) as ei:
        load_image(path)
    assert str(path) in str(ei.value)
    assert ei.value.kind == kind


@pytest.mark.parametrize("name", ["truncated", "corrupt_jpeg"])
def test_cut_off_files_are_refused_even_when_another_library_allows_them(tmp_path, monkeypatch, name):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # what lmms-eval does when imported
    path = td.write_bad_images(tmp_path)[name]
    with pytest.raises(BadSampleError, match=BAD[name][0]):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the other library's setting is left as it was


def test_bomb_header_is_refused_by_our_own_limit(tmp_path):
    # 3000 x 3000 is under PIL's own bomb limit, so this is our header check (before any decoding).
    p = td.write_png_header_only(tmp_path / "big.png", 3000, 3000)
    with pytest.raises(BadSampleError, match=r"3000x3000 = 9000000 pixels, above max_pixels=1000000"):
        load_image(p, max_pixels=1_000_000)


def test_a_header_above_pils_own_limit_is_refused_by_ours_with_our_message(tmp_path):
    from PIL import Image

    side = 20000  # 400M pixels: over twice PIL's default limit, where PIL itself would raise first
    assert side * side > 2 * Image.MAX_IMAGE_PIXELS
    p = td.write_png_header_only(tmp_path / "huge.png", side, side)
    with pytest.raises(BadSampleError, match=r"20000x20000 = 400000000 pixels, above max_pixels=67108864"):
        load_image(p)
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's limit is back for everyone else


@pytest.mark.parametrize("name", ["rgba_clear", "rgba_opaque", "la_clear", "p_transparent", "p_green", "l",
                                  "one", "i16", "cmyk", "cmyk_tiff"])
def test_every_mode_becomes_rgb(tmp_path, name):
    path, rgb = td.write_mode_images(tmp_path)[name]
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (4, 4)
    got = img.getpixel((1, 1))
    # JPEG (CMYK) is lossy: allow a small error there, exact elsewhere.
    tol = 3 if str(path).endswith(".jpg") else 0
    assert all(abs(g - e) <= tol for g, e in zip(got, rgb, strict=True)), (name, got, rgb)


def test_half_transparent_goes_over_white():
    img = Image.new("RGBA", (2, 2), (255, 0, 0, 128))
    r, g, b = to_rgb(img).getpixel((0, 0))
    # alpha 128/255 of red over white: g = b = 255 * (1 - 128/255) = 127
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1


def test_32bit_integer_image_is_scaled():
    img = Image.new("I", (2, 2), 65535)
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    img = load_image(td.write_exif_rotated(tmp_path / "rot.jpg"))
    assert img.size == (2, 6)  # stored 6x2, displayed rotated by 90 degrees


def test_uniform_indices():
    assert uniform_indices(10, 4) == [1, 3, 6, 8]
    assert uniform_indices(10, 1) == [5]
    assert uniform_indices(2, 4) == [0, 0, 1, 1]  # fewer frames than wanted: repeated, always k


def test_video_frames_are_sampled_uniformly(tmp_path):
    path = td.write_video(tmp_path / "v.mp4", n_frames=10)
    frames = load_video_frames(path, 4)
    assert len(frames) == 4 and all(f.mode == "RGB" and f.size == (32, 32) for f in frames)
    # Frame i has gray level 20 * i (lossy codec: +-6).
    levels = [f.getpixel((16, 16))[0] for f in frames]
    for got, idx in zip(levels, uniform_indices(10, 4), strict=True):
        assert abs(got - 20 * idx) <= 6, (levels, idx)
    assert len(load_video_frames(path, 15)) == 15


def test_bad_videos(tmp_path):
    with pytest.raises(BadSampleError, match="video file not found"):
        load_video_frames(tmp_path / "nope.mp4", 4)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(BadSampleError, match="empty"):
        load_video_frames(tmp_path / "empty.mp4", 4)
    (tmp_path / "junk.mp4").write_bytes(b"\x00junk" * 100)
    with pytest.raises(BadSampleError, match="junk.mp4"):
        load_video_frames(tmp_path / "junk.mp4", 4)


def test_real_photos_load_as_rgb(shared_images):
    photos = sorted(shared_images.glob("*.jpg"))
    assert photos
    for p in photos:
        img = load_image(p)
        with Image.open(p) as raw:
            w, h = raw.size
        assert img.mode == "RGB" and sorted(img.size) == sorted((w, h))


@pytest.mark.parametrize("name", sorted(set(BAD) - {"missing"}))
def test_bytes_get_the_same_checks_and_messages_name_the_upload(tmp_path, name):
    path = td.write_bad_images(tmp_path)[name]
    pattern, kind = BAD[name]
    with pytest.raises(BadSampleError, match=pattern) as ei:
        load_image(path.read_bytes(), name="upload.png")
    assert str(ei.value).startswith("upload.png: ") and str(tmp_path) not in str(ei.value)
    assert ei.value.kind == kind
    with pytest.raises(BadSampleError, match=f"^the image: .*{pattern}"):
        load_image(path.read_bytes())  # no name: "the image"


def test_bytes_load_like_the_file(tmp_path):
    path = td.write_exif_rotated(tmp_path / "rot.jpg")
    a, b = load_image(path), load_image(path.read_bytes())
    assert b.mode == "RGB" and b.size == a.size == (2, 6) and a.tobytes() == b.tobytes()
    with pytest.raises(BadSampleError, match=r"^photo\.jpg: image is 6x2 = 12 pixels, above max_pixels=11"):
        load_image(path.read_bytes(), max_pixels=11, name="photo.jpg")
