"""ExecuTorch export of a PT2E int8 model (``fnl.qat.pt2e``), or of a float32 model for comparison in the same
runtime: one XNNPACK ``.pte`` program per region, driven by the model's own float code in Python.

Layout of an export directory:
- ``backbone.pte``, ``rpn_head.pte``, ``box_head.pte``, ``densepose_head.pte``: each region of
  ``fnl.qat.patch.QUANTIZED_REGIONS`` re-captured at inference shapes (batch 1, H and W dynamic up to
  ``INPUT.MAX_SIZE_TEST``; RoIs dynamic up to what the RPN / the detector can return) from the converted PT2E graph,
  or for a float32 model from its modules, rewritten where XNNPACK has no kernel (``fnl.export.xnnpack_rewrites``,
  exact) and lowered with ``to_edge_transform_and_lower(..., XnnpackPartitioner())`` and ``to_executorch``
  (XNNPACK's int8 or float32 kernels);
- ``executorch.json``: the config, the precision, and per region its file, the modules it stands for and the pytree
  specs of its inputs and outputs.

The programs are pieces, not one program: proposal decoding, NMS and RoIAlign are the float glue between them, and
``ExecuTorchPredictor`` runs that glue with ``GeneralizedRCNN`` itself (built from the stored config; it has no
weights outside the regions), with each region's modules replaced by the loaded ``.pte`` method. The predictor takes
and returns what the PyTorch model does (list of dicts in; ``boxes``, ``scores``, ``classes``, ``densepose`` out), and
``run_image`` gives the graph outputs by name as ``fnl.export.runtime.OnnxPredictor`` does, so the evaluator,
``fnl.engine.benchmark.measure`` and the verification run on it unchanged.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from fnl.config import CfgNode, stored_config
from fnl.engine.backends import XNNPACK
from fnl.engine.benchmark import measure
from fnl.engine.report import REPORT_JSON, ReportRow, file_megabytes, write_report
from fnl.export.onnx import ExportableRCNN
from fnl.export.pipeline import quantize_outputs, split_images
from fnl.export.runtime import GraphPredictor
from fnl.export.verify import FLOAT32, INT8, Criteria, VerificationReport, ap_rows, verify_predictor
from fnl.export.xnnpack_rewrites import parameter_scalars_as_constants, resamplings_as_convs
from fnl.modeling import build_model
from fnl.qat.patch import IMAGE, active_regions
from fnl.qat.pt2e import (
    PT2E_CHECKPOINT,
    PT2E_PTQ_CHECKPOINT,
    capture_region,
    exported_regions,
    install_region,
    load_pt2e_checkpoint,
    require_pt2e,
)
from fnl.qat.regions import RegionCapture, region_captures, run_per_level
from fnl.qat.serialization import load_model_for_inference
from fnl.utils.errors import InvalidArgumentError, UserError
from fnl.utils.io import refuse_overwrite, write_bytes_atomic, write_json_atomic
from fnl.utils.modules import eval_mode, torch_threads

logger = logging.getLogger("fnl")

MANIFEST = "executorch.json"
MAX_PLANNED_ROIS = 1024  # more RoIs run in chunks (ExecuTorchRegion)
FORMAT = "fnl-executorch-1"


class ExecuTorchModelError(UserError, ValueError):
    """An export directory is missing files or was not written by ``to_executorch``; names the path."""


@dataclass
class ExecuTorchExport:
    directory: Path
    files: list[Path] = field(default_factory=list)
    precision: str = "int8"  # or "float32"

    @property
    def size_mb(self) -> float:
        """All .pte programs together: what a deployment ships (the glue is code, not weights)."""
        return sum(file_megabytes(path) for path in self.files)

    def bytes_by_part(self) -> dict[str, int]:
        """``program_bytes`` summed over the programs."""
        totals: dict[str, int] = {}
        for path in self.files:
            for part, size in program_bytes(path).items():
                totals[part] = totals.get(part, 0) + size
        return totals


PROGRAM_PARTS = ("tensors", "channel_scales", "xnnpack_graph", "rest")


def program_bytes(path: str | Path) -> dict[str, int]:
    """Where a ``.pte`` file's bytes go (``PROGRAM_PARTS``): the constant tensors (weights, biases; XNNPACK's named
    data and ExecuTorch's own constants) less ``channel_scales``, the float32 scale per output channel that XNNPACK
    stores for every per-channel int8 weight and int32 bias (its named-data keys start with "scale_", executorch
    1.5.1); ``xnnpack_graph``, the serialized XNNPACK graphs; ``rest``, the program itself, the names and padding."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    data = Path(path).read_bytes()
    pte = deserialize_pte_binary(data)
    named = pte.named_data.pte_data.items() if pte.named_data is not None else []
    sizes = {key: len(pte.named_data.buffers[entry.buffer_index]) for key, entry in named}
    scales = sum(size for key, size in sizes.items() if key.startswith("scale_"))
    tensors = sum(sizes.values()) - scales + sum(len(b.storage) for b in pte.program.constant_buffer)
    graph = sum(len(delegate.data) for delegate in pte.program.backend_delegate_data)
    return {"tensors": tensors, "channel_scales": scales, "xnnpack_graph": graph,
            "rest": len(data) - tensors - scales - graph}


