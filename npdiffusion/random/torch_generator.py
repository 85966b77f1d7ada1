"""torch's CPU random stream in NumPy, bit for bit: ``torch.randn`` / ``torch.rand`` with a seeded
``torch.Generator()``, without torch.

Why: the Stable Diffusion pipelines draw their initial latents (and scheduler noise) with
``torch.randn(shape, generator=torch.Generator().manual_seed(seed))``. Reproducing a seed's image
therefore needs the same numbers, not just the same distribution. How torch makes them, and the
choices below, are explained in docs/random.md.

Shapes: a draw of shape S returns a NumPy array of shape S holding N = prod(S) values in C order.
Names in the code: ``u`` uniforms, ``u1``/``u2`` the two uniforms of a Box-Muller pair, ``r`` the
radius sqrt(-2 log u1), ``theta`` the angle 2 pi u2; arrays of pairs have shape (B, 8) (B blocks of
16 values, the first 8 cosines and the last 8 sines of each block).

What is reproduced (checked against torch 2.13 in tests/test_random_torch.py):

* the engine: mt19937 seeded from the low 32 bits of the seed, as ``at::mt19937``;
* uniforms: float from ``random() & (2^24 - 1)``, double from the low 53 bits of
  ``random64() = random() << 32 | random()``;
* ``randn`` with N >= 16: all N float (or double) uniforms, Box-Muller on each block of 16, and when
  16 does not divide N, 16 fresh uniforms for the last 16 values (float16 draws its uniforms block
  by block, so it skips the N mod 16 spare ones, and casts the float32 normals). float32 uses
  torch's AVX2 kernel (``NormalFill16<float>`` with avx_mathfun's ``log256_ps`` and
  ``sincos256_ps``, compiled with fused multiply-adds), which x86-64 torch runs on every AVX2 or
  AVX-512 CPU. float64 runs the scalar kernel on the C library's ``log``, ``cos``, ``sin``, called
  here through Python's ``math`` module (the same libm torch calls);
* ``randn`` with N < 16: the double-precision Box-Muller of ``at::normal_distribution<double>``,
  including the spare sample the generator caches for the next small draw;
* consecutive calls on one ``TorchGenerator`` continue the stream as calls on one torch generator.

torch's DEFAULT (non-AVX2) CPU kernel, used on x86 CPUs without AVX2 and on ARM, computes float32
Box-Muller with the C library's ``logf``/``cosf``/``sinf``: ``kernel="scalar"`` calls those through
ctypes, so it matches torch running on the same machine. Not reproduced: CUDA generators (Philox).
See docs/random.md.
"""
from __future__ import annotations

import math
import operator

import numpy

from npdiffusion.checks import check_dtype

__all__ = ["TorchGenerator", "torch_randn", "torch_rand", "randn_tensor", "DEFAULT_SEED"]

DEFAULT_SEED = 67280421310721  # at::default_rng_seed_val: the seed of a fresh torch.Generator()

_MT_N = 624
_MATRIX_A = numpy.uint32(0x9908B0DF)
_UPPER = numpy.uint32(0x80000000)
_LOWER = numpy.uint32(0x7FFFFFFF)
_U32 = numpy.uint32

# torch's CPUGeneratorImplState (get_state's bytes): the legacy THGeneratorState, then the float cache.
_TORCH_STATE = numpy.dtype({
    "names": ["seed", "left", "seeded", "next", "state", "normal_x", "normal_y", "normal_rho",
              "normal_is_valid", "next_float", "next_float_valid"],
    "formats": ["<u8", "<i4", "<i4", "<u8", ("<u8", (624,)), "<f8", "<f8", "<f8", "<i4", "<f4", "u1"],
    "offsets": [0, 8, 12, 16, 24, 5016, 5024, 5032, 5040, 5048, 5052],
    "itemsize": 5056,
})

_DTYPES = {"float16": numpy.float16, "float32": numpy.float32, "float64": numpy.float64}


# --------------------------------------------------------------------------------------------- mt19937
def _seeded_state(seed: int) -> numpy.ndarray:
    """The 624 words of ``at::mt19937::init_with_uint32`` (only the low 32 bits of the seed count)."""
    words = [seed & 0xFFFFFFFF]
    x = words[0]
    for j in range(1, _MT_N):
        x = (1812433253 * (x ^ (x >> 30)) + j) & 0xFFFFFFFF
        words.append(x)
    return numpy.array(words, dtype=numpy.uint32)


