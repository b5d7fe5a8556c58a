"""Load images and video frames as RGB PIL images, turning every bad file into `BadSampleError`.

`load_image(source, max_pixels=MAX_PIXELS, name=None)`, `source` a path or an image file's bytes (an upload,
with no temporary file); messages name the file as `name` (by default the path, or "the image" for bytes):
- a missing, 0-byte, unrecognised, truncated or corrupt file raises `BadSampleError` naming the file;
- the pixel count is checked from the header (before any pixel is decoded) against `max_pixels`, so a
  decompression bomb (e.g. a 30000x30000 PNG) is refused without allocating it; PIL's own limit is off
  while the header is read (`open_header`), so the refusal is always ours, naming max_pixels;
- decoding refuses a cut-off file even where another library turned PIL's `LOAD_TRUNCATED_IMAGES` on;
- EXIF orientation is applied (`ImageOps.exif_transpose`);
- every mode becomes RGB: transparent modes (RGBA, LA, PA, P with transparency) are composited over white,
  16/32-bit grayscale (I;16*, I, F) is scaled to 8 bits, CMYK / 1 / L / YCbCr are converted.

`image_size(path, max_pixels=MAX_PIXELS) -> (width, height)`: the size `load_image` will return, read from the
header only (no pixel decoded), EXIF orientation applied (orientations 5-8 swap width and height; the
orientation is read exactly as `ImageOps.exif_transpose` reads it, XMP included); the same checks and
`BadSampleError`s as `load_image` (missing, empty, unreadable, above max_pixels). A PNG keeps its metadata
chunks before the image data as a rule; one with a metadata chunk after it is decoded to read it (rare).
`video_frame_size(path) -> (width, height)`: the frames' size from the video stream's header (PyAV).

`load_video_frames(path, k)`: `k` frames at uniformly spaced positions (PyAV), as RGB PIL images; a video
with fewer than `k` frames repeats frames so the count is always `k` (the rendered text has `k` spans).
PyAV is optional: without it, loading a video raises a UserError that names the package.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
from typing import IO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..core.errors import UserError
from .sample import BadSampleError

MAX_PIXELS = 64 * 1024 * 1024  # ~8k x 8k; far above any vision tower input, far below a bomb
_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def load_image(source: str | os.PathLike | bytes, max_pixels: int = MAX_PIXELS, name: str | None = None
               ) -> Image.Image:
    """An RGB PIL image from a path or from a file's bytes (see the module docstring for the checks)."""
    if isinstance(source, bytes):
        shown = name or "the image"
        if not source:
            raise BadSampleError(f"{shown}: image file is empty (0 bytes)", "bad_image")
        fp: str | io.BytesIO = _NamedBytes(source, shown)
    else:
        fp = str(source)
        shown = name or fp
        if not os.path.isfile(fp):
            raise BadSampleError(f"{shown}: image file not found", "missing_file")
        if os.path.getsize(fp) == 0:
            raise BadSampleError(f"{shown}: image file is empty (0 bytes)", "bad_image")

    def detail(e: Exception) -> str:  # PIL's own message names the path too
        return str(e).replace(fp, shown) if isinstance(fp, str) else str(e)

    try:
        img = open_header(fp)  # reads the header only
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadSampleError(f"{shown}: not a readable image ({detail(e)})", "bad_image") from e
    with img:
        w, h = img.size
        if w * h > max_pixels:
            raise BadSampleError(too_large_message(shown, w, h, max_pixels), "too_large")
        if w == 0 or h == 0:
            raise BadSampleError(f"{shown}: image has size {w}x{h}", "bad_image")
        try:
            decode_strict(img)  # a truncated or corrupt stream fails here
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise BadSampleError(f"{shown}: corrupt or truncated image ({detail(e)})", "bad_image") from e


_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # transposed / rotated by 90 or 270 degrees: width and height swap


def image_size(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of the image `load_image(path)` gives, from the header (module docstring)."""
    fp = str(path)
    if not os.path.isfile(fp):
        raise BadSampleError(f"{fp}: image file not found", "missing_file")
    if os.path.getsize(fp) == 0:
        raise BadSampleError(f"{fp}: image file is empty (0 bytes)", "bad_image")
    try:
        with open_header(fp) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise BadSampleError(too_large_message(fp, w, h, max_pixels), "too_large")
            if w == 0 or h == 0:
                raise BadSampleError(f"{fp}: image has size {w}x{h}", "bad_image")
            orientation = _orientation(img, fp)
    except BadSampleError:
        raise
    except Exception as e:  # noqa: BLE001 - any header failure means "not a readable image", as load_image says
        raise BadSampleError(f"{fp}: not a readable image ({e})", "bad_image") from e
    return (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)


def _orientation(img: Image.Image, path: str) -> int:
    """The EXIF (or XMP) orientation `ImageOps.exif_transpose` will apply, without decoding pixels.

    Why not `img.getexif()` alone: PIL's PNG plugin decodes the whole image to look for an eXIf chunk
    after the image data; the base method reads what the header already gave, which is everything unless
    such a trailing chunk exists (checked by walking the chunk headers)."""
    if img.format == "PNG" and "exif" not in img.info and not _png_metadata_after_data(path):
        exif = Image.Image.getexif(img)
    else:
        exif = img.getexif()
    return int(exif.get(0x0112, 1) or 1)


def _png_metadata_after_data(path: str) -> bool:
    """Whether a PNG has an eXIf / text chunk after its image data (chunk headers only, data skipped)."""
    seen_data = False
    with open(path, "rb") as f:
        f.seek(8)  # the signature
        while header := f.read(8):
            if len(header) < 8:
                return False
            length, kind = struct.unpack(">I4s", header)
            if kind == b"IDAT":
                seen_data = True
            elif seen_data and kind in (b"eXIf", b"tEXt", b"zTXt", b"iTXt"):
                return True
            elif kind == b"IEND":
                return False
            f.seek(length + 4, os.SEEK_CUR)  # data + CRC
    return False


class _NamedBytes(io.BytesIO):
    """An in-memory file that PIL's messages call `name` (PIL quotes a file object's repr)."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self._shown = name

    def __repr__(self) -> str:
        return repr(self._shown)