def region_files(directory: str | Path, model: nn.Module) -> list[Path]:
    return [Path(directory) / f"{region.name}.pte" for region in active_regions(model)]


def duplicate_shared_nodes(program: torch.fx.GraphModule) -> int:
    """Give every user of a dequantize or a constant its own copy; returns how many copies were made. Values are
    unchanged; two failures of XNNPACK's lowering go away (executorch 1.5.1; when this can go: docs/NOTES.md):
    - its channels-last pass fails on a partition output that is a dequantize also used inside the partition (the
      BiFPN's levels, which feed a fusion and leave for an upsampling XNNPACK cannot run);
    - a conv whose weight and bias are shared by several calls with different input scales (the RPN head on every
      level) gets one bias for all of them, and XNNPACK refuses the bias scale of all but one.
    """
    copies = 0
    dequantize = (torch.ops.quantized_decomposed.dequantize_per_tensor.default,
                  torch.ops.quantized_decomposed.dequantize_per_channel.default)
    for node in list(program.graph.nodes):
        if not (node.op == "get_attr" or node.op == "call_function" and node.target in dequantize):
            continue
        for user in list(node.users)[1:]:
            with program.graph.inserting_before(user):
                twin = program.graph.node_copy(node)
            user.replace_input_with(node, twin)
            copies += 1
    program.recompile()
    return copies


def int8_global_pools(program: torch.fx.GraphModule) -> list[str]:
    """The nodes of a converted PT2E graph that XNNPACK would run as int8 global average pooling: an
    ``adaptive_avg_pool2d`` to 1 x 1 (or a mean over H and W) of a dequantized tensor, as the DensePose head's ASPP
    pooling branch."""
    dequantize = (torch.ops.quantized_decomposed.dequantize_per_tensor.default,
                  torch.ops.quantized_decomposed.dequantize_per_tensor.tensor)
    pools = []
    for node in program.graph.nodes:
        global_pool = (node.target == torch.ops.aten.adaptive_avg_pool2d.default and list(node.args[1]) == [1, 1]
                       or node.target == torch.ops.aten.mean.dim and sorted(d % 4 for d in node.args[1]) == [2, 3])
        if node.op == "call_function" and global_pool and getattr(node.args[0], "target", None) in dequantize:
            pools.append(node.name)
    return pools


@functools.cache
def _float_global_pool_config() -> type:
    """XNNPACK's partitioner config of ``mean.dim`` (its global average pooling) that leaves int8 ones out of the
    partitions: such a mean then runs in float on ExecuTorch's portable kernel between a dequantize and a quantize
    that XNNPACK runs, the arithmetic of PyTorch's reference ops."""
    from executorch.backends.xnnpack.partition.config.generic_node_configs import MeanDimConfig, why
    from executorch.backends.xnnpack.utils.quant_utils import is_dequant

    class FloatGlobalPoolConfig(MeanDimConfig):
        def check_constraints(self, node: torch.fx.Node, ep: Any) -> bool:
            if is_dequant(node.args[0]):
                why(node, reason="int8 global average pooling in a program of dynamic batch size (fnl: "
                                 "XNNPACK.dynamic_int8_global_pool)")
                return False
            return super().check_constraints(node, ep)

    return FloatGlobalPoolConfig


