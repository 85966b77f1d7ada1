"""Noise schedules (npdiffusion/diffusion/schedules.py) against torch and diffusers, bit for bit.

Oracles: ``torch.linspace``/``torch.cumprod`` in float32 and the betas, alphas_cumprod and sigmas that
diffusers' schedulers build; diffusers' ``rescale_zero_terminal_snr``, ``_convert_to_karras`` and
``_sigma_to_t``; the SD values listed in parity-facts.md.

Two results of torch depend on the machine, and the tests say which one they expect:
* ``torch.linspace`` float32 on the CPU uses fused multiply-add in its AVX2/AVX-512 kernels and not
  in its DEFAULT kernel (``linspace_float32(fused=...)`` covers both; the in-process test picks the
  one torch is using, and a subprocess checks the other with ``ATEN_CPU_CAPABILITY=default``);
* torch's float32 ``sqrt`` and ``pow`` are not correctly rounded on every CPU (one ulp off on ~0.6%
  of inputs on AVX-512 machines, whatever ``ATEN_CPU_CAPABILITY`` says), while NumPy's ``sqrt`` is
  (IEEE 754 requires it of the instruction every CPU has). So our sigmas are checked bit for bit
  against the correctly rounded value computed in float64, and against diffusers within
  ``LIBRARY_ULPS`` ulps; the zero-terminal-SNR rescale, which amplifies that ulp through
  1 - abar_t/abar_{t-1}, within the error bound derived in ``rescale_bound``.
"""
import inspect
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler as TorchDDPM
from diffusers import EulerDiscreteScheduler as TorchEuler
from diffusers import HeunDiscreteScheduler as TorchHeun
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as torch_rescale
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.diffusion import schedules as S

# diffusers' own warnings (NumPy 2 __array__ copy keyword; deprecated algorithm types we test on purpose)
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed:FutureWarning")]

X86 = platform.machine().lower() in ("x86_64", "amd64")
# torch's vectorized x86 kernels (AVX2/AVX-512) fuse the multiply-add of linspace; its DEFAULT kernel does not
FUSED = torch.backends.cpu.get_cpu_capability() != "DEFAULT" if X86 else np.array_equal(
    torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32).numpy(), S.linspace_float32(1e-4, 0.02, 1000, fused=True))
SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]


# a float32 library function (torch's sqrt/pow, SLEEF, MKL) is within 4 ulps of the exact result
# (SLEEF documents 1 and 3.5 ulps); two of them, on the two sides: 8
LIBRARY_ULPS = 8
U32 = 2.0 ** -24


def correctly_rounded_sigmas(ac):
    """sqrt((1 - a) / a) rounded once to float32 from float64 (the quotient is the float32 one, as
    both sides compute it; float64 sqrt of a float32 number rounds to float32 correctly)."""
    q = (np.float32(1) - ac) / ac
    return np.sqrt(q.astype(np.float64)).astype(np.float32)


def rescale_bound(betas, ulps=LIBRARY_ULPS):
    """Per-entry bound on |ours - diffusers'| for ``rescale_zero_terminal_snr(betas)``.

    With r_t = sqrt(abar_t) off by at most ``ulps`` ulps, r'_t = (r_t - r_T) k (k = r_0 / (r_0 - r_T))
    is off by e_t <= k (r_t + r_T) ulps u + r'_t ulps u (the shift and the scale's own rounding);
    alpha'_t = (r'_t / r'_{t-1})^2 then has relative error <= 2 (e_t / r'_t + e_{t-1} / r'_{t-1}), and
    beta'_t = 1 - alpha'_t an absolute error alpha'_t times that, plus its own rounding. Near the end
    r'_t is small (the shift cancels), which is where the bound, like the difference, grows.
    The last entry is exact on both sides (r_T - r_T = 0, beta' = 1)."""
    a = S.alphas_cumprod(betas).astype(np.float64)
    r = np.sqrt(a)
    k = r[0] / (r[0] - r[-1])
    rp = (r - r[-1]) * k
    e = k * (r + r[-1]) * ulps * U32 + rp * ulps * U32
    safe = np.where(rp > 0, rp, np.inf)
    alpha = np.concatenate([rp[:1] ** 2, (rp[1:] / rp[:-1]) ** 2])
    rel = np.concatenate([2 * e[:1] / rp[:1], 2 * (e[1:] / safe[1:] + e[:-1] / rp[:-1])])
    return alpha * rel + ulps * U32


