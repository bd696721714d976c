"""The hadamard pass: which Gemm/MatMul layers are candidates, and the sequential run over them.

Layers are visited in topological levels (``refit.refit_order``: layers of a level, such as the
query, key and value projections of an attention, do not feed each other, so one calibration run
serves them all; ``refit.refit_levels``). A
candidate's calibration rows are x from the already rewritten network and y = the reference
network's output of the layer, so every layer is reconstructed sequentially. Per candidate the
cheapest (K, r) Fastfood structure within ``tolerance`` on held-out rows replaces it
(``search``); a candidate none fits, or one past the time budget, stays dense, and every dense
layer a replaced one feeds directly whose inputs changed (by at least ``refit_min_error`` of its
output) is refit by ridge least squares when that lowers its held-out error.
Rows of the layers still to do are gathered together in one calibration run of the current model
(up to ``row_memory_mb``): a rewrite makes the rows of the layers after it stale, and the next
level gathers again from the rewritten model, so there is one calibration run per level with a
change, not per layer.

The layer is the node itself: y is its own output, so a MatMul's bias Add (``layers.bias_add``)
stays after it, and the fit's bias is the Fastfood subgraph's own.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnx_graphsurgeon as gs

from ...calibrate import fixed_batch
from ...graph import export_model, import_graph, opset
from ...layers import WeightLayer, finite, float_weights, no_trans_a, ops, per_column_bias
from ...lstsq import fit_error_rows, ridge_rows
from ...refit import refit_levels, refit_order
from ...registry import Pass, PassReport, Plan, Requires, Skip
from ...stats import RowSample
from ...validate import OutputProbe
from .config import HadamardConfig
from .emit import input_rank, replace
from .fastfood import FastfoodFit
from .search import choose_structure, held_out, held_out_rows


# ----------------------------------------------------------------------------- checks
def input_not_constant(layer: WeightLayer) -> str | None:
    return "input is a constant" if isinstance(layer.node.inputs[0], gs.Constant) else None


def own_weight(layer: WeightLayer) -> str | None:
    n = len(layer.shared)
    return None if n == 1 else (f"weights shared by {n} nodes: a Fastfood structure is fitted per layer, "
                                "so the dense weight would stay for the others")


def dense_layer(node: gs.Node, graph: gs.Graph) -> WeightLayer | Skip:
    """The node as a dense layer x·W (+ c) the pass can refit or replace, or a Skip with the reason."""
    return WeightLayer.of(node, graph, ops("Gemm", "MatMul"), input_not_constant, float_weights, no_trans_a,
                          per_column_bias)


def candidate_problem(layer: WeightLayer, cfg: HadamardConfig) -> str | None:
    """Why the pass does not replace the dense ``layer`` by a Fastfood structure (None: a candidate)."""
    d_in, d_out = layer.d_in, layer.d_out
    for check in (own_weight, finite):
        reason = check(layer)
        if reason is not None:
            return reason
    if min(d_in, d_out) < cfg.min_dim:
        return f"{d_in}→{d_out} is below hadamard.min_dim={cfg.min_dim}"
    rank = input_rank(layer.node)
    if rank is None or rank < (2 if layer.op == "Gemm" else 1):
        return "input rank unknown"
    # the smallest structure the config allows (one block, or the fixed blocks/rank)
    least = FastfoodFit(d_in, d_out).params(cfg.blocks or 1, cfg.rank or 0)
    if least > cfg.max_params * (d_in * d_out + d_out):
        what = ("one Fastfood block" if cfg.blocks is None and not cfg.rank else
                f"the structure of {cfg.blocks or 1} block(s) + rank {cfg.rank or 0}")
        return (f"{what} ({least} params) is above hadamard.max_params="
                f"{cfg.max_params} of the dense layer ({d_in * d_out + d_out})")
    return None


def _upstream_changed(node, changed, stop=frozenset()) -> bool:
    """Whether a tensor in ``changed`` lies upstream of the node's input, on a path that does not
    pass through a tensor in ``stop`` (the outputs of the other dense layers: then only the layers
    the changed ones feed directly count)."""
    seen, stack = set(), [node.inputs[0]]
    while stack:
        t = stack.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        if t.name in changed:
            return True
        if t.name in stop:
            continue
        for p in t.inputs:
            stack.extend(i for i in p.inputs if not isinstance(i, gs.Constant))
    return False


# ----------------------------------------------------------------------------- held-out units
MIN_UNITS = 5   # calibration units needed to hold whole units out (fewer: rows spread over them)


def held_out_units(ctx, holdout: float):
    """A mask over the calibration units (every ~1/``holdout``-th, spread over the data) whose rows
    no fit of the pass sees: the structure search judges on them and the output-error budget is
    measured on them; None with fewer than ``MIN_UNITS`` units, or a model whose fixed batch is above
    one (then rows are held out spread over the data, and the budget is measured on the data the
    fits saw)."""
    units = ctx.data.units()
    if units < MIN_UNITS or (fixed_batch(ctx.reference) or 1) > 1:
        return None
    return held_out(units, max(1, int(round(units * holdout))))


class _Units:
    """The calibration units of ``data`` picked by index, as the output probe reads data
    (``validate.model_outputs``: unit by unit, as validation splits it)."""

    def __init__(self, data, picked):
        self.base, self.picked = data, list(picked)
        self.origin = data.origin

    def units(self) -> int:
        return len(self.picked)

    def subset(self, start, stop):
        return _Units(self.base, self.picked[start:stop])

    def validation_batches(self, batch_size: int = 256):
        for u in self.picked:
            yield from self.base.subset(u, u + 1).validation_batches(batch_size)

    def batches(self, batch_size: int = 64):   # a model with a fixed batch of one (``_units``)
        for u in self.picked:
            yield from self.base.subset(u, u + 1).batches(batch_size)

    def batch_count(self, feed) -> int:
        return self.base.batch_count(feed)

    @property
    def n(self) -> int:
        return sum(self.base.subset(u, u + 1).n for u in self.picked)


# ----------------------------------------------------------------------------- the pass
class Hadamard(Pass):
    name = "hadamard"
    summary = "replace a Gemm/MatMul by a Fastfood-style Hadamard-structured subgraph"
    Config = HadamardConfig
    requires = Requires(data=True, opsets=(11, None))

    def check(self, layer: WeightLayer, cfg: HadamardConfig) -> str | None:
        """Why the pass does not replace this dense layer (None: a candidate)."""
        return candidate_problem(layer, cfg)

    def scan(self, graph, cfg):
        """[(node, dense layer or None, reason or None)] over the Gemm/MatMul nodes."""
        out = []
        for node in graph.nodes:
            if node.op in ("Gemm", "MatMul"):
                layer = dense_layer(node, graph)
                if isinstance(layer, Skip):
                    out.append((node, None, layer.reason))
                else:
                    out.append((node, layer, self.check(layer, cfg)))
        return out

    def plan(self, model, cfg):
        plan = Plan()
        for node, _, reason in self.scan(import_graph(model), cfg):
            (plan.skipped.append(Skip(node.name, reason)) if reason else plan.nodes.append(node.name))
        return plan

    def apply(self, model, cfg, ctx):
        run = _Run(self, model, cfg, ctx)
        run.layers_in_order()
        return run.finish()


class _Run:
    """One application of the pass: the graph being rewritten, the dense layers and candidates,
    the tensors changed so far, and what was decided at each layer's visit."""

    def __init__(self, p: Hadamard, model, cfg, ctx):
        self.data = ctx.data
        self.model, self.cfg, self.ctx = model, cfg, ctx
        self.graph = import_graph(model)
        self.report = PassReport(p.name)
        self.op_set = opset(model)
        self.dense, self.targets = {}, set()
        for node, layer, reason in p.scan(self.graph, cfg):
            if layer is not None and reason is None:
                reason = ctx.kept([node.name])   # kept whole by the accuracy search
            if reason:
                self.report.skip(node, reason)
            if layer is not None:
                self.dense[node.name] = layer
                if reason is None:
                    self.targets.add(node.name)
        self.shared, self.changed, self.layers, self.visits = {}, set(), {}, {}
        self.replaced = set()   # outputs of the layers replaced so far: the dense layers they feed directly are refit
        self.dense_outs = {layer.node.outputs[0].name for layer in self.dense.values()}
        self.probe = None   # validate.OutputProbe of the pass's input model, made at the first replacement
        self.units_held = held_out_units(ctx, cfg.holdout)   # the units no fit sees (None: rows spread instead)
        self.t0 = time.perf_counter()
        self.mem = 0
        n_batches = max(1, self.data.count_batches(ctx.batch_size))   # feeds of different shapes batch apart
        self.per_batch = max(1, -(-cfg.max_rows // n_batches))

    # ---------------------------------------------------------------- the sequential run
    def layers_in_order(self):
        """Visit the dense layers in topological order, one level each: search the candidates,
        refit the others whose inputs changed."""
        cfg = self.cfg
        target_outs = {self.dense[n].node.outputs[0].name for n in self.targets}
        todo = [n for n, layer in self.dense.items()
                if n in self.targets or (cfg.refit and _upstream_changed(layer.node, target_outs, self.dense_outs))]
        runs_before = self.ctx.calibration_runs
        self.bar = self.ctx.bar(total=len(todo), desc="hadamard")
        levels = refit_order(self.graph, todo)   # layers of a level do not feed each other: one run serves them
        refit_levels(self.ctx, self.model, None, self.solve, requests=self.requests, levels=levels,
                     graph=self.graph, desc="hadamard", ahead=self.ahead, like=self.model, export_copy=True)
        self.bar.close()
        self.collect_runs = self.ctx.calibration_runs - runs_before

    def visit(self, name):
        """(search, refit) decided once per layer, when it is reached: search a candidate unless
        the time budget is spent (then say so), refit a dense layer whose inputs changed."""
        if name not in self.visits:
            cfg, layer = self.cfg, self.dense[name]
            search = name in self.targets
            if search and cfg.time_budget and time.perf_counter() - self.t0 > cfg.time_budget:
                self.report.skip(layer.node, f"hadamard.time_budget={cfg.time_budget}s spent before this layer")
                search = False
            self.visits[name] = (search, cfg.refit and _upstream_changed(layer.node, self.replaced, self.dense_outs))
        return self.visits[name]

    def ahead(self, levels_left) -> int:
        """How many levels' rows one run gathers: none when the next level needs none, else it and
        the levels after it while their rows fit in ``row_memory_mb`` (at least the next one)."""
        first = levels_left[0]
        if not any(any(self.visit(name)) for name in first):
            return 1
        self.bar.update(0, postfix=f"{first[0]}: statistics")
        budget, n = self.cfg.row_memory_mb * 2**20, 0
        for names in levels_left:
            size = sum(self.cfg.max_rows * (self.dense[name].d_in + self.dense[name].d_out) * 4 for name in names)
            if n and size > budget:
                break
            budget -= size
            n += 1
        return n

    def requests(self, name, graph):
        """The rows of a layer: none for one reached that needs none."""
        if name in self.visits and not any(self.visits[name]):
            return []
        node = self.dense[name].node
        return [RowSample(name, node.inputs[0].name, node.outputs[0].name, self.per_batch, self.cfg.max_rows)]

    def solve(self, name, stats, graph, level) -> bool:
        """Search or refit the layer ``name``; False when the graph is left as it was."""
        search, refit = self.visit(name)
        if not (search or refit):
            if name in self.targets:
                self.bar.update(1, postfix=name)
            return False
        x, y = RowSample.rows(stats[name])
        self.mem = max(self.mem, x.nbytes // 2 + y.nbytes // 2)
        hold = held_out_rows(len(x), self.units_held) if self.units_held is not None else None
        layer = self.dense[name]
        bias = layer.bias() if layer.op == "Gemm" else None   # the node's own: see the module docstring
        entry = {"shape": [layer.d_in, layer.d_out],
                 "dense_params": layer.d_in * layer.d_out + (layer.d_out if bias is not None else 0), "rows": len(x)}
        if hold is not None:
            entry["held_out_rows"] = int(hold.sum())
        if search and self.search(layer, x, y, entry, hold):
            self.bar.update(1, postfix=f"{name}: K={entry['blocks']} r={entry['rank']}")
            return True
        changed = False
        if refit:   # the dense layer's error on its new inputs (a layer only searched does not need it)
            w = layer.matrix()
            cur_pred = x @ w + (bias if bias is not None else np.zeros(layer.d_out))
            entry["dense_error"] = round(fit_error_rows(cur_pred, y, y.mean(0)), 5)
        # a layer the changes upstream barely reach is left as it is: its refit would gain little
        # and, changing the graph, cost the next level a calibration run of its own
        if refit and entry["dense_error"] >= self.cfg.refit_min_error and (layer.op == "Gemm" or bias is None) \
                and np.isfinite(w).all():
            changed = self.refit(layer, x, y, cur_pred, entry, hold)
        self.layers[name] = entry
        self.bar.update(1, postfix=name)
        return changed

    # ---------------------------------------------------------------- one layer
    def search(self, layer, x, y, entry, hold=None) -> bool:
        """Replace the layer by the cheapest Fastfood structure within tolerance; False (with a
        skip saying the best error reached) when there is none."""
        cfg, node = self.cfg, layer.node
        d_in, d_out = layer.d_in, layer.d_out
        self.bar.detail(f"{node.name}: structure search")
        with self.ctx.timed("search"):
            fit, info = choose_structure(x, y, cfg, d_in * d_out + d_out, hold)
        entry.update(info)
        if fit is None:
            if info["tried"]:
                best = f"best held-out error {info['best_error']}"
            elif info.get("unreachable"):
                best = (f"the low-rank part alone at {'least ' if info.get('bound') else ''}{info['best_error']} "
                        f"of held-out error, too far for the blocks affordable beside it at {info['unreachable']}")
            elif info.get("search_stopped_by"):
                best = f"{info['search_stopped_by']} was reached before a structure was complete"
            else:
                best = "none of the structures tried fits in max_params"
            self.report.skip(node, f"no Fastfood structure within tolerance {cfg.tolerance} and "
                                   f"max_params {cfg.max_params} ({best})")
            return False
        if cfg.output_error and not self.within_budget(node, fit, entry):
            return False
        self.changed.add(node.outputs[0].name)
        self.replaced.add(node.outputs[0].name)
        replace(self.graph, node, fit, self.shared, self.op_set)
        entry["replaced"] = True
        self.report.unit(node.name, [node.name], 1 - info["params"] / max(d_in * d_out + d_out, 1))
        self.report.changed.append(f"{node.name}: {d_in}→{d_out} as {info['blocks']} Fastfood block(s)"
                                   f"{' + rank ' + str(info['rank']) if info['rank'] else ''}, "
                                   f"held-out error {info['holdout_error']:.4f}")
        self.layers[node.name] = entry
        return True

    def within_budget(self, node, fit, entry) -> bool:
        """Whether the model with this replacement added (to the ones kept so far, and the dense
        refits) keeps its output error (``validate.output_error`` against the pass's input model,
        on up to ``GAIN_SAMPLES`` calibration units) within ``hadamard.output_error``; when not,
        the layer stays dense with a skip saying what it would have cost. A layer's own error
        says little of how far it travels (vit_focus: layer 0's fc1 at 0.023 of its own output
        costs 0.027 of the map, the query projection at 0.028 costs 0.0006)."""
        cfg = self.cfg
        with self.ctx.timed("search"):
            if self.probe is None:
                ctx = self.ctx
                if self.units_held is not None:   # the units no fit saw
                    ctx = dataclasses.replace(ctx, data=_Units(ctx.data, np.flatnonzero(self.units_held)))
                self.probe = OutputProbe(ctx, self.ctx.reference)
            scratch = self.graph.copy()
            replace(scratch, next(n for n in scratch.nodes if n.name == node.name), fit, {}, self.op_set)
            err = self.probe.error(export_model(scratch, like=self.model))
        entry["output_error"] = round(err, 6)
        if err <= cfg.output_error:
            return True
        self.report.skip(node, f"its Fastfood structure ({entry['blocks']} block(s) + rank {entry['rank']}, held-out "
                               f"error {entry['holdout_error']:.4f}) would bring the model's output error to "
                               f"{err:.4g} > hadamard.output_error={cfg.output_error} (measured on "
                               f"{self.probe.data.units()} calibration samples"
                               f"{' no fit saw' if self.units_held is not None else ''})")
        self.layers[node.name] = entry
        return False

    def refit(self, layer, x, y, cur_pred, entry, hold=None) -> bool:
        """Ridge refit of a dense layer on its new inputs, kept when it lowers the error on the
        held-out rows (``hold``: the held-out units' rows, which the refit then does not see either;
        None: a fifth of the rows spread over the data, and the refit kept is fitted on all rows)."""
        fit_bias = layer.op == "Gemm"
        units = hold is not None
        if not units:
            hold = held_out(len(x), max(1, len(x) // 5))
        wv, bv = ridge_rows(x[~hold], y[~hold], fit_bias=fit_bias)   # timed as "fit" by refit_levels (solve)
        ym = y[~hold].mean(0)
        if fit_error_rows(x[hold] @ wv + bv, y[hold], ym) >= fit_error_rows(cur_pred[hold], y[hold], ym):
            return False
        w2, b2 = (wv, bv) if units else ridge_rows(x, y, fit_bias=fit_bias)
        layer.write(w2, b2 if fit_bias else None)
        entry["refit"] = True
        entry["refit_error"] = round(fit_error_rows(x @ w2 + b2, y, y.mean(0)), 5)
        self.report.changed.append(f"{layer.name}: kept dense, refit by least squares")
        self.changed.add(layer.node.outputs[0].name)
        return True

    def finish(self):
        report = self.report
        report.details["layers"] = self.layers
        report.details["row_memory_bytes"] = int(self.mem)
        report.details["calibration_runs"] = self.collect_runs
        report.details["fit_seconds"] = round(time.perf_counter() - self.t0 - self.ctx.calibration_seconds, 3)
        with self.ctx.timed("export"):
            out = export_model(self.graph, like=self.model)
        return out, report
