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

OPTIONAL, at the end of the file: latent diffusion's adversarial term (``KLAutoencoderGANLoss``
with a PatchGAN from ``discriminator.py``, the hinge loss and the adaptive weight).

Derivations: docs/vae.md ("The objective's gradient", "Optional: the adversarial term").
"""
from __future__ import annotations

import numbers

import numpy

from npdiffusion.backend import asarray, xp
from npdiffusion.models.vae.distribution import DiagonalGaussianDistribution
from npdiffusion.nn.module import Module, frozen

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
    cache = (d, kind, factor, (recon dtype, target dtype)). float16 inputs are computed in float32
    (the loss is float32; the backward casts its gradients back, once, after scaling by dloss)."""
    _check_choice("reconstruction_loss: kind", kind, RECONSTRUCTIONS)
    _check_choice("reconstruction_loss: reduction", reduction, REDUCTIONS)
    for name, a in (("recon", recon), ("target", target)):
        if not hasattr(a, "dtype") or a.dtype.kind != "f" or a.ndim < 1:
            raise TypeError(f"reconstruction_loss: {name} must be a floating array with a batch axis, "
                            f"got {getattr(a, 'dtype', type(a).__name__)}")
    if tuple(recon.shape) != tuple(target.shape):
        raise ValueError(f"reconstruction_loss: recon must have target's shape {tuple(target.shape)}, "
                         f"got shape {tuple(recon.shape)}")
    dtypes = (recon.dtype, target.dtype)
    if recon.dtype.itemsize < 4 or target.dtype.itemsize < 4:
        d = recon.astype(xp.float32) - target.astype(xp.float32)
    else:
        d = recon - target
    flat = d.reshape(-1)
    total = xp.abs(flat).sum() if kind == "l1" else xp.dot(flat, flat)
    factor = _scale(reduction, d.shape[0], d.size)
    return xp.asarray(total * factor, dtype=d.dtype), (d, kind, factor, dtypes)


def reconstruction_loss_backward(dloss, cache):
    """Returns ``(d recon, d target)``: d recon = dloss * factor * (sign(d) for l1 | 2 d for l2)
    (sign(0) = 0, torch's subgradient), d target = -d recon, each in its input's dtype. dloss (a
    mixed-precision loss scale S, say) multiplies in d's dtype (float32 for float16 inputs) before
    the cast, so small gradients are not flushed to zero by float16."""
    d, kind, factor, (recon_dtype, target_dtype) = cache
    g = xp.sign(d) if kind == "l1" else d * 2.0
    g *= asarray(dloss, dtype=d.dtype) * factor
    neg = -g
    with numpy.errstate(over="ignore"):             # past float16's range: inf, seen by the loss scaler
        return g.astype(recon_dtype, copy=False), neg.astype(target_dtype, copy=False)


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
def encode_and_draw(vae, x, noise, generator, who: str):
    """The preamble both objectives share: check x (sides multiples of the VAE's downsampling factor,
    so the reconstruction has x's shape), encode it and draw the reparameterization noise when
    ``noise`` is None. Returns ``(posterior, noise)``."""
    f = vae.downsample_factor
    vae.encoder.check_image(x, who, "x")
    if x.shape[2] % f or x.shape[3] % f:
        raise ValueError(f"{who}: x's height and width must be multiples of the VAE's downsampling factor {f} "
                         f"(so the reconstruction has x's shape), got shape {tuple(x.shape)}")
    posterior = vae.encode(x)
    return posterior, (posterior.draw_noise(generator) if noise is None else noise)


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
        posterior, noise = encode_and_draw(self.vae, x, noise, generator, "KLAutoencoderLoss")
        z = posterior.sample(noise)
        recon = self.vae.decode(z)
        rec, rec_cache = reconstruction_loss_forward(recon, x, self.reconstruction, self.reduction)
        # float16 (mixed precision): the KL and its gradient in float32, cast back once in backward
        kl_posterior = posterior if posterior.mean.dtype.itemsize >= 4 else \
            DiagonalGaussianDistribution(posterior.parameters.astype(xp.float32), posterior.deterministic)
        kl, kl_cache = kl_loss_forward(kl_posterior, self.reduction)
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
            with numpy.errstate(over="ignore"):
                d_mean += k_mean.astype(d_mean.dtype, copy=False)
                d_logvar += k_logvar.astype(d_logvar.dtype, copy=False)
        dx = self.vae.encode_backward(d_mean, d_logvar)
        dx += d_target
        return dx

    def extra_repr(self):
        return f"beta={self.beta}, reconstruction={self.reconstruction!r}, reduction={self.reduction!r}"


