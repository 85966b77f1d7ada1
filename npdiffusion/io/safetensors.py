"""Our own reader and writer of the safetensors format: no pickle, no mmap, strict validation.

File layout (little-endian throughout)::

    [8 bytes]  N, unsigned 64-bit: the length of the JSON header
    [N bytes]  UTF-8 JSON object: {"name": {"dtype": "F32", "shape": [2, 3],
                                            "data_offsets": [begin, end]}, ...,
                                   "__metadata__": {"key": "string", ...}}   (optional)
               padded with spaces to a multiple of 8 bytes
    [rest]     the data section; a tensor's bytes are data[begin:end], C order

``save_file`` writes exactly the bytes ``safetensors.numpy.save_file`` writes for the same dict
(tensors sorted by descending dtype rank then name; metadata keys sorted, which matches the
reference whenever it has at most one key, the reference's order being a random hash order
otherwise). ``load_file`` reads the whole file into memory (nothing stays memory-mapped, so
saving over a file you just loaded is safe) after checking every header field, and raises
``SafetensorsError`` naming the file for anything malformed. Sizes are checked against the file
size before anything is allocated, so a hostile header cannot make the reader allocate more
than the file holds.

Supported dtypes: F16, F32, F64, C64, I8, I16, I32, I64, U8, U16, U32, U64, BOOL, and BF16 on
load only (NumPy has no bfloat16: BF16 is read as its 16 bits and widened exactly to float32).

Shapes: a tensor of shape ``(d0, ..., dk)`` holds ``prod(d) * itemsize`` bytes; ``()`` is a
scalar (one element), any zero side gives an empty tensor with ``begin == end``.

Format, validation rules and atomic writes: docs/checkpoints.md.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import BinaryIO, Mapping

import numpy

from npdiffusion.backend import to_numpy
from npdiffusion.io.atomic import atomic_write

MAX_HEADER_SIZE = 100_000_000  # bytes; the reference reader's limit
_U64_MAX = 2**64 - 1
_LFS_PREFIX = b"version https://git-lfs"

# safetensors dtype -> little-endian NumPy dtype of the stored bits.
_STORED = {
    "BOOL": numpy.dtype("|b1"), "U8": numpy.dtype("|u1"), "I8": numpy.dtype("|i1"),
    "I16": numpy.dtype("<i2"), "U16": numpy.dtype("<u2"), "F16": numpy.dtype("<f2"),
    "BF16": numpy.dtype("<u2"), "I32": numpy.dtype("<i4"), "U32": numpy.dtype("<u4"),
    "F32": numpy.dtype("<f4"), "C64": numpy.dtype("<c8"), "F64": numpy.dtype("<f8"),
    "I64": numpy.dtype("<i8"), "U64": numpy.dtype("<u8"),
}
# The reference Dtype enum order (ascending); the writer sorts by it, descending.
_RANK = {code: i for i, code in enumerate(
    ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"])}
# NumPy dtype (kind, itemsize) -> safetensors dtype, for writing.
_CODE_OF = {("b", 1): "BOOL", ("u", 1): "U8", ("i", 1): "I8", ("i", 2): "I16", ("u", 2): "U16",
            ("f", 2): "F16", ("i", 4): "I32", ("u", 4): "U32", ("f", 4): "F32", ("c", 8): "C64",
            ("f", 8): "F64", ("i", 8): "I64", ("u", 8): "U64"}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}

SUPPORTED_DTYPES = tuple(_STORED)


class SafetensorsError(ValueError):
    """A file (or byte string) that is not a valid safetensors file; the message names it."""


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: ``dtype`` code (``"F32"``...), ``shape`` and ``data_offsets`` (begin, end)
    relative to the start of the data section."""

    dtype: str
    shape: tuple
    data_offsets: tuple

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]


