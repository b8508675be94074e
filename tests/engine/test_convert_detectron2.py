"""detectron2 DensePose model-zoo checkpoints into fnl: key/shape parity with the upstream model, and fnl-convert
on a synthetic checkpoint written in the model zoo's format."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fnl.cli.convert import main as convert_main
from fnl.config import load_config
from fnl.config.detectron2 import load_detectron2_config
from fnl.engine.checkpoint import CheckpointError, config_from_checkpoint, load_state, read_checkpoint
from fnl.engine.convert import convert_checkpoint, detectron2_to_fnl_name
from fnl.modeling import build_model

FIXTURE = Path(__file__).parents[1] / "assets" / "detectron2_densepose_rcnn_R_50_FPN_s1x_keys.json"
UPSTREAM = json.loads(FIXTURE.read_text())["keys"]  # built by tests/assets/make_detectron2_densepose_keys.py
CONFIG = "densepose_rcnn_R_50_FPN_s1x"
# Small inputs and few detections: the 8-conv, 512-channel DensePose head on 28x28 RoIs is costly on 2 cores.
SMALL = ["MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", "3", "MODEL.RPN.POST_NMS_TOPK_TEST", "100"]
# detectron2's MODEL.PIXEL_MEAN, in its BGR channel order.
DETECTRON2_BGR_MEAN = "[103.530, 116.280, 123.675]"
PREDICTORS = ("objectness_logits", "anchor_deltas", "cls_score", "bbox_pred")


@pytest.fixture(scope="module")
def s1x_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(load_config(CONFIG, SMALL)).eval()


def test_s1x_model_has_exactly_the_upstream_keys_and_shapes(s1x_model):
    target = {k: list(v.shape) for k, v in s1x_model.state_dict().items()}
    mapped = {detectron2_to_fnl_name(k): k for k in UPSTREAM}
    assert len(mapped) == len(UPSTREAM)  # no two upstream keys land on one fnl key
    assert sorted(set(target) - set(mapped)) == [], "fnl keys with no upstream weight"
    assert sorted(mapped[k] for k in set(mapped) - set(target)) == [], "upstream keys with no place in fnl"
    for fnl_key, upstream_key in mapped.items():
        assert target[fnl_key] == UPSTREAM[upstream_key], upstream_key


def write_model_zoo_pickle(path: Path, seed: int = 0, shapes: dict[str, list[int]] | None = None
                           ) -> dict[str, np.ndarray]:
    """Random float32 arrays under the upstream keys (the s1x model's unless ``shapes``), pickled as detectron2's
    model-zoo .pkl files are."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for key, shape in (shapes or UPSTREAM).items():
        if key.endswith("running_var"):
            array = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("norm.weight"):
            array = rng.uniform(0.5, 1.0, shape)
        elif len(shape) > 1:  # weights scaled by fan-in so 50 layers keep activations in range
            array = rng.normal(0.0, (1.0 / np.prod(shape[1:])) ** 0.5, shape)
            if any(part in key for part in PREDICTORS):  # small deltas and logits: boxes near anchors, varied scores
                array *= 1e-3
        else:
            array = rng.normal(0.0, 0.05, shape)
        arrays[key] = array.astype(np.float32)
    with open(path, "wb") as handle:
        pickle.dump({"model": arrays, "__author__": "Detectron2 Model Zoo"}, handle)
    return arrays


def upstream_key_in_fnl(key: str) -> str:
    """Where fnl keeps each upstream weight: the N-th (from 1) body_conv_fcn is the (N-1)-th ConvNormAct of the
    head's Sequential, a decoder conv is the first member of the ConvNormAct in its slot; other keys are the same."""
    if match := re.fullmatch(r"roi_heads\.densepose_head\.body_conv_fcn(\d+)\.(weight|bias)", key):
        return f"roi_heads.densepose_head.body.{int(match[1]) - 1}.0.{match[2]}"
    if match := re.fullmatch(r"roi_heads\.decoder\.(p\d)\.(\d)\.(weight|bias)", key):
        return f"roi_heads.decoder.{match[1]}.{match[2]}.0.{match[3]}"
    return key


def test_fnl_convert_writes_a_checkpoint_that_computes_what_the_upstream_weights_compute(tmp_path, s1x_model, capsys):
    source = tmp_path / "model_final_162be9.pkl"
    arrays = write_model_zoo_pickle(source)
    output = tmp_path / "out" / "model.pth"
    assert convert_main(["--from", "detectron2", "--ckpt", str(source), "--output", str(output), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert f"{len(UPSTREAM)} tensors converted" in printed and "not used" not in printed

    converted = build_model(load_config(CONFIG, SMALL)).eval()
    report = load_state(converted, output, strict=True)
    assert report.loaded == len(converted.state_dict())
    assert read_checkpoint(output)["config"]  # carries its config: fnl-quantize --ckpt needs no --config

    # The same weights loaded directly, as detectron2 would run them: BGR images, BGR means, stem as written.
    direct = build_model(load_config(CONFIG, [*SMALL, "MODEL.PIXEL_MEAN", DETECTRON2_BGR_MEAN])).eval()
    state = {upstream_key_in_fnl(k): torch.from_numpy(v) for k, v in arrays.items()}
    assert not direct.load_state_dict(state, strict=True).missing_keys

    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 128, 160), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        (ours,) = converted([{"image": image}])
        (theirs,) = direct([{"image": image.flip(0)}])  # RGB -> BGR
        ours_features = converted.backbone(converted.preprocess_image([{"image": image}])[0])
        theirs_features = direct.backbone(direct.preprocess_image([{"image": image.flip(0)}])[0])
    for level, feature in ours_features.items():
        torch.testing.assert_close(feature, theirs_features[level], rtol=1e-4, atol=1e-3)
    assert len(ours["boxes"]) == 3
    torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ours["scores"], theirs["scores"], rtol=1e-4, atol=1e-5)
    for name in ("coarse_segm", "fine_segm", "u", "v"):
        assert ours["densepose"][name].shape[-1] == 112
        torch.testing.assert_close(ours["densepose"][name], theirs["densepose"][name], rtol=1e-4, atol=1e-4)


def test_fnl_convert_takes_the_upstream_yaml_as_written(tmp_path, capsys):
    source = tmp_path / "model_final_162be9.pkl"
    write_model_zoo_pickle(source)
    upstream_yaml = FIXTURE.parent / "detectron2_configs" / "densepose_rcnn_R_50_FPN_s1x.yaml"
    output = tmp_path / "model.pth"
    assert convert_main(["--from", "detectron2", "--ckpt", str(source), "--output", str(output),
                         "--config", str(upstream_yaml), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "detectron2 config; 5 keys ignored" in printed and "  MODEL.WEIGHTS: " in printed
    assert f"{len(UPSTREAM)} tensors converted" in printed and "not used" not in printed
    assert config_from_checkpoint(output).MODEL == load_config(CONFIG, SMALL).MODEL


def test_decoder_weights_a_decoderless_config_cannot_use_are_listed_by_name_with_the_reason(tmp_path):
    source = tmp_path / "model_final.pkl"
    write_model_zoo_pickle(source)
    cfg = load_config(CONFIG, [*SMALL, "MODEL.ROI_DENSEPOSE_HEAD.DECODER_ON", "False",
                               "MODEL.ROI_DENSEPOSE_HEAD.IN_FEATURES", "['p2']"])
    report = convert_checkpoint(source, cfg, tmp_path / "model.pth")
    assert sorted(report.unused) == sorted(k for k in UPSTREAM if k.startswith("roi_heads.decoder."))
    assert len(report.unused) == 16 and all("DECODER_ON True" in reason for reason in report.unused.values())
    assert "roi_heads.decoder.p5.4.weight: the checkpoint has detectron2 DensePose's decoder" in report.summary()


def test_a_checkpoint_missing_model_weights_is_refused_naming_them(tmp_path):
    source = tmp_path / "partial.pkl"
    arrays = write_model_zoo_pickle(source)
    del arrays["roi_heads.box_predictor.bbox_pred.weight"]
    with open(source, "wb") as handle:
        pickle.dump({"model": arrays, "__author__": "Detectron2 Model Zoo"}, handle)
    output = tmp_path / "model.pth"
    with pytest.raises(CheckpointError, match=r"partial\.pkl lacks 1 weights .*roi_heads\.box_predictor\.bbox_pred"):
        convert_checkpoint(source, load_config(CONFIG, SMALL), output)
    assert not output.exists()


def test_a_pickle_that_would_run_code_is_refused_before_conversion(tmp_path):
    source = tmp_path / "evil.pkl"
    source.write_bytes(pickle.dumps({"model": {"x": Path("/")}}, protocol=2))
    with pytest.raises(CheckpointError, match=r"evil\.pkl is a pickle holding objects other than numpy arrays"):
        convert_checkpoint(source, load_config(CONFIG, SMALL), tmp_path / "model.pth")


@pytest.mark.parametrize("config", ["densepose_rcnn_R_50_FPN_s1x", "densepose_rcnn_R_50_FPN_s1x_legacy"])
def test_converted_model_computes_what_upstream_detectron2_computes(tmp_path, monkeypatch, config):
    """Numerical parity with detectron2 itself, imported from its sources (pure Python, nothing compiled): the same
    random weights in the upstream model and, converted, in fnl's built from the same upstream YAML; the same image
    (BGR upstream, RGB here). The legacy model has no decoder and pools P2..P5 by box size."""
    source = os.environ.get("FNL_DETECTRON2_SRC")
    if not source:
        pytest.skip("FNL_DETECTRON2_SRC (a detectron2 source checkout, its Python dependencies importable: see "
                    "tests/assets/make_detectron2_densepose_keys.py) is not set")
    monkeypatch.syspath_prepend(str(Path(source) / "projects" / "DensePose"))
    monkeypatch.syspath_prepend(source)
    from densepose import add_densepose_config
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model as build_upstream_model

    upstream_yaml = Path(source) / "projects" / "DensePose" / "configs" / f"{config}.yaml"
    cfg = get_cfg()
    add_densepose_config(cfg)
    cfg.merge_from_file(str(upstream_yaml))
    cfg.MODEL.DEVICE, cfg.TEST.DETECTIONS_PER_IMAGE, cfg.MODEL.RPN.POST_NMS_TOPK_TEST = "cpu", 3, 100
    upstream = build_upstream_model(cfg).eval()
    checkpoint = tmp_path / "model_final.pkl"
    arrays = write_model_zoo_pickle(checkpoint, shapes={k: list(v.shape) for k, v in upstream.state_dict().items()})
    upstream.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()}, strict=True)
    fnl_cfg = load_detectron2_config(upstream_yaml, SMALL).cfg
    convert_checkpoint(checkpoint, fnl_cfg, tmp_path / "model.pth")
    converted = build_model(fnl_cfg).eval()
    load_state(converted, tmp_path / "model.pth", strict=True)

    image = torch.randint(0, 256, (3, 128, 160), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    with torch.no_grad():
        (theirs,) = upstream([{"image": image.flip(0).float(), "height": 128, "width": 160}])
        (ours,) = converted([{"image": image, "height": 128, "width": 160}])
    theirs = theirs["instances"]
    assert len(ours["boxes"]) == len(theirs) == 3
    torch.testing.assert_close(ours["boxes"], theirs.pred_boxes.tensor, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ours["scores"], theirs.scores, rtol=1e-4, atol=1e-5)
    for name in ("coarse_segm", "fine_segm", "u", "v"):
        torch.testing.assert_close(ours["densepose"][name], getattr(theirs.pred_densepose, name), rtol=1e-4,
                                   atol=1e-3)
