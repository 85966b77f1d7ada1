"""Whole sampling loops of npdiffusion.schedulers against diffusers 0.42, fed the same model and noise.

Every case builds our scheduler and diffusers' from the same config, runs ``set_timesteps`` and a full
loop (``scale_model_input`` -> a fixed dummy model -> ``step``), each side on its own state, and checks:
the timesteps are identical (float timesteps derived from Karras-type sigmas to 1e-6: their log-sigma
table depends on torch's MKL sqrt, see tests/test_diffusion_schedules.py), the sigmas agree, and the
final sample (and the last x0 estimate, where the scheduler returns one) is within 1e-5 relative error.
With ``rescale_betas_zero_snr`` diffusers is handed our rescaled betas (``ZSNR_FROM_OURS``): that
rescale is checked on its own in tests/test_diffusion_schedules.py, and here both samplers should
run on the same schedule rather than on two that differ by torch's MKL sqrt.

Two dummy models: diffusers' own ``x * t / (t + 1)`` (proportional to x) and a smooth model that is
not (sines of x and t plus a fixed random field). Stochastic steps (DDPM, DDIM with eta > 0, Euler
ancestral, Euler with churn, the SDE DPM-Solvers) get the same standard-normal draw on both sides: ours
through ``noise=``, diffusers' through ``variance_noise=`` or a patched ``randn_tensor``.

The axes (schedule x spacing x prediction type x options) are crossed in full per scheduler; the step
count (1, 2, 10, 25), eta, Karras sigmas and the other options rotate over the cases, so every value
meets every other axis somewhere without a full product. Plus the "checkable parity facts" of
parity-facts.md, as independent numbers.
"""
import contextlib
import itertools
import types
from unittest import mock

import diffusers
import numpy as np
import pytest
import torch

import npdiffusion.schedulers as ours_mod
from npdiffusion.backend import asarray, to_numpy
from npdiffusion.diffusion import schedules
from npdiffusion.testing import relative_error

# diffusers' own warnings (NumPy 2 __array__ copy keyword; deprecated algorithm types we test on purpose)
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed:FutureWarning")]

SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]
SPACINGS = ["leading", "trailing", "linspace"]
STEPS = [1, 2, 10, 25]
SHAPE = (2, 3, 4, 4)
NOISY = {"DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
         "DPMSolverMultistepScheduler"}


# ------------------------------------------------------------------------------------- dummy models
_FIELD = np.random.default_rng(123).standard_normal((1,) + SHAPE[1:])


def model_scaled(x, t):
    """diffusers' test model: x t / (t + 1)."""
    return (x.astype(np.float64) * t / (t + 1)).astype(x.dtype)


def model_rich(x, t):
    """Smooth in x and t, not proportional to x."""
    x64 = x.astype(np.float64)
    out = 0.7 * np.sin(1.3 * x64 + t / 300.0) + 0.1 * np.cos(3.0 * x64) + 0.3 * _FIELD * (0.5 + t / 1000.0)
    return out.astype(x.dtype)


MODELS = {"scaled": model_scaled, "rich": model_rich}


def variance_channels(out, kind):
    """What a model with a learned variance adds on extra channels."""
    if kind == "learned":
        return (1e-4 + 1e-3 * np.tanh(out) ** 2).astype(out.dtype)
    return np.tanh(out)


# ------------------------------------------------------------------------------------------ harness
def ZSNR_FROM_OURS(betas):  # noqa: N802 - stands in for diffusers' function of that name
    """Our zero-terminal-SNR betas for diffusers too: the rescale's float32 sqrt goes through torch's
    vectorized kernels, which are not correctly rounded, and 1 - abar_t/abar_{t-1} amplifies one ulp
    to ~1e-6 in the betas; tests/test_diffusion_schedules.py bounds the rescale itself. Here the
    samplers should see the same schedule."""
    return torch.from_numpy(schedules.rescale_zero_terminal_snr(betas.numpy()))


