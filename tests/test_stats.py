"""Calibration statistics against numpy on tiny graphs."""

import numpy as np
import pytest
from graphs import GraphBuilder

from onnxshrink.calibrate import DataSource, collect, run_model
from onnxshrink.graph import import_graph, normalize
from onnxshrink.layers import WeightLayer
from onnxshrink.lstsq import fit_error, ridge_solve
from onnxshrink.stats import CrossMoments, Moments, ResponseStats, conv_patches, spatial_positions


def _conv_model(k=3, stride=1, dilation=1, pad=1, nd=2):
    """input(N,4,9[,9]) -> Conv(4->6, k) -> y"""
    b = GraphBuilder(1)
    x = b.input("input", ["batch", 4] + [9] * nd)
    b.conv(x, 4, 6, k=k, stride=stride, dilation=dilation, pad=pad, nd=nd, out="y")
    b.output("y")
    return normalize(b.model())


def test_moments_match_numpy_and_merge(rng):
    x = rng.standard_normal((100, 5))
    a, b, whole = Moments(5), Moments(5), Moments(5)
    a.update(x[:37])
    b.update(x[37:])
    whole.update(x)
    a.merge(b)
    np.testing.assert_allclose(a.cov, np.cov(x.T, bias=True), atol=1e-12)
    np.testing.assert_allclose(whole.corr, np.corrcoef(x.T), atol=1e-12)
    np.testing.assert_allclose(a.mean, x.mean(0))


def test_moments_wait_for_enough_rows_and_flush_once_with_concurrent_readers(rng):
    """A few rows a call wait and go into one product (a wide layer read a step at a time); merged
    accumulators pool their waiting rows; readers in several threads see every row once; the
    caller's buffer may be reused after ``update``."""
    from concurrent.futures import ThreadPoolExecutor
    d = 600
    x = rng.standard_normal((700, d))
    parts = [Moments(d) for _ in range(10)]
    buf = np.empty((70, d))
    for i, m in enumerate(parts):
        buf[:] = x[70 * i:70 * (i + 1)]
        m.update(buf)
        assert m._outer is None and m._pending_rows == 70   # under max(PENDING_ROWS, d // 4) rows: waiting
    buf[:] = 0.0
    pooled = Moments(d)
    for m in parts:
        pooled.merge(m)
    assert pooled._pending_rows < max(Moments.PENDING_ROWS, d // 4)   # flushed on the way, the rest waiting
    np.testing.assert_allclose(pooled.outer, x.T @ x, rtol=0, atol=1e-9)
    assert pooled.n == 700 and parts[3]._pending_rows == 70   # the parts keep their own rows
    with ThreadPoolExecutor(4) as pool:
        seconds = list(pool.map(lambda m: m.second, [parts[0]] * 8))
    for s in seconds:
        np.testing.assert_allclose(s, x[:70].T @ x[:70] / 70, rtol=0, atol=1e-12)


def test_conv_patches_reproduce_conv_output(rng):
    """A patch row times the flattened weights is the conv output at that position."""
    x = rng.standard_normal((3, 4, 9, 9))
    w = rng.standard_normal((6, 4, 3, 3))
    attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "dilations": [1, 1], "pads": [1, 1, 1, 1]}
    pos = spatial_positions((5, 5), 7, rng)
    patches = conv_patches(x, attrs, (5, 5), pos)
    xp = np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)])
    for n in range(3):
        for j, p in enumerate(pos):
            oh, ow = divmod(p, 5)
            ref = np.einsum("ckl,ockl->o", xp[n, :, 2 * oh:2 * oh + 3, 2 * ow:2 * ow + 3], w)
            np.testing.assert_allclose(patches[n * len(pos) + j] @ w.reshape(6, -1).T, ref, atol=1e-10)


@pytest.mark.parametrize("k,stride,dilation,pad,nd", [(3, 1, 1, 1, 2), (3, 2, 1, 0, 2), (3, 1, 2, 2, 2),
                                                      (5, 2, 1, 1, 2), (3, 1, 1, 1, 1)])