@dataclass
class Header:
    """A parsed, validated header: tensors in data order, the metadata map (``{}`` if absent),
    the JSON length ``header_size`` (N) and ``data_start`` = 8 + N."""

    tensors: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    header_size: int = 0

    @property
    def data_start(self) -> int:
        return 8 + self.header_size

    @property
    def data_size(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


# ============================================================================ reading
class _Duplicate(Exception):
    pass


def _pairs_no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise _Duplicate(k)
        d[k] = v
    return d


def _reject_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= _U64_MAX


def _parse_header(raw: bytes, data_size: int, source: str) -> Header:
    """Validate the JSON header ``raw`` against a data section of ``data_size`` bytes."""
    def fail(msg):
        raise SafetensorsError(f"{source}: {msg}")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        fail(f"header is not valid UTF-8 ({exc.reason} at byte {8 + exc.start})")
    try:
        obj = json.loads(text, object_pairs_hook=_pairs_no_duplicates, parse_constant=_reject_constant)
    except _Duplicate as exc:
        fail(f"header has the key {exc.args[0]!r} more than once")
    except RecursionError:
        fail("header JSON is nested too deeply")
    except ValueError as exc:
        fail(f"header is not valid JSON ({exc})")
    if not isinstance(obj, dict):
        fail(f"header must be a JSON object, got a JSON {type(obj).__name__}")

    metadata = obj.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        fail(f"__metadata__ must be an object of strings, got a JSON {type(metadata).__name__}")
    elif _ENTRY_KEYS & set(metadata):
        fail("__metadata__ is a tensor entry; it must be an object of strings")
    else:
        for k, v in metadata.items():
            if not isinstance(v, str):
                fail(f"__metadata__[{k!r}] must be a string, got {json.dumps(v)[:40]}")

    entries = []
    for name, info in obj.items():
        if not isinstance(info, dict):
            fail(f"entry {name!r} must be an object with dtype, shape and data_offsets")
        if set(info) != _ENTRY_KEYS:
            fail(f"entry {name!r} must have exactly the keys dtype, shape, data_offsets, got {sorted(info)}")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(code, str) or code not in _STORED:
            fail(f"tensor {name!r} has unknown or unsupported dtype {code!r} "
                 f"(supported: {', '.join(SUPPORTED_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            fail(f"tensor {name!r} has shape {json.dumps(shape)[:80]}; expected a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets)):
            fail(f"tensor {name!r} has data_offsets {json.dumps(offsets)[:80]}; expected [begin, end] integers")
        begin, end = offsets
        if end < begin:
            fail(f"tensor {name!r} has data_offsets [{begin}, {end}] with end < begin")
        count = 1
        for d in shape:
            count *= d
        nbytes = count * _STORED[code].itemsize
        if count > _U64_MAX or nbytes > _U64_MAX:
            fail(f"tensor {name!r} of shape {shape} and dtype {code} overflows 64-bit sizes")
        if nbytes != end - begin:
            fail(f"tensor {name!r} of shape {shape} and dtype {code} needs {nbytes} bytes, "
                 f"but data_offsets [{begin}, {end}] span {end - begin}")
        entries.append((begin, end, name, TensorInfo(code, tuple(shape), (begin, end))))

    entries.sort(key=lambda e: (e[0], e[1]))
    cursor, previous = 0, None
    tensors = {}
    for begin, end, name, info in entries:
        if begin > cursor:
            fail(f"hole in the data section: bytes [{cursor}, {begin}) before tensor {name!r} belong to no tensor")
        if begin < cursor:
            fail(f"tensor {name!r} at [{begin}, {end}) overlaps tensor {previous!r}, which ends at {cursor}")
        if end > data_size:
            fail(f"tensor {name!r} ends at data byte {end}, but the data section holds only {data_size} bytes "
                 "(truncated file or out-of-range offsets)")
        cursor, previous = end, name
        tensors[name] = info
    if cursor != data_size:
        fail(f"{data_size - cursor} trailing bytes after the last tensor (data section is {data_size} bytes, "
             f"tensors cover {cursor})")
    return Header(tensors=tensors, metadata=metadata, header_size=len(raw))