def ulps(a, b):
    """Largest distance in float32 ulps between two float32 arrays."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    return int(np.max(np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64)), initial=0))


# ------------------------------------------------------------------------------------- linspace
@given(start=st.floats(-10, 10, allow_subnormal=False), end=st.floats(-10, 10, allow_subnormal=False),
       steps=st.integers(0, 3000))
def test_linspace_float32_equals_torch(start, end, steps):
    ours = S.linspace_float32(start, end, steps, fused=FUSED)
    theirs = torch.linspace(start, end, steps, dtype=torch.float32).numpy()
    assert ours.dtype == np.float32 and np.array_equal(ours, theirs)


def test_linspace_float32_equals_torch_on_many_ranges():
    rng = np.random.default_rng(0)
    cases = [(1e-4, 0.02, 1000), (0.00085 ** 0.5, 0.012 ** 0.5, 1000), (1e-4, 0.02, 1100), (-6, 6, 1000)]
    for _ in range(400):
        a, b = rng.uniform(-1, 1, 2) * 10.0 ** rng.uniform(-5, 2, 2)
        cases.append((float(a), float(b), int(rng.integers(1, 5000))))
    for start, end, steps in cases:
        theirs = torch.linspace(start, end, steps, dtype=torch.float32).numpy()
        assert np.array_equal(S.linspace_float32(start, end, steps, fused=FUSED), theirs), (start, end, steps)


def test_np_linspace_is_not_torch_linspace():
    """The trap this module exists for: float64 linspace rounded once differs from torch's float32 recipe."""
    root = (0.00085 ** 0.5, 0.012 ** 0.5, 1000)
    naive = np.linspace(*root).astype(np.float32)
    exact = torch.linspace(*root, dtype=torch.float32).numpy()
    assert not np.array_equal(naive, exact)
    assert ulps(naive, exact) >= 1
    assert np.array_equal(S.linspace_float32(*root, fused=FUSED), exact)


def test_fused_and_unfused_linspace_differ_by_at_most_one_ulp():
    for steps in (10, 1000, 1100):
        a = S.linspace_float32(1e-4, 0.02, steps, fused=True)
        b = S.linspace_float32(1e-4, 0.02, steps, fused=False)
        assert ulps(a, b) <= 1
        assert a[0] == b[0] == np.float32(1e-4) and a[-1] == b[-1] == np.float32(0.02)


# --------------------------------------------------------------------------------- betas, cumprod
@given(schedule=st.sampled_from(SCHEDULES), T=st.sampled_from([1, 2, 7, 50, 1000, 1100]),
       beta_start=st.sampled_from([1e-4, 0.00085, 0.001]), beta_end=st.sampled_from([0.012, 0.02, 0.03]))
def test_betas_and_alphas_cumprod_equal_diffusers(schedule, T, beta_start, beta_end):
    theirs = TorchDDPM(num_train_timesteps=T, beta_start=beta_start, beta_end=beta_end, beta_schedule=schedule)
    betas = S.betas_for(schedule, T, beta_start, beta_end)
    if FUSED:
        assert np.array_equal(betas, theirs.betas.numpy())
    # fused or not, linspace differs by <= 1 ulp (one rounding fewer); squaring (scaled_linear) doubles
    # that relative difference and adds its own rounding: <= 3 ulps
    assert ulps(betas, theirs.betas.numpy()) <= (3 if schedule == "scaled_linear" else 1)
    # alphas_cumprod of the very same betas is bit-exact whatever the kernel
    ac = S.alphas_cumprod(theirs.betas.numpy())
    assert ac.dtype == np.float32 and np.array_equal(ac, theirs.alphas_cumprod.numpy())


def test_alphas_cumprod_equals_torch_cumprod():
    rng = np.random.default_rng(1)
    for _ in range(20):
        betas = rng.uniform(1e-5, 0.05, int(rng.integers(1, 3000))).astype(np.float32)
        expected = torch.cumprod(1.0 - torch.from_numpy(betas), dim=0).numpy()
        assert np.array_equal(S.alphas_cumprod(betas), expected)
    # a float32 running product would not do: torch accumulates in double
    betas = S.betas_for("linear", 1000)
    running = np.cumprod((np.float32(1) - betas).astype(np.float32), dtype=np.float32)
    assert not np.array_equal(running, S.alphas_cumprod(betas))


