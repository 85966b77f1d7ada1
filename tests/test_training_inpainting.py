"""``[unet] inpainting = true``: the SD inpainting recipe's random masks, the U-Net's 2L + 1 input channels
recomputed independently, a bit-exact resume, and a pipeline folder that diffusers' inpainting pipeline loads."""
import os

import numpy as np

from npdiffusion.distributed.sharding import BatchDraws, Shard
from npdiffusion.io.pretrained import load_weights
from npdiffusion.training import unet_stage
from npdiffusion.training.inpaint_masks import FULL_MASK_SHARE, random_masks
from npdiffusion.training.stages import run_model_stage
from test_training_stages import frozen, unet_config  # noqa: F401 - the shared tiny frozen models

QUIET = dict(progress=False, log=lambda *a: None)


def test_random_masks_follow_the_recipe():
    """A quarter (binomial bounds, 6 sigma) mask everything; of the rest about half are filled boxes
    (rectangles), and every mask the image border does not clip is symmetric about its centre."""
    n, side = 4000, 16
    masks = random_masks(BatchDraws(np.random.default_rng(0), Shard.whole(n)), side)[:, 0]     # (N, S, S)
    assert masks.shape == (n, side, side) and set(np.unique(masks)) <= {0.0, 1.0}
    full = masks.all(axis=(1, 2))
    sigma = np.sqrt(FULL_MASK_SHARE * (1 - FULL_MASK_SHARE) / n)
    assert abs(full.mean() - FULL_MASK_SHARE) < 6 * sigma + 0.01      # (+ the share of drawn full-size boxes)
    rest = masks[~full & masks.any(axis=(1, 2))]
    rows, cols = rest.any(axis=2), rest.any(axis=1)                   # (M, S)
    box = rows[:, :, None] & cols[:, None, :]
    is_box = (rest.astype(bool) == box).all(axis=(1, 2))
    assert 0.35 < is_box.mean() < 0.75                                # rectangles; ellipses are not boxes
    inner = rest[~(rest[:, 0].any(1) | rest[:, -1].any(1) | rest[:, :, 0].any(1) | rest[:, :, -1].any(1))]
    assert len(inner) > 300
    for m in inner[:200]:                                             # symmetric about the centre (unclipped)
        ys, xs = np.nonzero(m)
        sub = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        assert np.array_equal(sub, sub[::-1, ::-1])


def test_inpainting_stage_feeds_latents_mask_and_masked_image_latents(frozen, tmp_path):  # noqa: F811
    """train_step's U-Net input, recomputed from the same draws: [z_t | nearest(m) | f encode(x (m < 0.5))]."""
    from npdiffusion.data.dataset import to_model_input
    from npdiffusion.pipelines.image_utils import resize_nearest
    from npdiffusion.training.stages import dataset_from_config

    root, _ = frozen
    cfg = unet_config(root, tmp_path, 1, inpainting=True)
    ds = dataset_from_config(cfg.data)
    stage = unet_stage.build_stage(cfg, ds)
    latent = stage.vae.config["latent_channels"]
    assert stage.unet.config["in_channels"] == 2 * latent + 1
    seen = []
    real_unet = stage.unet.forward

    def spy(x, t, ctx):
        seen.append(np.asarray(x).copy())
        return real_unet(x, t, ctx)

    stage.unet.forward = spy
    idx = np.arange(8)
    batch = stage.collate(ds.get_images(idx), list(ds.captions[:8]), idx, 0, 0)
    stage.train_step(batch, np.random.default_rng(5))
    x = seen[0]
    assert x.shape[1] == 2 * latent + 1
    replay = np.random.default_rng(5)                                 # the step's draws, in order
    draws = BatchDraws(replay, Shard.whole(8))
    draws.standard_normal(stage.latent_mean.shape[1:])                # e0
    draws.random()                                                    # caption dropout
    draws.integers(0, 1000)                                           # t
    draws.standard_normal(stage.latent_mean.shape[1:])                # noise
    mask = random_masks(draws, 16)                                    # (8, 1, 16, 16)
    pixels = to_model_input(ds.get_images(idx))
    posterior = stage.vae.encode(pixels * (mask < 0.5))
    eps = draws.standard_normal(tuple(posterior.shape[1:])).astype(np.float32)
    want = np.asarray(posterior.mean) + np.asarray(posterior.std) * eps
    h = x.shape[-1]
    np.testing.assert_array_equal(x[:, latent:latent + 1], resize_nearest(mask, h, h))
    np.testing.assert_allclose(x[:, latent + 1:], stage.scaling_factor * want, rtol=1e-4, atol=1e-5)
    assert 0 < mask.mean() < 1


def test_inpainting_stage_resumes_bit_exactly_and_writes_an_inpainting_pipeline(frozen, tmp_path):  # noqa: F811
    root, _ = frozen
    summary = unet_stage.train(unet_config(root, tmp_path / "ref", 4, inpainting=True), **QUIET)
    assert summary.startswith("unet: 4 steps")
    run_model_stage(unet_config(root, tmp_path / "run", 2, inpainting=True), unet_stage.build_stage, **QUIET)
    run_model_stage(unet_config(root, tmp_path / "run", 4, inpainting=True), unet_stage.build_stage, resume=True,
                    **QUIET)
    a, b = load_weights(tmp_path / "ref" / "unet"), load_weights(tmp_path / "run" / "unet")
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
    folder = tmp_path / "ref" / "model"
    from npdiffusion.pipelines.inpaint import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(folder)
    assert pipe.inpainting_unet
    from diffusers import StableDiffusionInpaintPipeline as Theirs

    theirs = Theirs.from_pretrained(os.fspath(folder))
    assert theirs.unet.config.in_channels == pipe.unet.config["in_channels"]
