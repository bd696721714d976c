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


# ----------------------------------------------------------------------------- the fitting's shortcuts
def _problem(seed, d_in=48, rows=64, n=400):
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((n, d_in)) @ rng.standard_normal((d_in, d_in)) * 0.3
    h = xs.T @ xs / n + 0.01 * np.eye(d_in)
    return rng, rng.standard_normal((rows, d_in)), h


def test_hinv_cholesky_is_the_upper_factor_of_the_inverse():
    _, _, h = _problem(0)
    u = hinv_cholesky(h)
    assert np.allclose(np.tril(u, -1), 0) and (np.diag(u) > 0).all()
    assert np.allclose(u.T @ u, np.linalg.inv(h), rtol=1e-9, atol=1e-9 * np.abs(np.linalg.inv(h)).max())
    with pytest.raises(np.linalg.LinAlgError):
        hinv_cholesky(-h)


def _obq_reference(t, c, h):
    """Scalar codes with error feedback, one input feature at a time, no batching."""
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    w = t.T.copy()
    codes = np.empty(w.shape[::-1], dtype=np.int64)
    for j in range(len(w)):
        q = np.argmin(np.abs(w[j][:, None] - c[None, :, 0]), axis=1)
        codes[:, j] = q
        w[j + 1:] -= np.outer(u[j, j + 1:], (w[j] - c[q, 0]) / u[j, j])
    return codes


@pytest.mark.parametrize("group", [5, 64])
def test_gptq_assign_scalar_codes_match_the_unbatched_error_feedback(group):
    rng, t, h = _problem(1)
    c = np.sort(rng.standard_normal((16, 1)) * 1.5, axis=0)
    assert np.array_equal(gptq_assign(t, 1, c, h, group=group), _obq_reference(t, c, h))


@pytest.mark.parametrize("inner", [1, 3, 64])
def test_gptq_assign_scalar_codes_do_not_depend_on_the_run_length(inner):
    """The error of a feature reaches the rest of its run directly and the rest of the group by one
    product per run: any run length is the unbatched error feedback."""
    rng, t, h = _problem(1)
    c = np.sort(rng.standard_normal((16, 1)) * 1.5, axis=0)
    assert np.array_equal(gptq_assign(t, 1, c, h, group=16, inner=inner), _obq_reference(t, c, h))


