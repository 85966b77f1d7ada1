"""The inpainting denoising loop: the inpainting U-Net's input, the known region put back, RePaint's jumps.

Shapes: B images, L latent channels (4 in SD), h x w latents; context (2B, T, D) with guidance; ``mask``
(B, 1, h, w) of 0 / 1 (1 = repaint), ``image_latents`` z0 (B, L, h, w), ``noise`` eps (B, L, h, w),
``extra`` [mask | masked-image latents] (2B or B, 1 + L, h, w) for an inpainting U-Net (2L + 1 input channels: 9 in SD).

Step i of the K timesteps t_0 > ... > t_{K-1} ("down", as diffusers' StableDiffusionInpaintPipeline):

    eps_i = unet([x | extra], t_i) (guided);  x <- scheduler.step(eps_i, t_i, x)
    an ordinary (L-channel) U-Net only, the known region back at the new noise level (a draw of q(x_{t_{i+1}} | z0)):
        x <- (1 - m) (sqrt(abar_{t_{i+1}}) z0 + sqrt(1 - abar_{t_{i+1}}) eps) + m x      (z0 itself after the last)

RePaint's resampling (Lugmayr et al. 2022; option ``jump_length`` j, ``jump_n_sample`` r > 1), ordinary
U-Nets only: after reaching each level l in {0, j, 2j, ...} (l = K - i steps left, below K - j), go back up j
levels, r - 1 times, through the forward process between two noise levels s < t of the schedule

    x_t = sqrt(abar_t / abar_s) x_s + sqrt(1 - abar_t / abar_s) eps',   eps' ~ N(0, I) fresh      ("up")

and walk down again, so the generated region is harmonised with the known one. This is the move list
of diffusers' ``RePaintScheduler`` (``get_schedule_jump``) on the K timesteps of the run. The up moves
need a scheduler whose step depends on (t, x) alone: DDPM or DDIM. Derivation: docs/inpainting.md.
"""
from __future__ import annotations

import numpy

from npdiffusion.backend import asarray, xp
from npdiffusion.pipelines.nonfinite import check_step

#: the schedulers whose step is a function of (t, x) only, so that the chain can be walked back up
RESAMPLING_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")


def jump_schedule(num_steps: int, jump_length: int = 10, jump_n_sample: int = 1) -> list[tuple[str, int]]:
    """The moves of a run of ``num_steps`` steps: ("down", i) runs step i (t_i -> t_{i+1}); ("up", i) takes
    the latents at t_{i+1} (at z0 for the last i) back to t_i. ``jump_n_sample`` 1 is the plain chain."""
    jumps = {level: jump_n_sample - 1 for level in range(0, num_steps - jump_length, jump_length)}
    moves, level = [], num_steps
    while level >= 1:
        level -= 1
        moves.append(("down", num_steps - 1 - level))
        if jumps.get(level, 0) > 0:
            jumps[level] -= 1
            for _ in range(jump_length):
                level += 1
                moves.append(("up", num_steps - level))
    return moves


def check_resampling(scheduler, inpainting_unet: bool, jump_length, jump_n_sample) -> tuple[int, int]:
    """(j, r) checked: ints >= 1; r > 1 needs a DDPM/DDIM scheduler and an ordinary (not inpainting) U-Net."""
    from npdiffusion.checks import check_int  # noqa: PLC0415

    j = check_int("jump_length", jump_length)
    r = check_int("jump_n_sample", jump_n_sample)
    if r > 1 and type(scheduler).__name__ not in RESAMPLING_SCHEDULERS:
        raise ValueError(f"jump_n_sample > 1 (RePaint resampling) needs one of {RESAMPLING_SCHEDULERS}, whose step "
                         f"depends on (t, x) alone; got {type(scheduler).__name__}")
    if r > 1 and inpainting_unet:
        raise ValueError("jump_n_sample > 1 (RePaint resampling) is for ordinary U-Nets, got an inpainting U-Net "
                         "(it sees the mask and the masked image itself)")
    return j, r