@pytest.mark.parametrize("schedule", ["exp", "laplace", "sigmoid"])
def test_other_beta_schedules(schedule):
    if schedule == "exp":
        theirs = TorchHeun(beta_schedule="exp").betas.numpy()
        assert np.array_equal(S.betas_for("exp", 1000), theirs)
    else:
        theirs = TorchDDPM(beta_schedule=schedule).betas.numpy()
        ours = S.betas_for(schedule, 1000, 1e-4, 0.02)
        # laplace is bit-exact (Python doubles); sigmoid goes through torch's vectorized exp
        assert ulps(ours, theirs) <= (0 if schedule == "laplace" else 8)


def test_squaredcos_is_capped_and_matches_the_formula():
    betas = S.betas_for("squaredcos_cap_v2", 1000)
    assert betas.max() == np.float32(0.999)

    def abar(t):
        return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2

    i = np.arange(999)
    np.testing.assert_allclose(betas[:999], 1 - abar((i + 1) / 1000) / abar(i / 1000), rtol=1e-6)


# ------------------------------------------------------------------------------ snr, sigmas, rescale
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_sigmas_snr_and_rescale_within_their_bounds_of_diffusers(schedule):
    theirs = TorchEuler(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012)
    ac = theirs.alphas_cumprod.numpy()
    sig = S.sigmas_from_alphas_cumprod(ac)
    assert np.array_equal(sig, correctly_rounded_sigmas(ac))
    assert ulps(sig, (((1 - theirs.alphas_cumprod) / theirs.alphas_cumprod) ** 0.5).numpy()) <= LIBRARY_ULPS
    np.testing.assert_allclose(S.snr(ac), ac.astype(np.float64) / (1 - ac.astype(np.float64)), rtol=1e-6)
    np.testing.assert_allclose(sig.astype(np.float64) ** -2, S.snr(ac), rtol=1e-5)
    betas = theirs.betas.numpy()
    rescaled = S.rescale_zero_terminal_snr(betas)
    theirs_rescaled = torch_rescale(torch.from_numpy(betas)).numpy()
    # a few-ulp sqrt difference is amplified by 1 - abar_t/abar_{t-1}: the bound derived above
    bound = rescale_bound(betas)
    assert np.all(np.abs(rescaled.astype(np.float64) - theirs_rescaled) <= bound)
    assert rescale_bound(betas, ulps=1).max() < 1e-4  # the bound is not vacuous: betas' size is 1e-3..1
    # zero terminal SNR, first abar unchanged
    rac = S.alphas_cumprod(rescaled)
    assert rescaled[-1] == 1.0 and rac[-1] == 0.0
    assert abs(rac[0] - ac[0]) <= 2e-7


def test_sd_schedule_facts():
    """parity-facts.md: the SD scaled_linear values."""
    ac = S.alphas_cumprod(S.betas_for("scaled_linear", 1000, 0.00085, 0.012))
    sig = S.sigmas_from_alphas_cumprod(ac)
    assert abs(ac[0] - 0.99915) < 1e-7
    assert abs(ac[999] - 0.0046601) < 1e-7
    assert abs(sig.max() - 14.6146) < 1e-4
    # parity-facts.md lists 0.0291672; diffusers 0.42 itself gives 0.02916753 (checked against the oracle)
    assert abs(sig.min() - 0.0291675) < 1e-7
    theirs = TorchEuler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).sigmas[:-1].min().item()
    assert abs(sig.min() - theirs) <= LIBRARY_ULPS * U32 * theirs  # torch's sqrt: not correctly rounded


def test_karras_sigmas_equal_diffusers():
    euler = TorchEuler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for n in (1, 2, 10, 25, 50):
        in_sigmas = np.linspace(14.6146, 0.0292, n)
        theirs = euler._convert_to_karras(in_sigmas=in_sigmas, num_inference_steps=n)
        ours = S.karras_sigmas(0.0292, 14.6146, n)
        assert np.array_equal(ours, theirs)
    ks = S.karras_sigmas(0.1, 10.0, 5, rho=7.0)
    assert ks[0] == pytest.approx(10.0, rel=1e-14) and ks[-1] == pytest.approx(0.1, rel=1e-14)
    assert np.all(np.diff(ks) < 0)
    # rho = 1 is a plain linear ramp
    np.testing.assert_allclose(S.karras_sigmas(1.0, 3.0, 3, rho=1.0), [3.0, 2.0, 1.0], rtol=1e-14)


