"""The whole Mobile Parsing R-CNN as one ONNX graph: image in, detections and DensePose head outputs out.

Graph interface (``fnl.export.runtime`` runs it):
- input ``image``: (1, 3, H, W) RGB, uint8 (or float32 when exported with a float sample), already resized to the
  test size as the data mapper resizes (shortest side INPUT.MIN_SIZE_TEST); H and W are dynamic. Normalization
  and zero-padding to INPUT.SIZE_DIVISIBILITY happen inside the graph; resizing does not: the test sizes are in
  the file's metadata (``fnl_preprocessing``, see ``fnl.export.runtime.Preprocessing``) for the runtime to apply.
- outputs ``boxes`` (N, 4) XYXY in the input image's pixels, ``scores`` (N,), ``classes`` (N,) int64 and, with
  DensePose on, ``coarse_segm``, ``fine_segm``, ``u``, ``v`` (N, C, S, S) box-relative; N is dynamic and may be 0.

Anchors, proposal decoding, per-level top-k and NMS, and multi-level RoIAlign are traced as standard ONNX ops
(Range, TopK, NonMaxSuppression, RoiAlign, ScatterElements). The TorchScript-based exporter (``dynamo=False``) is
used on purpose: it is the one that exports eager int8 models (torch.ao quantized modules between
QuantStub/DeQuantStub) as QuantizeLinear/DequantizeLinear around Conv; the dynamo exporter refuses them.

Two things the TorchScript exporter cannot do by itself for fnl's int8 models, handled while exporting only:
- it traces a quantized model with ``torch.jit.trace``, which compiles the forward hooks of torch.ao's quantized
  modules (they have TorchScript-exported methods) and fails on timm's feature taps (``functools.partial`` hooks on
  ``conv_pwl``). The hooks are lent to plain wrapper modules while tracing (``_hooks_lent_to_wrappers``): hooks of
  plain modules run in Python during the trace and are recorded like any other op.
- it has no ONNX symbolic for ``quantized::mul_scalar`` (the BiFPN's fusion weights on int8 tensors); one is
  registered for the duration of the export (``_quantized_mul_scalar``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn
from torch.onnx import symbolic_helper, symbolic_opset10, symbolic_opset11

import fnl
from fnl.export.graph_compaction import compact_graph
from fnl.export.runtime import BOX_OUTPUTS, DENSEPOSE_OUTPUTS, INPUT_NAME, PREPROCESSING_KEY, Preprocessing
from fnl.hooks.registry import HOOK_KINDS, has_forward_hooks
from fnl.modeling import GeneralizedRCNN
from fnl.utils.errors import InvalidArgumentError
from fnl.utils.io import atomic_path
from fnl.utils.modules import eval_mode

logger = logging.getLogger("fnl")

DEFAULT_OPSET = 17


class ExportableRCNN(nn.Module):
    """A GeneralizedRCNN's inference path on one image with tensors in and out, the form torch.onnx traces:
    image (1, 3, H, W) -> (boxes, scores, classes[, coarse_segm, fine_segm, u, v]), boxes in the input image.

    It calls the model's own ``inference`` (no postprocessing), so whatever the model's stages are (a float model,
    or one whose modules quantization has replaced) is what gets exported.
    """

    def __init__(self, model: GeneralizedRCNN) -> None:
        super().__init__()
        self.model = model

    @property
    def output_names(self) -> tuple[str, ...]:
        return BOX_OUTPUTS + (DENSEPOSE_OUTPUTS if self.model.roi_heads.densepose_on else ())

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        (detections,) = self.model.inference([{"image": image[0]}], do_postprocess=False)
        outputs = [detections[name] for name in BOX_OUTPUTS]
        if "densepose" in detections:
            outputs.extend(detections["densepose"][name] for name in DENSEPOSE_OUTPUTS)
        return tuple(outputs)

    def densepose_on_boxes(self, image: torch.Tensor, boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        """DensePose head outputs for given boxes (input image pixels): compares heads on the very same boxes."""
        images, _ = self.model.preprocess_image([{"image": image[0]}])
        features = self.model.backbone(images)
        boxes = boxes.to(device=images.device, dtype=torch.float32)
        return self.model.roi_heads.densepose_outputs(features, [boxes]).as_dict()


def model_precision(model: nn.Module) -> str:
    """"int8" for an eager int8 model (its QuantStubs were converted to Quantize modules), else "float32"."""
    quantized = any(isinstance(m, torch.ao.nn.quantized.Quantize) for m in model.modules())
    return "int8" if quantized else "float32"


def default_onnx_name(model: nn.Module) -> str:
    return "model_int8.onnx" if model_precision(model) == "int8" else "model_fp32.onnx"


def to_onnx(model: GeneralizedRCNN, path: str | Path, sample_image: torch.Tensor,
            opset: int = DEFAULT_OPSET, compact: bool = True, preprocessing: Preprocessing | None = None) -> Path:
    """Export ``model`` (float32 or eager int8) to ``path`` as one ONNX graph; see the module docstring.

    ``sample_image`` (3, H, W) or (1, 3, H, W), uint8 or float32, is what the graph is traced with: its dtype becomes
    the graph's input dtype; any size works as H and W are dynamic. ``compact=False`` keeps torch.onnx's scoped node
    names (``ort_static_ptq`` selects the int8 regions by them). ``preprocessing`` (``Preprocessing.from_config(cfg)``
    of the config the model runs with) is stored in the file's metadata, where ``OnnxPredictor`` finds the test size
    to resize images to. Returns ``path``.
    """
    image = _export_sample(sample_image)
    if preprocessing is not None and preprocessing.size_divisibility != model.size_divisibility:
        raise InvalidArgumentError(f"preprocessing says INPUT.SIZE_DIVISIBILITY {preprocessing.size_divisibility}, "
                                   f"the model pads to multiples of {model.size_divisibility}: pass the model's own "
                                   "config")
    wrapper = ExportableRCNN(model)
    names = wrapper.output_names
    dynamic_axes = {INPUT_NAME: {2: "height", 3: "width"}, **{name: {0: "detections"} for name in names}}
    metadata = _metadata(model, image)
    if preprocessing is not None:
        metadata[PREPROCESSING_KEY] = preprocessing.to_json()
    return export_graph(wrapper, (image,), path, [INPUT_NAME], list(names), dynamic_axes, opset,
                        metadata=metadata, compact=compact)


def export_graph(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], path: str | Path,
                 input_names: list[str], output_names: list[str], dynamic_axes: dict[str, dict[int, str]],
                 opset: int = DEFAULT_OPSET, metadata: dict[str, str] | None = None, compact: bool = True) -> Path:
    """Trace ``module`` (float, or eager int8 between QuantStub/DeQuantStub) in eval mode into an ONNX file.

    The one place the exporter is configured: TorchScript-based (``dynamo=False``, for int8), constant folding, the
    graph compacted (``fnl.export.graph_compaction``; ``compact=False`` keeps the exporter's scoped node names for
    debugging), the file checked with ``onnx.checker`` and written atomically, so a failed export leaves no file
    behind.
    """
    path = Path(path)
    precision = model_precision(module)
    with atomic_path(path) as tmp, eval_mode(module), torch.no_grad(), _expected_export_warnings_silenced():
        with ExitStack() as int8_support:
            traced = module
            if precision == "int8":
                int8_support.enter_context(_quantized_symbolics_registered(opset))
                # torch.onnx traces a quantized model itself first, with check_trace=True: two more runs of the
                # model only to compare them. Traced here once, without the check; ONNX Runtime verification checks
                # the file.
                with _hooks_lent_to_wrappers(module):
                    traced = torch.jit.trace(module, example_inputs, check_trace=False)
            torch.onnx.export(traced, example_inputs, str(tmp), dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                              do_constant_folding=True)
        proto = onnx.load(str(tmp))
        if compact:
            proto = compact_graph(proto)
        if metadata:
            onnx.helper.set_model_props(proto, metadata)
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ValueError(f"the ONNX graph exported for {path} fails onnx.checker: {str(exc)[:500]}") from exc
        onnx.save(proto, str(tmp))
    logger.info("wrote %s (%s, opset %d, %.1f MB)", path, precision, opset, path.stat().st_size / 2**20)
    return path


class HookCarrier(nn.Module):
    """Calls ``module``; while exporting it holds the forward hooks of ``module`` (see ``_hooks_lent_to_wrappers``).
    Its hooks see the carrier as their module argument: timm's feature taps ignore it."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