def _twist_pairs(u, v):
    """mt19937's twist(u, v) on arrays: (upper bit of u | lower 31 bits of v) >> 1, xor A if v odd."""
    y = (u & _UPPER) | (v & _LOWER)
    out = y >> _U32(1)
    out ^= _MATRIX_A * (v & _U32(1))
    return out


def _next_state(p: numpy.ndarray) -> None:
    """``at::mt19937::next_state`` in place, vectorized in four slices.

    The reference loop runs i = 0..623 and writes p[i] = p[i + 397 mod 624] ^ twist(p[i], p[i+1]).
    For i < 227 the word p[i + 397] is still old, so one slice does them all; for i >= 227 it reads
    p[i - 227], which the previous slices already rewrote: i in [227, 454) reads [0, 227),
    i in [454, 623) reads [227, 396), and i = 623 pairs with the new p[0].
    """
    p[0:227] = p[397:624] ^ _twist_pairs(p[0:227], p[1:228])
    p[227:454] = p[0:227] ^ _twist_pairs(p[227:454], p[228:455])
    p[454:623] = p[227:396] ^ _twist_pairs(p[454:623], p[455:624])
    p[623:624] = p[396:397] ^ _twist_pairs(p[623:624], p[0:1])


def _temper(y: numpy.ndarray) -> numpy.ndarray:
    """mt19937's output tempering, on a whole array at once (returns a new array)."""
    y = y ^ (y >> _U32(11))
    y ^= (y << _U32(7)) & _U32(0x9D2C5680)
    y ^= (y << _U32(15)) & _U32(0xEFC60000)
    y ^= y >> _U32(18)
    return y


# ------------------------------------------------- float32 arithmetic of torch's AVX2 Box-Muller kernel
_F = numpy.float32
_INF = numpy.float64(numpy.inf)


def _fma32(a, b, c):
    """Correctly rounded float32 fused multiply-add a*b + c, as the vfmadd instructions compute it.

    a*b is exact in float64 (24 + 24 bits), so s = p + c rounded to float64 is the only rounding
    before the final one to float32. That double rounding can differ from a single rounding only
    when s lands exactly on a float32 midpoint (its low 29 significand bits are 1 followed by
    zeros); there the exact sum's side of s (the TwoSum error) decides, so s is moved one float64
    ulp towards it before rounding.
    """
    p = numpy.multiply(a, b, dtype=numpy.float64)
    s = p + c
    tie = (s.view(numpy.uint64) & numpy.uint64(0x1FFFFFFF)) == numpy.uint64(0x10000000)
    if tie.any():
        pt = p[tie]
        ct = numpy.broadcast_to(numpy.asarray(c, dtype=numpy.float64), p.shape)[tie]
        st = s[tie]
        t = st - pt
        err = (pt - (st - t)) + (ct - t)
        s[tie] = numpy.where(err == 0, st, numpy.nextafter(st, numpy.copysign(_INF, err)))
    return s.astype(numpy.float32)


# Cephes coefficients as torch's avx_mathfun.h spells them (rounded to float32 there too).
_LOG_P = [_F(c) for c in (7.0376836292E-2, -1.1514610310E-1, 1.1676998740E-1, -1.2420140846E-1,
                          1.4249322787E-1, -1.6668057665E-1, 2.0000714765E-1, -2.4999993993E-1,
                          3.3333331174E-1)]
_LOG_Q1 = _F(-2.12194440e-4)
_LOG_Q2 = _F(0.693359375)
_SQRTHF = _F(0.707106781186547524)
_FOPI = _F(1.27323954473516)  # 4 / pi
_DP = [_F(-0.78515625), _F(-2.4187564849853515625e-4), _F(-3.77489497744594108e-8)]
_COS_P = [_F(2.443315711809948E-005), _F(-1.388731625493765E-003), _F(4.166664568298827E-002)]
_SIN_P = [_F(-1.9515295891E-4), _F(8.3321608736E-3), _F(-1.6666654611E-1)]
_ONE, _HALF, _ZERO = _F(1.0), _F(0.5), _F(0.0)