def _loop(scheduler, n, *, torch_side, model="rich", step_kwargs=None, dtype=np.float32, seed=0,
          learned_variance=None, perturb=None):
    """One full loop (set_timesteps, scale_model_input, the dummy model, step) on one side.

    Both sides draw the start sample and one standard-normal z per step from the same seeded
    generator, so separate runs of the two sides see the same numbers. ``perturb`` = (site, index,
    delta) scales a sigma or a step's model output by (1 + delta), or adds delta (per element) to a
    step's result (see ``loop_rtol``). Returns a dict of timesteps,
    sigmas, the final sample and the last x0 estimate, or ``failed_at`` (the step index) and ``error``
    if a step raised."""
    step_kwargs = dict(step_kwargs or {})
    scheduler.set_timesteps(n)
    site, index, delta = perturb or (None, None, 0.0)
    if site == "sigmas":
        scheduler.sigmas = scheduler.sigmas.copy()
        scheduler.sigmas[index] = scheduler.sigmas[index] * (1 + delta)
    rng = np.random.default_rng(seed)
    fn = MODELS[model]
    wrap = torch.from_numpy if torch_side else asarray
    unwrap = (lambda a: a.numpy()) if torch_side else to_numpy
    x = wrap(rng.standard_normal(SHAPE).astype(dtype)) * scheduler.init_noise_sigma
    x0 = None
    scales = []
    timesteps = scheduler.timesteps.numpy() if torch_side else scheduler.timesteps
    draws = []

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(draws[-1]).to(dtype)

    with mock.patch(type(scheduler).__module__ + ".randn_tensor", fake_randn, create=True):
        for k, t in enumerate(scheduler.timesteps):
            out = fn(unwrap(scheduler.scale_model_input(x, t)), float(t))
            if learned_variance:  # extra channels: v in [-1, 1] (learned_range) or a variance > 0 (learned)
                out = np.concatenate([out, variance_channels(out, learned_variance)], axis=1)
            if site == "model_output" and index == k:
                out = out * (1 + delta)
            z = rng.standard_normal(SHAPE).astype(dtype)
            draws.append(z)
            kw = dict(step_kwargs)
            if not torch_side and type(scheduler).__name__ in NOISY:
                kw["noise"] = z
            if torch_side and type(scheduler).__name__ in ("DDIMScheduler", "DPMSolverMultistepScheduler"):
                kw["variance_noise"] = torch.from_numpy(z)
            try:
                result = scheduler.step(wrap(out), t, x, **kw)
            except (IndexError, ValueError) as exc:  # compared between the sides by run_pair
                return {"timesteps": timesteps, "failed_at": k, "error": exc}
            x_in, x = x, result.prev_sample
            if getattr(result, "pred_original_sample", None) is not None:
                x0 = unwrap(result.pred_original_sample)
            if not torch_side:  # per element, the largest magnitude through this step, for its rounding
                seen = (x_in, x, out[:, :SHAPE[1]], x0 if x0 is not None else x)
                scales.append(np.max([np.abs(unwrap(a)) for a in seen], axis=0))
            if site == "step_output" and index == k:
                x = x + asarray(delta)
    sigmas = getattr(scheduler, "sigmas", None)
    if torch_side and sigmas is not None:
        sigmas = sigmas.numpy()
    if sigmas is not None:
        sigmas = sigmas.copy()  # not the perturbed table's later edits
    return {"timesteps": timesteps, "sigmas": sigmas, "x": unwrap(x), "x0": x0, "scales": scales}


