"""The model written does not depend on the thread count: every pass, on a digits model and on a
zoo-pattern model, run in its own process with OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=MKL_NUM_THREADS
and ``threads=`` 1 and 2, writes byte-identical files (sha256). The variables are read when the
libraries load, hence one process per count. ``parallel`` itself: order, errors, no nesting, the
BLAS limit, and the option's checks."""

import hashlib
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import onnxshrink
from onnxshrink import cli, parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (label, model, passes, options): digits models from models/, zoo patterns from tests/zoo; the
# options keep each fit small, the code paths are those of the defaults
CASES = [
    ("foldbn", "cnn_plain", "foldbn", {}),
    ("pfa", "cnn_plain", "pfa", {"pfa": {"positions": 8}}),
    ("basisconv", "cnn_plain", "basisconv", {"basisconv": {"positions": 8}}),
    ("lowrank", "mlp", "lowrank", {}),
    ("hadamard", "mlp", "hadamard", {"hadamard": {"max_fits": 6, "max_rows": 256, "final_iters": 1}}),
    ("pq", "mlp", "pq", {"pq": {"iters": 2, "refine": 4, "kmeans_iters": 3}}),
    ("zoo-foldbn,pfa,basisconv", "zoo:resnet_basic_op13", "foldbn,pfa,basisconv",
     {"pfa": {"channel_multiple": 1, "positions": 8}, "basisconv": {"channel_multiple": 1, "positions": 8}}),
    ("zoo-lowrank", "zoo:keras_mlp_op13", "lowrank", {"lowrank": {"rank_multiple": 1}}),
    ("zoo-hadamard", "zoo:keras_mlp_op13", "hadamard", {"hadamard": {"max_fits": 6, "min_dim": 8, "tolerance": 1.0, "output_error": 0}}),
    ("zoo-pq", "zoo:keras_mlp_op13", "pq", {"pq": {"iters": 2, "refine": 4, "kmeans_iters": 3}}),
]

SCRIPT = r"""
import hashlib, os, sys, tempfile
sys.path.insert(0, {tests!r})
import numpy as np
import zoo
from onnxshrink import shrink
from onnxshrink.validate import Tolerances

threads = int(sys.argv[1])
tol = Tolerances(min_cosine=None)
with tempfile.TemporaryDirectory() as d:
    for label, model, passes, opts in {cases!r}:
        if model.startswith("zoo:"):
            z = zoo.build(model[4:])
            model, calib = z.model, z.calibration(48)
        else:
            model = os.path.join({models!r}, model + ".onnx")
            calib = np.load(model[:-5] + "_calib.npz")
            calib = {{k: calib[k][:160] for k in calib.files}}
        res = shrink(model, passes, calibration=calib, options=opts, force=True, tolerances=tol, threads=threads)
        path = os.path.join(d, "o.onnx")
        res.save(path)
        print(label, hashlib.sha256(open(path, "rb").read()).hexdigest(), int(any(p["changed"] for p in res.report["passes"])))
"""


