"""Helpers of the export tests: a small random-weight model B and seeded images."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import onnx
import torch
import torchvision

from fnl.config import CfgNode, load_config
from fnl.export.onnx import ExportableRCNN
from fnl.export.verify import INT8, match_detections
from fnl.modeling import GeneralizedRCNN, build_model
from fnl.utils.modules import eval_mode

# test_tiny is model B (spnasnet_100 + BiFPN 64) at 128 px; 5 detections keep the DensePose head cheap.
SMALL = ["MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", "5"]
EXPORT_SIZE = (128, 160)
OUTPUTS = ["boxes", "scores", "classes", "coarse_segm", "fine_segm", "u", "v"]
# What the graph returns for an image without detections: zero rows, every other dimension in place.
EMPTY_OUTPUT_SHAPES = {"boxes": (0, 4), "scores": (0,), "classes": (0,), "coarse_segm": (0, 2, 64, 64),
                       "fine_segm": (0, 25, 64, 64), "u": (0, 25, 64, 64), "v": (0, 25, 64, 64)}


def tiny_config(*overrides: str) -> CfgNode:
    return load_config("test_tiny", [*SMALL, *overrides])


def tiny_model(*overrides: str) -> GeneralizedRCNN:
    torch.manual_seed(0)
    return build_model(tiny_config(*overrides)).eval()


def blank_image(height: int, width: int) -> torch.Tensor:
    return torch.full((3, height, width), 128, dtype=torch.uint8)


def random_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def op_types(graph: onnx.GraphProto) -> set[str]:
    """Every node type in ``graph`` and its subgraphs (If branches hold the NMS of torchvision's batched_nms)."""
    types = set()
    for node in graph.node:
        types.add(node.op_type)
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
            for subgraph in subgraphs:
                types |= op_types(subgraph)
    return types


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """PyTorch on one thread: the two cores are shared with other jobs, and two OpenMP threads spin-waiting on busy
    cores made these tests several times slower (as tests/hooks measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# A detector with decisive detections, so that two int8 runtimes can be compared detection by detection.
# With random weights every score is 0.5 +- 1e-4, a few int8 steps apart: an int8 model then ranks candidates by
# rounding, and PyTorch and ONNX Runtime (whose convs round the bias to int32, as every int8 runtime does; fbgemm adds
# it in float) keep different ones. Here every anchor is a proposal (no top-k, no NMS in the RPN: RPN ties cannot
# matter), boxes are the anchors themselves (zero deltas), and the box classifier is fitted (ridge regression on the
# model's own RoI features) to score 10 * IoU - 5 against a few anchor-aligned "objects": one anchor per object
# scores far above the rest, and an image given without objects (a blank one) is fitted to score far below.
# Only those are decisive: the fit gives anchors that overlap an object at IoU ~0.5 a logit near 0, a score near the
# 0.5 threshold (int8 fbgemm on these images: 0.52 to 0.60, 1 to 5 steps of the classifier's int8 output above it),
# and NMS at 0.5 keeps those of IoU < 0.5. Which of them pass differs between int8 kernels, and between CPUs for one
# runtime (XNNPACK gave 2 and PyTorch 3 detections on an image on an AMX Xeon, both 2 on an AMD EPYC): compare
# detections with the verification's criteria and ``unpaired_decisive_detections``, never their number.
# Square anchors only: a third of the RoIs (every anchor is one) at no loss, the objects being square. One BiFPN
# layer instead of three: a third of the graph for the exporter and ONNX Runtime's quantizer to walk.
DECISIVE = ["INPUT.MIN_SIZE_TEST", "64", "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[[1.0]]",
            "MODEL.NECK.NUM_REPEATS", "1", "MODEL.RPN.PRE_NMS_TOPK_TEST", "100000",
            "MODEL.RPN.POST_NMS_TOPK_TEST", "100000", "MODEL.RPN.NMS_THRESH_TEST", "1.0",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.5", *SMALL]
# Per image, anchors of the 64x64 input (P2: 32 px at stride 4; P3: 64 px at stride 8), then none on a blank image.
DECISIVE_OBJECTS = ([[8.0, 16.0, 40.0, 48.0], [0.0, 0.0, 64.0, 64.0]], [[20.0, 24.0, 52.0, 56.0]], [])
RIDGE = 1e-5  # relative to the features' mean square: smaller fits noise near the threshold, larger blurs the peaks
# The fitted objects score sigmoid(~4.7) ~ 0.99. A score of 0.9 is a logit of 2.2 above the threshold's 0: 28 steps of
# the box classifier's int8 output with fbgemm (0.079), 56 with XNNPACK (0.039), beyond any int8 kernel's rounding.
DECISIVE_SCORE = 0.9


@torch.no_grad()
def fit_decisive_detector(model: GeneralizedRCNN, images: list[torch.Tensor],
                          objects: tuple[list[list[float]], ...] = DECISIVE_OBJECTS) -> GeneralizedRCNN:
    """``model`` (built with DECISIVE) with zero box deltas and its box classifier fitted on ``images``, in place."""
    heads = model.roi_heads
    for layer in (model.proposal_generator.rpn_head.anchor_deltas, heads.box_predictor.bbox_pred):
        layer.weight.zero_()
        layer.bias.zero_()
    features, targets = [], []
    for image, image_objects in zip(images, objects, strict=True):
        batch, sizes = model.preprocess_image([{"image": image}])
        levels = model.backbone(batch)
        (proposals,), _ = model.proposal_generator(levels, sizes)
        boxes = proposals[:, :4]
        features.append(heads.box_features(levels, [boxes]).double())
        iou = torch.zeros(len(boxes))
        if image_objects:
            iou = torchvision.ops.box_iou(boxes, torch.tensor(image_objects)).max(dim=1).values
        targets.append(10 * iou.double() - 5)
    design = torch.cat([torch.cat(features), torch.ones(sum(len(f) for f in features), 1, dtype=torch.float64)], 1)
    target = torch.cat(targets)
    ridge = RIDGE * (design**2).sum() / design.shape[1]
    solution = torch.linalg.solve(design.T @ design + ridge * torch.eye(design.shape[1], dtype=torch.float64),
                                  design.T @ target)
    classifier = heads.box_predictor.cls_score  # rows: foreground, background (logit 0)
    classifier.weight.zero_()
    classifier.bias.zero_()
    classifier.weight[0] = solution[:-1].float()
    classifier.bias[0] = solution[-1].float()
    return model


def unpaired_decisive_detections(model: GeneralizedRCNN, run_image: Callable[[np.ndarray], dict[str, np.ndarray]],
                                 images: list[torch.Tensor], min_score: float = DECISIVE_SCORE
                                 ) -> tuple[int, list[str]]:
    """How many detections the PyTorch ``model`` scores at least ``min_score`` on ``images``, and each detection of
    either side (the model, or an export's ``run_image``) scoring that much that pairs with no detection of the other
    side (same class, IoU >= 0.9: fnl.export.verify's INT8 pairing), described for the assertion message.

    What two int8 runtimes must agree on whatever their rounding: the detections far from the threshold (and from
    each other, as the fitted objects are) exist on both sides."""
    wrapper = ExportableRCNN(model)
    decisive, unpaired = 0, []
    for k, image in enumerate(images):
        with eval_mode(model), torch.no_grad():
            outputs = wrapper(image[None])
        reference = {name: t.numpy() for name, t in zip(wrapper.output_names, outputs, strict=True)}
        test = run_image(image.numpy())
        decisive += int((reference["scores"] >= min_score).sum())
        for side, ours, theirs in (("PyTorch", reference, test), ("export", test, reference)):
            keep = np.flatnonzero(ours["scores"] >= min_score)
            pairs = match_detections(ours["boxes"][keep], ours["classes"][keep], theirs["boxes"], theirs["classes"],
                                     INT8)
            paired = {i for i, _ in pairs}
            unpaired += [f"image {k}: {side} box {ours['boxes'][j].tolist()} (score {ours['scores'][j]:.3f}) has "
                         f"no pair among {theirs['boxes'].tolist()}" for i, j in enumerate(keep) if i not in paired]
    return decisive, unpaired
