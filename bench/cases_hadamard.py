"""hadamard bench: the MLP with Fastfood-structured layers, a same-parameter low-rank baseline on the
same layers, and ONNX Runtime latency of a standalone Fastfood layer against the dense layer.

The low-rank baseline is computed here with numpy (whitened truncated SVD of the layer, the
second factor and bias refit by least squares, then the downstream layer refit, the same sequential
protocol the hadamard pass follows), at the largest rank whose parameters do not exceed those of
the Fastfood structure the pass chose for that layer.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

import common
from common import Case
from models import digits
from onnxshrink.calibrate import DataSource, run_model, with_outputs
from onnxshrink.graph import export_model, import_graph

CASES = [
    Case("mlp", ["hadamard"], label="hadamard (auto K, r; tol 0.03)", batch=64),
    # Fastfood alone, whatever it costs: with the pass's bounds on, fc2's eight blocks of width 1024
    # count 32 > hadamard.max_fits (24) and the search stops before the one structure allowed is complete,
    # and the output-error budget (0.01) would keep such a structure out: each layer stays dense (params
    # 1.000), a row that says nothing of the structure. With both off it shows what the structure does
    Case("mlp", ["hadamard"], label="hadamard K=8 r=0 (Fastfood only, no bounds)", batch=64,
         options={"hadamard": {"blocks": 8, "rank": 0, "tolerance": 1.0, "output_error": 0, "max_fits": 0}}),
]


def _rows(model, tensors, x):
    m = with_outputs(model, tensors)
    out = run_model(m, DataSource({model.graph.input[0].name: x}), batch_size=256)
    return [out[t].astype(np.float64) for t in tensors]


def _ridge(x, y, ridge=1e-3):
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    c = xc.T @ xc
    w = np.linalg.solve(c + ridge * np.trace(c) / len(c) * np.eye(len(c)), xc.T @ yc)
    return w, my - mx @ w


def lowrank_model(model, layer, rank, calib):
    """The MLP with ``layer`` as a rank-``rank`` whitened SVD (+ LS refit), downstream Gemm refit."""
    graph = import_graph(model)
    node = next(n for n in graph.nodes if n.name == layer)
    w = node.inputs[1].values.astype(np.float64)
    w = w.T if node.attrs.get("transB", 0) else w
    x, y = _rows(model, [node.inputs[0].name, node.outputs[0].name], calib)
    xc = x - x.mean(0)
    c = xc.T @ xc / len(x)
    chol = np.linalg.cholesky(c + 1e-4 * np.trace(c) / len(c) * np.eye(len(c)))
    u, _, _ = np.linalg.svd(chol.T @ w, full_matrices=False)
    a = np.linalg.solve(chol.T, u[:, :rank])               # d_in × r
    bmat, bias = _ridge(x @ a, y, 1e-6)                       # refit the second factor
    h = gs.Variable(layer + "/lowrank_mid", dtype=np.float32)
    first = gs.Node("MatMul", layer + "/lowrank_a", inputs=[node.inputs[0], gs.Constant(layer + "/A", a.astype(np.float32))], outputs=[h])
    node.inputs[0] = h
    node.inputs[1] = gs.Constant(node.inputs[1].name, bmat.T.astype(np.float32).copy())
    node.inputs[2] = gs.Constant(node.inputs[2].name, bias.astype(np.float32))
    node.attrs["transB"] = 1
    graph.nodes.append(first)
    new = export_model(graph, like=model)
    # downstream refit: every later Gemm, on the rewritten inputs, to the original outputs
    names = [n.name for n in graph.nodes if n.op == "Gemm"]
    for later in names[names.index(layer) + 1:]:
        g2 = import_graph(new)
        n2 = next(n for n in g2.nodes if n.name == later)
        (xn,) = _rows(new, [n2.inputs[0].name], calib)
        (yo,) = _rows(model, [n2.outputs[0].name], calib)
        w2, b2 = _ridge(xn, yo)
        n2.inputs[1] = gs.Constant(n2.inputs[1].name, w2.T.astype(np.float32).copy())
        n2.inputs[2] = gs.Constant(n2.inputs[2].name, b2.astype(np.float32))
        n2.attrs["transB"] = 1
        new = export_model(g2, like=model)
    return new


def _layer_error(original, rewritten, tensor, x):
    (a,) = _rows(original, [tensor], x)
    (b,) = _rows(rewritten, [tensor], x)
    return float(((a - b) ** 2).sum() / ((a - a.mean(0)) ** 2).sum())


def _fastfood_layer(d, K, r=0, seed=0):
    """A standalone d → d layer: dense Gemm, and the Fastfood subgraph with K random blocks."""
    from onnxshrink.passes.hadamard import Block, FastfoodFit, _replace
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    bias = rng.standard_normal(d).astype(np.float32)
    x = gs.Variable("x", dtype=np.float32, shape=["N", d])
    y = gs.Variable("y", dtype=np.float32, shape=["N", d])
    graph = gs.Graph(nodes=[gs.Node("Gemm", "layer", {"transB": 1}, [x, gs.Constant("W", w), gs.Constant("b", bias)], [y])],
                     inputs=[x], outputs=[y], opset=17)
    dense = gs.export_onnx(graph.copy())
    dense.ir_version = 8
    fit = FastfoodFit(d, d, seed)
    for k in range(K):
        blk = Block(d, rng, np.ones(d, bool), fit.perm(0, k))
        blk.s = rng.standard_normal(d)
        fit.blocks[0].append(blk)
    fit.u, fit.vt = rng.standard_normal((d, r)), rng.standard_normal((r, d))
    _replace(graph, graph.nodes[0], fit, {}, 17)
    ff = export_model(graph, like=dense)
    return dense, ff


def extra(rows, args):
    original = common.load("mlp")
    kind, calib, _ = common.data("mlp")
    x_test, _ = digits.test_set(kind)
    print("\nsame layers, same parameter budget: Fastfood (the pass) vs whitened low-rank SVD (numpy "
          "baseline in this script; + LS refit of the factor and of the downstream layers)")
    print(f"{'layer':11} {'structure':34} {'params':>8} {'of dense':>8} {'test err':>9} {'acc':>7} {'Δpp':>6}")
    acc0 = digits.accuracy(original, kind)
    for row in rows:
        rep = row["report"]["passes"][0]
        for name, lay in rep["layers"].items():
            if not lay.get("replaced"):
                continue
            d_in, d_out = lay["shape"]
            dense = lay["dense_params"]
            tensor = next(n.output[0] for n in original.graph.node if n.name == name)
            err = _layer_error(original, row["result_model"], tensor, x_test)
            label = f"Fastfood K={lay['blocks']} r={lay['rank']}"
            print(f"{name:11} {label:34} {lay['params']:8d} {lay['params'] / dense:8.4f} {err:9.4f} "
                  f"{100 * row['acc_after']:7.2f} {100 * (row['acc_after'] - acc0):6.2f}")
            r = max(1, (lay["params"] - d_out) // (d_in + d_out))
            lr = lowrank_model(original, name, r, calib)
            p = r * (d_in + d_out) + d_out
            acc = digits.accuracy(lr, kind)
            err = _layer_error(original, lr, tensor, x_test)
            print(f"{name:11} {'low-rank r=' + str(r):34} {p:8d} {p / dense:8.4f} {err:9.4f} "
                  f"{100 * acc:7.2f} {100 * (acc - acc0):6.2f}")
    print("\nstandalone d→d layer, ONNX Runtime 1 thread, median of interleaved runs: "
          "Fastfood subgraph (random diagonals) / dense Gemm")
    print(f"{'d':>5} {'K':>2} {'batch':>5} {'dense ms':>9} {'fastfood ms':>11} {'ratio':>6}")
    runs = max(args.runs, 25)
    for d in (1024, 2048, 4096):
        for K in (1, 2, 4):
            dense, ff = _fastfood_layer(d, K)
            for batch in (1, 64):
                feed = {"x": np.random.default_rng(0).standard_normal((batch, d)).astype(np.float32)}
                ratio, ta, tb = common.latency_ratio(dense, ff, feed, runs=runs)
                print(f"{d:5d} {K:2d} {batch:5d} {1e3 * ta:9.3f} {1e3 * tb:11.3f} {ratio:6.3f}", flush=True)