def _read_exact(f: BinaryIO, buf, source: str) -> None:
    """Fill the writable buffer ``buf`` from ``f`` or raise (the file shrank under us)."""
    view = memoryview(buf).cast("B")
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise SafetensorsError(f"{source}: file is truncated (ended {len(view) - got} bytes early)")
        got += n


def _read_header_from(f: BinaryIO, size: int, source: str) -> Header:
    """Parse the header of the open file ``f`` of ``size`` bytes, leaving ``f`` at the data start."""
    head = f.read(8)
    if head.startswith(_LFS_PREFIX[: len(head)]) and len(head) == 8:
        peek = head + f.read(200)
        if peek.startswith(_LFS_PREFIX):
            raise SafetensorsError(
                f"{source}: this is a Git LFS pointer file, not weights; fetch the real file "
                "(`git lfs pull`, or download it with huggingface_hub)")
        f.seek(8)
    if size < 8 or len(head) < 8:
        raise SafetensorsError(f"{source}: file is {size} bytes, too short for the 8-byte header length")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_SIZE:
        raise SafetensorsError(f"{source}: header length {n} is over the {MAX_HEADER_SIZE}-byte limit")
    if n > size - 8:
        raise SafetensorsError(f"{source}: header length {n} is more than the {size - 8} bytes the file holds "
                               "after the length field (truncated or not a safetensors file)")
    raw = bytearray(n)
    _read_exact(f, raw, source)
    return _parse_header(bytes(raw), size - 8 - n, source)


def read_tensor(f: BinaryIO, name: str, info: TensorInfo, source: str) -> numpy.ndarray:
    """Tensor ``name`` (header entry ``info``) read from ``f`` at its current position into a new array
    (C order, native byte order; BF16 widened to float32)."""
    stored = _STORED[info.dtype]
    try:
        arr = numpy.empty(info.shape, dtype=stored)
    except (ValueError, MemoryError) as exc:  # e.g. shape (0, 2**62) or more than 64 axes
        raise SafetensorsError(f"{source}: tensor {name!r} of shape {list(info.shape)} cannot be "
                               f"represented as a NumPy array ({exc})") from None
    if arr.nbytes:
        _read_exact(f, arr.reshape(-1).view(numpy.uint8), source)
    if info.dtype == "BF16":
        arr = (arr.astype(numpy.uint32) << 16).view(numpy.float32)
    elif info.dtype == "BOOL" and arr.size and int(arr.view(numpy.uint8).max()) > 1:
        raise SafetensorsError(f"{source}: BOOL tensor {name!r} holds bytes other than 0 and 1")
    elif not stored.isnative:
        arr = arr.astype(stored.newbyteorder("="))
    return arr


def loaded_dtype(code: str) -> numpy.dtype:
    """The NumPy dtype ``read_tensor`` returns for the safetensors dtype ``code`` (BF16: float32)."""
    return numpy.dtype(numpy.float32) if code == "BF16" else _STORED[code].newbyteorder("=")


def _read_tensors(f: BinaryIO, header: Header, source: str) -> dict:
    return {name: read_tensor(f, name, info, source)  # data order: sequential reads
            for name, info in header.tensors.items()}


def _source_name(path) -> str:
    return repr(os.fspath(path))


def read_header(path) -> Header:
    """The validated header of the safetensors file at ``path`` (reads only the header bytes)."""
    source = _source_name(path)
    with open(path, "rb") as f:
        return _read_header_from(f, os.fstat(f.fileno()).st_size, source)


def read_metadata(path) -> dict:
    """The ``__metadata__`` string map of the file at ``path`` (``{}`` when it has none)."""
    return dict(read_header(path).metadata)


