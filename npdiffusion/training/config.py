"""Training configs: TOML files read into dataclasses, with documented defaults and strict checking.

A stage's config is a dataclass whose fields are plain values (``str``, ``int``, ``float``,
``bool``, ``tuple[int, ...]``, ``tuple[str, ...]``) or nested section dataclasses (TOML tables).
Each field's ``metadata`` carries ``help`` (its documentation, shown in templates and docs) and
optionally ``choices`` and ``min``. ``load_config(path, Schema)`` reads the file and builds the
dataclass; a key the schema does not know, a value of the wrong type, a value outside ``choices``
or below ``min`` raises one ``ConfigError`` (a ValueError) naming the file, the key, what was
expected and what came::

    config.toml: unknown key 'train.lerning_rate' (did you mean 'learning_rate'?)
    config.toml: 'train.batch_size' must be an int, got str '64'

Types are strict as TOML's are: an int is accepted where a float is expected (``lr = 1`` is 1.0),
nothing else converts (``batch_size = 64.0`` or ``"64"`` is an error, ``true`` is not an int).
Keys left out keep their defaults. ``config_template(Schema)`` renders a complete TOML file with
every default and its help as comments; ``config_to_dict`` gives the plain nested dict.

TOML reading: ``tomllib`` (Python 3.11+); on 3.10 ``tomli`` when installed, otherwise a small
built-in reader of the subset our configs use (tables, ``key = value`` with strings, integers,
floats, booleans and arrays, comments), which rejects anything else on one line naming it.
Docs: docs/training.md ("Configs").
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import MISSING, dataclass, field

#: The datasets ``DataConfig.dataset`` may name.
DATASET_NAMES = ("shapes", "digits", "folder")
LR_SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear")
DTYPES = ("float32", "float64")
#: ``train.mixed_precision``: "no" (compute in ``dtype``) or "fp16" (float16 compute, float32 masters).
MIXED_PRECISION = ("no", "fp16")


class ConfigError(ValueError):
    """A config file that cannot be used: the message names the file, the key, expected and got."""


def option(default, help: str, choices=None, min=None):  # noqa: A002 - dataclass-style keyword names
    """A dataclass field with its documentation (and optional allowed values / lower bound)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if min is not None:
        meta["min"] = min
    if isinstance(default, (list, dict)):
        raise TypeError("option: use a tuple for a sequence default")
    return field(default=default, metadata=meta)


def section(cls, help: str):  # noqa: A002
    """A nested table field (a section dataclass built with its defaults)."""
    return field(default_factory=cls, metadata={"help": help, "section": True})


# ============================================================================ shared sections
@dataclass
class DataConfig:
    """``[data]``: which images and captions to train on."""

    dataset: str = option("shapes", "shapes (built-in synthetic shapes), digits (scikit-learn's handwritten "
                          "digits; needs scikit-learn) or folder (your images in `path`)", choices=DATASET_NAMES)
    path: str = option("", "folder dataset: the folder of images with metadata.jsonl (file_name, text) or a "
                       ".txt caption beside each image")
    num_images: int = option(10000, "shapes dataset: how many images to generate", min=1)
    resolution: int = option(32, "image side in pixels (folder images are resized and center-cropped to it)", min=8)
    seed: int = option(0, "shapes dataset: the seed that generates the images", min=0)
    caption_column: str = option("text", "folder dataset: the metadata.jsonl key holding each caption")
    shapes: tuple[str, ...] = option(("circle", "square", "triangle"), "shapes dataset: the shapes drawn, "
                                     "from circle, square, triangle and cross (cross: the LoRA lesson's new shape); a name listed "
                                     "twice is drawn twice as often")


