"""Training configs: strict TOML -> dataclasses (unknown keys, wrong types, choices, bounds), templates
that round-trip, and the Python 3.10 subset reader agreeing with tomllib."""
import sys
import tomllib
from dataclasses import dataclass

import pytest

from npdiffusion.training import config as cfgmod
from npdiffusion.training.config import (ConfigError, DataConfig, StageConfig, TrainConfig, build_config, config_template,
                                         config_to_dict, load_config, option, parse_toml, parse_toml_subset, section)
from npdiffusion.training.tokenizer_stage import TokenizerStageConfig


@dataclass
class Inner:
    channels: tuple[int, ...] = option((32, 64), "widths", min=1)
    names: tuple[str, ...] = option(("a",), "names")


@dataclass
class Schema(StageConfig):
    model: Inner = section(Inner, "model")


def load(tmp_path, text, schema=Schema):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(path, schema)


def error(tmp_path, text, schema=Schema):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, schema)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "config.toml"))
    return message


def test_missing_keys_keep_defaults_and_given_ones_are_typed(tmp_path):
    c = load(tmp_path, 'output_dir = "o"\n[train]\nlearning_rate = 1\nsteps = 5\nuse_ema = true\n'
                       '[model]\nchannels = [8, 16, 16]\n')
    assert c.output_dir == "o" and c.train.steps == 5 and c.train.use_ema is True
    assert c.train.learning_rate == 1.0 and isinstance(c.train.learning_rate, float)   # int accepted as float
    assert c.model.channels == (8, 16, 16) and c.model.names == ("a",)
    assert c.data == DataConfig() and c.train.batch_size == TrainConfig().batch_size


def test_unknown_key_names_the_key_and_suggests(tmp_path):
    msg = error(tmp_path, "[train]\nlerning_rate = 0.1\n")
    assert "unknown key 'train.lerning_rate' (did you mean 'learning_rate'?)" in msg
    assert "the keys of [train] are steps, batch_size, learning_rate" in msg
    assert "unknown key 'colour'" in error(tmp_path, "colour = 1\n")
    assert "unknown key 'optimizer'" in error(tmp_path, "[optimizer]\nlr = 1\n")


