"""Run an exported model in ONNX Runtime with the PyTorch model's interface.

``OnnxPredictor(path)`` takes what ``GeneralizedRCNN`` takes in eval mode (a list of dicts with ``image``, uint8
(3, H, W) RGB already resized, and optional ``height``/``width``, the original size) and returns what it returns
(``boxes`` scaled back to the original size, ``scores``, ``classes``, ``densepose``), as numpy arrays, so
``fnl.engine.inference.predict_dataset`` and the evaluator run on it unchanged.

This module imports numpy and onnxruntime only: a deployment process never loads torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

# The graph's interface, shared with the exporter (fnl.export.onnx) so both sides name things the same way.
INPUT_NAME = "image"
BOX_OUTPUTS = ("boxes", "scores", "classes")
DENSEPOSE_OUTPUTS = ("coarse_segm", "fine_segm", "u", "v")

_INPUT_DTYPES = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32}
# What InferenceSession raises for a file it cannot load (none of them derives from a common ORT class).
_ORT_LOAD_ERRORS = (ort_state.Fail, ort_state.InvalidArgument, ort_state.InvalidGraph, ort_state.InvalidProtobuf,
                    ort_state.NoSuchFile, ort_state.NotImplemented, ort_state.RuntimeException)


class OnnxModelError(ValueError):
    """An ONNX file is missing, unreadable, or not a model exported by ``fnl.export.to_onnx``; names the file."""


def open_session(path: str | Path, threads: int = 2) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads (one inter-op thread: the graph is one sequential chain)."""
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"ONNX model not found: {path}")
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except _ORT_LOAD_ERRORS as exc:
        raise OnnxModelError(f"{path} is not a loadable ONNX model (corrupt, truncated or another format?): "
                             f"{str(exc)[:300]}") from exc


class GraphPredictor:
    """The PyTorch model's interface (list of input dicts -> list of output dicts, boxes in the original image) over
    an exported graph; subclasses run one (3, H, W) image with ``run_image``."""

    def run_image(self, image: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __call__(self, batched_inputs: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        results = []
        for item in batched_inputs:
            pixels = np.asarray(item["image"])
            outputs = self.run_image(pixels)
            height, width = (int(n) for n in pixels.shape[-2:])
            original = (int(item.get("height", height)), int(item.get("width", width)))
            results.append(to_model_output(outputs, (height, width), original))
        return results


class OnnxPredictor(GraphPredictor):
    """list[dict] -> list[dict] over an ONNX Runtime session, as ``GeneralizedRCNN`` in eval mode.

    Boxes come back in the original image (``height``/``width`` of each input, default the input's own size) and
    clipped to it; DensePose outputs are box-relative and pass through unchanged.
    """

    def __init__(self, path: str | Path, threads: int = 2) -> None:
        self.path = Path(path)
        self.session = open_session(self.path, threads)
        self.input_dtype, self.output_names = _check_interface(self.session, self.path)
        self.has_densepose = DENSEPOSE_OUTPUTS[0] in self.output_names

    def run_image(self, image: Any) -> dict[str, np.ndarray]:
        """One (3, H, W) RGB image -> the graph's outputs by name, boxes in the input image's pixels."""
        pixels = np.asarray(image)
        if pixels.ndim != 3 or pixels.shape[0] != 3:
            raise ValueError(f"expected an RGB image of shape (3, H, W), got shape {pixels.shape}; "
                             "convert grayscale/RGBA images to RGB and channels-first first")
        if pixels.dtype != self.input_dtype:
            if self.input_dtype != np.float32:
                raise ValueError(f"{self.path} takes {np.dtype(self.input_dtype).name} images (it was exported with "
                                 f"a {np.dtype(self.input_dtype).name} sample), got {pixels.dtype}")
            pixels = pixels.astype(np.float32)
        values = self.session.run(self.output_names, {INPUT_NAME: np.ascontiguousarray(pixels[None])})
        return dict(zip(self.output_names, values, strict=True))



def to_model_output(outputs: Mapping[str, np.ndarray], input_size: tuple[int, int],
                    output_size: tuple[int, int]) -> dict[str, Any]:
    """Graph outputs -> the model's output dict, boxes scaled from the input image to ``output_size`` and clipped,
    as ``fnl.modeling.meta_arch.postprocess`` does."""
    scale_y = output_size[0] / input_size[0]
    scale_x = output_size[1] / input_size[1]
    boxes = outputs["boxes"] * np.array([scale_x, scale_y, scale_x, scale_y], dtype=np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, output_size[1])
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, output_size[0])
    result: dict[str, Any] = {"boxes": boxes, "scores": outputs["scores"],
                              "classes": outputs["classes"].astype(np.int64)}
    if DENSEPOSE_OUTPUTS[0] in outputs:
        result["densepose"] = {name: outputs[name] for name in DENSEPOSE_OUTPUTS}
    return result


def _check_interface(session: ort.InferenceSession, path: Path) -> tuple[type, list[str]]:
    """The input dtype and output names, after checking the graph has the exporter's interface."""
    inputs = session.get_inputs()
    outputs = [o.name for o in session.get_outputs()]
    found = f"it has inputs {[(i.name, i.type, i.shape) for i in inputs]} and outputs {outputs}"
    expected = (f"expected one input '{INPUT_NAME}' (1, 3, H, W) uint8 or float and outputs "
                f"{', '.join(BOX_OUTPUTS)}[, {', '.join(DENSEPOSE_OUTPUTS)}]")
    image = inputs[0] if len(inputs) == 1 else None
    if (image is None or image.name != INPUT_NAME or image.type not in _INPUT_DTYPES or len(image.shape) != 4
            or image.shape[1] != 3):
        raise OnnxModelError(f"{path} is not a model exported by fnl.export.to_onnx: {expected}; {found}")
    densepose = [name for name in DENSEPOSE_OUTPUTS if name in outputs]
    if any(name not in outputs for name in BOX_OUTPUTS) or densepose not in ([], list(DENSEPOSE_OUTPUTS)):
        raise OnnxModelError(f"{path} is not a model exported by fnl.export.to_onnx: {expected}; {found}")
    return _INPUT_DTYPES[image.type], [*BOX_OUTPUTS, *densepose]