def _log256_ps(x):
    """avx_mathfun's ``log256_ps`` for positive normal float32 x, operation for operation.

    x = m 2^e with m in [sqrt(1/2), sqrt(2)); log x = log1p(m - 1) + e ln 2, with a degree-9 Cephes
    polynomial for log1p and ln 2 split in two (q2 + q1). The multiply-adds that GCC contracts into
    FMAs in torch's build are computed fused here.
    """
    bits = x.view(numpy.uint32)
    e = ((bits >> _U32(23)).astype(numpy.int32) - numpy.int32(0x7F)).astype(numpy.float32) + _ONE
    m = ((bits & _U32(0x807FFFFF)) | _HALF.view(numpy.uint32)).view(numpy.float32)  # in [0.5, 1)
    small = m < _SQRTHF
    tmp = numpy.where(small, m, _ZERO)
    m = m - _ONE
    e = e - numpy.where(small, _ONE, _ZERO)
    m = m + tmp
    z = m * m
    y = numpy.full_like(m, _LOG_P[0])
    for coef in _LOG_P[1:]:
        y = _fma32(y, m, coef)
    y = y * m
    y = _fma32(y, z, e * _LOG_Q1)  # y*z + e*q1: the first product is the one fused
    y = y - z * _HALF               # exact product: fused or not is the same
    m = m + y
    return m + e * _LOG_Q2          # e*q2 is exact (q2 has 9 significant bits)


def _sincos256_ps(x):
    """avx_mathfun's ``sincos256_ps`` for float32 x >= 0: returns (sin x, cos x).

    Reduction by multiples j of pi/4 (j even, the Cody-Waite split DP1+DP2+DP3 of -pi/4), then the
    Cephes sine and cosine polynomials on |x'| <= pi/4, selected and signed by the octant j.
    """
    j = (x * _FOPI).astype(numpy.int32)
    j = (j + 1) & ~1
    y = j.astype(numpy.float32)
    sign_sin = ((j & 4) << 29).astype(numpy.uint32)
    use_sin_poly = (j & 2) == 0            # "poly_mask": the sine polynomial gives sin on this octant
    for dp in _DP:
        x = _fma32(y, dp, x)
    sign_cos = ((~(j - 2) & 4) << 29).astype(numpy.uint32)
    z = x * x
    yc = numpy.full_like(x, _COS_P[0])
    yc = _fma32(yc, z, _COS_P[1])
    yc = _fma32(yc, z, _COS_P[2])
    yc = yc * z
    yc = _fma32(yc, z, -(z * _HALF))      # yc*z*z - z/2 with the last product fused
    yc = yc + _ONE
    ys = numpy.full_like(x, _SIN_P[0])
    ys = _fma32(ys, z, _SIN_P[1])
    ys = _fma32(ys, z, _SIN_P[2])
    ys = ys * z
    ys = _fma32(ys, x, x)
    ysin2 = numpy.where(use_sin_poly, ys, _ZERO)
    ysin1 = numpy.where(use_sin_poly, _ZERO, yc)
    sin = ysin1 + ysin2
    cos = (yc - ysin1) + (ys - ysin2)
    sin = (sin.view(numpy.uint32) ^ sign_sin).view(numpy.float32)
    cos = (cos.view(numpy.uint32) ^ sign_cos).view(numpy.float32)
    return sin, cos


_TWO_PI_F32 = _F(2.0 * math.pi)
_MINUS_TWO_F32 = _F(-2.0)


def _box_muller16_float32(u):
    """torch's AVX2 ``NormalFill16<float>`` on uniforms u (B, 16) -> normals (B, 16), mean 0, std 1."""
    u1 = _ONE - u[:, :8]                                    # (0, 1], exact
    u2 = u[:, 8:]
    r = numpy.sqrt(_MINUS_TWO_F32 * _log256_ps(u1))
    sin, cos = _sincos256_ps(_TWO_PI_F32 * u2)
    out = numpy.empty_like(u)
    numpy.multiply(r, cos, out=out[:, :8])
    numpy.multiply(r, sin, out=out[:, 8:])
    out += _ZERO                                            # fmadd(n, std=1, mean=0): -0 becomes +0
    return out


_LIBM = {}


def _libm_float_functions():
    """The C library's ``logf``, ``cosf``, ``sinf`` (float -> float), as NumPy ufuncs over objects."""
    if not _LIBM:
        import ctypes  # noqa: PLC0415 - only the scalar kernel needs the C library
        import ctypes.util  # noqa: PLC0415

        name = ctypes.util.find_library("m") or ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name)
            funcs = [getattr(lib, f) for f in ("logf", "cosf", "sinf")]
        except (OSError, TypeError, AttributeError) as exc:
            raise RuntimeError(f"kernel='scalar' needs the C library's logf/cosf/sinf, which ctypes "
                               f"could not load ({exc})") from exc
        for f in funcs:
            f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
        _LIBM.update(zip(("log", "cos", "sin"), (numpy.frompyfunc(f, 1, 1) for f in funcs)))
    return _LIBM


