"""Host synchronizations of one U-Net forward and backward on the CuPy stand-in, counted by call site.

The U-Net has the benchmark's layout (tools/bench_unet.py: three levels, CrossAttnDownBlock2D x2 +
DownBlock2D, two layers per block) at toy widths; the counts depend on the layout, not the widths.
Issue #18 wants 0 per forward; today the forward waits for the device 123 times (docs/gpu.md, "The
CuPy stand-in"). When a change moves these numbers, update them here and there.
"""
from collections import Counter

import numpy as np
import pytest

from npdiffusion import cupy_standin
from npdiffusion.backend import asarray, get_backend, set_backend
from npdiffusion.models.unet import UNet2DConditionModel

BENCH_LAYOUT = dict(
    block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=8, attention_head_dim=2, in_channels=4, out_channels=4, sample_size=8)

# (kind, file) -> count, for one forward: GroupNorm/LayerNorm's two-pass-variance check
# `bool(bad.any())` in each of the 79 norm calls, the attention score bound `float(q2) * float(k2)`
# in each of the 22 attention calls.
FORWARD_SYNCS = {("bool", "npdiffusion/ops/norm.py"): 79, ("float", "npdiffusion/ops/attention.py"): 44}
BACKWARD_SYNCS = {}


@pytest.fixture
def unet_on_standin():
    previous = get_backend()
    with cupy_standin.installed():
        set_backend("cupy")
        try:
            rng = np.random.default_rng(0)
            model = UNet2DConditionModel(**BENCH_LAYOUT)
            x = asarray(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
            ctx = asarray(rng.standard_normal((2, 5, 8)).astype(np.float32))
            yield model, x, ctx
        finally:
            set_backend(previous)


def by_kind_and_file(log):
    return dict(Counter((kind, site.split(":")[0]) for kind, site in log.events))


def test_unet_forward_and_backward_host_synchronizations(unet_on_standin):
    model, x, ctx = unet_on_standin
    with cupy_standin.count_syncs() as forward:
        y = model(x, np.array([10, 500]), ctx)
    with cupy_standin.count_syncs() as backward:
        model.backward(asarray(np.ones(y.shape, dtype=np.float32)))
    assert by_kind_and_file(forward) == FORWARD_SYNCS, forward.report()
    assert forward.total == 123
    assert by_kind_and_file(backward) == BACKWARD_SYNCS, backward.report()
