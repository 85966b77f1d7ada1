"""tools/study_*.py: each study runs with --quick on a --quick demo model and writes a PNG and a table
with the expected rows and columns; the helpers (diversity, token-to-word mapping, attention
probabilities, object lift) against hand-computed values; bad input gives one line and exit 2.

Shapes: images uint8 (N, 32, 32, 3); maps (B, K, h, w); q (B, Tq, H Dh), k (B, T, H Dh).
"""
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import compare_shape_readers  # noqa: E402
import study_attention_maps  # noqa: E402
import study_common  # noqa: E402
import study_guidance  # noqa: E402
import study_steps  # noqa: E402
import study_unconditional_classifier  # noqa: E402


@pytest.fixture(scope="module")
def model(quick_demo_model):
    return quick_demo_model


def table_rows(md_path):
    """The data rows of every markdown table in the file, as lists of cells (header rows included)."""
    rows = []
    for line in open(md_path, encoding="utf-8"):
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def check_png(path):
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 60


def test_steps_study(model, tmp_path, capsys):
    out = tmp_path / "steps.png"
    res = study_steps.run(["--model", model, "--quick", "--out", str(out), "--schedulers", "DDIM,Heun,Euler"])
    check_png(out)
    rows = table_rows(tmp_path / "steps.md")
    assert rows[0] == study_steps.HEADERS
    assert [(r[0], r[1]) for r in rows[1:]] == [(s, str(n)) for s in ("DDIM", "Heun", "Euler") for n in (2, 3)]
    calls = {(r[0], int(r[1])): int(r[2]) for r in rows[1:]}
    assert calls[("DDIM", 3)] == 3 and calls[("Heun", 3)] == 5          # Heun: 2 S - 1 model calls
    assert all(0.0 <= v["joint"] <= v["colour"] <= 1.0 and v["seconds"] > 0 for v in res.values())
    assert "| DDIM | 2 |" in capsys.readouterr().out                     # the table is printed too


