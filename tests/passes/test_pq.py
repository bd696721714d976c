"""pq: product-quantized weight codebooks, decoded in the graph."""

import re
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import GraphBuilder, assert_close, run
from onnx import TensorProto, helper, numpy_helper

from models import digits
from onnxshrink import shrink
from onnxshrink.errors import UsageError
from onnxshrink.lstsq import weighted_error
from onnxshrink.passes.pq import PqConfig, decoded_weight, pack_codes, pack_codes6, quantize, unpack_codes
from onnxshrink.passes.pq.codec import code_bits, pack_words

# the mechanics tests run on layers far below the default size threshold, without the error budget
FAST = {"iters": 2, "refine": 4, "kmeans_iters": 3, "positions": 8, "min_bytes": 0, "max_error": 0,
        "loosen": "false"}   # the per-layer rule as set (the loosened budget: its own tests)
RULE = {"loosen": "false"}   # the defaults, the per-layer budget as set


def _net(seed=0, distinct=None):
    """input(N,3,8,8) -> Conv 3->8 -> Relu -> Conv 8->32 3x3 -> Relu -> Conv 32->32 1x1 -> Relu
    -> GAP -> Flatten -> Gemm 32->64 -> Relu -> MatMul 64->48 -> Add -> Relu -> Gemm(transB=0) 48->10.

    ``distinct``: rebuild every weight (except the first conv) from that many distinct sub-vectors."""
    b = GraphBuilder(seed)
    x = b.input("input", ["batch", 3, 8, 8])
    h = b.relu(b.conv(x, 3, 8))
    h = b.relu(b.conv(h, 8, 32))
    h = b.relu(b.conv(h, 32, 32, k=1))
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h])], axis=1)
    h = b.relu(b.gemm(h, 32, 64))
    h = b.node("Add", [b.matmul(h, 64, 48), b.const((0.1 * b.rng.standard_normal(48)).astype(np.float32))])
    b.gemm(b.relu(h), 48, 10, trans_b=0, out="logits")
    b.output("logits", ["batch", 10])
    m = b.model()
    if distinct:
        rng = np.random.default_rng(seed + 1)
        for init in m.graph.initializer[2:]:  # the first conv's weight and bias stay as they are
            w = numpy_helper.to_array(init)
            if w.ndim < 2:
                continue
            d = 9 if w.ndim == 4 and w.shape[2] == 3 else 4
            if w.ndim == 2 and init.name not in _transposed(m):
                flat = w.reshape(-1, d)          # rows = outputs (Gemm transB=1)
            else:
                flat = w.T.reshape(-1, d) if w.ndim == 2 else w.reshape(-1, d)
            table = rng.standard_normal((distinct, d)).astype(np.float32) * float(np.abs(w).mean())
            new = table[rng.integers(distinct, size=len(flat))]
            new = new.reshape(w.T.shape).T if (w.ndim == 2 and init.name in _transposed(m)) else new.reshape(w.shape)
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new), init.name))
    return m


def _transposed(m):
    """Names of 2-D weights stored input-major (MatMul, Gemm transB=0)."""
    out = set()
    for n in m.graph.node:
        tb = {a.name: a.i for a in n.attribute}.get("transB", 0)
        if n.op_type == "MatMul" or (n.op_type == "Gemm" and not tb):
            out.add(n.input[1])
    return out


def _calib(n=64, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


def _shrink(model, calib, **opts):
    return shrink(model, ["pq"], calibration=calib, options={"pq": opts}, force=True)


def test_short_names_make_the_file_smaller_and_change_nothing_else():
    """pq.short_names (default): the decode subgraphs' nodes and inner tensors get short names,
    the input's names, the codes, codebooks and decoded weights (W.pq) keep theirs; the file is
    smaller by what the long names took and the outputs are the same bits."""
    model, calib = _net(), _calib()
    short = _shrink(model, calib, **FAST, bits="auto")
    long = _shrink(model, calib, **FAST, bits="auto", short_names=False)
    kept = {n.name for n in model.graph.node} | {t.name for t in model.graph.initializer}
    new_nodes = [n.name for n in short.model.graph.node if n.name not in kept]
    assert new_nodes and all(re.fullmatch(r"q[0-9a-z]+", n) for n in new_nodes), new_nodes
    assert len(set(n.name for n in short.model.graph.node)) == len(short.model.graph.node)
    decoded = sorted(t for n in short.model.graph.node for t in n.output if t.endswith(".pq"))
    assert decoded == sorted(t for n in long.model.graph.node for t in n.output if t.endswith(".pq"))
    assert len(decoded) == 5
    assert sorted(t.name for t in short.model.graph.initializer) == sorted(t.name for t in long.model.graph.initializer)
    saved = len(long.model.SerializeToString()) - len(short.model.SerializeToString())
    assert saved > 20 * len(new_nodes), saved   # each node's name, and its outputs' names twice
    assert short.report["passes"][0]["short_names"] > len(new_nodes)
    onnx.checker.check_model(short.model, full_check=True)
    x = {"input": _calib(8, seed=3)}
    for a, b in zip(run(short.model, x), run(long.model, x)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("centroids", [16, 200])
def test_decode_subgraph_reproduces_the_codebook_weight_exactly(centroids):
    model = _net()
    res = _shrink(model, _calib(), centroids=centroids, codebook_dtype="fp16", **FAST)
    m = res.model
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    decoded = [n.output[0] for n in m.graph.node if n.output[0].endswith(".pq")]
    assert len(decoded) == len(res.report["passes"][0]["changed"]) == 5
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    for name in decoded:
        probe.graph.output.add().name = name
    outs = dict(zip([o.name for o in probe.graph.output], run(probe, {"input": _calib(2)})))
    for name in decoded:
        base = name[:-3]
        codebook, codes = inits[base + ".pq_codebook"], inits[base + ".pq_codes"]
        assert codebook.dtype == np.float16 and codes.dtype == np.int8 and len(codebook) <= centroids
        consumer = next(n for n in m.graph.node if name in n.input)
        rows_of = "transpose" if name in _transposed(m) else "natural"
        want = decoded_weight(outs[name].shape, rows_of, codebook, codes)
        assert want.dtype == outs[name].dtype == np.float32
        assert np.array_equal(outs[name], want)
    # only standard ops, and the original dense weights are gone
    assert {n.op_type for n in m.graph.node} >= {"Gather", "Cast", "Reshape", "Transpose"}
    assert not any(n.domain not in ("", "ai.onnx") for n in m.graph.node)
    # TensorRT's ONNX parser: no UINT8 tensor, Cast only to types it has, ops it parses
    assert not any(t.data_type == onnx.TensorProto.UINT8 for t in m.graph.initializer)
    casts = {a.i for n in m.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    assert casts <= {onnx.TensorProto.INT32, onnx.TensorProto.FLOAT}
    assert res.report["validation"]["tensorrt_unparseable"] == []


def test_enough_centroids_leave_the_model_unchanged():
    model = _net(distinct=12)
    # output_error=0: the allocation spends no more than the per-layer rule's exact settings
    res = _shrink(model, _calib(), codebook_dtype="fp32", centroids=16, min_bytes=0, output_error=0)
    rep = res.report["passes"][0]
    assert len(rep["changed"]) == 5
    assert all(info["centroids"] <= 12 for info in rep["layers"].values())
    assert_close(model, res.model, {"input": _calib(16, seed=3)}, rtol=1e-5, atol=1e-5)


def test_output_is_byte_identical_for_the_same_seed():
    model = _net()
    a = _shrink(model, _calib(), centroids=16, **FAST).model.SerializeToString()
    b = _shrink(model, _calib(), centroids=16, **FAST).model.SerializeToString()
    c = shrink(model, ["pq"], calibration=_calib(), options={"pq": dict(centroids=16, **FAST)}, force=True,
               seed=7).model.SerializeToString()
    assert a == b
    assert a != c


def test_skips_first_conv_small_layers_and_runtime_weights():
    b = GraphBuilder(0)
    x = b.input("input", ["batch", 4, 6, 6])
    h = b.relu(b.conv(x, 4, 8))                  # 288 weights, 11 % of the model's: first conv, dense
    h = b.relu(b.conv(h, 8, 32))                 # 2304 weights: quantized
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h])], axis=1)
    h = b.gemm(h, 32, 2)                           # 64 weights: small
    y = b.node("MatMul", [b.node("Unsqueeze", [h, b.const(np.array([2]))]),
                          b.node("Unsqueeze", [h, b.const(np.array([1]))])], out="y")
    b.output(y)
    res = shrink(b.model(), ["pq"], calibration={"input": _calib(32)[:, :1].repeat(4, 1)[:, :, :6, :6]},
                 force=True, options={"pq": FAST})
    rep = res.report["passes"][0]
    reasons = {s["node"]: s["reason"] for s in rep["skipped"]}
    assert len(rep["changed"]) == 1
    assert any("first conv" in r for r in reasons.values())
    assert any("small layer" in r for r in reasons.values())
    assert any("computed at run time" in r for r in reasons.values())


