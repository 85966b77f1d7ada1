"""The CLIP and U-Net stages on tiny models: they learn, resume bit-exactly, export folders that
diffusers/transformers load, the U-Net stage draws caption dropout as configured and refuses
missing inputs with one clear line."""
import os

import numpy as np
import pytest

from npdiffusion.io.pretrained import load_weights
from npdiffusion.training import clip_stage, tokenizer_stage, unet_stage, vae_stage
from npdiffusion.training.config import DataConfig, TrainConfig
from npdiffusion.training.loop import read_history_csv
from npdiffusion.training.stages import run_model_stage

DATA = DataConfig(num_images=48, resolution=16, seed=3)


def _train(**kw):
    return TrainConfig(**{"batch_size": 8, "learning_rate": 3e-3, "checkpointing_steps": 3, "seed": 1, **kw})


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    """A tokenizer, a tiny CLIP and a tiny VAE trained for a few steps (the U-Net's frozen inputs)."""
    root = tmp_path_factory.mktemp("frozen")
    tokenizer_stage.train(tokenizer_stage.CONFIG(output_dir=str(root / "tok"), data=DATA,
                                                 tokenizer=tokenizer_stage.TokenizerOptions(model_max_length=12)))
    clip_cfg = clip_stage.CONFIG(output_dir=str(root / "clip"), data=DATA, train=_train(steps=4),
                                 clip=clip_stage.CLIPOptions(tokenizer=str(root / "tok" / "tokenizer"),
                                                             text_hidden_size=16, text_layers=1, text_heads=2,
                                                             text_intermediate_size=32, vision_hidden_size=16,
                                                             vision_layers=1, vision_heads=2,
                                                             vision_intermediate_size=32, patch_size=8,
                                                             projection_dim=16))
    clip_summary = clip_stage.train(clip_cfg, progress=False, log=lambda *a: None)
    vae_cfg = vae_stage.CONFIG(output_dir=str(root / "vae"), data=DATA, train=_train(steps=3),
                               vae=vae_stage.VAEOptions(block_out_channels=(8, 8), norm_num_groups=4))
    run_model_stage(vae_cfg, vae_stage.build_stage, progress=False, log=lambda *a: None)
    return root, clip_summary


def unet_config(root, out, steps, **opts):
    return unet_stage.CONFIG(
        output_dir=str(out), data=DATA, train=_train(steps=steps, use_ema=True, ema_decay=0.9),
        unet=unet_stage.UNetOptions(vae=str(root / "vae" / "vae"), text_encoder=str(root / "clip" / "text_encoder"),
                                    tokenizer=str(root / "clip" / "tokenizer"), block_out_channels=(8, 16),
                                    norm_num_groups=4, attention_head_dim=4, **opts))


def test_clip_stage_learns_and_exports_a_text_encoder_transformers_loads(frozen):
    transformers = pytest.importorskip("transformers")
    import torch

    from npdiffusion.models.clip.text_model import CLIPTextModel
    from npdiffusion.models.clip.tokenizer import CLIPTokenizer

    root, summary = frozen
    assert summary.startswith("clip: 4 steps")
    for sub in ("clip", "text_encoder", "tokenizer"):
        assert os.path.isdir(root / "clip" / sub), sub
    tok = CLIPTokenizer.from_pretrained(str(root / "clip" / "tokenizer"))
    ids = tok(["a red circle in the top left", "a blue square in the center"])
    ours = CLIPTextModel.from_pretrained(str(root / "clip" / "text_encoder"))(ids)[0]
    theirs = transformers.CLIPTextModel.from_pretrained(str(root / "clip" / "text_encoder")).eval()
    with torch.no_grad():
        ref = theirs(torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=1e-5)


