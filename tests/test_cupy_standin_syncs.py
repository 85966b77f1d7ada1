"""No host synchronization inside a forward or backward of the U-Net, the VAE and CLIP's text
model on CuPy (issue #18), counted on the CuPy stand-in by call site.

On CuPy the group/layer norm takes the two-pass variance for every row (ops/norm.py, `_moments`),
the attention always subtracts the row maximum (ops/attention.py, `_small_scores`), and token ids
are range-checked on the host before they move (nn/embedding.py); on NumPy these checks stay, so
NumPy's numbers are unchanged. The U-Net has the benchmark's layout (tools/bench_unet.py: three
levels, CrossAttnDownBlock2D x2 + DownBlock2D, two layers per block) at toy widths; the counts
depend on the layout, not the widths. docs/gpu.md, "The CuPy stand-in".
"""
import numpy as np
import pytest

from npdiffusion import cupy_standin
from npdiffusion.backend import asarray, get_backend, set_backend

BENCH_LAYOUT = dict(
    block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=8, attention_head_dim=2, in_channels=4, out_channels=4, sample_size=8)


@pytest.fixture
def standin():
    previous = get_backend()
    with cupy_standin.installed():
        set_backend("cupy")
        try:
            yield
        finally:
            set_backend(previous)


def _unet(rng):
    from npdiffusion.models.unet import UNet2DConditionModel

    model = UNet2DConditionModel(**BENCH_LAYOUT)
    x = asarray(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
    ctx = asarray(rng.standard_normal((2, 5, 8)).astype(np.float32))
    return lambda: model(x, np.array([10, 500]), ctx), lambda y: model.backward(asarray(np.ones(y.shape, np.float32)))


def _vae(rng):
    from npdiffusion.models.vae import AutoencoderKL

    model = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                          down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                          up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], norm_num_groups=2)
    img = asarray(rng.standard_normal((2, 3, 16, 16)).astype(np.float32))
    return (lambda: model(img, sample_posterior=True, generator=np.random.default_rng(1)),
            lambda y: model.backward(asarray(np.ones(y.shape, np.float32))))


def _clip(rng):
    from npdiffusion.models.clip.text_model import CLIPTextModel

    model = CLIPTextModel(bos_token_id=0, eos_token_id=49407, hidden_size=8, intermediate_size=16,
                          num_attention_heads=2, num_hidden_layers=2, pad_token_id=1, vocab_size=49408)
    ids = rng.integers(3, 49406, (2, 7))                           # host ids, as the tokenizer gives
    ids[:, -1] = 49407
    return (lambda: model(ids),
            lambda y: model.backward(asarray(np.ones(y[0].shape, np.float32)),
                                     asarray(np.ones(y[1].shape, np.float32))))


@pytest.mark.parametrize("build", [_unet, _vae, _clip], ids=["unet", "vae", "clip-text"])
def test_forward_and_backward_do_not_wait_for_the_device(standin, build):
    forward, backward = build(np.random.default_rng(0))
    with cupy_standin.count_syncs() as fwd:
        y = forward()
    with cupy_standin.count_syncs() as bwd:
        backward(y)
    assert fwd.total == 0, fwd.report()
    assert bwd.total == 0, bwd.report()


def test_the_counter_sees_a_synchronization(standin):
    """The zero counts above mean something: a float() of a device array is counted."""
    from npdiffusion.backend import xp

    with cupy_standin.count_syncs() as log:
        float(xp.ones(3).sum())
    assert log.total == 1