@dataclass
class TrainConfig:
    """``[train]``: the optimization loop shared by the CLIP, VAE and U-Net stages."""

    steps: int = option(1000, "training steps (batches); a skipped non-finite step counts as a step", min=1)
    batch_size: int = option(32, "images per step", min=1)
    learning_rate: float = option(1e-3, "AdamW learning rate (peak, after warm-up)", min=0.0)
    lr_scheduler: str = option("constant", "learning-rate schedule (diffusers' names)", choices=LR_SCHEDULES)
    lr_warmup_steps: int = option(0, "linear warm-up steps of the schedule", min=0)
    adam_beta1: float = option(0.9, "AdamW beta1", min=0.0)
    adam_beta2: float = option(0.999, "AdamW beta2", min=0.0)
    adam_epsilon: float = option(1e-8, "AdamW epsilon", min=0.0)
    adam_weight_decay: float = option(1e-2, "AdamW decoupled weight decay", min=0.0)
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this; 0 disables clipping", min=0.0)
    use_ema: bool = option(False, "keep an exponential moving average of the weights and export it")
    ema_decay: float = option(0.9999, "EMA decay (diffusers' warm-up rule: min(decay, (1 + k) / (10 + k)))", min=0.0)
    seed: int = option(0, "seed of the initial weights, the data order and the step's random draws", min=0)
    dtype: str = option("float32", "parameter and compute dtype", choices=DTYPES)
    mixed_precision: str = option("no", "fp16: forward and backward in float16 with float32 master weights and "
                                  "dynamic loss scaling (needs dtype float32); no: everything in dtype",
                                  choices=MIXED_PRECISION)
    loss_scale_init: float = option(65536.0, "fp16: the initial loss scale (halved after each overflow, "
                                    "doubled after loss_scale_growth_interval good steps)", min=1.0)
    loss_scale_growth_interval: int = option(2000, "fp16: good steps in a row before the loss scale doubles", min=1)
    max_consecutive_overflow_steps: int = option(32, "fp16: stop when this many steps in a row have non-finite "
                                                 "gradients (each one skipped, the loss scale halved)", min=1)
    checkpointing_steps: int = option(500, "save a checkpoint every this many steps (and at the end)", min=1)
    checkpoints_total_limit: int = option(3, "keep this many newest checkpoints; older ones are deleted only "
                                          "after a newer one is complete", min=1)
    max_consecutive_bad_steps: int = option(10, "stop when this many steps in a row have a non-finite loss or "
                                            "gradient (each one is skipped)", min=1)
    prefetch: int = option(2, "batches prepared ahead by a background thread (0: none)", min=0)


@dataclass
class StageConfig:
    """The keys of every model-training stage's config file: where it writes, the data, the optimization
    loop. A stage's config subclasses it, gives ``output_dir`` its own default and adds its section."""

    output_dir: str = option("runs", "folder for checkpoints, losses and the trained model (created if missing)")
    data: DataConfig = section(DataConfig, "the training images (and captions)")
    train: TrainConfig = section(TrainConfig, "the optimization loop")


# ============================================================================ TOML reading
def read_toml(path) -> dict:
    """The TOML file at ``path`` as a dict (see the module docstring for the reader used)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"config file {path!r} is a folder, not a TOML file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_toml(text, source=path)


def parse_toml(text: str, source: str = "config") -> dict:
    """Parse TOML ``text`` with tomllib / tomli, or the built-in subset reader on Python 3.10."""
    try:
        import tomllib as toml  # noqa: PLC0415 - Python 3.11+
    except ImportError:
        try:
            import tomli as toml  # noqa: PLC0415 - optional on 3.10
        except ImportError:
            return parse_toml_subset(text, source)
    try:
        return toml.loads(text)
    except toml.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_INT = re.compile(r"[+-]?(0|[1-9](_?[0-9])*)")
_FLOAT = re.compile(r"[+-]?(0|[1-9](_?[0-9])*)(\.[0-9](_?[0-9])*)?([eE][+-]?[0-9](_?[0-9])*)?")
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}


class _Reader:
    """A cursor over one logical TOML value (possibly spanning lines, for arrays)."""

    def __init__(self, text: str, where):
        self.s, self.i, self.where = text, 0, where

    def fail(self, msg):
        raise ConfigError(f"{self.where()}: {msg}")

    def skip_ws(self, newlines=False):
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in " \t" or (newlines and c in "\r\n"):
                self.i += 1
            elif newlines and c == "#":
                while self.i < len(self.s) and self.s[self.i] != "\n":
                    self.i += 1
            else:
                break

    def value(self):
        self.skip_ws()
        s, i = self.s, self.i
        if i >= len(s):
            self.fail("a value is missing after '='")
        c = s[i]
        if s.startswith('"""', i) or s.startswith("'''", i):
            self.fail(f"multi-line strings {self._unsupported}")
        if c == '"':
            return self.basic_string()
        if c == "'":
            end = s.find("'", i + 1)
            if end < 0 or "\n" in s[i:end]:
                self.fail("unterminated literal string")
            self.i = end + 1
            return s[i + 1:end]
        if c == "[":
            return self.array()
        if c == "{":
            self.fail(f"inline tables {self._unsupported}")
        m = re.compile(r"[^\s,\]#]+").match(s, i)
        token = m.group(0) if m else ""
        self.i = i + len(token)
        if token in ("true", "false"):
            return token == "true"
        if token in ("inf", "+inf", "-inf", "nan", "+nan", "-nan"):
            return float(token)
        if _INT.fullmatch(token):
            return int(token.replace("_", ""))
        if _FLOAT.fullmatch(token) and ("." in token or "e" in token.lower()):
            return float(token.replace("_", ""))
        if re.match(r"\d{4}-\d{2}-\d{2}", token) or token.startswith(("0x", "0o", "0b")):
            self.fail(f"the value {token!r} (dates, hex/octal/binary numbers) {self._unsupported}")
        self.fail(f"{token!r} is not a TOML value (strings need quotes)")

    _unsupported = ("are not supported by npdiffusion's minimal TOML reader (Python 3.10 without tomli); "
                    "use Python 3.11+ or `pip install tomli`")

    def basic_string(self):
        s, i = self.s, self.i + 1
        out = []
        while True:
            if i >= len(s) or s[i] == "\n":
                self.fail("unterminated string")
            c = s[i]
            if c == '"':
                self.i = i + 1
                return "".join(out)
            if c == "\\":
                e = s[i + 1:i + 2]
                if e in _ESCAPES:
                    out.append(_ESCAPES[e])
                    i += 2
                elif e in ("u", "U"):
                    n = 4 if e == "u" else 8
                    hexs = s[i + 2:i + 2 + n]
                    if len(hexs) != n or not all(h in "0123456789abcdefABCDEF" for h in hexs):
                        self.fail(f"bad escape \\{e}{hexs}")
                    out.append(chr(int(hexs, 16)))
                    i += 2 + n
                else:
                    self.fail(f"bad escape \\{e}")
            else:
                out.append(c)
                i += 1

    def array(self):
        self.i += 1
        items = []
        while True:
            self.skip_ws(newlines=True)
            if self.i >= len(self.s):
                self.fail("unterminated array")
            if self.s[self.i] == "]":
                self.i += 1
                return items
            items.append(self.value())
            self.skip_ws(newlines=True)
            if self.i >= len(self.s):
                self.fail("unterminated array")
            if self.s[self.i] == ",":
                self.i += 1
            elif self.s[self.i] != "]":
                self.fail("expected ',' or ']' in an array")


