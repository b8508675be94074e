"""Regenerates ``detectron2_densepose_rcnn_R_50_FPN_s1x_keys.json``: every state_dict key and shape of the model
detectron2's DensePose project builds from its ``densepose_rcnn_R_50_FPN_s1x.yaml``, i.e. what its model-zoo
checkpoint ``model_final_162be9.pkl`` holds under ``"model"``.

It builds the upstream model itself (on CPU, nothing compiled): pass a detectron2 source checkout, with fvcore,
iopath, omegaconf, hydra-core, yacs, tabulate, termcolor, portalocker, antlr4-python3-runtime 4.9.3, cloudpickle
and av importable (e.g. ``pip install --target DIR ...`` and DIR on PYTHONPATH):

    python tests/assets/make_detectron2_densepose_keys.py /path/to/detectron2 [commit]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUTPUT = Path(__file__).with_name("detectron2_densepose_rcnn_R_50_FPN_s1x_keys.json")
CONFIG = "projects/DensePose/configs/densepose_rcnn_R_50_FPN_s1x.yaml"


def main(source: Path, commit: str) -> None:
    sys.path[:0] = [str(source), str(source / "projects" / "DensePose")]
    from densepose import add_densepose_config
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    add_densepose_config(cfg)
    cfg.merge_from_file(str(source / CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    OUTPUT.write_text(json.dumps({"source": f"github:facebookresearch/detectron2@{commit}", "config": CONFIG,
                                  "keys": shapes}, indent=1) + "\n")
    print(f"{len(shapes)} keys -> {OUTPUT}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "unknown")