def xnnpack_partitioner(float_global_pools: bool = False) -> Any:
    """ExecuTorch's XNNPACK partitioner; with ``float_global_pools``, int8 global average pools stay out of it."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import MeanDimConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    if not float_global_pools:
        return XnnpackPartitioner()
    return XnnpackPartitioner(configs=[_float_global_pool_config() if config is MeanDimConfig else config
                                       for config in ALL_PARTITIONER_CONFIGS])


def lower_to_xnnpack(program: torch.fx.GraphModule, args: tuple[Any, ...], dynamic_shapes: tuple[Any, ...] | None,
                     name: str = "program") -> tuple[bytes, Any, Any]:
    """An int8 PT2E graph (or a float32 one) as an XNNPACK ``.pte`` buffer, with the pytree specs of its inputs and
    outputs (``xnnpack_program``, then ``to_executorch``)."""
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    exported, lowered = xnnpack_program(program, args, dynamic_shapes, name)
    # Memory planned for the upper bounds of the dynamic sizes, not for the example inputs' sizes (ExecuTorch's
    # default): model B's box head takes ~380 RoIs per image in one call.
    config = ExecutorchBackendConfig(sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass())
    return lowered.to_executorch(config).buffer, exported.call_spec.in_spec, exported.call_spec.out_spec


def xnnpack_program(program: torch.fx.GraphModule, args: tuple[Any, ...], dynamic_shapes: tuple[Any, ...] | None,
                    name: str = "program") -> tuple[torch.export.ExportedProgram, Any]:
    """``program`` exported at ``args`` / ``dynamic_shapes`` and lowered with XNNPACK's partitioner: the exported
    program and ExecuTorch's edge program manager. ``program`` is not modified: a copy gets
    ``fnl.export.xnnpack_rewrites``'s exact rewrites so that XNNPACK takes what ExecuTorch's portable kernels would
    run.

    In a program with dynamic shapes (the RoI heads), the int8 global average pools run in float when the backend
    policy says XNNPACK's are wrong there (``XNNPACK.dynamic_int8_global_pool``: after a call with fewer RoIs, a
    call with more gets garbage for some of them; executorch 1.5.1, docs/NOTES.md); each is logged."""
    # executorch is an optional extra (fnl[executorch]): imported only when a program is lowered
    from executorch.exir import to_edge_transform_and_lower

    float_pools = [] if dynamic_shapes is None or XNNPACK.dynamic_int8_global_pool else int8_global_pools(program)
    for pool in float_pools:
        logger.info("%s: int8 global average pool '%s' runs in float outside XNNPACK (XNNPACK's is wrong when the "
                    "batch size grows between calls; docs/NOTES.md)", name, pool)
    program = copy.deepcopy(program)
    rewritten = parameter_scalars_as_constants(program) + resamplings_as_convs(program, args,
                                                                                dynamic=dynamic_shapes is not None)
    if rewritten:
        logger.info("%s: %d ops rewritten for XNNPACK (fnl.export.xnnpack_rewrites)", name, rewritten)
    duplicate_shared_nodes(program)
    exported = torch.export.export(program, args, dynamic_shapes=dynamic_shapes)
    return exported, to_edge_transform_and_lower(exported, partitioner=[xnnpack_partitioner(bool(float_pools))])


def program_image_size(cfg: CfgNode, input_size: int | None = None) -> tuple[int, int]:
    """The backbone program's fixed (H, W): ``input_size`` (default INPUT.MIN_SIZE_TEST) rounded up to the padding
    multiple, square."""
    divisor = max(cfg.INPUT.SIZE_DIVISIBILITY, 1)
    side = math.ceil((input_size or cfg.INPUT.MIN_SIZE_TEST) / divisor) * divisor
    return side, side


def to_executorch(model: nn.Module, cfg: CfgNode, directory: str | Path, force: bool = False,
                  image_size: tuple[int, int] | None = None) -> ExecuTorchExport:
    """Lower every region of a converted PT2E model (``fnl.qat.pt2e.convert_pt2e_model``), or of a float32 model
    (no PT2E region at all: the regions' modules are captured as they are), to ``directory``.

    The backbone program has a fixed input size, ``image_size`` (default ``program_image_size(cfg)``): with dynamic
    H and W, XNNPACK leaves the convs whose output sizes the BiFPN's upsampling reads out of its partitions, and
    their per-channel weights then have no ExecuTorch kernel. ``ExecuTorchPredictor`` zero-pads smaller images to
    it and crops the features back (larger images are refused). The other programs keep dynamic sizes.
    Existing files are refused unless ``force``; every file is written atomically, the manifest last.
    """
    require_pt2e()
    directory = Path(directory)
    regions = active_regions(model)
    programs = {module.region: module for module in exported_regions(model)}
    missing = [region.name for region in regions if region.name not in programs or not programs[region.name].converted]
    if programs and missing:
        raise ValueError(f"regions {missing} are not converted PT2E programs: export the int8 model of "
                         "fnl.qat.pt2e.convert_pt2e_model (fnl-quantize --engine pt2e), or a float32 model")
    precision = "int8" if programs else "float32"
    paths = region_files(directory, model)
    for path in [*paths, directory / MANIFEST]:
        refuse_overwrite(path, force)
    heads = cfg.MODEL
    # Inference shapes: one image; at most POST_NMS_TOPK_TEST proposals per RPN level reach the box head, at most
    # DETECTIONS_PER_IMAGE detections the DensePose head. ExecuTorch plans memory for these upper bounds.
    max_rois = {"box_head": min(heads.RPN.POST_NMS_TOPK_TEST * len(heads.RPN.IN_FEATURES), MAX_PLANNED_ROIS),
                "densepose_head": min(heads.ROI_HEADS.DETECTIONS_PER_IMAGE, MAX_PLANNED_ROIS)}
    entries = []
    with eval_mode(model), torch.no_grad():
        for region, path in zip(regions, paths, strict=True):
            captures = region_captures(model, cfg, max_size=cfg.INPUT.MAX_SIZE_TEST, batch=1,
                                       max_rois=max_rois.get(region.name, 1))
            args, dynamic_shapes = captures[region.name].args, captures[region.name].dynamic_shapes
            if region.name in max_rois:
                # Example RoIs at the upper bound: from a smaller example, torch's fake conv (choosing a conv backend
                # by batch size) narrows the RoI dimension to under 16 while ExecuTorch lowers, and the program's
                # memory is planned for 15 RoIs (docs/NOTES.md).
                args = tuple(torch.zeros((max_rois[region.name], *a.shape[1:]), dtype=a.dtype) for a in args)
            entry: dict[str, Any] = {"name": region.name, "modules": list(region.modules), "file": path.name}
            if captures[region.name].per_level:
                entry["per_level"] = True
            if region.entry == IMAGE:
                entry["image_size"] = list(image_size or program_image_size(cfg))
                args, dynamic_shapes = (torch.zeros(1, 3, *entry["image_size"]),), None
            if programs:
                program = programs[region.name].program
            else:
                program = capture_region(model, region, RegionCapture(args, dynamic_shapes))
            buffer, in_spec, out_spec = lower_to_xnnpack(program, args, dynamic_shapes, region.name)
            write_bytes_atomic(path, buffer)
            entries.append({**entry, "inputs": pytree.treespec_dumps(in_spec),
                            "outputs": pytree.treespec_dumps(out_spec)})
    write_json_atomic(directory / MANIFEST, {"format": FORMAT, "precision": precision, "config": cfg.dump(),
                                             "regions": entries})
    return ExecuTorchExport(directory, paths, precision)


class ExecuTorchRegion(nn.Module):
    """A loaded ``.pte`` method where a region's first module was: flattens the inputs as the program was
    captured, runs it in the ExecuTorch runtime, and rebuilds the outputs' structure.

    The programs take at least one RoI; an empty RoI batch (no detections) runs one zero RoI and keeps none of its
    outputs, so the shapes stay what the model expects. A program with a fixed ``image_size`` (the backbone) gets
    its image zero-padded to that size and its feature maps cropped to what the image itself gives.
    """

    def __init__(self, name: str, method: Any, out_spec: Any, image_size: tuple[int, int] | None = None,
                 per_level: bool = False) -> None:
        super().__init__()
        self.region = name
        self.method = method
        self.out_spec = out_spec
        self.image_size = image_size
        self.per_level = per_level
        self.seconds = 0.0  # time spent in the program (ExecuTorch), all calls: what the benchmarks split by region

    def forward(self, x: Any) -> Any:
        if self.image_size is not None:
            return self._run_padded(x)
        if self.per_level:
            return run_per_level(self._run, x)
        return self._run(x)

    def _run(self, x: Any) -> Any:
        inputs = pytree.tree_flatten(((x,), {}))[0]
        if len(inputs) == 1 and inputs[0].shape[0] != 1:  # a batch of RoIs
            outputs = self._run_rois(inputs[0])
        else:
            outputs = self._execute(inputs)
        return pytree.tree_unflatten(list(outputs), self.out_spec)

    def _execute(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        start = time.perf_counter()
        # The outputs live in the program's planned memory, which the next call of the same method overwrites.
        outputs = [t.clone() for t in self.method.execute([t.contiguous() for t in inputs])]
        self.seconds += time.perf_counter() - start
        return outputs

    def _run_rois(self, rois: torch.Tensor) -> list[torch.Tensor]:
        """RoIs in chunks of what the program's memory plan holds (ExecuTorch plans the RoI programs for fewer RoIs
        than the capture's upper bound, docs/NOTES.md; the method's input metadata says how many)."""
        capacity = int(self.method.metadata.input_tensor_meta(0).sizes()[0])
        if rois.shape[0] == 0:
            return [t[:0] for t in self._execute([rois.new_zeros((1, *rois.shape[1:]))])]
        chunks = [self._execute([chunk]) for chunk in rois.split(capacity)]
        return chunks[0] if len(chunks) == 1 else [torch.cat(parts) for parts in zip(*chunks, strict=True)]

    def _run_padded(self, images: torch.Tensor) -> Any:
        (height, width), (program_height, program_width) = images.shape[-2:], self.image_size
        if images.shape[0] != 1 or height > program_height or width > program_width:
            raise InvalidArgumentError(f"the ExecuTorch backbone program takes one image of at most {program_height}x"
                                       f"{program_width} (padded), got {tuple(images.shape)}: export with a larger "
                                       "--input-size")
        padded = torch.nn.functional.pad(images, (0, program_width - width, 0, program_height - height))
        outputs = self._execute([padded])
        cropped = [t[..., :math.ceil(t.shape[-2] * height / program_height),
                   :math.ceil(t.shape[-1] * width / program_width)] for t in outputs]
        return pytree.tree_unflatten(cropped, self.out_spec)

    def extra_repr(self) -> str:
        return f"region='{self.region}' (ExecuTorch XNNPACK program)"


def _set_threads(threads: int) -> None:
    """XNNPACK's thread pool size (process-wide in the ExecuTorch runtime)."""
    if threads < 1:
        raise InvalidArgumentError(f"threads must be at least 1, got {threads}")
    from executorch.extension.pybindings import portable_lib  # optional extra: imported only when used

    portable_lib._unsafe_reset_threadpool(threads)


