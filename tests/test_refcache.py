"""calibrate.TensorCache: the reference model's tensors kept across runs (refit levels, rounds),
under a byte cap, giving the statistics that running the reference again gives."""

import os
import tempfile

import numpy as np
import pytest
from graphs import disturbed_gemms, gemm_chain, refit_gemms

from onnxshrink.calibrate import CACHE_ENV, DataSource, TensorCache, collect, reference_cache_bytes
from onnxshrink.errors import InputError
from onnxshrink.graph import import_graph
from onnxshrink.layers import WeightLayer
from onnxshrink.pipeline import PassContext


def _chain(seed):
    """x(N,8) -> Gemm(8->16) -> Relu -> Gemm(16->16) -> Relu -> Gemm(16->4) -> y"""
    return gemm_chain(seed, (8, 16, 16, 4))


def _disturbed(model, rng):
    return disturbed_gemms(model, rng)


def _requests(model):
    graph = import_graph(model)
    return [WeightLayer(n, graph).stats_request(n.name) for n in graph.nodes if n.op == "Gemm"]


def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        for f in ("n",):
            assert getattr(a[k], f) == getattr(b[k], f)
        for f in ("sum_y", "xy", "yy"):
            np.testing.assert_allclose(getattr(a[k], f), getattr(b[k], f), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(a[k].x.outer, b[k].x.outer, rtol=1e-6, atol=1e-9)


def test_cached_reference_gives_the_statistics_of_running_it(rng):
    ref = _chain(0)
    bad = _disturbed(ref, rng)
    data = DataSource({"x": rng.standard_normal((130, 8)).astype(np.float32)})
    reqs = _requests(ref)
    plain = collect(data, reqs, bad, ref, batch_size=32)
    cache = TensorCache(ref, 1 << 30)
    cache.want([r.y_tensor for r in reqs[1:]])
    first = collect(data, reqs[:1], bad, ref, batch_size=32, cache=cache)
    assert cache.runs == 1 and sorted(cache.held) == sorted(r.y_tensor for r in reqs)
    assert all(len(v) == 5 for v in cache.held.values())          # 130 samples in batches of 32
    again = collect(data, reqs, bad, ref, batch_size=32, cache=cache)
    assert cache.runs == 1                                         # every target served from the cache
    _same(plain, {**first, **{k: v for k, v in again.items() if k != reqs[0].key}})
    _same(plain, again)
    held = next(iter(cache.held.values()))[0]
    assert not held.flags.writeable
    # another batch size: nothing held applies, the reference runs again
    other = collect(data, reqs, bad, ref, batch_size=50, cache=cache)
    assert cache.runs == 2
    _same(collect(data, reqs, bad, ref, batch_size=50), other)


def test_cache_stays_under_its_cap_and_gives_the_same_statistics(rng):
    ref = _chain(1)
    bad = _disturbed(ref, rng)
    data = DataSource({"x": rng.standard_normal((200, 8)).astype(np.float32)})
    reqs = _requests(ref)
    # the 16-wide targets take 200·16·4 = 12800 bytes each, the last one 3200: room for one wide
    # one; those wanted ahead are kept first (in their order), then the ones the run itself reads
    cache = TensorCache(ref, 14000)
    cache.want([r.y_tensor for r in reqs[1:]])
    got = collect(data, reqs[:1], bad, ref, batch_size=64, cache=cache)
    assert cache.nbytes <= cache.cap
    assert list(cache.held) == [reqs[1].y_tensor] and cache.nbytes == 12800
    assert cache.refused == {reqs[0].y_tensor, reqs[2].y_tensor}
    rest = collect(data, reqs, bad, ref, batch_size=64, cache=cache)
    assert cache.runs == 2 and cache.nbytes <= cache.cap        # the ones not held ran again
    _same(collect(data, reqs, bad, ref, batch_size=64), {**rest, **got})


def test_cap_from_the_environment(monkeypatch):
    monkeypatch.setenv(CACHE_ENV, "2")
    assert reference_cache_bytes() == 2 << 20
    monkeypatch.setenv(CACHE_ENV, "0")
    assert reference_cache_bytes() == 0
    monkeypatch.setenv(CACHE_ENV, "lots")
    with pytest.raises(InputError, match=CACHE_ENV):
        reference_cache_bytes()


def _refit(ref, bad, data):
    ctx = PassContext(data, ref, ref, batch_size=40)
    return refit_gemms(ctx, ref, bad, 1e-6), ctx


def test_refit_runs_the_reference_once_and_writes_the_same_model(rng, monkeypatch, tmp_path):
    ref = _chain(2)
    bad = _disturbed(ref, rng)
    data = DataSource({"x": rng.standard_normal((160, 8)).astype(np.float32)})
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))     # where a spill would go
    cached, ctx = _refit(ref, bad, data)
    assert ctx.reference_cache.runs == 1 and ctx.calibration_runs == 3
    assert len(ctx.reference_cache.held) == 3
    assert os.listdir(tmp_path) == []                            # no file left behind
    monkeypatch.setenv(CACHE_ENV, "0")
    plain, ctx0 = _refit(ref, bad, data)
    assert ctx0.reference_cache is None and ctx0.calibration_runs == 3
    assert cached.SerializeToString() == plain.SerializeToString()