def test_quantize_with_one_cache_over_a_ladder_is_the_same():
    """What quantize keeps across a layer's settings (the Cholesky factor, T H, H in float32, the
    EM's points and the assignment's blocks per d) leaves every setting's fit as it is alone, and
    the screens of one d share theirs."""
    from onnxshrink.passes.pq.config import PqConfig
    from onnxshrink.passes.pq.quantize import quantize, screen_rows, screened_error
    _, t, h = _problem(4, d_in=32, rows=640)
    cfg, cache = PqConfig(), {}
    for d, k in [(2, 64), (1, 16), (2, 16), (1, 8)]:
        alone = quantize(t, d, k, h, cfg, np.random.default_rng(3), np.float16)
        kept = quantize(t, d, k, h, cfg, np.random.default_rng(3), np.float16, cache)
        assert np.array_equal(alone[0], kept[0]) and np.array_equal(alone[1], kept[1])
        est = screened_error(t, d, k, h, cfg, np.random.default_rng(5), np.float16, cache)
        assert est == screened_error(t, d, k, h, cfg, np.random.default_rng(5), np.float16)
    screens = {("screen", len(screen_rows(len(t), t.shape[1] // d))) for d in (1, 2)}   # one per d here
    assert {("em", 1), ("em", 2), ("gptq", 1), ("gptq", 2)} | screens <= set(cache)
    assert {key for key in cache if key[0] == "screen"} == screens


def test_gptq_assign_does_not_depend_on_the_group_size():
    rng, t, h = _problem(2)
    c = rng.standard_normal((32, 4))
    assert np.array_equal(gptq_assign(t, 4, c, h, group=8), gptq_assign(t, 4, c, h, group=64))


def test_refine_early_stop_keeps_the_error_and_saves_steps(monkeypatch):
    from onnxshrink.passes.pq import gptq as gq
    rng, t, h = _problem(3, d_in=64, rows=96)
    c = rng.standard_normal((64, 4))
    codes = gptq_assign(t, 4, c, h)
    err = lambda cc: weighted_error(t, cc[codes.reshape(-1)].reshape(t.shape), h)  # noqa: E731
    real, steps = gq.cg, []

    def counting(matvec, *a, **k):   # lstsq.cg, counting the operator's products
        n = [0]

        def mv(x):
            n[0] += 1
            return matvec(x)
        out = real(mv, *a, **k)
        steps.append(n[0])
        return out
    monkeypatch.setattr(gq, "cg", counting)
    full = gq.refine_codebook(t, codes, c, h, 60, tol=0)
    early = gq.refine_codebook(t, codes, c, h, 60)
    assert err(early) <= err(c) and err(early) <= 1.01 * err(full)
    assert steps[1] < steps[0]


def test_kmeans_early_stop_keeps_the_objective():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.standard_normal((3000, 4)) + 4 * rng.standard_normal(4) for _ in range(20)])

    def objective(c, codes):
        return float(((x - c[codes]) ** 2).sum())
    full = km.kmeans(x, 64, 50, np.random.default_rng(0), tol=0)
    early = km.kmeans(x, 64, 50, np.random.default_rng(0))
    assert objective(*early) <= 1.02 * objective(*full)


def test_aware_em_early_stop_keeps_the_objective():
    rng, t, h = _problem(5, d_in=32, rows=256)
    d, nb = 4, 8
    x = t.reshape(-1, d)
    hb = h.reshape(nb, d, nb, d)[np.arange(nb), :, np.arange(nb), :]
    c0, codes0 = km.kmeans(x, 32, 3, np.random.default_rng(0))
    blk = np.tile(np.arange(nb), len(t))

    def objective(c, codes):
        delta = (x - c[codes]).reshape(-1, nb, d)
        return float(np.einsum("rbd,bde,rbe->", delta, hb, delta))
    full = km.aware_em(x, blk, hb, c0, codes0, 50, tol=0)
    early = km.aware_em(x, blk, hb, c0, codes0, 50)
    assert objective(*early) <= 1.02 * objective(*full) and objective(*early) < objective(c0, codes0)



# ----------------------------------------------------------------------------- the assignments' products
def _blocks(seed, rows=300, nb=24, d=4, k=64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows * nb, d))
    a = rng.standard_normal((nb, d, d))
    hb = a @ a.transpose(0, 2, 1) + 0.1 * np.eye(d)
    hx = np.einsum("bde,rbe->rbd", hb, x.reshape(rows, nb, d)).reshape(-1, d)
    c = rng.standard_normal((k, d))
    return x, hx, hb, c


@pytest.mark.parametrize("d", [2, 4, 9])
def test_metric_assign_is_the_nearest_centroid_under_each_block_metric(d):
    x, hx, hb, c = _blocks(d, d=d)
    nb = len(hb)
    got = km._metric_assign(hx, nb, c, hb)
    # float64 reference: (w − c)ᵀ H_b (w − c) for every centroid
    delta = x.reshape(-1, nb, 1, d) - c[None, None]
    dist = np.einsum("rbkd,bde,rbke->rbk", delta, hb, delta).reshape(len(x), -1)
    best = dist.argmin(1)
    srt = np.sort(dist, axis=1)
    clear = (srt[:, 1] - srt[:, 0]) > 1e-4 * np.abs(srt[:, 0]).max()
    assert clear.mean() > 0.95 and np.array_equal(got[clear], best[clear])
    rows = np.arange(len(x))
    assert dist[rows, got].sum() <= dist[rows, best].sum() * (1 + 1e-6)
    # the chunking and a block-major copy given beforehand change nothing
    assert np.array_equal(got, km._metric_assign(hx, nb, c, hb, chunk=37))
    assert np.array_equal(got, km._metric_assign(hx, nb, c, hb, ha=km.block_major(hx, nb)))


def test_nearest_scalar_with_the_index_given_is_the_same():
    rng = np.random.default_rng(4)
    c = np.round(rng.standard_normal(40), 1)   # repeated centroids: the lowest index wins, as argmin
    v = rng.standard_normal(5000) * 1.5
    ref = np.abs(v[:, None] - c[None, :]).argmin(1)
    assert np.array_equal(km.nearest_scalar(v, c), ref)
    assert np.array_equal(km.nearest_scalar(v, c, km.scalar_index(c)), ref)
    # the midpoints searched in the points sorted once (ties among the points, points on a midpoint)
    v[:50] = v[50]
    v[60] = 0.5 * (np.sort(c)[10] + np.sort(c)[11])
    ref = np.abs(v[:, None] - c[None, :]).argmin(1)
    assert np.array_equal(km.nearest_scalar(v, c, rank=km.ranked(v)), km.nearest_scalar(v, c))
    got = km.nearest_scalar(v, c, rank=km.ranked(v))
    assert np.array_equal(np.delete(got, 60), np.delete(ref, 60))   # v[60]: a tie either way
    assert abs(abs(v[60] - c[got[60]]) - abs(v[60] - c[ref[60]])) < 1e-12
    assert np.array_equal(km.nearest_scalar(v, c[:1], rank=km.ranked(v)), np.zeros(len(v)))


def test_scalar_kmeans_and_em_with_the_points_ranked_once_are_the_nearest_centroids():
    rng = np.random.default_rng(8)
    rows, nb = 200, 30
    x = rng.standard_normal((rows * nb, 1))
    hb = rng.uniform(0.5, 2.0, (nb, 1, 1))
    c, codes = km.kmeans(x, 16, 6, np.random.default_rng(0))
    assert np.array_equal(codes, np.abs(x - c[:, 0][None]).argmin(1))
    c2, codes2 = km.aware_em(x, np.tile(np.arange(nb), rows), hb, c, codes, 6)
    # scalar metric: h_b (w − c)², the nearest centroid whatever h_b
    assert np.array_equal(codes2, np.abs(x - c2[:, 0][None]).argmin(1))


def test_kmeans_with_the_augmented_points_given_is_the_same():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3000, 4))
    c = x[:32].copy()
    assert np.array_equal(km._sqdist_argmin(x, c), km._sqdist_argmin(x, c, xa=km.augmented(x)))
    c1, k1 = km.kmeans(x, 32, 5, np.random.default_rng(1))   # the codes are those of the centroids returned
    d2 = ((x[:, None] - c1[None]) ** 2).sum(-1)
    assert (d2[np.arange(len(x)), k1] - d2.min(1)).max() < 1e-5