def test_exponential_and_beta_sigmas_equal_diffusers():
    euler = TorchEuler()
    in_sigmas = np.array([14.6, 3.0, 0.03])
    for n in (2, 10):
        assert np.array_equal(S.exponential_sigmas(0.03, 14.6, n),
                              euler._convert_to_exponential(in_sigmas=in_sigmas, num_inference_steps=n))
        assert np.array_equal(S.beta_sigmas(0.03, 14.6, n),
                              euler._convert_to_beta(in_sigmas=in_sigmas, num_inference_steps=n))


def test_sigma_to_t_equals_diffusers_and_inverts_the_schedule():
    euler = TorchEuler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    log_sigmas = np.log((((1 - euler.alphas_cumprod) / euler.alphas_cumprod) ** 0.5).numpy())
    probe = np.concatenate([np.exp(log_sigmas[[0, 5, 500, 999]]), [1e-3, 0.5, 3.3, 20.0]])
    theirs = np.array([euler._sigma_to_t(s, log_sigmas) for s in probe])
    assert np.array_equal(S.sigma_to_t(probe, log_sigmas), theirs)
    np.testing.assert_allclose(S.sigma_to_t(np.exp(log_sigmas[[0, 5, 500, 999]]), log_sigmas),
                               [0, 5, 500, 999], atol=1e-6)


@pytest.mark.skipif(not X86, reason="checks torch's x86 DEFAULT kernel against its vectorized ones, a choice only x86 has")
def test_against_torch_default_kernel():
    """In a fresh process with torch's DEFAULT kernels, betas (unfused linspace: multiply and add) and
    alphas_cumprod (a product in double) are bit-exact, as their operations are correctly rounded
    everywhere. Sigmas and diffusers' own ``rescale_zero_terminal_snr`` (its source, run there without
    importing diffusers) go through torch's sqrt, which is not correctly rounded on every CPU even
    there: ours are the correctly rounded sigmas, theirs within their bounds."""
    script = inspect.getsource(torch_rescale) + r"""
import json, torch
out = {"capability": torch.backends.cpu.get_cpu_capability(), "cases": []}
for sch in ["linear", "scaled_linear"]:
    for T in [10, 1000, 1100]:
        if sch == "linear":
            betas = torch.linspace(0.00085, 0.012, T, dtype=torch.float32)
        else:
            betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float32) ** 2
        ac = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - ac) / ac) ** 0.5
        out["cases"].append([sch, T, betas.tolist(), ac.tolist(), sigmas.tolist(),
                             rescale_zero_terminal_snr(betas).tolist()])
print(json.dumps(out))
"""
    script = "import torch\n" + script
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert data["capability"] == "DEFAULT"
    for sch, T, betas, ac, sigmas, rescaled in data["cases"]:
        if sch == "linear":
            ours = S.linspace_float32(0.00085, 0.012, T, fused=False)
        else:
            ours = S.linspace_float32(0.00085 ** 0.5, 0.012 ** 0.5, T, fused=False) ** 2
        f32 = np.float32
        assert np.array_equal(ours, np.array(betas, dtype=f32)), (sch, T)
        assert np.array_equal(S.alphas_cumprod(ours), np.array(ac, dtype=f32)), (sch, T)
        sig = S.sigmas_from_alphas_cumprod(S.alphas_cumprod(ours))
        assert np.array_equal(sig, correctly_rounded_sigmas(S.alphas_cumprod(ours))), (sch, T)
        assert ulps(sig, np.array(sigmas, dtype=f32)) <= LIBRARY_ULPS, (sch, T)
        diff = np.abs(S.rescale_zero_terminal_snr(ours).astype(np.float64) - np.array(rescaled, dtype=f32))
        assert np.all(diff <= rescale_bound(ours)), (sch, T)


# -------------------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"beta_schedule must be one of .* got 'cosine'"):
        S.betas_for("cosine", 1000)
    with pytest.raises(ValueError, match="num_train_timesteps must be a positive int, got 0"):
        S.betas_for("linear", 0)
    with pytest.raises(TypeError, match="beta_start must be a real number, got str"):
        S.betas_for("linear", 10, "0.1", 0.2)
    with pytest.raises(ValueError, match="alpha_transform_type must be one of"):
        S.betas_for_alpha_bar(10, alpha_transform_type="quadratic")
    with pytest.raises(ValueError, match=r"betas must be a non-empty 1-d array of reals, got shape \(2, 2\)"):
        S.alphas_cumprod(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        S.karras_sigmas(0.1, 10, 0)
