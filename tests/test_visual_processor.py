"""ImageProcessor: pad / resize / crop geometry and normalisation, derived from first principles."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from qwenvl_lab.visual import ImageProcessor

MEAN, STD = (0.5, 0.25, 0.75), (0.5, 0.5, 0.5)


def _stripes() -> Image.Image:
    """96x32: black | white | black, each 32x32."""
    img = Image.new("RGB", (96, 32), (0, 0, 0))
    img.paste((255, 255, 255), (32, 0, 64, 32))
    return img


def _unnorm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def test_crop_keeps_the_centre():
    p = ImageProcessor(32, MEAN, STD, mode="crop", resample="bilinear")
    x = _unnorm(p([_stripes()]))  # shorter side already 32: the crop is exactly the white middle
    assert x.shape == (1, 3, 32, 32)
    torch.testing.assert_close(x, torch.ones_like(x), rtol=0, atol=1e-6)


def test_resize_squashes_everything():
    p = ImageProcessor(32, MEAN, STD, mode="resize", resample="nearest")
    x = _unnorm(p([_stripes()]))
    # 96 -> 32 columns: nearest keeps one column in three, so the middle third of the columns is white
    assert x[0, :, :, 11:21].min() > 0.99 and x[0, :, :, :10].max() < 0.01 and x[0, :, :, 22:].max() < 0.01


def test_pad_fills_with_the_mean_colour():
    p = ImageProcessor(48, MEAN, STD, mode="pad", resample="nearest")
    x = _unnorm(p([_stripes()]))  # canvas 96x96, image in rows 32..63 -> rows 16..31 of 48
    fill = torch.tensor([int(m * 255) / 255 for m in MEAN]).view(3, 1, 1)
    torch.testing.assert_close(x[0, :, :15], fill.expand(3, 15, 48), rtol=0, atol=1e-6)
    torch.testing.assert_close(x[0, :, 33:], fill.expand(3, 15, 48), rtol=0, atol=1e-6)
    assert x[0, :, 17:31, 17:31].min() > 0.99  # the white stripe, centred


def test_normalisation_and_batch():
    p = ImageProcessor(8, MEAN, STD, mode="resize")
    x = p([Image.new("RGB", (8, 8), (255, 0, 255)), Image.new("RGB", (5, 9), (0, 0, 0))])
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    expect = (torch.tensor([1.0, 0.0, 1.0]) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(x[0, :, 3, 3], expect)
    torch.testing.assert_close(x[1, :, 0, 0], -torch.tensor(MEAN) / torch.tensor(STD))


def test_non_rgb_is_rejected_with_its_index():
    p = ImageProcessor(8, MEAN, STD)
    with pytest.raises(ValueError, match=r"image 1: mode is 'L'"):
        p([Image.new("RGB", (8, 8)), Image.new("L", (8, 8))])


def test_bad_mode_and_resample():
    with pytest.raises(ValueError, match="image mode"):
        ImageProcessor(8, MEAN, STD, mode="letterbox")
    with pytest.raises(ValueError, match="resample"):
        ImageProcessor(8, MEAN, STD, resample="cubic-ish")
    assert ImageProcessor(8, MEAN, STD, resample=3).resample == "bicubic"  # PIL code, as HF stores it
