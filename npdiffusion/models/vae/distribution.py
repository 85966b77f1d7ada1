"""``DiagonalGaussianDistribution``: the VAE posterior q(z | x) = N(mean, diag(var)), with the
backward of every quantity derived from it.

Shapes: B batch, L latent_channels, h x w the latent size. The encoder's moments ``parameters``
(B, 2L, h, w) split on the channel axis into ``mean`` (B, L, h, w) and the raw log-variance, which
is clamped to [-30, 20] (as diffusers does) to give ``logvar`` (B, L, h, w); std = exp(logvar / 2),
var = exp(logvar).

    sample(noise) = mean + std * noise                        (the reparameterization trick)
    kl()          = 1/2 sum_{c,i,j} (mean^2 + var - 1 - logvar)            (B,)
    nll(x)        = 1/2 sum_{dims} (log 2 pi + logvar + (x - mean)^2 / var)
    mode()        = mean

Backward helpers return gradients with respect to ``mean`` and the *clamped* ``logvar``
(``sample_backward``, ``kl_backward``, ``nll_backward``); ``parameters_backward`` takes those to
the gradient of ``parameters`` through the split and the clamp (zero where the raw log-variance
lies outside [-30, 20], one inside and on the bounds, as torch.clamp). Derivations: docs/vae.md
("The posterior and its gradients"). Source mirrored: diffusers/models/autoencoders/vae.py.
"""
from __future__ import annotations

import math

import numpy

from npdiffusion.backend import asarray, xp
from npdiffusion.random.torch_generator import TorchGenerator, randn_tensor

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0
LOG_TWO_PI = math.log(2.0 * math.pi)


def _check_like(name: str, a, like, what: str):
    """``a`` must be an array of ``like``'s shape (broadcasting is not accepted)."""
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"DiagonalGaussianDistribution: {name} must be an array, got {type(a).__name__}")
    if tuple(a.shape) != tuple(like.shape):
        raise ValueError(f"DiagonalGaussianDistribution: {name} must have the shape of {what} "
                         f"{tuple(like.shape)}, got shape {tuple(a.shape)}")


def _batch_grad(grad, like, name: str):
    """A per-item upstream gradient (B,) (or a scalar) as an array of ``like``'s dtype broadcastable
    to ``like`` (B, ...)."""
    ndim, batch = like.ndim, like.shape[0]
    g = asarray(grad, dtype=like.dtype)
    if g.ndim == 0:
        return g
    if tuple(g.shape) != (batch,):
        raise ValueError(f"DiagonalGaussianDistribution: {name} must have shape ({batch},) (one value per "
                         f"batch item) or be a scalar, got shape {tuple(g.shape)}")
    return g.reshape((batch,) + (1,) * (ndim - 1))


