"""Fitting threads: results that do not depend on the thread count.

A BLAS splits one product or factorization over its threads, and the split changes the rounding:
the same GEMM, Cholesky, eigh or SVD gives different last bits with 1 and with 2 threads, so a
model fitted on a 2-core machine would differ from one fitted with OMP_NUM_THREADS=1. Fitting
therefore runs with one BLAS thread (``fitting``: the whole of a ``shrink`` call), and the cores
are used by running independent solves at once on a thread pool (``ordered_map``: the layers of a
refit level, the layers' decompositions, the output stacks of a Fastfood block). Each solve is
computed the same whichever thread runs it, and the results are combined in the items' order, so
the model written is the same for any worker count. numpy and the BLAS release the GIL in their
kernels, so threads run the solves side by side.

ONNX Runtime sessions keep their own thread pool (``calibrate.session``): it is not a BLAS.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

_state = threading.local()   # .inside: this thread is a pool worker
_lock = threading.Lock()
_active = {"workers": 1}       # the count of the innermost ``fitting`` (read by the pool's workers too)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):   # not Linux
        return max(1, os.cpu_count() or 1)


def check_threads(threads) -> int:
    """``threads`` as a worker count: None → the usable cores; else an integer ≥ 1 (ValueError
    otherwise, with the value)."""
    if threads is None:
        return usable_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a whole number ≥ 1 (default: the usable cores), got {threads!r}")
    return threads


def in_worker() -> bool:
    """True in a pool worker of ``ordered_map``."""
    return getattr(_state, "inside", False)


def workers() -> int:
    """The worker count in effect: that of the innermost ``fitting`` block (1 outside any, and
    inside a pool worker: pools do not nest)."""
    if in_worker():
        return 1
    return _active["workers"]


@contextlib.contextmanager
def fitting(threads=None):
    """Run the block with one BLAS thread and ``threads`` pool workers for ``ordered_map``
    (None: the usable cores)."""
    n = check_threads(threads)
    with _lock:
        before = _active["workers"]
        _active["workers"] = n
    try:
        with one_blas_thread():
            yield n
    finally:
        with _lock:
            _active["workers"] = before


@contextlib.contextmanager
def one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits   # installed with scikit-learn
    except ImportError:   # pragma: no cover
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _run_inside(fn, item):
    _state.inside = True
    try:
        return fn(item)
    finally:
        _state.inside = False


def ordered_map(fn, items, cost=None) -> list:
    """[fn(item) for item in items], the calls spread over ``workers()`` threads; the list is in
    the items' order whatever order they finish in. ``fn`` must not depend on the other calls
    (no shared state it writes, no graph edits, no calibration runs). The first exception raised
    (in the items' order) is raised here, after every call has ended.
    ``cost(item)``: the call's expected work; the calls are started dearest first (a long call
    started last keeps one worker busy while the others idle: pfa's eliminations on the ViT, a
    4096-wide decoder problem among 1536-wide ones), which changes when they run, not what they
    return."""
    items = list(items)
    n = workers()
    if min(n, len(items)) <= 1:
        return [fn(item) for item in items]
    order = range(len(items)) if cost is None else sorted(range(len(items)), key=lambda i: -cost(items[i]))
    futures = [None] * len(items)
    pool = _pool(n)
    for i in order:
        futures[i] = pool.submit(_run_inside, fn, items[i])
    wait(futures)
    return [f.result() for f in futures]


_pools: dict = {}   # worker count -> its ThreadPoolExecutor, made at its first use and kept


def _pool(n: int) -> ThreadPoolExecutor:
    """The pool of ``n`` workers: kept across calls (a refit makes hundreds of ``ordered_map``
    calls; starting and joining two threads for each cost more than many of the solves). At
    most ``n`` calls run at once, as with a pool per call."""
    with _lock:
        pool = _pools.get(n)
        if pool is None:
            pool = _pools[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix=f"onnxshrink-fit{n}")
        return pool


# ----------------------------------------------------------------------------- products in chunks
CHUNK = 256          # columns (rows) per chunk: fixed, so the pieces never depend on the worker count
MIN_WORK = 1 << 24   # multiply-adds below which a product is one call (gram: half of n·d²)


def chunks(n: int, size: int = CHUNK) -> list:
    """Slices of ``range(n)`` of ``size`` (the last one shorter)."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def matmul(a, b, size: int = CHUNK):
    """``a @ b`` (2-D) with ``b``'s columns in chunks of ``size`` computed on the workers. Each
    output column is the same dot products in the same order whoever computes it, and the chunks
    are fixed, so the product does not depend on the worker count (with one BLAS thread a chunked
    GEMM gives the unchunked one's bits as well; ``a`` must not be ``b.T``, which numpy computes
    by SYRK). Small products are one call."""
    n = b.shape[1]
    if n <= size or a.shape[0] * a.shape[1] * n < MIN_WORK:
        return a @ b
    out = np.empty((a.shape[0], n), dtype=np.result_type(a, b))

    def part(s):
        out[:, s] = a @ b[:, s]
    ordered_map(part, chunks(n, size))
    return out


