"""DensePoseFnL's own model, built from its sources, for fnl's tests: its state_dict keys and shapes (the fixture
``densepose_fnl_mobile_parsing_rcnn_b_s3x_keys.json``) and its outputs on given weights and image (the parity test
in tests/engine/test_convert_densepose_fnl.py).

It builds the upstream model exactly as DensePoseFnL's train_net.py does (``add_densepose_config``,
``add_timmnets_config``, its ``backbone`` and ``roi_heads`` modules registered, the YAML merged), on CPU with
``MODEL.TIMMNETS.PRETRAINED False``; nothing compiled is needed. Requirements, as DensePoseFnL's README pins them
(its code imports ``timm.models.efficientnet_builder`` and relies on timm 0.4's separate activation layers):
a DensePoseFnL checkout (github.com/zetyquickly/DensePoseFnL), a detectron2 source checkout with its pure-Python
dependencies (see make_detectron2_densepose_keys.py) and timm 0.4.12, all on PYTHONPATH ahead of a newer timm:

    pip install --no-deps --target /tmp/timm0412 timm==0.4.12
    PYTHONPATH=/tmp/timm0412:DETECTRON2_DEPS python tests/assets/densepose_fnl_reference.py keys FNL_SRC D2_SRC [COMMIT]
    PYTHONPATH=... python tests/assets/densepose_fnl_reference.py run FNL_SRC D2_SRC CONFIG CHECKPOINT INPUT OUTPUT

``run`` loads CHECKPOINT with detectron2's DetectionCheckpointer (as ``--eval-only MODEL.WEIGHTS`` does), runs the
model on the (3, H, W) uint8 image saved in INPUT (torch.save) and saves its backbone features, boxes, scores and
DensePose outputs to OUTPUT.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

CONFIG = "configs/mobile_parsing_rcnn_b_s3x.yaml"
OUTPUT = Path(__file__).with_name("densepose_fnl_mobile_parsing_rcnn_b_s3x_keys.json")


def build_upstream(fnl_src: Path, d2_src: Path, config: Path, overrides: list[str] = ()) -> torch.nn.Module:
    sys.path[:0] = [str(fnl_src), str(d2_src), str(d2_src / "projects" / "DensePose")]
    import backbone  # noqa: F401  DensePoseFnL's: registers build_timm_bifpn_backbone
    import roi_heads  # noqa: F401  DensePoseFnL's: registers MyDensePoseROIHeads
    import timm
    from config import add_timmnets_config  # DensePoseFnL's config.py
    from densepose import add_densepose_config
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    if not timm.__version__.startswith("0.4."):
        raise SystemExit(f"timm {timm.__version__} is imported; DensePoseFnL needs timm 0.4 (see this docstring)")
    cfg = get_cfg()
    add_densepose_config(cfg)
    add_timmnets_config(cfg)
    cfg.merge_from_file(str(config))
    cfg.merge_from_list(["MODEL.TIMMNETS.PRETRAINED", False, "MODEL.DEVICE", "cpu", *overrides])
    return build_model(cfg).eval()


def write_keys(fnl_src: Path, d2_src: Path, commit: str) -> None:
    model = build_upstream(fnl_src, d2_src, fnl_src / CONFIG)
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    OUTPUT.write_text(json.dumps({"source": f"github:zetyquickly/DensePoseFnL@{commit}", "config": CONFIG,
                                  "timm": "0.4.12", "keys": shapes}, indent=1) + "\n")
    print(f"{len(shapes)} keys -> {OUTPUT}")


def run(fnl_src: Path, d2_src: Path, config: Path, checkpoint: Path, inputs: Path, output: Path) -> None:
    model = build_upstream(fnl_src, d2_src, config, ["TEST.DETECTIONS_PER_IMAGE", 3])
    from detectron2.checkpoint import DetectionCheckpointer

    loaded = DetectionCheckpointer(model).load(str(checkpoint))
    state = torch.load(checkpoint, weights_only=True)["model"]
    if set(state) != set(model.state_dict()):
        raise SystemExit(f"checkpoint and model keys differ: {sorted(set(state) ^ set(model.state_dict()))[:5]}")
    image = torch.load(inputs, weights_only=True)
    height, width = image.shape[-2:]
    with torch.no_grad():
        images = model.preprocess_image([{"image": image.float()}])
        features = model.backbone(images.tensor)
        (result,) = model([{"image": image.float(), "height": height, "width": width}])
    instances = result["instances"]
    dp = instances.pred_densepose
    torch.save({"features": features, "boxes": instances.pred_boxes.tensor, "scores": instances.scores,
                **{name: getattr(dp, name) for name in ("coarse_segm", "fine_segm", "u", "v")},
                "checkpointer_left": sorted(loaded)}, output)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "keys":
        write_keys(Path(args[0]), Path(args[1]), args[2] if len(args) > 2 else "unknown")
    elif mode == "run":
        run(*map(Path, args))
    else:
        raise SystemExit(f"unknown mode {mode}: keys or run")
