"""Helpers for the fnl.hooks tests: small timm backbones with realistic norm statistics, and hook recorders."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import timm
import torch
from timm.layers import FrozenBatchNormAct2d
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

IMAGE_SIZE = 64
OUT_INDICES = (1, 2, 3, 4)
# where timm's feature_location="expansion" puts its forward pre-hooks on spnasnet_100 (docs/DESIGN.md)
SPNASNET_FEATURE_TAPS = ["blocks.1.2.conv_pwl", "blocks.2.3.conv_pwl", "blocks.4.3.conv_pwl", "blocks.6.0.conv_pwl"]


def example_images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def randomize_norms(model: nn.Module, example: torch.Tensor | None = None, seed: int = 0) -> nn.Module:
    """Gives every norm non-trivial statistics and affine parameters, so that folding them is really tested.

    Running statistics come from one training-mode forward with a cumulative average (momentum None), as a trained
    network would have them, so activations keep a sane scale through deep backbones; frozen norms (no forward
    statistics) get random buffers. ``example`` is the input for that forward (default: ``example_images(4)``).
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(tensor: torch.Tensor, low: float, high: float) -> None:
        tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm | FrozenBatchNorm2d | FrozenBatchNormAct2d):
                uniform(module.weight, 0.5, 1.5)
                uniform(module.bias, -0.3, 0.3)
            if isinstance(module, FrozenBatchNorm2d | FrozenBatchNormAct2d):
                uniform(module.running_mean, -0.3, 0.3)
                uniform(module.running_var, 0.5, 2.0)
        if norms:
            momenta = [norm.momentum for norm in norms]
            modes = {module: module.training for module in model.modules()}
            for norm in norms:
                norm.momentum = None
                norm.reset_running_stats()
            model.train()
            model(example if example is not None else example_images(4, seed))
            for norm, momentum in zip(norms, momenta, strict=True):
                norm.momentum = momentum
            for module, training in modes.items():
                module.training = training
    return model


@functools.cache
def _calibrated_timm_model(name: str, feature_location: str) -> nn.Module:
    kwargs = {"feature_location": feature_location} if feature_location != "bottleneck" else {}
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, features_only=True, out_indices=OUT_INDICES, **kwargs)
    return randomize_norms(model).eval()


def timm_backbone(name: str, feature_location: str = "bottleneck") -> nn.Module:
    """A fresh copy of a timm ``features_only`` backbone in eval mode (built once per session)."""
    return copy.deepcopy(_calibrated_timm_model(name, feature_location))


def count_types(model: nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module in model.modules():
        counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts


def assert_outputs_close(expected: object, actual: object, tolerance: float = 1e-5) -> None:
    """Same structure, and every tensor within ``tolerance`` of the expected one, measured against the larger of 1
    and the expected tensor's largest magnitude: folding changes the float32 summation order, so near-zero
    elements carry rounding noise of the output's scale, not of their own."""
    if isinstance(expected, list | tuple):
        assert isinstance(actual, list | tuple) and len(actual) == len(expected)
        for expected_item, actual_item in zip(expected, actual, strict=True):
            assert_outputs_close(expected_item, actual_item, tolerance)
        return
    assert isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = max(1.0, expected.abs().max().item())
    error = (actual - expected).abs().max().item()
    assert error <= tolerance * scale, f"max difference {error:.3g} > {tolerance:g} x output scale {scale:.3g}"


class CallLog:
    """Hook callables that append what they saw, for checking that a moved hook fires once with the right tensor."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, torch.Tensor]] = []

    def __deepcopy__(self, memo: dict) -> CallLog:
        # fuse_model / prepare_qat copy the model, and with it the hooks bound to this log: copies keep logging here.
        return self

    def pre_hook(self, tag: str) -> Callable[..., None]:
        return functools.partial(self._record_input, tag)

    def forward_hook(self, tag: str) -> Callable[..., None]:
        return functools.partial(self._record_output, tag)

    def kwargs_pre_hook(self, tag: str) -> Callable[..., None]:
        return functools.partial(self._record_input_with_kwargs, tag)

    def tags(self) -> list[str]:
        return [tag for tag, _ in self.entries]

    def tensor(self, tag: str) -> torch.Tensor:
        (tensor,) = [tensor for logged_tag, tensor in self.entries if logged_tag == tag]
        return tensor

    def _record_input(self, tag: str, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.entries.append((tag, args[0].detach().clone()))

    def _record_input_with_kwargs(
        self, tag: str, module: nn.Module, args: tuple[torch.Tensor, ...], kwargs: dict
    ) -> None:
        self.entries.append((tag, args[0].detach().clone()))

    def _record_output(self, tag: str, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.entries.append((tag, output.detach().clone()))
