"""CLIP's contrastive loss over the global batch of N ranks (npdiffusion/distributed/global_contrastive.py),
in one process: N ranks are N threads around a communicator whose collectives meet at a barrier.
Checked in float64 against one process's loss on the whole batch (contrastive.py: the loss, both
embeddings' gradients, logit_scale's), by central differences through the gathers, and with the
single-process communicator (whose all-gather is the identity). The 2-rank training run itself is in
tests/test_distributed.py (mpiexec)."""
import threading

import numpy as np
import pytest

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.distributed import Communicator, SingleProcess
from npdiffusion.distributed.global_contrastive import (
    global_contrastive_loss_backward,
    global_contrastive_loss_forward,
)
from npdiffusion.models.clip.contrastive import contrastive_loss_backward, contrastive_loss_forward
from npdiffusion.testing import gradcheck_op, noncontiguous, relative_error


class ThreadRank(Communicator):
    """Rank ``rank`` of ``size`` threads sharing ``slots`` and a ``threading.Barrier``; host buffers."""

    name = "threads"

    def __init__(self, rank, size, slots, barrier):
        self.rank, self.size, self.slots, self.barrier = rank, size, slots, barrier

    def _exchange(self, buf):
        self.slots[self.rank] = np.array(buf, copy=True)
        self.barrier.wait()
        everyone = list(self.slots)
        self.barrier.wait()                      # nobody overwrites a slot before all have read it
        return everyone

    def allgather(self, x):
        return np.concatenate(self._exchange(x))

    def allreduce_sum_(self, buf):
        parts = self._exchange(buf)
        total = parts[0].copy()
        for p in parts[1:]:
            total += p
        buf[...] = total

    def broadcast_(self, buf, root=0):
        buf[...] = self._exchange(buf)[root]

    def barrier(self):
        self.barrier.wait()


def on_ranks(n, work):
    """``work(comm)`` on n threaded ranks; returns their results in rank order."""
    slots, barrier = [None] * n, threading.Barrier(n, timeout=30)
    results, errors = [None] * n, []

    def run(rank):
        try:
            results[rank] = work(ThreadRank(rank, n, slots, barrier))
        except BaseException as exc:             # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def unit_rows(rng, n, e):
    x = rng.standard_normal((n, e))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def gathered(t, v, scale, n, dloss=1.0):
    """The N-rank loss and gradients: mean of the loss_r, rows of dt and dv stacked in rank order
    (each rank's own rows), dlogit_scale summed over the ranks."""
    b = t.shape[0] // n

    def work(comm):
        rows = slice(comm.rank * b, (comm.rank + 1) * b)
        loss, cache = global_contrastive_loss_forward(t[rows], v[rows], scale, comm)
        return (loss,) + global_contrastive_loss_backward(dloss, cache)

    out = on_ranks(n, work)
    return (sum(to_numpy(o[0]) for o in out) / n, np.concatenate([to_numpy(o[1]) for o in out]),
            np.concatenate([to_numpy(o[2]) for o in out]), sum(to_numpy(o[3]) for o in out))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_n_ranks_give_one_process_loss_and_gradients(backend, n):
    """Rank r's gradient rows are its share of the objective sum_r loss_r = N L: divided by N (the
    trainer's average) they are one process's gradient of L on the whole batch of 6 pairs."""
    rng = np.random.default_rng(n)
    t, v = asarray(unit_rows(rng, 6, 4)), asarray(unit_rows(rng, 6, 4))
    scale = asarray(np.asarray(1.3))
    (loss, _), cache = contrastive_loss_forward(t, v, scale)
    dt, dv, ds = contrastive_loss_backward(0.7, cache)
    got = gathered(t, v, scale, n, dloss=0.7)
    # float64, sums of at most 6 x 4 products per entry: the only difference is summation order
    assert relative_error(got[0], loss) < 1e-13
    for ours, theirs in zip(got[1:], (dt, dv, ds)):
        assert relative_error(ours / n, theirs) < 1e-12


def test_single_process_communicator_gives_the_model_loss():
    rng = np.random.default_rng(0)
    t, v, scale = unit_rows(rng, 5, 3), unit_rows(rng, 5, 3), np.asarray(0.4)
    loss, cache = global_contrastive_loss_forward(t, v, scale, SingleProcess())
    (want, _), want_cache = contrastive_loss_forward(t, v, scale)
    assert relative_error(loss, want) < 1e-13
    for ours, theirs in zip(global_contrastive_loss_backward(1.0, cache), contrastive_loss_backward(1.0, want_cache)):
        assert relative_error(ours, theirs) < 1e-12


def test_gathered_loss_gradcheck_on_two_threaded_ranks():
    """Central differences of sum_r loss_r (through both all-gathers) in every text and image row
    and in logit_scale, against the stacked per-rank gradients; non-contiguous inputs."""
    rng = np.random.default_rng(5)
    t, v = noncontiguous(unit_rows(rng, 4, 3)), noncontiguous(unit_rows(rng, 4, 3))

    def forward(t, v, scale):
        loss = gathered(t, v, scale, 2)[0] * 2                  # sum_r loss_r
        return np.asarray(loss), None

    def backward(dy, _):
        return gathered(t, v, s, 2, dloss=float(dy))[1:]

    s = np.asarray(0.8)
    report = gradcheck_op(forward, backward, [t, v, s], full_max=30)
    assert report.passed, report
    assert set(report.errors) == {"input[0]", "input[1]", "input[2]"}


def test_float16_embeddings_are_computed_in_float32_and_cast_back():
    rng = np.random.default_rng(2)
    t, v = unit_rows(rng, 4, 3), unit_rows(rng, 4, 3)
    low = on_ranks(2, lambda comm: global_contrastive_loss_backward(
        1.0, global_contrastive_loss_forward(t[2 * comm.rank:2 * comm.rank + 2].astype(np.float16),
                                             v[2 * comm.rank:2 * comm.rank + 2].astype(np.float16),
                                             np.asarray(1.0, np.float16), comm)[1]))
    assert {g.dtype for r in low for g in r} == {np.dtype(np.float16)}
    want = gathered(t.astype(np.float16).astype(np.float64), v.astype(np.float16).astype(np.float64),
                    np.asarray(1.0), 2)
    # float32 arithmetic on float16-exact inputs, then one rounding to float16 (relative 2^-11)
    assert relative_error(np.concatenate([r[0] for r in low]).astype(np.float64), want[1]) < 2e-3


def test_mismatched_embeddings_are_refused():
    with pytest.raises(ValueError, match="text_embeds and image_embeds must both be"):
        global_contrastive_loss_forward(np.ones((2, 3)), np.ones((3, 3)), np.asarray(0.0), SingleProcess())
