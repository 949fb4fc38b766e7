"""The CPU fast paths compute what the plain PyTorch layers compute, follow weight changes, and
hold each weight once."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdq.sdmodel.unet import Conv2d, Linear
from sdq.sdmodel.vae import upsample_conv


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_prepared_convolution_matches_and_follows_its_weights(kernel: int, stride: int, padding: int) -> None:
    torch.manual_seed(0)
    conv = Conv2d(16, 24, kernel, stride=stride, padding=padding).eval().requires_grad_(False)

    def expected(x: torch.Tensor) -> torch.Tensor:
        plain = conv.state_dict()
        return F.conv2d(x, plain["weight"], plain["bias"], stride=stride, padding=padding)

    x = torch.randn(2, 16, 9, 7)
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), expected(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(conv(x[:1, :, :5]), expected(x[:1, :, :5]), atol=1e-5, rtol=1e-5)
    # new weights loaded in place (same storage, new version), then new storage altogether
    conv.load_state_dict({"weight": torch.randn(conv.weight.shape), "bias": torch.randn(conv.bias.shape)})
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), expected(x), atol=1e-5, rtol=1e-5)
    conv.weight = torch.nn.Parameter(torch.randn(conv.weight.shape), requires_grad=False)
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), expected(x), atol=1e-5, rtol=1e-5)


def test_prepared_convolution_keeps_one_copy_and_gives_the_plain_weight_back() -> None:
    torch.manual_seed(0)
    conv = Conv2d(64, 64, 3, padding=1).eval().requires_grad_(False)
    plain = conv.weight.detach().clone()
    with torch.inference_mode():
        conv(torch.randn(1, 64, 8, 8))
    held = [t for t in conv.parameters() if t.shape == plain.shape]
    assert len(held) == 1 and held[0].is_mkldnn  # the plain copy is gone
    assert torch.equal(conv.state_dict()["weight"], plain)
    conv.to(torch.float64)
    assert not conv.weight.is_mkldnn and torch.equal(conv.weight, plain.double())


@pytest.mark.parametrize("tokens", [1, 32, 300])
def test_linear_matches_for_few_and_many_tokens(tokens: int) -> None:
    torch.manual_seed(0)
    layer = Linear(64, 96).eval()
    x = torch.randn(2, tokens, 64)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("height", "width"), [(4, 4), (5, 3), (1, 6)])
def test_upsample_conv_equals_conv_of_nearest_upsampling(height: int, width: int) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, height, width)
    with torch.inference_mode():
        expected = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        torch.testing.assert_close(upsample_conv(x, conv), expected, atol=1e-5, rtol=1e-5)
