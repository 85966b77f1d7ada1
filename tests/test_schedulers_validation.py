"""Every scheduler refuses the calls it cannot mean, with a ValueError naming the argument (issue #17, point 5).

Shapes, timesteps (in [0, T), whole where they index the training schedule, one of the schedule's
where the scheduler looks them up), set_timesteps before step, num_inference_steps in [1, T], custom
timesteps/sigmas lists, add_noise timesteps per batch item. Valid calls are covered (numbers
against diffusers) by test_schedulers_parity.py and test_schedulers_api.py.
"""
import numpy as np
import pytest

import npdiffusion.schedulers as S

CLASSES = ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
           "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler"]
# the schedulers that look the timestep up in .timesteps (DDIM takes any t in [0, T): its stride is fixed)
LOOKUP = [n for n in CLASSES if n != "DDIMScheduler"]
CUSTOM_TIMESTEPS = ["DDPMScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler"]
T = 1000

X = np.zeros((1, 4, 8, 8), np.float32)


def ready(name, n=10, **config):
    s = getattr(S, name)(**config)
    s.set_timesteps(n)
    return s


def as_schedule_dtype(s, t):
    """``t`` in the dtype of the scheduler's timesteps (float for Euler/Heun, int for the others)."""
    return np.asarray(t).astype(s.timesteps.dtype)[()]


def step(s, model_output, t, sample):
    noise = {"noise": np.zeros(sample.shape, np.float32)} if isinstance(
        s, (S.DDPMScheduler, S.EulerAncestralDiscreteScheduler)) else {}
    return s.step(model_output, t, sample, **noise)


# ------------------------------------------------------------------------------------------- step
@pytest.mark.parametrize("name", CLASSES)
def test_model_output_shape_must_match_sample(name):
    s = ready(name)
    expected = r"model_output must have the shape of sample \(1, 4, 8, 8\), got \(1, 1, 8, 8\)"
    with pytest.raises(ValueError, match=expected):
        step(s, np.zeros((1, 1, 8, 8), np.float32), s.timesteps[0], X)


#: each entry point that takes a timestep: how to call it with t, and the start of its error
TIMESTEP_CALLS = {
    "step": (lambda s, t: step(s, X, as_schedule_dtype(s, t), X), r"\.step: timestep"),
    "scale_model_input": (lambda s, t: s.scale_model_input(X, as_schedule_dtype(s, t)),
                          r"\.scale_model_input: timestep"),
    "add_noise": (lambda s, t: s.add_noise(X, X, np.array([t]).astype(s.timesteps.dtype)),
                  r"\.add_noise: timesteps? .*(must lie in|is not one of)"),
}


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("t", [-1, T, 5000])
@pytest.mark.parametrize("method", sorted(TIMESTEP_CALLS))
def test_timesteps_outside_the_training_range_are_refused(name, t, method):
    call, match = TIMESTEP_CALLS[method]
    s = ready(name)
    with pytest.raises(ValueError, match=match):
        call(s, t)


@pytest.mark.parametrize("name", LOOKUP)
def test_step_refuses_a_timestep_not_in_the_schedule(name):
    s = ready(name)
    t = as_schedule_dtype(s, 3)
    assert t not in s.timesteps
    with pytest.raises(ValueError, match=r"timestep 3(\.0)? is not one of the scheduler's timesteps"):
        step(s, X, t, X)


def test_ddim_steps_from_any_timestep_in_range():
    """DDIM's step t -> t - T // N needs no lookup, so an in-range t off the schedule is a valid call."""
    s = ready("DDIMScheduler")
    assert 3 not in s.timesteps
    assert step(s, X, 3, X).prev_sample.shape == X.shape


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler"])
def test_integer_schedulers_refuse_fractional_timesteps(name):
    s = ready(name)
    with pytest.raises(ValueError, match=r"\.step: timestep must be a whole number .* got 900\.5"):
        step(s, X, 900.5, X)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                  "HeunDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_later_steps_check_the_timestep_too(name):
    """After the first call fixes the step index, a garbage timestep is still refused, not ignored."""
    s = ready(name)
    s.scale_model_input(X, s.timesteps[0])
    step(s, X, s.timesteps[0], X)
    with pytest.raises(ValueError, match="timestep 5000(\\.0)? is not one of the scheduler's timesteps"):
        step(s, X, as_schedule_dtype(s, 5000), X)


@pytest.mark.parametrize("name", [n for n in CLASSES if n != "DDPMScheduler"])
def test_step_before_set_timesteps_is_refused(name):
    s = getattr(S, name)()
    t = s.timesteps[0] if s.timesteps is not None else 999  # PNDM has no timesteps before set_timesteps
    with pytest.raises(ValueError, match=r"\.step: call set_timesteps\(num_inference_steps\) first"):
        step(s, X, t, X)


