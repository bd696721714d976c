"""hadamard pass: in-graph Walsh–Hadamard transform, Fastfood blocks, fitting, MLP accuracy."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from scipy.linalg import hadamard

from graphs import GraphBuilder
from onnxshrink import shrink
from onnxshrink.cost import model_cost
from onnxshrink.graph import export_model, import_graph
from onnxshrink.lstsq import fit_error_rows
from onnxshrink.passes import hadamard as hp
from onnxshrink.passes.hadamard import next_pow2, wht_model
from onnxshrink.validate import Tolerances


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("d_in", [1, 2, 3, 8, 13, 64, 100, 512, 1000])
def test_wht_subgraph_equals_scipy_hadamard(d_in):
    rng = np.random.default_rng(d_in)
    x = rng.standard_normal((5, d_in)).astype(np.float32)
    model = wht_model(d_in)
    onnx.checker.check_model(model, full_check=True)
    d = next_pow2(d_in)
    # no d × d matrix anywhere in the graph (only Kronecker factors)
    assert all(np.prod(t.dims) < d * d or d <= 2 for t in model.graph.initializer if len(t.dims) == 2)
    xp = np.zeros((5, d))
    xp[:, :d_in] = x
    (y,) = _run(model, {"x": x})
    assert y.shape == (5, d)
    np.testing.assert_allclose(y, (hadamard(d) @ xp.T).T, rtol=1e-5, atol=1e-5 * np.sqrt(d))


def _random_fit(d_in, d_out, K, r, seed=0):
    rng = np.random.default_rng(seed)
    fit = hp.FastfoodFit(d_in, d_out, seed)
    for j in range(fit.n_stack):
        for k in range(K):
            blk = hp.Block(fit.d, rng, fit._mask(j), fit.perm(j, k))
            blk.b, blk.g = rng.standard_normal(fit.d), rng.standard_normal(fit.d)
            blk.s = np.where(blk.mask, rng.standard_normal(fit.d), 0.0)
            fit.blocks[j].append(blk)
    fit.u = rng.standard_normal((d_in, r)) / np.sqrt(d_in)
    fit.vt = rng.standard_normal((r, d_out))
    fit.mx, fit.my = rng.standard_normal(d_in), rng.standard_normal(d_out)
    return fit


def _explicit_dense(fit):
    """Σ_k S H G Π H B per stack, built with explicit matrices (the numpy reference)."""
    d = fit.d
    h = hadamard(d) / np.sqrt(d)
    rows = []
    for bl in fit.blocks:
        v = np.zeros((d, d))
        for blk in bl:
            p = np.eye(d)[blk.perm]              # (P z)_i = z[perm[i]]
            v += np.diag(blk.s) @ h @ np.diag(blk.g) @ p @ h @ np.diag(blk.b)
        rows.append(v)
    v = np.concatenate(rows)[: fit.d_out, : fit.d_in]
    return v.T + fit.u @ fit.vt                  # d_in × d_out


@pytest.mark.parametrize("d_in,d_out,K,r,lead", [(64, 64, 1, 0, ()), (48, 200, 2, 3, ()),
                                                 (100, 20, 3, 0, (4,)), (16, 16, 1, 2, (2, 3))])
def test_fastfood_block_graph_reproduces_dense_equivalent(d_in, d_out, K, r, lead):
    fit = _random_fit(d_in, d_out, K, r)
    w, bias = fit.dense()
    np.testing.assert_allclose(w, _explicit_dense(fit), atol=1e-10)
    # a MatMul/Gemm layer holding exactly that matrix, rewritten into the Fastfood subgraph
    b = GraphBuilder(0)
    x = b.input("x", ["N", *lead, d_in])
    if lead:
        y = b.node("Add", [b.node("MatMul", [x, b.const(w.astype(np.float32), "w")]),
                           b.const(bias.astype(np.float32), "b")], out="y")
    else:
        y = b.node("Gemm", [x, b.const(w.astype(np.float32), "w"), b.const(bias.astype(np.float32), "b")], out="y")
    b.output(y, ["N", *lead, d_out])
    model = b.model()
    graph = import_graph(model)
    node = next(n for n in graph.nodes if n.op in ("Gemm", "MatMul"))
    if node.op == "MatMul":
        fit.my = fit.mx @ w  # the MatMul itself has no bias: the Add after it keeps it
    hp.replace(graph, node, fit, {}, 17)
    new = export_model(graph, like=model)
    onnx.checker.check_model(new, full_check=True)
    assert not any(n.op_type in ("Gemm",) for n in new.graph.node)
    feeds = {"x": np.random.default_rng(1).standard_normal((3, *lead, d_in)).astype(np.float32)}
    (a,), (c,) = _run(model, feeds), _run(new, feeds)
    assert c.shape == a.shape
    np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fitting_recovers_planted_fastfood(seed):
    d, n = 32, 300
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    plant = _random_fit(d, d, 1, 0, seed=7)     # block (0, 0) uses the fit's fixed permutation
    plant.mx, plant.my = np.zeros(d), np.full(d, 0.5)
    y = plant.predict(x)
    fit = hp.FastfoodFit(d, d, seed=7)
    fit.set_data(x, y)
    xc, yc = x - fit.mx, y - fit.my
    fit.add_block(xc, yc, xc.T @ xc, iters=10, ridge=1e-9, cg=0, restarts=16)
    fit.backfit(xc, xc, yc, xc.T @ xc, 40, 1e-9, cg=0)
    assert fit_error_rows(fit.predict(x), y, y.mean(0)) < 1e-8
    np.testing.assert_allclose(fit.dense()[0], plant.dense()[0], atol=1e-4)


def test_als_step_never_increases_error():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 64))
    t = x @ rng.standard_normal((64, 64)) / 8
    blk = hp.Block(64, rng, np.ones(64, bool), rng.permutation(64))
    errs = []
    for _ in range(6):
        blk.step(x.T @ x, x.T @ t, 1e-9, cg=10)
        errs.append(((blk.out(x) - t) ** 2).sum())
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 0.9 * (t ** 2).sum()


def test_block_moments_match_rows():
    """The sweeps work on d × d moments: the squared error, Xᵀ(out) and diag(H M H) they use equal
    the row computations (and the xor form equals the two transforms)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((150, 32))
    t = x @ rng.standard_normal((32, 32)) / 6 + 0.1 * rng.standard_normal((150, 32))
    blk = hp.Block(32, rng, np.arange(32) < 30, rng.permutation(32))
    xtx, q = x.T @ x, x.T @ t
    blk.step(xtx, q, 1e-9, cg=0)
    out = blk.out(x)
    assert np.all(out[:, 30:] == 0)
    assert blk.sq_error(xtx, q, float((t * t).sum()), 1e-9) == pytest.approx(((out - t) ** 2).sum(), rel=1e-9)
    np.testing.assert_allclose(blk.gram_out(xtx), x.T @ out, atol=1e-9 * np.abs(x.T @ out).max())
    m = rng.standard_normal((32, 32))
    from onnxshrink.passes.hadamard.transform import diag_hmh, hh
    h = hadamard(32) / np.sqrt(32)
    np.testing.assert_allclose(hh(m), h @ m @ h, atol=1e-12)
    np.testing.assert_allclose(diag_hmh(m), np.diag(h @ m @ h), atol=1e-12)


