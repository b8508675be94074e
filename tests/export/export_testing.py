"""Helpers of the export tests: a small random-weight model B and seeded images."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import onnx
import torch

from fnl.config import CfgNode, load_config
from fnl.modeling import GeneralizedRCNN, build_model

# test_tiny is model B (spnasnet_100 + BiFPN 64) at 128 px; 5 detections keep the DensePose head cheap.
SMALL = ["MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", "5"]
EXPORT_SIZE = (128, 160)


def tiny_config(*overrides: str) -> CfgNode:
    return load_config("test_tiny", [*SMALL, *overrides])


def tiny_model(*overrides: str) -> GeneralizedRCNN:
    torch.manual_seed(0)
    return build_model(tiny_config(*overrides)).eval()


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
