"""Caffe2's protobuf messages (``caffe2.proto``), built with protobuf itself, and reading / writing NetDef files.

Why a descriptor built in Python: Caffe2 is gone from PyTorch and no ``caffe2_pb2`` module exists for Python 3.11;
this machine has no ``protoc`` binary and ``grpcio-tools`` (which bundles one) is not installed, and adding it would
only serve to compile one file at run time. So the schema is declared here as a ``FileDescriptorProto`` -- the same
object ``protoc`` produces from a ``.proto`` file -- with the message names, field numbers, types, labels, defaults
and ``packed`` options of ``caffe2/proto/caffe2.proto`` as PyTorch 1.x shipped it, and protobuf's ``message_factory``
turns it into message classes. Encoding, decoding and the text format are protobuf's own; no byte is hand-encoded.

Only the messages a model file holds are declared (``TensorProto``, ``QTensorProto``, ``TensorProtos``,
``Argument``, ``DeviceOption``, ``OperatorDef``, ``PartitionInfo`` and what it uses, ``NetDef``); plans, execution
steps, blobs and DB readers are not. The classes live in a private descriptor pool, so they never clash with a
``caffe2_pb2`` another library may have registered in protobuf's default pool.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, unknown_fields
from google.protobuf.message import DecodeError, Message

from fnl.utils.errors import UserError
from fnl.utils.io import atomic_path

PACKAGE = "caffe2"
_F = descriptor_pb2.FieldDescriptorProto

# (name, number, type, label, type_name or None, options) per field, exactly as caffe2.proto declares them.
_OPTIONAL, _REPEATED, _REQUIRED = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED, _F.LABEL_REQUIRED
_PACKED = {"packed": True}
_FieldSpec = tuple[str, int, int, int, str | None, dict[str, Any]]


def _field(name: str, number: int, kind: int, label: int = _OPTIONAL, type_name: str | None = None,
           **options: Any) -> _FieldSpec:
    return name, number, kind, label, type_name, options


_TENSOR_DATA_TYPES = [("UNDEFINED", 0), ("FLOAT", 1), ("INT32", 2), ("BYTE", 3), ("STRING", 4), ("BOOL", 5),
                      ("UINT8", 6), ("INT8", 7), ("UINT16", 8), ("INT16", 9), ("INT64", 10), ("FLOAT16", 12),
                      ("DOUBLE", 13), ("ZERO_COLLISION_HASH", 14), ("REBATCHING_BUFFER", 15)]
_DEVICE_TYPES = [("PROTO_CPU", 0), ("PROTO_CUDA", 1), ("PROTO_MKLDNN", 2), ("PROTO_OPENGL", 3), ("PROTO_OPENCL", 4),
                 ("PROTO_IDEEP", 5), ("PROTO_HIP", 6), ("PROTO_FPGA", 7), ("PROTO_MSNPU", 8), ("PROTO_XLA", 9),
                 ("PROTO_MLC", 10), ("PROTO_COMPILE_TIME_MAX_DEVICE_TYPES", 11)]

_MESSAGES: dict[str, list[_FieldSpec]] = {
    "TensorProto": [
        _field("dims", 1, _F.TYPE_INT64, _REPEATED),
        _field("data_type", 2, _F.TYPE_ENUM, type_name=".caffe2.TensorProto.DataType", default="FLOAT"),
        _field("data_format", 15, _F.TYPE_UINT32, default="0"),
        _field("float_data", 3, _F.TYPE_FLOAT, _REPEATED, **_PACKED),
        _field("int32_data", 4, _F.TYPE_INT32, _REPEATED, **_PACKED),
        _field("byte_data", 5, _F.TYPE_BYTES),
        _field("string_data", 6, _F.TYPE_BYTES, _REPEATED),
        _field("double_data", 9, _F.TYPE_DOUBLE, _REPEATED, **_PACKED),
        _field("int64_data", 10, _F.TYPE_INT64, _REPEATED, **_PACKED),
        _field("raw_data", 13, _F.TYPE_BYTES),
        _field("name", 7, _F.TYPE_STRING),
        _field("device_detail", 8, _F.TYPE_MESSAGE, type_name=".caffe2.DeviceOption"),
        _field("segment", 11, _F.TYPE_MESSAGE, type_name=".caffe2.TensorProto.Segment"),
    ],
    "TensorProto.Segment": [
        _field("begin", 1, _F.TYPE_INT64, _REQUIRED),
        _field("end", 2, _F.TYPE_INT64, _REQUIRED),
    ],
    "QTensorProto": [
        _field("dims", 1, _F.TYPE_INT64, _REPEATED),
        _field("precision", 2, _F.TYPE_INT32, _REQUIRED),
        _field("scale", 3, _F.TYPE_DOUBLE, _REQUIRED),
        _field("bias", 4, _F.TYPE_DOUBLE, _REQUIRED),
        _field("is_signed", 5, _F.TYPE_BOOL, _REQUIRED),
        _field("data", 6, _F.TYPE_INT32, _REPEATED, **_PACKED),
        _field("name", 7, _F.TYPE_STRING),
        _field("data_type", 8, _F.TYPE_ENUM, type_name=".caffe2.TensorProto.DataType", default="INT32"),
        _field("scales", 9, _F.TYPE_DOUBLE, _REPEATED),
        _field("biases", 10, _F.TYPE_DOUBLE, _REPEATED),
        _field("axis", 11, _F.TYPE_INT32),
        _field("is_multiparam", 12, _F.TYPE_BOOL, default="false"),
    ],
    "TensorProtos": [
        _field("protos", 1, _F.TYPE_MESSAGE, _REPEATED, ".caffe2.TensorProto"),
    ],
    "Argument": [
        _field("name", 1, _F.TYPE_STRING),
        _field("f", 2, _F.TYPE_FLOAT),
        _field("i", 3, _F.TYPE_INT64),
        _field("s", 4, _F.TYPE_BYTES),
        _field("t", 10, _F.TYPE_MESSAGE, type_name=".caffe2.TensorProto"),
        _field("n", 8, _F.TYPE_MESSAGE, type_name=".caffe2.NetDef"),
        _field("floats", 5, _F.TYPE_FLOAT, _REPEATED),
        _field("ints", 6, _F.TYPE_INT64, _REPEATED),
        _field("strings", 7, _F.TYPE_BYTES, _REPEATED),
        _field("tensors", 11, _F.TYPE_MESSAGE, _REPEATED, ".caffe2.TensorProto"),
        _field("nets", 9, _F.TYPE_MESSAGE, _REPEATED, ".caffe2.NetDef"),
        _field("qtensors", 12, _F.TYPE_MESSAGE, _REPEATED, ".caffe2.QTensorProto"),
    ],
    "DeviceOption": [
        _field("device_type", 1, _F.TYPE_INT32, default="0"),
        _field("device_id", 2, _F.TYPE_INT32),
        _field("random_seed", 3, _F.TYPE_UINT32),
        _field("node_name", 4, _F.TYPE_STRING),
        _field("numa_node_id", 5, _F.TYPE_INT32),
        _field("extra_info", 6, _F.TYPE_STRING, _REPEATED),
    ],
    "OperatorDef": [
        _field("input", 1, _F.TYPE_STRING, _REPEATED),
        _field("output", 2, _F.TYPE_STRING, _REPEATED),
        _field("name", 3, _F.TYPE_STRING),
        _field("type", 4, _F.TYPE_STRING),
        _field("arg", 5, _F.TYPE_MESSAGE, _REPEATED, ".caffe2.Argument"),
        _field("device_option", 6, _F.TYPE_MESSAGE, type_name=".caffe2.DeviceOption"),
        _field("engine", 7, _F.TYPE_STRING),
        _field("control_input", 8, _F.TYPE_STRING, _REPEATED),
        _field("is_gradient_op", 9, _F.TYPE_BOOL, default="false"),
        _field("debug_info", 10, _F.TYPE_STRING),
        _field("domain", 11, _F.TYPE_STRING),
        _field("op_version", 12, _F.TYPE_INT64),
    ],
    "MapFieldEntry": [
        _field("key", 1, _F.TYPE_STRING, _REQUIRED),
        _field("val", 2, _F.TYPE_STRING, _REQUIRED),
    ],
    "BackendOptions": [
        _field("backend_name", 1, _F.TYPE_STRING, _REQUIRED),
        _field("option", 2, _F.TYPE_MESSAGE, _REPEATED, ".caffe2.MapFieldEntry"),
    ],
    "PartitionInfo": [
        _field("name", 1, _F.TYPE_STRING, _REQUIRED),
        _field("device_id", 2, _F.TYPE_INT32, _REPEATED),
        _field("extra_info", 3, _F.TYPE_STRING),
        _field("backend_options", 4, _F.TYPE_MESSAGE, _REPEATED, ".caffe2.BackendOptions"),
    ],
    "NetDef": [
        _field("name", 1, _F.TYPE_STRING),
        _field("op", 2, _F.TYPE_MESSAGE, _REPEATED, ".caffe2.OperatorDef"),
        _field("type", 3, _F.TYPE_STRING),
        _field("num_workers", 4, _F.TYPE_INT32),
        _field("device_option", 5, _F.TYPE_MESSAGE, type_name=".caffe2.DeviceOption"),
        _field("arg", 6, _F.TYPE_MESSAGE, _REPEATED, ".caffe2.Argument"),
        _field("external_input", 7, _F.TYPE_STRING, _REPEATED),
        _field("external_output", 8, _F.TYPE_STRING, _REPEATED),
        _field("partition_info", 9, _F.TYPE_MESSAGE, _REPEATED, ".caffe2.PartitionInfo"),
    ],
}


def _add_fields(message: descriptor_pb2.DescriptorProto, fields: list[_FieldSpec]) -> None:
    for name, number, kind, label, type_name, options in fields:
        field = message.field.add(name=name, number=number, type=kind, label=label)
        if type_name is not None:
            field.type_name = type_name
        if "default" in options:
            field.default_value = options["default"]
        if options.get("packed"):
            field.options.packed = True


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(name="caffe2/proto/caffe2.proto", package=PACKAGE, syntax="proto2")
    device_types = file.enum_type.add(name="DeviceTypeProto")
    for name, number in _DEVICE_TYPES:
        device_types.value.add(name=name, number=number)
    messages: dict[str, descriptor_pb2.DescriptorProto] = {}
    for qualified, fields in _MESSAGES.items():
        parent, _, name = qualified.rpartition(".")
        container = messages[parent].nested_type if parent else file.message_type
        messages[qualified] = message = container.add(name=name)
        _add_fields(message, fields)
    data_type = messages["TensorProto"].enum_type.add(name="DataType")
    for name, number in _TENSOR_DATA_TYPES:
        data_type.value.add(name=name, number=number)
    formats = messages["TensorProto"].enum_type.add(name="SerializationFormat")
    formats.value.add(name="FMT_PROTOBUF", number=0)
    formats.value.add(name="FMT_BFLOAT16", number=1)
    return file


_POOL = descriptor_pool.DescriptorPool()
FILE_DESCRIPTOR = _POOL.Add(_file_descriptor())


def _message_class(name: str) -> type[Message]:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


NetDef = _message_class("NetDef")
OperatorDef = _message_class("OperatorDef")
Argument = _message_class("Argument")
TensorProto = _message_class("TensorProto")
QTensorProto = _message_class("QTensorProto")
DeviceOption = _message_class("DeviceOption")


class Caffe2ModelError(UserError, ValueError):
    """A NetDef file is missing, unreadable, not a NetDef, or not a net this package wrote; names the file."""


# --- arguments -------------------------------------------------------------------------------------------------
ArgValue = bool | int | float | str | bytes | Sequence[int] | Sequence[float] | Sequence[str] | np.ndarray


def make_argument(name: str, value: ArgValue) -> Message:
    """An Argument holding ``value`` in the field Caffe2 reads it from: ``i`` for bools and ints, ``f`` for floats,
    ``s`` for strings and bytes, ``ints`` / ``floats`` / ``strings`` for sequences (numpy arrays by dtype)."""
    arg = Argument(name=name)
    if isinstance(value, np.ndarray):
        value = value.reshape(-1).tolist()
    if isinstance(value, bool | int | np.integer):
        arg.i = int(value)
    elif isinstance(value, float | np.floating):
        arg.f = float(value)
    elif isinstance(value, str):
        arg.s = value.encode("utf-8")
    elif isinstance(value, bytes):
        arg.s = value
    elif isinstance(value, Sequence):
        items = list(value)
        if all(isinstance(v, str) for v in items) and items:
            arg.strings.extend(v.encode("utf-8") for v in items)
        elif all(isinstance(v, bool | int | np.integer) for v in items):
            arg.ints.extend(int(v) for v in items)
        elif all(isinstance(v, int | float | np.integer | np.floating) for v in items):
            arg.floats.extend(float(v) for v in items)
        else:
            raise TypeError(f"argument '{name}': a sequence mixing types {sorted({type(v).__name__ for v in items})}")
    else:
        raise TypeError(f"argument '{name}': cannot store a {type(value).__name__} in a Caffe2 Argument")
    return arg


def make_op(op_type: str, inputs: Iterable[str], outputs: Iterable[str], name: str = "",
            **arguments: ArgValue | None) -> Message:
    """An OperatorDef; arguments given as None are left out (the operator's default applies)."""
    op = OperatorDef(type=op_type, input=list(inputs), output=list(outputs))
    if name:
        op.name = name
    op.arg.extend(make_argument(key, value) for key, value in arguments.items() if value is not None)
    return op


def arguments_of(message: Message) -> dict[str, Message]:
    """Arguments of an OperatorDef or NetDef by name."""
    return {arg.name: arg for arg in message.arg}


# --- files ------------------------------------------------------------------------------------------------------
def save_netdef(net: Message, path: str | Path) -> Path:
    """Binary NetDef, written atomically."""
    path = Path(path)
    data = net.SerializeToString()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def save_netdef_text(net: Message, path: str | Path) -> Path:
    """The protobuf text format (what Caffe2's ``.pbtxt`` files hold), written atomically."""
    path = Path(path)
    text = text_format.MessageToString(net)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def load_netdef(path: str | Path) -> Message:
    """Parse a binary NetDef file; a missing, truncated, foreign or empty file raises Caffe2ModelError naming it."""
    path = Path(path)
    if not path.is_file():
        raise Caffe2ModelError(f"Caffe2 NetDef file not found: {path}")
    net = NetDef()
    try:
        net.ParseFromString(path.read_bytes())
    except DecodeError as exc:
        raise Caffe2ModelError(f"{path} is not a Caffe2 NetDef protobuf (corrupt or truncated?): {exc}") from exc
    # Random bytes often parse as a message made of unknown fields only: caffe2.proto knows every field we write.
    unknown = [message for message in (net, *net.op) if len(unknown_fields.UnknownFieldSet(message))]
    if unknown or not net.op:
        why = "it holds fields caffe2.proto does not declare" if unknown else "it has no operators"
        raise Caffe2ModelError(f"{path} is not a Caffe2 NetDef written by fnl: {why} (corrupt or another format?)")
    return net