def load_file(path) -> dict:
    """Every tensor of the safetensors file at ``path`` as NumPy arrays (C order, native byte order).

    The file is read fully and closed before returning. BF16 tensors come back as float32.
    Raises ``SafetensorsError`` (a ``ValueError``) naming the file when it is malformed.
    """
    source = _source_name(path)
    with open(path, "rb") as f:
        header = _read_header_from(f, os.fstat(f.fileno()).st_size, source)
        return _read_tensors(f, header, source)


def load_with_metadata(path) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of the file at ``path``, read once (see ``load_file``)."""
    source = _source_name(path)
    with open(path, "rb") as f:
        header = _read_header_from(f, os.fstat(f.fileno()).st_size, source)
        return _read_tensors(f, header, source), dict(header.metadata)


def load(data) -> dict:
    """Like ``load_file`` for the bytes of a safetensors file held in memory."""
    data = bytes(data)
    f = io.BytesIO(data)
    header = _read_header_from(f, len(data), "<bytes>")
    return _read_tensors(f, header, "<bytes>")


# ============================================================================ writing
def _prepare(tensors: Mapping, metadata) -> tuple[bytes, list]:
    """Header bytes (length prefix included) and the tensors in data order."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of names to arrays, got {type(tensors).__name__}")
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict of strings or None, got {type(metadata).__name__}")
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"metadata must map strings to strings, got {k!r}: {type(v).__name__}")
    items = []
    for name, arr in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be strings, got {name!r}")
        if name == "__metadata__":
            raise ValueError("a tensor cannot be called '__metadata__' (reserved for the metadata map)")
        if not (hasattr(arr, "shape") and hasattr(arr, "dtype")):
            raise TypeError(f"tensor {name!r} must be an array, got {type(arr).__name__}")
        dt = numpy.dtype(arr.dtype)
        code = _CODE_OF.get((dt.kind, dt.itemsize))
        if code is None:
            raise TypeError(f"tensor {name!r} has dtype {dt}, which safetensors cannot store "
                            "(use bool, uint8-64, int8-64, float16/32/64 or complex64)")
        items.append((name, code, tuple(int(d) for d in arr.shape), arr))
    items.sort(key=lambda it: (-_RANK[it[1]], it[0]))

    header = {}
    if metadata is not None:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for name, code, shape, _ in items:
        count = 1
        for d in shape:
            count *= d
        nbytes = count * _STORED[code].itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    try:
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"tensor names and metadata must be valid Unicode: {exc}") from exc
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER_SIZE:
        raise ValueError(f"header would be {len(raw)} bytes, over the {MAX_HEADER_SIZE}-byte limit readers accept")
    return len(raw).to_bytes(8, "little") + raw, items


def _host_bytes(arr, code):
    """The little-endian C-order bytes of ``arr`` as a flat uint8 view (one host copy at most)."""
    a = numpy.ascontiguousarray(to_numpy(arr))
    target = _STORED[code]
    if a.dtype != target:  # byte order (or bool spelled differently)
        a = a.astype(target)
    return a.reshape(-1).view(numpy.uint8)


def save(tensors: Mapping, metadata: Mapping | None = None) -> bytes:
    """The bytes of a safetensors file holding ``tensors`` (identical to ``safetensors.numpy.save``)."""
    head, items = _prepare(tensors, metadata)
    parts = [head] + [_host_bytes(arr, code).tobytes() for _, code, _, arr in items]
    return b"".join(parts)


def save_file(tensors: Mapping, path, metadata: Mapping | None = None) -> None:
    """Write ``tensors`` (name -> NumPy or CuPy array) to ``path`` atomically.

    The file appears complete under ``path`` or not at all (temporary file + fsync + rename, see
    ``npdiffusion.io.atomic``). ``metadata`` is an optional str -> str map stored as
    ``__metadata__``. Arrays on the GPU are copied to the host one at a time.
    """
    head, items = _prepare(tensors, metadata)
    with atomic_write(path, "wb") as f:
        f.write(head)
        for _, code, _, arr in items:
            f.write(_host_bytes(arr, code))

