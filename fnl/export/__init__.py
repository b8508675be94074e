"""Export to deployment formats and check the result against PyTorch.

``to_onnx`` (fnl.export.onnx) writes the whole model, float32 or eager int8, as one ONNX graph, ``OnnxPredictor``
(fnl.export.runtime) runs it in ONNX Runtime with the PyTorch model's interface, ``verify_onnx`` (fnl.export.verify)
compares the two, ``ort_static_ptq`` (fnl.export.ort_quantize) is ONNX Runtime's own int8 quantization of a float
export, and ``export_and_report`` (fnl.export.pipeline) does all of it for a fnl-quantize output directory and writes
the size / AP / FPS report.

Names resolve lazily: ``fnl.export.runtime`` must import in a process that never loads torch, and importing it
imports this package first.
"""

from __future__ import annotations

from fnl.utils.lazy import lazy_getattr

_EXPORTS = {
    "to_onnx": "fnl.export.onnx",
    "export_graph": "fnl.export.onnx",
    "ExportableRCNN": "fnl.export.onnx",
    "OnnxPredictor": "fnl.export.runtime",
    "OnnxModelError": "fnl.export.runtime",
    "verify_onnx": "fnl.export.verify",
    "Criteria": "fnl.export.verify",
    "FLOAT32": "fnl.export.verify",
    "INT8": "fnl.export.verify",
    "ap_rows": "fnl.export.verify",
    "ort_static_ptq": "fnl.export.ort_quantize",
    "export_and_report": "fnl.export.pipeline",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
