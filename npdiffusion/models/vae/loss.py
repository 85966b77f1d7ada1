"""The KL autoencoder's training objective with hand-written gradients.

Shapes: B batch, C image channels, H x W image size, L latent channels, h x w latent size.
x, x_hat (B, C, H, W); mean, logvar, noise, z (B, L, h, w).

    z      = mean + exp(logvar / 2) * noise                   reparameterization, noise ~ N(0, I) given
    x_hat  = decode(z)
    rec    = R(x_hat - x),  R = sum |.| (l1) or sum (.)^2 (l2), reduced (see REDUCTIONS)
    KL     = 1/2 sum_{c,i,j} (mean^2 + var - 1 - logvar) per item, reduced the same way
    loss   = rec + beta * KL

``reduction``: "batchmean" (default; sums per image, mean over the batch: latent diffusion's
scaling, where beta ~ 1e-6 and rec is the per-image negative log-likelihood up to constants),
"mean" (rec divided by the number of image elements, KL by the number of latent elements) or
"sum" (no division).

Ops: ``reconstruction_loss_forward/backward`` and ``kl_loss_forward/backward`` (pairs in the
``npdiffusion.ops`` style). Module: ``KLAutoencoderLoss(vae, beta, reconstruction, reduction)``,
whose ``forward(x, noise)`` runs encode -> sample -> decode -> loss and whose ``backward()``
returns d loss / d x and accumulates every VAE parameter gradient.

Derivations: docs/vae.md ("The training objective and its gradient").
"""
from __future__ import annotations

import numbers

from npdiffusion.backend import asarray, xp
from npdiffusion.models.vae.distribution import DiagonalGaussianDistribution
from npdiffusion.nn.module import Module

RECONSTRUCTIONS = ("l1", "l2")
REDUCTIONS = ("batchmean", "mean", "sum")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _scale(reduction: str, batch: int, size: int) -> float:
    """The factor a sum is multiplied by for ``reduction`` (batchmean 1/B, mean 1/size, sum 1)."""
    if reduction == "batchmean":
        return 1.0 / batch
    if reduction == "mean":
        return 1.0 / size
    return 1.0


# ----------------------------------------------------------------------------- reconstruction
def reconstruction_loss_forward(recon, target, kind: str = "l1", reduction: str = "batchmean"):
    """R(recon - target) reduced: l1 sums |d|, l2 sums d^2 (d = recon - target), then x 1/B
    ("batchmean"), 1/size ("mean") or 1 ("sum"). Returns ``(loss (0-d), cache)``;
    cache = (d, kind, factor)."""
    _check_choice("reconstruction_loss: kind", kind, RECONSTRUCTIONS)
    _check_choice("reconstruction_loss: reduction", reduction, REDUCTIONS)
    for name, a in (("recon", recon), ("target", target)):
        if not hasattr(a, "dtype") or a.dtype.kind != "f" or a.ndim < 1:
            raise TypeError(f"reconstruction_loss: {name} must be a floating array with a batch axis, "
                            f"got {getattr(a, 'dtype', type(a).__name__)}")
    if tuple(recon.shape) != tuple(target.shape):
        raise ValueError(f"reconstruction_loss: recon must have target's shape {tuple(target.shape)}, "
                         f"got shape {tuple(recon.shape)}")
    d = recon - target
    flat = d.reshape(-1)
    total = xp.abs(flat).sum() if kind == "l1" else xp.dot(flat, flat)
    factor = _scale(reduction, d.shape[0], d.size)
    return xp.asarray(total * factor, dtype=d.dtype), (d, kind, factor)


def reconstruction_loss_backward(dloss, cache):
    """Returns ``(d recon, d target)``: d recon = dloss * factor * (sign(d) for l1 | 2 d for l2)
    (sign(0) = 0, torch's subgradient), d target = -d recon."""
    d, kind, factor = cache
    g = xp.sign(d) if kind == "l1" else d * 2.0
    g *= asarray(dloss, dtype=d.dtype) * factor
    return g, -g


