"""``npdiffusion demo --seed S --processes N``: the seed reaches every model stage (same seed, same
training; another seed, other draws), the VAE and U-Net stages train as N MPI ranks and the report
and summary say so, a missing ``mpiexec`` falls back to one process with one line, and a 2-rank quick
demo trains what one process trains (float32 loss curves within 1e-4 relative, the criterion of
tests/test_distributed.py).
"""
import os

import numpy as np
import pytest

from npdiffusion.cli import main
from npdiffusion.training.demo import processes as demo_processes
from npdiffusion.training.demo import run_demo, stage_configs
from npdiffusion.training.loop import read_history_csv

SEED = 5


def _quiet(*_):
    pass


def _losses(out, stage):
    rows = read_history_csv(os.path.join(out, "runs", stage, "losses.csv"))
    return np.asarray([r["loss"] for r in rows], dtype=np.float64)


def _stage_rows(report: str) -> dict:
    """{stage: processes} from report.md's time table."""
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in ("tokenizer", "clip", "vae", "unet"):
            rows[cells[0]] = int(cells[3])
    return rows


@pytest.fixture(scope="module")
def fallback_run(tmp_path_factory):
    """A quick demo asked for 2 processes on a machine without mpiexec: one process, one line saying so."""
    out = str(tmp_path_factory.mktemp("fallback"))
    lines = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo_processes, "find_mpiexec", lambda: None)
        summary = run_demo(out, quick=True, progress=False, log=lines.append, seed=SEED, processes=2)
    return out, summary, lines


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    # The test extra installs MPICH and mpi4py (setup.cfg): without them the test command's install is
    # broken, which must fail here, not be skipped.
    import mpi4py  # noqa: F401
    assert demo_processes.find_mpiexec() is not None, "no mpiexec: the test extra's MPICH wheel is not installed"
    out = str(tmp_path_factory.mktemp("two"))
    lines = []
    summary = run_demo(out, quick=True, progress=False, log=lines.append, seed=SEED, processes=2)
    return out, summary, lines


def test_missing_mpiexec_falls_back_in_one_line(fallback_run):
    out, summary, lines = fallback_run
    said = [line for line in lines if "one process" in line]
    assert len(said) == 1 and "mpiexec" in said[0] and ".[mpi]" in said[0], lines
    assert "with 1 process " in summary
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert _stage_rows(report) == {"tokenizer": 1, "clip": 1, "vae": 1, "unet": 1}
    assert "every stage trained in one process" in report
    assert f"training seed {SEED}" in report


def test_two_processes_train_clip_vae_and_unet_as_ranks_and_say_so(two_process_run):
    out, summary, lines = two_process_run
    assert "with 2 processes " in summary
    assert not [line for line in lines if "one process" in line]
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert _stage_rows(report) == {"tokenizer": 1, "clip": 2, "vae": 2, "unet": 2}
    assert "clip as 2 MPI ranks, vae as 2 MPI ranks, unet as 2 MPI ranks" in report
    assert os.path.isfile(os.path.join(out, "model", "model_index.json"))


def test_two_processes_train_what_one_process_trains(fallback_run, two_process_run):
    """Same seed, same global batches: the 2-rank CLIP, VAE and U-Net loss curves are the one-process ones
    up to summation order (float32: 1e-4 relative, docs/distributed.md)."""
    one, two = fallback_run[0], two_process_run[0]
    for stage in ("clip", "vae", "unet"):
        a, b = _losses(one, stage), _losses(two, stage)
        assert a.shape == b.shape and a.size > 0, stage
        np.testing.assert_allclose(b, a, rtol=1e-4, err_msg=stage)