# =============================================================================================
# OPTIONAL: the adversarial term of latent diffusion's autoencoder training (taming-transformers'
# LPIPSWithDiscriminator without the LPIPS perceptual network, which needs pretrained VGG weights).
# =============================================================================================
def hinge_d_loss_forward(logits_real, logits_fake):
    """The discriminator's hinge loss 0.5 (mean relu(1 - real) + mean relu(1 + fake)).
    Returns ``(loss (0-d), cache)``; cache = (masks 1 - real > 0, 1 + fake > 0, sizes, dtype)."""
    active_real = logits_real < 1.0
    active_fake = logits_fake > -1.0
    loss = 0.5 * (xp.where(active_real, 1.0 - logits_real, 0.0).mean()
                  + xp.where(active_fake, 1.0 + logits_fake, 0.0).mean())
    return xp.asarray(loss, dtype=logits_real.dtype), (active_real, active_fake, logits_real.dtype)


def hinge_d_loss_backward(dloss, cache):
    """Returns ``(d real, d fake)``: -0.5 dloss / N_real where 1 - real > 0, +0.5 dloss / N_fake
    where 1 + fake > 0, zero elsewhere (torch's relu gradient is 0 at the kink)."""
    active_real, active_fake, dtype = cache
    g = asarray(dloss, dtype=dtype)
    d_real = active_real.astype(dtype) * (-0.5 / active_real.size) * g
    d_fake = active_fake.astype(dtype) * (0.5 / active_fake.size) * g
    return d_real, d_fake


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``weight`` from ``global_step >= threshold`` on, ``value`` before (taming's adopt_weight)."""
    return weight if global_step >= threshold else value


class KLAutoencoderGANLoss(Module):
    """OPTIONAL. Latent diffusion's autoencoder objective with a PatchGAN (no perceptual term).

    Generator step (``forward(x, noise, global_step)`` then ``backward()``), with d = x_hat - x,
    s the learned scalar ``logvar`` (a 0-d parameter of this module, init ``logvar_init``), N the
    number of image elements:

        nll   = (sum |d| / exp(s) + N s) / B
        kl    = sum_b KL_b / B
        g     = -mean(D(x_hat))
        lam   = clip(|grad_W nll| / (|grad_W g| + 1e-4), 0, 1e4) * disc_weight,  W = decoder.conv_out.weight
        loss  = nll + kl_weight * kl + lam * f * g,     f = disc_factor from disc_start on, else 0

    lam is a constant (taming detaches it): its own dependence on the weights is not differentiated.
    The forward already runs the discriminator's backward once (for grad_W g and d g / d x_hat);
    the discriminator's own parameter gradients are left exactly as they were.

    Discriminator step (``discriminator_step(x, x_hat, global_step)``): runs D on x and on x_hat
    (two calls, as taming, so batch norm sees each batch alone), accumulates D's gradients of
    f * 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) and returns that loss.

    The ``discriminator`` is held but not registered as a child: this module's parameters are the
    VAE's and ``logvar`` (the generator optimizer's set); D has its own optimizer, train()/eval()
    and dtype. See docs/vae.md ("Optional: the adversarial term").
    """

    def __init__(self, vae, discriminator, kl_weight: float = 1e-6, logvar_init: float = 0.0,
                 disc_start: int = 0, disc_factor: float = 1.0, disc_weight: float = 1.0):
        super().__init__()
        for name, v in (("kl_weight", kl_weight), ("disc_factor", disc_factor), ("disc_weight", disc_weight)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v >= 0:
                raise ValueError(f"KLAutoencoderGANLoss: {name} must be a non-negative number, got {v!r}")
        self.kl_weight, self.disc_factor, self.disc_weight = float(kl_weight), float(disc_factor), float(disc_weight)
        self.disc_start = int(disc_start)
        self.vae = vae
        object.__setattr__(self, "discriminator", discriminator)           # not a child, see the docstring
        self.register_parameter("logvar", xp.asarray(float(logvar_init), dtype=vae.dtype))
        self.terms = {}
        self.noise = None

    def forward(self, x, noise=None, global_step: int = 0, generator=None):
        """The generator loss (0-d). x (B, C, H, W) with sides multiples of the VAE's factor."""
        posterior, noise = encode_and_draw(self.vae, x, noise, generator, "KLAutoencoderGANLoss")
        x_hat = self.vae.decode(posterior.sample(noise))
        d = x_hat - x
        b, n = x.shape[0], x.size
        inv_var = xp.exp(-self.logvar)
        nll = (xp.abs(d).sum() * inv_var + n * self.logvar) / b
        kl, kl_cache = kl_loss_forward(posterior, "batchmean")
        factor = adopt_weight(self.disc_factor, global_step, self.disc_start)

        # adversarial term: g = -mean(D(x_hat)); d g / d x_hat via D's backward, D frozen
        with frozen(self.discriminator):
            logits = self.discriminator(x_hat)
            g = -logits.mean()
            d_xhat_g = self.discriminator.backward(xp.full(logits.shape, -1.0 / logits.size, dtype=logits.dtype))
        d_xhat_nll = xp.sign(d) * (inv_var / b)
        lam = 0.0
        if self.disc_factor > 0.0:                       # |grad_W| at W = decoder.conv_out.weight, not accumulated
            last_layer = self.vae.decoder.conv_out
            norm_nll = float(xp.linalg.norm(last_layer.weight_grad(d_xhat_nll)))
            norm_g = float(xp.linalg.norm(last_layer.weight_grad(d_xhat_g)))
            lam = min(max(norm_nll / (norm_g + 1e-4), 0.0), 1e4) * self.disc_weight
        loss = xp.asarray(nll + self.kl_weight * kl + (lam * factor) * g, dtype=x.dtype)
        self.terms = {"nll": nll, "kl": kl, "g": g, "d_weight": lam, "disc_factor": factor, "loss": loss,
                      "reconstruction": x_hat}
        self.noise = noise
        self.save_for_backward(posterior, noise, kl_cache, d, inv_var, d_xhat_nll, d_xhat_g, lam * factor)
        return loss

    def backward(self, grad=1.0):
        """-> d loss / d x; accumulates the VAE's and ``logvar``'s gradients (not D's)."""
        posterior, noise, kl_cache, d, inv_var, d_xhat_nll, d_xhat_g, adv = self.saved()
        g = asarray(grad, dtype=d.dtype)
        d_xhat = d_xhat_nll * g
        if adv:
            d_xhat += d_xhat_g * (adv * g)
        b = d.shape[0]
        # d nll / d s = (N - sum |d| / exp(s)) / B
        self.accumulate_grad("logvar", xp.asarray((d.size - xp.abs(d).sum() * inv_var) / b * g, dtype=d.dtype))
        dz = self.vae.decode_backward(d_xhat)
        d_mean, d_logvar = posterior.sample_backward(dz, noise)
        if self.kl_weight:
            k_mean, k_logvar = kl_loss_backward(g * self.kl_weight, kl_cache)
            d_mean += k_mean
            d_logvar += k_logvar
        dx = self.vae.encode_backward(d_mean, d_logvar)
        dx -= d_xhat_nll * g                                              # x as the reconstruction target
        return dx

    def discriminator_step(self, x, x_hat, global_step: int = 0):
        """f * hinge(D(x), D(x_hat)) (0-d); accumulates D's parameter gradients (x, x_hat get none).

        Each half of the hinge loss (``hinge_d_loss_forward``'s terms, with s = -1 for x and +1 for
        x_hat) is one D call followed by its backward: taming calls D on each batch alone (batch
        norm statistics), and the module protocol keeps one live forward per module."""
        factor = adopt_weight(self.disc_factor, global_step, self.disc_start)
        halves = []
        for images, sign in ((x, -1.0), (x_hat, 1.0)):               # mean relu(1 + s D(images))
            logits = self.discriminator(images)
            active = sign * logits > -1.0
            halves.append(xp.where(active, 1.0 + sign * logits, 0.0).mean())
            if factor:
                self.discriminator.backward(active.astype(logits.dtype) * (0.5 * sign * factor / logits.size))
        return xp.asarray(factor * 0.5 * (halves[0] + halves[1]), dtype=logits.dtype)

    def extra_repr(self):
        return (f"kl_weight={self.kl_weight}, disc_start={self.disc_start}, disc_factor={self.disc_factor}, "
                f"disc_weight={self.disc_weight}")