def test_clip_stage_writes_an_image_processor_config_matching_its_training_images(frozen):
    transformers = pytest.importorskip("transformers")

    root, _ = frozen
    processor = transformers.CLIPImageProcessor.from_pretrained(str(root / "clip" / "clip"))
    side = processor.crop_size["height"]
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    got = processor(images=pixels, return_tensors="np")["pixel_values"][0]            # (3, S, S)
    want = pixels.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0                   # the loader's [-1, 1]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_unet_stage_learns_resumes_bit_exactly_and_writes_a_pipeline(frozen, tmp_path):
    root, _ = frozen
    summary = unet_stage.train(unet_config(root, tmp_path / "ref", 6, snr_gamma=5.0), progress=False,
                               log=lambda *a: None)
    assert summary.startswith("unet: 6 steps") and "pipeline folder" in summary
    rows = read_history_csv(str(tmp_path / "ref" / "losses.csv"))
    assert len(rows) == 6 and all(np.isfinite(r["loss"]) for r in rows) and not any(r["skipped"] for r in rows)
    run_model_stage(unet_config(root, tmp_path / "run", 3, snr_gamma=5.0), unet_stage.build_stage,
                    progress=False, log=lambda *a: None)
    run_model_stage(unet_config(root, tmp_path / "run", 6, snr_gamma=5.0), unet_stage.build_stage,
                    resume=True, progress=False, log=lambda *a: None)
    a, b = load_weights(tmp_path / "ref" / "unet"), load_weights(tmp_path / "run" / "unet")
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        assert os.path.exists(tmp_path / "ref" / "model" / sub), sub


def test_unet_stage_trains_on_the_cached_latents_and_dropped_captions(frozen, tmp_path):
    """train_step's inputs, recomputed independently: z0 = f (mean + std e0), context rows 0 where dropped."""
    from npdiffusion.data.dataset import to_model_input
    from npdiffusion.training.stages import dataset_from_config

    root, _ = frozen
    cfg = unet_config(root, tmp_path, 1, caption_dropout=0.5, prediction_type="v_prediction")
    ds = dataset_from_config(cfg.data)
    stage = unet_stage.build_stage(cfg, ds)
    post = stage.vae.encode(np.asarray(to_model_input(ds.get_images(np.arange(5))), dtype=np.float32))
    # float32 (the encoder ran on batches of 48 there, of 5 here: BLAS rounds differently)
    np.testing.assert_allclose(stage.latent_mean[:5], np.asarray(post.mean), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stage.latent_std[:5], np.asarray(post.std), rtol=1e-4, atol=1e-5)
    empty = stage.context[0]
    np.testing.assert_allclose(empty, stage.encode_text([""])[0], rtol=1e-4, atol=1e-5)
    seen = []
    real_unet = stage.unet.forward

    def spy(x, t, ctx):
        seen.append(np.asarray(ctx).copy())
        return real_unet(x, t, ctx)

    stage.unet.forward = spy
    batch = stage.collate(None, list(ds.captions[:32]), np.arange(32), 0, 0)
    stage.train_step(batch, np.random.default_rng(0))
    dropped = np.random.default_rng(0)
    dropped.standard_normal(stage.latent_mean[:32].shape)
    drop = dropped.random(32) < 0.5
    assert 4 < drop.sum() < 28
    np.testing.assert_array_equal(seen[0][drop], np.broadcast_to(empty, (int(drop.sum()),) + empty.shape))
    np.testing.assert_array_equal(seen[0][~drop], stage.context[batch.caption_rows[~drop]])


@pytest.mark.parametrize("key", ["vae", "text_encoder", "tokenizer"])
def test_unet_stage_refuses_a_missing_frozen_model(frozen, tmp_path, key):
    root, _ = frozen
    cfg = unet_config(root, tmp_path / "out", 2)
    setattr(cfg.unet, key, str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=f"unet.{key} .*nowhere.* run `npdiffusion train"):
        run_model_stage(cfg, unet_stage.build_stage, progress=False, log=lambda *a: None)


@pytest.mark.parametrize("opts", [{"prediction_type": "sample", "snr_gamma": 5.0},
                                  {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}])
def test_unet_stage_x0_prediction_and_zero_terminal_snr(frozen, tmp_path, opts):
    import json

    root, _ = frozen
    summary = unet_stage.train(unet_config(root, tmp_path / "run", 3, **opts), progress=False, log=lambda *a: None)
    assert summary.startswith("unet: 3 steps")
    rows = read_history_csv(str(tmp_path / "run" / "losses.csv"))
    assert all(np.isfinite(r["loss"]) for r in rows)
    sched = json.loads((tmp_path / "run" / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == opts["prediction_type"]
    assert sched["rescale_betas_zero_snr"] is opts.get("rescale_betas_zero_snr", False)
    abar = unet_stage.training_alphas_cumprod(unet_config(root, tmp_path / "x", 1, **opts).unet)
    assert bool(abar[-1] == 0.0) == bool(opts.get("rescale_betas_zero_snr"))   # zero terminal SNR, or not