def test_sweeps_from_rows_and_from_moments_agree(monkeypatch):
    """Few rows: the sweeps read the rows; many: the d × d moments. Both fit the same blocks."""
    import onnxshrink.passes.hadamard.fastfood as ff
    rng = np.random.default_rng(3)
    x = rng.standard_normal((120, 24))
    y = x @ rng.standard_normal((24, 40)) / 5 + 0.05 * rng.standard_normal((120, 40))
    fits = []
    for rows in (1, 1000):   # moments from 1 row per width; the rows below 1000
        monkeypatch.setattr(ff, "MOMENT_ROWS", rows)
        fit = hp.FastfoodFit(24, 40, seed=1)
        fit.set_data(x, y)
        xc, yc = x - fit.mx, y - fit.my
        xp = fit.pad(xc)
        assert fit.moments(xp) == (rows == 1)
        resid = fit.add_block(xp, yc, xp.T @ xp, iters=3, ridge=1e-6, cg=0, restarts=2)
        fit.add_block(xp, resid, xp.T @ xp, iters=3, ridge=1e-6, cg=0, restarts=1)
        fit.backfit(xp, xc, yc, xp.T @ xp, 2, 1e-6, cg=0)
        fits.append(fit.predict(x))
    np.testing.assert_allclose(fits[0], fits[1], atol=1e-6 * np.abs(fits[1]).max())


