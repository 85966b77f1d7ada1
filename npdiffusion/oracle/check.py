"""``check_golden``: compare another implementation's dump with a golden folder, key by key.

For every key of the manifest, in its order (inputs, weights, forward, outputs, then backward):

    max_abs = max |candidate - golden|                      (on the host, in float64)
    rel     = max_abs / max |golden|                        (0 when both are all zeros)
    pass   <=> rel <= rtol(key, candidate dtype) * rtol_scale
               or max_abs <= atol(key, candidate dtype) * rtol_scale   (rounding-noise keys only)

and the index of the worst entry. A shape that differs only by a reshape (the same number of
entries; e.g. a group norm fed (B, C, H*W) instead of (B, C, H, W)) is compared in C order and
noted. A key the candidate lacks fails only when the manifest marks it required; keys the golden
folder does not know are listed and ignored. A candidate value that is NaN or infinite where the
golden one is finite fails.

The first divergence is the first failing key in manifest order; ``first_forward_divergence`` and
``first_backward_divergence`` restrict that to the forward (activations, outputs) and the backward
(gradients). Each names its layer (the dotted module name). A backward divergence that comes after
a forward one may be its consequence (gradients depend on the forward values); a candidate dumped
with teacher forcing (each layer fed the golden inputs and output gradients, docs/oracle.md)
localizes backward errors too.
"""
from __future__ import annotations

import dataclasses
import os

import numpy

from npdiffusion.io.safetensors import SafetensorsError, load_with_metadata
from npdiffusion.oracle import manifest as mf

FORWARD = ("forward", "output")
BACKWARD = ("backward", "input_grad")


@dataclasses.dataclass
class KeyResult:
    """One row of the report: a manifest key compared (or not) with the candidate."""

    key: str
    phase: str
    layer: str
    required: bool
    status: str                       # ok, FAIL, NON-FINITE, SHAPE, DTYPE, MISSING, absent, shape (optional)
    golden_shape: tuple
    candidate_shape: tuple | None = None
    candidate_dtype: str | None = None
    max_abs: float | None = None
    rel: float | None = None
    rtol: float | None = None
    atol: float = 0.0                 # rounding-noise keys: an absolute bound (their golden may be 0)
    worst_index: tuple | None = None
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status in ("FAIL", "NON-FINITE", "SHAPE", "DTYPE", "MISSING")

    @property
    def diverged(self) -> bool:
        """Whether the candidate's values differ (as opposed to a key that is missing)."""
        return self.status in ("FAIL", "NON-FINITE", "SHAPE", "DTYPE")