def parse_toml_subset(text: str, source: str = "config") -> dict:
    """The built-in reader of a TOML subset (see the module docstring); same results as tomllib on it."""
    root: dict = {}
    table = root
    defined = set()
    lines = text.splitlines()
    n = 0
    while n < len(lines):
        line = lines[n]
        lineno = n + 1
        n += 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue

        def where(lineno=lineno):
            return f"{source}, line {lineno}"

        if stripped.startswith("["):
            if stripped.startswith("[["):
                raise ConfigError(f"{where()}: arrays of tables {_Reader._unsupported}")
            m = re.fullmatch(r"\[\s*([A-Za-z0-9_.\- ]+?)\s*\]\s*(#.*)?", stripped)
            if not m:
                raise ConfigError(f"{where()}: malformed table header {stripped!r}")
            parts = [p.strip() for p in m.group(1).split(".")]
            if not all(_BARE_KEY.fullmatch(p) for p in parts):
                raise ConfigError(f"{where()}: malformed table header {stripped!r}")
            if tuple(parts) in defined:
                raise ConfigError(f"{where()}: table [{'.'.join(parts)}] is defined twice")
            defined.add(tuple(parts))
            table = root
            for p in parts:
                nxt = table.setdefault(p, {})
                if not isinstance(nxt, dict):
                    raise ConfigError(f"{where()}: [{'.'.join(parts)}] redefines the key {p!r}")
                table = nxt
            continue
        m = re.match(r"\s*([A-Za-z0-9_-]+)\s*=", line)
        if not m:
            if re.match(r'\s*["\']', line) or re.match(r"\s*[A-Za-z0-9_-]+\s*\.", line):
                raise ConfigError(f"{where()}: quoted or dotted keys {_Reader._unsupported}")
            raise ConfigError(f"{where()}: expected 'key = value', got {stripped!r}")
        key = m.group(1)
        # An array may continue over the following lines: feed lines until it closes.
        chunk, end_line = line[m.end():], n
        while True:
            reader = _Reader(chunk, where)
            try:
                value = reader.value()
                break
            except ConfigError as exc:
                if "unterminated array" in str(exc) and end_line < len(lines):
                    chunk += "\n" + lines[end_line]
                    end_line += 1
                    continue
                raise
        n = end_line
        reader.skip_ws()
        rest = reader.s[reader.i:].strip()
        if rest and not rest.startswith("#"):
            raise ConfigError(f"{where()}: unexpected text after the value: {rest!r}")
        if key in table:
            raise ConfigError(f"{where()}: the key {key!r} is defined twice")
        table[key] = value
    return root


