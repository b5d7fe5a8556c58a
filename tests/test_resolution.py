"""visual/resolution.py: the one token-count rule, checked against transformers' own counts."""

from __future__ import annotations

import math
import types

import pytest
from qwenvl_lab.visual.resolution import Resolution, naflex_size, select_best_resolution, smart_resize

PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]  # multiples of a 32-px tower
SIZES = [(300, 200), (17, 301), (301, 17), (32, 32), (1, 1), (640, 480), (480, 640), (1000, 90), (90, 1000),
         (33, 31), (2048, 2048), (5, 700), (700, 5), (123, 457)]


def anyres(**kw) -> Resolution:
    return Resolution(mode="anyres", image_size=32, grid=(8, 8), tokens_per_crop=64,
                      pinpoints=tuple(tuple(p) for p in PINPOINTS), **kw)


def hf_llava_next_tokens(width: int, height: int) -> int:
    """transformers' LlavaNextProcessor count (vision_feature_select_strategy='default': CLS dropped)."""
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    proc = types.SimpleNamespace(image_processor=types.SimpleNamespace(image_grid_pinpoints=PINPOINTS),
                                 patch_size=4, num_additional_image_tokens=1)
    proc._get_unpadded_features = types.MethodType(LlavaNextProcessor._get_unpadded_features, proc)
    return LlavaNextProcessor._get_number_of_features(proc, height, width, 32, 32) - 1


@pytest.mark.parametrize("width,height", SIZES)
def test_anyres_tokens_and_crops_equal_transformers(width, height):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    lay = anyres().layout(width, height)
    assert lay.tokens == hf_llava_next_tokens(width, height)
    assert lay.crops == image_size_to_num_patches((height, width), PINPOINTS, 32)


def test_tall_thin_image_trims_to_zero_columns():
    """A 2x2-patch tower (28 px, patch 14): 17x301 goes to the 84x28 pinpoint, 6 rows x 2 columns, and
    unpadding removes both columns; each row keeps only its newline (transformers counts the same)."""
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    pins = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
    res = Resolution(mode="anyres", image_size=28, grid=(2, 2), tokens_per_crop=4,
                     pinpoints=tuple(tuple(p) for p in pins))
    lay = res.layout(17, 301)
    assert lay.grid == (6, 0) and lay.tokens == 4 + 6
    proc = types.SimpleNamespace(image_processor=types.SimpleNamespace(image_grid_pinpoints=pins),
                                 patch_size=14, num_additional_image_tokens=1)
    proc._get_unpadded_features = types.MethodType(LlavaNextProcessor._get_unpadded_features, proc)
    assert LlavaNextProcessor._get_number_of_features(proc, 301, 17, 28, 28) - 1 == lay.tokens


def test_best_resolution_matches_transformers():
    from transformers.image_processing_utils import select_best_resolution as hf_select

    for w, h in SIZES:
        assert select_best_resolution(h, w, PINPOINTS) == tuple(hf_select((h, w), PINPOINTS))


def test_multi_image_policy_and_newline_switch():
    assert anyres().tokens(300, 200, n_images=3) == 64 + 1  # base view + its newline
    assert anyres(multi_image="anyres").tokens(300, 200, n_images=3) == anyres().tokens(300, 200)
    with_nl, without = anyres().layout(300, 200), anyres(image_newline=False).layout(300, 200)
    assert with_nl.tokens - without.tokens == with_nl.grid[0]


def test_anyres_max_caps_the_map():
    big = anyres().layout(2048, 2048)
    capped = anyres(anyres_max=1).layout(2048, 2048)
    assert capped.grid[0] * capped.grid[1] <= 64 * 1.1**2
    assert capped.tokens < big.tokens


@pytest.mark.parametrize("width,height", SIZES[:-3] + [(28, 28), (3000, 40)])
def test_smart_resize_equals_qwen2_vl(width, height):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart

    assert smart_resize(height, width, 28, 56 * 56, 28 * 28 * 64) == tuple(hf_smart(height, width, 28, 56 * 56,
                                                                                 28 * 28 * 64))
    res = Resolution(mode="native", patch_size=14, merge=2, min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    lay = res.layout(width, height)
    assert lay.tokens == lay.grid[0] * lay.grid[1] // 4 and lay.grid[0] % 2 == 0 and lay.grid[1] % 2 == 0


@pytest.mark.parametrize("width,height", SIZES)
def test_naflex_size_equals_siglip2(width, height):
    from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

    assert naflex_size(height, width, 16, 64) == tuple(get_image_size_for_max_num_patches(height, width, 16, 64))
    lay = Resolution(mode="naflex", patch_size=16, max_num_patches=64).layout(width, height)
    assert lay.tokens <= 64 and lay.tokens == lay.grid[0] * lay.grid[1]


def test_fixed_mode_is_todays_count():
    res = Resolution(mode="fixed", image_size=32, grid=(5, 5), tokens_per_crop=26)
    assert {res.tokens(w, h) for w, h in SIZES} == {26}


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        Resolution(mode="anyres", image_size=32, grid=(8, 8), tokens_per_crop=64)
    with pytest.raises(ValueError, match="multiple"):
        anyres().__class__(mode="anyres", image_size=32, grid=(8, 8), tokens_per_crop=64, pinpoints=((32, 50),))
    with pytest.raises(ValueError, match="select=patch"):
        Resolution(mode="anyres", image_size=32, grid=(8, 8), tokens_per_crop=65, pinpoints=((32, 32),))


@pytest.mark.parametrize("res", [
    anyres(), anyres(anyres_max=1), anyres(image_newline=False),
    Resolution(mode="native", patch_size=14, merge=2, min_pixels=56 * 56, max_pixels=28 * 28 * 50),
    Resolution(mode="naflex", patch_size=16, max_num_patches=64),
    Resolution(mode="fixed", image_size=32, grid=(5, 5), tokens_per_crop=26),
], ids=["anyres", "anyres_max", "no_newline", "native", "naflex", "fixed"])
def test_max_tokens_is_the_largest_count_any_size_gets(res):
    """The formula's maximum is reached by some size and no size in a dense sweep exceeds it."""
    import itertools

    step = 7 if res.mode != "naflex" else 13
    sides = list(range(1, 400, step)) + [28 * k for k in range(1, 15)] + [32, 64, 96, 4000]
    counts = [res.tokens(w, h) for w, h in itertools.product(sides, sides) if max(w, h) / min(w, h) <= 200]
    assert max(counts) <= res.max_tokens()
    lo, hi = res.token_range()
    assert lo <= hi <= res.max_tokens()
    if res.mode == "anyres" and not res.anyres_max:  # reached by the largest pinpoint's own size
        assert max(res.tokens(pw, ph) for ph, pw in res.pinpoints) == res.max_tokens() == hi
    if res.mode == "native":  # 200 * 28**2 > max_pixels: one 28-px row, the long side sqrt(200 * max)
        assert res.tokens(4000, 20) == res.max_tokens() == math.isqrt(200 * res.max_pixels) // 28
    if res.mode == "naflex":
        assert res.tokens(16, 16 * 64) == res.max_tokens() == 64