def run_pair(cls_name, config, n, **kwargs):
    """Run both loops; return (ours, theirs) dicts of timesteps, sigmas, final sample and last x0."""
    module = getattr(diffusers, cls_name).__module__
    with mock.patch(module + ".rescale_zero_terminal_snr", ZSNR_FROM_OURS, create=True):
        theirs = _loop(getattr(diffusers, cls_name)(**config), n, torch_side=True, **kwargs)
    ours = _loop(getattr(ours_mod, cls_name)(**config), n, torch_side=False, **kwargs)
    if "failed_at" in theirs or "failed_at" in ours:
        # diffusers runs off its sigma list (repeated timesteps, e.g. Karras + cosine in DPM) with an
        # IndexError: ours must refuse at the same step, with a ValueError
        assert isinstance(theirs.get("error"), IndexError), theirs.get("error")
        assert isinstance(ours.get("error"), ValueError) and "steps are done" in str(ours["error"]), ours.get("error")
        assert ours["failed_at"] == theirs["failed_at"]
        return dict(ours, failed=True), theirs
    ours["rtol"], ours["float64"] = loop_rtol(cls_name, config, n, ours, **kwargs)
    return ours, theirs


# The error bound of a float32 loop against diffusers', on any IEEE-754 CPU.
#
# Both sides run the same formulas on the same float32 schedule (betas and alphas_cumprod are
# bit-exact: tests/test_diffusion_schedules.py), and their +, -, *, / are correctly rounded. They differ
# in the library functions: torch's float32 sqrt, pow, exp and log are vectorized per CPU (SLEEF, MKL)
# and not correctly rounded (one ulp off on this project's AVX-512 machines; SLEEF documents 1 and 3.5
# ulp bounds), and NumPy's exp and log are not either (its sqrt is). And each side rounds its own
# element-wise arithmetic, in its own order, at the size of the largest values through the step (a
# step can subtract two numbers of size sigma_max to get one of size 1). So the bound lets every
# library call of our loop (each step coefficient, and each sigma of the table the loop reads) and
# each step's model output be off by a relative C_ULPS ulps, and each step's result by C_ULPS ulps of
# the largest magnitude of that element in that step. It pushes each of those quantities alone by 2^-20 (relative, or
# of that magnitude) in a float64 run, scales the change of the result down to C_ULPS ulps (first
# order: the loops are smooth there) and sums the absolute changes per element: the worst case over all
# sign combinations, with the loop's own amplification inside it (1/sqrt(1 - abar) in eps-from-x0
# near t = 0, sigma differences in Euler steps, the 1 - abar_t/abar_prev of DDIM's variance, ...).
# The tolerance is twice that sum (second-order slack) plus each side's final rounding (2u).
U32 = 2.0 ** -24
C_ULPS = 16  # one side: <= 2 calls (or element-wise operations) of <= 4 ulps; twice, for two sides
PUSH = 2.0 ** -20
LIBRARY_FUNCTIONS = ("sqrt", "exp", "log", "power", "expm1", "log1p")
SCHEDULER_MODULES = ["base", "ddim", "ddpm", "pndm", "euler", "euler_ancestral", "heun", "dpm_multistep",
                     "predictions"]


class _CountedLibrary:
    """numpy (or the backend's xp) as the schedulers see it: library-function calls are counted in
    ``counter`` (shared by both views) and the result of call number ``counter.target`` is scaled by
    (1 + counter.delta)."""

    def __init__(self, module, counter):
        self._module, self._counter = module, counter

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if name not in LIBRARY_FUNCTIONS:
            return attr
        counter = self._counter

        def counted(*args, **kwargs):
            out = attr(*args, **kwargs)
            counter.calls += 1
            return out * (1 + counter.delta) if counter.calls - 1 == counter.target else out
        return counted


def _library_patches(counter):
    """mock.patch contexts putting counted views of numpy and xp into every scheduler module."""
    import importlib

    from npdiffusion.backend import xp
    views = {"numpy": _CountedLibrary(np, counter), "xp": _CountedLibrary(xp, counter)}
    modules = [importlib.import_module("npdiffusion.schedulers." + name) for name in SCHEDULER_MODULES]
    return [mock.patch.object(m, attr, view) for m in modules for attr, view in views.items() if hasattr(m, attr)]


