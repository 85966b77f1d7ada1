"""Model families built from npdiffusion.nn modules: the U-Net, the VAE and CLIP.

    unet/    UNet2DConditionModel (diffusers' keys and configs)
    vae/     AutoencoderKL and its DiagonalGaussianDistribution
    clip/    CLIPTokenizer, CLIPTextModel, CLIPVisionModel, CLIPModel
    blocks/  ResnetBlock2D, Downsample2D, Upsample2D shared by the U-Net and the VAE
"""
from npdiffusion.models.clip import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer,
                                     CLIPVisionConfig, CLIPVisionModel)
from npdiffusion.models.unet.unet_2d_condition import UNet2DConditionModel
from npdiffusion.models.vae import AutoencoderKL, DiagonalGaussianDistribution

__all__ = ["UNet2DConditionModel", "AutoencoderKL", "DiagonalGaussianDistribution", "CLIPTokenizer",
           "CLIPTextConfig", "CLIPVisionConfig", "CLIPConfig", "CLIPTextModel", "CLIPVisionModel", "CLIPModel"]