# The dictionaries where torch keeps a module's forward hooks and their flags (fnl.hooks.registry reads the same).
_HOOK_DICTIONARIES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                      "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _swap_hook_dictionaries(a: nn.Module, b: nn.Module) -> None:
    """Exchange the hook dictionaries themselves (not their entries): the hooks keep their handle ids, and the
    handles their owners hold (timm's ``FeatureHooks._handles``) keep pointing at the dictionaries that hold them."""
    for name in _HOOK_DICTIONARIES:
        a_hooks, b_hooks = getattr(a, name), getattr(b, name)
        setattr(a, name, b_hooks)
        setattr(b, name, a_hooks)


@contextmanager
def _hooks_lent_to_wrappers(root: nn.Module) -> Iterator[None]:
    """Inside, every module that ``torch.jit.trace`` would script (one with TorchScript-exported methods, as
    torch.ao's quantized modules have) and that has forward hooks is replaced in ``root`` by a ``HookCarrier``
    holding its hooks; after, the model is exactly as before (same module instances, same hook handles)."""
    lent: list[tuple[nn.Module, str, nn.Module, HookCarrier]] = []
    try:
        for name, module in list(root.named_modules()):
            hooked = any(has_forward_hooks(module, kind) for kind in HOOK_KINDS)
            if not (hooked and torch._jit_internal.module_has_exports(module)):
                continue
            parent_name, _, child_name = name.rpartition(".")
            parent = root.get_submodule(parent_name)
            carrier = HookCarrier(module)
            _swap_hook_dictionaries(module, carrier)
            setattr(parent, child_name, carrier)
            lent.append((parent, child_name, module, carrier))
        yield
    finally:
        for parent, child_name, module, carrier in reversed(lent):
            _swap_hook_dictionaries(module, carrier)
            setattr(parent, child_name, module)


