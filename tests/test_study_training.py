"""tools/study_training.py: a --quick run on a --quick demo model writes the PNG and the table with one
row per variant; each variant trains with its own objective and schedule (SNR(T) against the schedule
formulas computed here) at equal compute (identical [train] and data settings); a finished run in
--work is found again and gives the same numbers; bad input (an unknown variant, one the U-Net stage
does not support, a --work run with other settings) gives one line and exit 2.

Shapes: images (H, W, 3) uint8 for the chart checks; betas (T,).
"""
import dataclasses
import json
import math
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import study_training  # noqa: E402


@pytest.fixture(scope="module")
def model(quick_demo_model):
    return quick_demo_model


def table_rows(md_path):
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in open(md_path, encoding="utf-8") if line.startswith("|") and not line.startswith("|---")]


def snr_T(betas):
    abar = np.prod(1.0 - np.asarray(betas, dtype=np.float64))
    return abar / (1.0 - abar)


def test_quick_run_table_figure_equal_compute_and_rerun(model, tmp_path, capsys):
    work = tmp_path / "work"
    out = tmp_path / "st.png"
    res = study_training.run(["--model", model, "--quick", "--out", str(out), "--work", str(work)])
    with Image.open(out) as im:
        assert im.size[0] >= 640 and im.size[1] >= 700
    rows = table_rows(tmp_path / "st.md")
    assert rows[0] == study_training.HEADERS
    assert [r[0] for r in rows[1:]] == ["epsilon", "v-minsnr", "cosine"]
    col = {h: i for i, h in enumerate(rows[0])}
    assert [(r[col["prediction"]], r[col["min-SNR γ"]], r[col["schedule"]]) for r in rows[1:]] == [
        ("epsilon", "off", "scaled_linear"), ("v_prediction", "5", "scaled_linear"),
        ("epsilon", "5", "squaredcos_cap_v2")]
    # SNR(T) from the schedules' formulas with T = 50 (the quick diffusion), not from the library
    T = 50
    scaled = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), T) ** 2

    def abar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    cosine = [min(1.0 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)]
    for r, betas in zip(rows[1:], (scaled, scaled, cosine)):
        assert float(r[col["SNR(T)"]]) == pytest.approx(snr_T(betas), rel=1e-2)
    for r in res.values():
        assert 0.0 <= r["joint"] <= min(r["colour"], r["shape"], r["position"]) <= 1.0
        assert math.isfinite(r["bpd"]) and r["x0_mse"] >= 0.0 and r["seconds_per_step"] > 0.0
    # same schedule and the same held-out latents: the prior term (no model in it) is the same
    assert res["epsilon"]["prior_bpd"] == res["v-minsnr"]["prior_bpd"] > res["cosine"]["prior_bpd"] >= 0.0
    assert "| cosine | epsilon |" in capsys.readouterr().out

    # equal compute: the runs' saved configs differ only in the variant's own [unet] keys
    configs = {}
    for name in res:
        state = os.path.join(work, name, "checkpoint-3", "trainer_state.json")
        with open(state, encoding="utf-8") as f:
            configs[name] = json.load(f)["config"]
    base = configs["epsilon"]
    for name, cfg in configs.items():
        assert cfg["train"] == base["train"] and cfg["data"] == base["data"]
        assert cfg["train"]["steps"] == 3
        differ = {k for k in cfg["unet"] if cfg["unet"][k] != base["unet"][k]}
        assert differ <= set(study_training.VARIANTS[name][0]), (name, differ)

    # the finished run is found again in --work (no retraining): the same bound, bit for bit
    again = study_training.run(["--model", model, "--quick", "--out", str(tmp_path / "again.png"),
                                "--work", str(work), "--variants", "epsilon"])
    assert again["epsilon"]["bpd"] == res["epsilon"]["bpd"]
    assert again["epsilon"]["joint"] == res["epsilon"]["joint"]

    # other settings in the same --work: refused on one line
    code = study_training.main(["--model", model, "--quick", "--out", str(tmp_path / "x.png"), "--work", str(work),
                                "--variants", "epsilon", "--steps", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "other settings" in err


def test_a_diverged_variant_gets_its_row_and_the_others_go_on(model, tmp_path, monkeypatch):
    from npdiffusion.training.loop import TrainingError

    real = study_training.train_variant

    def train(config, dataset, log=print):
        if config.unet.prediction_type == "v_prediction":
            raise TrainingError("unet: stopped at step 2: 10 consecutive steps had a non-finite loss")
        return real(config, dataset, log)

    monkeypatch.setattr(study_training, "train_variant", train)
    res = study_training.run(["--model", model, "--quick", "--out", str(tmp_path / "d.png"),
                              "--variants", "v,epsilon"])
    rows = table_rows(tmp_path / "d.md")
    assert [r[0] for r in rows[1:]] == ["v", "epsilon"]
    assert rows[1][5:] == ["diverged"] * 9 and "diverged" not in rows[2]
    assert res["v"]["diverged"] and not res["epsilon"]["diverged"] and math.isfinite(res["epsilon"]["bpd"])
    assert os.path.isfile(tmp_path / "d.png")


def test_heldout_images_are_fresh_draws_that_differ_from_every_training_image(model):
    from npdiffusion.data.shapes import ShapesDataset
    from npdiffusion.pipelines.stable_diffusion import StableDiffusionPipeline
    from npdiffusion.training.config import DataConfig

    pipe = StableDiffusionPipeline.from_pretrained(model)
    data = DataConfig(dataset="shapes", num_images=3000, resolution=32, seed=0)
    z0, captions, skipped = study_training.heldout_latents(pipe, data, 12)
    assert z0.shape == (12, pipe.vae.config["latent_channels"], 8, 8) and np.isfinite(z0).all()
    # the same choice made here: seed 1's draws in order, keeping those unlike any of seed 0's 3000
    train = {im.tobytes() for im in ShapesDataset(3000, seed=0).images}
    fresh = ShapesDataset(12 + skipped, seed=1)
    novel = [i for i, im in enumerate(fresh.images) if im.tobytes() not in train]
    assert skipped > 0 and len(novel) == 12 and novel[-1] == 12 + skipped - 1
    assert captions == [fresh.captions[i] for i in novel]


@pytest.mark.parametrize("variants,needle", [("epsilon,nope", "'nope' is not one of"),
                                             ("epsilon,epsilon", "appears twice"), (",", "expected comma-separated")])
def test_bad_variant_is_one_line_and_exit_2(model, tmp_path, capsys, variants, needle):
    code = study_training.main(["--model", model, "--quick", "--out", str(tmp_path / "x.png"), "--variants", variants])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and needle in err
    assert not os.path.exists(tmp_path / "x.png")


def test_unsupported_variant_is_refused_on_one_line(model, tmp_path, capsys, monkeypatch):
    from npdiffusion.training.unet_stage import UNetOptions

    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(UNetOptions)}
    # supported() reads the stage's schema: x0 is offered exactly when the stage accepts "sample"
    assert (study_training.supported("x0") is None) == ("sample" in choices["prediction_type"])
    assert (study_training.supported("zero-snr") is None) == ("rescale_betas_zero_snr" in choices)
    assert set(study_training.default_variants()) >= {"epsilon", "epsilon-minsnr", "v", "v-minsnr", "linear", "cosine"}
    monkeypatch.setitem(study_training.VARIANTS, "bogus", ({"no_such_key": 1}, "a variant the stage cannot train"))
    assert "bogus" not in study_training.default_variants()
    code = study_training.main(["--model", model, "--quick", "--out", str(tmp_path / "x.png"), "--variants", "bogus"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "unet.no_such_key" in err and "unet_stage.py" in err


@pytest.mark.parametrize("extra,needle", [(["--steps", "0"], "--steps"), (["--heldout", "x"], "--heldout"),
                                          (["--out", "a.jpg"], ".png")])
def test_bad_numbers_and_out_are_one_line(model, tmp_path, capsys, extra, needle):
    argv = ["--model", model, "--quick"] + (extra if "--out" in extra else ["--out", str(tmp_path / "x.png")] + extra)
    try:
        code = study_training.main(argv)
    except SystemExit as exc:                      # argparse's own one-line error (study_common._OneLineParser)
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err


def test_missing_model_folder_is_one_line(tmp_path, capsys):
    assert study_training.main(["--model", str(tmp_path / "nope"), "--quick", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model_index.json" in err


def test_bar_chart_draws_positive_bars_up_and_negative_bars_down():
    # 400 px wide, 60 px left margin, 10 right: two groups of 165 px, centred at x = 142 and 307
    im = np.asarray(study_training.bar_chart(["a", "b"], {"v": [2.0, -1.0]}, "t", "y", (400, 300)))
    blue = np.all(im == np.array([0x1F, 0x77, 0xB4]), axis=-1)
    rows_a, rows_b = np.where(blue[:, 142])[0], np.where(blue[:, 307])[0]
    assert rows_a.size > 10 and rows_b.size > 10
    # bar a (2.0) ends where bar b (-1.0) starts (the zero line), above it, and is twice as tall
    assert abs(rows_a.max() - rows_b.min()) <= 2
    assert (rows_a.max() - rows_a.min()) == pytest.approx(2 * (rows_b.max() - rows_b.min()), abs=3)
