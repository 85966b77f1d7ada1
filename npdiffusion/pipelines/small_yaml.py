"""A small YAML reader and writer for the original Stable Diffusion inference configs (v1-inference.yaml ...).

Shapes: none (text in, nested dicts out).

Those files use a small part of YAML: block mappings (``key: value``, nested by indentation), block
sequences of scalars (``- 1`` lines, at or below their key's indentation), flow sequences of scalars
(``[ 4, 2, 1 ]``), the empty flow mapping ``{}``, plain and quoted scalars and ``#`` comments. That
part is read here, with PyYAML's YAML 1.1 rules for what a plain scalar means (``true``/``False``/
``yes``/``off`` are booleans, ``~``/``null`` is None, ``1.e-6`` and ``1.0e-04`` are floats, but
``1e-6`` is a string: PyYAML's float needs a dot and a signed exponent), so the result equals
``yaml.safe_load`` on every such file (tested). Anything else (anchors ``&``/``*``, tags ``!``, block
scalars ``|``/``>``, nested flow collections, sequences of mappings) raises a ValueError naming the
line, rather than being read differently. PyYAML is therefore not a dependency of npdiffusion.

``dump_yaml(obj)`` writes nested dicts of scalars and lists of scalars in the same subset (lists in
flow style), so ``parse_yaml(dump_yaml(x)) == x`` and ``yaml.safe_load(dump_yaml(x)) == x``.
"""
from __future__ import annotations

import math
import re