def loop_rtol(cls_name, config, n, ours, **kwargs):
    """The tolerance described above, for this loop: relative to max |final sample| (and |last x0|)."""
    kwargs = dict(kwargs, dtype=np.float64)

    def run(perturb=None, call=-1):
        counter = types.SimpleNamespace(calls=0, target=call, delta=-PUSH)
        with contextlib.ExitStack() as stack:
            for patch in _library_patches(counter):
                stack.enter_context(patch)
            out = _loop(getattr(ours_mod, cls_name)(**config), n, torch_side=False, perturb=perturb, **kwargs)
        out["calls"] = counter.calls
        return out

    base = run()
    steps = range(len(base["timesteps"]))
    pushes = [{"perturb": ("model_output", k, -PUSH)} for k in steps]
    pushes += [{"perturb": ("step_output", k, PUSH * scale)} for k, scale in enumerate(base["scales"])]
    pushes += [{"perturb": ("sigmas", i, -PUSH)} for i in range(0 if base["sigmas"] is None else len(base["sigmas"]))]
    pushes += [{"call": i} for i in range(base["calls"])]
    total = {key: None if base[key] is None else np.zeros_like(base[key]) for key in ("x", "x0")}
    for push in pushes:
        pushed = run(**push)
        for key, acc in total.items():
            if acc is not None:
                acc += np.abs(pushed[key] - base[key]) * (C_ULPS * U32 / PUSH)
    bound = {key: None if acc is None else 2 * float(acc.max()) / max(float(np.abs(base[key]).max()), 1e-30)
             + 2 * U32 for key, acc in total.items()}
    return bound, base


def assert_parity_loop(ours, theirs, *, exact_timesteps=True, diffusers_nan=False):
    """``diffusers_nan``: the case is DDIM with eta = 1 on a zero-terminal-SNR schedule, whose first
    step takes sqrt(1 - abar_prev - sigma^2) = sqrt(0): diffusers' float32 pow can round the radicand
    to -1 ulp (it does on AVX-512 CPUs) and return NaN; ours clamps it at 0. Where diffusers gave NaN,
    our float32 loop is held to our float64 loop within the same bound instead."""
    to, tt = ours["timesteps"], theirs["timesteps"]
    assert to.dtype == tt.dtype, (to.dtype, tt.dtype)
    if exact_timesteps:
        assert np.array_equal(to, tt), (to, tt)
    else:
        # timesteps read back from Karras-type sigmas through a log-sigma table built with torch's sqrt
        # and log (<= C_ULPS ulps apart): 1e-6 relative plus interpolation within one table step
        np.testing.assert_allclose(to, tt, rtol=1e-6, atol=1e-4)
    if ours.get("failed"):
        return
    if theirs["sigmas"] is not None:
        # sqrt((1 - abar) / abar) with the quotient correctly rounded on both sides and torch's sqrt
        # (and the interpolation's log/exp) within a few ulps: 1e-6 = 16 u
        assert ours["sigmas"].dtype == np.float32
        np.testing.assert_allclose(ours["sigmas"], theirs["sigmas"], rtol=C_ULPS * U32)
    assert ours["x"].dtype == theirs["x"].dtype
    if diffusers_nan and not np.all(np.isfinite(theirs["x"])):
        theirs = ours["float64"]
    assert np.all(np.isfinite(theirs["x"]))
    err = relative_error(ours["x"], theirs["x"])
    assert err <= ours["rtol"]["x"], f"final sample relative error {err:.2e}, bound {ours['rtol']['x']:.2e}"
    if theirs["x0"] is not None:
        err0 = relative_error(ours["x0"], theirs["x0"])
        assert err0 <= ours["rtol"]["x0"], f"last x0 estimate relative error {err0:.2e}, bound {ours['rtol']['x0']:.2e}"


def rotating(axes, extra):
    """Full product of ``axes``; ``extra`` values (lists) rotate along it with co-prime strides."""
    cases = []
    for i, combo in enumerate(itertools.product(*axes)):
        cases.append(combo + tuple(values[(i * (k + 1) + k) % len(values)] for k, values in enumerate(extra)))
    return cases