def test_a_first_conv_holding_most_of_the_weights_is_quantized():
    """input → Conv(4→c1, 3×3) → Relu → Conv(c1→c2, k2×k2) → Relu → GAP → Flatten → Gemm → y.
    A first Conv with at least a quarter of the model's weight bytes (an STFT written as Conv)
    is quantized like any other layer; one with less stays dense, with the reason."""
    def net(c1, c2, k2):
        b = GraphBuilder(3)
        x = b.input("input", ["batch", 4, 6, 6])
        h = b.relu(b.conv(x, 4, c1, out="first"))
        h = b.relu(b.conv(h, c1, c2, k=k2))
        h = b.node("Flatten", [b.node("GlobalAveragePool", [h])], axis=1)
        b.output(b.gemm(h, c2, 2, out="y"))
        return b.model()

    def first_conv(model):
        return next(n.name for n in model.graph.node if n.op_type == "Conv")
    calib = {"input": _calib(32)[:, :1].repeat(4, 1)[:, :, :6, :6]}
    big = net(64, 8, 1)     # 2304 of 2832 weights in the first conv: quantized
    rep = shrink(big, ["pq"], calibration=calib, force=True, options={"pq": FAST}).report["passes"][0]
    assert first_conv(big) in rep["changed"], rep["skipped"]
    small = net(8, 64, 3)   # 288 of 4928 weights: dense
    rep = shrink(small, ["pq"], calibration=calib, force=True, options={"pq": FAST}).report["passes"][0]
    reasons = {s["node"]: s["reason"] for s in rep["skipped"]}
    assert first_conv(small) not in rep["changed"]
    assert "under a quarter of the model's weight bytes" in reasons[first_conv(small)]