def _sequence_mlp():
    """(model, calibration): two MatMuls on (N, 4, 64) sequences, 64 -> 128 -> 8, and 200 random
    sequences."""
    b = GraphBuilder(3)
    x = b.input("x", ["N", 4, 64])
    h = b.relu(b.matmul(x, 64, 128))
    b.matmul(h, 128, 8, out="y")
    b.output("y", ["N", 4, 8])
    return b.model(), np.random.default_rng(0).standard_normal((200, 4, 64)).astype(np.float32)


def test_sequence_matmul_layer_and_skips():
    model, calib = _sequence_mlp()
    res = shrink(model, ["hadamard"], calibration=calib, options={"hadamard": {"tolerance": 0.9, "rank": 4, "output_error": 0}},
                 tolerances=Tolerances(min_cosine=None), force=True)
    rep = res.report["passes"][0]
    first = next(n.name for n in model.graph.node if n.op_type == "MatMul")
    assert any(c.startswith(first) and "Fastfood" in c for c in rep["changed"])
    assert any("min_dim" in s["reason"] for s in rep["skipped"])
    lay = rep["layers"][first]
    assert lay["holdout_error"] <= 0.9
    feeds = {"x": calib[:16]}
    (a,), (c,) = _run(model, feeds), _run(res.model, feeds)
    assert c.shape == a.shape
    assert np.linalg.norm(c - a) / np.linalg.norm(a) < 1.0


def test_parallel_layers_share_one_calibration_run():
    """Three projections of one input (an attention's query, key and value) are one level: one
    run gathers their rows, all three are replaced, and the next layer is refit on a second run."""
    b = GraphBuilder(5)
    x = b.input("x", ["N", 64])
    q, k, v = (b.matmul(x, 64, 64) for _ in range(3))
    h = b.node("Add", [b.node("Add", [q, k]), v])
    b.matmul(h, 64, 4, out="y")
    b.output("y", ["N", 4])
    model = b.model()
    calib = np.random.default_rng(0).standard_normal((300, 64)).astype(np.float32)
    res = shrink(model, ["hadamard"], calibration=calib, options={"hadamard": {"tolerance": 0.9, "rank": 2, "output_error": 0, "refit": True}},
                 tolerances=Tolerances(min_cosine=None), force=True)
    rep = res.report["passes"][0]
    names = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    assert sum("Fastfood" in c for c in rep["changed"]) == 3
    assert all(rep["layers"][n].get("replaced") for n in names[:3])
    assert rep["calibration_runs"] == 2   # one per level (four when each layer was its own level)
    feeds = {"x": calib[:16]}
    (a,), (c,) = _run(model, feeds), _run(res.model, feeds)
    assert np.linalg.norm(c - a) / np.linalg.norm(a) < 1.0


def test_mlp_accuracy_params_and_downstream_refit():
    from models import digits
    model = onnx.load(digits.model_path("mlp"))
    split = digits.load_split()
    calib = digits.to_model_input(split["x_train"][:512], "mlp")
    val = digits.to_model_input(split["x_train"][512:768], "mlp")
    res = shrink(model, ["hadamard"], calibration=calib, validation=val,
                 options={"hadamard": {"blocks": 1, "rank": 16, "final_iters": 1, "refit": True}},
                 tolerances=Tolerances(min_cosine=None), force=True)
    rep = res.report["passes"][0]
    fc2 = rep["layers"]["/fc2/Gemm"]
    assert fc2.get("replaced") and fc2["blocks"] == 1 and fc2["rank"] == 16
    assert fc2["dense_params"] >= 4 * fc2["params"]
    assert rep["layers"]["/fc3/Gemm"].get("refit")            # downstream layer refit
    assert not any(n.op_type == "Gemm" and "fc2" in n.name for n in res.model.graph.node)
    assert res.report["validation"]["tensorrt_unparseable"] == []
    before = digits.accuracy(model, "mlp")
    after = digits.accuracy(res.model, "mlp")
    assert after >= before - 0.02, (before, after)
    shapes = {"input": (64,)}
    assert model_cost(res.model, shapes)["params"] < 0.15 * model_cost(model, shapes)["params"]