@dataclasses.dataclass
class CheckReport:
    """The comparison of one candidate file with one golden folder (see the module docstring)."""

    golden_dir: str
    candidate_path: str
    manifest: dict
    results: list = dataclasses.field(default_factory=list)
    extra_keys: list = dataclasses.field(default_factory=list)
    candidate_metadata: dict = dataclasses.field(default_factory=dict)
    error: str | None = None

    # ------------------------------------------------------------------ verdicts
    @property
    def failures(self) -> list:
        return [r for r in self.results if r.failed]

    @property
    def missing_required(self) -> list:
        return [r for r in self.results if r.status == "MISSING"]

    @property
    def absent_optional(self) -> list:
        return [r for r in self.results if r.status == "absent"]

    @property
    def compared(self) -> list:
        return [r for r in self.results if r.rel is not None]

    @property
    def passed(self) -> bool:
        return self.error is None and not self.failures

    def _first(self, phases=None):
        for r in self.results:
            if r.diverged and (phases is None or r.phase in phases):
                return r
        return None

    @property
    def first_divergence(self) -> KeyResult | None:
        """The first key (manifest order) whose values diverge beyond tolerance, or None."""
        return self._first()

    @property
    def first_forward_divergence(self) -> KeyResult | None:
        return self._first(FORWARD)

    @property
    def first_backward_divergence(self) -> KeyResult | None:
        return self._first(BACKWARD)

    @property
    def teacher_forced(self) -> bool:
        return str(self.candidate_metadata.get("teacher_forcing", "")).lower() in ("1", "true", "yes")

    # ------------------------------------------------------------------ text
    def table(self, only_failures: bool = False) -> str:
        """The per-key table, forward part then backward part."""
        rows = [r for r in self.results if r.failed] if only_failures else self.results
        width = max([len(r.key) for r in rows] + [24])
        head = (f"{'key':<{width}}  {'shape':<18} {'max abs err':>11} {'rel err':>9} {'tol':>8}  "
                f"{'worst index':<16} status")
        lines = []
        section = None
        for r in rows:
            part = "forward" if r.phase in mf.FORWARD_PHASES else "backward"
            if part != section:
                section = part
                lines.append(f"-- {part} " + "-" * max(0, len(head) - len(part) - 4))
                lines.append(head)
            shape = "x".join(map(str, r.golden_shape)) or "()"
            fmt = (lambda v: f"{v:.2e}" if v is not None and numpy.isfinite(v) else ("inf" if v is not None else "-"))
            worst = "-" if r.worst_index is None else str(tuple(int(i) for i in r.worst_index))
            status = r.status + ("" if r.required or r.status in ("ok", "absent") else " (optional)")
            line = (f"{r.key:<{width}}  {shape:<18} {fmt(r.max_abs):>11} {fmt(r.rel):>9} {fmt(r.rtol):>8}  "
                    f"{worst:<16} {status}")
            if r.note:
                line += f"  [{r.note}]"
            lines.append(line)
        return "\n".join(lines)

    def summary(self) -> str:
        m = self.manifest
        lines = [f"golden:    {self.golden_dir} ({m.get('model')}, {m.get('dtype')}, seed {m.get('seed')})",
                 f"candidate: {self.candidate_path}"
                 + (" (teacher-forced)" if self.teacher_forced else "")]
        if self.error is not None:
            lines.append(f"error: {self.error}")
            lines.append("RESULT: FAIL")
            return "\n".join(lines)
        lines.append(f"compared {len(self.compared)} of {len(self.results)} keys; "
                     f"{len(self.absent_optional)} optional keys absent; "
                     f"{len(self.extra_keys)} candidate keys not in the golden folder (ignored)")
        for label, r in (("first divergence", self.first_divergence),
                         ("first forward divergence", self.first_forward_divergence),
                         ("first backward divergence", self.first_backward_divergence)):
            if r is None:
                lines.append(f"{label}: none")
            else:
                why = (f"rel err {r.rel:.2e} > tol {r.rtol:.1e}" if r.status == "FAIL" and r.rel is not None
                       else r.status + (f": {r.note}" if r.note else ""))
                lines.append(f"{label}: layer {r.layer!r} at {r.key} ({why})")
        ff, fb = self.first_forward_divergence, self.first_backward_divergence
        if ff is not None and fb is not None and not self.teacher_forced:
            lines.append("note: the forward diverges first; backward divergences can be its consequence (gradients "
                         "depend on forward values). Dump with teacher forcing to localize backward errors.")
        if self.missing_required:
            lines.append(f"missing required keys ({len(self.missing_required)}): "
                         + ", ".join(r.key for r in self.missing_required[:10])
                         + (" ..." if len(self.missing_required) > 10 else ""))
        bad = [r for r in self.failures if r.status != "MISSING"]
        verdict = "PASS" if self.passed else (f"FAIL ({len(bad)} keys diverge, {len(self.missing_required)} "
                                              "required keys missing)")
        lines.append(f"RESULT: {verdict}")
        return "\n".join(lines)

    def __str__(self):
        if self.error is not None:
            return self.summary()
        return self.table() + "\n" + self.summary()


def _row(entry: dict) -> KeyResult:
    """An unfilled report row for a manifest key entry."""
    key = entry["key"]
    return KeyResult(key=key, phase=entry.get("phase", mf.phase_of(key)), layer=entry.get("layer", mf.layer_of(key)),
                     required=bool(entry.get("required", False)), status="ok", golden_shape=tuple(entry["shape"]))