def test_same_seed_trains_the_same_and_another_seed_draws_otherwise(tmp_path):
    from npdiffusion.training import vae_stage

    curves = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        config = stage_configs(str(tmp_path / name), quick=True, seed=seed)["vae"]
        assert config.train.seed == seed
        vae_stage.train(config, progress=False, log=_quiet)
        curves[name] = _losses(tmp_path / name, "vae")
    np.testing.assert_array_equal(curves["a"], curves["b"])
    assert not np.array_equal(curves["a"], curves["c"])


def test_seed_reaches_every_model_stage_and_defaults_to_today():
    for name, cfg in stage_configs("x", seed=7).items():
        if name != "tokenizer":
            assert cfg.train.seed == 7, name
    assert {cfg.train.seed for name, cfg in stage_configs("x").items() if name != "tokenizer"} == {0}
    assert stage_configs("x", seed=7)["unet"].data.seed == stage_configs("x")["unet"].data.seed  # same data


def test_stage_processes_divide_the_batch_and_keep_single_process_stages():
    configs = stage_configs("x")
    assert demo_processes.stage_processes("tokenizer", configs["tokenizer"], 4) == 1
    batch = configs["vae"].train.batch_size
    for n in range(1, 2 * batch + 1):
        k = demo_processes.stage_processes("vae", configs["vae"], n)
        assert 1 <= k <= n and batch % k == 0
        assert not [m for m in range(k + 1, n + 1) if batch % m == 0]      # the largest such divisor


def test_default_processes_are_the_cores_this_process_may_use():
    assert demo_processes.available_cores() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("argv, word", [(["--processes", "0"], "processes"), (["--seed", "-1"], "seed")])
def test_cli_refuses_bad_processes_and_seeds_in_one_line(tmp_path, capsys, argv, word):
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path / "d"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0]
    assert not os.path.exists(tmp_path / "d" / "runs")


def test_mpiexec_is_found_next_to_python_before_path(tmp_path, monkeypatch):
    fake_python = tmp_path / "bin" / "python"
    fake_python.parent.mkdir()
    fake_python.write_text("")
    beside = tmp_path / "bin" / "mpiexec"
    beside.write_text("#!/bin/sh\n")
    beside.chmod(0o755)
    monkeypatch.setattr(demo_processes.sys, "executable", str(fake_python))
    assert demo_processes.find_mpiexec() == str(beside)
    beside.unlink()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert demo_processes.find_mpiexec() is None
    assert "mpiexec" in demo_processes.mpi_missing() or "mpi4py" in demo_processes.mpi_missing()


def test_report_json_records_seed_processes_times_and_scores(two_process_run):
    import json

    out, _, _ = two_process_run
    record = json.load(open(os.path.join(out, "report.json"), encoding="utf-8"))
    assert record["seed"] == SEED and record["processes"] == {"tokenizer": 1, "clip": 2, "vae": 2, "unet": 2}
    assert set(record["seconds"]) == set(record["cpu_seconds"]) == {"tokenizer", "clip", "vae", "unet",
                                                                     "evaluation", "pictures"}
    assert all(v >= 0 for v in record["cpu_seconds"].values())
    assert record["sampling"]["steps"] == 4 and record["scores"]["guided"]["n"] == 8   # quick: 4 prompts x 2


def test_spread_is_quoted_only_for_the_settings_it_measured():
    from npdiffusion.training.demo.report import spread_sentence
    from npdiffusion.training.demo.settings import settings_fingerprint

    spread = {"settings": settings_fingerprint(), "seeds": [0, 1, 2], "date": "2026-12-07", "processes": 2,
              "minutes": [20.0, 21.0], "cpu_minutes": [4.5, 4.9], "all_three": {"DDPM 25, guidance 2 (report)": [0.97, 0.995]}}
    text = spread_sentence(spread)
    assert "seeds 0, 1, 2" in text and "97.0-99.5%" in text and "4.5-4.9 CPU minutes" in text
    stale = spread_sentence({**spread, "settings": "0" * 12})
    assert "not measured for these settings" in stale and "97.0" not in stale
    assert "not measured" in spread_sentence({})