def test_dense_refit_of_layers_sharing_weights_and_bias():
    """A layer kept dense and refit after the replacement of the layer feeding it gets its own new
    weights even where the original ones were shared initializers (x → MatMul → Gemm(w, b) → Gemm(w, b))."""
    def net(shared):
        b = GraphBuilder(4)
        x = b.input("x", ["N", 64])
        h = b.relu(b.matmul(x, 64, 64))
        w = (b.rng.standard_normal((64, 64)) / 8).astype(np.float32)
        c = np.full(64, 0.1, np.float32)
        one_w, one_c = b.const(w, "w"), b.const(c, "b")
        for _ in range(2):
            h = b.relu(b.node("Gemm", [h, one_w if shared else b.const(w, "w"), one_c if shared else b.const(c, "b")]))
        b.node("Identity", [h], out="y")
        b.output("y", ["N", 64])
        return b.model()

    calib = np.random.default_rng(0).standard_normal((600, 64)).astype(np.float32)   # rows enough for a 64-wide refit
    opts = {"hadamard": {"tolerance": 0.95, "blocks": 1, "rank": 16, "max_params": 1.0, "output_error": 0, "refit": True}}
    res = shrink(net(True), ["hadamard"], calibration=calib, options=opts, tolerances=Tolerances(min_cosine=None),
                 force=True)
    layers = res.report["passes"][0]["layers"]
    refit = [k for k, v in layers.items() if k.startswith("gemm") and v.get("refit")]
    assert len(refit) == 1   # the Gemm the replaced MatMul feeds; not the one after it
    shared = res.model
    assert len({t.name for t in shared.graph.initializer}) == len(shared.graph.initializer)
    gemms = [n for n in shared.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 2 and gemms[0].input[1] != gemms[1].input[1]   # the refit one has its own weights
    before = {t.name: onnx.numpy_helper.to_array(t) for t in net(True).graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in shared.graph.initializer}
    np.testing.assert_array_equal(after[gemms[1].input[1]], before[gemms[1].input[1]])   # the other kept as it was
    out = _run(shared, {"x": calib[:16]})[0]
    assert out.shape == (16, 64) and np.isfinite(out).all()


def _three_layer(seed=5):
    """x(N,64) -> MatMul 64x64 -> Relu -> MatMul 64x64 -> Relu -> MatMul 64x64 -> y"""
    b = GraphBuilder(seed)
    h = b.input("x", ["N", 64])
    for last in (False, False, True):
        h = b.matmul(h, 64, 64, out="y" if last else None)
        h = h if last else b.relu(h)
    b.output(h, ["N", 64])
    return b.model()


def test_no_change_takes_one_calibration_run_and_unaffordable_is_decided_before_fitting():
    """Random dense layers no Fastfood structure fits within a tight tolerance: nothing changes,
    and the rows of all three layers come from one calibration run. With max_params below one
    block, the plan refuses every layer and no run happens at all."""
    calib = np.random.default_rng(0).standard_normal((120, 64)).astype(np.float32)
    res = shrink(_three_layer(), ["hadamard"], calibration=calib, options={"hadamard": {"tolerance": 1e-4}},
                 force=True)
    rep = res.report["passes"][0]
    assert rep["changed"] == [] and len(rep["layers"]) == 3
    assert rep["calibration_runs"] == 1
    res = shrink(_three_layer(), ["hadamard"], calibration=calib, options={"hadamard": {"max_params": 0.01}},
                 force=True)
    rep = res.report["passes"][0]
    assert rep["calibration_runs"] == 0 and rep["layers"] == {}
    assert all("above hadamard.max_params" in s["reason"] for s in rep["skipped"])


def test_search_seconds_bounds_the_search_and_keeps_the_best_so_far():
    """A time budget that is spent at once: the search stops after its first fit and says so; a
    structure within tolerance found by then is used."""
    x = np.random.default_rng(1).standard_normal((400, 64))
    w = np.random.default_rng(2).standard_normal((64, 64)) / 8
    y = x @ w
    cfg = hp.HadamardConfig(tolerance=0.9, search_seconds=1e-9)
    fit, info = hp.choose_structure(x, y, cfg, 64 * 64 + 64)
    assert info["search_stopped_by"] == "search_seconds=1e-09"
    assert len(info["tried"]) == 1 and fit is not None and info["holdout_error"] <= 0.9
    free = hp.choose_structure(x, y, hp.HadamardConfig(tolerance=0.9, search_seconds=0), 64 * 64 + 64)[1]
    assert "search_stopped_by" not in free and len(free["tried"]) > 1
    with pytest.raises(ValueError):
        hp.HadamardConfig(search_seconds=-1)


def test_time_budget_spent_leaves_the_remaining_layers_dense():
    calib = np.random.default_rng(0).standard_normal((120, 64)).astype(np.float32)
    res = shrink(_three_layer(), ["hadamard"], calibration=calib,
                 options={"hadamard": {"tolerance": 0.9, "time_budget": 1e-9, "output_error": 0}}, force=True)
    rep = res.report["passes"][0]
    assert rep["changed"] == [] and rep["calibration_runs"] == 0
    assert sum("time_budget" in s["reason"] for s in rep["skipped"]) == 3
    with pytest.raises(ValueError):
        hp.HadamardConfig(time_budget=-1)


def test_output_error_budget_keeps_a_layer_dense_whose_replacement_the_outputs_feel():
    """A structure within the layer's own (loose) tolerance that moves the model's outputs past
    hadamard.output_error is not kept: the layer stays dense, the skip gives the measured error."""
    model, calib = _sequence_mlp()
    first = next(n.name for n in model.graph.node if n.op_type == "MatMul")
    res = shrink(model, ["hadamard"], calibration=calib, tolerances=Tolerances(min_cosine=None), force=True,
                 options={"hadamard": {"tolerance": 0.9, "rank": 4, "output_error": 0.01}})
    rep = res.report["passes"][0]
    lay = rep["layers"][first]
    assert lay["holdout_error"] <= 0.9 and lay["output_error"] > 0.01
    assert "replaced" not in lay
    assert not any("Fastfood" in c for c in rep["changed"])
    reason = next(s["reason"] for s in rep["skipped"] if s["node"] == first)
    assert "hadamard.output_error=0.01" in reason
    assert res.report["ratios"]["params"] == 1.0
    # the budget measures what validation then sees: the same structure, allowed, moves the outputs that much
    res2 = shrink(model, ["hadamard"], calibration=calib, tolerances=Tolerances(min_cosine=None), force=True,
                  options={"hadamard": {"tolerance": 0.9, "rank": 4, "output_error": 1.0}})
    lay2 = res2.report["passes"][0]["layers"][first]
    assert lay2["replaced"] and lay2["output_error"] == lay["output_error"]
    feeds = {"x": calib[:16]}
    (a,), (c,) = _run(model, feeds), _run(res2.model, feeds)
    assert np.linalg.norm(c - a) ** 2 / np.linalg.norm(a) ** 2 > 0.01


def test_blocks_from_moments_alone_match_blocks_from_rows():
    """add_block_moments carries Xᵀ(residual) per stack instead of the residual rows: the blocks it
    fits are those add_block fits (with moments) from the rows."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((400, 24))
    y = x @ rng.standard_normal((24, 40)) / 5 + 0.05 * rng.standard_normal((400, 40))
    fits = [hp.FastfoodFit(24, 40, seed=2) for _ in range(2)]
    xc, yc = x - x.mean(0), y - y.mean(0)
    xp = fits[0].pad(xc)
    xtx = xp.T @ xp
    assert fits[0].moments(xp)
    resid = yc
    qs = fits[1].stack_moments(xp.T @ yc)
    for restarts in (2, 1):
        resid = fits[0].add_block(xp, resid, xtx, iters=3, ridge=1e-6, cg=0, restarts=restarts)
        qs = fits[1].add_block_moments(xtx, qs, iters=3, ridge=1e-6, cg=0, restarts=restarts)
    np.testing.assert_allclose(fits[1].blocks_out(xp), fits[0].blocks_out(xp), atol=1e-8 * np.abs(yc).max())
    for j, q in enumerate(qs):   # the moments carried are those of the residual rows
        np.testing.assert_allclose(q, xp.T @ fits[0]._cols(resid, j), atol=1e-7 * np.abs(q).max())


def test_rank_the_blocks_cannot_reach_is_refused_before_any_block_fit(monkeypatch):
    """A layer whose low-rank part alone is far from tolerance at every affordable rank (a random
    dense layer): no block is fitted (``block_gain``), decided by the held-out targets' spectrum
    alone (a lower bound of every rank's low-rank error, Eckart–Young), before the inputs are
    decomposed; without that bound the low-rank errors themselves refuse the same ranks, each at
    least its bound. With the check off, the search fits blocks and finds the same: nothing within
    tolerance."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((600, 64))
    y = x @ rng.standard_normal((64, 64))
    cfg = hp.HadamardConfig(tolerance=0.03)
    fit, info = hp.choose_structure(x, y, cfg, 64 * 64 + 64)
    assert fit is None and info["tried"] == [] and info["unreachable"] == "hadamard.block_gain=0.8"
    assert info["bound"] and "lowrank_errors" not in info
    k_max = 5   # the most blocks affordable beside any rank within a quarter of 64·64+64 params: (1040 − 64) // 192
    bounds = info["lowrank_bounds"]   # rank 8 with one block is above a quarter
    assert sorted(bounds) == [0, 1, 2, 4] and all(b * 0.8 ** k_max > 0.03 for b in bounds.values())
    assert info["best_error"] == min(bounds.values())
    with monkeypatch.context() as m:   # the bound off: the decomposition decides, the same way
        m.setattr(hp.search._Search, "bounded", lambda self: self.ranks)
        fit1, info1 = hp.choose_structure(x, y, cfg, 64 * 64 + 64)
    assert fit1 is None and info1["tried"] == [] and info1["unreachable"] == "hadamard.block_gain=0.8"
    errors = info1["lowrank_errors"]
    assert all(e * 0.8 ** k_max > 0.03 for e in errors.values())
    assert all(bounds[r] <= errors[r] for r in bounds) and bounds[4] > 0.5 * errors[4]
    fit2, info2 = hp.choose_structure(x, y, hp.HadamardConfig(tolerance=0.03, block_gain=0), 64 * 64 + 64)
    assert fit2 is None and len(info2["tried"]) >= 1 and info2["best_error"] > 0.03
    with pytest.raises(ValueError):
        hp.HadamardConfig(block_gain=1.5)


def test_held_out_rows_are_those_of_whole_units():
    from onnxshrink.passes.hadamard.search import held_out, held_out_rows
    units = held_out(10, 2)
    assert np.flatnonzero(units).tolist() == [4, 9]
    rows = held_out_rows(30, units)   # three rows a unit, in unit order
    assert np.flatnonzero(rows).tolist() == [12, 13, 14, 27, 28, 29]


def test_budget_and_refits_see_only_units_no_fit_saw():
    """With enough calibration units, whole units are held out: the structure search judges on their
    rows (all four rows of a held-out sequence), and the output-error budget is measured on those
    units alone."""
    import re
    model, calib = _sequence_mlp()
    first = next(n.name for n in model.graph.node if n.op_type == "MatMul")
    res = shrink(model, ["hadamard"], calibration=calib, tolerances=Tolerances(min_cosine=None), force=True,
                 options={"hadamard": {"tolerance": 0.9, "rank": 4, "output_error": 1e-6}})
    rep = res.report["passes"][0]
    lay = rep["layers"][first]
    units = lay["rows"] // 4   # the sequences calibration holds (the pipeline keeps some for validation)
    reason = next(s["reason"] for s in rep["skipped"] if s["node"] == first)
    probed = int(re.search(r"measured on (\d+) calibration samples no fit saw", reason).group(1))
    assert probed == round(0.2 * units) and lay["held_out_rows"] == 4 * probed
    from onnxshrink.passes.hadamard.pass_ import held_out_units
    from types import SimpleNamespace
    from onnxshrink.calibrate import DataSource
    few = SimpleNamespace(data=DataSource({"x": calib[:4]}), reference=model)
    assert held_out_units(few, 0.2) is None   # four units: rows spread over them instead


def test_largest_rank_within_tolerance_alone_is_fitted_only_when_no_smaller_rank_fits():
    """Where the low-rank part alone is within tolerance at the largest affordable rank, that rank is
    not fitted first: the bisection finds a smaller rank that fits (no structure at the largest rank
    in ``tried``), or, where none does, the largest rank is fitted last and is the structure, the
    same fit as a search at that rank alone."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 128))
    noise = rng.standard_normal((128, 128)) * 0.01
    low4 = rng.standard_normal((128, 4)) @ rng.standard_normal((4, 128))
    cfg = hp.HadamardConfig(tolerance=0.03)
    dense = 128 * 128 + 128
    fit, info = hp.choose_structure(x, x @ (low4 + noise), cfg, dense)
    top = max(int(r) for r in info["lowrank_errors"])   # 8: rank 16 with a block is above max_params
    assert top == 8 and info["lowrank_errors"][top] <= 0.03
    assert fit is not None and info["rank"] == 4 and info["holdout_error"] <= 0.03
    assert all(t["rank"] < top for t in info["tried"]) and info["tried"]
    extra = rng.standard_normal((128, 4)) @ rng.standard_normal((4, 128))
    y = x @ (low4 + 0.35 * extra + noise)   # rank 4 leaves a tenth: within reach of blocks by the bound, not in fact
    fit, info = hp.choose_structure(x, y, cfg, dense)
    assert info["lowrank_errors"][top] <= 0.03 < min(e for r, e in info["lowrank_errors"].items() if r < top)
    assert any(t["rank"] < top for t in info["tried"])   # smaller ranks fitted first, none within tolerance
    assert fit is not None and info["rank"] == top and info["tried"][-1]["rank"] == top
    alone, info_alone = hp.choose_structure(x, y, hp.HadamardConfig(tolerance=0.03, rank=top), dense)
    assert info_alone["tried"] == info["tried"][-1:]
    np.testing.assert_array_equal(alone.predict(x), fit.predict(x))


def test_backfit_from_the_targets_moments_matches_backfit_from_the_rows():
    """With XᵀY given, the backfitting sweeps read the blocks' and the low-rank part's targets from
    the moments (XᵀY − XᵀX U Vᵀ, XᵀY − Σ Xᵀ(block outputs)) instead of the rows: the same fit, to
    rounding."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((900, 48))
    y = x @ rng.standard_normal((48, 80)) + 0.1 * np.tanh(x[:, :1] * 3)
    fits = []
    for moments in (False, True):
        fit = hp.FastfoodFit(48, 80, 0)
        fit.set_data(x, y)
        xc, yc = x - fit.mx, y - fit.my
        fit.fit_lowrank(xc, yc, 4)
        xp = fit.pad(xc)
        xtx = xp.T @ xp
        fit.add_block(xp, yc - xc @ fit.u @ fit.vt, xtx, 2, 1e-6, 0)
        assert fit.moments(xp) and fit.n_stack == 2
        fit.backfit(xp, xc, yc, xtx, 2, 1e-6, 0, xty=xp.T @ yc if moments else None)
        fits.append(fit.predict(x))
    np.testing.assert_allclose(fits[1], fits[0], atol=1e-6 * np.abs(fits[0]).max())
