"""The CuPy stand-in (npdiffusion/cupy_standin) keeps CuPy's rules: no implicit conversion, no
host/device mixing, 0-d reductions, explicit transfers, and it logs every host synchronization."""
import copy
import pickle

import numpy as np
import pytest

from npdiffusion import cupy_standin


@pytest.fixture
def cupy():
    with cupy_standin.installed() as module:
        yield module


def test_install_makes_import_cupy_give_the_stand_in_and_uninstall_restores():
    import sys

    before = {name: sys.modules.get(name) for name in cupy_standin.MODULES}
    with cupy_standin.installed() as module:
        import cupy
        import cupyx.scipy.special

        assert cupy is module and cupy_standin.is_installed()
        assert cupyx.scipy.special.expit is cupy_standin.cupyx.scipy.special.expit
    assert {name: sys.modules.get(name) for name in cupy_standin.MODULES} == before


def test_numpy_asarray_of_a_device_array_is_refused(cupy):
    dev = cupy.asarray(np.ones((2, 3)))
    for convert in (np.asarray, np.array, lambda a: np.testing.assert_allclose(a, 1.0)):
        with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
            convert(dev)


@pytest.mark.parametrize("mix", [
    lambda d, h: d + h, lambda d, h: h + d, lambda d, h: d * h, lambda d, h: h - d,
    lambda d, h: d @ h.T, lambda d, h: np.add(h, d), lambda d, h: d.__iadd__(h),
], ids=["dev+host", "host+dev", "dev*host", "host-dev", "dev@host", "numpy.add", "dev+=host"])
def test_a_host_array_in_an_operator_or_ufunc_is_refused(cupy, mix):
    dev = cupy.asarray(np.ones((2, 3)))
    with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
        mix(dev, np.ones((2, 3)))


def test_functions_refuse_host_arrays_but_take_scalars(cupy):
    dev = cupy.asarray(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="Unsupported type"):
        cupy.where(dev > 0, dev, np.zeros((2, 3)))
    with pytest.raises(TypeError, match="Unsupported type"):
        cupy.concatenate([dev, np.ones((2, 3))])
    out = dev * np.float32(2.0) + 1.0
    assert isinstance(out, cupy.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out.get(), 3.0)


def test_reductions_and_scalar_indexing_give_0d_device_arrays(cupy):
    dev = cupy.asarray(np.arange(6.0).reshape(2, 3))
    for value in (dev.sum(), cupy.max(dev), np.mean(dev), dev[1, 2], dev.any()):
        assert isinstance(value, cupy.ndarray) and value.shape == ()


def test_numpy_functions_dispatch_to_the_device(cupy):
    dev = cupy.asarray(np.arange(6.0).reshape(2, 3))
    assert isinstance(np.concatenate([dev, dev]), cupy.ndarray)
    assert isinstance(np.exp(dev), cupy.ndarray)


def test_host_index_arrays_are_accepted_host_values_are_not(cupy):
    dev = cupy.asarray(np.arange(6.0))
    np.testing.assert_array_equal(dev[np.array([0, 5])].get(), [0.0, 5.0])
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray"):
        dev[:2] = np.ones(2)
    dev[:2] = cupy.asarray(np.ones(2))
    dev[2] = np.float64(7.0)
    np.testing.assert_array_equal(dev.get(), [1, 1, 7, 3, 4, 5])


def test_transfers_copy(cupy):
    host = np.zeros(3)
    dev = cupy.asarray(host)
    dev += 1.0
    assert host.sum() == 0.0
    back = cupy.asnumpy(dev)
    back[0] = 5.0
    np.testing.assert_array_equal(dev.get(), 1.0)
    assert cupy.asnumpy(host) is host


def test_every_host_synchronization_is_logged_at_its_call_site(cupy):
    from npdiffusion.backend import to_numpy

    dev = cupy.asarray(np.arange(4.0))
    with cupy_standin.count_syncs() as log:
        dev.get()
        cupy.asnumpy(dev)
        float(dev.max())
        int(dev[1])
        bool(dev.any())
        dev.sum().item()
        dev.tolist()
        to_numpy(dev)
        [0, 1, 2][cupy.asarray(np.array(2))]
    assert log.by_kind() == {"get": 2, "asnumpy": 1, "float": 1, "int": 1, "bool": 1, "item": 1,
                             "tolist": 1, "index": 1}
    assert all(site.startswith("tests/test_cupy_standin.py:") for site in log.by_site())
    with cupy_standin.count_syncs() as quiet:
        y = (dev * 2.0).sum() + dev.mean()
        assert isinstance(y, cupy.ndarray)
    assert quiet.total == 0


def test_names_outside_cupy_are_refused(cupy):
    dev = cupy.asarray(np.ones(2))
    with pytest.raises(AttributeError, match="has no attribute 'add_docstring'"):
        cupy.add_docstring
    with pytest.raises(AttributeError, match="does not implement cupy.random"):
        cupy.random
    with pytest.raises(AttributeError, match="has no attribute 'dumps_numpy'"):
        dev.dumps_numpy
    with pytest.raises(AttributeError, match="has no attribute 'tofile2'"):
        cupy.add.tofile2


def test_copies_and_pickles_stay_on_the_device(cupy):
    dev = cupy.asarray(np.arange(3.0))
    for other in (copy.copy(dev), copy.deepcopy(dev), pickle.loads(pickle.dumps(dev))):
        assert isinstance(other, cupy.ndarray)
        np.testing.assert_array_equal(other.get(), [0.0, 1.0, 2.0])


def test_inf_and_nan_come_without_warnings_as_in_cupy(cupy):
    import warnings

    dev = cupy.asarray(np.array([0.0, 1.0, -1.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = cupy.log(dev) + 1.0 / dev + (dev * 1e308 * 10).sum()
    assert not np.isfinite(out.get()).any()
