"""pfa: Principal Filter Analysis (Suau et al., "Filter Distillation for Network Compression",
WACV 2020), post-training, with least-squares reconstruction instead of fine-tuning.

For each coupling group (``onnxshrink.channels``: tensors that must lose the same channels) the
responses r ∈ R^n of its channels are collected on calibration data (conv maps max-pooled over
space; rows of linear outputs). With λ the eigenvalues of Cov(r), descending, normalised to sum 1:

    PFA-En:  keep the smallest k with Σ_{i≤k} λ_i ≥ energy;
    PFA-KL:  KL = Σ λ_i log(n λ_i),  keep ceil(n · (1 − KL / log n));
    budget:  the largest energy whose recipe meets --target-flops / --target-params (binary
             search over the energies where some group's k changes).

k is rounded up to a multiple of ``channel_multiple``. Which channels go: repeatedly drop the one
whose Pearson correlations with the remaining ones have the largest L1 norm (or, optionally, the
smallest weight norm). Then every weight layer that reads a pruned tensor is refit, level by level
on the pruned network's own inputs, to the reference network's pre-activation:
W', b' = argmin ‖X̃ W' + b' − Y‖² + α‖W'‖² (``reconstruct.ridge_solve``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..channels import analyze
from ..errors import UsageError
from ..graph import export_model, import_graph
from ..reconstruct import layer_matrix, layer_stats_request, refit_order, ridge_solve, set_layer_matrix
from ..registry import Pass, PassReport, Plan, Skip, register
from ..stats import CrossMoments, LayerStats, ResponseStats

MODES = ("auto", "energy", "kl", "budget")
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
SELECTIONS = ("pearson", "magnitude")


@dataclass
class PfaConfig:
    mode: str = "auto"            # auto: budget when a flops/params target is given, else energy
    energy: float = 0.98          # PFA-En: fraction of the response spectrum's energy kept per group
    selection: str = "pearson"    # pearson (the paper) or magnitude (smallest filter weight norm first)
    channel_multiple: int = 8     # round kept counts up to a multiple of this (1: no rounding)
    ridge: float = -1.0           # relative ridge of the reconstruction; < 0: chosen per layer
                                  # on held-out calibration batches from RIDGES
    positions: int = 32           # conv refits: sampled output positions per sample
    residual_targets: bool = True  # a layer feeding a residual Add is fit to the reference sum
    prior: bool = True            # ridge toward the layer's own sliced weights (False: toward zero)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"pfa.mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.selection not in SELECTIONS:
            raise ValueError(f"pfa.selection must be one of {', '.join(SELECTIONS)}, got '{self.selection}'")
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"pfa.energy must be in (0, 1], got {self.energy}")
        if self.channel_multiple < 1:
            raise ValueError(f"pfa.channel_multiple must be >= 1, got {self.channel_multiple}")
        if self.positions < 1:
            raise ValueError(f"pfa.positions must be >= 1, got {self.positions}")


# ----------------------------------------------------------------------------- recipes
def spectrum(cov: np.ndarray) -> np.ndarray:
    """Eigenvalues of a covariance, descending, clipped at 0, normalised to sum 1."""
    cov = np.asarray(cov, dtype=np.float64)
    try:
        import scipy.linalg
        ev = scipy.linalg.eigh(cov, eigvals_only=True, driver="ev")
    except Exception:  # no scipy, or no convergence
        ev = np.linalg.eigvalsh(cov)
    lam = np.clip(ev[::-1], 0.0, None)
    total = lam.sum()
    if total <= 0:
        out = np.zeros_like(lam)
        out[0] = 1.0
        return out
    return lam / total


def kept_energy(lam: np.ndarray, energy: float) -> int:
    """PFA-En: smallest k with Σ_{i≤k} λ_i ≥ energy (all of them at energy 1)."""
    n = len(lam)
    if energy >= 1.0:
        return n
    cum = np.cumsum(lam)
    return int(min(n, np.searchsorted(cum, energy - 1e-12, side="left") + 1))


def kept_kl(lam: np.ndarray) -> int:
    """PFA-KL: ceil(n · (1 − KL(λ ‖ uniform) / log n))."""
    n = len(lam)
    if n < 2:
        return n
    nz = lam[lam > 0]
    kl = float(np.sum(nz * np.log(n * nz)))
    return int(min(n, max(1, np.ceil(n * (1.0 - kl / np.log(n)) - 1e-9))))


def round_up(k: int, n: int, multiple: int) -> int:
    k = max(int(k), 1)
    return int(min(n, -(-k // multiple) * multiple))


def pearson_removal_order(cov: np.ndarray) -> np.ndarray:
    """All channels in the order PFA removes them: channels with no variance first, then the one
    whose |Pearson correlations| with the remaining channels sum highest (ties: the highest single
    correlation), recomputed after each removal."""
    cov = np.asarray(cov, dtype=np.float64)
    n = len(cov)
    d = np.diag(cov).copy()
    dead = d <= 1e-10 * max(d.max(initial=0.0), 1e-30)
    s = np.sqrt(np.where(dead, 1.0, d))
    a = np.abs(cov / np.outer(s, s))
    a[dead, :] = 0.0
    a[:, dead] = 0.0
    np.fill_diagonal(a, 0.0)
    alive = np.ones(n, dtype=bool)
    order = [int(i) for i in np.nonzero(dead)[0][np.argsort(d[dead])]]
    alive[order] = False
    sums = a[:, alive].sum(axis=1)
    while alive.sum() > 0:
        cand = np.nonzero(alive)[0]
        best = sums[cand].max()
        ties = cand[sums[cand] >= best - 1e-12]
        j = int(ties[0]) if len(ties) == 1 else int(ties[np.argmax(a[np.ix_(ties, cand)].max(axis=1))])
        order.append(j)
        alive[j] = False
        sums -= a[:, j]
    return np.asarray(order, dtype=np.int64)


def ridge_toward(cm: CrossMoments, w0: np.ndarray, ridge: float):
    """W, b minimising ‖X W + b − Y‖² + α‖W − W0‖² (centered normal equations): the ridge pulls
    toward the layer's own (sliced) weights rather than toward zero, so a layer that lost few
    inputs stays close to what it was when the calibration data cannot pin every weight down."""
    n = max(cm.n, 1)
    mx, my = cm.x.mean, cm.mean_y
    cxx = cm.x.cov
    cxy = cm.xy / n - np.outer(mx, my)
    d = cxx.shape[0]
    alpha = ridge * max(np.trace(cxx) / max(d, 1), 1e-12)
    a = cxx + alpha * np.eye(d)
    rhs = cxy + alpha * w0
    try:
        w = np.linalg.solve(a, rhs)
    except np.linalg.LinAlgError:
        w = np.linalg.lstsq(a, rhs, rcond=None)[0]
    return w, my - mx @ w


@dataclass
class _ResidualStats(LayerStats):
    """LayerStats whose target is what the layer must add to the pruned network's skip tensor to
    give the reference network's residual sum: y = R_ref[kept] − skip − shift. Fitting to it
    also corrects the error that earlier pruning left in the skip path."""

    skip: str = ""
    mask: np.ndarray | None = None
    shift: np.ndarray | None = None

    def tensors(self):
        return {"x": [self.x_tensor, self.skip], "y": [self.y_tensor]}

    def _features(self, x_arrays, y_arrays, rng):
        axis = 1 if self.kind == "conv" else -1
        y = y_arrays[self.y_tensor]
        if self.mask is not None and not self.mask.all():
            y = np.compress(self.mask, y, axis=axis)
        t = y - x_arrays[self.skip]
        if self.shift is not None:
            t = t - (self.shift.reshape((-1,) + (1,) * (t.ndim - 2)) if axis == 1 else self.shift)
        return super()._features(x_arrays, {self.y_tensor: t.astype(np.float32)}, rng)


def _residual(node: gs.Node):
    """(sum tensor, skip tensor, bias constant) when the layer's output (through a MatMul's bias
    Add) goes only into an Add with another computed tensor, else None."""
    t, shift = node.outputs[0], None
    users = list(t.outputs)
    if node.op == "MatMul" and len(users) == 1 and users[0].op == "Add":
        c = [i for i in users[0].inputs if i is not t]
        if len(c) == 1 and isinstance(c[0], gs.Constant) and c[0].values.ndim >= 1:
            shift, t = c[0].values.reshape(-1).astype(np.float64), users[0].outputs[0]
            users = list(t.outputs)
    if len(users) != 1 or users[0].op != "Add" or len(users[0].inputs) != 2:
        return None
    other = [i for i in users[0].inputs if i is not t]
    if len(other) != 1 or isinstance(other[0], gs.Constant):
        return None
    return users[0].outputs[0].name, other[0].name, shift


class _SplitStats:
    """A LayerStats request whose batches alternate between two accumulators (fit / held out)."""

    def __init__(self, inner):
        self.inner, self.key, self._calls = inner, inner.key, 0

    def tensors(self):
        return self.inner.tensors()

    def new(self, x_arrays, y_arrays):
        return [self.inner.new(x_arrays, y_arrays), self.inner.new(x_arrays, y_arrays)]

    def update(self, acc, x_arrays, y_arrays, rng):
        self.inner.update(acc[self._calls % 2], x_arrays, y_arrays, rng)
        self._calls += 1


def _error(cm: CrossMoments, w: np.ndarray, b: np.ndarray) -> float:
    """Relative squared error Σ‖xW + b − y‖² / Σ‖y − ȳ‖² from the moments (matrix products only)."""
    n = max(cm.n, 1)
    mx, my = cm.x.mean, cm.mean_y
    pred2 = np.sum(w * (cm.x.second @ w), axis=0) + 2 * b * (mx @ w) + b * b
    cross = np.sum(w * (cm.xy / n), axis=0) + b * my
    err = pred2 - 2 * cross + cm.yy / n
    var = cm.yy / n - my * my
    return float(max(err.sum(), 0.0) / max(var.sum(), 1e-12))


def _merged(a: CrossMoments, b: CrossMoments) -> CrossMoments:
    out = CrossMoments(a.x.sum.shape[0], a.sum_y.shape[0])
    return out.merge(a).merge(b)


def _slice_cross(cm: CrossMoments, mask: np.ndarray) -> CrossMoments:
    out = CrossMoments(cm.x.sum.shape[0], int(mask.sum()))
    out.x = cm.x
    out.sum_y, out.xy, out.yy = cm.sum_y[mask], cm.xy[:, mask], cm.yy[mask]
    return out


def _weight_rows(node: gs.Node) -> np.ndarray:
    """Squared L2 norm of each output channel's weights."""
    w = node.inputs[1].values.astype(np.float64)
    if node.op == "Conv":
        return (w.reshape(w.shape[0], -1) ** 2).sum(axis=1)
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return (w ** 2).sum(axis=1)
    return (w ** 2).sum(axis=0)