# ============================================================================ schema checking
def _type_name(tp) -> str:
    if tp is bool:
        return "a bool (true or false)"
    if tp is int:
        return "an int"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"an array of {_type_name(typing.get_args(tp)[0]).split(' ', 1)[1]}s"
    return getattr(tp, "__name__", str(tp))


def _got(value) -> str:
    kind = {bool: "bool", int: "int", float: "float", str: "str", list: "array", dict: "table"}.get(type(value),
                                                                                                   type(value).__name__)
    text = repr(value)
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"


def _convert(tp, value, key: str, source: str):
    def bad():
        raise ConfigError(f"{source}: {key!r} must be {_type_name(tp)}, got {_got(value)}")

    if tp is bool:
        if not isinstance(value, bool):
            bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad()
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{source}: {key!r} must be a finite number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            bad()
        return value
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, list):
            bad()
        inner = typing.get_args(tp)[0]
        return tuple(_convert(inner, v, f"{key}[{i}]", source) for i, v in enumerate(value))
    raise TypeError(f"config schema: unsupported field type {tp!r} for {key!r}")


def build_config(schema, data: dict, source: str = "config", prefix: str = ""):
    """An instance of the dataclass ``schema`` from the nested dict ``data`` (see the module docstring)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the file'!r} must be a table, got {_got(data)}")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
            raise ConfigError(f"{source}: unknown key {prefix + key!r}{hint}; the keys of {where} are "
                              f"{', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_config(tp, data.get(name, {}), source, key + ".")
            continue
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(f"{source}: the key {key!r} is required ({f.metadata.get('help', '')})")
            continue
        value = _convert(tp, data[name], key, source)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{source}: {key!r} must be one of {', '.join(map(repr, choices))}, got {_got(value)}")
        low = f.metadata.get("min")
        if low is not None:
            vals = value if isinstance(value, tuple) else (value,)
            if any(v < low for v in vals):
                raise ConfigError(f"{source}: {key!r} must be >= {low}, got {_got(data[name])}")
        kwargs[name] = value
    instance = schema(**kwargs)
    object.__setattr__(instance, GIVEN_ATTRIBUTE, frozenset(n for n in data if not dataclasses.is_dataclass(hints[n])))
    return instance


GIVEN_ATTRIBUTE = "_keys_given"


def given_keys(section_config) -> frozenset:
    """The plain keys of a config section that were set: those its file held (``build_config`` records
    them), or for a section built in Python, those whose value is not the default. A stage uses it to
    tell a value the user chose from a default (e.g. ``unet.pretrained`` takes sizes from the folder
    unless the config gives them)."""
    recorded = getattr(section_config, GIVEN_ATTRIBUTE, None)
    if recorded is not None:
        return recorded
    out = []
    for f in dataclasses.fields(section_config):
        if f.metadata.get("section"):
            continue
        default = f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default
        if getattr(section_config, f.name) != default:
            out.append(f.name)
    return frozenset(out)


def load_config(path, schema):
    """Read the TOML file ``path`` into the dataclass ``schema`` (strictly; see the module docstring)."""
    data = read_toml(path)
    return build_config(schema, data, source=os.fspath(path))


def config_to_dict(config) -> dict:
    """The config as a plain nested dict (tuples become lists), e.g. to store it beside a checkpoint."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = config_to_dict(v)
        else:
            out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def config_to_toml(data: dict, prefix: str = "") -> str:
    """A nested dict of plain values (``config_to_dict``'s) as TOML text: keys first, then one table per
    nested dict (``[a.b]``). ``load_config`` reads it back to the same config."""
    lines, tables = [], []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    text = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        text += f"\n[{prefix}{k}]\n" + config_to_toml(v, prefix=f"{prefix}{k}.")
    return text


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def config_template(schema, title: str | None = None) -> str:
    """A complete TOML file for ``schema``: every key at its default, its help as a comment above it."""
    lines = [f"# {title}" if title else f"# {schema.__name__}", "# Every key is optional: a missing key keeps "
             "the default shown here.", ""]

    def emit(cls, prefix, instance):
        sections = []
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                sections.append((f, hints[f.name]))
                continue
            help_ = f.metadata.get("help", "")
            choices = f.metadata.get("choices")
            if choices:
                help_ += f" [one of: {', '.join(map(str, choices))}]"
            lines.append(f"# {help_}")
            lines.append(f"{f.name} = {_toml_value(getattr(instance, f.name))}")
        for f, tp in sections:
            lines.append("")
            lines.append(f"[{prefix}{f.name}]")
            doc = f.metadata.get("help")
            if doc:
                lines.append(f"# {doc}")
            emit(tp, f"{prefix}{f.name}.", getattr(instance, f.name))

    emit(schema, "", schema())
    return "\n".join(lines) + "\n"
