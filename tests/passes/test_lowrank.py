"""lowrank: exact at full rank (Gemm either transB, MatMul on 2-D and 3-D inputs, with and
without bias, separable Conv), accurate on the digits MLP and transformer, budgets reached."""

import numpy as np
import onnx
import pytest

from graphs import NO_NUMERIC_CHECKS, GraphBuilder, assert_close
from models import digits
from onnxshrink import shrink
from onnxshrink.cost import model_cost
from onnxshrink.errors import UsageError

EXACT = {"energy": 1.0, "force": True, "refit": False}


def _mlp(trans_b=1, bias=True):
    b = GraphBuilder(seed=2)
    x = b.input("input", ["batch", 24])
    h = b.relu(b.gemm(x, 24, 40, trans_b=trans_b, bias=bias))
    b.gemm(h, 40, 16, trans_b=1 - trans_b, bias=bias, out="y")
    b.output("y")
    return b.model()


def _tokens(with_add=True):
    b = GraphBuilder(seed=3)
    x = b.input("input", ["batch", 6, 20])
    h = b.matmul(x, 20, 32)
    if with_add:
        h = b.node("Add", [h, b.const((0.1 * np.arange(32)).astype(np.float32))])
    h = b.relu(h)
    h = b.matmul(h, 32, 12, out=None)
    b.node("Add", [h, b.const(np.ones((1, 1, 12), np.float32))], out="y")
    b.output("y")
    return b.model()


def _conv(stride=1, pad=1, dilation=1, bias=True):
    b = GraphBuilder(seed=4)
    x = b.input("input", ["batch", 4, 9, 9])
    h = b.conv(x, 4, 12, k=3, stride=stride, pad=pad, dilation=dilation, bias=bias)
    b.conv(b.relu(h), 12, 6, k=3, out="y")
    b.output("y")
    return b.model()