def test_layer_stats_recover_conv_weights(k, stride, dilation, pad, nd, rng):
    """Ridge least squares on the streamed patch/output moments recovers W and b exactly."""
    m = _conv_model(k, stride, dilation, pad, nd)
    node = import_graph(m).nodes[0]
    data = DataSource({"input": rng.standard_normal((64, 4) + (9,) * nd).astype(np.float32)})
    acc = collect(data, [WeightLayer(node).stats_request("k", "input", "y", positions=20)], m, batch_size=16)["k"]
    w, b = ridge_solve(acc, ridge=1e-10)
    w0, b0 = WeightLayer(node).matrix(), WeightLayer(node).bias()
    np.testing.assert_allclose(w, w0, atol=1e-5)
    np.testing.assert_allclose(b, b0, atol=1e-5)
    assert fit_error(acc, w, b) < 1e-9
    assert fit_error(acc, np.zeros_like(w), acc.mean_y) == pytest.approx(1.0, rel=1e-6)


def test_response_stats_spatial_max_against_numpy(rng):
    m = _conv_model()
    data = DataSource({"input": rng.standard_normal((50, 4, 9, 9)).astype(np.float32)})
    acc = collect(data, [ResponseStats("y", "spatial_max")], m, batch_size=7)
    y = run_model(m, data)["y"]
    r = y.reshape(50, 6, -1).max(axis=2).astype(np.float64)
    got = acc["resp:y:spatial_max"]
    assert got.n == 50
    np.testing.assert_allclose(got.cov, np.cov(r.T, bias=True), rtol=1e-5, atol=1e-6)


def test_linear_rows_and_cross_moments_merge(rng):
    """MatMul on (N, T, d) tokens: rows are all N·T tokens."""
    b = GraphBuilder(2)
    x = b.input("input", ["batch", 5, 16])
    b.matmul(x, 16, 12, out="y")
    b.output("y")
    m = normalize(b.model())
    node = import_graph(m).nodes[0]
    data = DataSource({"input": rng.standard_normal((40, 5, 16)).astype(np.float32)})
    acc = collect(data, [WeightLayer(node).stats_request("k", "input", "y")], m)["k"]
    assert acc.n == 200
    w, bias = ridge_solve(acc, ridge=1e-10)
    np.testing.assert_allclose(w, WeightLayer(node).matrix(), atol=1e-5)
    halves = [collect(data.subset(s, e), [WeightLayer(node).stats_request("k", "input", "y")], m)["k"] for s, e in ((0, 13), (13, 40))]
    merged = halves[0].merge(halves[1])
    np.testing.assert_allclose(merged.xy, acc.xy, rtol=1e-10)
    assert isinstance(merged, CrossMoments)


def test_paired_collect_reads_targets_from_second_model(rng):
    """x from one model, y from another, same samples and positions."""
    m = _conv_model()
    data = DataSource({"input": rng.standard_normal((16, 4, 9, 9)).astype(np.float32)})
    node = import_graph(m).nodes[0]
    req = WeightLayer(node).stats_request("k", "input", "y", positions=5)
    same = collect(data, [req], m)["k"]
    paired = collect(data, [req], m, model_y=m)["k"]
    np.testing.assert_allclose(paired.xy, same.xy)


def test_layer_write_keeps_a_shared_bias_and_names_unique():
    """input -> Gemm1(w1, c) -> y1 ; input -> Gemm2(w2, c) -> y2 ; Gemm3(no bias) -> y3, with a tensor
    already named gemm3's default bias name: rewriting Gemm1 and Gemm3 leaves Gemm2 as it was."""
    import onnx
    from graphs import GraphBuilder

    from onnxshrink.graph import export_model, import_graph, node_by_name
    b = GraphBuilder(0)
    x = b.input("input", ["batch", 4])
    c = b.const(np.ones((1, 3), np.float32), "c")
    for i in (1, 2):
        b.node("Gemm", [x, b.const(np.eye(4, 3, dtype=np.float32), "w"), c], out=f"y{i}")
    b.node("Gemm", [x, b.const(np.eye(4, 3, dtype=np.float32), "w")], out="y3")
    g3 = b.nodes[-1].name
    b.node("Add", ["y3", b.const(np.ones(3, np.float32), "k")], out="y4")
    b.inits[-1].name = b.nodes[-1].input[1] = g3 + "_bias"
    for name in ("y1", "y2", "y4"):
        b.output(name)
    m = b.model()
    graph = import_graph(m)
    w, bias = WeightLayer(graph.nodes[0]).matrix(), WeightLayer(graph.nodes[0]).bias()
    np.testing.assert_array_equal(bias, np.ones(3))  # C of shape (1, 3)
    for node in (graph.nodes[0], node_by_name(graph, g3)):
        WeightLayer(node).write(2 * w, np.full(3, 5.0))
    out = export_model(graph, like=m)
    onnx.checker.check_model(out)
    feeds = {"input": np.ones((2, 4), np.float32)}
    from graphs import run
    y1, y2, y4 = run(out, feeds)
    np.testing.assert_allclose(y1, 2 + 5)
    np.testing.assert_allclose(y2, 1 + 1)
    np.testing.assert_allclose(y4, 2 + 5 + 1)