def _id(*parts):
    return "-".join(str(p) for p in parts)


# --------------------------------------------------------------------------------------------- DDPM
DDPM_CASES = rotating([SCHEDULES, SPACINGS, ["epsilon", "v_prediction", "sample"]],
                      [STEPS, ["fixed_small", "fixed_large", "fixed_small_log", "learned_range", "learned"],
                       [True, False], ["scaled", "rich"]])


@pytest.mark.parametrize("schedule,spacing,pred,n,variance,clip,model", DDPM_CASES,
                         ids=[_id(*c) for c in DDPM_CASES])
def test_ddpm_loop(schedule, spacing, pred, n, variance, clip, model):
    cfg = dict(beta_schedule=schedule, timestep_spacing=spacing, prediction_type=pred, variance_type=variance,
               clip_sample=clip, steps_offset=1 if spacing == "leading" else 0)
    learned = variance if variance in ("learned", "learned_range") else None
    o, t = run_pair("DDPMScheduler", cfg, n, model=model, learned_variance=learned)
    assert_parity_loop(o, t)


# --------------------------------------------------------------------------------------------- DDIM
DDIM_CASES = rotating([SCHEDULES, SPACINGS, ["epsilon", "v_prediction", "sample"], [0.0, 0.5, 1.0]],
                      [STEPS, [True, False], [True, False], ["rich", "scaled"], [False, False, True]])


@pytest.mark.parametrize("schedule,spacing,pred,eta,n,clip,alpha_one,model,zsnr", DDIM_CASES,
                         ids=[_id(*c) for c in DDIM_CASES])
def test_ddim_loop(schedule, spacing, pred, eta, n, clip, alpha_one, model, zsnr):
    cfg = dict(beta_schedule=schedule, timestep_spacing=spacing, prediction_type=pred, clip_sample=clip,
               set_alpha_to_one=alpha_one, steps_offset=1 if spacing == "leading" else 0,
               rescale_betas_zero_snr=zsnr and pred == "v_prediction")
    o, t = run_pair("DDIMScheduler", cfg, n, model=model, step_kwargs={"eta": eta},
                    dtype=np.float64 if (n == 10 and eta == 0.5) else np.float32)
    assert_parity_loop(o, t, diffusers_nan=eta == 1.0 and cfg["rescale_betas_zero_snr"])


def test_ddim_use_clipped_model_output_and_thresholding():
    for kw, step_kw in [(dict(clip_sample=True), {"eta": 0.3, "use_clipped_model_output": True}),
                        (dict(thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.9), {"eta": 0.0})]:
        o, t = run_pair("DDIMScheduler", kw, 10, step_kwargs=step_kw)
        assert_parity_loop(o, t)


# --------------------------------------------------------------------------------------------- PNDM
PNDM_CASES = rotating([SCHEDULES, SPACINGS, ["epsilon", "v_prediction"], [True, False]],
                      [STEPS, [False, True], ["rich", "scaled"]])


@pytest.mark.parametrize("schedule,spacing,pred,skip_prk,n,alpha_one,model", PNDM_CASES,
                         ids=[_id(*c) for c in PNDM_CASES])
def test_pndm_loop(schedule, spacing, pred, skip_prk, n, alpha_one, model):
    if not skip_prk and n < 4:
        n = 4 + n  # the PRK warm-up needs four timesteps (diffusers fails below that too)
    cfg = dict(beta_schedule=schedule, timestep_spacing=spacing, prediction_type=pred, skip_prk_steps=skip_prk,
               set_alpha_to_one=alpha_one, steps_offset=1 if spacing == "leading" else 0)
    o, t = run_pair("PNDMScheduler", cfg, n, model=model)
    assert_parity_loop(o, t)


def test_pndm_stable_diffusion_config():
    cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
               skip_prk_steps=True, steps_offset=1)
    o, t = run_pair("PNDMScheduler", cfg, 50)
    assert_parity_loop(o, t)