def test_where_fetching_changes_values_only_a_repeated_run_is_served(rng):
    """Conv → BatchNormalization: ONNX Runtime folds the BN into the Conv unless the Conv's output
    is fetched, so a tensor's value depends on what else a run fetches; the cache then serves a
    run only the tensors fetched by a run that fetched exactly the same ones, and fetches nothing
    ahead: what is served is bit for bit what running again gives."""
    from graphs import conv_bn_net

    from onnxshrink.calibrate import fetch_independent
    from onnxshrink.stats import ResponseStats
    ref = conv_bn_net(3)
    assert not fetch_independent(ref) and fetch_independent(_chain(0))
    convs = [n.output[0] for n in ref.graph.node if n.op_type == "Conv"]
    bns = [n.output[0] for n in ref.graph.node if n.op_type == "BatchNormalization"]
    data = DataSource({"input": rng.standard_normal((40, 3, 8, 8)).astype(np.float32)})

    class Y(ResponseStats):   # responses of a reference tensor, read as a target
        def tensors(self):
            return {"x": [], "y": [self.tensor]}

        def new(self, xa, ya):
            return super().new(ya, xa)

        def update(self, acc, xa, ya, rng):
            super().update(acc, ya, xa, rng)

    late = [Y(bns[1], "spatial_mean")]
    cache = TensorCache(ref, 1 << 30)
    cache.want(convs)
    assert cache.ahead == []                                      # nothing fetched ahead here
    a = collect(data, late, ref, ref, batch_size=16, cache=cache)
    b = collect(data, late, ref, ref, batch_size=16, cache=cache)
    assert cache.runs == 1                                        # the same run again: served
    both = [Y(convs[0], "spatial_mean")] + late
    c = collect(data, both, ref, ref, batch_size=16, cache=cache)
    assert cache.runs == 2                                        # another set of tensors: run again
    alone = collect(data, late, ref, ref, batch_size=16)
    for got in (a, b):
        np.testing.assert_array_equal(got[late[0].key].outer, alone[late[0].key].outer)
    np.testing.assert_array_equal(c[late[0].key].outer, collect(data, both, ref, ref, batch_size=16)[late[0].key].outer)


def test_a_budget_search_reuses_the_first_pass_reference_tensors(rng):
    """Two chains from the same model and data (a budget search's steps): the second one's pass
    reads every target of the reference from the cache the first one left."""
    from onnxshrink import pipeline
    from onnxshrink.budget import Budget
    from onnxshrink.calibrate import from_feeds
    from onnxshrink.cost import model_cost
    from onnxshrink.registry import get_pass, make_config
    from onnxshrink.validate import Tolerances
    ref = _chain(4)
    data = from_feeds([{"x": rng.standard_normal((20, 8)).astype(np.float32)} for _ in range(6)])
    p = get_pass("pfa")
    budget = Budget.of({"params": 0.7}, [p]).at(model_cost(ref, data.signatures()))
    call = pipeline._Call([(p, make_config(p, {}))], budget, data, None, Tolerances(), True, True, 64, 0, 0.0,
                          [], {}, ref)
    shapes = dict(data.signatures()[0]["inputs"])
    out1, reps1 = pipeline._chain(ref, ref, call, budget, data.signatures(), shapes)
    first = reps1[0].details["reference_cache"]
    assert first["runs"] >= 1 and first["tensors"] >= 1 and first["ahead"]
    out2, reps2 = pipeline._chain(ref, ref, call, budget, data.signatures(), shapes)
    assert reps2[0].details["reference_cache"]["runs"] == first["runs"]   # no run of the reference
    assert out1.SerializeToString() == out2.SerializeToString()


def test_one_run_serves_both_sides_of_the_same_model(rng, monkeypatch):
    """x and y from the reference itself (a refit's first level): one session, the same statistics."""
    from onnxshrink import calibrate
    ref = _chain(5)
    data = DataSource({"x": rng.standard_normal((70, 8)).astype(np.float32)})
    reqs = _requests(ref)
    plain = collect(data, reqs, ref, ref, batch_size=32)
    made = []
    real = calibrate._Runner.__init__

    def counting(self, model, names):
        real(self, model, names)
        made.append(self.sess is not None)
    monkeypatch.setattr(calibrate._Runner, "__init__", counting)
    cache = TensorCache(ref, 1 << 30)
    got = collect(data, reqs, ref, ref, batch_size=32, cache=cache)
    assert made == [True] and cache.runs == 1 and len(cache.held) == 3
    for k in plain:
        np.testing.assert_array_equal(plain[k].xy, got[k].xy)
        np.testing.assert_array_equal(plain[k].x.outer, got[k].x.outer)
