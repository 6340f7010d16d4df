"""Read and patch an ONNX model file without the ``onnx`` package (protobuf wire format, numpy only).

The device runner reads the trainable weights' initial values out of the portable artifact's
inference graph, and writes their current values into its graphs (to create a session, or the
fine-tuned ``model.onnx``) by replacing their ``raw_data`` bytes in place (same length). Only what
that needs is parsed: the graph's initializers (name, dims, data type, raw_data span), the names of
its inputs and outputs, and the opset imports; every other byte is copied unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import ArtifactError

# field numbers of onnx.proto3
_MODEL_GRAPH, _MODEL_OPSET = 7, 8
_GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT = 5, 11, 12
_VALUE_INFO_NAME = 1
_TENSOR_DIMS, _TENSOR_TYPE, _TENSOR_NAME, _TENSOR_RAW = 1, 2, 8, 9
_OPSET_DOMAIN, _OPSET_VERSION = 1, 2
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5
FLOAT = 1  # TensorProto.FLOAT


@dataclass(frozen=True)
class _Field:
    number: int
    wire: int
    start: int  # first byte of the key
    value: int  # first byte of the value (after the length of a bytes field)
    end: int  # one past the last byte


@dataclass(frozen=True)
class Initializer:
    name: str
    dims: tuple[int, ...]
    data_type: int
    raw: tuple[int, int] | None  # byte span of raw_data in the file


class OnnxFile:
    """The parts of a serialized ModelProto that the runner reads and patches."""

    def __init__(self, data: bytes, where: str = "model") -> None:
        self.data = data
        self.where = where
        try:
            top = list(_fields(data, 0, len(data)))
            graphs = [f for f in top if f.number == _MODEL_GRAPH and f.wire == _BYTES]
            if len(graphs) != 1:
                raise ValueError(f"{len(graphs)} graphs")
            graph = graphs[0]
            self.opsets = dict(_opset(data, f) for f in top if f.number == _MODEL_OPSET and f.wire == _BYTES)
            fields = [f for f in _fields(data, graph.value, graph.end) if f.wire == _BYTES]
            self.initializers = {
                init.name: init for init in (_initializer(data, f) for f in fields if f.number == _GRAPH_INITIALIZER)
            }
            initializer_names = set(self.initializers)
            self.inputs = [
                n for n in (_name(data, f) for f in fields if f.number == _GRAPH_INPUT) if n not in initializer_names
            ]
            self.outputs = [_name(data, f) for f in fields if f.number == _GRAPH_OUTPUT]
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{where}: not a readable ONNX model ({exc})") from None

    def array(self, name: str) -> np.ndarray:
        """A writable float32 copy of initializer ``name`` (stored as little-endian raw_data)."""
        init = self._float_initializer(name)
        start, end = init.raw
        return np.frombuffer(self.data, dtype="<f4", count=(end - start) // 4, offset=start).reshape(init.dims).copy()

    def patched(self, values: dict[str, np.ndarray]) -> bytes:
        """The model with initializers ``values`` replaced (same shapes); every other byte as read."""
        return b"".join(self.patched_chunks(values))

    def patched_chunks(self, values: dict[str, np.ndarray]) -> list:
        """``patched`` as consecutive byte chunks (views of the file where unchanged: no copy)."""
        data = memoryview(self.data)
        spans: dict[int, bytes] = {}
        for name, value in values.items():
            init = self._float_initializer(name)
            if tuple(value.shape) != init.dims:
                raise ArtifactError(f"{self.where}: {name!r} has shape {init.dims}, got {tuple(value.shape)}")
            spans[init.raw[0]] = np.ascontiguousarray(value, dtype="<f4").tobytes()
        pieces, position = [], 0
        for start in sorted(spans):
            pieces += [data[position:start], spans[start]]
            position = start + len(spans[start])
        pieces.append(data[position:])
        return pieces

    def _float_initializer(self, name: str) -> Initializer:
        init = self.initializers.get(name)
        if init is None:
            raise ArtifactError(f"{self.where}: no initializer {name!r}")
        if init.data_type != FLOAT or init.raw is None or init.raw[1] - init.raw[0] != 4 * int(np.prod(init.dims)):
            raise ArtifactError(f"{self.where}: initializer {name!r} is not float32 raw data of its shape")
        return init


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(data: bytes, start: int, end: int) -> Iterator[_Field]:
    pos = start
    while pos < end:
        key, value = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            stop = _varint(data, value)[1]
        elif wire == _FIXED64:
            stop = value + 8
        elif wire == _FIXED32:
            stop = value + 4
        elif wire == _BYTES:
            length, value = _varint(data, value)
            stop = value + length
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if stop > end:
            raise ValueError("field runs past its message (truncated?)")
        yield _Field(number, wire, pos, value, stop)
        pos = stop


def _initializer(data: bytes, field: _Field) -> Initializer:
    dims: list[int] = []
    name, data_type, raw = "", 0, None
    for sub in _fields(data, field.value, field.end):
        if sub.number == _TENSOR_DIMS and sub.wire == _VARINT:
            dims.append(_varint(data, sub.value)[0])
        elif sub.number == _TENSOR_DIMS and sub.wire == _BYTES:  # packed
            pos = sub.value
            while pos < sub.end:
                dim, pos = _varint(data, pos)
                dims.append(dim)
        elif sub.number == _TENSOR_TYPE and sub.wire == _VARINT:
            data_type = _varint(data, sub.value)[0]
        elif sub.number == _TENSOR_NAME and sub.wire == _BYTES:
            name = bytes(data[sub.value : sub.end]).decode()
        elif sub.number == _TENSOR_RAW and sub.wire == _BYTES:
            raw = (sub.value, sub.end)
    return Initializer(name, tuple(dims), data_type, raw)


def _name(data: bytes, field: _Field) -> str:
    """The name of a ValueInfoProto."""
    for sub in _fields(data, field.value, field.end):
        if sub.number == _VALUE_INFO_NAME and sub.wire == _BYTES:
            return bytes(data[sub.value : sub.end]).decode()
    return ""


def _opset(data: bytes, field: _Field) -> tuple[str, int]:
    domain, version = "", 0
    for sub in _fields(data, field.value, field.end):
        if sub.number == _OPSET_DOMAIN and sub.wire == _BYTES:
            domain = bytes(data[sub.value : sub.end]).decode()
        elif sub.number == _OPSET_VERSION and sub.wire == _VARINT:
            version = _varint(data, sub.value)[0]
    return domain, version