def test_every_request_type_follows_the_protocol_and_row_samples_are_bounded(rng):
    from onnxshrink.stats import LayerStats, Request, ResidualStats, RowSample, SplitStats
    reqs = [ResponseStats("y"), LayerStats("l", "input", "y"), ResidualStats("r", "input", "y", skip="input"),
            SplitStats(LayerStats("s", "input", "y")), RowSample("rows", "input", "y", per_batch=7, max_rows=20)]
    assert all(isinstance(r, Request) for r in reqs)
    m = _conv_model(k=1, pad=0)
    data = DataSource({"input": rng.standard_normal((64, 4, 9, 9)).astype(np.float32)})
    acc = collect(data, [RowSample("rows", "input", "y", per_batch=7, max_rows=20)], m, batch_size=8)["rows"]
    x, y = RowSample.rows(acc)
    assert acc["n"] == 20 == len(x) == len(y)           # 7 + 7 + 6 of the 8 batches
    again = collect(data, [RowSample("rows", "input", "y", per_batch=7, max_rows=20)], m, batch_size=8)["rows"]
    np.testing.assert_array_equal(RowSample.rows(again)[0], x)   # seeded: the same rows


def test_split_stats_by_sample_holds_out_every_other_sample_of_one_batch(rng):
    """Data in one batch: alternating batches would hold nothing out; by sample, the two halves
    get the even and odd samples of each batch and pool to the whole."""
    from onnxshrink.stats import LayerStats, SplitStats
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((7, 2))
    whole = LayerStats("w", "x", "y")
    for batches, sizes in ((None, (5, 2)), (1, (4, 3))):   # batches of 5 and 2 samples
        req = SplitStats(LayerStats("s", "x", "y"), batches)
        acc = req.new({"x": x}, {"y": y})
        req.update(acc, {"x": x[:5]}, {"y": y[:5]}, rng)
        req.update(acc, {"x": x[5:]}, {"y": y[5:]}, rng)
        assert (acc[0].n, acc[1].n) == sizes
    ref = whole.new({"x": x}, {"y": y})
    whole.update(ref, {"x": x}, {"y": y}, rng)
    assert np.allclose(acc[0].xy, x[0::2].T @ y[0::2]) and np.allclose(acc[1].xy, x[1::2].T @ y[1::2])
    assert np.allclose(acc[0].xy + acc[1].xy, ref.xy)


def test_pooled_stats_one_accumulator_with_each_parts_means(rng):
    """``PooledStats`` over the readers of one weight equals the pooled separate LayerStats, and
    keeps each reader's means (what a shared layer's per-reader bias needs)."""
    from onnxshrink.stats import LayerStats, PooledMoments, PooledStats
    xa = {"a": rng.standard_normal((4, 3, 6)), "b": rng.standard_normal((5, 6)) + 2.0}
    ya = {"ya": rng.standard_normal((4, 3, 2)), "yb": rng.standard_normal((5, 2)) - 1.0}
    parts = [LayerStats("p:a", "a", "ya"), LayerStats("p:b", "b", "yb")]
    req = PooledStats("p:w", parts)
    assert req.tensors() == {"x": ["a", "b"], "y": ["ya", "yb"]}
    acc = req.new(xa, ya)
    assert isinstance(acc, PooledMoments)
    for _ in range(2):   # two batches
        req.update(acc, xa, ya, np.random.default_rng(0))
    separate = []
    for p in parts:
        cm = p.new(xa, ya)
        for _ in range(2):
            p.update(cm, xa, ya, np.random.default_rng(0))
        separate.append(cm)
    ref = CrossMoments.pooled(separate)
    assert acc.n == ref.n == 2 * (12 + 5)
    for got, want in zip(acc.moments(), ref.moments()):
        np.testing.assert_allclose(got, want, atol=1e-12)
    np.testing.assert_allclose(acc.yy, ref.yy, atol=1e-12)
    for p, cm in zip(parts, separate):
        mx, my = acc.part_means(p.key)
        np.testing.assert_allclose(mx, cm.x.mean, atol=1e-12)
        np.testing.assert_allclose(my, cm.mean_y, atol=1e-12)