# -------------------------------------------------------------------------------------------- Euler
EULER_CASES = rotating([SCHEDULES, SPACINGS, ["epsilon", "v_prediction", "sample"], [False, True]],
                       [STEPS, ["zero", "sigma_min"], ["rich", "scaled"]])


@pytest.mark.parametrize("schedule,spacing,pred,karras,n,final,model", EULER_CASES,
                         ids=[_id(*c) for c in EULER_CASES])
def test_euler_loop(schedule, spacing, pred, karras, n, final, model):
    cfg = dict(beta_schedule=schedule, timestep_spacing=spacing, prediction_type=pred, use_karras_sigmas=karras,
               final_sigmas_type=final, steps_offset=1 if spacing == "leading" else 0)
    if karras and n == 1:
        n = 2  # diffusers' Karras ramp of one level divides by zero (linspace(0, 1, 1))
    o, t = run_pair("EulerDiscreteScheduler", cfg, n, model=model,
                    dtype=np.float64 if n == 25 and not karras else np.float32)
    assert_parity_loop(o, t, exact_timesteps=not karras)


@pytest.mark.parametrize("case", [
    dict(config=dict(use_exponential_sigmas=True, beta_schedule="scaled_linear"), n=10),
    dict(config=dict(use_beta_sigmas=True), n=10),
    dict(config=dict(interpolation_type="log_linear"), n=10),
    dict(config=dict(timestep_type="continuous", prediction_type="v_prediction"), n=10),
    dict(config=dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"), n=10),
    dict(config=dict(sigma_min=0.1, sigma_max=10.0, use_karras_sigmas=True), n=10),
    dict(config=dict(), n=10, step=dict(s_churn=5.0, s_tmin=0.5, s_tmax=50.0, s_noise=1.003)),
], ids=["exponential", "beta", "log_linear", "continuous", "zero_snr", "karras_minmax", "churn"])
def test_euler_options(case):
    o, t = run_pair("EulerDiscreteScheduler", case["config"], case["n"], step_kwargs=case.get("step"))
    exact = not any(case["config"].get(k) for k in ("use_exponential_sigmas", "use_beta_sigmas",
                                                     "use_karras_sigmas", "interpolation_type", "timestep_type"))
    if case["config"].get("interpolation_type") == "log_linear":
        # diffusers keeps n + 1 sigmas there (plus the final one): a mismatched, ascending list. Both
        # sides agree on it; its "loop" is still well defined over the first n sigmas.
        assert len(o["sigmas"]) == len(t["sigmas"]) == case["n"] + 2
    assert_parity_loop(o, t, exact_timesteps=exact)


# -------------------------------------------------------------------------------- Euler ancestral
EULER_A_CASES = rotating([SCHEDULES, SPACINGS, ["epsilon", "v_prediction"]],
                         [STEPS, ["rich", "scaled"], [False, False, True]])


@pytest.mark.parametrize("schedule,spacing,pred,n,model,zsnr", EULER_A_CASES,
                         ids=[_id(*c) for c in EULER_A_CASES])
def test_euler_ancestral_loop(schedule, spacing, pred, n, model, zsnr):
    cfg = dict(beta_schedule=schedule, timestep_spacing=spacing, prediction_type=pred,
               steps_offset=1 if spacing == "leading" else 0, rescale_betas_zero_snr=zsnr)
    o, t = run_pair("EulerAncestralDiscreteScheduler", cfg, n, model=model,
                    dtype=np.float64 if n == 2 else np.float32)
    assert_parity_loop(o, t)


# --------------------------------------------------------------------------------------------- Heun
HEUN_CASES = rotating([SCHEDULES, SPACINGS, ["epsilon", "v_prediction", "sample"], [False, True]],
                      [STEPS, [False, True], ["rich", "scaled"]])


@pytest.mark.parametrize("schedule,spacing,pred,karras,n,clip,model", HEUN_CASES,
                         ids=[_id(*c) for c in HEUN_CASES])
def test_heun_loop(schedule, spacing, pred, karras, n, clip, model):
    cfg = dict(beta_schedule=schedule, timestep_spacing=spacing, prediction_type=pred, use_karras_sigmas=karras,
               clip_sample=clip, steps_offset=1 if spacing == "leading" else 0)
    if karras and n == 1:
        n = 2
    o, t = run_pair("HeunDiscreteScheduler", cfg, n, model=model)
    assert_parity_loop(o, t, exact_timesteps=not karras)


# ---------------------------------------------------------------------------------------------- DPM
DPM_CASES = rotating([SCHEDULES, SPACINGS, ["epsilon", "v_prediction", "sample"], [False, True]],
                     [STEPS, ["zero", "sigma_min"], [True, False], ["rich", "scaled"]])


@pytest.mark.parametrize("schedule,spacing,pred,karras,n,final,lower_final,model", DPM_CASES,
                         ids=[_id(*c) for c in DPM_CASES])
def test_dpm_solver_pp_2m_loop(schedule, spacing, pred, karras, n, final, lower_final, model):
    """The default DPM-Solver++(2M), midpoint, across schedules, spacings, predictions and Karras sigmas."""
    cfg = dict(beta_schedule=schedule, timestep_spacing=spacing, prediction_type=pred, use_karras_sigmas=karras,
               final_sigmas_type=final, lower_order_final=lower_final,
               steps_offset=1 if spacing == "leading" else 0)
    if karras and n == 1:
        n = 2
    o, t = run_pair("DPMSolverMultistepScheduler", cfg, n, model=model,
                    dtype=np.float64 if n == 10 and not karras else np.float32)
    assert_parity_loop(o, t)


DPM_VARIANTS = [(a, s, k) for a in ["dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver"]
                for s in ["midpoint", "heun"] for k in [1, 2, 3] if not (a == "sde-dpmsolver" and k == 3)]


@pytest.mark.parametrize("algorithm,solver,order", DPM_VARIANTS, ids=[_id(*v) for v in DPM_VARIANTS])
def test_dpm_solver_variants(algorithm, solver, order):
    cfg = dict(algorithm_type=algorithm, solver_type=solver, solver_order=order, beta_schedule="scaled_linear",
               beta_start=0.00085, beta_end=0.012, lower_order_final=order != 2,
               final_sigmas_type="zero" if algorithm.endswith("++") else "sigma_min")
    o, t = run_pair("DPMSolverMultistepScheduler", cfg, 25 if order == 3 else 10)
    assert_parity_loop(o, t)


@pytest.mark.parametrize("config", [
    dict(use_lu_lambdas=True), dict(euler_at_final=True, lower_order_final=False, final_sigmas_type="sigma_min"),
    dict(thresholding=True, sample_max_value=2.0, prediction_type="sample"),
    dict(use_exponential_sigmas=True), dict(lambda_min_clipped=-5.1, beta_schedule="squaredcos_cap_v2"),
    dict(variance_type="learned_range"), dict(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                              prediction_type="v_prediction"),
    dict(use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2"),
], ids=["lu", "euler_at_final", "thresholding", "exponential", "lambda_clip", "learned_range", "zero_snr",
        "karras_cosine"])
def test_dpm_solver_options(config):
    o, t = run_pair("DPMSolverMultistepScheduler", config, 15,
                    learned_variance=config.get("variance_type"))
    assert_parity_loop(o, t)


# ---------------------------------------------------------------------------- same loop on a backend
BACKEND_CASES = [("DDPMScheduler", {}, {}), ("DDIMScheduler", {}, {"eta": 0.5}),
                 ("PNDMScheduler", dict(skip_prk_steps=True), {}), ("EulerDiscreteScheduler", {}, {}),
                 ("EulerAncestralDiscreteScheduler", {}, {}), ("HeunDiscreteScheduler", {}, {}),
                 ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), {}),
                 ("DDPMScheduler", dict(thresholding=True, variance_type="learned_range"), {})]