_NULL = {"", "~", "null", "Null", "NULL"}
_TRUE = {"true", "True", "TRUE", "yes", "Yes", "YES", "on", "On", "ON"}
_FALSE = {"false", "False", "FALSE", "no", "No", "NO", "off", "Off", "OFF"}
_INTS = ((re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"), 10), (re.compile(r"^[-+]?0[0-7_]+$"), 8),
         (re.compile(r"^[-+]?0x[0-9a-fA-F_]+$"), 16), (re.compile(r"^[-+]?0b[01_]+$"), 2))
_FLOAT = re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_UNSUPPORTED_START = ("&", "*", "!", "|", ">", "%", "@", "`")


def _error(source: str, lineno: int, message: str) -> ValueError:
    return ValueError(f"{source}, line {lineno}: {message} (npdiffusion reads the YAML subset of the original "
                      "Stable Diffusion configs: mappings, lists of scalars, scalars, comments)")


def _strip_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def _scalar(text: str, source: str, lineno: int):
    text = text.strip()
    if text.startswith(("'", '"')):
        if len(text) < 2 or text[-1] != text[0]:
            raise _error(source, lineno, f"unterminated quoted string {text!r}")
        body = text[1:-1]
        if text[0] == "'":
            return body.replace("''", "'")
        if "\\" in body:
            raise _error(source, lineno, f"escape sequences in double-quoted strings are not supported: {text!r}")
        return body
    if text.startswith(_UNSUPPORTED_START) or text.startswith(("[", "{")):
        raise _error(source, lineno, f"unsupported YAML value {text!r}")
    if text in _NULL:
        return None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    for pattern, base in _INTS:
        if pattern.match(text):
            return int(text.replace("_", ""), base)
    if _FLOAT.match(text):
        lowered = text.lower().replace("_", "")
        return math.nan if lowered.endswith("nan") else float(lowered.replace(".inf", "inf"))
    return text


def _value(text: str, source: str, lineno: int):
    text = text.strip()
    if text.startswith("["):
        if not text.endswith("]"):
            raise _error(source, lineno, f"a flow list must end on its line with ']': {text!r}")
        inner = text[1:-1].strip()
        if any(c in inner for c in "[]{}"):
            raise _error(source, lineno, f"nested flow collections are not supported: {text!r}")
        return [] if not inner else [_scalar(item, source, lineno) for item in inner.split(",")]
    if text.startswith("{"):
        if text.replace(" ", "") != "{}":
            raise _error(source, lineno, f"flow mappings other than {{}} are not supported: {text!r}")
        return {}
    return _scalar(text, source, lineno)


def _split_key(content: str, source: str, lineno: int):
    match = re.match(r"^((?:'[^']*'|\"[^\"]*\"|[^:'\"])+?):(?:\s+(.*))?$", content)
    if not match:
        raise _error(source, lineno, f"expected 'key: value' or 'key:', got {content!r}")
    key = _scalar(match.group(1), source, lineno)
    return key, (match.group(2) or "")


def parse_yaml(text: str, source: str = "<yaml>") -> dict:
    """The mapping in the YAML ``text`` (the subset in the module docstring); ``source`` names it in errors."""
    lines = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise _error(source, lineno, "tabs in indentation are not YAML")
        content = _strip_comment(raw)
        if content.strip() in ("", "---"):
            continue
        lines.append((lineno, len(content) - len(content.lstrip()), content.strip()))
    if not lines:
        return {}
    value, end = _block(lines, 0, lines[0][1], source)
    if end != len(lines):
        lineno = lines[end][0]
        raise _error(source, lineno, "indentation does not match any open mapping")
    if not isinstance(value, dict):
        raise ValueError(f"{source}: the document must be a mapping, got a {type(value).__name__}")
    return value


def _block(lines, i: int, indent: int, source: str):
    if lines[i][2].startswith("- ") or lines[i][2] == "-":
        items = []
        while i < len(lines) and lines[i][1] == indent and (lines[i][2].startswith("- ") or lines[i][2] == "-"):
            lineno, _, content = lines[i]
            item = content[1:].strip()
            if re.match(r"^[^'\"\[{]*:(\s|$)", item):
                raise _error(source, lineno, "lists of mappings are not supported")
            items.append(_value(item, source, lineno))
            i += 1
        return items, i
    mapping = {}
    while i < len(lines) and lines[i][1] == indent:
        lineno, _, content = lines[i]
        if content.startswith("-"):
            raise _error(source, lineno, "a list item where a 'key: value' was expected")
        key, rest = _split_key(content, source, lineno)
        if key in mapping:
            raise _error(source, lineno, f"duplicate key {key!r}")
        i += 1
        if rest:
            mapping[key] = _value(rest, source, lineno)
        elif i < len(lines) and (lines[i][1] > indent or (lines[i][1] == indent and lines[i][2].startswith("-"))):
            mapping[key], i = _block(lines, i, lines[i][1], source)
        else:
            mapping[key] = None
    if i < len(lines) and lines[i][1] > indent:
        raise _error(source, lines[i][0], "unexpected indentation")
    return mapping, i


# ------------------------------------------------------------------------------------------ writing
def _dump_scalar(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"dump_yaml: {value!r} is not a finite number")
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        if "." not in mantissa:
            mantissa += ".0"
        if exponent and exponent[0] not in "+-":
            exponent = "+" + exponent
        return mantissa + ("e" + exponent if exponent else "")
    if isinstance(value, str):
        special = any(c in value for c in ':#\'"[]{},\n\\') or value != value.strip() or value.startswith("-")
        if value and not special and _scalar(value, "", 0) == value:
            return value
        if '"' in value or "\\" in value or "\n" in value:
            raise ValueError(f"dump_yaml: cannot write the string {value!r} (quotes, backslashes, line breaks)")
        return '"' + value + '"'
    raise TypeError(f"dump_yaml: cannot write a {type(value).__name__} ({value!r})")


def dump_yaml(obj: dict, indent: int = 0) -> str:
    """YAML text of ``obj`` (nested dicts with string keys; scalars; lists of scalars written as [a, b])."""
    lines = []
    pad = " " * indent
    for key, value in obj.items():
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{key}:")
            lines.append(dump_yaml(value, indent + 2).rstrip("\n"))
        elif isinstance(value, dict):
            lines.append(f"{pad}{key}: {{}}")
        elif isinstance(value, (list, tuple)):
            lines.append(f"{pad}{key}: [{', '.join(_dump_scalar(v) for v in value)}]")
        else:
            lines.append(f"{pad}{key}: {_dump_scalar(value)}")
    return "\n".join(lines) + "\n"