def test_guidance_study_with_classifier(model, tmp_path):
    clf_dir = tmp_path / "clf"
    unc = study_unconditional_classifier.run(["--model", model, "--quick", "--out", str(tmp_path / "unc.png"),
                                              "--save-classifier", str(clf_dir)])
    check_png(tmp_path / "unc.png")
    rows = table_rows(tmp_path / "unc.md")
    assert rows[0] == study_unconditional_classifier.HEADERS
    assert [(r[0], r[1]) for r in rows[1:5]] == [("color", "0"), ("color", "4"), ("shape", "0"), ("shape", "4")]
    assert rows[1][3] == "14.3%" and rows[3][3] == "33.3%"              # chance: 1/7 colours, 1/3 shapes
    assert rows[5] == ["attribute", "t=0", "t=250", "t=500", "t=750", "t=999"]
    assert set(unc["noisy/color"]) == {0, 250, 500, 750, 999}
    assert os.path.isfile(clf_dir / "color" / "model.safetensors")

    out = tmp_path / "guid.png"
    res = study_guidance.run(["--model", model, "--quick", "--out", str(out), "--classifier", str(clf_dir / "color")])
    check_png(out)
    rows = table_rows(tmp_path / "guid.md")
    assert rows[0] == study_guidance.HEADERS
    assert [(r[0], r[1]) for r in rows[1:]] == [("classifier-free", "1"), ("classifier-free", "4"),
                                                ("classifier (color)", "0"), ("classifier (color)", "4")]
    # Classifier scale 0 with classifier-free scale 1 is the conditional model from the pipeline's own
    # latents: the same images as the pipeline at guidance 1, hence the same scores and diversity.
    a, b = res[("classifier-free", 1.0)], res[("classifier (color)", 0.0)]
    for key in ("colour", "shape", "position", "joint", "diversity"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key


def test_attention_study(model, tmp_path):
    out = tmp_path / "att.png"
    res = study_attention_maps.run(["--model", model, "--quick", "--out", str(out)])
    check_png(out)
    maps = res["maps"]                                                   # (B, K, T, h, w)
    assert maps.shape[:2] == (1, 3) and maps.shape[-1] == maps.shape[-2] == 8
    np.testing.assert_allclose(maps.sum(axis=2), 1.0, atol=1e-9)        # a distribution over tokens at each pixel
    rows = table_rows(tmp_path / "att.md")
    assert rows[0] == ["prompt", "word"] + [f"t={int(t)}" for t in res["timesteps"]]
    assert [r[1] for r in rows[1:]] == ["red", "circle", "top", "left"]
    with Image.open(out) as im:                                          # 4 word rows x (3 steps + image) tiles of >= 64 px
        assert im.size[0] >= 4 * 64 and im.size[1] >= 4 * 64


def test_recomputed_attention_reproduces_the_layer_output(model):
    """softmax(q k^T / sqrt(Dh)) v from the recorded q, k, v equals what the layer fed to to_out.0."""
    from npdiffusion.nn.module import ModuleList
    from npdiffusion.nn.recorder import record
    from npdiffusion.pipelines.stable_diffusion import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model)
    attn = dict(pipe.unet.named_modules())["down_blocks.0.attentions.0.transformer_blocks.0.attn2"]
    with record(ModuleList([attn]), params=False) as rec:
        pipe("a red circle in the top left", num_inference_steps=1, guidance_scale=1.0, seed=0, output_type="latent",
             progress=False)
    q, k, v = (rec.forward[f"act/0.to_{n}/output"] for n in "qkv")
    p = study_attention_maps.attention_probs(q, k, attn.heads)           # (B, H, Tq, T)
    b, t, hd = v.shape
    vh = v.reshape(b, t, attn.heads, hd // attn.heads).transpose(0, 2, 1, 3)
    o = (p @ vh).transpose(0, 2, 1, 3).reshape(b, -1, hd)
    np.testing.assert_allclose(o, rec.forward["act/0.to_out.0/input.0"], rtol=1e-4, atol=1e-5)


def test_word_tokens_follow_the_tokenizer(model):
    from npdiffusion.pipelines.loading import load_tokenizer

    tok = load_tokenizer(os.path.join(model, "tokenizer"))
    prompt = "a magenta triangle in the bottom right"
    pairs = study_attention_maps.word_tokens(tok, prompt)
    assert [w for w, _ in pairs] == prompt.split()
    ids = tok(prompt, max_length=tok.model_max_length, padding="max_length", truncation=True)[0]
    for word, positions in pairs:                                        # the ids there are the word's own ids
        assert [int(ids[p]) for p in positions] == list(tok.tokenize_ids(word))
    flat = [p for _, ps in pairs for p in ps]
    assert flat == list(range(1, 1 + len(flat)))                         # contiguous after the start token
    assert study_attention_maps.attribute_words(prompt) == ["magenta", "triangle", "bottom", "right"]


def test_shape_reader_comparison(model, tmp_path):
    out = tmp_path / "readers.png"
    compare_shape_readers.main(["--model", model, "--also", model, "--quick", "--out", str(out)])
    rows = table_rows(tmp_path / "readers.md")
    assert rows[0][:5] == ["model", "shape: fill ratio", "shape: template", "all three: fill ratio", "all three: template"]
    assert len(rows) == 3 and rows[1] == rows[2]                         # the same model samples the same images
    assert all(c.endswith("%") for c in rows[1][1:5])


def test_fill_ratio_shapes_by_hand():
    fills = np.array([0.5, 0.639, 0.64, 0.8, 0.919, 0.92, 1.0, np.nan])
    assert compare_shape_readers.fill_ratio_shapes(fills) == ["triangle", "triangle", "circle", "circle", "circle",
                                                               "square", "square", None]


def test_diversity_by_hand():
    a = np.zeros((32, 32, 3), np.uint8)
    b = np.full((32, 32, 3), 255, np.uint8)
    c = a.copy()
    c[:16] = 255                                                         # differs from a on half the pixels
    # prompt 1: seeds (a, a) -> 0; prompt 2: seeds (a, b) -> 1; mean 0.5
    assert study_common.diversity(np.stack([a, a, a, b]), 2) == pytest.approx(0.5)
    # three seeds a, b, c: pairs (a,b)=1, (a,c)=sqrt(1/2), (b,c)=sqrt(1/2)
    assert study_common.diversity(np.stack([a, b, c]), 3) == pytest.approx((1 + 2 * 0.5 ** 0.5) / 3)
    with pytest.raises(ValueError, match="n_seeds"):
        study_common.diversity(np.stack([a, b, c]), 2)


def test_object_lift_by_hand():
    img = np.zeros((1, 32, 32, 3), np.uint8)
    img[0, :16, :16] = 255                                               # the object fills the top-left quarter
    on = np.zeros((8, 8))
    on[:4, :4] = 1.0                                                     # all attention on the object
    flat = np.ones((8, 8))
    lift = study_attention_maps.object_lift(np.stack([on, flat])[None], img)   # (1, 2)
    np.testing.assert_allclose(lift, [[4.0, 1.0]])                       # mean on object 1 / image mean 1/4


def test_attention_probs_by_hand():
    # one head of width 1: scores q k / 1 = [0, log 3] -> probabilities [1/4, 3/4]
    q = np.ones((1, 1, 1))
    k = np.array([[[0.0], [np.log(3.0)]]])
    np.testing.assert_allclose(study_attention_maps.attention_probs(q, k, 1)[0, 0, 0], [0.25, 0.75])


@pytest.mark.parametrize("script,extra", [
    (study_steps, ["--schedulers", "DDIM,LMS"]),
    (study_guidance, ["--cfg-scales", "0.5"]),
    (study_attention_maps, ["--prompt", "a purple circle in the top left"]),
    (study_unconditional_classifier, ["--attributes", "position"]),
    (study_steps, ["--out", "figure.jpg"]),
    (study_attention_maps, ["--seeds", "3"]),
])
def test_bad_input_is_one_line_and_exit_2(model, tmp_path, capsys, script, extra):
    argv = ["--model", model, "--quick"] + (extra if "--out" in extra else ["--out", str(tmp_path / "x.png")] + extra)
    try:
        code = script.main(argv)
    except SystemExit as exc:                                            # argparse's errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]
    assert not os.path.exists(tmp_path / "x.png")


def test_missing_model_folder_is_one_line(tmp_path, capsys):
    assert study_steps.main(["--model", str(tmp_path / "nope"), "--quick", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model_index.json" in err[0]