@symbolic_helper.parse_args("v", "f")
def _quantized_mul_scalar(g: Any, quantized: Any, factor: float) -> Any:
    """ONNX for ``quantized::mul_scalar`` as PyTorch computes it: the integers stay, the scale is multiplied by the
    factor (a factor of 0 gives zeros at scale 1, zero point 0). Negative factors, which flip the zero point, never
    occur in fnl's models (BiFPN fusion weights are normalized ReLU outputs) and are refused."""
    if factor < 0:
        raise ValueError(f"exporting a quantized multiply by a negative scalar ({factor}) is not supported")
    value, scale, zero_point, _ = symbolic_helper.dequantize_helper(g, quantized)
    factor_value = g.op("Constant", value_t=torch.tensor(factor, dtype=torch.float32))
    product = g.op("Mul", value, factor_value)
    if factor == 0:
        scale = g.op("Constant", value_t=torch.tensor(1.0, dtype=torch.float32))
        zero_point = g.op("Constant", value_t=torch.tensor(0, dtype=torch.uint8))
    else:
        scale = g.op("Mul", scale, factor_value)
    return symbolic_helper.quantize_helper(g, product, scale, zero_point)


# torch.onnx's symbolics of pixel_shuffle (DepthToSpace, opset 11+) and slicing (Slice, opset 10+) with int8 inputs
# too: the DensePose predictor's sub-pixel convs (fnl.modeling.layers.SubPixelConvTranspose2d) shuffle and crop their
# int8 outputs. A data-movement op keeps its input's scale and zero point (DequantizeLinear -> op -> QuantizeLinear,
# which ONNX Runtime runs on the integers); float inputs get the stock symbolic unchanged.
_QUANTIZED_SYMBOLICS = {"quantized::mul_scalar": _quantized_mul_scalar,
                        "aten::pixel_shuffle": symbolic_helper.quantized_args(True)(symbolic_opset11.pixel_shuffle),
                        "aten::slice": symbolic_helper.quantized_args(True)(symbolic_opset10.slice)}


