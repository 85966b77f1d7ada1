"""The KL autoencoder of latent diffusion (diffusers' ``AutoencoderKL``) with hand-written backwards.

* ``autoencoder_kl.AutoencoderKL``: encode / decode / their backwards, model folders.
* ``distribution.DiagonalGaussianDistribution``: the posterior q(z | x) and its gradients.
* ``encoder.Encoder``, ``decoder.Decoder``, ``vae_blocks``: the networks and their blocks.
* ``loss``: the training objective (reconstruction + beta * KL through the reparameterization);
  OPTIONAL at its end, latent diffusion's adversarial term (``KLAutoencoderGANLoss``) with the
  PatchGAN of ``discriminator``.

Docs: docs/vae.md.
"""
from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL
from npdiffusion.models.vae.decoder import Decoder
from npdiffusion.models.vae.distribution import DiagonalGaussianDistribution
from npdiffusion.models.vae.encoder import Encoder

__all__ = ["AutoencoderKL", "DiagonalGaussianDistribution", "Encoder", "Decoder"]
