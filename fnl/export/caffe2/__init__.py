"""Caffe2 export: a model as Caffe2 NetDef protobufs (float32 or QNNPACK int8), checked by executing them.

Caffe2 is legacy: PyTorch stopped building it by default in 1.11 and deleted its sources in 2024, and no Caffe2
runtime exists for Python 3.11. The files are for the runtimes that still load Caffe2 nets: Caffe2 mobile builds and
PyTorch <= 1.x builds with Caffe2 (``caffe2.python.workspace``, ``caffe2::Predictor``), with QNNPACK for the
``Int8*`` operators. Nothing here needs such a runtime: the schema is built with protobuf
(``fnl.export.caffe2.proto``) and the nets run in ``fnl.export.caffe2.executor``, a Python reference executor that
is a checker, not a device runtime.

- ``to_caffe2(model, output_dir)`` (``writer``): model.pb, model_init.pb, model.pbtxt;
- ``Caffe2Predictor(output_dir)`` (``predictor``): the model's list[dict] interface over the executor;
- ``verify_caffe2(model, output_dir, images)`` / ``caffe2_report_row(...)`` (``verify``): comparison with ONNX
  Runtime (float32) or the PyTorch int8 model, and a report row (size, AP; no latency).

Names resolve lazily, so importing the package does not import torch.
"""

from __future__ import annotations

from fnl.utils.lazy import lazy_getattr

_EXPORTS = {
    "to_caffe2": "fnl.export.caffe2.writer",
    "Caffe2Export": "fnl.export.caffe2.writer",
    "Caffe2Predictor": "fnl.export.caffe2.predictor",
    "NetExecutor": "fnl.export.caffe2.executor",
    "UnsupportedOperatorError": "fnl.export.caffe2.executor",
    "Caffe2ExecutionError": "fnl.export.caffe2.executor",
    "Caffe2ModelError": "fnl.export.caffe2.proto",
    "load_netdef": "fnl.export.caffe2.proto",
    "verify_caffe2": "fnl.export.caffe2.verify",
    "Caffe2Verification": "fnl.export.caffe2.verify",
    "caffe2_report_row": "fnl.export.caffe2.verify",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
