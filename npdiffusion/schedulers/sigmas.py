"""The sigma-space schedulers' shared parts (Euler, Euler ancestral, Heun, DPM-Solver): sigma spacings,
step-index bookkeeping, input scaling and the variance-exploding ``add_noise``.

Shapes: sample, original_samples, noise (B, C, H, W) (any shape with a batch axis first); sigmas
(N + 1,) and timesteps (N,) float32 on the host; sigma x = x_0 + sigma eps.
"""
from __future__ import annotations

import numpy

from npdiffusion.diffusion import schedules
from npdiffusion.schedulers.noise import broadcast_per_sample
from npdiffusion.schedulers.validation import check_array_pair, check_int, check_sample, noise_timesteps, schedule_positions


def convert_sigmas(cls_name: str, kind: str, in_sigmas: numpy.ndarray, num_inference_steps: int,
                   sigma_min=None, sigma_max=None) -> numpy.ndarray:
    """Respace a descending sigma schedule (N,) as "karras", "exponential" or "beta" noise levels (float64).

    sigma_min / sigma_max default to the last / first entry of ``in_sigmas`` (diffusers'
    ``_convert_to_karras`` / ``_convert_to_exponential`` / ``_convert_to_beta``).
    """
    lo = float(sigma_min) if sigma_min is not None else float(in_sigmas[-1])
    hi = float(sigma_max) if sigma_max is not None else float(in_sigmas[0])
    if kind == "karras":
        return schedules.karras_sigmas(lo, hi, num_inference_steps)
    if kind == "exponential":
        return schedules.exponential_sigmas(lo, hi, num_inference_steps)
    if kind == "beta":
        return schedules.beta_sigmas(lo, hi, num_inference_steps)
    raise ValueError(f"{cls_name}: unknown sigma spacing {kind!r}")


def sigma_kind(cls_name: str, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas) -> str | None:
    """Which of the mutually exclusive ``use_*_sigmas`` flags is set (None for none)."""
    chosen = [k for k, on in (("karras", use_karras_sigmas), ("exponential", use_exponential_sigmas),
                              ("beta", use_beta_sigmas)) if on]
    if len(chosen) > 1:
        raise ValueError(f"{cls_name}: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas "
                         f"can be True, got {chosen}")
    return chosen[0] if chosen else None