@pytest.mark.parametrize("text,expected", [
    ('[train]\nbatch_size = "64"\n', "'train.batch_size' must be an int, got str '64'"),
    ("[train]\nbatch_size = 64.0\n", "'train.batch_size' must be an int, got float 64.0"),
    ("[train]\nbatch_size = true\n", "'train.batch_size' must be an int, got bool True"),
    ("[train]\nuse_ema = 1\n", "'train.use_ema' must be a bool (true or false), got int 1"),
    ('[train]\nlearning_rate = "1e-3"\n', "'train.learning_rate' must be a number, got str '1e-3'"),
    ("[train]\nlearning_rate = nan\n", "'train.learning_rate' must be a finite number, got nan"),
    ("output_dir = 3\n", "'output_dir' must be a string, got int 3"),
    ("[model]\nchannels = 32\n", "'model.channels' must be an array of ints, got int 32"),
    ('[model]\nchannels = [32, "64"]\n', "'model.channels[1]' must be an int, got str '64'"),
    ("[model]\nnames = [1]\n", "'model.names[0]' must be a string, got int 1"),
    ("train = 3\n", "'train' must be a table, got int 3"),
    ('[data]\ndataset = "imagenet"\n', "'data.dataset' must be one of 'shapes', 'digits', 'folder', got str 'imagenet'"),
    ("[train]\nsteps = 0\n", "'train.steps' must be >= 1, got int 0"),
    ("[model]\nchannels = [8, 0]\n", "'model.channels' must be >= 1, got array [8, 0]"),
    ("[train]\nlearning_rate = -1.0\n", "'train.learning_rate' must be >= 0.0, got float -1.0"),
])
def test_wrong_types_and_values_name_key_expected_and_got(tmp_path, text, expected):
    assert expected in error(tmp_path, text)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file .*nope.toml' does not exist"):
        load_config(tmp_path / "nope.toml", Schema)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_config(tmp_path, Schema)
    (tmp_path / "config.toml").write_bytes(b"a = '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "config.toml", Schema)
    assert "invalid TOML" in error(tmp_path, "[train\nsteps = 1\n")


@pytest.mark.parametrize("schema", [Schema, TokenizerStageConfig])
def test_template_documents_every_key_and_round_trips_to_the_defaults(schema):
    text = config_template(schema)
    assert build_config(schema, tomllib.loads(text)) == schema()
    assert build_config(schema, parse_toml_subset(text)) == schema()
    assert "# AdamW learning rate" in config_template(Schema)
    assert "[one of: shapes, digits, folder]" in text
    assert config_to_dict(schema()) == tomllib.loads(text)


TRICKY = r'''
# a comment
title = "quote \" backslash \\ tab \t unicode \u00e9 \U0001F600"   # trailing comment
literal = 'C:\path\no escapes'
negative = -42
plus = +7
under = 1_000_000
zero = 0
f1 = 3.25
f2 = -1e-3
f3 = 6.02E+23
f4 = 1_000.5
inf1 = inf
ninf = -inf
yes = true
no = false
empty = []
nested = [[1, 2], ["a", 'b']]
multiline = [
    1,   # one
    2,
    3,   # trailing comma next
]
key-with-dash = "ok"

[table]
x = 1
[table.sub]
y = "z"
[other]
'''


def test_subset_reader_agrees_with_tomllib():
    assert parse_toml_subset(TRICKY) == tomllib.loads(TRICKY)


@pytest.mark.parametrize("text,match,valid_toml", [
    ("a = {b = 1}\n", "inline tables are not supported .*Python 3.11\\+ or `pip install tomli`", True),
    ('a = """x"""\n', "multi-line strings are not supported", True),
    ("a.b = 1\n", "quoted or dotted keys are not supported", True),
    ('"a" = 1\n', "quoted or dotted keys are not supported", True),
    ("d = 1979-05-27\n", "dates, hex/octal/binary numbers", True),
    ("h = 0xff\n", "dates, hex/octal/binary numbers", True),
    ("[[arr]]\n", "arrays of tables are not supported", True),
    ("a = bare\n", "'bare' is not a TOML value \\(strings need quotes\\)", False),
    ("a = 1\na = 2\n", "line 2: the key 'a' is defined twice", False),
    ("[t]\n[t]\n", "line 2: table \\[t\\] is defined twice", False),
    ('a = "open\n', "unterminated string", False),
    ("a = [1, 2\n", "unterminated array", False),
    ("a = [1 2]\n", "expected ',' or ']' in an array", False),
    ("a = 1 2\n", "unexpected text after the value", False),
    ("just words\n", "expected 'key = value'", False),
    ("a = \n", "a value is missing", False),
])
def test_subset_reader_rejects_what_it_does_not_support_on_one_line(text, match, valid_toml):
    with pytest.raises(ConfigError, match=match) as info:
        parse_toml_subset(text, source="c.toml")
    assert str(info.value).startswith("c.toml, line ")
    if valid_toml:
        tomllib.loads(text)                   # real TOML the subset reader declines, by name
    else:
        with pytest.raises(tomllib.TOMLDecodeError):
            tomllib.loads(text)


def test_multi_line_arrays_without_trailing_commas():
    text = "a = [\n  1,\n  2\n]\nb = [\n\n]\nc = [ [1,\n 2], [3]\n ]\n"
    assert parse_toml_subset(text) == tomllib.loads(text) == {"a": [1, 2], "b": [], "c": [[1, 2], [3]]}


def test_python_310_path_uses_the_subset_reader(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", None)
    assert parse_toml(TRICKY) == tomllib.loads(TRICKY)
    c = load(tmp_path, "[train]\nsteps = 3\n[model]\nchannels = [\n  4,\n  8,\n]\n")
    assert c.train.steps == 3 and c.model.channels == (4, 8)
    assert "unknown key 'train.stepz'" in error(tmp_path, "[train]\nstepz = 3\n")


def test_required_keys_and_bad_defaults():
    @dataclass
    class Needs:
        path: str = cfgmod.field(metadata={"help": "the folder"})

    with pytest.raises(ConfigError, match="the key 'path' is required \\(the folder\\)"):
        build_config(Needs, {})
    with pytest.raises(TypeError, match="use a tuple"):
        option([1], "x")