# ----------------------------------------------------------------------------- screening the ladder
def test_screen_rows_are_spread_over_the_layer_and_small_layers_are_not_screened():
    from onnxshrink.passes.pq.quantize import screen_rows
    rows = screen_rows(1536, 96)
    assert len(rows) == 192 and rows[0] == 0 and rows[-1] == 1535 and (np.diff(rows) > 0).all()
    assert set(np.diff(rows)) <= {8, 9}                  # evenly spaced: every group of rows is seen
    assert len(screen_rows(1024, 8)) == 512             # 4096 sub-vectors at least
    assert screen_rows(64, 64) is None and screen_rows(1000, 4) is None   # half the rows or more: fitted in full


@pytest.mark.parametrize("d,k", [(4, 256), (2, 64), (1, 16), (2, 256), (1, 64)])
def test_screened_error_is_near_the_full_fits(d, k):
    from onnxshrink.passes.pq.config import PqConfig
    from onnxshrink.passes.pq.quantize import budget_error, quantize, screened_error
    rng, t, h = _problem(7, d_in=128, rows=768)
    t *= rng.uniform(0.2, 3.0, (len(t), 1))   # rows of unlike scales (gates of an LSTM matrix)
    cfg, cache = PqConfig(), {}
    est = screened_error(t, d, k, h, cfg, np.random.default_rng(1), np.float16, cache)
    _, _, t_hat = quantize(t, d, k, h, cfg, np.random.default_rng(0), np.float16, cache)
    full = budget_error(t, t_hat, h)
    assert 0.6 * full <= est <= 1.5 * full, (est, full)