def test_activation_aware_assignment_lowers_the_output_error(rng):
    """Inputs with very different scales: weighting the sub-vector distances by the input
    covariance must beat plain k-means on the output error ‖X(W − Ŵ)‖."""
    d_in, d_out = 64, 128
    scale = np.exp(rng.uniform(-2.5, 2.5, d_in))
    x = rng.standard_normal((2000, d_in)) * scale
    h = x.T @ x / len(x)
    t = rng.standard_normal((d_out, d_in))
    plain = PqConfig(aware=False, centroids=32)
    aware = PqConfig(centroids=32, gptq=False, refine=0)
    full = PqConfig(centroids=32)
    errs = []
    for cfg in (plain, aware, full):
        _, codes, t_hat = quantize(t, 4, 32, h if cfg.aware else None, cfg, np.random.default_rng(0), np.float32)
        assert codes.shape == (d_out, d_in // 4) and codes.dtype == np.uint8
        errs.append(weighted_error(t, t_hat, h))
    assert errs[1] < 0.7 * errs[0]
    assert errs[2] < errs[1]


@pytest.mark.parametrize("opt", [{"centroids": 300}, {"codebook_dtype": "fp8"}, {"block": -1}, {"bits": 2},
                                 {"bits": 4, "centroids": 32}])
def test_bad_options_are_usage_errors(opt):
    with pytest.raises(UsageError):
        shrink(_net(), ["pq"], calibration=_calib(8), options={"pq": opt})


@pytest.mark.parametrize("bits", ["8", "4"])
def test_runtime_folds_the_decode_subgraph(tmp_path, bits):
    res = _shrink(_net(), _calib(), centroids=16, bits=bits, **FAST)
    assert {"Div", "Concat"} <= {n.op_type for n in res.model.graph.node} or bits == "8"
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(res.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert not ops & {"Gather", "Cast", "Div", "Sub", "Concat"}, ops


@pytest.mark.parametrize("name", ["mlp", "cnn_plain"])
def test_reference_models_8x_smaller_within_1pp(name):
    kind = digits.MODELS[name]
    original = onnx.load(digits.model_path(name))
    res = shrink(original, ["pq"], calibration=digits.calibration(kind, n=256), options={"pq": FAST}, force=True)
    real = len(res.model.SerializeToString())
    assert res.report["after"]["bytes"] == real
    assert len(original.SerializeToString()) / real >= 8.0
    before, after = digits.accuracy(original, kind), digits.accuracy(res.model, kind)
    assert after >= before - 0.01, (before, after)


def test_target_size_meets_the_byte_goal_with_per_layer_settings():
    model = _net(seed=2)
    calib = _calib()
    res = shrink(model, ["pq"], calibration=calib, options={"pq": FAST}, target_bytes=0.3, force=True)
    base = res.report["before"]["bytes"]  # the model as loaded and normalised (shapes inferred)
    rep = res.report["passes"][0]
    assert abs(rep["size_search"]["goal_bytes"] - 0.3 * base) <= 1
    real = len(res.model.SerializeToString())
    assert real <= rep["size_search"]["estimated_bytes"] <= rep["size_search"]["goal_bytes"]
    assert res.report["targets"]["bytes"]["met"]
    # a looser goal keeps more bytes and no more error
    loose = shrink(model, ["pq"], calibration=calib, options={"pq": FAST}, target_bytes=0.6, force=True)
    err = lambda r: sum(r.report["passes"][0]["size_search"]["estimated_rel_error"].values())  # noqa: E731
    assert len(loose.model.SerializeToString()) > len(res.model.SerializeToString())
    assert err(loose) <= err(res)


def test_a_bias_shared_by_two_convs_is_refit_for_each_separately():
    """Two Convs with their own weights and one bias tensor: each bias refit gets its own
    initializer (the shared one is neither overwritten nor duplicated under its name)."""
    b = GraphBuilder(0)
    x = b.input("input", ["batch", 3, 8, 8])
    h = b.relu(b.conv(x, 3, 32))
    bias = b.const((0.1 * b.rng.standard_normal(32)).astype(np.float32))
    w1, w2 = (b.const((0.1 * b.rng.standard_normal((32, 32, 3, 3))).astype(np.float32)) for _ in range(2))
    y1 = b.node("Conv", [h, w1, bias], pads=[1, 1, 1, 1])
    y2 = b.node("Conv", [h, w2, bias], pads=[1, 1, 1, 1])
    b.output(b.node("Add", [y1, y2], out="y"))
    model = b.model()
    res = _shrink(model, _calib(), centroids=16, **FAST)
    m = res.model
    assert len(res.report["passes"][0]["changed"]) == 2
    names = [t.name for t in m.graph.initializer]
    assert len(names) == len(set(names))
    onnx.checker.check_model(m, full_check=True)
    biases = [n.input[2] for n in m.graph.node if n.op_type == "Conv"][1:]
    assert len(set(biases)) == 2


# ----------------------------------------------------------------------------- 4-bit codes
def _odd_net(seed=0):
    """input(N,35) -> Gemm(transB=1) 35->63 -> Relu -> MatMul 63->45: the default block is 1 (no
    4, 8 or 2 divides 35 or 63), so the codes number 63·35 = 2205 and 45·63 = 2835, both odd."""
    b = GraphBuilder(seed)
    x = b.input("input", ["batch", 35])
    h = b.relu(b.gemm(x, 35, 63))
    b.output(b.matmul(h, 63, 45, out="y"), ["batch", 45])
    return b.model()


def _odd_calib(n=64, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 35)).astype(np.float32)


def _decoded_outputs(m, feed):
    """{decoded weight name: (value the runtime computes, value decoded_weight gives)}."""
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    names = [n.output[0] for n in m.graph.node if n.output[0].endswith(".pq")]
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    for name in names:
        probe.graph.output.add().name = name
    outs = dict(zip([o.name for o in probe.graph.output], run(probe, feed)))
    got = {}
    for name in names:
        base = name[:-3]
        rows_of = "transpose" if name in _transposed(m) else "natural"
        got[name] = (outs[name], decoded_weight(outs[name].shape, rows_of, inits[base + ".pq_codebook"],
                                                inits[base + ".pq_codes"]))
    return got, inits


def _same_weights_as_bytes(packed, eight, rows, per_word):
    """Check that ``packed`` (codes packed ``per_word`` to a word of ``rows`` int8 rows) decodes to
    the same weights as ``eight`` (one byte a code), in the runtime as in numpy, and gives the same
    outputs; returns (its bytes, the 8-bit model's bytes, the 8-bit model's code bytes)."""
    gp, ip = _decoded_outputs(packed.model, {"input": _wide_calib(2)})
    g8, i8 = _decoded_outputs(eight.model, {"input": _wide_calib(2)})
    assert gp.keys() == g8.keys() and len(gp) == 2
    for name in gp:  # same quantization, only the storage differs; the runtime decodes what numpy does
        assert np.array_equal(gp[name][0], g8[name][0]) and np.array_equal(gp[name][0], gp[name][1])
        cp, c8 = ip[name[:-3] + ".pq_codes"], i8[name[:-3] + ".pq_codes"]
        assert cp.dtype == np.int8 and cp.shape == (rows, (c8.size + per_word - 1) // per_word)
    assert_close(eight.model, packed.model, {"input": _wide_calib(16, seed=3)}, rtol=1e-6, atol=1e-6)
    codes8 = sum(i8[n[:-3] + ".pq_codes"].nbytes for n in g8)
    return len(packed.model.SerializeToString()), len(eight.model.SerializeToString()), codes8


@pytest.mark.parametrize("n", [1, 2, 7, 566, 567])
def test_pack_codes_round_trips_odd_and_even_counts(n):
    codes = np.random.default_rng(n).integers(0, 16, size=n)
    packed = pack_codes(codes)
    assert packed.dtype == np.int8 and packed.shape == ((n + 1) // 2,)
    assert np.array_equal(unpack_codes(packed, n), codes)


@pytest.mark.parametrize("bits", ["4", "auto"])
def test_packed_decode_reproduces_the_codebook_weight_exactly_with_odd_code_counts(bits):
    model = _odd_net()
    res = _shrink(model, _odd_calib(), centroids=16, bits=bits, **FAST)
    rep = res.report["passes"][0]
    assert len(rep["changed"]) == 2 and all(info["bits"] == 4 for info in rep["layers"].values())
    got, inits = _decoded_outputs(res.model, {"input": _odd_calib(2)})
    assert len(got) == 2
    for name, (runtime, numpy_decoded) in got.items():
        codes = inits[name[:-3] + ".pq_codes"]
        n = runtime.size // inits[name[:-3] + ".pq_codebook"].shape[1]
        assert n % 2 == 1 and codes.dtype == np.int8 and codes.shape == ((n + 1) // 2,)
        assert runtime.dtype == numpy_decoded.dtype == np.float32
        assert np.array_equal(runtime, numpy_decoded)
    ops = {n.op_type for n in res.model.graph.node}
    assert {"Div", "Concat", "Slice", "Gather"} <= ops and "BitShift" not in ops
    assert not any(t.data_type == onnx.TensorProto.UINT8 for t in res.model.graph.initializer)
    casts = {a.i for n in res.model.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    assert casts <= {onnx.TensorProto.INT32, onnx.TensorProto.FLOAT}
    assert res.report["validation"]["tensorrt_unparseable"] == []
    onnx.checker.check_model(res.model, full_check=True)


def _wide_net(seed=0, hidden=512):
    """input(N,64) -> Gemm 64->hidden -> Relu -> MatMul hidden->128: 8192 and 16384 codes at the
    default block 4."""
    b = GraphBuilder(seed)
    x = b.input("input", ["batch", 64])
    h = b.relu(b.gemm(x, 64, hidden))
    b.output(b.matmul(h, hidden, 128, out="y"), ["batch", 128])
    return b.model()


def _wide_calib(n=128, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)


def test_packed_codes_give_the_same_weights_in_half_the_code_bytes():
    model = _wide_net()
    quick = dict(FAST, gptq=False, refine=0)  # storage, not quality, is tested here
    four = _shrink(model, _wide_calib(), centroids=16, bits=4, **quick)
    eight = _shrink(model, _wide_calib(), centroids=16, bits=8, **quick)
    g4, i4 = _decoded_outputs(four.model, {"input": _wide_calib(2)})
    g8, i8 = _decoded_outputs(eight.model, {"input": _wide_calib(2)})
    assert g4.keys() == g8.keys() and len(g4) == 2
    for name in g4:  # same quantization, only the storage differs
        assert np.array_equal(g4[name][0], g8[name][0])
        c4, c8 = i4[name[:-3] + ".pq_codes"], i8[name[:-3] + ".pq_codes"]
        assert c8.dtype == np.int8 and c4.nbytes == (c8.nbytes + 1) // 2
    assert_close(eight.model, four.model, {"input": _wide_calib(16, seed=3)}, rtol=1e-6, atol=1e-6)
    # the whole file: half the code bytes, less the longer decode (a few hundred bytes a layer)
    b4, b8 = len(four.model.SerializeToString()), len(eight.model.SerializeToString())
    codes8 = sum(i8[n[:-3] + ".pq_codes"].nbytes for n in g8)
    assert 0.45 * codes8 <= b8 - b4 <= 0.5 * codes8, (b4, b8, codes8)
    assert four.report["after"]["bytes"] == b4


@pytest.mark.parametrize("n", [10, 11, 13, 566, 567])
def test_six_bit_codes_round_trip_four_in_three_bytes(n):
    codes = np.random.default_rng(n).integers(0, 64, size=n)
    packed = pack_codes6(codes)
    assert packed.dtype == np.int8 and packed.shape == (3, (n + 3) // 4)
    assert np.array_equal(unpack_codes(packed, n), codes)
    with pytest.raises(ValueError, match="< 64"):
        pack_codes6(np.full(n, 64))
    with pytest.raises(ValueError, match="more than 9"):
        pack_codes6(codes[:9])


@pytest.mark.parametrize("opset", [11, 17])
def test_six_bit_codes_give_the_same_weights_in_three_quarters_of_the_code_bytes(opset):
    model = _wide_net()
    model.opset_import[0].version = opset   # ReduceSum takes its axes as an attribute before opset 13
    quick = dict(FAST, gptq=False, refine=0)  # storage, not quality, is tested here
    six = _shrink(model, _wide_calib(), centroids=64, bits=6, **quick)
    auto = _shrink(model, _wide_calib(), centroids=64, **quick)
    eight = _shrink(model, _wide_calib(), centroids=64, bits=8, **quick)
    assert all(info["bits"] == 6 for info in six.report["passes"][0]["layers"].values())
    assert all(info["bits"] == 6 for info in auto.report["passes"][0]["layers"].values())  # 8192+ codes: it saves
    assert auto.model.SerializeToString() == six.model.SerializeToString()
    b6, b8, codes8 = _same_weights_as_bytes(six, eight, rows=3, per_word=4)
    # a quarter of the code bytes saved, less the longer decode (about 700 bytes a layer here)
    assert 0.15 * codes8 <= b8 - b6 <= 0.25 * codes8, (b6, b8, codes8)
    assert six.report["after"]["bytes"] == b6
    ops = {n.op_type for n in six.model.graph.node}
    assert "ReduceSum" in ops and "BitShift" not in ops
    assert six.report["validation"]["tensorrt_unparseable"] == []
    onnx.checker.check_model(six.model, full_check=True)


@pytest.mark.parametrize("n", [14, 15, 17, 566, 567])
def test_five_bit_codes_round_trip_six_in_four_bytes(n):
    codes = np.random.default_rng(n).integers(0, 32, size=n)
    packed = pack_words(codes, 5)
    assert packed.dtype == np.int8 and packed.shape == (4, (n + 5) // 6)
    assert np.array_equal(unpack_codes(packed, n), codes)
    assert code_bits(packed, n) == 5 and code_bits(pack_codes6(codes), n) == 6
    with pytest.raises(ValueError, match="< 32"):
        pack_words(np.full(n, 32), 5)
    with pytest.raises(ValueError, match="more than 13"):
        pack_words(codes[:13], 5)


def test_five_bit_codes_give_the_same_weights_in_two_thirds_of_the_code_bytes():
    model = _wide_net()
    quick = dict(FAST, gptq=False, refine=0)  # storage, not quality, is tested here
    five = _shrink(model, _wide_calib(), centroids=32, bits=5, **quick)
    eight = _shrink(model, _wide_calib(), centroids=32, bits=8, **quick)
    assert all(info["bits"] == 5 for info in five.report["passes"][0]["layers"].values())
    b5, b8, codes8 = _same_weights_as_bytes(five, eight, rows=4, per_word=6)
    # a third of the code bytes saved, less the longer decode (about 700 bytes a layer here)
    assert 0.25 * codes8 <= b8 - b5 <= 1 / 3 * codes8, (b5, b8, codes8)
    assert five.report["after"]["bytes"] == b5
    assert five.report["validation"]["tensorrt_unparseable"] == []
    onnx.checker.check_model(five.model, full_check=True)
    with pytest.raises(ValueError, match="at most 32"):
        PqConfig(bits="5", centroids=64)


def test_six_bit_config_is_checked():
    with pytest.raises(ValueError, match="at most 64"):
        PqConfig(bits="6", centroids=128)
    assert PqConfig(bits="6", centroids=64).bits == "6"


def test_auto_packs_only_where_it_saves_bytes():
    # K > 32, 2205 and 2835 codes: 6-bit packing would save fewer bytes than its decode costs
    wide = _shrink(_odd_net(), _odd_calib(), centroids=64, **FAST)
    assert all(info["bits"] == 8 for info in wide.report["passes"][0]["layers"].values())
    assert not {"Div", "Concat"} & {n.op_type for n in wide.model.graph.node}
    # K = 32: the 2835 codes of the MatMul packed six in four bytes (945 bytes less against the
    # decode's nodes), the Gemm's 2205 one a byte
    five = _shrink(_odd_net(), _odd_calib(), centroids=32, **FAST)
    assert {n: i["bits"] for n, i in five.report["passes"][0]["layers"].items()} == {"gemm_3": 8, "matmul_6": 5}
    byte = _shrink(_odd_net(), _odd_calib(), centroids=32, bits=8, **FAST)
    assert len(five.model.SerializeToString()) < len(byte.model.SerializeToString())
    assert_close(byte.model, five.model, {"input": _odd_calib(16, seed=3)}, rtol=1e-6, atol=1e-6)
    # layers of at most 512 codes: the longer decode costs more bytes than packing saves; the
    # MatMul's 768 codes are packed (384 bytes saved against a decode of five more nodes)
    tiny = _shrink(_net(), _calib(), centroids=16, **FAST)
    layers = tiny.report["passes"][0]["layers"]
    assert {n: info["bits"] for n, info in layers.items()} == {
        "conv_7": 8, "conv_11": 8, "gemm_17": 8, "matmul_20": 4, "gemm_26": 8}, layers
    size = lambda r: len(r.model.SerializeToString())  # noqa: E731
    forced = _shrink(_net(), _calib(), centroids=16, bits=4, **FAST)
    bytewise = _shrink(_net(), _calib(), centroids=16, bits=8, **FAST)
    assert size(tiny) < min(size(forced), size(bytewise)), (size(tiny), size(forced), size(bytewise))


def test_packed_output_is_byte_identical_for_the_same_seed():
    model = _odd_net()
    a = _shrink(model, _odd_calib(), centroids=16, bits=4, **FAST).model.SerializeToString()
    b = _shrink(model, _odd_calib(), centroids=16, bits=4, **FAST).model.SerializeToString()
    assert a == b


def test_target_size_search_uses_packed_16_centroid_settings():
    model = _wide_net(seed=2, hidden=256)
    opts = dict(FAST, centroids=32, gptq=False)  # candidates K = 16 (packed) and 32
    res = shrink(model, ["pq"], calibration=_wide_calib(), options={"pq": opts}, target_bytes=0.05, force=True)
    rep = res.report["passes"][0]
    assert res.report["targets"]["bytes"]["met"]
    assert len(res.model.SerializeToString()) <= rep["size_search"]["estimated_bytes"]
    chosen = [c for c in rep["size_search"]["choice"].values() if c != "dense"]
    assert any(k == 16 for _, k in chosen), chosen
    assert any(info["bits"] == 4 for info in rep["layers"].values())
    assert res.report["validation"]["tensorrt_unparseable"] == []
    # with one byte a code the same budget leaves more output error
    eight = shrink(model, ["pq"], calibration=_wide_calib(), options={"pq": dict(opts, bits=8)},
                   target_bytes=0.05, force=True)
    err = lambda r: sum(r.report["passes"][0]["size_search"]["estimated_rel_error"].values())  # noqa: E731
    assert err(res) < err(eight)


# ----------------------------------------------------------------------------- error budget, size threshold
def _wide_mlp(seed=0, outputs=10, out="logits"):
    """input(N,64) -> Gemm 64->256 -> Relu -> MatMul 256->256 -> Relu -> Gemm 256->``outputs``: two
    layers of 64-256 KiB and a 10 KiB head (the default 10 logits)."""
    b = GraphBuilder(seed)
    x = b.input("input", ["batch", 64])
    h = b.relu(b.gemm(x, 64, 256))
    h = b.relu(b.matmul(h, 256, 256))
    b.gemm(h, 256, outputs, out=out)
    b.output(out, ["batch", outputs])
    return b.model()


def _mlp_calib(n=256, seed=0):
    return {"input": np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)}


def test_small_layers_stay_float_with_the_reason():
    res = shrink(_wide_mlp(), ["pq"], calibration=_mlp_calib(), force=True,
                 options={"pq": dict(FAST, min_bytes=20000, max_error=0)})
    rep = res.report["passes"][0]
    skipped = {s["node"]: s["reason"] for s in rep["skipped"]}
    assert sorted(rep["changed"]) == ["gemm_3", "matmul_6"], rep["changed"]
    assert "pq.min_bytes=20000" in skipped["gemm_10"] and "10240 B of weights" in skipped["gemm_10"]


def test_a_layer_over_the_error_budget_gets_shorter_subvectors_or_stays_float():
    model, calib = _wide_mlp(), _mlp_calib()
    free = shrink(model, ["pq"], calibration=calib, force=True, options={"pq": dict(FAST, max_error=0)})
    errs = {n: i["rel_output_error"] for n, i in free.report["passes"][0]["layers"].items()}
    assert all(i["block"] == 4 for i in free.report["passes"][0]["layers"].values())
    budget = 0.5 * min(errs.values())  # every layer is over it at the default d = 4
    # the per-layer rule alone (pq.allocate=false; the allocation across layers: its own tests)
    tight = shrink(model, ["pq"], calibration=calib, force=True,
                   options={"pq": dict(FAST, max_error=budget, allocate=False)})
    rep = tight.report["passes"][0]
    for name, info in rep["layers"].items():
        # settings are tried fewest bytes first; the kept one is the first within the budget, or
        # after it the same sub-vectors with half the centroids (5-bit codes) when within too
        assert (info["block"], info["centroids"]) != (4, 256) and info["rel_output_error"] <= budget, (name, info)
        tried = info.get("tried", [])
        first = next((i for i, t in enumerate(tried) if t["rel_error"] <= budget), len(tried))
        assert first >= len(tried) - 2 and (not tried or first < len(tried)), (name, tried)
        if first == len(tried) - 2:   # the half tried after it
            a, b = tried[first], tried[-1]
            assert a["block"] == b["block"] and b["centroids"] <= 32 < a["centroids"], (name, tried)
            kept = a if b["rel_error"] > budget else b
            assert (info["block"], info["centroids"]) == (kept["block"], kept["centroids"]), (name, info)
    # an impossible budget: every layer stays float, each with the settings it tried
    none = shrink(model, ["pq"], calibration=calib, force=True,
                  options={"pq": dict(FAST, max_error=1e-12, allocate=False)})
    rep = none.report["passes"][0]
    assert rep["changed"] == []
    reasons = [s["reason"] for s in rep["skipped"]]
    assert len(reasons) == 3 and all("kept float" in r and "d=4" in r and "d=1" in r for r in reasons)
    assert_close(model, none.model, _mlp_calib(16, seed=5), rtol=1e-6, atol=1e-6)
    # the tighter budget costs bytes, and buys accuracy on held-out data
    x = _mlp_calib(64, seed=9)
    ref = run(model, x)[0]
    gap = [np.linalg.norm(run(r.model, x)[0] - ref) for r in (free, tight)]
    assert gap[1] < 0.5 * gap[0], gap
    assert tight.report["after"]["bytes"] > free.report["after"]["bytes"]


def test_a_planted_sensitive_layer_gets_a_finer_setting_while_the_others_keep_the_default():
    """Two layers hold only the weights ±a (any 4 of them: at most 16 distinct sub-vectors, exact
    with 256 centroids); the planted one holds heavy-tailed weights, whose output error at the
    first (cheapest) setting is over the budget: only it is redone finer (or left float)."""
    model = _wide_mlp()
    inits = {t.name: t for t in model.graph.initializer}
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    rng = np.random.default_rng(4)
    for t in model.graph.initializer:
        w = numpy_helper.to_array(t)
        if w.ndim != 2:
            continue
        if t.name == gemm.input[1]:
            new = (rng.standard_t(2, size=w.shape) * 0.1).astype(np.float32)  # the planted layer
        else:
            new = (np.sign(w) * 0.05).astype(np.float32)
        t.CopyFrom(numpy_helper.from_array(new, t.name))
    res = shrink(model, ["pq"], calibration=_mlp_calib(), force=True,
                 options={"pq": dict(FAST, max_error=3e-4, allocate=False)})   # the per-layer rule alone
    rep = res.report["passes"][0]
    layers = rep["layers"]
    kept = {s["node"]: s["reason"] for s in rep["skipped"] if "kept float" in s["reason"]}
    assert gemm.name in kept or layers[gemm.name]["block"] < 4, (layers.get(gemm.name), kept)
    if gemm.name in layers:
        assert layers[gemm.name]["tried"][0]["rel_error"] > 3e-4 >= layers[gemm.name]["rel_output_error"]
    others = {n: i for n, i in layers.items() if n != gemm.name}
    assert len(others) == 2 and all("tried" not in i for i in others.values()), others  # their cheapest setting
    assert inits  # the model was edited in place before the run


def test_a_long_1d_kernel_is_cut_into_short_subvectors():
    """An STFT written as Conv (257 filters of 512 taps, one input channel): one 512-long sub-vector
    per filter would need as many centroids as filters; it is cut into sub-vectors of 4."""
    import onnx_graphsurgeon as gs

    from onnxshrink.layers import WeightLayer
    from onnxshrink.passes.pq.layer import Layer, default_block

    def conv(shape):
        w = gs.Constant("w", np.zeros(shape, np.float32))
        return Layer(WeightLayer(gs.Node("Conv", inputs=[gs.Variable("x"), w], outputs=[gs.Variable("y")])))
    assert conv((257, 1, 512)).kernel == 512 and default_block(conv((257, 1, 512)), PqConfig()) == 4
    assert default_block(conv((8, 4, 3, 3)), PqConfig()) == 9


def test_the_sequential_target_needs_enough_rows_per_feature():
    """A Gemm 16->4 whose outputs the calibration rows move (y = x·(W + D)): with at least
    ROWS_PER_FEATURE rows per input feature the target follows the rows toward W + D; with fewer
    (a fit that would follow their noise) it is W itself."""
    import onnx_graphsurgeon as gs

    from onnxshrink.layers import WeightLayer
    from onnxshrink.passes.pq.layer import Layer
    from onnxshrink.passes.pq.target import ROWS_PER_FEATURE, layer_problem
    from onnxshrink.stats import CrossMoments

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 16)).astype(np.float32)   # Gemm transB=1: rows = outputs
    node = gs.Node("Gemm", inputs=[gs.Variable("x"), gs.Constant("w", w)], outputs=[gs.Variable("y")],
                   attrs={"transB": 1})
    layer = Layer(WeightLayer(node))
    shift = 0.3 * rng.standard_normal(w.shape)
    cfg = PqConfig(bias_correct=False)
    for n, follows in ((ROWS_PER_FEATURE * 16, True), (ROWS_PER_FEATURE * 16 - 1, False)):
        x = rng.standard_normal((n, 16))
        cm = CrossMoments(16, 4)
        cm.update(x, x @ (w + shift).T)
        t, h, _ = layer_problem(layer, cm, cfg)
        if follows:
            assert np.linalg.norm(t - w - shift) < 0.1 * np.linalg.norm(shift)
        else:
            assert np.array_equal(t, w.astype(np.float64))
        assert h.shape == (16, 16)


def test_six_bit_codes_are_not_tried_before_a_log():
    """A Conv whose output reaches a Log (a log spectrum: Conv → Mul → MatMul → Log) gets no 6-bit
    setting in its ladder unless pq.bits=6 asks for it; a Conv followed by Relu does."""
    import onnx_graphsurgeon as gs

    from onnxshrink.layers import WeightLayer
    from onnxshrink.passes.pq.layer import Layer, before_log, ladder, six_bit_saves

    def conv(tail, shape=(64, 16, 3, 3)):
        w = gs.Constant("w", np.random.default_rng(0).standard_normal(shape).astype(np.float32))
        y = gs.Variable("y")
        node = gs.Node("Conv", inputs=[gs.Variable("x"), w], outputs=[y])
        h = y
        for op in tail:
            out = gs.Variable(op + "_out")
            gs.Node(op, inputs=[h], outputs=[out])
            h = out
        return Layer(WeightLayer(node))

    logged, plain = conv(["Mul", "MatMul", "Clip", "Log"]), conv(["Relu"])
    assert before_log(logged) and not before_log(plain)
    # a weight layer between (a mel filter bank's MatMul) answers for the Log itself
    spectrum = conv(["Mul"])
    mel = gs.Constant("mel", np.ones((1, 1), np.float32))
    h = spectrum.node.outputs[0].outputs[0].outputs[0]
    for op, inputs in (("MatMul", [h, mel]), ("Clip", None), ("Log", None)):
        out = gs.Variable(op + "_out")
        gs.Node(op, inputs=inputs or [h], outputs=[out])
        h = out
    assert not before_log(spectrum)
    assert before_log(Layer(WeightLayer(mel.outputs[0])))
    auto, six = PqConfig(), PqConfig(bits="6", centroids=64)
    assert (1, 64) in ladder(plain, 9, 256, auto) and (1, 64) not in ladder(logged, 9, 256, auto)
    assert ladder(logged, 9, 256, auto) == [(1, 256)] and len(ladder(plain, 9, 256, auto)) > 3
    assert (1, 64) in ladder(logged, 9, 256, six)
    # a layer of 2048 weights: its packed 6-bit codes would not save bytes, and 64 centroids in
    # one-byte codes save only the codebook: no (1, 64) unless pq.bits=6
    tiny = conv(["Relu"], shape=(32, 64, 1, 1))
    assert not six_bit_saves(tiny, auto) and six_bit_saves(plain, auto)
    assert (1, 64) not in ladder(tiny, 4, 256, auto) and (1, 64) in ladder(tiny, 4, 256, six)


def test_five_bit_scalar_codes_are_fitted_after_six_bit_ones_where_they_may_be_within():
    """The ladder holds 32 scalar centroids (5-bit codes) between 16 and 64 where 5-bit codes save
    bytes; the rule fits them right after the 64 and only where 4x the 64's error is within the
    budget (``halvings``); the cheaper within the budget is kept."""
    import onnx_graphsurgeon as gs

    from onnxshrink.layers import WeightLayer
    from onnxshrink.passes.pq.layer import Layer, ladder
    from onnxshrink.passes.pq.pass_ import fit_order, halvings

    w = gs.Constant("w", np.random.default_rng(0).standard_normal((64, 16, 3, 3)).astype(np.float32))
    layer = Layer(WeightLayer(gs.Node("Conv", inputs=[gs.Variable("x"), w], outputs=[gs.Variable("y")])))
    steps = ladder(layer, 9, 256, PqConfig())
    assert steps.index((1, 16)) < steps.index((1, 32)) < steps.index((1, 64)) < steps.index((1, 256))
    assert (1, 32) not in ladder(layer, 9, 256, PqConfig(bits="6", centroids=64))
    halves = halvings(steps)
    assert halves == {(1, 32): (1, 64)}
    order = fit_order(steps, halves)
    assert order.index((1, 32)) == order.index((1, 64)) + 1 and sorted(order) == sorted(steps)
    assert halvings([(1, 64), (1, 32)]) == {}   # already after it: tried in turn


def test_error_budget_and_size_threshold_options_are_checked():
    for bad in ({"max_error": -1}, {"min_bytes": -5}):
        with pytest.raises(ValueError, match="pq.m"):
            PqConfig(**bad)


def test_size_search_picks_the_least_error_within_the_goal():
    """The Lagrangian choice over per-layer (setting, error, bytes) options: the least total error
    whose bytes meet the goal, all dense when the goal is loose, the smallest when it cannot be met."""
    from onnxshrink.passes.pq.search import lagrangian
    options = {"a": [(None, 0.0, 100), ((4, 256), 0.01, 30), ((2, 16), 0.05, 10)],
               "b": [(None, 0.0, 50), ((4, 16), 0.02, 20)]}
    pick = lambda goal: (lambda c, s: ({n: o[0] for n, o in c.items()}, s))(*lagrangian(options, 5, goal))  # noqa: E731
    assert pick(60) == ({"a": (4, 256), "b": (4, 16)}, 55)
    assert pick(1000) == ({"a": None, "b": None}, 155)
    assert pick(20) == ({"a": (2, 16), "b": (4, 16)}, 35)   # unreachable: the fewest bytes


def test_statistics_rounds_merge_consecutive_levels():
    """pq.rounds=2 over five topological levels (six layers): two groups of consecutive levels,
    the first closed once it holds at least half the layers; 0 or enough rounds keep the levels."""
    from onnxshrink.passes.pq.pass_ import merge_levels
    levels = [["a"], ["b"], ["c", "d"], ["e"], ["f"]]
    assert merge_levels(levels, 2) == [["a", "b", "c", "d"], ["e", "f"]]   # a level is never split
    assert merge_levels(levels, 0) == levels and merge_levels(levels, 5) == levels


def _table_net(seed=0):
    """ids → Gather(emb 100×32) ─┐
               Slice(pe 1×64×32) ─ Add ─┐
               Reshape(pos 1×64×32 → 4×16×32) ─ Add → MatMul(w 32×8) → y"""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((100, 32)).astype(np.float32)
    pe = np.sin(np.arange(64)[:, None] / (10 ** (np.arange(32)[None] / 32))).astype(np.float32)[None]
    w = (rng.standard_normal((32, 8)) / 6).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"], axis=0, name="gather"),
             helper.make_node("Slice", ["pe", "st", "en", "ax"], ["p"], name="slice"),
             helper.make_node("Add", ["e", "p"], ["h0"], name="add"),
             helper.make_node("Reshape", ["pos", "shape"], ["q"], name="reshape"),
             helper.make_node("Add", ["h0", "q"], ["h"], name="add_pos"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")]
    pos = (0.5 * rng.standard_normal((1, 64, 32))).astype(np.float32)
    inits = [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(pe, "pe"), numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(pos, "pos"), numpy_helper.from_array(np.array([4, 16, 32]), "shape"),
             numpy_helper.from_array(np.array([0]), "st"), numpy_helper.from_array(np.array([16]), "en"),
             numpy_helper.from_array(np.array([1]), "ax")]
    g = helper.make_graph(nodes, "tables", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m, [{"ids": rng.integers(0, 100, (4, 16))} for _ in range(8)]


def test_gather_slice_and_reshape_tables_are_quantized_within_the_budget():
    model, calib = _table_net()
    res = shrink(model, ["pq"], calibration=calib, force=True, options={"pq": RULE})
    rep = res.report["passes"][0]
    assert sorted(rep["changed"]) == ["gather", "reshape", "slice"], rep
    for name, info in rep["layers"].items():
        assert info["metric"] == "weights" and info["rel_weight_error"] <= PqConfig().max_error, (name, info)
        assert info["bytes"][1] < 0.35 * info["bytes"][0], (name, info)
    assert len(res.model.SerializeToString()) < 0.5 * len(model.SerializeToString())
    ref = run(model, calib[0])[0]
    got = run(res.model, calib[0])[0]
    assert np.linalg.norm(got - ref) <= 0.03 * np.linalg.norm(ref)
    assert ref.shape == got.shape == (4, 16, 8)
    ops = {n.op_type for n in res.model.graph.node}
    assert {"Gather", "Slice", "MatMul"} <= ops
    assert not {"emb", "pos"} & {t.name for t in res.model.graph.initializer}


def _if_net(seed=0):
    """x → MatMul(w1 64×64) → h; If(cond) then Relu(h) → MatMul(·, w2 64×64) (w2 from the outer
    scope) else Identity(h) → y"""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
    w2 = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
    then = helper.make_graph([helper.make_node("Relu", ["h"], ["r"], name="inner_relu"),
                              helper.make_node("MatMul", ["r", "w2"], ["t"], name="inner_mm")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["h"], ["o"], name="inner_id")], "else", [],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="outer_mm"),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other)]
    g = helper.make_graph(nodes, "if_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64]),
                                            helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    feeds = [{"x": rng.standard_normal((16, 64)).astype(np.float32), "cond": np.array(i % 2 == 0)} for i in range(8)]
    return m, feeds


def test_a_weight_read_inside_an_if_branch_is_quantized_in_weight_space():
    model, feeds = _if_net()
    res = shrink(model, ["pq"], calibration=feeds, force=True, options={"pq": RULE})
    rep = res.report["passes"][0]
    assert sorted(rep["changed"]) == ["inner_mm", "outer_mm"], rep
    assert rep["layers"]["inner_mm"]["metric"] == "weights" and rep["layers"]["outer_mm"]["metric"] == "activation"
    assert rep["layers"]["inner_mm"]["rel_weight_error"] <= PqConfig().max_error
    assert not {"w1", "w2"} & {t.name for t in res.model.graph.initializer}
    for cond in (True, False):  # both branches, the one reading the decode and the other
        feed = {"x": feeds[0]["x"], "cond": np.array(cond)}
        ref, got = run(model, feed)[0], run(res.model, feed)[0]
        assert np.linalg.norm(got - ref) <= 0.03 * np.linalg.norm(ref), cond


def _twin_net(seed=0, direct=False):
    """x (b × 4 × 16, features of rank 8) → Flatten → f → MatMul(w1) → Relu → h; If(cond) then
    Flatten(x) → f2 (``direct``: f itself) → MatMul(w2 64×64) → t, else Identity(h) → y"""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
    w2 = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
    inner = [] if direct else [helper.make_node("Flatten", ["x"], ["f2"], name="inner_flatten", axis=1)]
    then = helper.make_graph(inner + [helper.make_node("MatMul", ["f" if direct else "f2", "w2"], ["t"], name="inner_mm")],
                             "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["h"], ["o"], name="inner_id")], "else", [],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="outer_flatten", axis=1),
             helper.make_node("MatMul", ["f", "w1"], ["m"], name="outer_mm"),
             helper.make_node("Relu", ["m"], ["h"], name="outer_relu"),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other)]
    g = helper.make_graph(nodes, "twin_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 16]),
                                              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    mix = rng.standard_normal((8, 64))
    feeds = [{"x": (rng.standard_normal((32, 8)) @ mix).reshape(32, 4, 16).astype(np.float32),
              "cond": np.array(False)} for _ in range(8)]   # the calibration data never runs the branch
    return m, feeds


@pytest.mark.parametrize("direct", [False, True])
def test_a_branch_layer_reading_a_main_graph_tensor_gets_its_input_statistics(direct):
    """The branch's MatMul reads the flattened input as the main graph flattens it (or the main
    graph's tensor itself): it is quantized under the input covariance of that tensor, taken on
    the main graph (the branch never runs on the data), not in weight space; the rank-8 features
    let it take fewer bytes within the budget, and the branch's outputs stay within the budget."""
    from onnxshrink.graph import import_graph
    from onnxshrink.passes.pq.target import outer_twin
    model, feeds = _twin_net(direct=direct)
    g = import_graph(model)
    branch = next(n for n in g.nodes if n.op == "If").attrs["then_branch"]
    mm = next(n for n in branch.nodes if n.op == "MatMul")
    assert outer_twin(mm.inputs[0], branch, g) == "f"
    assert outer_twin(mm.outputs[0], branch, g) is None   # made in the branch from a branch tensor
    res = shrink(model, ["pq"], calibration=feeds, force=True, options={"pq": RULE})
    layers = res.report["passes"][0]["layers"]
    inner = layers["inner_mm"]
    assert inner["metric"] == "activation" and inner["rel_output_error"] <= PqConfig().max_error, inner
    assert "bias_refit" not in inner   # a MatMul without a bias Add: no bias to refit
    weights = shrink(model, ["pq"], calibration=feeds, force=True, options={"pq": dict(RULE, aware=False)})
    assert inner["bytes"][1] < weights.report["passes"][0]["layers"]["inner_mm"]["bytes"][1], (inner, weights.report)
    feed = {"x": feeds[0]["x"], "cond": np.array(True)}
    ref, got = run(model, feed)[0], run(res.model, feed)[0]
    assert np.sum((got - ref) ** 2) <= 2 * PqConfig().max_error * np.sum(ref ** 2)


def test_the_budget_counts_the_error_of_weak_outputs():
    """Two outputs, one with 1/100 of the other's energy: an error of 10 % on the weak one is
    1e-4 of the total output energy, but a quarter of the mean per-output relative error
    ((0 + 0.01) / 2 / 4) counts."""
    from onnxshrink.passes.pq.quantize import ROW_SLACK, budget_error
    t = np.array([[1.0, 0.0], [0.0, 0.1]])
    t_hat = np.array([[1.0, 0.0], [0.0, 0.11]])
    h = np.eye(2)
    assert weighted_error(t, t_hat, h) == pytest.approx(1e-4 / 1.01)
    assert budget_error(t, t_hat, h) == pytest.approx(0.01 / 2 / ROW_SLACK)
    assert budget_error(t, t_hat, None) == pytest.approx(0.01 / 2 / ROW_SLACK)
    # an error spread like the outputs' energy: the global figure decides
    even = t * 1.01
    assert budget_error(t, even, h) == pytest.approx(weighted_error(t, even, h))
    # an output under 1e-3 of the mean energy counts as dead: left out of the mean
    dead = np.array([[1.0, 0.0], [0.0, 1e-3]])
    off = dead * np.array([[1.0], [2.0]])
    assert budget_error(dead, off, h) == pytest.approx(weighted_error(dead, off, h))


# ----------------------------------------------------------------------------- the error allocation
def test_knapsack_meets_the_limit_and_finds_points_the_lagrangian_misses():
    import itertools

    from onnxshrink.passes.pq.search import knapsack, lagrangian
    # (setting, bytes, error): the one feasible cheap mix (a: 8, b: 30 -> error 0.9) lies off
    # the convex hull the Lagrangian choice can reach
    options = {"a": [("a0", 100, 0.0), ("a1", 8, 0.5)], "b": [("b0", 50, 0.0), ("b1", 30, 0.4), ("b2", 5, 0.95)]}
    best = min((sum(c[1] for c in combo), combo) for combo in itertools.product(*options.values())
               if sum(c[2] for c in combo) <= 1.0)[1]
    choice, err = knapsack(options, 1.0)
    assert err <= 1.0 and [choice[n] for n in options] == list(best)
    lag, _ = lagrangian(options, 0, 1.0)
    assert sum(c[1] for c in choice.values()) <= sum(c[1] for c in lag.values())
    rng = np.random.default_rng(0)
    for _ in range(20):   # random instances: always within the limit, never more bytes than the Lagrangian
        # as the allocation gives it: each name has a zero-error option (the layer kept dense)
        opts = {i: [(j, int(b), float(e)) for j, (b, e) in
                    enumerate(zip(sorted(rng.integers(1, 100, 4))[::-1], [0.0] + sorted(rng.random(3))))]
                for i in range(4)}
        limit = float(rng.random() * 2)
        choice, err = knapsack(opts, limit)
        assert err <= limit + 1e-12 and abs(err - sum(c[2] for c in choice.values())) < 1e-9
        lag, lag_err = lagrangian(opts, 0, limit)
        if lag_err <= limit:
            assert sum(c[1] for c in choice.values()) <= sum(c[1] for c in lag.values())


def test_the_allocation_spends_the_output_budget_on_the_layers_that_save_bytes():
    model, calib = _wide_mlp(), _mlp_calib()
    opts = dict(FAST, max_error=3e-4, allocate=True)
    rule = shrink(model, ["pq"], calibration=calib, force=True, options={"pq": dict(opts, allocate=False)})
    same = shrink(model, ["pq"], calibration=calib, force=True, options={"pq": dict(opts, output_error=0)})
    spent = shrink(model, ["pq"], calibration=calib, force=True, options={"pq": opts})
    alloc = spent.report["passes"][0]["allocation"]
    assert alloc["predicted"] <= alloc["limit"] and alloc["limit"] >= 2e-3
    assert set(alloc["layers"]) == {"gemm_3", "matmul_6", "gemm_10"}
    assert all(a["gain"] > 0 for a in alloc["layers"].values())
    for name, info in spent.report["passes"][0]["layers"].items():
        d, k = alloc["layers"][name]["choice"]   # unused centroids are dropped: at most k remain
        assert (info["block"] == d and 0.9 * k <= info["centroids"] <= k) or "tried" in info
    size = lambda r: r.report["after"]["bytes"]  # noqa: E731
    # output_error=0: the per-layer rule's predicted error is the limit: never more bytes than it
    assert size(same) <= size(rule)
    assert size(spent) < 0.8 * size(rule), (size(spent), size(rule))
    # the model's output error on held-out data stays near the budget it was given
    x = _mlp_calib(128, seed=9)
    ref = run(model, x)[0]
    rel = float(np.sum((run(spent.model, x)[0] - ref) ** 2) / np.sum(ref ** 2))
    assert rel <= 4 * 2e-3, rel


def test_decision_flips_count_argmax_changes_along_the_last_axis():
    from onnxshrink.passes.pq.search import decision_flips
    ref = [{"logits": np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 0.9]]), "scalar": np.array([[1.0], [2.0]]),
            "ids": np.array([[0, 5], [1, 2]])}]
    same = [{"logits": ref[0]["logits"] + 0.01, "scalar": np.array([[9.0], [-9.0]]), "ids": np.array([[5, 0], [2, 1]])}]
    one = [{"logits": np.array([[2.0, 1.0, 0.0], [0.0, 0.8, 0.9]]), "scalar": ref[0]["scalar"], "ids": ref[0]["ids"]}]
    assert decision_flips(ref, same) == 0   # a last axis of 1 and integer outputs hold no decision
    assert decision_flips(ref, one) == 1
    assert decision_flips(ref + ref, one + one) == 2


def test_flips_within_the_rules_noise():
    from onnxshrink.passes.pq.search import flip_noise
    assert [flip_noise(n) for n in (0, 1, 2, 4, 20)] == [1, 2, 2, 3, 5]


def test_the_allocation_is_measured_with_every_layer_and_never_flips_more_decisions_than_the_rule():
    """A generous output budget (0.5) lets the knapsack pick coarse settings that flip the logits'
    argmax on the calibration data; the joint measure then lowers the aim, and keeps the rule's
    settings when nothing within the bound is found: never more flips than the rule's and its noise
    (``flip_noise``), never more bytes."""
    model, calib = _wide_mlp(), _mlp_calib()
    opts = dict(FAST, max_error=3e-4, allocate=True)
    rule = shrink(model, ["pq"], calibration=calib, force=True, options={"pq": dict(opts, allocate=False)})
    loose = shrink(model, ["pq"], calibration=calib, force=True, options={"pq": dict(opts, output_error=0.5)})
    alloc = loose.report["passes"][0]["allocation"]
    tries = alloc["tries"]
    assert tries[0]["aim"] == 0.5 and tries[0]["flips"] > alloc["bound"]["flips"], tries
    assert alloc["bound"]["flips"] >= 1
    assert all(a["aim"] > b["aim"] for a, b in zip(tries, tries[1:])), tries
    final = tries[-1]
    if "fallback" in final:
        assert loose.report["after"]["bytes"] == rule.report["after"]["bytes"]
    else:
        assert final["flips"] <= alloc["bound"]["flips"] and final["measured"] <= alloc["bound"]["output_error"]
        assert loose.report["after"]["bytes"] <= rule.report["after"]["bytes"]


def _planted_metric(model, column=0):
    """A task metric (``fn(outputs, feeds)``, higher is better) that reads one logit only: minus the
    largest change of column ``column`` against ``model``'s own outputs on the same feeds; every
    other output may change freely."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def metric(outputs, feeds):
        worst = 0.0
        for out, feed in zip(outputs, feeds):
            ref = sess.run(None, feed)[0]
            worst = max(worst, float(np.abs(np.asarray(out["logits"])[..., column] - ref[..., column]).max()))
        return -worst
    return metric


def test_the_allocation_keeps_the_users_metric_no_lower_than_the_rules():
    """shrink(..., metric=fn): each allocation measured with every layer at once must also keep the
    user's metric on the probe samples at least at the per-layer rule's value. A planted metric
    that reads how far one logit moves refuses every allocation that spends more error than the
    rule (the rule's settings are kept), while a metric that does not move with the weights lets
    the same allocation through as without a metric."""
    model, calib = _wide_mlp(), _mlp_calib()
    opts = {"pq": dict(FAST, max_error=3e-4, allocate=True)}
    rule = shrink(model, ["pq"], calibration=calib, force=True, options={"pq": dict(opts["pq"], allocate=False)})
    free = shrink(model, ["pq"], calibration=calib, force=True, options=opts)
    flat = shrink(model, ["pq"], calibration=calib, force=True, options=opts, metric=lambda outs, feeds: 1.0)
    held = shrink(model, ["pq"], calibration=calib, force=True, options=opts, metric=_planted_metric(model))
    size = lambda r: r.report["after"]["bytes"]  # noqa: E731
    assert size(free) < 0.8 * size(rule), (size(free), size(rule))
    assert size(flat) == size(free)
    alloc = held.report["passes"][0]["allocation"]
    floor = alloc["metric"]["floor"]
    assert floor < 0 and all(t["metric"] < floor for t in alloc["tries"] if "metric" in t), alloc
    assert "fallback" in alloc["tries"][-1] and size(held) == size(rule)
    flat_alloc = flat.report["passes"][0]["allocation"]
    assert flat_alloc["metric"]["floor"] == 1.0 and flat_alloc["tries"][-1]["metric"] == 1.0