def _fill(r: KeyResult, entry: dict, golden, cand, rtol_scale: float) -> KeyResult:
    """Compare ``cand`` with ``golden`` for row ``r`` (see the module docstring)."""
    r.candidate_shape = tuple(cand.shape)
    r.candidate_dtype = cand.dtype.name
    gkind = golden.dtype.kind
    if cand.dtype.kind not in "fiub" or (gkind == "f" and cand.dtype.kind not in "f"):
        r.status = "DTYPE"
        r.note = f"candidate dtype {cand.dtype.name}, golden {golden.dtype.name}"
        return r
    if tuple(cand.shape) != tuple(golden.shape):
        if cand.size != golden.size:
            r.status = "SHAPE" if r.required else "shape"
            r.note = f"candidate shape {tuple(cand.shape)}, golden {tuple(golden.shape)}"
            return r
        r.note = f"compared as reshaped from {tuple(cand.shape)}"
        cand = cand.reshape(golden.shape)
    g = golden.astype(numpy.float64)
    c = cand.astype(numpy.float64)
    kind = "float64" if cand.dtype == numpy.float64 else "float32"
    r.rtol = mf.tolerance(entry, kind) * rtol_scale
    r.atol = mf.abs_tolerance(entry, kind) * rtol_scale
    if g.size == 0:
        r.max_abs = r.rel = 0.0
        return r
    finite = numpy.isfinite(g)
    bad = ~numpy.isfinite(c) & finite
    if bad.any():
        r.status = "NON-FINITE"
        r.worst_index = numpy.unravel_index(int(numpy.argmax(bad)), g.shape) if g.ndim else ()
        r.note = f"{int(bad.sum())} NaN/inf entries where the golden value is finite"
        r.max_abs = r.rel = float("inf")
        return r
    diff = numpy.where(finite, numpy.abs(c - g), 0.0)
    flat = int(numpy.argmax(diff))
    r.max_abs = float(diff.reshape(-1)[flat])
    r.worst_index = tuple(int(i) for i in numpy.unravel_index(flat, g.shape)) if g.ndim else ()
    scale = float(numpy.max(numpy.abs(numpy.where(finite, g, 0.0))))
    r.rel = 0.0 if r.max_abs == 0.0 else (r.max_abs / scale if scale > 0 else float("inf"))
    if not (r.rel <= r.rtol or r.max_abs <= r.atol):
        r.status = "FAIL"
    return r


def check_golden(golden_dir, candidate, rtol_scale: float = 1.0) -> CheckReport:
    """Compare ``candidate`` (a safetensors file path, or a mapping of key -> array) with the golden
    folder ``golden_dir``. Returns a CheckReport; ``report.passed`` is the verdict. A candidate file
    that cannot be read gives a report whose ``error`` says why (nothing is raised for it); a
    golden folder that is missing or malformed raises ``GoldenFormatError``. ``rtol_scale``
    multiplies every recommended tolerance."""
    if isinstance(rtol_scale, bool) or not isinstance(rtol_scale, (int, float)) or not rtol_scale > 0:
        raise ValueError(f"rtol_scale must be a positive number, got {rtol_scale!r}")
    golden_dir = os.fspath(golden_dir)
    manifest = mf.read_manifest(golden_dir)
    tensors_path = os.path.join(golden_dir, mf.TENSORS)
    try:
        golden = load_with_metadata(tensors_path)[0]
    except SafetensorsError as exc:
        raise mf.GoldenFormatError(f"golden tensors unreadable: {exc}") from None
    if hasattr(candidate, "items"):
        path, cand, meta = "<in-memory dump>", {str(k): numpy.asarray(v) for k, v in candidate.items()}, {}
    else:
        path = os.fspath(candidate)
        report = CheckReport(golden_dir, path, manifest)
        if not os.path.isfile(path):
            report.error = f"candidate file {path!r} does not exist"
            return report
        try:
            cand, meta = load_with_metadata(path)
        except SafetensorsError as exc:
            report.error = f"candidate file is not a valid safetensors file: {exc}"
            return report
        except OSError as exc:
            report.error = f"candidate file {path!r} cannot be read: {exc}"
            return report
    report = CheckReport(golden_dir, path, manifest, candidate_metadata=dict(meta))
    known = set()
    for entry in manifest["keys"]:
        key = entry["key"]
        known.add(key)
        r = _row(entry)
        if key not in golden:
            raise mf.GoldenFormatError(f"golden folder {golden_dir!r}: manifest key {key!r} is not in {mf.TENSORS}")
        if key not in cand:
            r.status = "MISSING" if r.required else "absent"
        else:
            _fill(r, entry, golden[key], cand[key], rtol_scale)
        report.results.append(r)
    report.extra_keys = sorted(k for k in cand if k not in known)
    return report
