"""A user's own upstream checkpoint through the whole path: fnl-convert -> fnl-quantize (PTQ) -> fnl-export onnx
with verification, for a randomly initialised model in detectron2's model-zoo pickle format and one in
DensePoseFnL's .pth format. Small inputs and few proposals keep each run near 30 s on one core."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_convert_densepose_fnl import random_upstream_state, write_densepose_fnl_checkpoint
from test_convert_detectron2 import write_model_zoo_pickle

from fnl.cli.convert import main as convert_main
from fnl.cli.export import main as export_main
from fnl.cli.quantize import main as quantize_main
from fnl.config import load_config
from fnl.engine.convert import detectron2_to_fnl_name
from fnl.modeling import build_model

# Stored in the converted checkpoint's config, so that fnl-quantize and fnl-export take them from there.
SMALL_RUN = ["INPUT.MIN_SIZE_TRAIN", "[64]", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "64",
             "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2", "QUANTIZATION.CALIBRATION_IMAGES", "4",
             "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
             "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", "10"]
# detectron2's R-50 s1x at 1/8 of its widths (keys detectron2 configs can set: RESNETS.WIDTH_PER_GROUP ...).
SMALL_R50 = ["MODEL.RESNETS.WIDTH_PER_GROUP", "8", "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
             "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.NECK.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM",
             "64", "MODEL.ROI_DENSEPOSE_HEAD.CONV_HEAD_DIM", "32", "MODEL.ROI_DENSEPOSE_HEAD.NUM_STACKED_CONVS", "2",
             "MODEL.ROI_DENSEPOSE_HEAD.DECODER_CONV_DIMS", "32", "MODEL.ROI_DENSEPOSE_HEAD.DECODER_NUM_CLASSES", "32"]


def detectron2_key(fnl_key: str) -> str:
    """The detectron2 name of an fnl key of the s1x model (the inverse of fnl-convert's renames)."""
    if match := re.fullmatch(r"roi_heads\.densepose_head\.body\.(\d+)\.0\.(weight|bias)", fnl_key):
        return f"roi_heads.densepose_head.body_conv_fcn{int(match[1]) + 1}.{match[2]}"
    if match := re.fullmatch(r"roi_heads\.decoder\.(p\d)\.(\d+)\.0\.(weight|bias)", fnl_key):
        return f"roi_heads.decoder.{match[1]}.{match[2]}.{match[3]}"
    return fnl_key


def upstream_checkpoint(source: str, directory: Path) -> tuple[Path, list[str]]:
    """A random model written as its framework writes checkpoints, and the fnl-convert options it converts with."""
    if source == "detectron2":
        model = build_model(load_config("densepose_rcnn_R_50_FPN_s1x", SMALL_R50))
        shapes = {detectron2_key(k): list(v.shape) for k, v in model.state_dict().items()}
        assert all(detectron2_to_fnl_name(k) == fnl_key for k, fnl_key in zip(shapes, model.state_dict(),
                                                                                strict=True))
        path = directory / "model_final_small.pkl"
        write_model_zoo_pickle(path, shapes=shapes)
        return path, SMALL_R50
    path = directory / "model_final.pth"
    write_densepose_fnl_checkpoint(path, random_upstream_state())
    return path, []


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # torch.ao eager mode's deprecations
@pytest.mark.parametrize("source", ["detectron2", "densepose-fnl"])
def test_an_upstream_checkpoint_converts_quantizes_exports_and_verifies(source, tiny_dataset, tmp_path, capsys):
    checkpoint, architecture = upstream_checkpoint(source, tmp_path)
    converted = tmp_path / "model.pth"
    assert convert_main(["--from", source, "--ckpt", str(checkpoint), "--output", str(converted),
                         *architecture, *SMALL_RUN]) == 0
    assert "tensors converted" in capsys.readouterr().out

    quantized = tmp_path / "quantize"
    assert quantize_main(["--ckpt", str(converted), "--data", str(tiny_dataset), "--mode", "ptq", "--output",
                          str(quantized), "--threads", "1"]) == 0
    assert (quantized / "model_int8.pth").is_file()
    capsys.readouterr()

    exported = tmp_path / "onnx"
    assert export_main(["onnx", "--ckpt", str(quantized / "model_int8.pth"), "--output", str(exported), "--verify",
                        "--input-size", "64", "--verify-images", "8", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "PASSED (int8 criteria" in printed and "8 images" in printed
    assert (exported / "model_int8.onnx").is_file()
