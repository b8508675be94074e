"""Every timm family the README claims, through the eager int8 engine: build, fuse with the expansion taps audited,
PTQ on two images, int8 forward -- or a refusal that names the module and comes before calibration."""

import re
import warnings

import pytest
import torch

import fnl.cli.quantize
from fnl.config import load_config
from fnl.engine.checkpoint import save_checkpoint
from fnl.modeling import build_model
from fnl.qat import calibrate, convert, prepare
from fnl.qat.quantize import Int8KernelError, QuantizationStages, check_int8_kernels

SMALL = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128"]

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("error:All inputs of this cat operator:UserWarning"),
              pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions:UserWarning"),
              pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning"),
              pytest.mark.filterwarnings("ignore:must run observer before calling calculate_qparams:UserWarning")]

# timm's EfficientNet / MobileNet families (docs/DESIGN.md, the paper's Table 2): None quantizes as it is; otherwise the
# refusal's start. MixNet's MixedConv2d leaves its norm unfused, CondConv2d and TF-padded Conv2dSame have no int8
# kernel. Kept in float, Conv2dSame (stem and strided depthwise convs) lets the TF ports quantize; MixedConv2d and
# CondConv2d are also the tapped conv_pwl, whose taps must see int8 tensors: those two go to PT2E.
FAMILIES = {
    "spnasnet_100": None,
    "mobilenetv2_100": None,
    "mobilenetv3_large_100": None,
    "efficientnet_b0": None,
    "efficientnet_es": None,  # EfficientNet-EdgeTPU
    "efficientnet_lite0": None,
    "semnasnet_100": None,  # MnasNet-A1
    "mnasnet_100": None,  # MnasNet-B1
    "fbnetc_100": None,
    "tinynet_a": None,
    "lcnet_100": None,
    "mixnet_s": "MixedConv2d at backbone.bottom_up.blocks.1.0.conv_pw (the BatchNormAct2d after it has no int8 kernel",
    "tf_efficientnet_b0": "Conv2dSame at backbone.bottom_up.conv_stem (no int8 kernel",
    "efficientnet_cc_b0_4e": "CondConv2d at backbone.bottom_up.blocks.4.0.conv_pw (no int8 kernel",
}


def image(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def taps(audit) -> list[str]:
    return sorted(r.module.split("bottom_up.")[-1] for r in audit if r.kind == "forward_pre")


def ptq_int8_forward(model, cfg) -> None:
    """PTQ on two images with every stage's hooks audited, then one int8 forward."""
    stages = QuantizationStages()
    prepared = prepare(model, cfg, "ptq", stages)
    calibrate(prepared, [[{"image": image(1)}], [{"image": image(2)}]], 2)
    int8 = convert(prepared, stages)
    expected = taps(stages.hook_audits["patch"])
    assert expected, "the BiFPN's expansion taps are missing"
    for stage in ("fuse", "prepare", "convert"):
        assert taps(stages.hook_audits[stage]) == expected, stage
    with torch.no_grad():
        output = int8([{"image": image(3)}])[0]
    assert output["boxes"].shape[1] == 4 and "densepose" in output


@pytest.mark.parametrize("name", FAMILIES)
def test_backbone_family_quantizes_or_is_refused_before_calibration(name):
    cfg = load_config("test_tiny", ["MODEL.BACKBONE.NAME", name, *SMALL])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    refusal = FAMILIES[name]
    if refusal is None:
        ptq_int8_forward(model, cfg)
        return
    with pytest.raises(Int8KernelError, match=rf"^unsupported by the eager int8 engine: {re.escape(refusal)}") as info:
        check_int8_kernels(prepare(model, cfg, "ptq"))  # uncalibrated: nothing has run yet
    remedy = re.search(r'QUANTIZATION.FLOAT_MODULES "(\[.*?\])"', str(info.value))
    if name.startswith("tf_"):
        ptq_int8_forward(model, load_config("test_tiny", ["MODEL.BACKBONE.NAME", name, *SMALL,
                                                          "QUANTIZATION.FLOAT_MODULES", remedy.group(1)]))
    else:
        assert remedy is None
        assert re.search(r"Quantize with --engine pt2e: \d+ module\(s\) would have to stay in float, among them "
                         r"backbone.bottom_up.blocks.\d.\d.conv_pwl", str(info.value))


def test_fnl_quantize_refuses_before_measuring_or_training(tiny_dataset, tmp_path, capsys):
    cfg = load_config("test_tiny", ["MODEL.BACKBONE.NAME", "mixnet_s", "DATASETS.ROOT", str(tiny_dataset)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checkpoint = save_checkpoint(tmp_path / "mixnet.pth", build_model(cfg), cfg)
    output = tmp_path / "out"
    code = fnl.cli.quantize.main(["--ckpt", str(checkpoint), "--data", str(tiny_dataset), "--output", str(output),
                                  "--iters", "3"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fnl-quantize: error:")]
    assert code == 2
    assert len(errors) == 1 and "unsupported by the eager int8 engine: MixedConv2d at" in errors[0]
    # Neither the float model's measurement (it writes model_fp32.pth) nor QAT (qat_*.pth) has started.
    assert not list(output.glob("*.pth"))
