"""The output does not depend on the number of BLAS / OpenMP threads: the same model, data and seed
give byte-identical files with OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS = 1 and 2
(each run in its own process, since those variables are read when the libraries load)."""

import hashlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = r"""
import hashlib, sys
sys.path.insert(0, {tests!r})
import numpy as np
import zoo
from graphs import GraphBuilder
from onnxshrink import shrink
from onnxshrink.validate import Tolerances

def net():
    b = GraphBuilder(0)
    x = b.input("input", ["batch", 3, 8, 8])
    h = b.relu(b.conv(x, 3, 16))
    h = b.relu(b.conv(h, 16, 32))
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h])], axis=1)
    h = b.relu(b.gemm(h, 32, 64))
    b.gemm(h, 64, 10, out="logits")
    b.output("logits", ["batch", 10])
    return b.model()

calib = np.random.default_rng(0).standard_normal((96, 3, 8, 8)).astype(np.float32)
tol = Tolerances(min_cosine=None)
for passes, opts in [("pq", {{"pq": {{"iters": 2, "refine": 4, "kmeans_iters": 3, "positions": 8}}}}),
                     ("pfa,basisconv", {{"pfa": {{"channel_multiple": 1, "positions": 8}},
                                         "basisconv": {{"channel_multiple": 1, "positions": 8}}}})]:
    res = shrink(net(), passes, calibration=calib, options=opts, force=True, tolerances=tol)
    print(passes, hashlib.sha256(res.model.SerializeToString()).hexdigest())
z = zoo.build("unrolled_lstm_op13")
res = shrink(z.model, "pq", calibration=z.calibration(64), force=True, tolerances=tol)
print("pq-lstm", hashlib.sha256(res.model.SerializeToString()).hexdigest())
"""


def _digests(threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    code = SCRIPT.format(tests=os.path.join(ROOT, "tests"))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return dict(line.split() for line in out.stdout.strip().splitlines())


def test_output_bytes_do_not_depend_on_the_thread_count():
    one, two = _digests(1), _digests(2)
    assert set(one) == {"pq", "pfa,basisconv", "pq-lstm"}
    assert one == two
