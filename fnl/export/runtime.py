"""Run an exported model in ONNX Runtime with the PyTorch model's interface.

``OnnxPredictor(path)`` takes what ``GeneralizedRCNN`` takes in eval mode (a list of dicts with ``image``, uint8
(3, H, W) RGB, and optional ``height``/``width``, the original size) and returns what it returns (``boxes`` scaled
back to the original size, ``scores``, ``classes``, ``densepose``), as numpy arrays, so
``fnl.engine.inference.predict_dataset`` and the evaluator run on it unchanged.

``fnl.export.to_onnx`` stores the preprocessing contract in the file's metadata (``Preprocessing``: the test sizes,
size divisibility, channel order). With it, an image not at the size the contract gives for its original size is
resized to it first, as the data mapper would, and ``OnnxPredictor.predict`` takes an original (H, W, 3) RGB image
and returns the detections with their I/U/V maps (``iuv_maps``) -- pre- and post-processing without torch.

This module imports numpy, Pillow and onnxruntime only: a deployment process never loads torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
from PIL import Image

from fnl.data.transforms import resize_image, shortest_edge_size
from fnl.utils.errors import UserError

# The graph's interface, shared with the exporter (fnl.export.onnx) so both sides name things the same way.
INPUT_NAME = "image"
BOX_OUTPUTS = ("boxes", "scores", "classes")
DENSEPOSE_OUTPUTS = ("coarse_segm", "fine_segm", "u", "v")

_INPUT_DTYPES = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32}
# What InferenceSession raises for a file it cannot load (none of them derives from a common ORT class).
_ORT_LOAD_ERRORS = (ort_state.Fail, ort_state.InvalidArgument, ort_state.InvalidGraph, ort_state.InvalidProtobuf,
                    ort_state.NoSuchFile, ort_state.NotImplemented, ort_state.RuntimeException)


class OnnxModelError(UserError, ValueError):
    """An ONNX file is missing, unreadable, or not a model exported by ``fnl.export.to_onnx``; names the file."""


PREPROCESSING_KEY = "fnl_preprocessing"  # the ONNX metadata entry holding Preprocessing as JSON


@dataclass(frozen=True)
class Preprocessing:
    """How an image is made the graph's input, as fnl's data mapper does it: resized bilinearly so that its shortest
    side is ``min_size_test`` and its longest at most ``max_size_test``, channels ``channel_order`` first (C, H, W).
    Padding to ``size_divisibility`` and normalization happen inside the graph."""

    min_size_test: int
    max_size_test: int
    size_divisibility: int
    channel_order: str = "RGB"

    @classmethod
    def from_config(cls, cfg: Any) -> Preprocessing:
        """From a config's INPUT section (INPUT.MIN_SIZE_TEST, MAX_SIZE_TEST, SIZE_DIVISIBILITY, FORMAT)."""
        return cls(int(cfg.INPUT.MIN_SIZE_TEST), int(cfg.INPUT.MAX_SIZE_TEST), int(cfg.INPUT.SIZE_DIVISIBILITY),
                   str(cfg.INPUT.FORMAT))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], path: Path) -> Preprocessing | None:
        """The contract stored in an ONNX file's metadata; None for a file exported without one."""
        text = metadata.get(PREPROCESSING_KEY)
        if text is None:
            return None
        try:
            contract = cls(**json.loads(text))
        except (ValueError, TypeError) as exc:
            raise OnnxModelError(f"{path}: metadata '{PREPROCESSING_KEY}' is not a preprocessing contract: "
                                 f"{text[:200]!r} ({exc})") from exc
        if contract.channel_order != "RGB":
            raise OnnxModelError(f"{path}: its graph takes {contract.channel_order} images; OnnxPredictor feeds RGB")
        return contract

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the graph's input must have for an original image of ``height`` x ``width``."""
        return shortest_edge_size(height, width, self.min_size_test, self.max_size_test)

    def resize(self, image_chw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """(C, H, W) uint8 -> (C, *size), resized as the data mapper resizes."""
        resized = resize_image(Image.fromarray(np.ascontiguousarray(image_chw.transpose(1, 2, 0))), *size)
        return np.ascontiguousarray(np.asarray(resized).transpose(2, 0, 1))


def open_session(path: str | Path, threads: int = 2, profile_prefix: str | Path | None = None
                 ) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads (one inter-op thread: the graph is one sequential chain);
    with ``profile_prefix``, ONNX Runtime's profiler on, writing its trace there (``fnl.export.profile``)."""
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"ONNX model not found: {path}")
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
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

    def graph_input(self, image: np.ndarray, original: tuple[int, int]) -> np.ndarray:
        """The (3, H, W) image the graph runs on, for an input image of an original (height, width) image."""
        return image

    def __call__(self, batched_inputs: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        results = []
        for item in batched_inputs:
            pixels = np.asarray(item["image"])
            original = (int(item.get("height", pixels.shape[-2])), int(item.get("width", pixels.shape[-1])))
            pixels = self.graph_input(pixels, original)
            outputs = self.run_image(pixels)
            results.append(to_model_output(outputs, (int(pixels.shape[-2]), int(pixels.shape[-1])), original))
        return results


class OnnxPredictor(GraphPredictor):
    """list[dict] -> list[dict] over an ONNX Runtime session, as ``GeneralizedRCNN`` in eval mode.

    Boxes come back in the original image (``height``/``width`` of each input, default the input's own size) and
    clipped to it; DensePose outputs are box-relative and pass through unchanged. With the file's ``preprocessing``
    contract, an input not at the contract's size for its original size is resized to it first.
    """

    def __init__(self, path: str | Path, threads: int = 2) -> None:
        self.path = Path(path)
        self.session = open_session(self.path, threads)
        self.input_dtype, self.output_names = _check_interface(self.session, self.path)
        self.has_densepose = DENSEPOSE_OUTPUTS[0] in self.output_names
        self.preprocessing = Preprocessing.from_metadata(self.session.get_modelmeta().custom_metadata_map, self.path)

    def graph_input(self, image: np.ndarray, original: tuple[int, int]) -> np.ndarray:
        if self.preprocessing is None or image.ndim != 3:
            return image
        size = self.preprocessing.input_size(*original)
        if tuple(image.shape[-2:]) == size:
            return image
        if image.dtype != np.uint8:
            raise ValueError(f"{self.path} takes images resized to {size[0]}x{size[1]} for an original of "
                             f"{original[0]}x{original[1]}; got a {image.dtype} image of {image.shape[-2]}x"
                             f"{image.shape[-1]}, which it resizes only when it is uint8")
        return self.preprocessing.resize(image, size)

    def predict(self, image: np.ndarray) -> dict[str, Any]:
        """One original image, (H, W, 3) uint8 RGB as an image file decodes -> ``boxes`` (N, 4) XYXY in it,
        ``scores``, ``classes`` and, with DensePose, ``densepose``: one (3, h, w) I/U/V map per box (``iuv_maps``).
        Needs the file's preprocessing contract (models exported by this version of fnl.export.to_onnx)."""
        if self.preprocessing is None:
            raise OnnxModelError(f"{self.path} carries no preprocessing contract (metadata '{PREPROCESSING_KEY}'): "
                                 "re-export it with fnl-export, or resize images yourself and call the predictor "
                                 "with [{'image': (3, H, W)}]")
        pixels = np.asarray(image)
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise ValueError(f"expected an RGB image (H, W, 3) uint8, got shape {pixels.shape} {pixels.dtype}")
        (result,) = self([{"image": pixels.transpose(2, 0, 1)}])
        if "densepose" in result:
            result["densepose"] = iuv_maps(result["boxes"], result["densepose"])
        return result

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


def iuv_maps(boxes: np.ndarray, densepose: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Head outputs -> one (3, h, w) float32 map per box at the box's integer size: part index I (0 = background),
    U and V of that part, as ``fnl.modeling.densepose_to_iuv`` makes them (bilinear resampling of the 64x64 outputs,
    I = argmax of the fine segmentation where the coarse one says foreground), in numpy."""
    maps = []
    for k, box in enumerate(np.asarray(boxes, dtype=np.float32).tolist()):
        width = max(int(box[2] - box[0]), 1)
        height = max(int(box[3] - box[1]), 1)

        def resample(name: str, k: int = k, height: int = height, width: int = width) -> np.ndarray:
            return _bilinear(np.asarray(densepose[name][k], dtype=np.float32), height, width)

        foreground = resample("coarse_segm").argmax(axis=0) > 0
        index = resample("fine_segm").argmax(axis=0) * foreground
        u = np.take_along_axis(resample("u"), index[None], axis=0)[0].clip(0, 1)
        v = np.take_along_axis(resample("v"), index[None], axis=0)[0].clip(0, 1)
        maps.append(np.stack([index.astype(np.float32), u, v]))
    return maps


def _bilinear(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, h, w) -> (C, height, width), as torch's ``interpolate(mode="bilinear", align_corners=False)``."""

    def taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Source coordinate of each output pixel's centre, clamped at 0 as torch does; its two neighbours' weights.
        source = np.maximum((np.arange(size_out, dtype=np.float32) + 0.5) * np.float32(size_in / size_out) - 0.5, 0)
        low = source.astype(np.int64)
        high = np.minimum(low + 1, size_in - 1)
        return low, high, (source - low).astype(np.float32)

    y0, y1, wy = taps(values.shape[1], height)
    x0, x1, wx = taps(values.shape[2], width)
    rows = values[:, :, x0] * (1 - wx) + values[:, :, x1] * wx
    return rows[:, y0, :] * (1 - wy)[:, None] + rows[:, y1, :] * wy[:, None]


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