@contextmanager
def _quantized_symbolics_registered(opset: int) -> Iterator[None]:
    """The symbolics above, registered through torch.onnx's public extension point for this export only."""
    for name, symbolic in _QUANTIZED_SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(name, symbolic, opset)
    try:
        yield
    finally:
        for name in _QUANTIZED_SYMBOLICS:
            torch.onnx.unregister_custom_op_symbolic(name, opset)


def _export_sample(sample_image: torch.Tensor) -> torch.Tensor:
    if not isinstance(sample_image, torch.Tensor):
        raise TypeError(f"sample_image must be a torch.Tensor, got {type(sample_image).__name__}")
    image = sample_image[None] if sample_image.dim() == 3 else sample_image
    if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise ValueError(f"sample_image must be one RGB image (3, H, W) or (1, 3, H, W), got shape "
                         f"{tuple(sample_image.shape)}")
    if not (image.dtype == torch.uint8 or image.dtype == torch.float32):
        raise ValueError(f"sample_image must be uint8 or float32 (the graph's input dtype), got {image.dtype}")
    return image.cpu()


def _metadata(model: GeneralizedRCNN, image: torch.Tensor) -> dict[str, str]:
    """What a deployment needs to know about the graph, stored in the file itself."""
    dtype = "uint8" if image.dtype == torch.uint8 else "float32"
    return {
        "fnl_version": fnl.__version__,
        "precision": model_precision(model),
        "input": f"image (1, 3, H, W) RGB {dtype}, resized to the test size; normalization and padding to a "
                 f"multiple of {model.size_divisibility} are inside the graph",
        "boxes": "XYXY in the input image's pixels; scale to the original image outside",
    }


@contextmanager
def _expected_export_warnings_silenced() -> Iterator[None]:
    """Silence what the exporter says on every export and is expected here, so that a TracerWarning (a Python
    decision on a traced value, which would freeze the sample image's branch into the graph) stands out."""
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deliberate (int8, see the module docstring).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.")
        # An int8 model arrives traced (see export_graph); torch.onnx says so, and finds no Python signature.
        warnings.filterwarnings("ignore", category=UserWarning, message="The input to trace is already a ScriptModule")
        warnings.filterwarnings("ignore", category=UserWarning, message="no signature found for")
        # Quantize modules read their own scale and zero point (buffers, constants of the graph) as Python numbers.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"torch\.ao\.nn\.quantized\.")
        # torchvision's detection ops are written for tracing (its own ONNX tests run them): constants built with
        # torch.tensor (0.5 in BoxCoder), torch.tensor(traced image size) in clip_boxes_to_image (stays dynamic,
        # whatever the warning says), and batched_nms's size heuristic, which picks the same branch when tracing.
        warnings.filterwarnings("ignore", category=UserWarning, message="To copy construct from a tensor")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"torchvision\.")
        # On int8 tensors the BiFPN's fusion weights (parameters: constants of the graph) scale through Python floats.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"fnl\.modeling\.necks\Z",
                                message="Converting a tensor to a Python float")
        # Shape checks on static dimensions (image channels in normalize; RoI columns in torchvision's roi_align,
        # through torch._assert): true for every input the graph accepts.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"fnl\.modeling\.meta_arch\Z")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"torch\Z")
        yield