class ExecuTorchPredictor(GraphPredictor):
    """list[dict] -> list[dict] as ``GeneralizedRCNN`` in eval mode, the regions (int8, or float32: ``precision``)
    run by ExecuTorch (XNNPACK, ``threads`` threads) and the float glue by the model's own code on torch."""

    def __init__(self, directory: str | Path, threads: int = 2) -> None:
        require_pt2e()
        from executorch.runtime import Runtime  # executorch is an optional extra: imported only when used

        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        cfg = stored_config(manifest["config"], source=f"{self.directory / MANIFEST}")
        cfg.MODEL.DEVICE = "cpu"
        self.cfg = cfg.freeze()
        self.precision = manifest.get("precision", "int8")  # exports before float32 ones were all int8
        _set_threads(threads)
        model = build_model(self.cfg).eval()
        runtime = Runtime.get()
        for entry in manifest["regions"]:
            method = runtime.load_program(self.directory / entry["file"]).load_method("forward")
            image_size = tuple(entry["image_size"]) if "image_size" in entry else None
            region = ExecuTorchRegion(entry["name"], method, pytree.treespec_loads(entry["outputs"]), image_size,
                                      entry.get("per_level", False))
            install_region(model, entry["modules"], region)
        self.model = model
        self.graph = ExportableRCNN(model)
        self.output_names = self.graph.output_names
        self.has_densepose = model.roi_heads.densepose_on
        self.files = [self.directory / entry["file"] for entry in manifest["regions"]]

    def run_image(self, image: Any) -> dict[str, np.ndarray]:
        """One (3, H, W) RGB image -> the outputs by name, boxes in the input image's pixels."""
        pixels = torch.as_tensor(np.asarray(image))
        with torch.no_grad():
            outputs = self.graph(pixels[None])
        return {name: t.numpy() for name, t in zip(self.output_names, outputs, strict=True)}


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise ExecuTorchModelError(f"{path} not found: {directory} is not an ExecuTorch export of fnl-export")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExecuTorchModelError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise ExecuTorchModelError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    missing = [entry["file"] for entry in manifest["regions"] if not (directory / entry["file"]).is_file()]
    if missing:
        raise ExecuTorchModelError(f"{directory} lacks the programs {missing} its manifest names")
    return manifest


