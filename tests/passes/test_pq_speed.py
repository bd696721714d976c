"""pq's fitting shortcuts: sampled, early-stopped k-means and EM, the gptq factor computed once,
and statistics on the pass's input model collected once."""

import importlib

import numpy as np
import pytest

from onnxshrink import shrink
from onnxshrink.lstsq import weighted_error
from onnxshrink.passes.pq.gptq import gptq_assign, hinv_cholesky
from onnxshrink.stats import LayerStats

km = importlib.import_module("onnxshrink.passes.pq.kmeans")   # the package exports the function kmeans
pq_pass = importlib.import_module("onnxshrink.passes.pq.pass_")


def _clusters(n_per, k, d, seed=0, spread=0.01):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)) * 10
    labels = np.repeat(np.arange(k), n_per)
    x = centers[labels] + spread * rng.standard_normal((len(labels), d))
    order = rng.permutation(len(x))
    return x[order], labels[order], centers


def test_kmeans_on_a_sample_finds_separated_clusters_and_assigns_every_row():
    x, labels, _ = _clusters(400, 8, 3)           # 3200 rows, fit on a sample of 1000
    c, codes = km.kmeans(x, 8, 10, np.random.default_rng(0), sample=1000)
    assert codes.shape == (len(x),)
    # every cluster is one code (a relabelling) and the fit is at the noise level
    pairs = set(zip(labels.tolist(), codes.tolist()))
    assert len(pairs) == 8 and len({p[1] for p in pairs}) == 8
    assert ((x - c[codes]) ** 2).sum(1).mean() < 3 * 3 * 0.01 ** 2


def test_kmeans_stops_once_the_codes_settle(monkeypatch):
    x, _, _ = _clusters(200, 4, 2, seed=1)
    calls = []
    real = km._sqdist_argmin

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(km, "_sqdist_argmin", counted)
    km.kmeans(x, 4, 50, np.random.default_rng(0))
    # separated clusters settle within a few Lloyd steps; 50 rounds would take 51 assignments
    assert len(calls) <= 6


def test_kmeans_sample_default_grows_with_the_centroids():
    x = np.random.default_rng(2).standard_normal((40000, 2))
    c16, codes16 = km.kmeans(x, 16, 3, np.random.default_rng(0))
    assert c16.shape == (16, 2) and codes16.shape == (40000,)
    assert max(km.FIT_PER_CENTROID * 16, km.MIN_SAMPLE) < 40000   # the sampled path was taken
    err = ((x - c16[codes16]) ** 2).sum() / (x ** 2).sum()
    full, fcodes = km.kmeans(x, 16, 3, np.random.default_rng(0), sample=len(x))
    err_full = ((x - full[fcodes]) ** 2).sum() / (x ** 2).sum()
    assert err <= 1.05 * err_full


def _metric_problem(rows=512, nb=8, d=2, seed=3):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((nb, d, d))
    hblocks = np.einsum("bij,bkj->bik", a, a) + 0.5 * np.eye(d)
    x = rng.standard_normal((rows * nb, d))
    return x, np.tile(np.arange(nb), rows), hblocks


def _metric_error(x, blk, hblocks, c, codes):
    e = x - c[codes]
    return float(np.einsum("nd,nde,ne->", e, hblocks[blk], e))


def test_aware_em_on_a_sample_returns_every_code_and_a_near_full_fit():
    x, blk, hblocks = _metric_problem()
    k = 16
    c0, codes0 = km.kmeans(x, k, 3, np.random.default_rng(0))
    c_full, codes_full = km.aware_em(x, blk, hblocks, c0, codes0, 8)
    c_s, codes_s = km.aware_em(x, blk, hblocks, c0, codes0, 8, rng=np.random.default_rng(0), sample=1024)
    assert codes_s.shape == codes_full.shape
    # the codes are the nearest centroid of every sub-vector under its block's metric
    hx = np.einsum("bde,rbe->rbd", hblocks, x.reshape(-1, len(hblocks), 2)).reshape(-1, 2)
    assert np.array_equal(codes_s, km._metric_assign(hx, len(hblocks), c_s, hblocks))
    e_full = _metric_error(x, blk, hblocks, c_full, codes_full)
    e_s = _metric_error(x, blk, hblocks, c_s, codes_s)
    e0 = _metric_error(x, blk, hblocks, c0, codes0)
    assert e_s < e0 and e_s <= 1.1 * e_full
    # without rng (or with every row) the rounds are the full ones, as before
    c_same, codes_same = km.aware_em(x, blk, hblocks, c0, codes0, 8, rng=np.random.default_rng(0), sample=len(x))
    assert np.array_equal(c_same, c_full) and np.array_equal(codes_same, codes_full)


def test_metric_assign_rows_matches_the_block_ordered_assignment():
    x, blk, hblocks = _metric_problem(rows=64)
    nb = len(hblocks)
    c = np.random.default_rng(4).standard_normal((8, 2))
    hx = np.einsum("bde,rbe->rbd", hblocks, x.reshape(-1, nb, 2)).reshape(-1, 2)
    assert np.array_equal(km._metric_assign_rows(hx, blk, c, hblocks), km._metric_assign(hx, nb, c, hblocks))
    h1 = hblocks[:, :1, :1]
    x1 = x[:, :1]
    hx1 = x1 * h1.reshape(-1)[blk][:, None]
    c1 = c[:, :1]
    assert np.array_equal(km._metric_assign_rows(hx1, blk, c1, h1), km._metric_assign(hx1, nb, c1, h1))


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
