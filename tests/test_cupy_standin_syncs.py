"""No host synchronization inside a forward or backward of the U-Net, the VAE and CLIP's text
model on CuPy, at most one per training step of each stage and one per denoising iteration of
sampling (issue #18), counted on the CuPy stand-in by call site; and the audit table of
docs/gpu.md is what tools/gpu_audit.py writes.

On CuPy the group/layer norm takes the two-pass variance for every row (ops/norm.py, `_moments`),
the attention always subtracts the row maximum (ops/attention.py, `_small_scores`), and token ids
are range-checked on the host before they move (nn/embedding.py); on NumPy these checks stay, so
NumPy's numbers are unchanged. The U-Net has the benchmark's layout (tools/bench_unet.py: three
levels, CrossAttnDownBlock2D x2 + DownBlock2D, two layers per block) at toy widths; the counts
depend on the layout, not the widths (npdiffusion/cupy_standin/audit.py builds them). docs/gpu.md, "The CuPy stand-in".
"""
import os

import pytest

from npdiffusion import cupy_standin
from npdiffusion.cupy_standin import audit


@pytest.fixture
def standin():
    with audit.on_standin():
        yield


@pytest.mark.parametrize("part", list(audit.MODELS), ids=["unet", "vae", "clip-text"])
def test_forward_and_backward_do_not_wait_for_the_device(standin, part):
    fwd, bwd = audit.forward_backward_syncs(audit.MODELS[part])
    assert fwd.total == 0, fwd.report()
    assert bwd.total == 0, bwd.report()


def test_the_counter_sees_a_synchronization(standin):
    """The zero counts above mean something: a float() of a device array is counted."""
    from npdiffusion.backend import xp

    with cupy_standin.count_syncs() as log:
        float(xp.ones(3).sum())
    assert log.total == 1


# ---------------------------------------------------------------- training and sampling steps
# One read per training step (training/loop.py: the loss, the stage's metrics and the gradient norm,
# copied to the host together) and one per denoising iteration (pipelines/nonfinite.py: the
# latents' isfinite flag); measured by npdiffusion/cupy_standin/audit.py, as docs/gpu.md's table.

LOOP_SITE = "npdiffusion/training/loop.py"


@pytest.fixture(scope="module")
def demo_dir(quick_demo_model):
    return os.path.dirname(quick_demo_model)


@pytest.mark.parametrize("stage", audit.STAGES)
def test_one_sync_per_training_step(stage, demo_dir):
    with audit.on_standin():
        logs = audit.training_step_syncs(stage, demo_dir, steps=3)
    for log in logs:                                   # the first step too
        assert log.total <= 1, log.report()
        assert all(site.startswith(LOOP_SITE) for _, site in log.events), log.report()
    assert sum(log.total for log in logs) >= 1         # the loss is read: the counter sees the device


@pytest.mark.parametrize("stage", audit.STAGES)
def test_fp16_training_steps_read_the_device_once(stage, demo_dir):
    """The issue allows two with fp16 (the loss and the loss scaler's finiteness flag): the flag is
    read from the master gradients' norm, in the same read as the loss. (A small initial scale, so no
    step overflows: a skipped step also names its non-finite gradients, one read each.)"""
    with audit.on_standin():
        logs = audit.training_step_syncs(stage, demo_dir, steps=3, mixed_precision="fp16", loss_scale_init=16.0)
    for log in logs:
        assert log.total <= 1, log.report()
        assert all(site.startswith(LOOP_SITE) for _, site in log.events), log.report()


def test_one_sync_per_denoising_iteration(demo_dir):
    from npdiffusion.pipelines.stable_diffusion import StableDiffusionPipeline

    with audit.on_standin():
        pipe = StableDiffusionPipeline.from_pretrained(f"{demo_dir}/model")
        for name in audit.SCHEDULERS:
            per, once, log = audit.sampling_per_iteration(pipe, name)
            assert per == 1, (name, log.report())          # the isfinite check of pipelines/nonfinite.py
            assert once <= 1, (name, log.report())         # the decoded image, read once
            assert {s.split(":")[0] for _, s in log.events} <= {"npdiffusion/pipelines/nonfinite.py",
                                                                "npdiffusion/pipelines/stable_diffusion.py"}


def test_the_audit_table_in_docs_is_current(demo_dir):
    """docs/gpu.md's table between the gpu_audit markers is what `python tools/gpu_audit.py` writes."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("gpu_audit", os.path.join(root, "tools", "gpu_audit.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with open(tool.DOC, encoding="utf-8") as f:
        text = f.read()
    table = audit.markdown(audit.audit(demo_dir))
    assert tool.replace_table(text, table) == text, f"run python tools/gpu_audit.py; the table now:\n{table}"


def test_to_host_floats_reads_every_device_value_at_once(standin):
    """backend.to_host_floats: the training loop's one read; exact floats, host values untouched."""
    import numpy as np

    from npdiffusion.backend import asarray, to_host_floats

    values = [asarray(np.float32(1.1)), 2.5, np.float16(0.1), asarray(np.array([np.nan], np.float16)),
              asarray(np.float32(3e38)) * 10, np.array(3.0)]
    with cupy_standin.count_syncs() as log:
        got = to_host_floats(values)
    assert log.total == 1
    want = [float(np.float32(1.1)), 2.5, float(np.float16(0.1)), float("nan"), float("inf"), 3.0]
    np.testing.assert_array_equal(got, want)
    with cupy_standin.count_syncs() as log:
        assert to_host_floats([1.0, np.float32(2.0)]) == [1.0, 2.0]
    assert log.total == 0