# ----------------------------------------------------------------------------- KL
def kl_loss_forward(posterior: DiagonalGaussianDistribution, reduction: str = "batchmean"):
    """KL(q(z|x) || N(0, I)) per item (``posterior.kl()``, (B,)) summed and reduced.
    Returns ``(loss (0-d), cache)``; cache = (posterior, factor)."""
    _check_choice("kl_loss: reduction", reduction, REDUCTIONS)
    if not isinstance(posterior, DiagonalGaussianDistribution):
        raise TypeError(f"kl_loss: posterior must be a DiagonalGaussianDistribution, got {type(posterior).__name__}")
    kl = posterior.kl()
    factor = _scale(reduction, posterior.mean.shape[0], posterior.mean.size)
    return xp.asarray(kl.sum() * factor, dtype=posterior.mean.dtype), (posterior, factor)


def kl_loss_backward(dloss, cache):
    """Returns ``(d mean, d logvar)`` (logvar the clamped one): dloss * factor * (mean, (var - 1)/2)."""
    posterior, factor = cache
    return posterior.kl_backward(asarray(dloss, dtype=posterior.mean.dtype) * factor)


# ----------------------------------------------------------------------------- the objective
class KLAutoencoderLoss(Module):
    """loss = rec(decode(mean + std * noise), x) + beta * KL(q(z|x) || N(0, I)), for a ``vae``
    (an ``AutoencoderKL``, registered as the child ``vae``).

    ``forward(x, noise=None, generator=None)``: x (B, C, H, W) (H, W multiples of the VAE's
    downsampling factor), noise (B, L, h, w) the reparameterization draw (drawn from
    ``generator`` when None) -> the loss, a 0-d array. The parts of the last forward are in
    ``self.terms`` (``reconstruction``, ``kl``, ``loss``, 0-d arrays) and the draw in ``self.noise``.
    ``backward(grad=1.0)`` -> d loss / d x (through the encoder and the reconstruction target),
    accumulating every VAE parameter gradient. See docs/vae.md.
    """

    def __init__(self, vae, beta: float = 1e-6, reconstruction: str = "l1", reduction: str = "batchmean"):
        super().__init__()
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not beta >= 0:
            raise ValueError(f"KLAutoencoderLoss: beta must be a non-negative number, got {beta!r}")
        self.beta = float(beta)
        self.reconstruction = _check_choice("KLAutoencoderLoss: reconstruction", reconstruction, RECONSTRUCTIONS)
        self.reduction = _check_choice("KLAutoencoderLoss: reduction", reduction, REDUCTIONS)
        self.vae = vae
        self.terms = {}
        self.noise = None

    def forward(self, x, noise=None, generator=None):
        """x (B, C, H, W), noise (B, L, h, w) or None -> loss (0-d)."""
        f = self.vae.downsample_factor
        self.vae.encoder.check_image(x, "KLAutoencoderLoss", "x")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"KLAutoencoderLoss: x's height and width must be multiples of the VAE's "
                             f"downsampling factor {f} (so the reconstruction has x's shape), got shape {tuple(x.shape)}")
        posterior = self.vae.encode(x)
        if noise is None:
            noise = posterior.draw_noise(generator)
        z = posterior.sample(noise)
        recon = self.vae.decode(z)
        rec, rec_cache = reconstruction_loss_forward(recon, x, self.reconstruction, self.reduction)
        kl, kl_cache = kl_loss_forward(posterior, self.reduction)
        loss = xp.asarray(rec + self.beta * kl, dtype=rec.dtype)
        self.terms = {"reconstruction": rec, "kl": kl, "loss": loss}
        self.noise = noise
        self.save_for_backward(posterior, noise, rec_cache, kl_cache)
        return loss

    def backward(self, grad=1.0):
        """grad (scalar) -> d loss / d x (B, C, H, W); accumulates the VAE's parameter gradients.

        d x_hat -> decode_backward -> d z; d mean = d z + beta dKL/dmean,
        d logvar = d z * noise * std / 2 + beta dKL/dlogvar -> encode_backward; plus the
        reconstruction's gradient with respect to its target x."""
        posterior, noise, rec_cache, kl_cache = self.saved()
        d_recon, d_target = reconstruction_loss_backward(grad, rec_cache)
        dz = self.vae.decode_backward(d_recon)
        d_mean, d_logvar = posterior.sample_backward(dz, noise)
        if self.beta:
            k_mean, k_logvar = kl_loss_backward(asarray(grad) * self.beta, kl_cache)
            d_mean += k_mean
            d_logvar += k_logvar
        dx = self.vae.encode_backward(d_mean, d_logvar)
        dx += d_target
        return dx

    def extra_repr(self):
        return f"beta={self.beta}, reconstruction={self.reconstruction!r}, reduction={self.reduction!r}"
