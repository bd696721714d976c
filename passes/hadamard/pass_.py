"""The hadamard pass: which Gemm/MatMul layers are candidates, and the sequential run over them.

Layers are visited in topological order. A candidate's calibration rows are x from the already
rewritten network and y = the reference network's output of the layer, so every layer is
reconstructed sequentially. Per candidate the cheapest (K, r) Fastfood structure within
``tolerance`` on held-out rows replaces it (``search``); a candidate none fits, or one past the
time budget, stays dense, and every dense layer whose inputs changed is refit by ridge least
squares when that lowers its held-out error. Rows of the layers still to do are gathered together
in one calibration run of the current model (up to ``row_memory_mb``): a rewrite makes the rows of
the layers after it stale, and the next layer gathers again from the rewritten model, so there is
one calibration run per change, not per layer.
"""

from __future__ import annotations

import time

import numpy as np
import onnx_graphsurgeon as gs

from ...graph import export_model, import_graph, opset
from ...lstsq import fit_error_rows, ridge_rows
from ...reconstruct import layer_matrix, set_layer_matrix
from ...registry import Pass, PassReport, Plan, Skip, register
from ...stats import RowSample
from .._factor import gemm_bias_problem
from .config import HadamardConfig
from .emit import input_rank, replace
from .fastfood import FastfoodFit
from .search import choose_structure


def linear_problem(node: gs.Node) -> str | None:
    """Why ``node`` is not a Gemm/MatMul x·W with a constant 2-D float W (None when it is)."""
    if node.op not in ("Gemm", "MatMul"):
        return "not a Gemm/MatMul"
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        if isinstance(node.inputs[0], gs.Constant):
            return "constant weight on the left (W·x): not supported"
        return "weights are not constants"
    if isinstance(node.inputs[0], gs.Constant):
        return "input is a constant"
    if node.inputs[1].values.ndim != 2:
        return "weights are not a 2-D matrix"
    if not np.issubdtype(node.inputs[1].values.dtype, np.floating):
        return "weights are not floating point"
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return "Gemm with transA=1"
    return gemm_bias_problem(node)


def candidate_problem(node: gs.Node, cfg: HadamardConfig) -> str | None:
    """Why the hadamard pass does not rewrite ``node`` (None: it is a candidate)."""
    reason = linear_problem(node)
    if reason is not None:
        return reason
    w, bias = layer_matrix(node)
    d_in, d_out = w.shape
    readers = len(node.inputs[1].outputs)
    if readers > 1:
        return (f"weights shared by {readers} nodes: a Fastfood structure is fitted per layer, "
                "so the dense weight would stay for the others")
    if not np.isfinite(w).all() or (bias is not None and not np.isfinite(bias).all()):
        return "weights or bias contain NaN or Inf values: not rewritten"
    if min(d_in, d_out) < cfg.min_dim:
        return f"{d_in}→{d_out} is below hadamard.min_dim={cfg.min_dim}"
    if input_rank(node) is None or input_rank(node) < (2 if node.op == "Gemm" else 1):
        return "input rank unknown"
    # the smallest structure the config allows (one block, or the fixed blocks/rank)
    least = FastfoodFit(d_in, d_out).params(cfg.blocks or 1, cfg.rank or 0)
    if least > cfg.max_params * (d_in * d_out + d_out):
        what = ("one Fastfood block" if cfg.blocks is None and not cfg.rank else
                f"the structure of {cfg.blocks or 1} block(s) + rank {cfg.rank or 0}")
        return (f"{what} ({least} params) is above hadamard.max_params="
                f"{cfg.max_params} of the dense layer ({d_in * d_out + d_out})")
    return None


def _upstream_changed(node, changed) -> bool:
    """Whether a tensor in ``changed`` lies upstream of the node's input."""
    seen, stack = set(), [node.inputs[0]]
    while stack:
        t = stack.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        if t.name in changed:
            return True
        for p in t.inputs:
            stack.extend(i for i in p.inputs if not isinstance(i, gs.Constant))
    return False