def _box_muller16_float32_scalar(u):
    """torch's scalar (DEFAULT-kernel) ``NormalFill16<float>`` on uniforms u (B, 16): float32 math
    with the C library's ``logf``/``cosf``/``sinf``, one call per value."""
    libm = _libm_float_functions()
    u1 = _ONE - u[:, :8]
    log_u1 = libm["log"](u1).astype(numpy.float32)
    r = numpy.sqrt(_MINUS_TWO_F32 * log_u1)
    theta = ((2.0 * math.pi) * u[:, 8:].astype(numpy.float64)).astype(numpy.float32)  # double product
    out = numpy.empty_like(u)
    numpy.multiply(r, libm["cos"](theta).astype(numpy.float32), out=out[:, :8])
    numpy.multiply(r, libm["sin"](theta).astype(numpy.float32), out=out[:, 8:])
    out += _ZERO
    return out


_FLOAT32_KERNELS = {"avx2": _box_muller16_float32, "scalar": _box_muller16_float32_scalar}


def _box_muller16_float64(u):
    """torch's scalar ``NormalFill16<double>`` on uniforms u (B, 16): libm log/cos/sin per value."""
    u1 = (1.0 - u[:, :8]).ravel()
    theta = (2.0 * math.pi) * u[:, 8:].ravel()
    log, cos, sin, sqrt = math.log, math.cos, math.sin, math.sqrt
    r = numpy.fromiter((sqrt(-2.0 * log(v)) for v in u1.tolist()), numpy.float64, u1.size)
    c = numpy.fromiter(map(cos, theta.tolist()), numpy.float64, theta.size)
    s = numpy.fromiter(map(sin, theta.tolist()), numpy.float64, theta.size)
    out = numpy.empty_like(u)
    out[:, :8] = (r * c).reshape(-1, 8)
    out[:, 8:] = (r * s).reshape(-1, 8)
    out += 0.0
    return out


# ------------------------------------------------------------------------------------ argument checks
def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, numpy.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    if not -(1 << 63) <= seed < (1 << 64):
        raise ValueError(f"seed must be in [-2**63, 2**64 - 1] (torch's range), got {seed}")
    return seed % (1 << 64)  # negative seeds wrap to uint64 as in torch


