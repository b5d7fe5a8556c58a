"""Projector kinds, token reduction shapes and contents, and build-time errors."""

import pytest
import torch
from qwenvl_lab.model.projector import build_projector
from torch import nn


def test_mlp2x_gelu_is_llava_layout():
    p = build_projector("mlp2x_gelu", 24, 40)
    layers = list(p.mlp)
    assert [type(m) for m in layers] == [nn.Linear, nn.GELU, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features) == (24, 40)
    assert (layers[2].in_features, layers[2].out_features) == (40, 40)
    x = torch.randn(2, 5, 24)
    expected = layers[2](torch.nn.functional.gelu(layers[0](x)))
    torch.testing.assert_close(p(x), expected)


@pytest.mark.parametrize("n", [1, 3, 4])
def test_mlpNx_gelu_layer_count(n):
    p = build_projector(f"mlp{n}x_gelu", 8, 16)
    linears = [m for m in p.mlp if isinstance(m, nn.Linear)]
    gelus = [m for m in p.mlp if isinstance(m, nn.GELU)]
    assert len(linears) == n and len(gelus) == n - 1
    assert p(torch.randn(3, 4, 8)).shape == (3, 4, 16)


def test_linear_and_identity():
    p = build_projector("linear", 8, 16)
    assert p(torch.randn(1, 4, 8)).shape == (1, 4, 16)
    ident = build_projector("identity", 8, 8)
    x = torch.randn(2, 3, 8)
    assert torch.equal(ident(x), x)


def test_identity_width_mismatch_names_both():
    with pytest.raises(ValueError, match=r"in_dim=8.*out_dim=16"):
        build_projector("identity", 8, 16)


def test_unknown_kind_lists_valid():
    with pytest.raises(ValueError, match=r"mlp2x_relu.*linear.*identity.*mlp<N>x_gelu"):
        build_projector("mlp2x_relu", 8, 8)
    with pytest.raises(ValueError, match="at least 1"):
        build_projector("mlp0x_gelu", 8, 8)


def test_pixel_shuffle_shapes_and_contents():
    h, w, c, s = 4, 6, 3, 2
    p = build_projector("identity", c, c * s * s, reduce="pixel_shuffle", reduce_factor=s, grid=(h, w))
    assert p.mlp_in_dim == c * s * s
    assert p.tokens_out(h * w) == (h // s) * (w // s)
    x = torch.randn(2, h * w, c)
    y = p(x)
    assert y.shape == (2, (h // s) * (w // s), c * s * s)
    # Output token (i, j) stacks the s x s block at rows i*s.., cols j*s.., row-major inside the block.
    grid = x.reshape(2, h, w, c)
    for i in range(h // s):
        for j in range(w // s):
            block = [grid[:, i * s + di, j * s + dj] for di in range(s) for dj in range(s)]
            torch.testing.assert_close(y[:, i * (w // s) + j], torch.cat(block, dim=-1))


def test_pixel_shuffle_grows_mlp_input():
    p = build_projector("mlp2x_gelu", 16, 32, reduce="pixel_shuffle", reduce_factor=3)  # square grid at run time
    assert p.mlp[0].in_features == 16 * 9
    assert p.tokens_out(36) == 4
    assert p(torch.randn(1, 36, 16)).shape == (1, 4, 32)


def test_avg_pool_shapes_and_contents():
    h, w, c, s = 4, 4, 5, 2
    p = build_projector("identity", c, c, reduce="avg_pool", reduce_factor=s, grid=(h, w))
    x = torch.randn(3, h * w, c)
    y = p(x)
    assert y.shape == (3, 4, c) and p.tokens_out(16) == 4
    grid = x.reshape(3, h, w, c)
    torch.testing.assert_close(y[:, 3], grid[:, 2:4, 2:4].mean(dim=(1, 2)))


def test_grid_not_divisible_names_both_numbers():
    with pytest.raises(ValueError, match=r"5x4.*reduce_factor 2"):
        build_projector("linear", 8, 8, reduce="avg_pool", reduce_factor=2, grid=(5, 4))
    p = build_projector("linear", 8, 8, reduce="pixel_shuffle", reduce_factor=2)
    with pytest.raises(ValueError, match=r"3x3.*reduce_factor 2"):
        p(torch.randn(1, 9, 8))


def test_bad_reduce_and_width_at_run_time():
    with pytest.raises(ValueError, match="pixel_shuffle"):
        build_projector("linear", 8, 8, reduce="max_pool", reduce_factor=2)
    p = build_projector("linear", 8, 8)
    with pytest.raises(ValueError, match=r"width 8.*width 6"):
        p(torch.randn(1, 4, 6))