def verify_executorch(model: nn.Module, predictor: ExecuTorchPredictor, images: Iterable[Any],
                      criteria: Criteria = INT8) -> VerificationReport:
    """The PyTorch PT2E int8 ``model`` against its ExecuTorch export on ``images``: fnl.export.verify's comparison
    (pairing, DensePose heads on the export's boxes, the int8 pairing floor) over this predictor."""
    return verify_predictor(model, predictor, images, criteria)


def executorch_row_name(precision: str, method: str) -> str:
    """The name of an ExecuTorch export's report row, e.g. "ExecuTorch int8 (PT2E QAT, XNNPACK)"."""
    if precision == "float32":
        return "ExecuTorch float32 (XNNPACK)"
    return f"ExecuTorch int8 (PT2E {method.upper()}, XNNPACK)"


def executorch_row(directory: str | Path, cfg: CfgNode, method: str, threads: int = 2,
                   name: str | None = None, dataset_dicts: list[dict] | None = None) -> tuple[ReportRow, dict]:
    """The report row of an ExecuTorch export (format "executorch", its precision): size of its .pte files, box
    and DensePose AP on the test split of ``cfg`` (or ``dataset_dicts``), latency per image through the ExecuTorch
    runtime (``threads`` XNNPACK threads; the float glue on torch's threads as set by the caller), with
    fnl.engine.benchmark.measure."""
    predictor = ExecuTorchPredictor(directory, threads)
    size = sum(file_megabytes(path) for path in predictor.files)
    return measure(name or executorch_row_name(predictor.precision, method), "executorch", predictor.precision,
                   method, predictor, cfg, size, dataset_dicts=dataset_dicts)


