"""Where DensePose learning fails, measured apart from detection (docs/DENSEPOSE_TRAINING.md has the figures).

1. The evaluator on the ground truth itself: each annotated point's (I, U, V) as the prediction must score
   DensePose AP 100 (checks the point placement, the vertex search and the GPS matching).
2. The DensePose head alone, trained on ground-truth boxes of the train split (no RPN, no box head, no proposal
   sampling), then evaluated on the same images and boxes: if I/U/V cannot fit a handful of images this way, the
   fault is in the targets, the loss, the head or the evaluation; if they can, it is in what the full recipe gives
   the head.

    python benchmarks/densepose_diagnosis.py --data DIR --iters 300 [KEY VALUE ...]

DIR is a synthetic set (``fnl-data synth --out DIR --num-images 10 --seed 3``); KEY VALUE pairs override
``--config`` (default synth_mobile_parsing_rcnn_b), e.g. ``SOLVER.OPTIMIZER AdamW SOLVER.BASE_LR 0.001
MODEL.ROI_DENSEPOSE_HEAD.NORM BN INPUT.RANDOM_FLIP none``.
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm import tqdm

from fnl.config import load_config
from fnl.data import build_test_loader, build_train_loader, get_dataset_dicts
from fnl.data.catalog import resolve_split, surface_dir
from fnl.engine.inference import to_evaluator_format
from fnl.engine.train import build_optimizer, build_scheduler
from fnl.evaluation import DensePoseCOCOEvaluator
from fnl.evaluation.densepose_coco import ground_truth_as_predictions
from fnl.modeling import build_model


def annotated_boxes(instances: dict) -> tuple[torch.Tensor, list[dict]]:
    """The boxes of the persons that carry DensePose annotations, and those annotations."""
    keep = [k for k, annotation in enumerate(instances["densepose"]) if annotation is not None]
    return instances["boxes"][keep], [instances["densepose"][k] for k in keep]


def train_head_on_ground_truth_boxes(model: torch.nn.Module, cfg, iterations: int) -> list[dict[str, float]]:
    """Backbone + DensePose head trained on the DensePose losses only, RoIs = ground-truth boxes."""
    heads = model.roi_heads
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    batches = iter(build_train_loader(cfg))
    history = []
    model.train()
    for _ in tqdm(range(iterations), desc="head on GT boxes"):
        batch = next(batches)
        images, _ = model.preprocess_image(batch)
        boxes, annotations = zip(*(annotated_boxes(x["instances"]) for x in batch), strict=True)
        output = heads.densepose_outputs(model.backbone(images), list(boxes))
        flat_boxes = torch.cat(boxes)
        losses = heads.densepose_loss(output, flat_boxes, flat_boxes, [a for image in annotations for a in image])
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        if cfg.SOLVER.CLIP_GRADIENTS > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.SOLVER.CLIP_GRADIENTS)
        optimizer.step()
        scheduler.step()
        history.append({k: v.item() for k, v in losses.items()})
    return history


@torch.no_grad()
def predict_on_ground_truth_boxes(model: torch.nn.Module, cfg, split: str) -> list[dict]:
    """Evaluator-format predictions whose boxes are the split's ground-truth boxes (score 1)."""
    model.eval()
    persons = {d["image_id"]: [a for a in d["annotations"] if not a["iscrowd"]]
               for d in get_dataset_dicts(cfg.DATASETS.ROOT, [split])}
    predictions = []
    for (x,) in build_test_loader(cfg, split):
        images, sizes = model.preprocess_image([x])
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in persons[x["image_id"]]], dtype=torch.float32).reshape(-1, 4)
        (height, width), = sizes
        scale = torch.tensor([width / x["width"], height / x["height"]] * 2)
        output = model.roi_heads.densepose_outputs(model.backbone(images), [boxes * scale])
        predictions.append(to_evaluator_format(x["image_id"], {
            "boxes": boxes, "scores": torch.ones(len(boxes)), "classes": torch.zeros(len(boxes), dtype=torch.long),
            "densepose": output.as_dict()}))
    return predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--config", default="synth_mobile_parsing_rcnn_b")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--split", default="train", help="split trained and evaluated on (default train)")
    parser.add_argument("opts", nargs="*")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config(args.config, ["DATASETS.ROOT", args.data, "DATASETS.TRAIN", f"['{args.split}']",
                                    "SOLVER.MAX_ITER", str(args.iters), "SOLVER.STEPS", f"[{int(0.8 * args.iters)}]",
                                    *args.opts])
    json_path, _ = resolve_split(args.data, args.split)
    evaluator = DensePoseCOCOEvaluator(json_path, surface_dir(args.data))
    results = {"ground_truth_as_prediction": evaluator.evaluate(ground_truth_as_predictions(json_path))}
    model = build_model(cfg)
    history = train_head_on_ground_truth_boxes(model, cfg, args.iters)
    results["last_losses"] = history[-1]
    results["head_on_ground_truth_boxes"] = evaluator.evaluate(predict_on_ground_truth_boxes(model, cfg, args.split))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
