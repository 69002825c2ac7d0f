"""Open Inference Protocol tensors in and out of HTTP bodies, with Triton's binary tensor data extension.

The extension (what ``tritonclient`` sends by default): the JSON header is followed by raw tensor
bytes; ``Inference-Header-Content-Length`` gives the header's length, and each binary input states
its byte count in ``parameters.binary_data_size``, in input order. Numbers are little-endian; a
BYTES element is a 4-byte little-endian length followed by its bytes. In JSON, BYTES elements are
strings, so encoded images travel as base64 there. Every malformed body is a coded error, never a
crash: these bytes come straight from the network.
"""

from __future__ import annotations

import binascii
import math
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi import Response
from pydantic import ValidationError

from app.api.errors import InvalidInferenceRequestError, MalformedRequestError, PayloadTooLargeError
from app.api.schemas_v2 import InferInput, InferOutput, InferRequest, InferResponse
from app.core.coded_error import first_validation_error

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_EXTENSION = "binary_tensor_data"
# The protocol's fixed-size datatypes (BYTES is variable-size and handled apart).
NUMPY_TYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(kind).newbyteorder("<")
    for name, kind in {
        "BOOL": np.bool_,
        "UINT8": np.uint8,
        "UINT16": np.uint16,
        "UINT32": np.uint32,
        "UINT64": np.uint64,
        "INT8": np.int8,
        "INT16": np.int16,
        "INT32": np.int32,
        "INT64": np.int64,
        "FP16": np.float16,
        "FP32": np.float32,
        "FP64": np.float64,
    }.items()
}
_FRAME = 4  # bytes of a BYTES element's length prefix
_END = object()


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding`` (gzip or deflate, as tritonclient can send), never inflating past ``limit``."""
    if encoding is None or encoding.strip().lower() in ("", "identity"):
        return body
    kind = encoding.strip().lower()
    if kind not in ("gzip", "deflate"):
        raise MalformedRequestError(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if kind == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise MalformedRequestError(f"the {kind} body cannot be decompressed: {exc}") from None
    if len(out) > limit:
        raise PayloadTooLargeError(f"the decompressed request body is over the limit of {limit} bytes")
    if not inflater.eof or inflater.unused_data:
        raise MalformedRequestError(f"the {kind} body is truncated or has trailing data")
    return out


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary data after it."""
    if header_length is None:
        return body, b""
    digits = header_length.strip()
    # isascii: str.isdigit() also accepts digits such as "²" that int() refuses.
    if not (digits.isascii() and digits.isdigit()) or int(digits) > len(body):
        raise MalformedRequestError(
            f"{HEADER_LENGTH} must be a whole number of bytes within the {len(body)}-byte body, got {header_length!r}"
        )
    length = int(digits)
    return body[:length], body[length:]


def parse_request(header: bytes) -> InferRequest:
    try:
        return InferRequest.model_validate_json(header)
    except ValidationError as exc:
        where, message, _ = first_validation_error(exc.errors())
        raise MalformedRequestError(f"{where}: {message}" if where else f"inference request: {message}") from None


def binary_sections(inputs: Sequence[InferInput], binary: bytes) -> list[bytes | None]:
    """Each input's slice of the binary data (None for inputs given in JSON); every byte must belong to one."""
    sections: list[bytes | None] = []
    offset = 0
    for tensor in inputs:
        size = tensor.parameters.get("binary_data_size")
        if size is None:
            sections.append(None)
            continue
        if type(size) is not int or size < 0:
            raise InvalidInferenceRequestError(f"input {tensor.name!r}: binary_data_size must be an integer >= 0")
        if tensor.data is not None:
            raise InvalidInferenceRequestError(f"input {tensor.name!r} has both JSON data and binary_data_size")
        if offset + size > len(binary):
            raise MalformedRequestError(
                f"input {tensor.name!r} declares {size} binary bytes, but only {len(binary) - offset} follow"
            )
        sections.append(binary[offset : offset + size])
        offset += size
    if offset != len(binary):
        raise MalformedRequestError(f"{len(binary) - offset} bytes after the JSON header belong to no input")
    return sections