EXECUTORCH_DIR, EXECUTORCH_PTQ_DIR, EXECUTORCH_FLOAT_DIR = "executorch", "executorch_ptq", "executorch_fp32"


def export_executorch_and_report(quantize_dir: str | Path, export_dir: str | Path, data_root: str | Path,
                                 threads: int = 2, verify_images: int = 8, force: bool = False,
                                 input_size: int | None = None) -> dict[str, Any]:
    """From a ``fnl-quantize --engine pt2e`` directory (model_fp32.pth, model_pt2e.pth, and model_pt2e_ptq.pth
    when QAT ran with its PTQ baseline): lower the float32 model (``export_dir/executorch_fp32``, XNNPACK's float32
    kernels: what int8 is compared against in the same runtime) and each PT2E int8 model (``export_dir/executorch``,
    the baseline to ``export_dir/executorch_ptq``), verify each against its PyTorch model (``FLOAT32`` / ``INT8``
    criteria on the first test images, AP on the test split) and write report.json / .md / .png with rows measured
    the same way (``fnl.engine.benchmark.measure``): PyTorch float32, ExecuTorch float32, then per int8 model PyTorch
    int8 (PT2E) and ExecuTorch int8 (XNNPACK)."""
    export_dir = Path(export_dir)
    float_checkpoint, pt2e_checkpoint, overrides = quantize_outputs(quantize_dir, PT2E_CHECKPOINT,
                                                                    "fnl-quantize --engine pt2e", data_root,
                                                                    input_size)
    exports = {EXECUTORCH_DIR: pt2e_checkpoint}
    if (pt2e_checkpoint.parent / PT2E_PTQ_CHECKPOINT).is_file():
        exports[EXECUTORCH_PTQ_DIR] = pt2e_checkpoint.parent / PT2E_PTQ_CHECKPOINT
    refuse_overwrite(export_dir / REPORT_JSON, force)
    verification: dict[str, VerificationReport] = {}
    written: dict[str, ExecuTorchExport] = {}
    with torch_threads(threads):
        float_model, cfg = load_model_for_inference(str(float_checkpoint), None, overrides)
        images = split_images(cfg, cfg.DATASETS.TEST[0], verify_images)
        torch_float, torch_float_results = measure("PyTorch float32", "pytorch", "float32", "float", float_model, cfg,
                                                   file_megabytes(float_checkpoint))
        written[EXECUTORCH_FLOAT_DIR] = to_executorch(float_model, cfg, export_dir / EXECUTORCH_FLOAT_DIR, force)
        predictor = ExecuTorchPredictor(written[EXECUTORCH_FLOAT_DIR].directory, threads)
        verification[EXECUTORCH_FLOAT_DIR] = verify_executorch(float_model, predictor, images, FLOAT32)
        executorch_float, executorch_float_results = measure(executorch_row_name("float32", "float"), "executorch",
                                                             "float32", "float", predictor, cfg,
                                                             written[EXECUTORCH_FLOAT_DIR].size_mb)
        verification[EXECUTORCH_FLOAT_DIR].rows.extend(ap_rows(torch_float_results, executorch_float_results,
                                                               FLOAT32))
        rows = [torch_float, executorch_float]
        for name, checkpoint in exports.items():
            int8_model, _, mode = load_pt2e_checkpoint(checkpoint)
            written[name] = to_executorch(int8_model, cfg, export_dir / name, force)
            predictor = ExecuTorchPredictor(written[name].directory, threads)
            verification[name] = verify_executorch(int8_model, predictor, images)
            torch_int8, torch_int8_results = measure(f"PyTorch int8 (PT2E {mode.upper()})", "pytorch", "int8", mode,
                                                     int8_model, cfg, None)
            executorch, executorch_results = measure(executorch_row_name("int8", mode), "executorch", "int8", mode,
                                                     predictor, cfg, written[name].size_mb)
            verification[name].rows.extend(ap_rows(torch_int8_results, executorch_results, INT8))
            rows += [torch_int8, executorch]
    sizes = "; ".join(f"`{name}/` {export.size_mb:.2f} MB, {rows[0].size_mb / export.size_mb:.2f}x smaller than the "
                      "float32 checkpoint" for name, export in written.items())
    notes = [
        "ExecuTorch: one XNNPACK program per region "
        f"({', '.join(p.name for p in written[EXECUTORCH_DIR].files)}); the size is their sum ({sizes}); proposal "
        "decoding, NMS and RoIAlign run between them in Python on torch. XNNPACK and torch both run with "
        f"{threads} thread(s).",
        *(f"Verification of `{name}/` against its PyTorch model:\n\n```\n{report.table()}\n```"
          for name, report in verification.items()),
    ]
    extra = {"verification": {name: report.as_dict() for name, report in verification.items()},
             "executorch": {name: {"files": [p.name for p in export.files], "size_mb": export.size_mb}
                            for name, export in written.items()}}
    return write_report(export_dir, rows, cfg.INPUT.MIN_SIZE_TEST, threads,
                        "fnl-export: PyTorch and ExecuTorch (XNNPACK), float32 and PT2E int8", notes, extra)
