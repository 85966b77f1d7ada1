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
import itertools
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
RTOL = 1e-5


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
    """Our zero-terminal-SNR betas for diffusers too: the rescale's float32 sqrt goes through MKL, which
    on AVX-512 machines is one ulp off on some inputs, and 1 - abar_t/abar_{t-1} amplifies that to
    ~1e-6 in the betas; tests/test_diffusion_schedules.py checks the rescale itself (bit-exact on
    correctly rounded kernels). Here the samplers should see the same schedule."""
    return torch.from_numpy(schedules.rescale_zero_terminal_snr(betas.numpy()))


def run_pair(cls_name, config, n, *, model="rich", step_kwargs=None, dtype=np.float32, seed=0,
             learned_variance=None):
    """Run both loops; return (ours, theirs) dicts of timesteps, sigmas, final sample and last x0."""
    step_kwargs = dict(step_kwargs or {})
    ours = getattr(ours_mod, cls_name)(**config)
    module = getattr(diffusers, cls_name).__module__
    with mock.patch(module + ".rescale_zero_terminal_snr", ZSNR_FROM_OURS, create=True):
        theirs = getattr(diffusers, cls_name)(**config)
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    rng = np.random.default_rng(seed)
    fn = MODELS[model]
    x = rng.standard_normal(SHAPE).astype(dtype)
    xo = asarray(x) * ours.init_noise_sigma
    xt = torch.from_numpy(x) * theirs.init_noise_sigma
    draws = []

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(draws[-1]).to(dtype)

    x0_o = x0_t = None
    with mock.patch(type(theirs).__module__ + ".randn_tensor", fake_randn, create=True):
        for t_o, t_t in zip(ours.timesteps, theirs.timesteps):
            in_o = ours.scale_model_input(xo, t_o)
            in_t = theirs.scale_model_input(xt, t_t)
            out_o = fn(to_numpy(in_o), float(t_o))
            out_t = fn(in_t.numpy(), float(t_t))
            if learned_variance:  # extra channels: v in [-1, 1] (learned_range) or a variance > 0 (learned)
                out_o = np.concatenate([out_o, variance_channels(out_o, learned_variance)], axis=1)
                out_t = np.concatenate([out_t, variance_channels(out_t, learned_variance)], axis=1)
            z = rng.standard_normal(SHAPE).astype(dtype)
            draws.append(z)
            kw_o, kw_t = dict(step_kwargs), dict(step_kwargs)
            if cls_name in NOISY:
                kw_o["noise"] = z
            if cls_name in ("DDIMScheduler", "DPMSolverMultistepScheduler"):
                kw_t["variance_noise"] = torch.from_numpy(z)
            try:
                rt = theirs.step(torch.from_numpy(out_t), t_t, xt, **kw_t)
            except IndexError:
                # diffusers runs off its sigma list (repeated timesteps, e.g. Karras + cosine in DPM):
                # ours must refuse at the same step, with a ValueError
                with pytest.raises(ValueError, match="steps are done"):
                    ours.step(asarray(out_o), t_o, xo, **kw_o)
                return ({"timesteps": ours.timesteps, "failed": True}, {"timesteps": theirs.timesteps.numpy()})
            ro = ours.step(asarray(out_o), t_o, xo, **kw_o)
            xo, xt = ro.prev_sample, rt.prev_sample
            if getattr(rt, "pred_original_sample", None) is not None:
                x0_o, x0_t = to_numpy(ro.pred_original_sample), rt.pred_original_sample.numpy()
    sig_t = getattr(theirs, "sigmas", None)
    return ({"timesteps": ours.timesteps, "sigmas": getattr(ours, "sigmas", None), "x": to_numpy(xo), "x0": x0_o},
            {"timesteps": theirs.timesteps.numpy(), "sigmas": None if sig_t is None else sig_t.numpy(),
             "x": xt.numpy(), "x0": x0_t})


def assert_parity_loop(ours, theirs, *, exact_timesteps=True, rtol=RTOL):
    to, tt = ours["timesteps"], theirs["timesteps"]
    assert to.dtype == tt.dtype, (to.dtype, tt.dtype)
    if exact_timesteps:
        assert np.array_equal(to, tt), (to, tt)
    else:
        np.testing.assert_allclose(to, tt, rtol=1e-6, atol=1e-4)
    if ours.get("failed"):
        return
    if theirs["sigmas"] is not None:
        assert ours["sigmas"].dtype == np.float32
        np.testing.assert_allclose(ours["sigmas"], theirs["sigmas"], rtol=1e-6)
    assert ours["x"].dtype == theirs["x"].dtype
    assert np.all(np.isfinite(theirs["x"]))
    err = relative_error(ours["x"], theirs["x"])
    assert err <= rtol, f"final sample relative error {err:.2e}"
    if theirs["x0"] is not None:
        err0 = relative_error(ours["x0"], theirs["x0"])
        assert err0 <= rtol, f"last x0 estimate relative error {err0:.2e}"


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
    assert_parity_loop(o, t)


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
