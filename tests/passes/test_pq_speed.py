"""pq's fitting shortcuts: the gptq factor computed once and statistics on the pass's input model
collected once (both leave the written model as it was)."""

import importlib

import numpy as np
import pytest

from onnxshrink import shrink
from onnxshrink.lstsq import weighted_error
from onnxshrink.passes.pq.gptq import gptq_assign, hinv_cholesky
from onnxshrink.stats import LayerStats

km = importlib.import_module("onnxshrink.passes.pq.kmeans")   # the package exports the function kmeans
pq_pass = importlib.import_module("onnxshrink.passes.pq.pass_")


@pytest.mark.parametrize("d", [1, 3])
def test_gptq_assign_with_the_factor_given_is_the_same(d):
    rng = np.random.default_rng(5)
    d_in, rows = 24, 40
    xs = rng.standard_normal((200, d_in))
    h = xs.T @ xs / 200 + 0.01 * np.eye(d_in)
    t = rng.standard_normal((rows, d_in))
    c = rng.standard_normal((12, d))
    a = gptq_assign(t, d, c, h, group=6)
    b = gptq_assign(t, d, c, h, group=6, u=hinv_cholesky(h))
    assert np.array_equal(a, b)
    # error feedback beats the plain per-block nearest centroid on the output error
    t_hat = c[a].reshape(rows, d_in)
    plain = km._sqdist_argmin(t.reshape(-1, d), c)
    assert weighted_error(t, t_hat, h) < weighted_error(t, c[plain].reshape(rows, d_in), h)


class _Ctx:
    """The parts of PassContext that ReferenceStats reads, counting collections."""

    def __init__(self, data, reference, seed=0, batch_size=64):
        self.data, self.reference, self.seed, self.batch_size = data, reference, seed, batch_size
        self.asked = []

    def collect(self, requests, model_x=None, model_y=None, desc=""):
        self.asked.append([r.key for r in requests])
        return {r.key: (r.key, id(model_x)) for r in requests}


class _Data:
    pass


def test_reference_stats_collects_each_request_once_per_data_and_model():
    data, ref, other = _Data(), object(), object()
    r1, r2 = LayerStats("pq:a", "x", "y"), LayerStats("pq:b", "x2", "y2")
    ctx = _Ctx(data, ref)
    first = pq_pass.ReferenceStats(ctx)
    assert set(first.collect([r1], model_x=ref, model_y=ref)) == {"pq:a"}
    got = first.collect([r1, r2], model_x=ref)
    assert ctx.asked == [["pq:a"], ["pq:b"]] and set(got) == {"pq:a", "pq:b"}
    # another run of the pass on the same data and model (an accuracy search's next step)
    again = _Ctx(data, ref)
    assert set(pq_pass.ReferenceStats(again).collect([r2, r1])) == {"pq:a", "pq:b"} and again.asked == []
    # a request under the same key but other fields is collected
    r1b = LayerStats("pq:a", "x", "y", positions=8)
    pq_pass.ReferenceStats(again).collect([r1b], model_x=ref)
    assert again.asked == [["pq:a"]]
    # statistics on another model, another seed or other data are never taken from the memo
    pq_pass.ReferenceStats(again).collect([r1], model_x=other)
    assert again.asked[-1] == ["pq:a"]
    seeded = _Ctx(data, ref, seed=1)
    pq_pass.ReferenceStats(seeded).collect([r1])
    fresh = _Ctx(_Data(), ref)
    pq_pass.ReferenceStats(fresh).collect([r1])
    assert seeded.asked == [["pq:a"]] and fresh.asked == [["pq:a"]]


def test_target_size_run_collects_the_reference_statistics_once(monkeypatch):
    import onnx
    from models import digits
    model, calib = onnx.load(digits.model_path("mlp")), digits.calibration("mlp", n=256)
    opts = {"iters": 2, "refine": 4, "kmeans_iters": 3, "positions": 8, "min_bytes": 0}

    def run():
        res = shrink(model, ["pq"], calibration=calib, options={"pq": opts}, target_bytes=0.3, force=True)
        return res.model.SerializeToString(), res.report["passes"][0]

    kept, p = run()
    monkeypatch.setattr(pq_pass, "ReferenceStats", lambda ctx: ctx)   # every collection run
    plain, q = run()
    assert p["size_search"]["choice"] == q["size_search"]["choice"]
    # the size search's collection serves the first round: one run fewer, the same model
    assert p["calibration_runs"] == q["calibration_runs"] - 1 >= 1
    assert kept == plain