def digests(threads, cases=CASES):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    code = SCRIPT.format(tests=os.path.join(ROOT, "tests"), models=os.path.join(ROOT, "models"), cases=cases)
    out = subprocess.run([sys.executable, "-c", code, str(threads)], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return {label: (sha, changed) for label, sha, changed in (line.split() for line in out.stdout.strip().splitlines())}


def test_every_pass_writes_the_same_bytes_with_1_and_2_threads():
    one, two = digests(1), digests(2)
    assert sorted(one) == sorted(label for label, *_ in CASES)
    changed = [label for label, (_, c) in one.items() if c == "1"]
    assert len(changed) == len(CASES), f"cases that changed nothing prove little: {set(one) - set(changed)}"
    assert one == two


def test_cli_threads_flag_writes_the_same_bytes(tmp_path):
    """``--threads 1`` with one BLAS thread and ``--threads 2`` with two: the same file."""
    model, calib = os.path.join(ROOT, "models", "mlp.onnx"), os.path.join(ROOT, "models", "mlp_calib.npz")
    digest = []
    for n in (1, 2):
        out = tmp_path / f"o{n}.onnx"
        env = dict(os.environ, OMP_NUM_THREADS=str(n), OPENBLAS_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n))
        p = subprocess.run([sys.executable, "-m", "onnxshrink.cli", model, str(out), "--passes", "lowrank",
                            "--calibration-data", calib, "--target-params", "0.5", "--threads", str(n), "--quiet",
                            "--force"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert p.returncode in (0, 3), p.stderr[-2000:]
        digest.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digest[0] == digest[1]
    p = subprocess.run([sys.executable, "-m", "onnxshrink.cli", model, str(tmp_path / "x.onnx"), "--passes", "lowrank",
                        "--calibration-data", calib, "--threads", "0"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 2 and "threads must be" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()


# ----------------------------------------------------------------------------- parallel itself
def test_ordered_map_keeps_the_order_and_uses_the_workers():
    seen = set()

    def fn(i):
        seen.add(threading.current_thread().name)
        np.linalg.qr(np.ones((60, 60)) + i)   # GIL released: both workers get items
        return i * i

    with parallel.fitting(2):
        assert parallel.workers() == 2
        assert parallel.ordered_map(fn, range(40)) == [i * i for i in range(40)]
    assert parallel.workers() == 1
    assert any(name.startswith("onnxshrink-fit") for name in seen)


def test_ordered_map_starts_the_dearest_first_and_keeps_the_order():
    """With ``cost``, the two workers take the two dearest items first (each of them waits for the
    other at a barrier, so no third item starts before both have); the list is in item order."""
    started, lock, barrier = [], threading.Lock(), threading.Barrier(2, timeout=30)

    def fn(i):
        with lock:
            started.append(i)
            first = len(started) <= 2
        if first:
            barrier.wait()
        return i * 10

    items = [1, 5, 3, 9, 2]
    with parallel.fitting(2):
        assert parallel.ordered_map(fn, items, cost=lambda i: i) == [10, 50, 30, 90, 20]
    assert set(started[:2]) == {9, 5} and sorted(started) == sorted(items)


def test_ordered_map_raises_the_first_error_in_item_order_and_does_not_nest():
    def fn(i):
        if i in (3, 7):
            raise KeyError(i)
        return parallel.workers()   # inside a worker: pools do not nest

    with parallel.fitting(2):
        with pytest.raises(KeyError, match="3"):
            parallel.ordered_map(fn, range(10))
        assert parallel.ordered_map(fn, [0, 1, 2]) == [1, 1, 1]


def test_fitting_holds_the_blas_at_one_thread_and_restores_it():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    blas = lambda: [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]  # noqa: E731
    before = blas()
    with parallel.fitting(2):
        assert blas() and all(n == 1 for n in blas())
    assert blas() == before


def test_threads_option_is_checked():
    assert parallel.check_threads(None) == parallel.usable_cores() >= 1
    assert parallel.check_threads(3) == 3
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads must be"):
            parallel.check_threads(bad)
    x = np.zeros((8, 3, 8, 8), np.float32)
    from graphs import conv_bn_net
    with pytest.raises(onnxshrink.UsageError, match="threads must be"):
        onnxshrink.shrink(conv_bn_net(), "foldbn", calibration=x, threads=0)
    assert cli.build_parser().parse_args(["a", "b", "--passes", "foldbn", "--threads", "2"]).threads == 2


def test_timed_blocks_in_pool_workers_are_counted_once_by_the_calling_thread():
    """Two solves timed as "search" run side by side inside one "fit" block: their blocks overlap,
    so the calling thread's block counts their wall time once; the parts never sum past it."""
    import time

    from onnxshrink.pipeline import TIMING_PARTS, PassContext
    ctx = PassContext(None, None, None)

    def work(_):
        with ctx.timed("search"):
            time.sleep(0.2)

    t0 = time.perf_counter()
    with parallel.fitting(2), ctx.timed("fit"):
        parallel.ordered_map(work, range(2))
    wall = time.perf_counter() - t0
    parts = sum(ctx.timings.get(k, 0.0) for k in TIMING_PARTS)
    assert parts <= wall + 1e-3, (parts, wall, ctx.timings)
    assert ctx.timings["fit"] >= 0.19 and ctx.timings.get("search", 0.0) == 0.0, ctx.timings


@pytest.mark.parametrize("n,d,m", [(900, 700, 300), (3000, 520, 40), (50, 300, 10)])
def test_gram_and_cross_products_do_not_depend_on_the_workers(n, d, m):
    """``parallel.gram`` (x.T @ x in tiles) and ``parallel.cross`` (x.T @ y by row chunks): the same
    bits with 1 and 2 workers, exactly symmetric, the products' values (within rounding: whether a
    chunk of the product has the whole GEMM's bits depends on the BLAS kernel the CPU gets)."""
    rng = np.random.default_rng(n)
    x, y = rng.standard_normal((n, d)), rng.standard_normal((n, m))
    size = 128   # several tiles at test sizes
    got = {}
    for w in (1, 2):
        with parallel.fitting(w):
            got[w] = parallel.gram(x, size), parallel.cross(x, y, size)
    g, c = got[1]
    assert np.array_equal(g, got[2][0]) and np.array_equal(c, got[2][1])
    assert np.array_equal(g, g.T)
    with parallel.one_blas_thread():
        whole, xy = x.T @ x, x.T @ y
    np.testing.assert_allclose(g, whole, rtol=0, atol=1e-12 * np.abs(whole).max())
    np.testing.assert_allclose(c, xy, rtol=0, atol=1e-12 * np.abs(xy).max())
