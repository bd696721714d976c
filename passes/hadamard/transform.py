"""The Walsh–Hadamard transform in numpy, in the Kronecker form the graph uses.

The Sylvester Hadamard matrix of size d = a·b (both powers of two) factorises as H_d = H_a ⊗ H_b,
so for a row z read as a row-major a × b matrix Z, H_d z = vec(H_a Z H_b): two small products, no
d × d matrix. ``fwht`` applies the orthonormal H = H_d/√d along the last axis;
``xor_conv`` gives H diag(v) H, a dyadic (XOR) convolution matrix, the Gram matrix of the G
diagonal's least-squares problem.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

from ...parallel import by_rows


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def factors(d: int) -> tuple[int, int]:
    """(a, b) with a·b = d, both powers of two, a ≤ b, as balanced as possible."""
    k = int(d).bit_length() - 1
    if 1 << k != d:
        raise ValueError(f"{d} is not a power of two")
    a = 1 << (k // 2)
    return a, d // a


_HCACHE = {}


def _hfac(n):
    if n not in _HCACHE:
        _HCACHE[n] = scipy.linalg.hadamard(n).astype(np.float64)
    return _HCACHE[n]


def fwht(z: np.ndarray) -> np.ndarray:
    """Orthonormal Walsh–Hadamard transform H_d z/√d along the last axis (Kronecker form); a large
    array's rows in fixed chunks on the fitting workers (``parallel.by_rows``: the same values for
    any worker count)."""
    shp = z.shape
    return by_rows(_fwht_rows, z.reshape(-1, shp[-1]), dtype=np.result_type(z.dtype, np.float64)).reshape(shp)


def _fwht_rows(z: np.ndarray) -> np.ndarray:
    """``fwht`` of the rows of z (n × d): each row read as an a × b matrix Z, H_a Z H_b."""
    n, d = z.shape
    a, b = factors(d)
    y = z.reshape(n, a, b) @ _hfac(b)
    y = np.matmul(_hfac(a), y)
    return y.reshape(n, d) / math.sqrt(d)


_XCACHE = {}


def xor_index(d: int) -> np.ndarray:
    """The d × d matrix i ⊕ j (kept per size)."""
    m = _XCACHE.get(d)
    if m is None:   # (the local m: another fitting thread may clear the cache meanwhile)
        m = np.bitwise_xor.outer(np.arange(d), np.arange(d))
        _XCACHE.clear()   # one size at a time: d × d integers
        _XCACHE[d] = m
    return m


def xor_kernel(v: np.ndarray) -> np.ndarray:
    """w with H diag(v) H = w[i ⊕ j] (orthonormal H): w = (1/d) H_d v."""
    d = len(v)
    return fwht(v[None])[0] / math.sqrt(d)


def xor_conv(v: np.ndarray) -> np.ndarray:
    """H diag(v) H (orthonormal H) = (1/d)(H_d v)[i ⊕ j]."""
    return xor_kernel(v)[xor_index(len(v))]


def hh(a: np.ndarray) -> np.ndarray:
    """H A H (orthonormal H) of a d × d matrix: the transform along both axes."""
    return fwht(fwht(a).T).T


_HNCACHE = {}


def hadamard_orthonormal(d: int) -> np.ndarray:
    """H_d/√d as a d × d array (kept for one size at a time, like ``xor_index``)."""
    m = _HNCACHE.get(d)
    if m is None:
        m = scipy.linalg.hadamard(d).astype(np.float64) / math.sqrt(d)
        _HNCACHE.clear()
        _HNCACHE[d] = m
    return m


def diag_fwht(a: np.ndarray) -> np.ndarray:
    """diag(``fwht``(a)) of a d × d matrix without the transform: fwht(a)_ii = Σ_j a_ij H_ji/√d,
    one elementwise product (d² work instead of the transform's d²·(a + b))."""
    return np.einsum("ij,ij->i", a, hadamard_orthonormal(len(a)))


def diag_hmh(m: np.ndarray) -> np.ndarray:
    """diag(H M H) (orthonormal H) without the two transforms: H_ij H_ik = H_{i, j⊕k}/√d, so
    diag(H M H) = H v/√d with v_m = Σ_j M[j, j ⊕ m]."""
    d = len(m)
    v = np.take_along_axis(m, xor_index(d), axis=1).sum(0)
    return fwht(v[None])[0] / math.sqrt(d)