_PIL_LIMIT = threading.Lock()


def open_header(path: str | IO[bytes]) -> Image.Image:
    """`Image.open` (header only) with PIL's own decompression-bomb limit off: the caller checks the size
    against `max_pixels` itself, so every refusal is ours, with our message, whatever PIL's limit is."""
    with _PIL_LIMIT, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


_TRUNCATED_FLAG = threading.Lock()


def decode_strict(img: Image.Image) -> None:
    """`img.load()` with PIL's `ImageFile.LOAD_TRUNCATED_IMAGES` off for the call: a library imported in the
    same process may turn that global on (lmms-eval does at import), and a cut-off file would then decode
    silently with grey rows instead of being refused."""
    with _TRUNCATED_FLAG:
        saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            img.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def too_large_message(path: str, w: int, h: int, max_pixels: int) -> str:
    return (f"{path}: image is {w}x{h} = {w * h} pixels, above max_pixels={max_pixels} (decompression bomb "
            f"guard; raise max_pixels if the image is genuine)")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency over white, high bit depths scaled to 8 bits."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        # A palette may carry transparency; RGBA keeps it so it goes over white like the rest.
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _TRANSPARENT_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img), mode), mode="L").convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit or float grayscale -> uint8 (why: PIL's convert('L') clips I;16 instead of scaling)."""
    a = a.astype(np.float64)
    if mode.startswith("I;16") or (a.min() >= 0 and 255 < a.max() <= 65535):
        a = a / 257.0  # 65535 -> 255
    elif mode == "F" and a.min() >= 0 and a.max() <= 1.0:
        a = a * 255.0
    elif a.min() < 0 or a.max() > 255:
        lo, hi = a.min(), a.max()
        a = (a - lo) * (255.0 / (hi - lo if hi > lo else 1.0))
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def uniform_indices(n_frames: int, k: int) -> list[int]:
    """`k` frame indices spread evenly over `n_frames` (centre of each of k equal segments)."""
    assert n_frames > 0 and k > 0, (n_frames, k)
    return [min(n_frames - 1, int((i + 0.5) * n_frames / k)) for i in range(k)]


def _pyav():
    """PyAV, or a UserError naming the package: an optional dependency only video data needs (not a bad
    sample: every video would fail the same way, so the run stops with one line)."""
    try:
        import av  # imported here: only video datasets need it
    except ImportError:
        raise UserError("video data needs the PyAV package (import name av), which is not installed: "
                        "pip install av") from None
    return av


def _video_file(path: str | os.PathLike) -> str:
    """`path` as a string, once it names a non-empty file (a BadSampleError names it otherwise)."""
    path = str(path)
    if not os.path.isfile(path):
        raise BadSampleError(f"{path}: video file not found", "missing_file")
    if os.path.getsize(path) == 0:
        raise BadSampleError(f"{path}: video file is empty (0 bytes)", "bad_video")
    return path


def video_frame_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the video's frames, from its stream header (nothing decoded)."""
    av = _pyav()
    path = _video_file(path)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise BadSampleError(f"{path}: no video stream", "bad_video")
            stream = container.streams.video[0]
            w, h = int(stream.codec_context.width), int(stream.codec_context.height)
    except BadSampleError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise BadSampleError(f"{path}: unreadable video ({e})", "bad_video") from e
    if w < 1 or h < 1:
        raise BadSampleError(f"{path}: video frames have size {w}x{h}", "bad_video")
    return w, h


def load_video_frames(path: str, k: int) -> list[Image.Image]:
    """`k` RGB frames sampled uniformly from the video at `path` (PyAV)."""
    av = _pyav()
    path = _video_file(path)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise BadSampleError(f"{path}: no video stream", "bad_video")
            stream = container.streams.video[0]
            n = stream.frames
            if n <= 0:
                # Frame count missing from the header: decode once to count (small videos only).
                frames = [f.to_image() for f in container.decode(stream)]
                if not frames:
                    raise BadSampleError(f"{path}: video has no decodable frames", "bad_video")
                return [to_rgb(frames[i]) for i in uniform_indices(len(frames), k)]
            wanted = uniform_indices(n, k)
            picked: dict[int, Image.Image] = {}
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    picked[i] = to_rgb(frame.to_image())
                if i >= wanted[-1]:
                    break
    except BadSampleError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise BadSampleError(f"{path}: unreadable video ({e})", "bad_video") from e
    if not picked:
        raise BadSampleError(f"{path}: video has no decodable frames", "bad_video")
    # The header count can overstate the real frames; fall back to the last decoded frame.
    last = picked[max(picked)]
    return [picked.get(i, last) for i in wanted]