def _conv_transpose_model(k, stride, dilation, pads, out_pad, nd, group=1, c_in=4, c_out=6, size=5):
    """input(N, c_in, size[, size]) -> ConvTranspose(c_in -> c_out, k) -> y (random weights, bias)."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(7)
    w = rng.standard_normal([c_in, c_out // group] + [k] * nd).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["input", "w", "b"], ["y"], name="ct", kernel_shape=[k] * nd,
                            strides=[stride] * nd, dilations=[dilation] * nd, pads=[pads[0]] * nd + [pads[1]] * nd,
                            output_padding=[out_pad] * nd, group=group)
    g = helper.make_graph([node], "ct", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                       ["batch", c_in] + [size] * nd)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


# kernel, stride, dilation, (pad begin, pad end), output_padding, spatial dims
CT_CASES = [(4, 2, 1, (1, 1), 0, 2), (3, 2, 1, (1, 1), 1, 2), (3, 1, 1, (1, 1), 0, 2), (3, 2, 2, (2, 1), 1, 2),
            (5, 3, 1, (0, 2), 2, 2), (4, 2, 1, (1, 1), 0, 1), (2, 2, 1, (0, 0), 0, 2)]


@pytest.mark.parametrize("k,stride,dilation,pads,out_pad,nd", CT_CASES)
def test_conv_transpose_patches_reproduce_its_output(k, stride, dilation, pads, out_pad, nd, rng):
    """A feature row times the weight matrix, plus the bias, is ONNX Runtime's ConvTranspose output at
    that position (every stride phase, the borders and the output_padding positions)."""
    import onnxruntime as ort
    from onnxshrink.stats import conv_transpose_patches, conv_outputs_at
    m = _conv_transpose_model(k, stride, dilation, pads, out_pad, nd)
    x = rng.standard_normal((3, 4) + (5,) * nd).astype(np.float32)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    layer = WeightLayer(import_graph(m).nodes[0])
    req = layer.stats_request("k", "input", "y")
    assert req.kind == "convtranspose" and req._out_spatial(x.shape) == y.shape[2:]
    pos = np.arange(int(np.prod(y.shape[2:])))
    rows = conv_transpose_patches(x.astype(np.float64), req.conv_attrs, y.shape[2:], pos)
    assert rows.shape == (3 * len(pos), layer.d_in)
    np.testing.assert_allclose(rows @ layer.matrix() + layer.bias(), conv_outputs_at(y, pos), atol=1e-4)


@pytest.mark.parametrize("k,stride,dilation,pads,out_pad,nd", CT_CASES[:4] + CT_CASES[5:6])
def test_layer_stats_recover_conv_transpose_weights(k, stride, dilation, pads, out_pad, nd, rng):
    """Ridge least squares on the sampled ConvTranspose rows recovers W and b exactly."""
    m = _conv_transpose_model(k, stride, dilation, pads, out_pad, nd)
    node = import_graph(m).nodes[0]
    data = DataSource({"input": rng.standard_normal((64, 4) + (5,) * nd).astype(np.float32)})
    acc = collect(data, [WeightLayer(node).stats_request("k", "input", "y", positions=40)], m, batch_size=16)["k"]
    w, b = ridge_solve(acc, ridge=1e-10)
    np.testing.assert_allclose(w, WeightLayer(node).matrix(), atol=1e-4)
    np.testing.assert_allclose(b, WeightLayer(node).bias(), atol=1e-4)
    assert fit_error(acc, w, b) < 1e-8


def test_grouped_conv_transpose_rows_are_every_groups_channels(rng):
    """A grouped ConvTranspose's rows hold all groups' channels (c, k): group j's block of
    ``matrix()`` times its rows gives that group's outputs."""
    import onnxruntime as ort
    from onnxshrink.stats import conv_transpose_patches, conv_outputs_at
    m = _conv_transpose_model(3, 2, 1, (1, 1), 1, 2, group=2)
    x = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    layer = WeightLayer(import_graph(m).nodes[0])
    req = layer.stats_request("k", "input", "y")
    pos = np.arange(int(np.prod(y.shape[2:])))
    rows = conv_transpose_patches(x.astype(np.float64), req.conv_attrs, y.shape[2:], pos)
    half = rows.shape[1] // 2
    w = layer.matrix()
    got = np.concatenate([rows[:, :half] @ w[:, :3], rows[:, half:] @ w[:, 3:]], axis=1) + layer.bias()
    np.testing.assert_allclose(got, conv_outputs_at(y, pos), atol=1e-4)