def test_ddpm_steps_the_full_chain_without_set_timesteps():
    """DDPM's default schedule is the full T-step chain (t -> t - 1), as diffusers: no set_timesteps needed."""
    s = S.DDPMScheduler()
    assert s.previous_timestep(999) == 998
    assert step(s, X, 999, X).prev_sample.shape == X.shape


def test_pndm_second_plms_step_must_repeat_one_stride_below():
    s = ready("PNDMScheduler", skip_prk_steps=True)
    first = s.timesteps[0]
    step(s, X, first, X)
    with pytest.raises(ValueError, match="second PLMS step must get the timestep one stride"):
        step(s, X, first, X)


def test_learned_variance_outputs_keep_their_extra_channels():
    """DDPM learned_range and DPM-Solver learned variance take model outputs with 2C channels, as diffusers."""
    x = np.zeros((1, 3, 8, 8), np.float32)
    ddpm = ready("DDPMScheduler", variance_type="learned_range")
    assert step(ddpm, np.zeros((1, 6, 8, 8), np.float32), ddpm.timesteps[0], x).prev_sample.shape == x.shape
    dpm = ready("DPMSolverMultistepScheduler", variance_type="learned_range")
    assert step(dpm, np.zeros((1, 6, 8, 8), np.float32), dpm.timesteps[0], x).prev_sample.shape == x.shape
    with pytest.raises(ValueError, match=r"model_output\[:, :3\] must have the shape of sample"):
        step(dpm, np.zeros((1, 1, 8, 8), np.float32), dpm.timesteps[1], x)


# ----------------------------------------------------------------------------------- add_noise
@pytest.mark.parametrize("name", CLASSES)
def test_add_noise_takes_one_timestep_per_item_or_one_for_all(name):
    s = ready(name)
    x = np.zeros((2, 4, 8, 8), np.float32)
    assert s.add_noise(x, x, s.timesteps[:1]).shape == x.shape
    assert s.add_noise(x, x, s.timesteps[:2]).shape == x.shape
    with pytest.raises(ValueError, match=r"\.add_noise: timesteps must have 1 or 2 entries .* got 3"):
        s.add_noise(x, x, s.timesteps[:3])


# ------------------------------------------------------------------------------ set_timesteps
@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("n,expected", [(0, "a positive int, got 0"), (-3, "a positive int, got -3"),
                                        (T + 1, r"<= num_train_timesteps \(1000\), got 1001"),
                                        (2.5, "a positive int, got 2.5"), (10.0, "a positive int, got 10.0"),
                                        ("10", "a positive int, got '10'")])
def test_set_timesteps_takes_a_positive_int_up_to_T(name, n, expected):
    s = getattr(S, name)()
    with pytest.raises(ValueError, match=r"\.set_timesteps: num_inference_steps must be " + expected):
        s.set_timesteps(n)


@pytest.mark.parametrize("name", CUSTOM_TIMESTEPS)
@pytest.mark.parametrize("bad,expected", [([], "must be a non-empty 1-d list"),
                                          ([[900, 100]], "must be a non-empty 1-d list"),
                                          ([5000, 10], r"must lie in \[0, 999\]"),
                                          ([900, -1], r"must lie in \[0, 999\]"),
                                          ([900, float("nan")], r"must lie in \[0, 999\]")])
def test_custom_timesteps_are_checked(name, bad, expected):
    s = getattr(S, name)()
    with pytest.raises(ValueError, match=r"\.set_timesteps: timesteps " + expected):
        s.set_timesteps(timesteps=bad)


def test_integer_custom_timesteps_must_be_whole_and_ddpm_descending():
    with pytest.raises(ValueError, match="timesteps must be whole numbers, got"):
        S.DPMSolverMultistepScheduler().set_timesteps(timesteps=[900.5, 100])
    with pytest.raises(ValueError, match="custom timesteps must be strictly descending"):
        S.DDPMScheduler().set_timesteps(timesteps=[100, 900])


@pytest.mark.parametrize("bad,expected", [([1.0], "a 1-d list of at least 2 numbers"),
                                          ([3.0, -1.0, 0.0], "finite and >= 0"),
                                          ([float("inf"), 0.0], "finite and >= 0")])
def test_custom_sigmas_are_checked(bad, expected):
    with pytest.raises(ValueError, match=r"EulerDiscreteScheduler\.set_timesteps: sigmas must be " + expected):
        S.EulerDiscreteScheduler().set_timesteps(sigmas=bad)
