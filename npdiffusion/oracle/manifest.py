"""The golden folder's format: key names, phases, the manifest (manifest.json) and its validation.

A golden folder holds three files (docs/oracle.md, "The golden folder"):

    manifest.json         what was run: model, config, dtype, seed, the loss, tolerances, and every
                          key in order (forward order, then backward order), each with its phase,
                          layer, shape, dtype, whether a candidate must provide it, and its tolerances
    golden.safetensors    every tensor of the manifest, by key
    config.json           the model's own config (diffusers / transformers keys), to build a twin

Key names (``KEY_PATTERNS``; ``<m>`` is a dotted module name as ``named_modules()`` gives it)::

    input/<arg>                   the model's inputs, by argument name
    param/<state-dict key>        the weights
    act/<m>/input.<i|kw>[.<j>]    a module's inputs (positional index or keyword)
    act/<m>/output[.<i>...]       a module's output ("output" when it returns one array)
    output/<name>                 the model's outputs, by name
    output_grad/<name>            d loss / d output: the fixed projection P of the loss
    grad/<m>/output[.<i>...]      the gradient a module's backward receives
    grad/<m>/input.<i|kw>[.<j>]   the gradient a module's backward returns for an input
    param_grad/<state-dict key>   d loss / d weight
    input_grad/<arg>              d loss / d input
    loss                          the scalar loss, sum over outputs of sum(P * output)

Shapes: as each tensor; the manifest stores them as lists.
"""
from __future__ import annotations

import json
import os

FORMAT = "npdiffusion-golden"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "golden.safetensors"
CONFIG = "config.json"

#: Phases in file order: what a key is, and where it sits in the forward/backward story.
PHASES = ("input", "weights", "forward", "output", "output_grad", "backward", "input_grad", "loss")
FORWARD_PHASES = ("input", "weights", "forward", "output")

#: Tolerances (relative to the golden tensor's largest magnitude) a correct implementation meets:
#: the floor of every key's recommended tolerance; keys whose float32 rounding is larger get more
#: (measured per key at export, see export.py).
BASE_RTOL = {"float32": 1e-4, "float64": 1e-9}
EPS = {"float32": 2.0 ** -23, "float64": 2.0 ** -52}
SAFETY = 10.0
#: The same factor for keys that are rounding noise (their exact value is zero; docs/oracle.md): two
#: correct implementations' noise differs by more than SAFETY (torch's float32 noise on the bias
#: gradient of a VAE conv feeding a one-channel-per-group norm measured 13x ours), while a wrong
#: gradient there is the size of the layer's real gradients, ~1e10 times the noise.
NOISE_SAFETY = 1000.0


class GoldenFormatError(ValueError):
    """A golden folder that is missing files or whose manifest is malformed; the message says which."""


def phase_of(key: str) -> str:
    """The phase of a key name (see the module docstring); ValueError for a name outside the scheme."""
    head = key.split("/", 1)[0]
    phase = {"input": "input", "param": "weights", "act": "forward", "output": "output",
             "output_grad": "output_grad", "grad": "backward", "param_grad": "backward",
             "input_grad": "input_grad", "loss": "loss"}.get(head)
    if phase is None:
        raise ValueError(f"key {key!r} does not follow the golden naming scheme (docs/oracle.md, 'Key names')")
    return phase


def layer_of(key: str) -> str:
    """The layer a key belongs to: the module name for act/, grad/, param/ and param_grad/ keys,
    ``(inputs)``, ``(outputs)`` or ``(loss)`` for the model's own tensors."""
    head, _, rest = key.partition("/")
    if head in ("act", "grad"):
        return rest.rsplit("/", 1)[0]
    if head in ("param", "param_grad"):
        return rest.rsplit(".", 1)[0] if "." in rest else "(root)"
    if head in ("input", "input_grad"):
        return "(inputs)"
    if head in ("output", "output_grad"):
        return "(outputs)"
    return "(loss)"


def tolerance(entry: dict, dtype: str) -> float:
    """The recommended relative tolerance of a manifest key entry for a candidate in ``dtype``."""
    kind = "float64" if dtype == "float64" else "float32"
    return float(entry.get("rtol", {}).get(kind, BASE_RTOL[kind]))


def abs_tolerance(entry: dict, dtype: str) -> float:
    """The absolute tolerance of a rounding-noise key (0 for every other key): NOISE_SAFETY times
    the float32 noise measured at export, so that a golden value that came out exactly zero
    (rounding can give that too) still has a bound."""
    kind = "float64" if dtype == "float64" else "float32"
    return float(entry.get("atol", {}).get(kind, 0.0))


def dumps(obj) -> str:
    """Deterministic JSON text: sorted keys, two-space indent, a final newline."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def read_manifest(folder) -> dict:
    """The validated manifest of the golden folder ``folder``, or a GoldenFormatError naming the problem."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise GoldenFormatError(f"golden folder {folder!r} does not exist or is not a folder")
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise GoldenFormatError(f"golden folder {folder!r} has no {MANIFEST} (make one with "
                                "`npdiffusion golden export`)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GoldenFormatError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GoldenFormatError(f"{path}: not an npdiffusion golden manifest (expected \"format\": \"{FORMAT}\")")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise GoldenFormatError(f"{path}: format_version {manifest.get('format_version')!r} is not supported "
                                f"(this npdiffusion reads version {FORMAT_VERSION})")
    keys = manifest.get("keys")
    if not isinstance(keys, list) or not all(isinstance(e, dict) and isinstance(e.get("key"), str)
                                             and isinstance(e.get("shape"), list) for e in keys):
        raise GoldenFormatError(f"{path}: \"keys\" must be a list of objects with \"key\" and \"shape\"")
    if not os.path.isfile(os.path.join(folder, TENSORS)):
        raise GoldenFormatError(f"golden folder {folder!r} has no {TENSORS}")
    return manifest