def _flat(tensor: InferInput) -> list[Any]:
    """The JSON data, flattened in row-major order (the protocol allows flat or nested lists)."""
    if tensor.data is None:
        raise InvalidInferenceRequestError(f"input {tensor.name!r} has neither data nor binary_data_size")
    flat: list[Any] = []
    iterators = [iter(tensor.data)]
    while iterators:  # iterative: a hostile nesting depth cannot exhaust the stack
        item = next(iterators[-1], _END)
        if item is _END:
            iterators.pop()
        elif isinstance(item, list):
            iterators.append(iter(item))
        else:
            flat.append(item)
    return flat


def _check_count(tensor: InferInput, found: int) -> None:
    expected = math.prod(tensor.shape)
    if found != expected:
        raise InvalidInferenceRequestError(
            f"input {tensor.name!r} has shape {tensor.shape} ({expected} elements) but carries {found}"
        )


def bytes_elements(tensor: InferInput, section: bytes | None) -> list[bytes]:
    """A BYTES tensor's elements: length-framed in binary, base64 strings in JSON."""
    if section is None:
        items = []
        for index, value in enumerate(_flat(tensor)):
            if not isinstance(value, str):
                raise InvalidInferenceRequestError(
                    f"input {tensor.name!r} element {index}: BYTES data in JSON must be a base64 string"
                )
            try:
                items.append(binascii.a2b_base64(value, strict_mode=True))
            except binascii.Error as exc:
                raise InvalidInferenceRequestError(
                    f"input {tensor.name!r} element {index} is not valid base64: {exc}"
                ) from None
        _check_count(tensor, len(items))
        return items
    items, offset = [], 0
    while offset < len(section):
        if offset + _FRAME > len(section):
            raise InvalidInferenceRequestError(f"input {tensor.name!r}: binary data ends inside a length prefix")
        size = int.from_bytes(section[offset : offset + _FRAME], "little")
        offset += _FRAME
        if offset + size > len(section):
            left = len(section) - offset
            raise InvalidInferenceRequestError(
                f"input {tensor.name!r} element {len(items)} declares {size} bytes, but only {left} follow"
            )
        items.append(section[offset : offset + size])
        offset += size
    _check_count(tensor, len(items))
    return items


def numeric_array(tensor: InferInput, section: bytes | None) -> np.ndarray:
    """A fixed-size tensor as a numpy array of its shape; JSON values must be exact and in range."""
    dtype = NUMPY_TYPES[tensor.datatype]
    count = math.prod(tensor.shape)
    if section is not None:
        if len(section) != count * dtype.itemsize:
            raise InvalidInferenceRequestError(
                f"input {tensor.name!r} has shape {tensor.shape} ({count * dtype.itemsize} bytes of "
                f"{tensor.datatype}) but carries {len(section)} bytes"
            )
        return np.frombuffer(section, dtype=dtype).reshape(tensor.shape)
    values = _flat(tensor)
    _check_count(tensor, len(values))
    if dtype.kind in "iu":
        if any(type(value) is not int for value in values):
            raise InvalidInferenceRequestError(f"input {tensor.name!r}: {tensor.datatype} data must be integers")
        info = np.iinfo(dtype)
        if values and not info.min <= min(values) <= max(values) <= info.max:
            raise InvalidInferenceRequestError(
                f"input {tensor.name!r}: {tensor.datatype} values must lie in [{info.min}, {info.max}]"
            )
    return np.array(values, dtype=dtype).reshape(tensor.shape)


def encode_output(name: str, datatype: str, values: np.ndarray, binary: bool) -> tuple[InferOutput, bytes]:
    """One output tensor: in the JSON (``data``) or as binary data after it (``binary_data_size``)."""
    shape = list(values.shape)
    if datatype == "BYTES":
        items = [bytes(item) for item in values.reshape(-1)]
        if not binary:
            return InferOutput(name=name, shape=shape, datatype=datatype, data=[i.decode() for i in items]), b""
        raw = b"".join(len(item).to_bytes(_FRAME, "little") + item for item in items)
    else:
        flat = values.astype(NUMPY_TYPES[datatype]).reshape(-1)
        if not binary:
            return InferOutput(name=name, shape=shape, datatype=datatype, data=flat.tolist()), b""
        raw = flat.tobytes()
    return InferOutput(name=name, shape=shape, datatype=datatype, parameters={"binary_data_size": len(raw)}), raw


def inference_response(body: InferResponse, binary: Sequence[bytes]) -> Response:
    """JSON alone, or the JSON header plus binary outputs with the header's length announced."""
    header = body.model_dump_json(exclude_none=True).encode()
    if not any(output.parameters for output in body.outputs):
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(binary),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )
