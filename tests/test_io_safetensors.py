"""safetensors reader/writer: round trips, byte identity with the reference writer, strict rejection
of malformed files (reliability.md items 1, 2, 4, 5, 6, 7 and a bounded fuzz of item 3)."""
import ast
import hashlib
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy as ref_np
import safetensors.torch as ref_torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from npdiffusion.backend import asarray
from npdiffusion.io.atomic import atomic_write, atomic_write_bytes, remove_stale_temps, stale_temp_files
from npdiffusion.io.pretrained import load_weights
from npdiffusion.io.safetensors import (MAX_HEADER_SIZE, SafetensorsError, load, load_file, read_header,
                                        read_metadata, save, save_file)

ROOT = Path(__file__).resolve().parents[1]
ALL_DTYPES = [np.bool_, np.uint8, np.int8, np.int16, np.uint16, np.float16, np.int32, np.uint32,
              np.float32, np.complex64, np.float64, np.int64, np.uint64]


def _random_array(rng, dtype, shape):
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        out = rng.random(shape) < 0.5
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        out = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    elif dtype.kind == "c":
        out = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    else:
        out = rng.standard_normal(shape) * 10.0
    return np.asarray(out).astype(dtype)


def _random_tensors(rng, n=None):
    n = int(rng.integers(1, 8)) if n is None else n
    out = {}
    for i in range(n):
        dtype = ALL_DTYPES[int(rng.integers(len(ALL_DTYPES)))]
        shape = tuple(int(s) for s in rng.integers(0, 5, size=int(rng.integers(0, 4))))
        out[f"t{i}.{'w' if i % 2 else 'bias'}_{int(rng.integers(100))}"] = _random_array(rng, dtype, shape)
    return out


def _file(tmp_path, header, data=b"", name="bad.safetensors"):
    """A file made of an 8-byte length, ``header`` (a dict to JSON-encode, or raw bytes) and ``data``."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# ============================================================================ item 1: round trips
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(), (0, 3), (1,), (2, 3, 4)], ids=str)
def test_round_trip_every_dtype_and_bytes_match_reference(tmp_path, dtype, shape):
    rng = np.random.default_rng(7)
    tensors = {"x": _random_array(rng, dtype, shape), "y": _random_array(rng, np.float32, (3,))}
    path = tmp_path / "a.safetensors"
    save_file(tensors, path)
    ref_path = tmp_path / "ref.safetensors"
    ref_np.save_file(tensors, ref_path)
    assert path.read_bytes() == ref_path.read_bytes() == ref_np.save(tensors) == save(tensors)
    back = load_file(path)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert np.array_equal(back[k], v)
        assert back[k].flags.c_contiguous and back[k].flags.writeable


def test_random_dicts_bytes_identical_to_reference_and_readable_by_it(tmp_path):
    rng = np.random.default_rng(0)
    for trial in range(20):
        tensors = _random_tensors(rng)
        metadata = None if trial % 3 == 0 else {"format": "pt"}  # reference orders >1 keys randomly
        assert save(tensors, metadata) == ref_np.save(tensors, metadata=metadata)
        path = tmp_path / f"r{trial}.safetensors"
        save_file(tensors, path, metadata)
        theirs = ref_np.load_file(path)
        ours = load(ref_np.save(tensors, metadata=metadata))
        for k, v in tensors.items():
            assert np.array_equal(theirs[k], v) and np.array_equal(ours[k], v)


def test_metadata_round_trip_and_unicode_names(tmp_path):
    meta = {"format": "pt", "b": "x\ny\u00e9", "a": "\x01\"\\"}
    tensors = {"\u00e9t\u00e9.w\n\"/": np.arange(3, dtype=np.float32)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata=meta)
    assert read_metadata(path) == meta
    with safetensors.safe_open(path, framework="np") as f:
        assert f.metadata() == meta
        assert np.array_equal(f.get_tensor("\u00e9t\u00e9.w\n\"/"), tensors["\u00e9t\u00e9.w\n\"/"])
    # with one metadata key and unusual characters our bytes still equal the reference's
    assert save(tensors, {"k": "\x1f\u00e9"}) == ref_np.save(tensors, metadata={"k": "\x1f\u00e9"})
    assert read_metadata(_file(tmp_path, {}, b"", name="none.safetensors")) == {}


def test_noncontiguous_and_big_endian_inputs_are_written_as_little_endian_c_order():
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    tensors = {"t": base.T, "s": base[:, ::2], "be": base.astype(">f4"), "bei": np.arange(5, dtype=">i8")}
    expected = {"t": np.ascontiguousarray(base.T), "s": np.ascontiguousarray(base[:, ::2]),
                "be": base, "bei": np.arange(5, dtype=np.int64)}
    assert save(tensors) == ref_np.save(expected)
    back = load(save(tensors))
    for k, v in expected.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v)


def test_bf16_is_read_through_the_u16_path_as_float32(tmp_path):
    t = torch.randn(3, 5, dtype=torch.float64).to(torch.bfloat16)
    t[0, 0], t[0, 1], t[0, 2] = float("inf"), -0.0, 1e-40  # inf, signed zero, subnormal survive
    path = tmp_path / "bf16.safetensors"
    ref_torch.save_file({"w": t, "f": torch.ones(2)}, path)
    back = load_file(path)
    assert back["w"].dtype == np.float32
    expected = t.to(torch.float32).numpy()
    assert np.array_equal(back["w"].view(np.uint32), expected.view(np.uint32))
    assert read_header(path).tensors["w"].dtype == "BF16"


def test_empty_dict_and_zero_size_tensors(tmp_path):
    assert save({}) == ref_np.save({}) == b"\x08" + b"\x00" * 7 + b"{}      "
    d = {"a": np.zeros((0,), np.float32), "b": np.zeros((2, 0), np.float64), "c": np.zeros((0,), np.uint8)}
    assert save(d) == ref_np.save(d)
    back = load(save(d))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in d.items()}


def test_cupy_arrays_are_saved_from_the_device(backend, tmp_path):
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    path = tmp_path / "dev.safetensors"
    save_file({"x": asarray(x)}, path)
    assert np.array_equal(load_file(path)["x"], x)
    assert path.read_bytes() == ref_np.save({"x": x})


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError, match="complex128"):
        save({"z": np.zeros(2, np.complex128)})
    with pytest.raises(TypeError, match="tensor names must be strings"):
        save({1: np.zeros(2)})
    with pytest.raises(TypeError, match="metadata must map strings to strings"):
        save({"a": np.zeros(2)}, metadata={"k": 1})
    with pytest.raises(ValueError, match="__metadata__"):
        save({"__metadata__": np.zeros(2)})
    with pytest.raises(TypeError, match="must be an array, got list"):
        save({"a": [1, 2]})
    with pytest.raises(TypeError, match="tensors must be a mapping"):
        save([("a", np.zeros(1))])
    assert not list(tmp_path.iterdir())


# ============================================================================ item 2: malformed files
def _raw(tmp_path, data: bytes):
    path = tmp_path / "x"
    path.write_bytes(data)
    return path


def _valid_entry(begin=0, end=4, dtype="F32", shape=(1,)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


MALFORMED = {
    # name: (builder(tmp_path) -> path, regex the message must match)
    "too-short": (lambda p: _raw(p, b"\x01\x00"), r"too short"),
    "empty-file": (lambda p: _raw(p, b""), r"too short"),
    "header-over-100MB": (lambda p: _raw(p, struct.pack("<Q", MAX_HEADER_SIZE + 1) + b"{}" * 8), r"over the 100000000-byte limit"),
    "header-u64-max": (lambda p: _raw(p, b"\xff" * 16), r"over the .*limit"),
    "header-longer-than-file": (lambda p: _raw(p, struct.pack("<Q", 5000) + b"{}" + b" " * 30), r"header length 5000 is more than the 32 bytes"),
    "non-utf8": (lambda p: _file(p, b'{"a\xff\xfe":1}'), r"not valid UTF-8"),
    "not-json": (lambda p: _file(p, b'{"a": '), r"not valid JSON"),
    "nan-constant": (lambda p: _file(p, b'{"a": NaN}'), r"not valid JSON"),
    "deep-nesting": (lambda p: _file(p, b"[" * 50000), r"nested too deeply|not valid JSON"),
    "non-object-json": (lambda p: _file(p, b"[1, 2]"), r"must be a JSON object, got a JSON list"),
    "json-string": (lambda p: _file(p, b'"hi"'), r"must be a JSON object"),
    "non-string-metadata": (lambda p: _file(p, {"__metadata__": {"k": 1}}), r"__metadata__\['k'\] must be a string"),
    "metadata-not-object": (lambda p: _file(p, {"__metadata__": ["a"]}), r"__metadata__ must be an object"),
    "metadata-is-tensor": (lambda p: _file(p, {"__metadata__": _valid_entry()}, b"\0" * 4),
                           r"__metadata__ is a tensor entry"),
    "unknown-dtype": (lambda p: _file(p, {"a": _valid_entry(dtype="F8_E4M3", end=1)}, b"\0"),
                      r"unknown or unsupported dtype 'F8_E4M3'"),
    "dtype-not-string": (lambda p: _file(p, {"a": _valid_entry(dtype=3)}, b"\0" * 4), r"dtype 3"),
    "entry-not-object": (lambda p: _file(p, {"a": [1, 2]}), r"entry 'a' must be an object"),
    "missing-field": (lambda p: _file(p, {"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), r"exactly the keys"),
    "extra-field": (lambda p: _file(p, {"a": {**_valid_entry(), "x": 1}}, b"\0" * 4), r"exactly the keys"),
    "negative-dim": (lambda p: _file(p, {"a": _valid_entry(shape=(-1,))}, b"\0" * 4), r"non-negative integers"),
    "float-dim": (lambda p: _file(p, {"a": _valid_entry(shape=(1.0,))}, b"\0" * 4), r"non-negative integers"),
    "bool-dim": (lambda p: _file(p, {"a": _valid_entry(shape=(True,))}, b"\0" * 4), r"non-negative integers"),
    "dim-over-u64": (lambda p: _file(p, {"a": _valid_entry(shape=(2**64,))}, b"\0" * 4), r"non-negative integers"),
    "offsets-three": (lambda p: _file(p, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}},
                                      b"\0" * 4), r"expected \[begin, end\]"),
    "negative-offset": (lambda p: _file(p, {"a": _valid_entry(begin=-4, end=0)}, b"\0" * 4), r"expected \[begin"),
    "end-before-begin": (lambda p: _file(p, {"a": _valid_entry(begin=8, end=4)}, b"\0" * 8), r"end < begin"),
    "size-shape-mismatch": (lambda p: _file(p, {"a": _valid_entry(shape=(3,), end=8)}, b"\0" * 8),
                            r"needs 12 bytes, but data_offsets \[0, 8\] span 8"),
    "shape-overflow": (lambda p: _file(p, {"a": _valid_entry(shape=(2**40, 2**40))}, b"\0" * 4),
                       r"overflows 64-bit"),
    "byte-count-overflow": (lambda p: _file(p, {"a": _valid_entry(dtype="F64", shape=(2**62,))}, b"\0" * 4),
                            r"overflows 64-bit"),
    "overlap": (lambda p: _file(p, {"a": _valid_entry(0, 8, shape=(2,)), "b": _valid_entry(4, 12, shape=(2,))},
                                b"\0" * 12), r"'b' at \[4, 12\) overlaps tensor 'a'"),
    "same-offsets": (lambda p: _file(p, {"a": _valid_entry(0, 4), "b": _valid_entry(0, 4)}, b"\0" * 4),
                     r"overlaps"),
    "hole": (lambda p: _file(p, {"a": _valid_entry(0, 4), "b": _valid_entry(8, 12)}, b"\0" * 12),
             r"hole in the data section: bytes \[4, 8\)"),
    "hole-at-start": (lambda p: _file(p, {"a": _valid_entry(4, 8)}, b"\0" * 8), r"hole"),
    "trailing-bytes": (lambda p: _file(p, {"a": _valid_entry(0, 4)}, b"\0" * 9), r"5 trailing bytes"),
    "out-of-range": (lambda p: _file(p, {"a": _valid_entry(0, 4)}, b"\0" * 2), r"ends at data byte 4.*holds only 2"),
    "huge-claimed-tensor": (lambda p: _file(p, {"a": _valid_entry(0, 4 * 10**9, shape=(10**9,))}, b"\0" * 64),
                            r"holds only 64 bytes"),
    "duplicate-key": (lambda p: _file(p, b'{"a":' + json.dumps(_valid_entry()).encode() + b',"a":'
                                      + json.dumps(_valid_entry()).encode() + b"}", b"\0" * 4),
                      r"key 'a' more than once"),
    "duplicate-metadata-key": (lambda p: _file(p, b'{"__metadata__":{"k":"1","k":"2"}}'), r"more than once"),
    "bool-byte-not-0-or-1": (lambda p: _file(p, {"a": _valid_entry(dtype="BOOL", shape=(2,), end=2)}, b"\x01\x02"),
                             r"BOOL tensor 'a' holds bytes other than 0 and 1"),
    "zero-size-huge-dims": (lambda p: _file(p, {"a": _valid_entry(shape=(0, 2**62), end=0)}), r"cannot be represented"),
    "git-lfs-pointer": (lambda p: _raw(p,
        b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca2"
        b"4d17e2393\nsize 3438167534\n"), r"Git LFS pointer file, not weights"),
}


def _truncated(p, cut):
    full = save({"w": np.arange(100, dtype=np.float32), "b": np.ones(3, np.float64)}, {"format": "pt"})
    return _raw(p, full[:cut])


MALFORMED["truncated-in-data"] = (lambda p: _truncated(p, -10), r"truncated file or out-of-range")
MALFORMED["truncated-in-header"] = (lambda p: _truncated(p, 40), r"header length \d+ is more than")
MALFORMED["truncated-after-length"] = (lambda p: _truncated(p, 8), r"header length \d+ is more than the 0 bytes")


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_raises_named_error_without_big_allocations(tmp_path, case):
    build, pattern = MALFORMED[case]
    path = build(tmp_path)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        with pytest.raises(SafetensorsError, match=pattern) as info:
            load_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert repr(str(path)) in str(info.value), "the error must name the file"
    assert isinstance(info.value, ValueError)
    # never allocate more than the file holds (plus a small constant for the parser's bookkeeping)
    assert peak <= 2 * size + 256 * 1024, f"peak Python allocation {peak} bytes for a {size}-byte file"
    if case not in ("bool-byte-not-0-or-1", "zero-size-huge-dims"):  # those fail only when reading data
        with pytest.raises(SafetensorsError, match=pattern):
            read_header(path)
    with pytest.raises(SafetensorsError, match=pattern):
        load(path.read_bytes())


def test_reference_reader_agrees_that_the_structural_cases_are_invalid(tmp_path):
    """Our rejections are a superset of the reference reader's (it also rejects these)."""
    for case in ["header-over-100MB", "header-longer-than-file", "non-utf8", "non-object-json", "non-string-metadata",
                 "unknown-dtype", "overlap", "hole", "trailing-bytes", "end-before-begin", "size-shape-mismatch",
                 "shape-overflow", "truncated-in-data", "git-lfs-pointer"]:
        sub = tmp_path / case
        sub.mkdir()
        path = MALFORMED[case][0](sub)
        with pytest.raises(Exception):
            ref_np.load(path.read_bytes())


# ============================================================================ item 3: bounded fuzz
_FUZZ_BASE = save({"w": np.arange(12, dtype=np.float32).reshape(3, 4), "m": np.array([True, False]),
                   "i": np.arange(3, dtype=np.int64)}, {"format": "pt"})
_mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, len(_FUZZ_BASE) - 1), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, len(_FUZZ_BASE)), st.just(0)),
    st.tuples(st.just("del"), st.integers(0, len(_FUZZ_BASE) - 1), st.integers(1, 16)),
    st.tuples(st.just("ins"), st.integers(0, len(_FUZZ_BASE)), st.integers(0, 255)),
)


@settings(max_examples=int(os.environ.get("NPDIFFUSION_FUZZ_EXAMPLES", "200")), deadline=None)
@given(mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_fuzzed_bytes_only_ever_raise_safetensors_error(mutations):
    data = bytearray(_FUZZ_BASE)
    for op, pos, val in mutations:
        pos = min(pos, len(data))
        if op == "set" and pos < len(data):
            data[pos] = val
        elif op == "cut":
            del data[pos:]
        elif op == "del":
            del data[pos:pos + val]
        elif op == "ins":
            data[pos:pos] = bytes([val])
    try:
        out = load(bytes(data))
    except SafetensorsError:
        return
    assert all(isinstance(v, np.ndarray) for v in out.values())
    # whatever we accept, the reference accepts with the same tensors (BOOL/ordering checks aside)
    theirs = ref_np.load(bytes(data))
    assert set(theirs) == set(out)
    for k in out:
        assert out[k].shape == theirs[k].shape and out[k].tobytes() == theirs[k].tobytes()


def _fuzz_payload_ranges():
    """[begin, end) byte ranges of the non-bool tensors' data in ``_FUZZ_BASE``: any byte there may
    take any value and the file stays valid (a bool byte must stay 0 or 1)."""
    (n,) = struct.unpack("<Q", _FUZZ_BASE[:8])
    header = json.loads(_FUZZ_BASE[8:8 + n])
    return {name: (8 + n + entry["data_offsets"][0], 8 + n + entry["data_offsets"][1])
            for name, entry in header.items() if name != "__metadata__" and entry["dtype"] != "BOOL"}


_FUZZ_PAYLOAD = _fuzz_payload_ranges()


@settings(max_examples=50, deadline=None)
@given(name=st.sampled_from(sorted(_FUZZ_PAYLOAD)), data=st.data())
def test_fuzzed_payload_bytes_load_and_round_trip(name, data):
    """The fuzz test above passes if every mutation is rejected; this one pins the other side: a
    mutation that keeps the file valid (new bytes inside a tensor's data) loads, gives exactly the
    mutated bytes, agrees with the reference loader and saves back to the same file."""
    begin, end = _FUZZ_PAYLOAD[name]
    edits = data.draw(st.lists(st.tuples(st.integers(begin, end - 1), st.integers(0, 255)), min_size=1,
                               max_size=4))
    mutated = bytearray(_FUZZ_BASE)
    for pos, val in edits:
        mutated[pos] = val
    out = load(bytes(mutated))
    assert out[name].tobytes() == bytes(mutated[begin:end])
    theirs = ref_np.load(bytes(mutated))
    assert set(theirs) == set(out)
    for k in out:
        assert out[k].dtype == theirs[k].dtype and out[k].tobytes() == theirs[k].tobytes()
    assert save(out, {"format": "pt"}) == bytes(mutated)


# ============================================================================ item 4: header vs safe_open
def test_parsed_header_matches_safe_open_on_random_files(tmp_path):
    rng = np.random.default_rng(42)
    for trial in range(20):
        tensors = _random_tensors(rng, n=int(rng.integers(1, 12)))
        path = tmp_path / f"h{trial}.safetensors"
        ref_np.save_file(tensors, path, metadata={"trial": str(trial)})
        header = read_header(path)
        raw = path.read_bytes()
        with safetensors.safe_open(path, framework="np") as f:
            assert sorted(header.tensors) == sorted(f.keys())
            assert header.metadata == f.metadata()
            for name, info in header.tensors.items():
                sl = f.get_slice(name)
                assert info.dtype == sl.get_dtype()
                assert list(info.shape) == list(sl.get_shape())
                begin, end = info.data_offsets
                # our offsets point at exactly the bytes the reference reader returns
                assert raw[header.data_start + begin: header.data_start + end] == f.get_tensor(name).tobytes()
        on_disk = json.loads(raw[8:header.data_start])
        assert {k: tuple(v["data_offsets"]) for k, v in on_disk.items() if k != "__metadata__"} == \
            {k: v.data_offsets for k, v in header.tensors.items()}


# ============================================================================ item 5: no unpickling
BANNED_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal", "torch"}


def find_unsafe_loading(source: str, filename: str = "<string>") -> list:
    """Lines of ``source`` that import a pickle-family module or torch, or call ``*.load(allow_pickle=...)``."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            problems += [f"{filename}:{node.lineno} import {a.name}" for a in node.names
                         if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in BANNED_MODULES:
            problems.append(f"{filename}:{node.lineno} from {node.module} import")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            for kw in node.keywords:
                if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    problems.append(f"{filename}:{node.lineno} {name}(allow_pickle=...)")
            if isinstance(func, ast.Attribute) and name in ("load", "loads") and \
                    isinstance(func.value, ast.Name) and func.value.id in BANNED_MODULES:
                problems.append(f"{filename}:{node.lineno} {func.value.id}.{name}")
    return problems


def test_scanner_catches_planted_unsafe_code():
    planted = textwrap.dedent("""
        import pickle
        from torch import load
        import numpy as np
        x = np.load("a.npy", allow_pickle=True)
        y = pickle.loads(b"")
        z = np.load("a.npy", allow_pickle=False)
    """)
    found = find_unsafe_loading(planted)
    assert len(found) == 4, found
    assert not any(":7 " in f for f in found)


def test_library_code_never_unpickles_or_imports_torch():
    files = sorted((ROOT / "npdiffusion").rglob("*.py"))
    assert len(files) > 5
    problems = []
    for path in files:
        problems += find_unsafe_loading(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not problems, "unsafe loading in library code:\n" + "\n".join(problems)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_pickle_checkpoints_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Payload(str(marker)))
    model = tmp_path / "model"
    model.mkdir()
    for name in ("model.ckpt", "diffusion_pytorch_model.bin", "pytorch_model.pt"):
        (model / name).write_bytes(payload)
    with pytest.raises(ValueError, match="pickle checkpoints are not loaded; convert to safetensors"):
        load_weights(model)
    # a pickle renamed to .safetensors is just a malformed file
    (model / "model.safetensors").write_bytes(payload)
    with pytest.raises(SafetensorsError):
        load_weights(model)
    npy = tmp_path / "obj.npy"
    np.save(npy, np.array([_Payload(str(marker))], dtype=object), allow_pickle=True)
    with pytest.raises(SafetensorsError):
        load_file(npy)
    assert not marker.exists()


# ============================================================================ item 6: killed mid-save
_CHILD = """
import sys
import numpy as np
from npdiffusion.io.safetensors import save_file
path = sys.argv[1]
versions = [{"w": np.full(4_000_000, v, np.float32), "step": np.array(v, np.int64)} for v in (1.0, 2.0)]
print("ready", flush=True)
i = 0
while True:
    save_file(versions[i % 2], path, metadata={"step": str(i % 2)})
    i += 1
"""


def test_process_killed_mid_save_never_leaves_a_partial_file(tmp_path):
    versions = [{"w": np.full(4_000_000, v, np.float32), "step": np.array(v, np.int64)} for v in (1.0, 2.0)]
    hashes = {hashlib.sha256(save(v, {"step": str(i)})).hexdigest() for i, v in enumerate(versions)}
    rng = np.random.default_rng(6)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    seen_complete = caught_mid_save = 0
    for trial in range(4):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        final = folder / "ckpt.safetensors"
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(final)], stdout=subprocess.PIPE, env=env)
        try:
            assert proc.stdout.readline().strip() == b"ready"
            time.sleep(float(rng.uniform(0.0, 0.4)))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
            proc.stdout.close()
        if final.exists():  # the last committed save: complete, valid, one of the two versions
            assert hashlib.sha256(final.read_bytes()).hexdigest() in hashes
            assert load_file(final)["w"].shape == (4_000_000,)
            seen_complete += 1
        caught_mid_save += bool(remove_stale_temps(folder))
        assert stale_temp_files(folder) == []
        assert [p.name for p in folder.iterdir()] in ([], ["ckpt.safetensors"])
    assert seen_complete >= 1
    print(f"killed mid-save (temp file present) in {caught_mid_save} of 4 trials")


def test_atomic_write_leaves_target_untouched_on_error(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target) as f:
            f.write(b"new but incomplete")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    # a failed save_file (unstorable dtype) leaves no file at all
    with pytest.raises(TypeError):
        save_file({"a": np.zeros(1), "b": np.zeros(1, np.complex128)}, tmp_path / "g.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write_bytes(tmp_path / "missing" / "x", b"")


def test_stale_temps_of_live_writers_are_kept(tmp_path):
    live = tmp_path / f".x.safetensors.{os.getpid()}.0123abcd.tmp"
    live.write_bytes(b"partial")
    dead_pid = 2**22 + 12345  # above the default pid_max of 4194304
    dead = tmp_path / f".x.safetensors.{dead_pid}.0123abcd.tmp"
    dead.write_bytes(b"partial")
    other = tmp_path / "x.safetensors.tmp"
    other.write_bytes(b"not ours")
    assert remove_stale_temps(tmp_path) == [str(dead)]
    assert live.exists() and other.exists() and not dead.exists()


# ============================================================================ item 7: overwrite in place
def test_load_change_save_to_same_path_then_reload(tmp_path):
    path = tmp_path / "w.safetensors"
    rng = np.random.default_rng(3)
    tensors = {"a": rng.standard_normal((64, 64)).astype(np.float32), "b": np.arange(10, dtype=np.int64)}
    save_file(tensors, path)
    loaded = load_file(path)
    loaded["a"][0, :5] = 42.0
    loaded["c"] = np.ones(3, np.float16)
    save_file(loaded, path)
    again = load_file(path)
    assert np.array_equal(again["a"][0, :5], np.full(5, 42.0, np.float32))
    assert np.array_equal(again["a"][1:], tensors["a"][1:])
    assert set(again) == {"a", "b", "c"}
    # and with the reference's memory-mapped reader holding the file open
    with safetensors.safe_open(path, framework="np") as f:
        a = f.get_tensor("a")
        a[1, 0] = -7.0
        save_file({"a": a, "b": f.get_tensor("b")}, path)
    assert load_file(path)["a"][1, 0] == -7.0