@pytest.mark.parametrize("name,config,step", BACKEND_CASES, ids=[c[0] + str(i) for i, c in enumerate(BACKEND_CASES)])
def test_loop_on_each_backend(backend, name, config, step):
    """The sample math runs on the active backend (CuPy on a GPU) and still matches diffusers."""
    o, t = run_pair(name, config, 10, step_kwargs=step, learned_variance=config.get("variance_type"))
    assert_parity_loop(o, t)


# -------------------------------------------------------------------------------- parity-facts.md
def dummy_sample_deter():
    """diffusers' test sample: arange(768) as (C, H, W, B) / 768, permuted to (B, C, H, W)."""
    return (np.arange(768).reshape(3, 8, 8, 4) / 768).transpose(3, 0, 1, 2).astype(np.float32)


def test_fact_ddim_full_loop():
    s = ours_mod.DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                               clip_sample=True)
    s.set_timesteps(10)
    x = asarray(dummy_sample_deter())
    for t in s.timesteps:
        x = s.step(model_scaled(to_numpy(x), float(t)), t, x, eta=0.0).prev_sample
    x = to_numpy(x)
    assert abs(np.abs(x).sum() - 172.0067) < 1e-2
    assert abs(np.abs(x).mean() - 0.223967) < 1e-3
    assert abs(s._get_variance(487, 486) - 0.00979) < 1e-5
    assert abs(s._get_variance(999, 998) - 0.02) < 1e-5
    assert abs(s._get_variance(420, 400) - 0.14771) < 1e-5 and abs(s._get_variance(980, 960) - 0.32460) < 1e-5