class StepIndexMixin:
    """Step-index bookkeeping of the schedulers that keep a sigma list (Euler, Euler ancestral, Heun, DPM).

    The first ``scale_model_input``/``step`` call finds the step index from its timestep (the second
    match when the timestep repeats, as in image-to-image where the schedule is entered midway),
    unless ``set_begin_index`` fixed it; each ``step`` then advances it by one.
    """

    _step_index = None
    _begin_index = None

    @property
    def step_index(self):
        """The index of the current step into ``sigmas`` (None before the first call)."""
        return self._step_index

    @property
    def begin_index(self):
        """The first step's index when set with ``set_begin_index`` (pipelines that start midway)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = check_int(type(self).__name__, "begin_index", begin_index)

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """The step index of ``timestep`` (the second match when it repeats); unknown timesteps are refused."""
        schedule = self.timesteps if schedule_timesteps is None else numpy.asarray(schedule_timesteps)
        found = schedule_positions(type(self).__name__, timestep, schedule)
        return int(found[1] if found.size > 1 else found[0])

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _reset_step_index(self) -> None:
        """Forget the step and begin indices (a new schedule: the constructor and ``set_timesteps``)."""
        self._step_index = None
        self._begin_index = None

    def _locate(self, method: str, timestep) -> None:
        """``timestep`` must be one of the schedule's (every call); the first call also finds the step index."""
        self._require_timesteps(method)
        schedule_positions(f"{type(self).__name__}.{method}", timestep, self.timesteps)
        if self._step_index is None:
            self._init_step_index(timestep)

    def _enter_step(self, timestep) -> None:
        """Start a ``step`` call: check the timestep, find the step index on the first call; refuse a call
        past the last sigma."""
        self._locate("step", timestep)
        if self._step_index + 1 >= len(self.sigmas):
            raise ValueError(f"{type(self).__name__}.step: all {len(self.sigmas) - 1} steps are done; "
                             "call set_timesteps again")

    def _sigma_add_noise(self, original_samples, noise, timesteps):
        """x = x_0 + sigma noise at each item's timestep (B, ...): diffusers' sigma-space ``add_noise``."""
        sigma = self._add_noise_sigmas(original_samples, noise, timesteps)
        return original_samples + noise * broadcast_per_sample(sigma, original_samples)

    def _add_noise_sigmas(self, original_samples, noise, timesteps) -> numpy.ndarray:
        """Check the ``add_noise`` arguments; the sigma (B,) of each item, in the samples' dtype.

        An item's step is found from its timestep, unless a begin index (or a running step index)
        is set, which then applies to the whole batch, as in diffusers.
        """
        name = type(self).__name__
        check_array_pair(name, "noise", noise, "original_samples", original_samples)
        ts = noise_timesteps(f"{name}.add_noise", timesteps, original_samples.shape[0])
        for t in ts:  # every timestep must be the schedule's, also where a begin index picks the step
            schedule_positions(f"{name}.add_noise", t, self.timesteps)
        if self._begin_index is None:
            indices = [self.index_for_timestep(t) for t in ts]
        elif self._step_index is not None:
            indices = [self._step_index] * ts.shape[0]
        else:
            indices = [self._begin_index] * ts.shape[0]
        return self.sigmas.astype(numpy.dtype(original_samples.dtype))[indices]

    def _sigma_init_noise_sigma(self) -> float:
        """max sigma (linspace/trailing spacing) or sqrt(max sigma^2 + 1) (leading), in float32, as a float."""
        max_sigma = numpy.float32(numpy.max(self.sigmas))
        if self._config["timestep_spacing"] in ("linspace", "trailing"):
            return float(max_sigma)
        return float(numpy.sqrt(max_sigma * max_sigma + numpy.float32(1.0)))

    def _scale_by_sigma(self, sample, timestep):
        """x / sqrt(sigma^2 + 1): the model sees unit-variance input (Karras et al. c_in)."""
        check_sample(type(self).__name__, "sample", sample)
        self._locate("scale_model_input", timestep)
        sigma = self.sigmas[self._step_index]
        return sample / float(numpy.sqrt(sigma * sigma + numpy.float32(1.0)))


class SigmaScalingMixin(StepIndexMixin):
    """The sigma-space schedulers whose model sees x / sqrt(sigma^2 + 1) (Euler, Euler ancestral, Heun).

    They keep ``sigmas`` (host, float32) and ``timesteps``; the initial noise has std
    ``init_noise_sigma`` and ``add_noise`` is x_0 + sigma noise (the variance-exploding form).
    """

    @property
    def init_noise_sigma(self) -> float:
        """The std of the initial noise: max sigma (linspace/trailing) or sqrt(max sigma^2 + 1) (leading)."""
        return self._sigma_init_noise_sigma()

    def scale_model_input(self, sample, timestep):
        """x / sqrt(sigma^2 + 1) at this step's sigma. (B, ...)."""
        out = self._scale_by_sigma(sample, timestep)
        self.is_scale_input_called = True
        return out

    def add_noise(self, original_samples, noise, timesteps):
        """x = x_0 + sigma noise at each item's timestep (sigma-space forward process). (B, ...)."""
        return self._sigma_add_noise(original_samples, noise, timesteps)

    def _refuse_respaced_custom_timesteps(self, timesteps) -> None:
        """Custom ``timesteps`` fix the sigmas, so a ``use_*_sigmas`` respacing cannot apply to them."""
        if timesteps is not None and self._sigma_kind is not None:
            raise ValueError(f"{type(self).__name__}.set_timesteps: custom timesteps cannot be combined with "
                             f"use_{self._sigma_kind}_sigmas")


def reject_integer_timestep(cls_name: str, timestep) -> None:
    """diffusers' Euler-type ``step`` refuses integer timesteps (a likely enumerate() index)."""
    value = timestep
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        if numpy.dtype(value.dtype).kind in "iu":
            value = 0
        else:
            return
    if isinstance(value, (int, numpy.integer)) and not isinstance(value, bool):
        raise ValueError(f"{cls_name}.step: timestep must be one of scheduler.timesteps (floats), "
                         f"got the integer {timestep!r}; integer indices from enumerate() are not timesteps")
