"""pq bench: product-quantized codebooks against ONNX Runtime's own weight quantizers.

Rows: pq with activation-aware assignment (default, per-layer output-error budget
``pq.max_error``), with that budget spent across layers by their measured gains (``pq.allocate=true``,
``pq.output_error``), without the budget (``pq.max_error=0``), and with plain k-means (``pq.aware=false``)
on the four reference models; K = 16 centroids stored as packed 4-bit codes on the MLP (d = 4:
half the bytes of the default; d = 2: the default's bytes, 2 bits a weight either way); a size
budget (``--target-size``); the chained
``pfa,basisconv,pq`` at ``--target-flops 0.4`` on cnn_plain.

Peers (same models, same test split, same latency measurement), printed after the table:
- ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, per-tensor; MatMul/Conv/Gemm);
- ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`` (4-bit, block 32,
  symmetric; rewrites MatMul only, so Gemm layers are first rewritten as MatMul + Add for it; it
  needs the ``onnx-ir`` package). Conv layers are not covered by it.
Bytes are the real serialized file sizes. Acceptance (issue): mlp and cnn_plain ≥ 8× smaller with
≤ 1 pp lost; chained ≥ 10× smaller with ≤ 1.5 pp lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time

import numpy as np
import onnx
from onnx import helper, numpy_helper

from common import Case, batch_feed, latency_ratio, load
from models import digits

CASES = [
    Case("mlp", ["pq"], label="pq (aware)"),
    Case("mlp", ["pq"], label="pq error allocation", options={"pq": {"allocate": True}}),
    Case("mlp", ["pq"], label="pq no error budget", options={"pq": {"max_error": 0}}),
    Case("mlp", ["pq"], label="pq plain k-means", options={"pq": {"aware": False}}),
    Case("mlp", ["pq"], label="pq K=16 4-bit codes", options={"pq": {"centroids": 16}}),
    Case("mlp", ["pq"], label="pq K=16 d=2 4-bit codes", options={"pq": {"centroids": 16, "block": 2}}),
    Case("cnn_plain", ["pq"], label="pq (aware)"),
    Case("cnn_plain", ["pq"], label="pq error allocation", options={"pq": {"allocate": True}}),
    Case("cnn_plain", ["pq"], label="pq no error budget", options={"pq": {"max_error": 0}}),
    Case("cnn_plain", ["pq"], label="pq plain k-means", options={"pq": {"aware": False}}),
    Case("cnn_plain", ["pq"], label="pq target-size 0.05", target_bytes=0.05),
    Case("cnn_residual", ["pq"], label="pq (aware)"),
    Case("transformer", ["pq"], label="pq (aware)"),
    Case("cnn_plain", ["pfa", "basisconv", "pq"], label="pfa,basisconv,pq flops 0.4", target_flops=0.4),
]

ACCEPTANCE = {  # (model, label) -> (min bytes ratio original/new, max pp lost)
    ("mlp", "pq (aware)"): (8.0, 1.0),
    ("cnn_plain", "pq (aware)"): (8.0, 1.0),
    ("mlp", "pq error allocation"): (8.0, 1.0),
    ("cnn_plain", "pq error allocation"): (8.0, 1.0),
    ("cnn_plain", "pfa,basisconv,pq flops 0.4"): (10.0, 1.5),
}


def gemm_to_matmul(model):
    """Gemm (alpha=beta=1, transA=0, constant B) -> MatMul (+ Add): the form MatMulNBits handles."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    nodes = []
    for n in m.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if (n.op_type != "Gemm" or n.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if attrs.get("transB", 0):
            inits[n.input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T), n.input[1]))
        out = n.output[0] + "_mm" if len(n.input) > 2 else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], n.input[1]], [out], name=n.name + "_mm"))
        if len(n.input) > 2:
            nodes.append(helper.make_node("Add", [out, n.input[2]], [n.output[0]], name=n.name + "_bias"))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


@contextlib.contextmanager
def _quiet_logging():
    """ONNX Runtime's quantizers log warnings (e.g. 'please consider pre-processing') through
    the root logger; the bench prints only its table."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _int8(model):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    with tempfile.TemporaryDirectory() as d, _quiet_logging():
        src, dst = os.path.join(d, "in.onnx"), os.path.join(d, "out.onnx")
        onnx.save(model, src)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        return onnx.load(dst)


def _nbits(model):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    with _quiet_logging():
        q = MatMulNBitsQuantizer(gemm_to_matmul(model), bits=4, block_size=32, is_symmetric=True)
        q.process()
    return q.model.model


def _peer_row(name, label, make, runs):
    original = load(name)
    kind = digits.MODELS[name]
    try:
        t = time.perf_counter()
        q = make(original)
        secs = time.perf_counter() - t
    except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
        return f"{name:13} {label:34} unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    lat, _, _ = latency_ratio(original, q, batch_feed(original, kind, 256), runs=runs)
    b0, b1 = len(original.SerializeToString()), len(q.SerializeToString())
    a0, a1 = digits.accuracy(original, kind), digits.accuracy(q, kind)
    ops = sorted({n.op_type for n in q.graph.node} - {n.op_type for n in original.graph.node})
    return (f"{name:13} {label:34} bytes {b1 / b0:6.3f} ({b0 / b1:5.1f}x)  latency {lat:6.3f}  "
            f"acc {100 * a0:6.2f} -> {100 * a1:6.2f} ({100 * (a1 - a0):+5.2f} pp)  {secs:5.1f} s  new ops {ops}")


def extra(rows, args):
    print("\npq rows: bytes as original/new (real file sizes), quantization time, slowest layer")
    for r in rows:
        rep = next((p for p in r["report"]["passes"] if p["name"] == "pq"), None)
        if rep is None:
            continue
        layers = rep.get("layers", {})
        slow = max(layers.items(), key=lambda kv: kv[1].get("seconds", 0), default=(None, {}))
        orig = len(load(r["model"]).SerializeToString())
        new = len(r["result_model"].SerializeToString())
        dense = [s["node"] for s in rep["skipped"]]
        print(f"  {r['model']:13} {r['label'][:34]:34} {orig / new:6.1f}x  pq {rep.get('seconds', 0):6.1f} s  "
              f"slowest {slow[0]} {slow[1].get('seconds', 0):.1f} s  dense: {len(dense)} layer(s)")
        key = (r["model"], r["label"])
        if key in ACCEPTANCE:
            min_x, max_pp = ACCEPTANCE[key]
            pp = 100 * (r["acc_before"] - r["acc_after"])
            ok = orig / new >= min_x and pp <= max_pp
            print(f"    acceptance ≥{min_x:.0f}x, ≤{max_pp} pp lost: {orig / new:.1f}x, {pp:.2f} pp lost -> "
                  f"{'met' if ok else 'NOT met'}")
    print("\npeers (ONNX Runtime quantizers; same test split; latency ratio vs the fp32 original)")
    for name in ("mlp", "cnn_plain", "transformer"):
        print(_peer_row(name, "ort quantize_dynamic int8", _int8, args.runs))
        print(_peer_row(name, "ort MatMulNBits 4-bit (block 32)", _nbits, args.runs))
