"""Weights shared by several nodes (an LSTM cell unrolled over time steps, as PyTorch's tracer
exports it: every step's Gemm reads the same W_ih / W_hh / output projection): pq quantizes each
shared weight once and lowrank factorizes it once, from the input statistics of all readers pooled.

    x(N,T,D) ─ Gather(t) ─ Gemm(W_ih) ─ Add ─ gates ─ h_t ─ Gemm(W_out) ─ logits[:, t]
                h_{t-1} ─ Gemm(W_hh) ─┘      (W_ih, W_hh, W_out: one initializer each)
"""

import numpy as np
import onnx
from graphs import run
from onnx import numpy_helper

import zoo
from onnxshrink import shrink
from onnxshrink.validate import Tolerances

SHARED = ("lstm_w_ih", "lstm_w_hh")


def _lstm(distinct=None, seed=3):
    """The zoo's unrolled LSTM; ``distinct``: W_ih and W_hh rebuilt from that many distinct
    sub-vectors of length 4 along each row (so a 256-centroid codebook holds them exactly)."""
    z = zoo.build("unrolled_lstm_op13")
    if distinct:
        rng = np.random.default_rng(seed)
        for init in z.model.graph.initializer:
            if init.name.startswith(SHARED):
                w = numpy_helper.to_array(init)
                table = (rng.standard_normal((distinct, 4)) * float(np.abs(w).mean())).astype(np.float32)
                new = table[rng.integers(distinct, size=w.size // 4)].reshape(w.shape)
                init.CopyFrom(numpy_helper.from_array(new, init.name))
    return z


def _readers(model, prefix):
    """{tensor read as input 1: [Gemm/MatMul names]} for tensors whose name starts with prefix."""
    out = {}
    for n in model.graph.node:
        if n.op_type in ("Gemm", "MatMul") and n.input[1].startswith(prefix):
            out.setdefault(n.input[1], []).append(n.name)
    return out


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def _shrink(z, passes, **opts):
    return shrink(z.model, passes, calibration=z.calibration(128), options={passes: opts} if opts else None,
                  force=True, tolerances=Tolerances(min_cosine=None))


def test_pq_quantizes_a_shared_weight_once_and_every_step_reads_it():
    z = _lstm(distinct=64)
    res = _shrink(z, "pq", output_error=0)   # no output error to spend: the exact settings
    rep = res.report["passes"][0]
    m = res.model
    # one codebook per shared weight, decoded once; all 4 (W_ih) / 3 (W_hh) steps read the decoded tensor
    books = [t.name for t in m.graph.initializer if t.name.endswith(".pq_codebook")]
    assert sorted(b.split(".")[0] for b in books if b.startswith(SHARED)) == ["lstm_w_hh_2", "lstm_w_ih_1"]
    readers = _readers(m, "lstm_w_")
    assert sorted(len(v) for v in readers.values()) == [3, 4] and all(k.endswith(".pq") for k in readers)
    assert not any(t.name in ("lstm_w_ih_1", "lstm_w_hh_2") for t in m.graph.initializer)
    assert {len(v.get("shared_by", [])) for v in rep["layers"].values()} >= {3, 4}
    # weights held by 64 distinct sub-vectors: the codebook is exact, so are the outputs
    feeds = z.calibration(64, seed=5)
    assert _rel(run(z.model, feeds)[0], run(m, feeds)[0]) < 1e-3
    # file smaller, resident weights (decode folded at load) as large as before
    mem = rep["memory"]
    assert mem["file_bytes"]["after"] < 0.5 * mem["file_bytes"]["before"]
    assert mem["runtime_weight_bytes"]["after"] == mem["runtime_weight_bytes"]["before"]
    assert res.report["ratios"]["bytes"] < 0.5


def test_pq_on_random_lstm_weights_bounded_error():
    z = _lstm()
    res = _shrink(z, "pq", max_error=0)  # the mechanics at the default d, without the error budget
    rep = res.report["passes"][0]
    assert set(rep["changed"]) >= {n for v in _readers(z.model, "lstm_w_").values() for n in v}
    assert all(v["rel_output_error"] < 0.06 for v in rep["layers"].values() if "rel_output_error" in v)
    feeds = z.calibration(64, seed=5)
    assert _rel(run(z.model, feeds)[0], run(res.model, feeds)[0]) < 0.35  # measured 0.24 (random weights)
    assert res.report["ratios"]["bytes"] < 0.45


def test_lowrank_full_rank_on_shared_weights_is_exact_with_one_pair_of_factors():
    z = _lstm()
    res = _shrink(z, "lowrank", rank_multiple=1, energy=1.0, force=True)
    m = res.model
    rep = res.report["passes"][0]
    assert len(rep["changed"]) == 11  # every reader of W_ih (4), W_hh (3), W_out (4)
    a = [t.name for t in m.graph.initializer if t.name.endswith("_lowrank_a")]
    b = [t.name for t in m.graph.initializer if t.name.endswith("_lowrank_b")]
    assert len(a) == len(b) == 3
    uses = [i for n in m.graph.node for i in n.input]
    assert sorted(uses.count(x) for x in a) == [3, 4, 4] and sorted(uses.count(x) for x in b) == [3, 4, 4]
    feeds = z.calibration(64, seed=5)
    assert _rel(run(z.model, feeds)[0], run(m, feeds)[0]) < 1e-3


def test_lowrank_compresses_shared_weights():
    z = _lstm()
    res = _shrink(z, "lowrank", rank_multiple=1, energy=0.9)
    rep = res.report["passes"][0]
    assert rep["ranks"]["gemm_9"] < 32
    ratios = res.report["ratios"]
    assert ratios["params"] < 0.95 and ratios["flops"] < 0.95
    readers = _readers(res.model, "lstm_w_ih_1_lowrank_b")
    assert [len(v) for v in readers.values()] == [4]
    feeds = z.calibration(64, seed=5)
    assert _rel(run(z.model, feeds)[0], run(res.model, feeds)[0]) < 0.5  # random weights: flat spectrum


def test_lowrank_on_a_conv_only_model_names_every_conv():
    z = zoo.build("dynamic_spatial_op17")
    res = shrink(z.model, "lowrank", calibration=z.calibration(16), force=True,
                 tolerances=Tolerances(min_cosine=None))
    rep = res.report["passes"][0]
    convs = [n.name for n in z.model.graph.node if n.op_type == "Conv"]
    reasons = {s["node"]: s["reason"] for s in rep["skipped"]}
    assert rep["changed"] == [] and set(convs) <= set(reasons)
    assert all(reasons[c] == "Conv layers need lowrank.conv=true" for c in convs)
