"""SubPixelConvTranspose2d: the DensePose predictor's 4x4 stride-2 transposed conv as a 2x2 conv, pixel shuffle and
crop, equal to nn.ConvTranspose2d on random weights, and refused for every other geometry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fnl.config import ConfigError
from fnl.modeling.layers import SubPixelConvTranspose2d


@pytest.mark.parametrize(("in_channels", "out_channels", "height", "width"),
                         [(3, 2, 5, 7), (16, 25, 32, 32), (1, 1, 1, 1), (8, 3, 1, 6)],
                         ids=["odd", "predictor", "one-pixel", "one-row"])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_the_transposed_conv_it_is_built_from(in_channels, out_channels, height, width, bias):
    generator = torch.Generator().manual_seed(in_channels * 100 + out_channels)
    deconv = nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1, bias=bias)
    with torch.no_grad():  # random weights and biases: every tap and every channel distinct
        deconv.weight.copy_(torch.randn(deconv.weight.shape, generator=generator))
        if bias:
            deconv.bias.copy_(torch.randn(out_channels, generator=generator))
    subpixel = SubPixelConvTranspose2d.from_conv_transpose(deconv)
    x = torch.randn(3, in_channels, height, width, generator=generator)
    with torch.no_grad():
        expected, actual = deconv(x), subpixel(x)
    assert actual.shape == expected.shape == (3, out_channels, 2 * height, 2 * width)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    # as many weights, one to one (each conv weight is one transposed-conv weight)
    assert subpixel.conv.weight.numel() == deconv.weight.numel()
    assert sorted(subpixel.conv.weight.flatten().tolist()) == sorted(deconv.weight.flatten().tolist())


def test_gradients_equal_the_transposed_convs():
    torch.manual_seed(0)
    deconv = nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1)
    subpixel = SubPixelConvTranspose2d.from_conv_transpose(deconv)
    x = torch.randn(2, 4, 6, 5, requires_grad=True)
    target = torch.randn(2, 3, 12, 10)
    (grad_deconv,) = torch.autograd.grad(((deconv(x) - target) ** 2).sum(), x)
    (grad_subpixel,) = torch.autograd.grad(((subpixel(x) - target) ** 2).sum(), x)
    torch.testing.assert_close(grad_subpixel, grad_deconv, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("geometry", [
    {"kernel_size": 3, "stride": 2, "padding": 1},
    {"kernel_size": 4, "stride": 1, "padding": 1},
    {"kernel_size": 4, "stride": 2, "padding": 0},
    {"kernel_size": 4, "stride": 2, "padding": 1, "output_padding": 1},
    {"kernel_size": 4, "stride": 2, "padding": 1, "dilation": 2},
    {"kernel_size": 4, "stride": 2, "padding": 1, "groups": 2},
])
def test_other_transposed_convs_are_refused_by_name(geometry):
    deconv = nn.ConvTranspose2d(4, 6, **geometry)
    assert not SubPixelConvTranspose2d.computes(deconv)
    expected = SubPixelConvTranspose2d.GEOMETRY
    wrong = next(key for key in geometry if getattr(deconv, key) != expected[key])
    with pytest.raises(ConfigError, match=f"computes only ConvTranspose2d.*'{wrong}'"):
        SubPixelConvTranspose2d.from_conv_transpose(deconv)


def test_a_plain_conv_is_refused():
    with pytest.raises(ConfigError, match="got Conv2d"):
        SubPixelConvTranspose2d.from_conv_transpose(nn.Conv2d(4, 6, 4, stride=2, padding=1))