class DiagonalGaussianDistribution:
    """q(z | x) = N(mean, diag(var)) from the moments ``parameters`` (B, 2L, h, w).

    ``deterministic=True`` makes std and var zero (``sample`` returns ``mean``, ``kl`` and ``nll``
    return zeros), as diffusers does. Attributes: ``parameters``, ``mean``, ``logvar`` (clamped),
    ``std``, ``var`` (all (B, L, h, w) except ``parameters``). See docs/vae.md.
    """

    def __init__(self, parameters, deterministic: bool = False):
        if not hasattr(parameters, "shape") or not hasattr(parameters, "dtype") or parameters.dtype.kind != "f":
            got = f"dtype {parameters.dtype}" if hasattr(parameters, "dtype") else type(parameters).__name__
            raise TypeError(f"DiagonalGaussianDistribution: parameters must be a floating array, got {got}")
        if parameters.ndim < 2 or parameters.shape[1] % 2 or parameters.shape[1] == 0:
            raise ValueError("DiagonalGaussianDistribution: parameters must have shape (B, 2L, ...) with an even, "
                             f"nonzero channel count (mean | logvar), got shape {tuple(parameters.shape)}")
        latent = parameters.shape[1] // 2
        self.parameters = parameters
        self.deterministic = bool(deterministic)
        self.mean = parameters[:, :latent]
        raw = parameters[:, latent:]
        self._in_range = (raw >= LOGVAR_MIN) & (raw <= LOGVAR_MAX)      # where the clamp passes gradients
        self.logvar = xp.clip(raw, LOGVAR_MIN, LOGVAR_MAX)
        if self.deterministic:
            self.std = xp.zeros_like(self.mean)
            self.var = xp.zeros_like(self.mean)
        else:
            self.std = xp.exp(0.5 * self.logvar)
            self.var = xp.exp(self.logvar)

    @property
    def shape(self) -> tuple:
        """The latent shape (B, L, h, w)."""
        return tuple(self.mean.shape)

    # ------------------------------------------------------------------ sampling
    def sample(self, noise=None, generator=None):
        """mean + std * noise, noise ~ N(0, I) of the latent shape.

        ``noise`` is an explicit draw (the same shape as ``mean``); otherwise it is drawn from
        ``generator``: a ``npdiffusion.random.TorchGenerator`` (or a list of them, one per batch
        item) gives exactly diffusers' ``latent_dist.sample(torch.Generator().manual_seed(s))``, a
        NumPy ``Generator`` gives its own normals. Keep the noise for ``sample_backward``.
        """
        if noise is None:
            noise = self.draw_noise(generator)
        _check_like("noise", noise, self.mean, "mean")
        z = self.std * asarray(noise, dtype=self.mean.dtype)
        z += self.mean
        return z

    def draw_noise(self, generator=None):
        """A standard normal draw of the latent shape and dtype (see ``sample``)."""
        shape = self.shape
        if generator is None:
            generator = numpy.random.default_rng()
        if isinstance(generator, TorchGenerator) or isinstance(generator, (list, tuple)):
            host = randn_tensor(shape, generator, dtype=numpy.dtype(self.mean.dtype))
        elif isinstance(generator, numpy.random.Generator):
            host = generator.standard_normal(shape)
        else:
            raise TypeError("DiagonalGaussianDistribution.sample: generator must be a TorchGenerator, a list of "
                            f"them or a numpy.random.Generator, got {type(generator).__name__}")
        return asarray(host, dtype=self.mean.dtype)

    def sample_backward(self, grad_z, noise):
        """Gradients of ``sample(noise)``: grad_z (B, L, h, w) -> (grad_mean, grad_logvar).

        dz/dmean = 1; dz/dlogvar = noise * std / 2 (std = exp(logvar / 2)); zero when deterministic.
        """
        _check_like("grad_z", grad_z, self.mean, "mean")
        _check_like("noise", noise, self.mean, "mean")
        grad_logvar = grad_z * asarray(noise, dtype=self.mean.dtype)
        grad_logvar *= self.std
        grad_logvar *= 0.5
        return grad_z.copy(), grad_logvar

    def mode(self):
        """The posterior's mode, ``mean`` (B, L, h, w)."""
        return self.mean

    # ------------------------------------------------------------------ divergences
    def kl(self, other: "DiagonalGaussianDistribution | None" = None):
        """KL(q || N(0, I)) (or KL(q || other)) per batch item, summed over channels and space: (B,).

        KL(q || N(0, I)) = 1/2 sum (mean^2 + var - 1 - logvar). Zeros when deterministic.
        """
        axes = tuple(range(1, self.mean.ndim))
        if self.deterministic:
            return xp.zeros((self.mean.shape[0],), dtype=self.mean.dtype)
        if other is None:
            terms = self.mean * self.mean
            terms += self.var
            terms -= 1.0
            terms -= self.logvar
        else:
            if not isinstance(other, DiagonalGaussianDistribution) or other.shape != self.shape:
                raise ValueError(f"DiagonalGaussianDistribution.kl: other must be a DiagonalGaussianDistribution "
                                 f"of shape {self.shape}, got {getattr(other, 'shape', type(other).__name__)}")
            diff = self.mean - other.mean
            terms = diff * diff / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * terms.sum(axis=axes)

    def kl_backward(self, grad_kl):
        """Gradients of ``kl()`` (against N(0, I)): grad_kl (B,) or a scalar -> (grad_mean, grad_logvar).

        d KL_b / d mean = mean; d KL_b / d logvar = (var - 1) / 2. Zeros when deterministic.
        """
        g = _batch_grad(grad_kl, self.mean, "grad_kl")
        if self.deterministic:
            return xp.zeros_like(self.mean), xp.zeros_like(self.mean)
        grad_mean = self.mean * g
        grad_logvar = self.var - 1.0
        grad_logvar *= 0.5 * g
        return grad_mean, grad_logvar

    def nll(self, sample, dims=(1, 2, 3)):
        """-log q(sample) summed over ``dims``: 1/2 sum (log 2 pi + logvar + (sample - mean)^2 / var).

        Zeros (shape (1,), as diffusers) when deterministic.
        """
        _check_like("sample", sample, self.mean, "mean")
        if self.deterministic:
            return xp.zeros((1,), dtype=self.mean.dtype)
        diff = sample - self.mean
        terms = diff * diff
        terms /= self.var
        terms += self.logvar
        terms += LOG_TWO_PI
        return 0.5 * terms.sum(axis=tuple(dims))

    def nll_backward(self, grad_nll, sample, dims=(1, 2, 3)):
        """Gradients of ``nll(sample, dims)``: grad_nll (nll's shape) -> (grad_mean, grad_logvar, grad_sample).

        With r = (sample - mean) / var: d/dmean = -r, d/dsample = r,
        d/dlogvar = (1 - (sample - mean)^2 / var) / 2.
        """
        _check_like("sample", sample, self.mean, "mean")
        dims = tuple(d % self.mean.ndim for d in dims)
        if self.deterministic:
            z = xp.zeros_like(self.mean)
            return z, z.copy(), z.copy()
        expected = tuple(s for i, s in enumerate(self.mean.shape) if i not in dims)
        g = asarray(grad_nll, dtype=self.mean.dtype)
        if tuple(g.shape) != expected and g.ndim != 0:
            raise ValueError(f"DiagonalGaussianDistribution: grad_nll must have nll's shape {expected}, "
                             f"got shape {tuple(g.shape)}")
        g = xp.expand_dims(g, dims) if g.ndim else g
        r = (sample - self.mean) / self.var
        grad_sample = r * g
        grad_logvar = 1.0 - r * (sample - self.mean)
        grad_logvar *= 0.5 * g
        return -grad_sample, grad_logvar, grad_sample

    # ------------------------------------------------------------------ back to the moments
    def parameters_backward(self, grad_mean=None, grad_logvar=None):
        """(grad_mean, grad_logvar) -> the gradient of ``parameters`` (B, 2L, h, w).

        ``grad_logvar`` is with respect to the clamped ``logvar``; the clamp passes it where
        -30 <= raw <= 20 (bounds included, as torch.clamp) and zeroes it elsewhere. None stands
        for a zero gradient.
        """
        latent = self.mean.shape[1]
        out = xp.zeros(self.parameters.shape, dtype=self.parameters.dtype)
        if grad_mean is not None:
            _check_like("grad_mean", grad_mean, self.mean, "mean")
            out[:, :latent] = grad_mean
        if grad_logvar is not None:
            _check_like("grad_logvar", grad_logvar, self.mean, "mean")
            xp.multiply(grad_logvar, self._in_range, out=out[:, latent:])
        return out

    def __repr__(self):
        return f"DiagonalGaussianDistribution(shape={self.shape}, dtype={self.mean.dtype}, " \
               f"deterministic={self.deterministic})"
