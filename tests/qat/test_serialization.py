"""fnl.qat.serialization.load_model_for_inference: a float checkpoint comes back in eval mode with its batch norms
folded into the convs (as ONNX Runtime and XNNPACK fold them), computing what the unfolded model computes."""

from __future__ import annotations

from pathlib import Path

import torch
from timm.layers import BatchNormAct2d
from torch import nn

from fnl.config import load_config
from fnl.engine.checkpoint import save_checkpoint
from fnl.modeling import build_model
from fnl.qat.serialization import load_model_for_inference


def test_float_model_comes_back_with_batch_norms_folded(tmp_path: Path) -> None:
    cfg = load_config("test_tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    for module in model.modules():  # statistics that are not the identity, so that folding changes the weights
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model.eval()
    checkpoint = save_checkpoint(tmp_path / "model.pth", model, cfg)

    loaded, _ = load_model_for_inference(checkpoint, None, [])

    assert not loaded.training
    norms = [name for name, m in loaded.named_modules() if isinstance(m, nn.BatchNorm2d | BatchNormAct2d)]
    assert norms == []
    image = torch.rand(3, 96, 128) * 255
    with torch.no_grad():
        expected = model.backbone(model.normalize(image)[None])
        got = loaded.backbone(loaded.normalize(image)[None])
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-4, rtol=1e-4), name