def _data(model, n, seed):
    shape = [d.dim_value or n for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _run(model, options, **kw):
    return shrink(model, ["lowrank"], calibration=_data(model, 96, 5), options={"lowrank": options},
                  force=True, **kw)


@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("trans_b,bias", [(1, True), (0, True), (1, False), (0, False)])
def test_gemm_full_rank_is_exact(trans_b, bias, whiten):
    m = _mlp(trans_b, bias)
    res = _run(m, dict(EXACT, whiten=whiten))
    ops = [n.op_type for n in res.model.graph.node]
    assert ops.count("MatMul") == 2 and ops.count("Gemm") == 2
    onnx.checker.check_model(res.model, full_check=True)
    assert_close(m, res.model, {"input": _data(m, 8, 9)})


@pytest.mark.parametrize("with_add", [True, False])
def test_matmul_tokens_full_rank_is_exact(with_add):
    m = _tokens(with_add)
    res = _run(m, EXACT)
    assert [n.op_type for n in res.model.graph.node].count("MatMul") == 4
    assert_close(m, res.model, {"input": _data(m, 8, 9)})


def test_refit_at_full_rank_is_close():
    for m in (_mlp(), _tokens()):
        res = _run(m, {"energy": 1.0, "force": True})
        assert_close(m, res.model, {"input": _data(m, 8, 9)}, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("geom", [dict(), dict(stride=2), dict(pad=0), dict(dilation=2, pad=2), dict(bias=False)])
def test_separable_conv_full_rank_is_exact(geom):
    m = _conv(**geom)
    res = _run(m, dict(EXACT, conv=True))
    convs = [n for n in res.model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 4
    shapes = {t.name: list(t.dims[2:]) for t in res.model.graph.initializer if len(t.dims) == 4}
    assert sorted(shapes[c.input[1]] for c in convs) == [[1, 3], [1, 3], [3, 1], [3, 1]]
    assert_close(m, res.model, {"input": _data(m, 8, 9)})


def test_separable_conv_refit_is_close():
    m = _conv(stride=2)
    res = _run(m, {"energy": 1.0, "force": True, "conv": True})
    assert_close(m, res.model, {"input": _data(m, 8, 9)}, rtol=1e-2, atol=1e-2)


def test_only_where_it_pays():
    m = _mlp()
    res = _run(m, {"energy": 1.0})   # full rank never pays
    assert not res.report["passes"][0]["changed"]
    assert all("cheaper" in s["reason"] for s in res.report["passes"][0]["skipped"])


def _ref(name):
    kind = digits.MODELS[name]
    return onnx.load(digits.model_path(name)), kind, digits.calibration(kind, 256)


@pytest.mark.parametrize("name,target", [("mlp", 0.3), ("transformer", 0.5)])
def test_reference_models_budget_and_accuracy(name, target):
    model, kind, calib = _ref(name)
    acc0 = digits.accuracy(model, kind)
    res = shrink(model, ["lowrank"], calibration=calib, target_params=target)
    ratio = model_cost(res.model)["params"] / model_cost(model)["params"]
    assert abs(ratio - target) <= 0.05 * target, ratio
    acc = digits.accuracy(res.model, kind)
    assert acc >= acc0 - 0.01, (acc, acc0)


def test_data_beats_plain_svd_on_the_transformer():
    model, kind, calib = _ref("transformer")
    data = shrink(model, ["lowrank"], calibration=calib, target_params=0.4, force=True)
    plain = shrink(model, ["lowrank"], calibration=calib, target_params=0.4, force=True,
                   options={"lowrank": {"whiten": False, "refit": False, "alloc": "data"}})
    assert data.report["passes"][0]["ranks"] == plain.report["passes"][0]["ranks"]
    assert digits.accuracy(data.model, kind) > digits.accuracy(plain.model, kind)


def test_flops_budget():
    model, kind, calib = _ref("transformer")
    res = shrink(model, ["lowrank"], calibration=calib[:128], target_flops=0.7)
    ratio = model_cost(res.model)["flops"] / model_cost(model)["flops"]
    assert abs(ratio - 0.7) <= 0.05 * 0.7, ratio
    assert digits.accuracy(res.model, kind) >= digits.accuracy(model, kind) - 0.02


def _two_layers_sharing_a_bias(op, shared):
    """Two 32→32 layers whose bias (Gemm C, or the constant of the Add after a MatMul) is one
    initializer (``shared``) or two copies of it."""
    b = GraphBuilder(seed=6)
    h = b.input("input", ["batch", 32])
    c = np.full(32, 0.2, np.float32)
    one = b.const(c, "shared_b")
    for i in range(2):
        bias = one if shared else b.const(c, "copy_b")
        w = b.const((b.rng.standard_normal((32, 32)) / 6).astype(np.float32), "w")
        if op == "Gemm":
            h = b.node("Gemm", [h, w, bias])
        else:
            h = b.node("Add", [b.node("MatMul", [h, w]), bias])
        h = b.relu(h) if i == 0 else h
    b.node("Identity", [h], out="y")
    b.output("y")
    return b.model()


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_shared_bias_rewritten_like_separate_copies(op):
    """Each layer gets its own new bias: one shared name must not collapse them into one."""
    opts = {"energy": 0.6, "force": True}
    shared, copies = (_run(_two_layers_sharing_a_bias(op, s), opts).model for s in (True, False))
    assert len({t.name for t in shared.graph.initializer}) == len(shared.graph.initializer)
    x = _data(shared, 8, 9)
    assert_close(copies, shared, {"input": x}, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["lowrank", "hadamard"])
def test_gemm_bias_of_shape_1_by_n(name):
    """A Gemm bias given as a (1, N) row is read as a vector."""
    b = GraphBuilder(seed=7)
    x = b.input("input", ["batch", 32])
    w = b.const((b.rng.standard_normal((32, 32)) / 6).astype(np.float32), "w")
    b.node("Gemm", [x, w, b.const(np.full((1, 32), 0.5, np.float32), "b")], out="y", beta=2.0)
    b.output("y")
    m = b.model()
    opts = {"lowrank": {"energy": 1.0, "force": True, "refit": False},
            "hadamard": {"tolerance": 0.99, "max_params": 1.0, "output_error": 0}}
    res = shrink(m, [name], calibration=_data(m, 96, 5), force=True, options={name: opts[name]})
    assert res.report["passes"][0]["changed"]
    if name == "lowrank":
        assert_close(m, res.model, {"input": _data(m, 8, 9)})


@pytest.mark.parametrize("name", ["lowrank", "hadamard"])
def test_matmul_with_the_weight_on_the_left_is_skipped_with_a_reason(name):
    b = GraphBuilder(seed=8)
    x = b.input("input", ["batch", 32, 24])
    b.node("MatMul", [b.const((b.rng.standard_normal((40, 32)) / 6).astype(np.float32), "w"), x], out="y")
    b.output("y")
    m = b.model()
    res = shrink(m, [name], calibration=_data(m, 96, 5), force=True)
    rep = res.report["passes"][0]
    assert not rep["changed"]
    assert [s["reason"] for s in rep["skipped"]] == ["constant weight on the left (W·x): not supported"]


def _residual_mlp(lams, head=False):
    """x ─ [MatMul(32→64) ─ Relu ─ MatMul(64→32) ─ +b ─ ×λ ─ Add(stream)] per λ ─ y (─ MatMul head)."""
    from graphs import GraphBuilder
    b = GraphBuilder(43)
    x = b.input("x", ["N", 6, 32])
    h = x
    for i, lam in enumerate(lams):
        f = b.matmul(b.relu(b.matmul(h, 32, 64)), 64, 32)
        f = b.node("Add", [f, b.const((0.1 * b.rng.standard_normal(32)).astype(np.float32))])
        f = b.node("Mul", [f, b.const(np.full(32, lam, np.float32))])
        h = b.node("Add", [f, h], out="y" if i == len(lams) - 1 and not head else None)
    if head:
        b.matmul(h, 32, 10, out="y")
    b.output("y")
    return b.model()


def test_budget_weighs_each_layers_error_by_its_blocks_share_of_the_residual_stream():
    """Two equal residual MLP blocks, the first scaled by a layer scale of 0.05: its errors reach the
    output 400× smaller, so with ``effect=stream`` the params budget truncates its layers first, and
    the output error on new data is lower than with per-layer relative errors (the default); a layer
    outside any block (a head) turns the weighting off (``_factor.stream_effects`` gives None)."""
    from graphs import run
    from onnxshrink.graph import import_graph
    from onnxshrink.passes._factor import stream_effects
    m = _residual_mlp((0.05, 1.0))
    rng = np.random.default_rng(0)
    cal = {"x": rng.standard_normal((128, 6, 32)).astype(np.float32)}
    test = {"x": rng.standard_normal((64, 6, 32)).astype(np.float32)}
    want = run(m, test)[0]
    err, ranks = {}, {}
    for effect in ("layer", "stream"):
        res = shrink(m, ["lowrank"], calibration=cal, target_params=0.6, quiet=True, force=True,
                     options={"lowrank": {"effect": effect, "rank_multiple": 2}}, tolerances=NO_NUMERIC_CHECKS)
        rep = res.report["passes"][0]
        assert rep["allocation_errors"] == ("residual stream" if effect == "stream" else "per layer")
        ranks[effect] = [rep["ranks"].get(n.name) for n in import_graph(m).nodes if n.op == "MatMul"]
        err[effect] = np.linalg.norm(run(res.model, test)[0] - want) / np.linalg.norm(want)
    first, second = ranks["stream"][:2], ranks["stream"][2:]
    assert all(r is not None for r in first) and sum(first) < sum(r or 64 for r in second), ranks
    assert err["stream"] < 0.7 * err["layer"], (err, ranks)
    # a head outside the blocks: no stream weighting
    m2 = _residual_mlp((0.05, 1.0), head=True)
    res = shrink(m2, ["lowrank"], calibration=cal, target_params=0.6, quiet=True, force=True,
                 options={"lowrank": {"rank_multiple": 2, "effect": "stream"}}, tolerances=NO_NUMERIC_CHECKS)
    assert res.report["passes"][0]["allocation_errors"] == "per layer"
    res = shrink(m, ["lowrank"], calibration=cal, target_params=0.6, quiet=True, force=True,   # the default
                 options={"lowrank": {"rank_multiple": 2}}, tolerances=NO_NUMERIC_CHECKS)
    assert res.report["passes"][0]["allocation_errors"] == "per layer"
    with pytest.raises(UsageError, match="effect must be stream or layer"):
        shrink(m, ["lowrank"], calibration=cal, target_params=0.6, quiet=True, options={"lowrank": {"effect": "x"}})


def _halves(n_fit, noise, seed=0):
    """Moments of (x, y = x W + noise) on a fit half of ``n_fit`` rows and a held-out half of 400,
    and a rank-8 factorization of a W off by noise (the refit has something to correct)."""
    from onnxshrink.passes._factor import factor
    from onnxshrink.stats import CrossMoments
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((24, 10))
    out = []
    for n in (n_fit, 400):
        x = rng.standard_normal((n, 24))
        cm = CrossMoments(24, 10)
        cm.update(x, x @ w + noise * rng.standard_normal((n, 10)))
        out.append(cm)
    a, b, _ = factor(w + 0.5 * rng.standard_normal(w.shape), out[1].moments()[0])
    return out, a[:, :8], b[:8]


def test_held_out_ridge_pulls_an_overfitting_refit_toward_the_truncated_factor():
    """The second factor's ridge is chosen on rows the refit did not see: with 12 noisy rows for 8
    columns the largest (toward the factor b0 the whitened SVD gave), with 40 a middle one, with 2000
    rows (clean or noisy) the smallest: no larger ridge does more than HELD_OUT_MARGIN better there."""
    from onnxshrink.lstsq import RIDGES
    from onnxshrink.passes._factor import held_out_ridge
    for n_fit, noise, expect in ((12, 3.0, RIDGES[-1]), (40, 1.0, 0.1), (2000, 0.01, RIDGES[0]), (2000, 0.3, RIDGES[0])):
        halves, a, b0 = _halves(n_fit, noise)
        assert held_out_ridge(halves, a, b0, slice(None), slice(None)) == expect, (n_fit, noise)


def test_ridge_chosen_on_held_out_rows_is_reported_and_the_budget_met():
    from graphs import run
    from onnxshrink.lstsq import RIDGES
    model = _mlp()
    feeds = {"input": _data(model, 64, 9)}
    ref = run(model, feeds)[0]
    errs = {}
    for ridge in (-1, 1e-4):
        res = _run(model, {"ridge": ridge}, target_params=0.6)
        rep = res.report["passes"][0]
        assert all(t["met"] for t in res.report["targets"].values())
        assert ("ridges" in rep) == (ridge < 0)
        assert all(r in RIDGES for r in rep.get("ridges", {}).values())
        out = run(res.model, feeds)[0]
        errs[ridge] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    assert errs[-1] <= 1.01 * errs[1e-4]   # random weights: 0.605 against 0.607 (no rank structure to keep)


def test_measured_budget_reports_each_layers_probe_and_meets_the_goal():
    """``lowrank.measured``: each layer's error curve scaled by its measured output effect at the probe
    rank (``_factor.measured_curves``, as basisconv's); off by default."""
    model = _mlp()
    on = _run(model, {"measured": True}, target_params=0.6)
    off = _run(model, {}, target_params=0.6)
    rep = on.report["passes"][0]
    assert "measured" not in off.report["passes"][0]
    assert set(rep["ranks"]) <= set(rep["measured"]) and len(rep["measured"]) == 2   # both Gemms probed
    assert all(r["output_error"] > 0 and r["gain"] > 0 and r["probe_rank"] % 8 == 0 for r in rep["measured"].values())
    assert all(t["met"] for t in on.report["targets"].values())


@pytest.mark.parametrize("conv", [False, True])
def test_a_1d_conv_is_skipped_as_basisconv_work_with_or_without_lowrank_conv(conv):
    """Input ─ Conv1d(1→16, k=8, stride 4) ─ MatMul(16→8) ─ y (an STFT written as Conv1d, then a
    filter bank): lowrank factors the MatMul and names basisconv for the 1-D Conv, whether or not
    lowrank.conv is set (its split is for k×k kernels)."""
    from onnxshrink.passes.lowrank import ONE_D_CONV
    b = GraphBuilder(seed=6)
    x = b.input("input", ["batch", 1, 64])
    h = b.conv(x, 1, 16, k=8, stride=4, pad=0, nd=1)
    h = b.node("Transpose", [h], perm=[0, 2, 1])
    b.matmul(h, 16, 8, out="y")
    b.output("y")
    res = _run(b.model(), {"conv": conv, **EXACT})
    rep = res.report["passes"][0]
    conv_node = next(n.name for n in b.model().graph.node if n.op_type == "Conv")
    assert [s["reason"] for s in rep["skipped"] if s["node"] == conv_node] == [ONE_D_CONV]
    assert len(rep["changed"]) == 1 and "rank" in rep["changed"][0]