def by_columns(fn, rhs, size: int = CHUNK):
    """``fn(rhs)`` for an ``fn`` that treats the columns of ``rhs`` (2-D) one by one (a solve with
    several right-hand sides), in fixed chunks of ``size`` columns on the workers."""
    n = rhs.shape[1]
    if n <= size or rhs.shape[0] * rhs.shape[0] * n < MIN_WORK:
        return fn(rhs)
    parts = ordered_map(lambda s: fn(rhs[:, s]), chunks(n, size))
    return np.concatenate(parts, axis=1)


def by_rows(fn, x, size: int = 256, min_size: int = 1 << 18, dtype=None):
    """``fn(x)`` for an ``fn`` that treats the rows of ``x`` (2-D) one by one and keeps their shape
    (a transform along the last axis; ``dtype``: its output's, default ``x``'s), in fixed chunks of
    ``size`` rows on the workers; arrays of fewer than ``min_size`` values are one call."""
    if x.shape[0] <= size or x.size < min_size:
        return fn(x)
    out = np.empty(x.shape, dtype=x.dtype if dtype is None else dtype)

    def part(s):
        out[s] = fn(x[s])
    ordered_map(part, chunks(x.shape[0], size))
    return out


def gram(x, size: int = CHUNK):
    """``x.T @ x`` (x 2-D, n × d) in fixed tiles of ``size`` columns on the workers: the diagonal
    tiles by SYRK (``x[:, a].T @ x[:, a]``), the tiles above them by
    GEMM, mirrored below, so the result is exactly symmetric and does not depend on the worker
    count (each entry is one dot product over the n rows, computed the same whoever computes it).
    Products of fewer than ``MIN_WORK`` multiply-adds, or of at most ``size`` columns, are one SYRK;
    above that an entry may differ from the one SYRK's in the last bits (how the BLAS splits a sum
    over rows depends on the call's shape and on the kernel the CPU gets)."""
    n, d = x.shape
    if d <= size or n * d * d // 2 < MIN_WORK:
        return x.T @ x
    out = np.empty((d, d), dtype=np.result_type(x, x))
    parts = chunks(d, size)
    tiles = [(i, j) for j in range(len(parts)) for i in range(j + 1)]

    def tile(ij):
        a, b = parts[ij[0]], parts[ij[1]]
        xa = x[:, a]
        out[a, b] = xa.T @ xa if ij[0] == ij[1] else xa.T @ x[:, b]
    ordered_map(tile, tiles)
    for i, j in tiles:
        if i != j:
            out[parts[j], parts[i]] = out[parts[i], parts[j]].T
    return out


def cross(x, y, size: int = CHUNK):
    """``x.T @ y`` (x n × d, y n × m) with the output's rows (``x``'s columns) in fixed chunks of
    ``size`` on the workers: each entry the same dot product whoever computes it, so the result does
    not depend on the worker count (it may differ from the one GEMM's in the last bits, by the
    kernel the CPU gets). Small products are one call."""
    d = x.shape[1]
    if d <= size or x.shape[0] * d * y.shape[1] < MIN_WORK:
        return x.T @ y
    out = np.empty((d, y.shape[1]), dtype=np.result_type(x, y))

    def part(s):
        out[s] = x[:, s].T @ y
    ordered_map(part, chunks(d, size))
    return out
