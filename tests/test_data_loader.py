"""DataLoader: seeded epoch permutations, drop_last, resumable state (also with batches prefetched), the
prefetch thread running ahead in the background, errors from the thread, bad states."""
import threading
import time

import numpy as np
import pytest

from npdiffusion.data.dataset import ArrayDataset, to_model_input
from npdiffusion.data.loader import DataLoader


def numbered(n, size=4):
    """Image i is filled with the value i (mod 256), so a batch tells which images it holds."""
    images = np.broadcast_to((np.arange(n) % 256).astype(np.uint8)[:, None, None, None], (n, size, size, 3)).copy()
    return ArrayDataset(images, [f"caption {i}" for i in range(n)], name="numbered")


def take(loader, k):
    return [next(loader) for _ in range(k)]


def test_each_epoch_is_a_seeded_permutation_in_full_batches():
    loader = DataLoader(numbered(23), batch_size=5, seed=1, prefetch=0)
    assert loader.steps_per_epoch == 4
    epochs = []
    for _ in range(3):
        batches = take(loader, 4)
        idx = np.concatenate([b.indices for b in batches])
        assert len(set(idx.tolist())) == 20                            # drop_last: 3 images wait for next epoch
        epochs.append(idx)
        for b in batches:
            assert b.captions == [f"caption {i}" for i in b.indices]
            assert np.array_equal(b.images, to_model_input(numbered(23).get_images(b.indices)))
            assert b.images.shape == (5, 3, 4, 4) and b.images.dtype == np.float32
    assert not np.array_equal(epochs[0], epochs[1])
    assert np.array_equal(np.concatenate([b.indices for b in take(DataLoader(numbered(23), 5, seed=1), 4)]),
                          epochs[0])
    assert not np.array_equal(np.concatenate([b.indices for b in take(DataLoader(numbered(23), 5, seed=2), 4)]),
                              epochs[0])


def test_images_are_scaled_to_minus_one_one_like_torchvision_normalize():
    b = next(DataLoader(numbered(256, 2), 256, shuffle=False, prefetch=0))
    values = b.images[:, 0, 0, 0].astype(np.float64)
    assert values[0] == -1.0 and values[255] == 1.0
    assert np.allclose(values, (np.arange(256) / 255.0 - 0.5) / 0.5, atol=1e-6)


def test_no_shuffle_visits_in_order():
    loader = DataLoader(numbered(10), 3, shuffle=False, prefetch=1)
    assert [b.indices.tolist() for b in take(loader, 4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 2]]
    loader.close()


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_prefetch_never_changes_the_batches(prefetch):
    ref = take(DataLoader(numbered(30), 4, seed=5, prefetch=0), 20)
    got = take(DataLoader(numbered(30), 4, seed=5, prefetch=prefetch), 20)
    for a, b in zip(ref, got):
        assert np.array_equal(a.indices, b.indices) and np.array_equal(a.images, b.images)
        assert (a.epoch, a.position) == (b.epoch, b.position)


@pytest.mark.parametrize("k", [0, 3, 7, 8, 13])
def test_state_dict_resumes_exactly_even_with_batches_prefetched(k):
    loader = DataLoader(numbered(33), 4, seed=9, prefetch=3)
    take(loader, k)
    time.sleep(0.01)                      # let the thread run ahead: the state must not count its batches
    state = loader.state_dict()
    assert (state["epoch"], state["position"]) == divmod(k, 8)
    after = take(loader, 12)
    fresh = DataLoader(numbered(33), 4, seed=123, prefetch=0)            # other seed: the state decides
    fresh.load_state_dict(state)
    for a, b in zip(after, take(fresh, 12)):
        assert np.array_equal(a.indices, b.indices)
    loader.close()


def test_saved_order_is_used_as_is():
    loader = DataLoader(numbered(12), 3, seed=0, prefetch=0)
    state = loader.state_dict()
    state["order"] = np.arange(12)[::-1].copy()
    state["position"] = 1
    loader.load_state_dict(state)
    assert next(loader).indices.tolist() == [8, 7, 6]


def test_prefetch_thread_prepares_the_next_batch_in_the_background():
    class Recording(ArrayDataset):
        def __init__(self):
            base = numbered(40)
            super().__init__(base.images, base.captions)
            self.calls = []

        def get_images(self, indices):
            self.calls.append((threading.current_thread().name, indices.tolist()))
            return super().get_images(indices)

    ds = Recording()
    loader = DataLoader(ds, 4, seed=0, prefetch=2)
    first = next(loader)
    deadline = time.monotonic() + 10
    while len(ds.calls) < 3 and time.monotonic() < deadline:        # batches 2 and 3 without asking
        time.sleep(0.005)
    assert len(ds.calls) >= 3
    assert {name for name, _ in ds.calls} == {"npdiffusion-prefetch"}
    second = next(loader)
    assert ds.calls[0][1] == first.indices.tolist() and ds.calls[1][1] == second.indices.tolist()
    thread = loader._thread
    loader.close()
    assert not thread.is_alive()
    third = next(loader)                                             # restarts at the right place
    assert third.position == 2 and third.indices.tolist() == ds.calls[2][1]
    loader.close()


def test_an_abandoned_loader_stops_its_thread():
    import gc

    loader = DataLoader(numbered(20), 2, prefetch=2)
    next(loader)
    thread = loader._thread
    del loader
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_an_error_in_the_thread_is_raised_by_next():
    class Broken(ArrayDataset):
        def get_images(self, indices):
            if 3 in indices.tolist():
                raise OSError("disk on fire")
            return super().get_images(indices)

    base = numbered(8)
    loader = DataLoader(Broken(base.images, base.captions), 2, shuffle=False, prefetch=2)
    assert next(loader).indices.tolist() == [0, 1]
    with pytest.raises(OSError, match="disk on fire"):
        next(loader)
    assert loader._thread is None


@pytest.mark.parametrize("kwargs,match", [
    ({"batch_size": 11}, "the dataset has 10 images, fewer than batch_size 11"),
    ({"batch_size": 0}, "batch_size must be a positive int, got 0"),
    ({"batch_size": 2, "seed": -1}, "seed must be a non-negative int, got -1"),
    ({"batch_size": 2, "prefetch": -1}, "prefetch must be an int >= 0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataLoader(numbered(10), **kwargs)


def test_bad_states():
    loader = DataLoader(numbered(10), 2, prefetch=0)
    good = loader.state_dict()
    for change, match in [({"num_images": 11}, "made on a dataset of 11 images, this one has 10"),
                          ({"batch_size": 5}, "used batch_size 5, this run uses 2"),
                          ({"order": np.zeros(10, np.int64)}, "not a permutation"),
                          ({"position": 5}, "position 5 of epoch 0 is out of range")]:
        with pytest.raises(ValueError, match=match):
            loader.load_state_dict({**good, **change})
    with pytest.raises(ValueError, match="the state has no 'order'"):
        loader.load_state_dict({k: v for k, v in good.items() if k != "order"})
