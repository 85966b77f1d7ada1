"""``npdiffusion demo --dataset digits --quick``: every output is written, report.md holds the
per-digit accuracy table (guided and unguided) consistent with its confusion matrix, the configs
train on the digits with the shapes' model settings, tools/digits_classifier.py reads the model;
without scikit-learn the command prints one line and writes nothing; shapes stays the default.

Shapes: images uint8 (N, 32, 32, 3); the table has 10 digit rows and one overall row.
"""
import json
import os
import sys

import numpy as np
import pytest

from npdiffusion.cli import build_parser, main
from npdiffusion.training.demo import SETTINGS, demo_settings, run_demo, stage_configs

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


def _hide_sklearn(monkeypatch):
    """Make every ``import sklearn...`` fail, even of submodules an earlier test imported."""
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")] + ["sklearn"]:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture(scope="module")
def quick_digits(tmp_path_factory):
    pytest.importorskip("sklearn.svm", reason="the digits demo needs scikit-learn (pip install scikit-learn, "
                                              "the digits extra)")
    out = tmp_path_factory.mktemp("digits")
    summary = run_demo(str(out), quick=True, progress=False, log=lambda *a: None, dataset="digits")
    return out, summary


def _table(report: str, header_start: str) -> list[list[str]]:
    """Rows (cells) of the markdown table whose header row starts with ``header_start``."""
    lines = report.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_quick_digits_demo_writes_every_output(quick_digits):
    out, summary = quick_digits
    assert summary.startswith("demo: trained") and "on the digits" in summary
    assert "prompted digit recognized in" in summary and str(out) in summary
    for name in ("samples.png", "diffusion.png", "losses.png", "report.md", "model/model_index.json",
                 "configs/unet.toml", "runs/unet/losses.csv"):
        assert os.path.getsize(out / name) > 0, name
    from PIL import Image

    w, h = Image.open(out / "samples.png").size
    assert w >= 4 * 128 and h >= 10 * 128                   # ten digit rows by four seeds of at least 128 px
    assert 'dataset = "digits"' in (out / "configs" / "unet.toml").read_text()


def test_report_has_the_digit_accuracy_table(quick_digits):
    out, _ = quick_digits
    report = (out / "report.md").read_text()
    assert "1797 handwritten digits" in report
    for word in ("| unet |", "| vae |", "| clip |", "| total |"):
        assert word in report, word
    rows = _table(report, "| digit |")
    assert rows[0] == ["digit", "guided", "unguided", "samples"]
    assert [r[0] for r in rows[1:]] == list(DIGITS) + ["**all**"]
    pct = {r[0]: [float(c.strip("*%")) for c in r[1:3]] for r in rows[1:]}
    counts = [int(r[3]) for r in rows[1:]]
    assert counts[:10] == [1] * 10 and counts[10] == 10          # --quick: one seed per digit
    for name, (g, u) in pct.items():
        assert 0.0 <= g <= 100.0 and 0.0 <= u <= 100.0, name
    # the guided column agrees with the confusion matrix printed below it
    conf = _table(report, "| prompted, read as: |")
    assert conf[0][1:] == [str(d) for d in range(10)] and len(conf) == 11
    m = np.asarray([[int(c) for c in r[1:]] for r in conf[1:]])
    assert m.sum() == 10 and (m.sum(axis=1) == 1).all()
    for d, name in enumerate(DIGITS):
        assert pct[name][0] == pytest.approx(100.0 * m[d, d] / m[d].sum()), name
    assert pct["**all**"][0] == pytest.approx(100.0 * np.trace(m) / m.sum(), abs=0.05)
    assert "Ceilings: the classifier reads 100.0% of the 1797 real digits" in report


def test_digit_settings_change_only_the_data():
    digits = demo_settings(dataset="digits")
    assert digits["data"]["dataset"] == "digits" and digits["data"]["resolution"] == 32
    assert {k: v for k, v in digits.items() if k != "data"} == {k: v for k, v in SETTINGS.items() if k != "data"}
    assert SETTINGS["data"]["dataset"] == "shapes"                # the shapes settings are left alone
    cfgs = stage_configs(".", dataset="digits")
    shapes = stage_configs(".")
    assert {c.data.dataset for c in cfgs.values()} == {"digits"}
    assert cfgs["unet"].train == shapes["unet"].train and cfgs["unet"].unet == shapes["unet"].unet
    assert demo_settings(quick=True, dataset="digits")["data"]["dataset"] == "digits"
    with pytest.raises(ValueError, match="demo: dataset must be one of shapes, digits, got 'mnist'"):
        stage_configs(".", dataset="mnist")


def test_cli_defaults_to_the_shapes_and_refuses_other_datasets(capsys):
    assert build_parser().parse_args(["demo"]).dataset == "shapes"
    assert build_parser().parse_args(["demo", "--dataset", "digits"]).dataset == "digits"
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--dataset", "mnist", "--quick"])
    assert exc.value.code == 2
    assert "invalid choice: 'mnist'" in capsys.readouterr().err


def test_missing_scikit_learn_is_one_line_and_writes_nothing(monkeypatch, tmp_path, capsys):
    _hide_sklearn(monkeypatch)
    out = tmp_path / "out"
    assert main(["demo", "--dataset", "digits", "--quick", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("npdiffusion demo: error: the digits classifier needs scikit-learn")
    assert "pip install scikit-learn" in err[0]
    assert not out.exists()


def test_tool_reads_the_demo_model(quick_digits, capsys, monkeypatch):
    monkeypatch.syspath_prepend(TOOLS)
    import digits_classifier

    out, _ = quick_digits
    assert digits_classifier.main([str(out / "model"), "--seeds", "1", "--steps", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("prompted digit recognized in") and "of 10 samples" in line
    assert all(f"{name} " in line for name in DIGITS)
    assert digits_classifier.main(["--self-check"]) == 0
    assert "read back: 100.0%" in capsys.readouterr().out
    _hide_sklearn(monkeypatch)
    assert digits_classifier.main(["--self-check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("digits_classifier: error: the digits classifier needs scikit-learn")


def test_model_index_is_a_pipeline(quick_digits):
    out, _ = quick_digits
    index = json.loads((out / "model" / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