def test_screening_keeps_the_per_layer_choice_and_the_written_model(monkeypatch):
    """The wide MLP under a budget its cheap settings miss by far: the screen skips their full
    fits, and the model is the one fitting every setting in full writes (the kept setting's
    codes come from the same full fit)."""
    from test_pq import FAST, _mlp_calib, _wide_mlp
    model, calib = _wide_mlp(), _mlp_calib()
    opts = {"pq": dict(FAST, max_error=2e-4, allocate=False)}

    def run():
        res = shrink(model, ["pq"], calibration=calib, force=True, options=opts)
        return res.model.SerializeToString(), res.report["passes"][0]["layers"]

    screened, layers = run()
    monkeypatch.setattr(pq_pass, "SCREEN_MARGIN", float("inf"))   # every setting fitted in full
    full, every = run()
    skipped = [t for i in layers.values() for t in i.get("tried", []) if t.get("screened")]
    assert skipped and all(t["rel_error"] > 3 * 2e-4 for t in skipped)
    assert {n: (i["block"], i["centroids"]) for n, i in layers.items()} == \
        {n: (i["block"], i["centroids"]) for n, i in every.items()}
    assert screened == full


def test_pq_bytes_are_counted_once_per_setting_until_forgotten(monkeypatch):
    from test_pq import _wide_mlp
    from onnxshrink.graph import import_graph
    from onnxshrink.passes.pq import sizes
    from onnxshrink.passes.pq.config import PqConfig
    from onnxshrink.passes.pq.layer import ladder, layer_of
    graph = import_graph(_wide_mlp())
    node = next(n for n in graph.nodes if n.op == "MatMul")
    layer, _ = layer_of(node, graph)
    fresh = sizes._pq_bytes(layer, 2, 64, np.float16, True, 6)
    calls = []
    real = sizes._pq_bytes
    monkeypatch.setattr(sizes, "_pq_bytes", lambda *a: calls.append(a[1:]) or real(*a))
    cfg = PqConfig()
    first = ladder(layer, 4, 256, cfg)
    n = len(calls)
    assert ladder(layer, 4, 256, cfg) == first and len(calls) == n > 0          # asked again: kept
    assert sizes.pq_bytes(layer, 2, 64, np.float16, True, 6) == fresh
    sizes.forget_bytes(layer)
    assert ladder(layer, 4, 256, cfg) == first and len(calls) == 2 * n


# ----------------------------------------------------------------------------- scalar codes on sorted points
def _weighted_lloyd(v, w, c, iters):
    """The reference: weighted 1-D Lloyd rounds over every point (the nearest centroid by a full
    distance table, per-code sums by bincount), as the EM ran before the points were sorted."""
    c = c.copy()
    codes = np.abs(v[:, None] - c[None, :]).argmin(1)
    for _ in range(iters):
        n = np.bincount(codes, minlength=len(c))
        s = np.bincount(codes, weights=w * v, minlength=len(c))
        ws = np.bincount(codes, weights=w, minlength=len(c))
        c[n > 0] = s[n > 0] / ws[n > 0]
        new = np.abs(v[:, None] - c[None, :]).argmin(1)
        if np.array_equal(new, codes):
            break
        codes = new
    return c, codes


