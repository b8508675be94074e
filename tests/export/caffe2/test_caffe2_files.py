"""The files: protobufs that parse with caffe2.proto's field numbers, a readable text format, clear errors."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
from caffe2_testing import QUANTIZATION_WARNINGS
from google.protobuf import text_format

from fnl.export.caffe2 import Caffe2ModelError, Caffe2Predictor, NetExecutor, UnsupportedOperatorError, load_netdef
from fnl.export.caffe2.proto import NetDef, make_op
from fnl.export.caffe2.writer import INIT_NET_FILE, PREDICT_NET_FILE, PREDICT_NET_TEXT_FILE

pytestmark = QUANTIZATION_WARNINGS

# Field numbers and wire types of caffe2.proto (PyTorch 1.x, caffe2/proto/caffe2.proto), written out here
# independently of fnl.export.caffe2.proto: 0 varint, 1 64-bit, 2 length-delimited, 5 32-bit.
NETDEF = {1: ("name", 2), 2: ("op", 2), 3: ("type", 2), 4: ("num_workers", 0), 5: ("device_option", 2),
          6: ("arg", 2), 7: ("external_input", 2), 8: ("external_output", 2), 9: ("partition_info", 2)}
OPERATORDEF = {1: ("input", 2), 2: ("output", 2), 3: ("name", 2), 4: ("type", 2), 5: ("arg", 2),
               6: ("device_option", 2), 7: ("engine", 2), 8: ("control_input", 2), 9: ("is_gradient_op", 0),
               10: ("debug_info", 2), 11: ("domain", 2), 12: ("op_version", 0)}
ARGUMENT = {1: ("name", 2), 2: ("f", 5), 3: ("i", 0), 4: ("s", 2), 5: ("floats", 5), 6: ("ints", 0),
            7: ("strings", 2), 8: ("n", 2), 9: ("nets", 2), 10: ("t", 2), 11: ("tensors", 2), 12: ("qtensors", 2)}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def decode(data: bytes, schema: dict[int, tuple[str, int]]) -> dict[str, list]:
    """Minimal protobuf wire decoder: fields by name, checking each field number and wire type against schema."""
    fields: dict[str, list] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        assert number in schema, f"field number {number} is not in caffe2.proto's message"
        name, expected_wire = schema[number]
        assert wire == expected_wire, f"field {name} ({number}) has wire type {wire}, expected {expected_wire}"
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 5:
            value, pos = struct.unpack("<f", data[pos:pos + 4])[0], pos + 4
        else:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        fields.setdefault(name, []).append(value)
    return fields


def decode_ops(path: Path) -> list[tuple[str, dict[str, dict[str, list]]]]:
    net = decode(path.read_bytes(), NETDEF)
    ops = []
    for raw in net["op"]:
        op = decode(raw, OPERATORDEF)
        args = {decode(a, ARGUMENT)["name"][0].decode(): decode(a, ARGUMENT) for a in op.get("arg", [])}
        ops.append((op["type"][0].decode(), args))
    return ops


def test_predict_net_decodes_with_caffe2_proto_field_numbers(caffe2_float):
    ops = decode_ops(caffe2_float.directory / PREDICT_NET_FILE)
    types = {op_type for op_type, _ in ops}
    assert {"Conv", "GenerateProposals", "DistributeFpnProposals", "RoIAlign", "BatchPermutation", "BBoxTransform",
            "BoxWithNMSLimit", "ConvTranspose", "ResizeNearest"} <= types
    conv = next(args for op_type, args in ops if op_type == "Conv")
    assert conv["order"]["s"] == [b"NCHW"] and len(conv["kernels"]["ints"]) == 2 and len(conv["pads"]["ints"]) == 4
    proposals = next(args for op_type, args in ops if op_type == "GenerateProposals")
    assert proposals["legacy_plus_one"]["i"] == [0] and proposals["spatial_scale"]["f"] == [0.25]
    net = decode((caffe2_float.directory / PREDICT_NET_FILE).read_bytes(), NETDEF)
    assert [n.decode() for n in net["external_output"]] == ["boxes", "scores", "classes", "coarse_segm",
                                                            "fine_segm", "u", "v"]
    assert [n.decode() for n in net["external_input"][:2]] == ["data", "im_info"]


def test_init_net_holds_weights_as_given_tensor_fills(caffe2_float, caffe2_int8):
    fills = decode_ops(caffe2_float.directory / INIT_NET_FILE)
    assert {op_type for op_type, _ in fills} == {"GivenTensorFill"}
    shape, values = fills[0][1]["shape"]["ints"], fills[0][1]["values"]["floats"]
    assert len(values) == max(1, math.prod(shape))
    int8_fills = decode_ops(caffe2_int8.directory / INIT_NET_FILE)
    assert {"Int8GivenTensorFill", "Int8GivenIntTensorFill", "GivenTensorFill"} <= {t for t, _ in int8_fills}
    weight = next(args for op_type, args in int8_fills if op_type == "Int8GivenTensorFill")
    assert weight["Y_zero_point"]["i"] == [128]  # symmetric int8 stored as uint8 + 128
    assert len(weight["values"]["s"][0]) == math.prod(weight["shape"]["ints"])
    assert not any("Y_scales" in args for _, args in int8_fills)  # stock files: one scale per tensor


def test_pbtxt_is_the_predict_net_in_text_format(caffe2_float):
    text = (caffe2_float.directory / PREDICT_NET_TEXT_FILE).read_text()
    assert 'type: "BoxWithNMSLimit"' in text
    parsed = text_format.Parse(text, NetDef())
    assert parsed == load_netdef(caffe2_float.directory / PREDICT_NET_FILE)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_pb_is_refused_naming_the_file(caffe2_float, tmp_path, damage):
    data = (caffe2_float.directory / PREDICT_NET_FILE).read_bytes()
    bad = {"truncated": data[: len(data) // 2], "garbage": bytes(range(256)) * 4, "empty": b""}[damage]
    path = tmp_path / PREDICT_NET_FILE
    path.write_bytes(bad)
    with pytest.raises(Caffe2ModelError, match=str(path)):
        load_netdef(path)
    (tmp_path / INIT_NET_FILE).write_bytes((caffe2_float.directory / INIT_NET_FILE).read_bytes())
    with pytest.raises(Caffe2ModelError, match=PREDICT_NET_FILE):
        Caffe2Predictor(tmp_path)


def test_an_unknown_operator_is_refused_with_its_type_and_position(caffe2_float):
    net = load_netdef(caffe2_float.directory / PREDICT_NET_FILE)
    net.op.insert(3, make_op("FancyNewOp", ["data"], ["fancy"]))
    with pytest.raises(UnsupportedOperatorError, match=r"operator #3 .* type 'FancyNewOp'"):
        NetExecutor(net, load_netdef(caffe2_float.directory / INIT_NET_FILE))
