"""DensePoseFnL checkpoints into fnl: key/shape parity with the upstream model B, fnl-convert on a synthetic
checkpoint written in its format (detectron2 Checkpointer .pth), its BiFPN recomputed from the upstream names,
refusals, and numerical parity with DensePoseFnL itself where its sources are at hand."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from fnl.cli.convert import main as convert_main
from fnl.config import load_config
from fnl.config.densepose_fnl import load_densepose_fnl_config
from fnl.engine.checkpoint import CheckpointError, config_from_checkpoint, load_state
from fnl.engine.convert import convert_checkpoint, densepose_fnl_to_fnl_name
from fnl.modeling import build_model

ASSETS = Path(__file__).parents[1] / "assets"
FIXTURE = ASSETS / "densepose_fnl_mobile_parsing_rcnn_b_s3x_keys.json"
UPSTREAM = json.loads(FIXTURE.read_text())["keys"]  # built by tests/assets/densepose_fnl_reference.py
UPSTREAM_YAML = ASSETS / "densepose_fnl_configs" / "mobile_parsing_rcnn_b_s3x.yaml"
CONFIG = "densepose_fnl_b_s3x"
SMALL = ["MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", "3", "MODEL.RPN.POST_NMS_TOPK_TEST", "100"]
DELTAS, LOGITS = ("anchor_deltas", "bbox_pred"), ("objectness_logits", "cls_score")
# Keys of the upstream checkpoint no fnl tensor takes: the fusions' constant eps (checked equal to FUSE_EPS) and the
# BN batch counters detectron2's FrozenBN copies (the backbone's; fnl's frozen BN keeps none).
NOT_LOADED = re.compile(r"(backbone\.bottom_up\..*\.num_batches_tracked|backbone\.fuse_p\d_(tr|out)\.eps)$")


def upstream_key_in_fnl(key: str) -> str:
    """Where fnl keeps each upstream weight, spelled out node by node (independently of fnl.engine.convert's rules)."""
    nodes = {"l2": "laterals.0.0", "l3": "laterals.1.0", "l4": "laterals.2.0", "l5": "laterals.3.0",
             "fuse_p4_tr": "layers.0.td_fusions.0", "fuse_p3_tr": "layers.0.td_fusions.1",
             "fuse_p2_out": "layers.0.td_fusions.2", "fuse_p3_out": "layers.0.bu_fusions.0",
             "fuse_p4_out": "layers.0.bu_fusions.1", "fuse_p5_out": "layers.0.bu_fusions.2"}
    separable = {"p4_tr": "td_convs.0", "p3_tr": "td_convs.1", "p2_out": "td_convs.2", "p3_out": "bu_convs.0",
                 "p4_out": "bu_convs.1", "p5_out": "bu_convs.2", "down_p2": "downsamples.0",
                 "down_p3": "downsamples.1", "down_p4": "downsamples.2"}
    parts = key.split(".")
    if parts[0] == "backbone" and parts[1] in nodes:
        return f"backbone.{nodes[parts[1]]}.{parts[-1]}"
    if parts[0] == "backbone" and parts[1] in separable:
        inner = {"0.0": "0", "0.1": "1.0", "1": "1.1"}[".".join(parts[2:-1])]
        return f"backbone.layers.0.{separable[parts[1]]}.{inner}.{parts[-1]}"
    if match := re.fullmatch(r"roi_heads\.densepose_head\.body_conv_fcn(\d)\.(weight|bias)", key):
        return f"roi_heads.densepose_head.body.{int(match[1]) - 1}.0.{match[2]}"
    return key.replace("densepose_head.ASPP.convs.4.1.", "densepose_head.ASPP.pooling.1.0.")


@pytest.fixture(scope="module")
def model_b() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(load_config(CONFIG, SMALL)).eval()


def test_model_b_has_every_upstream_key_and_shape(model_b):
    target = {k: list(v.shape) for k, v in model_b.state_dict().items()}
    loaded = {k: v for k, v in UPSTREAM.items() if not NOT_LOADED.match(k)}
    mapped = {densepose_fnl_to_fnl_name(k): k for k in loaded}
    assert len(mapped) == len(loaded) == 434  # no two upstream keys land on one fnl key
    assert {upstream_key_in_fnl(k): k for k in loaded} == mapped
    assert sorted(set(target) - set(mapped)) == [], "fnl tensors with no upstream weight"
    assert sorted(mapped[k] for k in set(mapped) - set(target)) == [], "upstream keys with no place in fnl"
    for fnl_key, upstream_key in mapped.items():
        assert target[fnl_key] == UPSTREAM[upstream_key], upstream_key


def random_upstream_state(seed: int = 0, shapes: dict[str, list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Random tensors under the upstream keys, scaled so a random network keeps its activations in range."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in (shapes or UPSTREAM).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        elif key.endswith(".eps"):
            state[key] = torch.tensor(1e-4)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) == 1 and key.endswith("weight"):  # BN scales and fusion weights
            state[key] = torch.rand(shape, generator=g) * 0.5 + 0.5
        elif len(shape) > 1:
            fan_in = torch.tensor(shape[1:]).prod().item()
            state[key] = torch.randn(shape, generator=g) * fan_in ** -0.5
            if any(part in key for part in DELTAS):  # boxes near their anchors / proposals
                state[key] *= 1e-3
            elif any(part in key for part in LOGITS):  # the features are small: spread the scores out
                state[key] *= 10.0
        else:
            state[key] = torch.randn(shape, generator=g) * 0.05
    return state


def write_densepose_fnl_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> None:
    """As detectron2's Checkpointer saves (DensePoseFnL's train_net.py): model, optimizer, scheduler, iteration."""
    params = [k for k in state if not NOT_LOADED.match(k) and "running" not in k]
    optimizer = {"state": {i: {"momentum_buffer": torch.zeros_like(state[k])} for i, k in enumerate(params[:3])},
                 "param_groups": [{"lr": 2e-5, "momentum": 0.9, "weight_decay": 1e-4, "params": list(range(3))}]}
    torch.save({"model": state, "optimizer": optimizer, "scheduler": {"base_lrs": [0.002], "last_epoch": 389999},
                "iteration": 389999}, path)


def test_fnl_convert_uses_every_weight_and_computes_what_the_same_weights_compute_loaded_directly(tmp_path, capsys):
    source = tmp_path / "model_final.pth"
    state = random_upstream_state()
    write_densepose_fnl_checkpoint(source, state)
    output = tmp_path / "out" / "model.pth"
    assert convert_main(["--from", "densepose-fnl", "--ckpt", str(source), "--output", str(output), *SMALL]) == 0
    printed = capsys.readouterr().out
    unused = sorted(k for k in UPSTREAM if NOT_LOADED.match(k))
    assert "434 tensors converted" in printed and f"{len(unused)} checkpoint tensors not used" in printed
    assert "backbone.fuse_p3_out.eps: a constant buffer, equal to MODEL.NECK.FUSE_EPS" in printed
    assert all(f"  {key}: " in printed for key in unused)

    converted = build_model(load_config(CONFIG, SMALL)).eval()
    assert load_state(converted, output, strict=True).loaded == 434
    assert config_from_checkpoint(output).MODEL == load_config(CONFIG, SMALL).MODEL
    direct = build_model(load_config(CONFIG, SMALL)).eval()
    direct.load_state_dict({upstream_key_in_fnl(k): v for k, v in state.items() if not NOT_LOADED.match(k)},
                           strict=False)
    image = torch.randint(0, 256, (3, 128, 160), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    with torch.no_grad():
        (ours,) = converted([{"image": image}])
        (theirs,) = direct([{"image": image}])
    assert len(ours["boxes"]) == 3
    torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=0, atol=0)
    for name in ("coarse_segm", "fine_segm", "u", "v"):
        assert ours["densepose"][name].shape[-3:] == ((15 if name == "coarse_segm" else 25), 64, 64)
        torch.testing.assert_close(ours["densepose"][name], theirs["densepose"][name], rtol=0, atol=0)


def upstream_bifpn(state: dict[str, torch.Tensor], features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """DensePoseFnL's BiFPN as its paper figure and fpn.py describe it, computed from the upstream names alone:
    laterals, top-down P4 and P3 nodes, the P2 output, bottom-up outputs each fed by a stride-2 separable conv of
    the finer output, normalized fusions sum(relu(w) x) / (sum(relu(w)) + eps), P6 = max-pool(P5 output)."""
    def conv(name: str, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return F.conv2d(x, state[f"backbone.{name}.weight"], state.get(f"backbone.{name}.bias"), **kwargs)

    def separable(name: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
        x = F.conv2d(x, state[f"backbone.{name}.0.0.weight"], stride=stride, padding=1, groups=x.shape[1])
        x = F.conv2d(x, state[f"backbone.{name}.0.1.weight"])
        bn = {p: state[f"backbone.{name}.1.{p}"] for p in ("weight", "bias", "running_mean", "running_var")}
        return F.relu(F.batch_norm(x, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], eps=1e-5))

    def fuse(name: str, xs: list[torch.Tensor]) -> torch.Tensor:
        w = F.relu(state[f"backbone.fuse_{name}.weight"])
        return sum(x * wi for x, wi in zip(xs, w, strict=True)) / (w.sum() + state[f"backbone.fuse_{name}.eps"])

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest")

    p2, p3, p4, p5 = (conv(f"l{level}", f) for level, f in zip((2, 3, 4, 5), features, strict=True))
    p4_tr = separable("p4_tr", fuse("p4_tr", [p4, up(p5)]))
    p3_tr = separable("p3_tr", fuse("p3_tr", [p3, up(p4_tr)]))
    p2_out = separable("p2_out", fuse("p2_out", [p2, up(p3_tr)]))
    p3_out = separable("p3_out", fuse("p3_out", [p3, p3_tr, separable("down_p2", p2_out, 2)]))
    p4_out = separable("p4_out", fuse("p4_out", [p4, p4_tr, separable("down_p3", p3_out, 2)]))
    p5_out = separable("p5_out", fuse("p5_out", [p5, separable("down_p4", p4_out, 2)]))
    return {"p2": p2_out, "p3": p3_out, "p4": p4_out, "p5": p5_out, "p6": F.max_pool2d(p5_out, 1, stride=2)}


def test_converted_bifpn_computes_the_upstream_graph_from_the_upstream_names(tmp_path):
    source = tmp_path / "model_final.pth"
    state = random_upstream_state(seed=2)
    write_densepose_fnl_checkpoint(source, state)
    convert_checkpoint(source, load_config(CONFIG, SMALL), tmp_path / "model.pth", "densepose-fnl", "RGB")
    model = build_model(load_config(CONFIG, SMALL)).eval()
    load_state(model, tmp_path / "model.pth", strict=True)
    x = torch.randn(1, 3, 128, 160, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.backbone(x)
        expected = upstream_bifpn(state, model.backbone.bottom_up(x))
    assert list(ours) == list(expected)
    for level, feature in expected.items():
        torch.testing.assert_close(ours[level], feature, rtol=1e-4, atol=1e-5)


def test_fnl_convert_takes_the_upstream_yaml_as_written(tmp_path, capsys):
    source = tmp_path / "model_final.pth"
    write_densepose_fnl_checkpoint(source, random_upstream_state())
    output = tmp_path / "model.pth"
    assert convert_main(["--from", "densepose-fnl", "--ckpt", str(source), "--output", str(output),
                         "--config", str(UPSTREAM_YAML), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "DensePoseFnL config; 9 keys ignored" in printed and "  MODEL.TIMMNETS.PRETRAINED: " in printed
    assert "434 tensors converted" in printed
    assert config_from_checkpoint(output).MODEL == load_config(CONFIG, SMALL).MODEL


def test_a_densepose_fnl_checkpoint_with_fnls_own_model_b_config_is_refused_naming_the_bifpn(tmp_path):
    source = tmp_path / "model_final.pth"
    write_densepose_fnl_checkpoint(source, random_upstream_state())
    with pytest.raises(CheckpointError, match=r"has DensePoseFnL's BiFPN \(backbone\.l2\.weight\) but --config "
                                              r"builds neck BiFPN \(layout fnl, 3 layers\)"):
        convert_checkpoint(source, load_config("mobile_parsing_rcnn_b"), tmp_path / "model.pth", "densepose-fnl")
    assert not (tmp_path / "model.pth").exists()


def test_a_checkpoint_of_another_architecture_is_refused_as_not_model_b(tmp_path):
    source = tmp_path / "model_final.pth"
    fnl_model_b = build_model(load_config("mobile_parsing_rcnn_b"))
    torch.save({"model": fnl_model_b.state_dict(), "iteration": 10}, source)
    with pytest.raises(CheckpointError, match=r"is not a DensePoseFnL model B checkpoint .* it has no "
                                              r"backbone\.l2\.weight, backbone\.p2_out\.0\.0\.weight"):
        convert_checkpoint(source, load_config(CONFIG), tmp_path / "model.pth", "densepose-fnl")


def test_a_pth_that_would_run_code_is_refused_before_conversion(tmp_path):
    source = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "trainer": Path("/")}, source)
    with pytest.raises(CheckpointError, match=r"evil\.pth holds objects other than tensors"):
        convert_checkpoint(source, load_config(CONFIG), tmp_path / "model.pth", "densepose-fnl")
    assert not (tmp_path / "model.pth").exists()


def test_a_fusion_epsilon_other_than_the_configs_is_refused_naming_it(tmp_path):
    source = tmp_path / "model_final.pth"
    state = random_upstream_state()
    state["backbone.fuse_p4_out.eps"] = torch.tensor(1e-3)
    write_densepose_fnl_checkpoint(source, state)
    with pytest.raises(CheckpointError, match=r"backbone\.fuse_p4_out\.eps is 0\.001.*MODEL\.NECK\.FUSE_EPS 0\.001"):
        convert_checkpoint(source, load_config(CONFIG), tmp_path / "model.pth", "densepose-fnl", "RGB")


def test_converted_model_computes_what_densepose_fnl_computes(tmp_path):
    """Numerical parity with DensePoseFnL itself: its model built from its sources by
    tests/assets/densepose_fnl_reference.py (timm 0.4.12, detectron2 sources, in a subprocess: the timm it needs is
    not fnl's), the same random weights in its .pth format, the same image; fnl's model converted from that .pth."""
    sources = {name: os.environ.get(name) for name in ("FNL_DENSEPOSE_FNL_SRC", "FNL_DETECTRON2_SRC", "FNL_TIMM_0412")}
    if not all(sources.values()):
        pytest.skip(f"{', '.join(k for k, v in sources.items() if not v)} not set: a DensePoseFnL checkout, a "
                    "detectron2 source checkout and timm 0.4.12 (see tests/assets/densepose_fnl_reference.py)")
    source = tmp_path / "model_final.pth"
    state = random_upstream_state(seed=4)
    write_densepose_fnl_checkpoint(source, state)
    image = torch.randint(0, 256, (3, 128, 160), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    torch.save(image, tmp_path / "image.pt")
    upstream_yaml = Path(sources["FNL_DENSEPOSE_FNL_SRC"]) / "configs" / "mobile_parsing_rcnn_b_s3x.yaml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [sources["FNL_TIMM_0412"], *filter(None, [os.environ.get("FNL_DETECTRON2_DEPS")])])}
    subprocess.run([sys.executable, str(ASSETS / "densepose_fnl_reference.py"), "run", sources["FNL_DENSEPOSE_FNL_SRC"],
                    sources["FNL_DETECTRON2_SRC"], str(upstream_yaml), str(source), str(tmp_path / "image.pt"),
                    str(tmp_path / "theirs.pt")], check=True, env=env, cwd=tmp_path)
    theirs = torch.load(tmp_path / "theirs.pt", weights_only=True)

    cfg = load_densepose_fnl_config(upstream_yaml, ["MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", "3"]).cfg
    convert_checkpoint(source, cfg, tmp_path / "model.pth", "densepose-fnl", "RGB")
    model = build_model(cfg).eval()
    load_state(model, tmp_path / "model.pth", strict=True)
    with torch.no_grad():
        features = model.backbone(model.preprocess_image([{"image": image}])[0])
        (ours,) = model([{"image": image, "height": 128, "width": 160}])
    for level, feature in theirs["features"].items():
        torch.testing.assert_close(features[level], feature, rtol=1e-4, atol=1e-5)
    assert len(ours["boxes"]) == len(theirs["boxes"]) == 3
    torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours["scores"], theirs["scores"], rtol=1e-5, atol=1e-5)
    for name in ("coarse_segm", "fine_segm", "u", "v"):
        torch.testing.assert_close(ours["densepose"][name], theirs[name], rtol=1e-4, atol=1e-5)