def _check_shape(shape) -> tuple:
    if isinstance(shape, (int, numpy.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    if any(isinstance(d, bool) for d in shape) or any(d < 0 for d in dims):
        raise ValueError(f"shape must hold non-negative ints, got {shape!r}")
    return dims


# ------------------------------------------------------------------------------------------ generator
class TorchGenerator:
    """A NumPy twin of a CPU ``torch.Generator``: the same seed gives the same stream.

    ``TorchGenerator(seed).randn(shape)`` equals
    ``torch.randn(shape, generator=torch.Generator().manual_seed(seed))`` bit for bit, and successive
    ``randn`` / ``rand`` calls continue the stream as successive calls on one torch generator do
    (diffusers draws the initial latents and later scheduler noise from the same generator).
    ``TorchGenerator()`` without a seed is a fresh ``torch.Generator()`` (seed 67280421310721).
    Arrays are NumPy arrays on the host; move them with ``npdiffusion.backend.asarray``.

    ``kernel`` picks torch's float32/float16 Box-Muller kernel for draws of 16 or more values:
    ``"avx2"`` (default) is the one x86-64 torch runs on AVX2 and AVX-512 CPUs, reproduced exactly
    in NumPy on any machine; ``"scalar"`` is torch's DEFAULT kernel (x86 without AVX2, ARM), which
    calls the C library's ``logf``/``cosf``/``sinf`` and is reproduced by calling that same library
    through ctypes (so it matches torch on the same machine; about 20x slower). float64 draws and
    draws of fewer than 16 values are the same in both. See docs/random.md.
    """

    def __init__(self, seed: int = DEFAULT_SEED, kernel: str = "avx2"):
        if kernel not in _FLOAT32_KERNELS:
            raise ValueError(f"kernel must be one of {sorted(_FLOAT32_KERNELS)}, got {kernel!r}")
        self.kernel = kernel
        self.manual_seed(seed)

    # ------------------------------------------------------------------ seeding and state
    def manual_seed(self, seed: int) -> "TorchGenerator":
        """Reseed as ``torch.Generator.manual_seed``: ints in [-2**63, 2**64 - 1]; returns self."""
        self._seed = _check_seed(seed)
        self._state = _seeded_state(self._seed)  # (624,) uint32, not yet twisted
        self._block = None                      # tempered outputs of the current state
        self._pos = _MT_N                       # next output index in _block; 624 means twist first
        self._fresh = True                      # seeded and never twisted (torch's next_ is 0 then)
        self._spare_normal = None               # the double normal cached by small draws
        self._spare_float = None                # torch's float cache: kept for get/set_state only
        return self

    def initial_seed(self) -> int:
        """The seed as torch reports it (a uint64: negative seeds wrapped)."""
        return self._seed

    def get_state(self) -> numpy.ndarray:
        """The state as ``torch.Generator.get_state()`` lays it out: 5056 bytes (uint8).

        ``torch.Generator().set_state(torch.from_numpy(g.get_state()))`` continues this stream in
        torch, and ``set_state`` takes torch's bytes, so a state can be saved and restored exactly.
        """
        out = numpy.zeros((), dtype=_TORCH_STATE)
        out["seed"] = self._seed
        out["left"] = _MT_N + 1 - self._pos
        out["seeded"] = 1
        out["next"] = 0 if self._fresh else self._pos
        out["state"] = self._state
        if self._spare_normal is not None:
            out["normal_y"] = self._spare_normal
            out["normal_is_valid"] = 1
        if self._spare_float is not None:
            out["next_float"] = self._spare_float
            out["next_float_valid"] = 1
        return numpy.frombuffer(out.tobytes(), dtype=numpy.uint8).copy()

    def set_state(self, state) -> "TorchGenerator":
        """Restore a state from ``get_state`` or from ``torch.Generator.get_state()`` (5056 bytes)."""
        raw = numpy.asarray(state)
        if raw.dtype != numpy.uint8 or raw.shape != (_TORCH_STATE.itemsize,):
            raise ValueError(f"state must be {_TORCH_STATE.itemsize} bytes (uint8) as torch's "
                             f"Generator.get_state() gives, got dtype {raw.dtype} and shape {raw.shape}")
        st = numpy.frombuffer(raw.tobytes(), dtype=_TORCH_STATE)[0]
        left, nxt, words = int(st["left"]), int(st["next"]), st["state"]
        if not st["seeded"] or not 1 <= left <= _MT_N or nxt > _MT_N or (words >> 32).any():
            raise ValueError(f"state is not a valid mt19937 state: seeded={int(st['seeded'])}, "
                             f"left={left}, next={nxt}")
        self._seed = int(st["seed"])
        self._state = words.astype(numpy.uint32)
        self._pos = _MT_N + 1 - left
        self._fresh = left == 1 and nxt == 0
        self._block = None if self._pos == _MT_N else _temper(self._state)
        self._spare_normal = float(st["normal_y"]) if st["normal_is_valid"] else None
        self._spare_float = float(st["next_float"]) if st["next_float_valid"] else None
        return self

    # ------------------------------------------------------------------ raw streams
    def _uint32(self, n: int) -> numpy.ndarray:
        """The next n outputs of ``at::mt19937::operator()`` as uint32 (n,)."""
        parts = []
        if self._pos < _MT_N and n > 0:
            take = min(n, _MT_N - self._pos)
            parts.append(self._block[self._pos:self._pos + take])
            self._pos += take
            n -= take
        while n > 0:
            _next_state(self._state)
            self._block = _temper(self._state)
            self._fresh = False
            take = min(n, _MT_N)
            parts.append(self._block[:take])
            self._pos = take
            n -= take
        if not parts:
            return numpy.empty(0, dtype=numpy.uint32)
        return parts[0].copy() if len(parts) == 1 else numpy.concatenate(parts)

    def _uniform_float(self, n: int) -> numpy.ndarray:
        """n float32 uniforms in [0, 1): ``(random() & (2^24 - 1)) * 2^-24``."""
        return (self._uint32(n) & _U32(0xFFFFFF)).astype(numpy.float32) * _F(2.0 ** -24)

    def _uniform_double(self, n: int) -> numpy.ndarray:
        """n float64 uniforms in [0, 1): the low 53 bits of ``random64() = hi << 32 | lo``, * 2^-53."""
        words = self._uint32(2 * n).astype(numpy.uint64)
        bits = ((words[0::2] & numpy.uint64(0x1FFFFF)) << numpy.uint64(32)) | words[1::2]
        return bits.astype(numpy.float64) * 2.0 ** -53

    def _normal_double(self) -> float:
        """``at::normal_distribution<double>(0, 1)``: Box-Muller in doubles, one spare cached."""
        if self._spare_normal is not None:
            value, self._spare_normal = self._spare_normal, None
            return value * 1.0 + 0.0
        u1, u2 = self._uniform_double(2).tolist()
        r = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._spare_normal = r * math.sin(theta)
        return r * math.cos(theta) * 1.0 + 0.0

    # ------------------------------------------------------------------ distributions
    def randn(self, shape, dtype=numpy.float32) -> numpy.ndarray:
        """``torch.randn(shape, generator=g, dtype=dtype)`` on the CPU: N(0, 1) of ``shape``.

        dtype: float32 (default), float64 or float16. Returns a new NumPy array of ``shape``.
        """
        shape, dt = _check_shape(shape), check_dtype("dtype", dtype, _DTYPES)
        n = math.prod(shape)
        if n < 16:  # torch's serial kernel: one double normal per value, cast
            values = numpy.array([self._normal_double() for _ in range(n)], dtype=numpy.float64)
            if dt == numpy.float16:  # static_cast<Half>(double) goes through float
                values = values.astype(numpy.float32)
            return values.astype(dt).reshape(shape)
        if dt == numpy.float64:
            uniform, box_muller = self._uniform_double, _box_muller16_float64
        else:
            uniform, box_muller = self._uniform_float, _FLOAT32_KERNELS[self.kernel]
        full = n // 16 * 16
        # float32/float64 fill the whole output with N uniforms first; float16 fills a float buffer
        # block by block, so it draws only the uniforms of the whole blocks.
        data = uniform(full if dt == numpy.float16 else n)
        out = numpy.empty(n, dtype=data.dtype)
        out[:full] = box_muller(data[:full].reshape(-1, 16)).reshape(-1)
        if n % 16:  # torch recomputes the last 16 values from 16 fresh uniforms
            out[n - 16:] = box_muller(uniform(16).reshape(1, 16)).reshape(-1)
        return out.astype(dt, copy=False).reshape(shape)

    def rand(self, shape, dtype=numpy.float32) -> numpy.ndarray:
        """``torch.rand(shape, generator=g, dtype=dtype)`` on the CPU: U[0, 1) of ``shape``.

        float32 and float16 take one 24-bit uniform per value, float64 one 53-bit uniform; a float16
        value that rounds up to 1 becomes 0, as in torch.
        """
        shape, dt = _check_shape(shape), check_dtype("dtype", dtype, _DTYPES)
        n = math.prod(shape)
        if dt == numpy.float64:
            return self._uniform_double(n).reshape(shape)
        values = self._uniform_float(n).astype(dt)
        values[values == 1] = 0
        return values.reshape(shape)

    def __repr__(self):
        return f"TorchGenerator(seed={self._seed}, kernel={self.kernel!r})"


def torch_randn(shape, seed: int, dtype=numpy.float32, kernel: str = "avx2") -> numpy.ndarray:
    """``torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)`` in NumPy
    (``kernel``: see ``TorchGenerator``)."""
    return TorchGenerator(seed, kernel=kernel).randn(shape, dtype=dtype)


def torch_rand(shape, seed: int, dtype=numpy.float32) -> numpy.ndarray:
    """``torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)`` in NumPy."""
    return TorchGenerator(seed).rand(shape, dtype=dtype)


def randn_tensor(shape, generator, dtype=numpy.float32) -> numpy.ndarray:
    """diffusers' ``randn_tensor`` for CPU generators: ``generator`` is one ``TorchGenerator`` or a
    list with one per batch item (then each item is drawn with shape (1, *shape[1:]) and stacked).
    """
    shape = _check_shape(shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        else:
            if not shape or len(generator) != shape[0]:
                raise ValueError(f"randn_tensor: a list of generators needs one per batch item, got "
                                 f"{len(generator)} generators for shape {shape}")
            return numpy.concatenate([g.randn((1,) + shape[1:], dtype) for g in generator], axis=0)
    if not isinstance(generator, TorchGenerator):
        raise TypeError(f"randn_tensor: generator must be a TorchGenerator or a list of them, "
                        f"got {type(generator).__name__}")
    return generator.randn(shape, dtype)