@pytest.mark.parametrize("k,stride,dilation,pads,out_pad,nd", CT_CASES)
def test_conv_transpose_moments_by_phase_match_the_dense_rows(k, stride, dilation, pads, out_pad, nd, rng):
    """The moments a ConvTranspose's ``LayerStats`` accumulates phase by phase (``PhaseRows``: each
    phase's rows at its taps' columns) are those of the dense rows, and a phase's rows are zero
    outside its columns (sampled positions, targets in the same row order)."""
    from onnxshrink.stats import PhaseRows, conv_outputs_at, conv_transpose_phases
    m = _conv_transpose_model(k, stride, dilation, pads, out_pad, nd)
    x = rng.standard_normal((3, 4) + (5,) * nd)
    req = WeightLayer(import_graph(m).nodes[0]).stats_request("k", "input", "y", positions=17)
    out_spatial = req._out_spatial(x.shape)
    y = rng.standard_normal((3, 6) + tuple(out_spatial))
    pos = spatial_positions(out_spatial, 17, np.random.default_rng(3))
    ph = conv_transpose_phases(x, req.conv_attrs, out_spatial, pos)
    dense = ph.dense()
    assert isinstance(ph, PhaseRows) and dense.shape == (3 * len(pos), ph.dim) and ph.n == dense.shape[0]
    if stride > 1:   # (with dilation = stride one phase reads every tap, the other none)
        assert len(ph.groups) > 1 and min(len(c) for c, _, _ in ph.groups) < ph.dim
    for cols, xs, p in ph.groups:   # each group: the dense rows of its positions, zero elsewhere
        rows = dense.reshape(3, len(pos), -1)[:, p].reshape(-1, ph.dim)
        np.testing.assert_array_equal(rows[:, cols], xs)
        assert not np.delete(rows, cols, axis=1).any()
    by_phase, whole = CrossMoments(ph.dim, 6), CrossMoments(ph.dim, 6)
    by_phase.update(ph, ph.rows_at(conv_outputs_at(y, pos)))
    whole.update(dense, conv_outputs_at(y, pos))
    for a, b in zip(by_phase.moments(), whole.moments()):
        np.testing.assert_allclose(a, b, atol=1e-12)
    np.testing.assert_allclose(by_phase.yy, whole.yy, rtol=1e-13)
    got, ref = CrossMoments(ph.dim, 6), CrossMoments(ph.dim, 6)   # through the request, as calibration does
    req.update(got, {"input": x}, {"y": y}, np.random.default_rng(3))
    assert got.n == whole.n
    np.testing.assert_allclose(got.x.outer, whole.x.outer, atol=1e-10)
    np.testing.assert_allclose(got.xy, whole.xy, atol=1e-10)


def test_pooled_conv_transpose_parts_keep_their_means(rng):
    """Two ConvTranspose parts pooled (``PooledStats``): the pooled moments are those of both parts'
    dense rows, each part's mean its own rows'."""
    from onnxshrink.stats import PooledStats, conv_outputs_at, conv_transpose_patches
    m = _conv_transpose_model(4, 2, 1, (1, 1), 0, 2)
    layer = WeightLayer(import_graph(m).nodes[0])
    parts = [layer.stats_request(f"p{i}", f"x{i}", f"y{i}", positions=9) for i in (0, 1)]
    xs = {f"x{i}": rng.standard_normal((2, 4, 5, 5)) for i in (0, 1)}
    ys = {f"y{i}": rng.standard_normal((2, 6, 10, 10)) for i in (0, 1)}
    req = PooledStats("pool", parts)
    acc = req.new(xs, ys)
    req.update(acc, xs, ys, np.random.default_rng(5))
    rng_ = np.random.default_rng(5)
    dense, targets = [], []
    for i in (0, 1):
        pos = spatial_positions((10, 10), 9, rng_)
        dense.append(conv_transpose_patches(xs[f"x{i}"], parts[i].conv_attrs, (10, 10), pos))
        targets.append(conv_outputs_at(ys[f"y{i}"], pos))
        np.testing.assert_allclose(acc.part_means(f"p{i}")[0], dense[-1].mean(0), atol=1e-12)
        np.testing.assert_allclose(acc.part_means(f"p{i}")[1], targets[-1].mean(0), atol=1e-12)
    whole = CrossMoments(dense[0].shape[1], 6)
    whole.update(np.concatenate(dense), np.concatenate(targets))
    for a, b in zip(acc.moments(), whole.moments()):
        np.testing.assert_allclose(a, b, atol=1e-12)