def test_fact_euler_full_loop():
    s = ours_mod.EulerDiscreteScheduler(num_train_timesteps=1100, beta_start=0.0001, beta_end=0.02,
                                        beta_schedule="linear")
    s.set_timesteps(10)
    x = dummy_sample_deter() * s.init_noise_sigma
    for t in s.timesteps:
        x = s.scale_model_input(x, t)
        x = s.step(model_scaled(x, float(t)), t, x).prev_sample
    assert abs(np.abs(x).sum() - 10.0807) < 1e-2
    assert abs(np.abs(x).mean() - 0.0131) < 1e-3


def test_fact_dpm_solver_pp_full_loop():
    s = ours_mod.DPMSolverMultistepScheduler(lower_order_final=False, final_sigmas_type="sigma_min")
    s.set_timesteps(10)
    x = dummy_sample_deter()
    for t in s.timesteps:
        x = s.step(model_scaled(x, float(t)), t, x).prev_sample
    assert abs(np.abs(x).mean() - 0.3301) < 1e-3


def test_fact_timestep_lists_and_sd_euler_start():
    sd = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ddim = ours_mod.DDIMScheduler(steps_offset=1, **sd)
    ddim.set_timesteps(50)
    assert ddim.timesteps.dtype == np.int64 and ddim.timesteps.tolist() == list(range(981, 0, -20))
    lin = ours_mod.DDIMScheduler(timestep_spacing="linspace", **sd)
    lin.set_timesteps(50)
    assert lin.timesteps[:3].tolist() == [999, 979, 958]
    trail = ours_mod.DDIMScheduler(timestep_spacing="trailing", **sd)
    trail.set_timesteps(50)
    assert trail.timesteps.tolist() == list(range(999, 0, -20))
    dpm = ours_mod.DPMSolverMultistepScheduler(timestep_spacing="leading", steps_offset=1, **sd)
    dpm.set_timesteps(25)
    assert dpm.timesteps.tolist() == list(range(951, 38, -38))
    euler = ours_mod.EulerDiscreteScheduler(timestep_spacing="leading", steps_offset=1, **sd)
    euler.set_timesteps(50)
    assert euler.timesteps[0] == 981.0 and euler.timesteps.dtype == np.float32
    assert abs(euler.sigmas[0] - 13.1204) < 1e-4
    assert abs(euler.init_noise_sigma - 13.1585) < 1e-4