def _alpha_bar(scheduler, t) -> float:
    return float(numpy.asarray(scheduler.alphas_cumprod)[int(t)])


def renoise(scheduler, latents, t_from, t_to, draw):
    """One up move: x_{t_to} = sqrt(abar_to / abar_from) x + sqrt(1 - abar_to / abar_from) eps' (t_from None: z0)."""
    ratio = _alpha_bar(scheduler, t_to) / (1.0 if t_from is None else _alpha_bar(scheduler, t_from))
    dtype = latents.dtype
    eps = asarray(draw(tuple(latents.shape), dtype))
    return dtype.type(numpy.sqrt(ratio)) * latents + dtype.type(numpy.sqrt(1.0 - ratio)) * eps


def known_region(scheduler, image_latents, noise, timesteps, i: int):
    """z0 at the noise level after step i: add_noise(z0, eps, t_{i+1}), or z0 after the last step."""
    if i >= len(timesteps) - 1:
        return image_latents
    t_next = numpy.repeat(numpy.asarray(timesteps[i + 1]).reshape(1), image_latents.shape[0])
    return scheduler.add_noise(image_latents, noise, t_next)


@numpy.errstate(over="ignore", invalid="ignore", divide="ignore")     # check_step reports NaN/inf instead
def inpaint_denoise(pipe, latents, timesteps, context, guidance_scale: float, source, num_inference_steps: int,
                    eta: float = 0.0, extra=None, mask=None, image_latents=None, noise=None,
                    jump_length: int = 10, jump_n_sample: int = 1, callback_on_step_end=None, progress: bool = True):
    """The loop of the module docstring. ``extra`` for an inpainting U-Net; ``mask``, ``image_latents``
    and ``noise`` for an ordinary one (the known region). Returns the final latents (B, L, h, w)."""
    scheduler = pipe.scheduler
    step_kwargs = pipe.step_kwargs(source, eta)
    order = getattr(scheduler, "order", 1)
    num_warmup = len(timesteps) - num_inference_steps * order
    moves = jump_schedule(len(timesteps), jump_length, jump_n_sample)
    bar = pipe._progress_bar(len(moves) if jump_n_sample > 1 else num_inference_steps) if progress else None
    try:
        for i_move, (kind, i) in enumerate(moves):
            if kind == "up":
                t_from = timesteps[i + 1] if i + 1 < len(timesteps) else None
                latents = renoise(scheduler, latents, t_from, timesteps[i], source.randn)
            else:
                t = timesteps[i]
                eps, raw = pipe.predict_noise(latents, t, context, guidance_scale, 0.0, extra)
                before, latents = latents, scheduler.step(eps, t, latents, return_dict=False, **step_kwargs)[0]
                check_step(latents, i, len(timesteps), t, before, raw, eps, guidance_scale)
                if mask is not None:
                    known = known_region(scheduler, image_latents, noise, timesteps, i)
                    latents = (1 - mask) * known + mask * latents
                if callback_on_step_end is not None:
                    out = callback_on_step_end(pipe, i, t, {"latents": latents})
                    if out and "latents" in out:
                        latents = out["latents"]
                        check_step(latents, i, len(timesteps), t, cause="callback_on_step_end returned them")
            if bar is not None and (jump_n_sample > 1 or kind == "down" and (
                    i == len(timesteps) - 1 or ((i + 1) > num_warmup and (i + 1) % order == 0))):
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return latents


def repeat_rows(x, batch: int, what: str):
    """``x`` (b, ...) tiled to (batch, ...) as torch's ``repeat`` ([a, b, a, b]); batch must be a multiple of b."""
    if x.shape[0] == batch:
        return x
    if x.shape[0] > batch or batch % x.shape[0]:
        raise ValueError(f"{what}: {x.shape[0]} given cannot be repeated to the {batch} images to make (prompts x "
                         f"num_images_per_prompt); give a number that divides it")
    return xp.concatenate([x] * (batch // x.shape[0]), axis=0)