def test_scalar_em_on_sorted_points_is_the_weighted_lloyd():
    rng = np.random.default_rng(9)
    rows, nb, k = 150, 40, 16
    x = np.concatenate([rng.standard_normal(rows * nb // 2), 3 + 0.2 * rng.standard_normal(rows * nb // 2)])
    rng.shuffle(x)
    x[:30] = x[30]                                   # ties among the points
    hb = rng.uniform(0.2, 5.0, nb)                   # each input block's metric h_b
    c0 = np.sort(rng.choice(x, k, replace=False))
    c, codes = km.aware_em(x[:, None], np.tile(np.arange(nb), rows), hb.reshape(nb, 1, 1), c0[:, None], None, 40, tol=0)
    ref_c, ref_codes = _weighted_lloyd(x, np.tile(hb, rows), c0, 40)
    assert np.allclose(c[:, 0], ref_c, rtol=1e-10, atol=1e-12)
    assert np.array_equal(codes, ref_codes)
    # codes given: the first M-step from them, the rest as above
    given = np.abs(x[:, None] - c0[None, :]).argmin(1)
    c2, codes2 = km.aware_em(x[:, None], np.tile(np.arange(nb), rows), hb.reshape(nb, 1, 1), c0[:, None], given, 40, tol=0)
    assert np.allclose(c2, c) and np.array_equal(codes2, codes)
    # plain k-means on scalars: unweighted rounds on the sample, then every point's nearest centroid;
    # assign=False leaves the assignment to the EM
    ck, kc = km.kmeans(x[:, None], k, 5, np.random.default_rng(0), sample=2000)
    assert np.array_equal(kc, np.abs(x[:, None] - ck[:, 0][None, :]).argmin(1))
    ck2, none = km.kmeans(x[:, None], k, 5, np.random.default_rng(0), sample=2000, assign=False)
    assert none is None and np.array_equal(ck, ck2)


# ----------------------------------------------------------------------------- settings nested in others
def test_nests_is_a_product_of_the_smaller_codebooks():
    from onnxshrink.passes.pq.quantize import nests
    assert nests((1, 64), (1, 16)) and nests((1, 256), (1, 64)) and nests((2, 256), (1, 16))
    assert nests((2, 256), (2, 64)) and nests((4, 256), (2, 16)) and nests((4, 256), (1, 4))
    assert not nests((2, 256), (1, 32))              # 32² codewords: more than 256
    assert not nests((2, 256), (4, 256)) and not nests((1, 256), (2, 64)) and not nests((1, 16), (1, 16))


def test_screens_skip_a_setting_nested_in_one_screened_far_over_the_budget(monkeypatch):
    """A setting nested in a later one whose screen is far over the budget is not screened itself
    (its estimate is the later one's); where the later one's screen is within, its own decides."""
    q = importlib.import_module("onnxshrink.passes.pq.quantize")
    est = {(4, 256): 50.0, (2, 256): 5.0, (2, 64): 20.0, (1, 16): 9.0, (1, 64): 0.5}
    asked = []
    monkeypatch.setattr(q, "screened_error", lambda t, d, k, *a: asked.append((d, k)) or est[(d, k)])
    order = [(4, 256), (2, 64), (1, 16), (2, 256), (1, 64)]
    s = q.Screens(None, None, None, None, {}, lambda: None, 3.0, order)
    assert s.over((4, 256)) == (50.0, (4, 256))     # nothing after it nests it
    assert s.over((2, 64)) == (5.0, (2, 256))       # (2, 256) screened first: over, so (2, 64) is too
    assert s.over((1, 16)) == (5.0, (2, 256))
    assert s.over((2, 256)) == (5.0, (2, 256)) and s.over((1, 64)) is None
    assert asked == [(4, 256), (2, 256), (1, 64)]   # each screened once, (2, 64) and (1, 16) never
    est[(2, 256)] = 2.0                              # within the margin: the nested ones screen themselves
    asked.clear()
    s = q.Screens(None, None, None, None, {}, lambda: None, 3.0, order)
    assert s.over((2, 64)) == (20.0, (2, 64)) and asked == [(2, 256), (2, 64)]


def test_nested_screens_keep_the_choice_of_every_setting_fitted_in_full(monkeypatch):
    """The wide MLP under a budget its low-bit settings miss by far: settings nested in one screened
    over the margin are not screened (fewer screens than with each setting screening itself), and
    each layer keeps the setting, and the codes, of a full fit of every setting (the same model)."""
    from test_pq import FAST, _mlp_calib, _wide_mlp
    q = importlib.import_module("onnxshrink.passes.pq.quantize")
    model, calib = _wide_mlp(), _mlp_calib()
    opts = {"pq": dict(FAST, max_error=1e-4, allocate=False)}
    screened = []
    real = q.screened_error
    monkeypatch.setattr(q, "screened_error", lambda t, d, k, *a: screened.append((d, k)) or real(t, d, k, *a))

    def run():
        screened.clear()
        res = shrink(model, ["pq"], calibration=calib, force=True, options=opts, threads=1)
        return res.model.SerializeToString(), res.report["passes"][0]["layers"], len(screened)

    nested, layers, n_nested = run()
    by = [t for i in layers.values() for t in i.get("tried", []) if t.get("screened_as")]
    assert by and all(q.nests(tuple(t["screened_as"]), (t["block"], t["centroids"])) for t in by)
    assert all(t["rel_error"] > 3 * 1e-4 for t in by)
    monkeypatch.setattr(q, "nests", lambda a, b: False)                    # each setting screens itself
    own, _, n_own = run()
    assert n_nested < n_own and own == nested
    monkeypatch.setattr(pq_pass, "SCREEN_MARGIN", float("inf"))            # every setting fitted in full
    full, every, _ = run()
    assert {n: (i["block"], i["centroids"]) for n, i in layers.items()} == \
        {n: (i["block"], i["centroids"]) for n, i in every.items()}
    assert nested == full