@register
class Hadamard(Pass):
    name = "hadamard"
    summary = "replace a Gemm/MatMul by a Fastfood-style Hadamard-structured subgraph"
    Config = HadamardConfig
    needs_data = True

    def check(self, node, cfg) -> str | None:
        """Why the pass leaves this Gemm/MatMul as it is (None: a candidate)."""
        return candidate_problem(node, cfg)

    def _scan(self, graph, cfg):
        """[(node, reason or None)] over the Gemm/MatMul nodes."""
        return [(node, self.check(node, cfg)) for node in graph.nodes if node.op in ("Gemm", "MatMul")]

    def plan(self, model, cfg):
        plan = Plan()
        for node, reason in self._scan(import_graph(model), cfg):
            (plan.skipped.append(Skip(node.name, reason)) if reason else plan.targets.append(node.name))
        return plan

    def apply(self, model, cfg, ctx):
        run = _Run(self.name, model, cfg, ctx)
        scan = self._scan(run.graph, cfg)
        for node, reason in scan:
            if reason:
                run.report.skip(node, reason)
        run.layers_in_order([n for n, _ in scan if linear_problem(n) is None],
                            {n.name for n, r in scan if r is None})
        return run.finish()


class _Run:
    """One application of the pass: the graph being rewritten, the model its rows come from
    (``current``), the tensors changed so far and the rows gathered but not used yet."""

    def __init__(self, name, model, cfg, ctx):
        self.data = ctx.require_data(name)
        self.model, self.cfg, self.ctx = model, cfg, ctx
        self.graph = import_graph(model)
        self.report = PassReport(name)
        self.op_set = opset(model)
        self.current = model
        self.shared, self.changed, self.layers, self.cache = {}, set(), {}, {}
        self.t0 = time.perf_counter()
        self.mem = self.collect_runs = 0
        n_batches = max(1, self.data.count_batches(ctx.batch_size))   # feeds of different shapes batch apart
        self.per_batch = max(1, -(-cfg.max_rows // n_batches))

    def layers_in_order(self, linear, targets):
        """Visit the dense layers in topological order: search the candidates, refit the others
        whose inputs changed."""
        cfg = self.cfg
        target_outs = {n.outputs[0].name for n in linear if n.name in targets}
        self.todo = [n for n in linear if n.name in targets or (cfg.refit and _upstream_changed(n, target_outs))]
        self.bar = self.ctx.bar(total=len(self.todo), desc="hadamard")
        for node in linear:
            upstream_changed = _upstream_changed(node, self.changed)
            search = node.name in targets
            if search and cfg.time_budget and time.perf_counter() - self.t0 > cfg.time_budget:
                self.report.skip(node, f"hadamard.time_budget={cfg.time_budget}s spent before this layer")
                search = False
            if not search and not (cfg.refit and upstream_changed):
                if node.name in targets:
                    self.bar.update(1, postfix=node.name)
                continue
            self.layer(node, search, upstream_changed)
        self.bar.close()

    def rows(self, node):
        """(x, y) float64 calibration rows of ``node``, gathered with those of the layers after it
        unless an earlier run still holds them."""
        self.bar.update(0, postfix=f"{node.name}: statistics")
        if node.name not in self.cache:
            self.cache = self.gather(self.todo[self.todo.index(node):])
            self.collect_runs += 1
        x, y = RowSample.rows(self.cache.pop(node.name))
        self.mem = max(self.mem, x.nbytes // 2 + y.nbytes // 2)
        return x, y

    def gather(self, nodes):
        """{layer name: rows} of ``nodes[0]`` and of the layers after it, as many as fit in
        ``cfg.row_memory_mb``, in one calibration run of the current model."""
        cfg = self.cfg
        reqs, budget = [], cfg.row_memory_mb * 2**20
        for n in nodes:
            w = n.inputs[1].values
            size = cfg.max_rows * (w.shape[0] + w.shape[1]) * 4
            if reqs and size > budget:
                break
            budget -= size
            reqs.append(RowSample(n.name, n.inputs[0].name, n.outputs[0].name, self.per_batch, cfg.max_rows))
        return self.ctx.collect(reqs, model_x=self.current, model_y=self.ctx.reference,
                                desc=f"hadamard {nodes[0].name}")

    def rewritten(self, output):
        """Record that the tensor ``output`` changed; later rows come from the rewritten model."""
        self.changed.add(output)
        with self.ctx.timed("export"):
            self.current = export_model(self.graph.copy(), like=self.model)
        self.cache = {}

    def layer(self, node, search, upstream_changed):
        x, y = self.rows(node)
        w, bias = layer_matrix(node)
        d_in, d_out = w.shape
        cur_pred = x @ w + (bias if bias is not None else np.zeros(d_out))
        entry = {"shape": [d_in, d_out], "dense_params": d_in * d_out + (d_out if bias is not None else 0),
                 "rows": len(x), "dense_error": round(fit_error_rows(cur_pred, y, y.mean(0)), 5)}
        if search and self.search(node, x, y, entry):
            self.bar.update(1, postfix=f"{node.name}: K={entry['blocks']} r={entry['rank']}")
            return
        if self.cfg.refit and upstream_changed and (node.op == "Gemm" or bias is None) and np.isfinite(w).all():
            self.refit(node, x, y, cur_pred, entry)
        self.layers[node.name] = entry
        self.bar.update(1, postfix=node.name)

    def search(self, node, x, y, entry) -> bool:
        """Replace ``node`` by the cheapest Fastfood structure within tolerance; False (with a
        skip saying the best error reached) when there is none."""
        cfg = self.cfg
        d_in, d_out = x.shape[1], y.shape[1]
        self.bar.detail(f"{node.name}: structure search")
        with self.ctx.timed("search"):
            fit, info = choose_structure(x, y, cfg, d_in * d_out + d_out)
        entry.update(info)
        if fit is None:
            best = (f"best held-out error {info['best_error']}" if info["tried"] else
                    "none of the structures tried fits in max_params")
            self.report.skip(node, f"no Fastfood structure within tolerance {cfg.tolerance} and "
                                   f"max_params {cfg.max_params} ({best})")
            return False
        output = node.outputs[0].name
        replace(self.graph, node, fit, self.shared, self.op_set)
        entry["replaced"] = True
        self.report.changed.append(f"{node.name}: {d_in}→{d_out} as {info['blocks']} Fastfood block(s)"
                                   f"{' + rank ' + str(info['rank']) if info['rank'] else ''}, "
                                   f"held-out error {info['holdout_error']:.4f}")
        self.layers[node.name] = entry
        self.rewritten(output)
        return True

    def refit(self, node, x, y, cur_pred, entry):
        """Ridge refit of a dense layer on its new inputs, kept when it lowers the error on the
        last fifth of the rows (judged as the structure search judges)."""
        fit_bias = node.op == "Gemm"
        with self.ctx.timed("fit"):
            w2, b2 = ridge_rows(x, y, fit_bias=fit_bias)
            n = len(x)
            nh = max(1, n // 5)
            wv, bv = ridge_rows(x[: n - nh], y[: n - nh], fit_bias=fit_bias)
        ym = y[: n - nh].mean(0)
        if fit_error_rows(x[n - nh:] @ wv + bv, y[n - nh:], ym) < fit_error_rows(cur_pred[n - nh:], y[n - nh:], ym):
            set_layer_matrix(node, w2, b2 if fit_bias else None)
            entry["refit"] = True
            entry["refit_error"] = round(fit_error_rows(x @ w2 + b2, y, y.mean(0)), 5)
            self.report.changed.append(f"{node.name}: kept dense, refit by least squares")
            self.rewritten(node.outputs[0].name)

    def finish(self):
        report = self.report
        report.details["layers"] = self.layers
        report.details["row_memory_bytes"] = int(self.mem)
        report.details["calibration_runs"] = self.collect_runs
        report.details["fit_seconds"] = round(time.perf_counter() - self.t0 - self.ctx.calibration_seconds, 3)
        with self.ctx.timed("export"):
            out = export_model(self.graph, like=self.model)
        return out, report