# ----------------------------------------------------------------------------- the pass
@register
class Pfa(Pass):
    name = "pfa"
    summary = "Principal Filter Analysis: remove Conv filters / linear neurons whose responses are correlated"
    Config = PfaConfig
    needs_data = True
    budgets = ("flops", "params")
    ready = True

    def plan(self, model, cfg):
        an = analyze(model)
        plan = Plan()
        for g in an.groups:
            if g.pinned:
                for p in g.pins:
                    if not any(s.node == p.node and s.reason == p.reason for s in plan.skipped):
                        plan.skipped.append(Skip(p.node, p.reason))
            elif g.size >= 2:
                plan.targets.extend(s.node for s in g.sources if s.prunable)
        return plan

    # -- statistics
    def _group_covs(self, an, groups, ctx):
        reqs = {}
        for g in groups:
            for o in g.observations:
                reqs.setdefault((o.tensor, o.reduce), ResponseStats(o.tensor, o.reduce))
        accs = ctx.collect(list(reqs.values()), desc="pfa responses")
        covs = {}
        for g in groups:
            c = np.zeros((g.size, g.size))
            for o in g.observations:
                cov = accs[reqs[(o.tensor, o.reduce)].key].cov
                np.add.at(c, (o.indices[:, None], o.indices[None, :]), cov[np.ix_(o.positions, o.positions)])
            covs[g.index] = c
        return covs

    def _magnitude(self, model, an, g):
        graph = import_graph(model)
        nodes = {n.name: n for n in graph.nodes}
        score = np.zeros(g.size)
        for s in g.sources:
            if s.prunable and s.node in nodes:
                np.add.at(score, an.class_index[an.roots[s.comps]], _weight_rows(nodes[s.node]))
        return np.argsort(score, kind="stable")

    # -- budget search
    def _budget_ks(self, an, model, groups, lams, cfg, ctx, details):
        goals = {m: g for m, g in ctx.goals.items() if m in self.budgets}
        cums = {g.index: np.cumsum(lams[g.index]) for g in groups}
        cands = np.unique(np.concatenate([np.clip(c, 0, 1) for c in cums.values()] + [np.array([0.0, 1.0])]))
        cache = {}

        def ks_at(e):
            return {g.index: round_up(g.size if e >= 1.0 else
                                      min(g.size, np.searchsorted(cums[g.index], e - 1e-12) + 1),
                                      g.size, cfg.channel_multiple) for g in groups}

        def cost_of(ks):
            key = tuple(sorted(ks.items()))
            if key not in cache:
                keep = {gi: np.arange(k) for gi, k in ks.items()}
                cache[key] = ctx.cost(an.prune(model, keep))
            return cache[key]

        def fits(ks):
            c = cost_of(ks)
            return all(c[m] <= goal.target for m, goal in goals.items())

        if fits(ks_at(1.0)):
            details["budget"] = "met without removing channels"
            return ks_at(1.0), 1.0
        if not fits(ks_at(0.0)):
            details["budget"] = "not reachable: the smallest recipe (1 channel per group, rounded) misses it"
            return ks_at(0.0), 0.0
        lo, hi = 0, len(cands) - 1        # cands[lo] fits, cands[hi] does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(ks_at(cands[mid])):
                lo = mid
            else:
                hi = mid
        # Between two neighbouring energies the counts can jump (a spectrum whose tail is ~0 reaches
        # "all the energy" long before all channels): spend what is left of the budget by moving
        # every group the same fraction t of the way from the fitting recipe to the next one.
        k_lo, k_hi = ks_at(cands[lo]), ks_at(cands[hi])

        def ks_t(t):
            return {gi: round_up(k_lo[gi] + t * (k_hi[gi] - k_lo[gi]), groups_by[gi].size, cfg.channel_multiple)
                    if k_hi[gi] > k_lo[gi] else k_lo[gi] for gi in k_lo}

        groups_by = {g.index: g for g in groups}
        t_lo, t_hi = 0.0, 1.0
        for _ in range(8):
            t = 0.5 * (t_lo + t_hi)
            if fits(ks_t(t)):
                t_lo = t
            else:
                t_hi = t
        details["budget_evaluations"] = len(cache)
        return ks_t(t_lo), float(cands[lo])

    # -- reconstruction
    def _refit(self, pruned, an, keep, consumers, cfg, ctx, report):
        levels = refit_order(import_graph(pruned), consumers)
        errors, ridges = {}, {}
        cur = pruned
        for lv, names in enumerate(levels):
            graph = import_graph(cur)
            nodes = {n.name: n for n in graph.nodes}
            reqs, residual = [], set()
            for n in names:
                node = nodes[n]
                req = layer_stats_request(node, n, node.inputs[0].name, node.outputs[0].name, positions=cfg.positions)
                res = _residual(node) if cfg.residual_targets else None
                if res is not None:
                    mask = an.output_mask(n, keep)
                    req = _ResidualStats(req.key, req.x_tensor, res[0], req.kind, req.conv_attrs, req.positions,
                                         req.rows_per_batch, req.transpose_x, skip=res[1], mask=mask, shift=res[2])
                    residual.add(n)
                reqs.append(_SplitStats(req))
            accs = ctx.collect(reqs, model_x=cur, model_y=ctx.reference, desc=f"pfa refit {lv + 1}/{len(levels)}")
            for n in names:
                node, (cm_a, cm_b) = nodes[n], accs[n]
                mask = an.output_mask(n, keep)
                if mask is not None and not mask.all() and n not in residual:
                    cm_a, cm_b = _slice_cross(cm_a, mask), _slice_cross(cm_b, mask)
                w0 = layer_matrix(node)[0]

                def solve(cm, ridge):
                    return ridge_toward(cm, w0, ridge) if cfg.prior else ridge_solve(cm, ridge)

                ridge = cfg.ridge
                if ridge < 0:  # pick the ridge that generalises best to the held-out batches
                    ridge = RIDGES[2]
                    if cm_b.n > 0 and cm_a.n > 0:
                        held = [_error(cm_b, *solve(cm_a, r)) for r in RIDGES]
                        ridge = RIDGES[int(np.argmin(held))]
                    ridges[n] = ridge
                cm = _merged(cm_a, cm_b)
                w, b = solve(cm, ridge)
                errors[n] = _error(cm, w, b)
                if node.op == "MatMul":
                    set_layer_matrix(node, w, None)
                    _add_matmul_bias(graph, node, b)
                else:
                    set_layer_matrix(node, w, b)
            cur = export_model(graph, like=pruned)
        if ridges:
            report.details["ridges"] = {k: ridges[k] for k in sorted(ridges)}
        return cur, errors

    def apply(self, model, cfg, ctx):
        t0 = time.perf_counter()
        ctx.require_data(self.name)
        report = PassReport(self.name)
        an = analyze(model, ctx.sample_shapes)
        for p in an.pins:
            if not any(s.node == p.node and s.reason == p.reason for s in report.skipped):
                report.skip(p.node, p.reason)
        groups = [g for g in an.groups if not g.pinned and g.size >= 2 and g.observations]
        mode = cfg.mode
        has_goal = any(m in self.budgets for m in ctx.goals)
        if mode == "auto":
            mode = "budget" if has_goal else "energy"
        if mode == "budget" and not has_goal:
            raise UsageError("pfa.mode=budget needs --target-flops or --target-params")
        details = {"mode": mode, "groups": len(an.groups), "prunable_groups": len(groups)}
        report.details = details
        if not groups:
            return model, report
        covs = self._group_covs(an, groups, ctx)
        lams = {g.index: spectrum(covs[g.index]) for g in groups}
        if mode == "budget":
            ks, energy = self._budget_ks(an, model, groups, lams, cfg, ctx, details)
            details["energy"] = round(energy, 6)
        elif mode == "kl":
            ks = {g.index: round_up(kept_kl(lams[g.index]), g.size, cfg.channel_multiple) for g in groups}
        else:
            ks = {g.index: round_up(kept_energy(lams[g.index], cfg.energy), g.size, cfg.channel_multiple)
                  for g in groups}
            details["energy"] = cfg.energy
        keep, consumers, recipe = {}, set(), []
        for g in groups:
            k = ks[g.index]
            recipe.append({"group": g.name, "channels": g.size, "kept": k})
            if k >= g.size:
                continue
            order = (pearson_removal_order(covs[g.index]) if cfg.selection == "pearson"
                     else self._magnitude(model, an, g))
            keep[g.index] = np.sort(order[g.size - k:])
            consumers.update(g.consumers)
            report.changed.append(f"{g.name}: {g.size} -> {k} channels")
        details["recipe"] = recipe
        if not keep:
            details["fit_seconds"] = round(time.perf_counter() - t0 - ctx.calibration_seconds, 3)
            return model, report
        pruned = an.prune(model, keep)
        pruned, errors = self._refit(pruned, an, keep, consumers, cfg, ctx, report)
        if errors:
            details["refit_errors"] = {k: round(v, 5) for k, v in sorted(errors.items())}
            details["refit_error_mean"] = round(float(np.mean(list(errors.values()))), 6)
            details["refit_error_max"] = round(float(np.max(list(errors.values()))), 6)
        details["calibration_runs"] = ctx.calibration_runs
        details["fit_seconds"] = round(time.perf_counter() - t0 - ctx.calibration_seconds, 3)
        return pruned, report


def _add_matmul_bias(graph: gs.Graph, node: gs.Node, b: np.ndarray) -> None:
    """Put the refit bias of a MatMul into the Add that follows it, or insert one."""
    out = node.outputs[0]
    dtype = node.inputs[1].values.dtype
    users = list(out.outputs)
    if len(users) == 1 and users[0].op == "Add":
        add = users[0]
        j = 1 if add.inputs[0] is out else 0
        c = add.inputs[j]
        if isinstance(c, gs.Constant) and c.values.size == len(b) and c.values.shape[-1] == len(b):
            new = c.values.astype(np.float64) + b.reshape(c.values.shape)
            name = c.name if len(c.outputs) == 1 else f"{c.name}__{add.name}"
            add.inputs[j] = gs.Constant(name, new.astype(dtype))
            return
    mm_out = gs.Variable(out.name + "_pre_bias", dtype=out.dtype)
    node.outputs[0] = mm_out
    graph.nodes.append(gs.Node("Add", name=node.name + "_bias", inputs=[mm_out, gs.Constant(node.name + "_bias_value", b.astype(dtype))],
                               outputs=[out]))
    graph.toposort()
