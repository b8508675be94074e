"""Run an exported Caffe2 model with the PyTorch model's interface, on the reference executor.

``Caffe2Predictor(model_dir)`` takes what ``GeneralizedRCNN`` takes in eval mode (a list of dicts with ``image``,
(3, H, W) RGB already resized, optional ``height``/``width``) and returns what ``OnnxPredictor`` returns, so
``fnl.engine.benchmark.measure`` and the evaluator run on it unchanged. It prepares the net's inputs as the writer
documents them: ``data`` padded with the pixel mean to the net's ``size_divisibility``, ``im_info`` (h, w, 1.0).
The executor is a checker: what this predictor measures is accuracy, never a device's speed.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fnl.export.caffe2.executor import Int8Tensor, NetExecutor
from fnl.export.caffe2.proto import Caffe2ModelError, arguments_of
from fnl.export.caffe2.writer import DATA, IM_INFO, INIT_NET_FILE, PREDICT_NET_FILE
from fnl.export.runtime import BOX_OUTPUTS, DENSEPOSE_OUTPUTS, GraphPredictor


def prepare_inputs(image: np.ndarray, pixel_mean: np.ndarray, size_divisibility: int) -> dict[str, np.ndarray]:
    """One (3, H, W) RGB image -> ``data`` (1, 3, H', W') float32 padded with ``pixel_mean`` to multiples of
    ``size_divisibility``, and ``im_info`` [[H, W, 1.0]]."""
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError(f"expected an RGB image of shape (3, H, W), got shape {pixels.shape}; "
                         "convert grayscale/RGBA images to RGB and channels-first first")
    height, width = pixels.shape[1:]
    padded = [-(-n // size_divisibility) * size_divisibility for n in (height, width)]
    data = np.empty((1, 3, *padded), np.float32)
    data[:] = np.asarray(pixel_mean, np.float32).reshape(1, 3, 1, 1)
    data[0, :, :height, :width] = pixels
    return {DATA: data, IM_INFO: np.array([[height, width, 1.0]], np.float32)}


class Caffe2Predictor(GraphPredictor):
    """list[dict] -> list[dict] over ``model_dir``/model.pb + model_init.pb, as ``OnnxPredictor``."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.executor = NetExecutor.from_files(self.model_dir / PREDICT_NET_FILE, self.model_dir / INIT_NET_FILE)
        args = arguments_of(self.executor.predict_net)
        try:
            self.size_divisibility = int(args["size_divisibility"].i)
            self.pixel_mean = np.asarray(args["pixel_mean"].floats, np.float32)
        except KeyError as exc:
            raise Caffe2ModelError(f"{self.model_dir / PREDICT_NET_FILE} lacks the '{exc.args[0]}' argument "
                                   "fnl.export.caffe2 writes: was it written by another tool?") from None
        outputs = list(self.executor.predict_net.external_output)
        self.has_densepose = DENSEPOSE_OUTPUTS[0] in outputs
        expected = list(BOX_OUTPUTS) + (list(DENSEPOSE_OUTPUTS) if self.has_densepose else [])
        if outputs != expected:
            raise Caffe2ModelError(f"{self.model_dir / PREDICT_NET_FILE} has outputs {outputs}, expected {expected}")

    def run_image(self, image: Any, fetch: Iterable[str] = ()) -> dict[str, np.ndarray]:
        """One (3, H, W) RGB image -> the net's outputs (boxes in the input image's pixels, classes int64) and the
        float intermediate blobs named in ``fetch``."""
        inputs = prepare_inputs(np.asarray(image), self.pixel_mean, self.size_divisibility)
        values = self.executor.run(inputs, fetch)
        outputs = {name: _numpy(value) for name, value in values.items()}
        outputs["classes"] = outputs["classes"].astype(np.int64)
        return outputs



def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, Int8Tensor):
        raise Caffe2ModelError("a net output is an int8 tensor; fnl's nets end in float")
    return value.numpy()
