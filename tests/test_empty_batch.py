"""An empty batch (B = 0), issue #17 point 5: the conv2d op returns empty outputs and zero weight/bias
gradients, as torch does; the U-Net and the VAE refuse it at their entry with a ValueError naming the input.
"""
import numpy as np
import pytest
import torch

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.models.unet import UNet2DConditionModel
from npdiffusion.models.vae import AutoencoderKL
from npdiffusion.ops.conv import conv2d_backward, conv2d_forward

ENC, DEC = "DownEncoderBlock2D", "UpDecoderBlock2D"


@pytest.mark.parametrize("kernel,stride,padding", [((3, 3), 1, 1), ((3, 3), 2, 1), ((1, 1), 1, 0), ((1, 1), 2, 1)])
def test_conv2d_op_with_an_empty_batch_matches_torch(backend, kernel, stride, padding):
    rng = np.random.default_rng(0)
    x = np.zeros((0, 3, 9, 7))
    w = rng.standard_normal((4, 3, *kernel))
    b = rng.standard_normal(4)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = torch.nn.functional.conv2d(xt, wt, bt, stride=stride, padding=padding)
    yt.backward(torch.zeros_like(yt))

    y, cache = conv2d_forward(asarray(x), asarray(w), asarray(b), stride=stride, padding=padding)
    assert tuple(y.shape) == tuple(yt.shape) and y.dtype == np.float64
    dx, dw, db = conv2d_backward(asarray(np.zeros(tuple(yt.shape))), cache)
    assert tuple(dx.shape) == tuple(xt.grad.shape)
    assert np.array_equal(to_numpy(dw), wt.grad.numpy()) and np.array_equal(to_numpy(db), bt.grad.numpy())


def test_unet_refuses_an_empty_batch():
    unet = UNet2DConditionModel(block_out_channels=(4, 8), norm_num_groups=4, layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=2, sample_size=8)
    with pytest.raises(ValueError, match=r"UNet2DConditionModel: sample has batch size 0; expected at least 1"):
        unet(np.zeros((0, 4, 8, 8), np.float32), 10, np.zeros((0, 4, 8), np.float32))


def test_vae_refuses_an_empty_batch():
    vae = AutoencoderKL(down_block_types=[ENC] * 2, up_block_types=[DEC] * 2, block_out_channels=[2, 4],
                        norm_num_groups=2, latent_channels=4)
    image = np.zeros((0, 3, 16, 16), np.float32)
    with pytest.raises(ValueError, match=r"AutoencoderKL\.encode: x has batch size 0; expected at least 1"):
        vae.encode(image)
    with pytest.raises(ValueError, match=r"AutoencoderKL\.decode: z has batch size 0; expected at least 1"):
        vae.decode(np.zeros((0, 4, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"batch size 0; expected at least 1"):
        vae(image)
