"""pfa: Principal Filter Analysis (Suau et al., "Filter Distillation for Network Compression",
WACV 2020), post-training, with least-squares reconstruction instead of fine-tuning.

For each coupling group (``onnxshrink.channels``: tensors that must lose the same channels) the
responses r ∈ R^n of its channels are collected on calibration data (conv maps max-pooled over
space; rows of linear outputs). With λ the eigenvalues of Cov(r), descending, normalised to sum 1:

    PFA-En:  keep the smallest k with Σ_{i≤k} λ_i ≥ energy;
    PFA-KL:  KL = Σ λ_i log(n λ_i),  keep ceil(n · (1 − KL / log n)).

Which channels go (``selection``):
- reconstruction (default; ThiNet, Luo et al. 2017 / He et al. 2017): greedy backward elimination on
  the group's consumers. For a consumer with inputs x (its im2col/feature columns) and outputs y,
  H = (Cov(x) + αI)⁻¹, W = H Cov(x, y); dropping channel c (its block B of k·k columns) raises
  min ‖XW − Y‖² by tr(W_Bᵀ H_BB⁻¹ W_B), and H ← H − H_·B H_BB⁻¹ H_B·, W ← W − H_·B H_BB⁻¹ W_B refit
  the rest. Summed over consumers (relative to tr Cov(y)), this also gives each group's error
  curve e_g(k);
- pearson (the paper): drop the channel whose |Pearson correlations| with the rest sum highest;
- magnitude: smallest filter weight norm first.

Budget mode (``--target-flops`` / ``--target-params``), ``allocation``:
- error (default): from every group whole, repeatedly shrink (by ``channel_multiple``) the group with
  the least Δe_g per unit of cost saved until the goals hold, then give back steps that still fit;
- energy (the paper): the largest global energy whose PFA-En recipe meets the goals (bisection).
Costs come from ``CostModel``: cost(k) is at most quadratic in the counts (a layer's params/FLOPs are
bilinear in its input and output channel counts), identified from a few probe prunes.

k is rounded up to a multiple of ``channel_multiple`` columns (for attention heads, whose channel spans
head-size columns, any head count). Then every weight layer that reads a pruned
tensor is refit, level by level on the pruned network's own inputs, to the reference network's
pre-activation: W', b' = argmin ‖X̃ W' + b' − Y‖² + α‖W' − W0‖² (toward the sliced weights), α
chosen per layer on held-out calibration batches from one eigendecomposition of Cov(x̃).

Recipes and selection live in ``_pfa_select``, the refit helpers in ``_pfa_refit``; this module holds
the pass: statistics, the cost model and allocation, and the order of the steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from ..channels import analyze
from ..errors import UsageError
from ..graph import export_model, import_graph
from ..reconstruct import add_matmul_bias, layer_matrix, layer_stats_request, refit_order, ridge_solve, set_layer_matrix
from ..registry import Pass, PassReport, Plan, Skip, register
from ..stats import ResponseStats
from ._pfa_refit import (RIDGES, ResidualStats, SplitStats, choose_ridge, merged, relative_error,
                         residual_target, ridge_toward, slice_outputs)
from ._pfa_select import (Problem, consumer_blocks, elimination_order, kept_energy, kept_kl, pearson_removal_order,
                          round_up, spectrum, weight_row_norms)

MODES = ("auto", "energy", "kl", "budget")
SELECTIONS = ("reconstruction", "pearson", "magnitude")
ALLOCATIONS = ("error", "energy")


@dataclass
class PfaConfig:
    mode: str = "auto"            # auto: budget when a flops/params target is given, else energy
    energy: float = 0.98          # PFA-En: fraction of the response spectrum's energy kept per group
    selection: str = "reconstruction"  # reconstruction: backward elimination on the consumers' least-squares
                                  # error; pearson (the paper); magnitude (smallest filter weight norm first)
    allocation: str = "error"     # budget mode: error (greedy on per-group reconstruction-error curves per
                                  # unit of cost) or energy (one global energy threshold, the paper)
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
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"pfa.allocation must be one of {', '.join(ALLOCATIONS)}, got '{self.allocation}'")
        if self.channel_multiple < 1:
            raise ValueError(f"pfa.channel_multiple must be >= 1, got {self.channel_multiple}")
        if self.positions < 1:
            raise ValueError(f"pfa.positions must be >= 1, got {self.positions}")


# ----------------------------------------------------------------------------- cost without rebuilding
class CostModel:
    """Model cost as a function of the kept counts k_g, identified from a few probe prunes:
    cost(k) = cost(n) + Σ_g [L_g u_g + Q_g (k_g² − n_g²)] + Σ_{g<h} C_gh u_g u_h, u_g = k_g − n_g.
    Every node's params/FLOPs are at most bilinear in the counts of the groups it touches (in and out
    channels), and quadratic in one group (a layer whose input and output are tied), so this is exact
    for such graphs; groups that share a node are probed in pairs."""

    def __init__(self, an, model, groups, cost_nodes):
        self.groups = [g.index for g in groups]
        self.n = {g.index: g.size for g in groups}
        base = cost_nodes(model)
        names = sorted(base)
        vec = lambda c: np.array([[c.get(k, (0, 0))[0] for k in names], [c.get(k, (0, 0))[1] for k in names]],
                                 dtype=np.float64)
        b = vec(base)
        self.base = b.sum(axis=1)
        self.probes = 0

        def probe(ks):
            self.probes += 1
            keep = {gi: np.arange(k) for gi, k in ks.items()}
            return vec(cost_nodes(an.prune(model, keep)))

        self.L, self.Q, touched = {}, {}, {}
        for gi in self.groups:
            n = self.n[gi]
            d1 = probe({gi: 1}) - b
            if n >= 3:
                d2 = probe({gi: 2}) - b
                u1, u2 = 1.0 - n, 2.0 - n
                s1, s2 = 1.0 - n * n, 4.0 - n * n
                det = u1 * s2 - u2 * s1
                lq = [(d1 * s2 - d2 * s1) / det, (u1 * d2 - u2 * d1) / det]
                touched[gi] = (np.abs(d1) + np.abs(d2)).sum(axis=0) > 0
            else:
                lq = [d1 / (1.0 - n), np.zeros_like(d1)]
                touched[gi] = np.abs(d1).sum(axis=0) > 0
            self.L[gi], self.Q[gi] = lq[0].sum(axis=1), lq[1].sum(axis=1)
        self.C = {}
        for i, gi in enumerate(self.groups):
            for gj in self.groups[i + 1:]:
                if not np.any(touched[gi] & touched[gj]):
                    continue
                d = (probe({gi: 1, gj: 1}) - b).sum(axis=1)
                rest = self._single(gi, 1) + self._single(gj, 1)
                self.C[(gi, gj)] = (d - rest) / ((1.0 - self.n[gi]) * (1.0 - self.n[gj]))

    def _single(self, gi, k):
        n = self.n[gi]
        return self.L[gi] * (k - n) + self.Q[gi] * (k * k - n * n)

    def __call__(self, ks: dict) -> dict:
        """{"params", "flops"} at the kept counts ``ks`` ({group index: k}; missing groups whole)."""
        c = self.base.copy()
        for gi, k in ks.items():
            if gi in self.L:
                c += self._single(gi, k)
        for (gi, gj), v in self.C.items():
            c += v * (ks.get(gi, self.n[gi]) - self.n[gi]) * (ks.get(gj, self.n[gj]) - self.n[gj])
        return {"params": float(c[0]), "flops": float(c[1])}


# ----------------------------------------------------------------------------- the pass
def multiple_of(g, channel_multiple: int) -> int:
    """The step of a group's kept count: ``channel_multiple`` columns, where one channel of the group
    spans several columns of its sources (an attention head: head-size columns of Q, K and V)."""
    sources = [s for s in getattr(g, "sources", []) if s.prunable]
    width = min(len(s.comps) for s in sources) // max(g.size, 1) if sources else 1
    return max(1, channel_multiple // max(width, 1))


def _overshoot_note(real, goals, multiple) -> dict:
    """{"note": ...} when whole steps of ``multiple`` channels left the model well below a goal (a
    small group, 10 or 16 channels, can only go to 8: one step is a large share of a small net)."""
    from ..budget import TOLERANCE
    over = [f"{m} {real[m] / max(goal.final / goal.fraction, 1e-12):.3f} of the original for a goal of "
            f"{goal.target / max(goal.final / goal.fraction, 1e-12):.3f}"
            for m, goal in goals.items() if real.get(m) is not None and real[m] < goal.target * (1 - TOLERANCE)]
    if not over:
        return {}
    return {"note": f"channels go in steps of pfa.channel_multiple={multiple}: the smallest allocation meeting "
                    f"the goal leaves {'; '.join(over)} (pfa.channel_multiple=1 allows finer steps)"}


def cost_table(model, shapes):
    """{"total": {metric: value or None}, "nodes": {metric: {node: value}}}: params, and FLOPs per
    sample averaged over ``shapes`` (a dict of input shapes, a list of signatures, or None)."""
    from ..cost import signature_costs
    per = signature_costs(model, shapes)
    weight = sum(w for _, w in per) or 1
    params = {c.name: c.params for c in per[0][0]}
    flops = {}
    for costs, w in per:
        for c in costs:
            flops[c.name] = flops.get(c.name, 0.0) + w * c.flops / weight
    known = all(c.flops_known for costs, _ in per for c in costs)
    return {"total": {"params": sum(params.values()), "flops": sum(flops.values()) if known else None},
            "nodes": {"params": params, "flops": flops}}


def reach_of(model, smallest, shapes):
    """{"acts_on": {metric: share of ``model``'s cost in nodes whose cost differs in ``smallest``},
    "floor": {metric: cost of ``smallest`` as a fraction of ``model``'s}} (None where not countable)."""
    before, after = cost_table(model, shapes), cost_table(smallest, shapes)
    acts, floor = {}, {}
    for m in ("params", "flops"):
        total, low = before["total"][m], after["total"][m]
        if not total or low is None:
            acts[m] = floor[m] = None
            continue
        moved = sum(v for k, v in before["nodes"][m].items() if abs(after["nodes"][m].get(k, 0) - v) > 1e-9 * total)
        acts[m], floor[m] = moved / total, low / total
    return {"acts_on": acts, "floor": floor}


SLICE_ONLY = ("ConvTranspose",)   # consumers whose input channels are sliced but not refit (no LayerStats)


def refit_consumers(nodes, names):
    """The consumers among ``names`` that are refit (the others are only sliced)."""
    return [c for c in names if c in nodes and nodes[c].op not in SLICE_ONLY]


def eligible_groups(model, an):
    """(groups pfa can prune, [Skip]): every pin, and why each other group is left whole."""
    nodes = {n.name: n for n in import_graph(model).nodes}
    groups, skipped = [], []

    def skip(node, reason):
        if not any(s.node == node and s.reason == reason for s in skipped):
            skipped.append(Skip(node, reason))

    for g in an.groups:
        if g.pinned:
            for p in g.pins:
                skip(p.node, p.reason)
            continue
        if g.size < 2:
            skip(g.name, "a single channel: nothing to remove")
            continue
        if not g.observations:
            skip(g.name, "no tensor shows the channels' responses")
            continue
        blocked = False
        for c in refit_consumers(nodes, g.consumers):
            node = nodes[c]
            try:
                layer_stats_request(node, c, node.inputs[0].name, node.outputs[0].name)
            except ValueError as e:   # e.g. a Conv with auto_pad: it could not be refit
                skip(c, f"{e}; the channels it reads ({g.name}) are left whole")
                blocked = True
        if not blocked:
            groups.append(g)
    return groups, skipped


@register
class Pfa(Pass):
    name = "pfa"
    summary = "Principal Filter Analysis: remove Conv filters / linear neurons whose responses are correlated"
    Config = PfaConfig
    needs_data = True
    budgets = ("flops", "params")
    ready = True

    def plan(self, model, cfg):
        groups, skipped = eligible_groups(model, analyze(model))
        return Plan(targets=[s.node for g in groups for s in g.sources if s.prunable], skipped=skipped)

    def reach(self, model, cfg, shapes=None, an=None, groups=None):
        """What pfa alone can do to ``model`` at input ``shapes``: {"acts_on": {metric: share of the
        model's cost in nodes whose cost changes when channels go}, "floor": {metric: the fraction
        of the cost left with every prunable group at its smallest count (``channel_multiple``)}}."""
        if an is None:
            an = analyze(model, shapes if isinstance(shapes, dict) else None)
            groups, _ = eligible_groups(model, an)
        keep = {g.index: np.arange(multiple_of(g, cfg.channel_multiple)) for g in groups
                if multiple_of(g, cfg.channel_multiple) < g.size}
        return reach_of(model, an.prune(model, keep) if keep else model, shapes)

    # -- statistics
    def _statistics(self, model, an, groups, cfg, ctx, responses: bool, consumers: bool):
        """One calibration run: the groups' response covariances and/or their consumers' moments."""
        reqs, layer = {}, {}
        if responses:
            for g in groups:
                for o in g.observations:
                    reqs.setdefault((o.tensor, o.reduce), ResponseStats(o.tensor, o.reduce))
        nodes = {}
        if consumers:
            graph = import_graph(model)
            nodes = {n.name: n for n in graph.nodes}
            for g in groups:
                for c in refit_consumers(nodes, g.consumers):
                    node = nodes.get(c)
                    if c in layer or node is None:
                        continue
                    layer[c] = layer_stats_request(node, "pfa-sel:" + c, node.inputs[0].name,
                                                   node.outputs[0].name, positions=cfg.positions)
        accs = ctx.collect(list(reqs.values()) + list(layer.values()), desc="pfa statistics")
        covs = {}
        if responses:
            for g in groups:
                c = np.zeros((g.size, g.size))
                for o in g.observations:
                    cov = accs[reqs[(o.tensor, o.reduce)].key].cov
                    np.add.at(c, (o.indices[:, None], o.indices[None, :]), cov[np.ix_(o.positions, o.positions)])
                covs[g.index] = c
        problems = {g.index: [] for g in groups}
        for c, req in layer.items():
            cm = accs[req.key]
            n = max(cm.n, 1)
            cxx = cm.x.cov
            cxy = cm.xy / n - np.outer(cm.x.mean, cm.mean_y)
            var = float(np.sum(cm.yy / n - cm.mean_y ** 2))
            for gi, blocks in consumer_blocks(an, c, nodes[c]).items():
                if gi in problems:
                    problems[gi].append(Problem(cxx, cxy, var, blocks))
        return covs, problems

    def _magnitude(self, model, an, g):
        graph = import_graph(model)
        nodes = {n.name: n for n in graph.nodes}
        score = np.zeros(g.size)
        for s in g.sources:
            if s.prunable and s.node in nodes:
                np.add.at(score, an.class_index[an.roots[s.comps]], weight_row_norms(nodes[s.node]))
        return np.argsort(score, kind="stable")

    # -- budget search
    def _cost_model(self, an, model, groups, ctx):
        from ..cost import node_costs

        def cost_nodes(m):
            return {c.name: (c.params, c.flops) for c in node_costs(m, ctx.sample_shapes)}

        return CostModel(an, model, groups, cost_nodes)

    def _goals(self, ctx):
        return {m: g for m, g in ctx.goals.items() if m in self.budgets}

    def _budget_ks(self, groups, lams, cfg, cost, goals, details):
        """One global energy threshold (the paper's recipe), searched by bisection."""
        cums = {g.index: np.cumsum(lams[g.index]) for g in groups}
        cands = np.unique(np.concatenate([np.clip(c, 0, 1) for c in cums.values()] + [np.array([0.0, 1.0])]))

        def ks_at(e):
            return {g.index: round_up(g.size if e >= 1.0 else
                                      min(g.size, np.searchsorted(cums[g.index], e - 1e-12) + 1),
                                      g.size, multiple_of(g, cfg.channel_multiple)) for g in groups}

        def fits(ks):
            c = cost(ks)
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
        groups_by = {g.index: g for g in groups}

        def ks_t(t):
            return {gi: round_up(k_lo[gi] + t * (k_hi[gi] - k_lo[gi]), groups_by[gi].size,
                                 multiple_of(groups_by[gi], cfg.channel_multiple))
                    if k_hi[gi] > k_lo[gi] else k_lo[gi] for gi in k_lo}

        t_lo, t_hi = 0.0, 1.0
        for _ in range(8):
            t = 0.5 * (t_lo + t_hi)
            if fits(ks_t(t)):
                t_lo = t
            else:
                t_hi = t
        return ks_t(t_lo), float(cands[lo])

    def _allocate(self, groups, curves, cfg, cost, goals, details, ks=None):
        """Greedy allocation: starting from ``ks`` (default: every group whole), repeatedly shrink the
        group whose next step down (to the next multiple of ``channel_multiple``) adds the least
        reconstruction error per unit of cost saved, until every goal is met."""
        ks = dict(ks) if ks is not None else {g.index: g.size for g in groups}
        mult = {g.index: multiple_of(g, cfg.channel_multiple) for g in groups}
        steps = 0
        while True:
            c = cost(ks)
            unmet = [k for k, goal in goals.items() if c[k] > goal.target]
            if not unmet:
                break
            best, best_ratio = None, None
            for g in groups:
                k, m = ks[g.index], mult[g.index]
                nxt = ((k - 1) // m) * m
                if nxt < 1:
                    continue
                trial = dict(ks)
                trial[g.index] = nxt
                c2 = cost(trial)
                saved = sum((c[k2] - c2[k2]) / max(goals[k2].target, 1e-12) for k2 in unmet)
                if saved <= 0:
                    continue
                ratio = (curves[g.index][nxt] - curves[g.index][k]) / saved
                if best_ratio is None or ratio < best_ratio:
                    best, best_ratio = (g.index, nxt), ratio
            if best is None:
                details["budget"] = "not reachable: every group is at its smallest count"
                break
            ks[best[0]] = best[1]
            steps += 1
        # the last step can overshoot (one step of a wide layer is several percent of the cost):
        # give channels back where they buy the most error per unit of cost, while the goals hold
        while steps:
            best, best_gain = None, None
            for g in groups:
                k, m = ks[g.index], mult[g.index]
                if k >= g.size:
                    continue
                up = min(g.size, (k // m + 1) * m)
                trial = dict(ks)
                trial[g.index] = up
                c2 = cost(trial)
                if any(c2[k2] > goal.target for k2, goal in goals.items()):
                    continue
                c = cost(ks)
                added = sum(max(c2[k2] - c[k2], 0.0) / max(goals[k2].target, 1e-12) for k2 in goals)
                gain = (curves[g.index][k] - curves[g.index][up]) / max(added, 1e-12)
                if best_gain is None or gain > best_gain:
                    best, best_gain = (g.index, up), gain
            if best is None:
                break
            ks[best[0]] = best[1]
        details["allocation_steps"] = details.get("allocation_steps", 0) + steps
        return ks

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
                res = residual_target(node) if cfg.residual_targets else None
                if res is not None:
                    mask = an.output_mask(n, keep)
                    req = ResidualStats(req.key, req.x_tensor, res[0], req.kind, req.conv_attrs, req.positions,
                                         req.rows_per_batch, req.transpose_x, skip=res[1], mask=mask, shift=res[2])
                    residual.add(n)
                reqs.append(SplitStats(req))
            accs = ctx.collect(reqs, model_x=cur, model_y=ctx.reference, desc=f"pfa refit {lv + 1}/{len(levels)}")
            for n in names:
                node, (cm_a, cm_b) = nodes[n], accs[n]
                mask = an.output_mask(n, keep)
                if mask is not None and not mask.all() and n not in residual:
                    cm_a, cm_b = slice_outputs(cm_a, mask), slice_outputs(cm_b, mask)
                w0 = layer_matrix(node)[0]

                def solve(cm, ridge):
                    return ridge_toward(cm, w0, ridge) if cfg.prior else ridge_solve(cm, ridge)

                ridge = cfg.ridge
                if ridge < 0:  # pick the ridge that generalises best to the held-out batches
                    ridge = RIDGES[2]
                    if cm_b.n > 0 and cm_a.n > 0:
                        ridge = choose_ridge(cm_a, cm_b, w0 if cfg.prior else None)
                    ridges[n] = ridge
                cm = merged(cm_a, cm_b)
                w, b = solve(cm, ridge)
                errors[n] = relative_error(cm, w, b)
                if node.op == "MatMul":
                    set_layer_matrix(node, w, None)
                    add_matmul_bias(graph, node, b)
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
        groups, report.skipped = eligible_groups(model, an)
        mode = cfg.mode
        has_goal = any(m in self.budgets for m in ctx.goals)
        if mode == "auto":
            mode = "budget" if has_goal else "energy"
        if mode == "budget" and not has_goal:
            raise UsageError("pfa.mode=budget needs --target-flops or --target-params")
        details = {"mode": mode, "groups": len(an.groups), "prunable_groups": len(groups),
                   "selection": cfg.selection}
        report.details = details
        if has_goal:   # what pfa alone could reach, for the report and a TargetError's message
            details["reach"] = self.reach(model, cfg, ctx.sample_shapes, an, groups)
        if not groups:
            return model, report
        by_error = mode == "budget" and cfg.allocation == "error"
        need_problems = cfg.selection == "reconstruction" or by_error
        covs, problems = self._statistics(model, an, groups, cfg, ctx, True, need_problems)
        lams = _Lazy(lambda gi: spectrum(covs[gi]))      # eigenvalues only where a recipe needs them
        sel_ridge = cfg.ridge if cfg.ridge >= 0 else 1e-3
        t_sel = time.perf_counter()
        orders, curves = {}, {}
        for g in groups:
            if need_problems and problems.get(g.index):
                orders[g.index], curves[g.index] = elimination_order(problems[g.index], g.size, sel_ridge)
            else:  # nothing to reconstruct from: the spectrum's lost energy stands in for the error
                curves[g.index] = 1.0 - np.concatenate([[0.0], np.cumsum(lams[g.index])])
                curves[g.index][-1] = 0.0
        details["selection_seconds"] = round(time.perf_counter() - t_sel, 3)
        t_alloc = time.perf_counter()
        if mode == "budget":
            details["allocation"] = cfg.allocation
            goals = self._goals(ctx)
            cost = self._cost_model(an, model, groups, ctx)
            if by_error:
                ks = self._allocate(groups, curves, cfg, cost, goals, details)
            else:
                ks, energy = self._budget_ks(groups, lams, cfg, cost, goals, details)
                details["energy"] = round(energy, 6)
            details["cost_probes"] = cost.probes
        elif mode == "kl":
            ks = {g.index: round_up(kept_kl(lams[g.index]), g.size, multiple_of(g, cfg.channel_multiple))
                  for g in groups}
        else:
            ks = {g.index: round_up(kept_energy(lams[g.index], cfg.energy), g.size,
                                    multiple_of(g, cfg.channel_multiple)) for g in groups}
            details["energy"] = cfg.energy

        def keep_of(ks):
            keep = {}
            for g in groups:
                k = ks[g.index]
                if k >= g.size:
                    continue
                if cfg.selection == "reconstruction" and g.index in orders:
                    order = orders[g.index]
                elif cfg.selection == "magnitude":
                    order = self._magnitude(model, an, g)
                else:
                    order = pearson_removal_order(covs[g.index])
                keep[g.index] = np.sort(order[g.size - k:])
            return keep

        keep = keep_of(ks)
        pruned = an.prune(model, keep) if keep else model
        if mode == "budget" and keep:
            # the cost model is exact for in/out-bilinear layers; check the real model, and step on
            # (greedily, real cost) where something it cannot see kept it above the budget
            for _ in range(64):
                real = ctx.cost(pruned)
                if all(real[m] <= goal.target for m, goal in goals.items()):
                    break
                scale = {m: goal.target * goal.target / max(real[m], 1e-12) for m, goal in goals.items()}
                tighter = {m: SimpleNamespace(target=scale[m]) for m in goals}
                ks2 = self._allocate(groups, curves, cfg, cost, tighter, details, ks)
                if ks2 == ks:
                    break
                ks = ks2
                keep = keep_of(ks)
                pruned = an.prune(model, keep)
        if mode == "budget" and keep and cfg.channel_multiple > 1:
            details.update(_overshoot_note(ctx.cost(pruned), goals, cfg.channel_multiple))
        details["allocation_seconds"] = round(time.perf_counter() - t_alloc, 3)
        recipe, consumers = [], set()
        model_nodes = {n.name: n for n in import_graph(model).nodes}
        for g in groups:
            k = ks[g.index]
            recipe.append({"group": g.name, "channels": g.size, "kept": k,
                           "predicted_error": round(float(curves[g.index][k]), 5)})
            if g.index in keep:
                consumers.update(refit_consumers(model_nodes, g.consumers))
                report.changed.append(f"{g.name}: {g.size} -> {k} channels")
            else:
                report.skip(g.name, f"recipe keeps all {g.size} channels")
        details["recipe"] = recipe
        if not keep:
            details["fit_seconds"] = round(time.perf_counter() - t0 - ctx.calibration_seconds, 3)
            return model, report
        pruned, errors = self._refit(pruned, an, keep, consumers, cfg, ctx, report)
        if errors:
            details["refit_errors"] = {k: round(v, 5) for k, v in sorted(errors.items())}
            details["refit_error_mean"] = round(float(np.mean(list(errors.values()))), 6)
            details["refit_error_max"] = round(float(np.max(list(errors.values()))), 6)
        details["calibration_runs"] = ctx.calibration_runs
        details["fit_seconds"] = round(time.perf_counter() - t0 - ctx.calibration_seconds, 3)
        return pruned, report


class _Lazy(dict):
    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, key):
        self[key] = value = self.make(key)
        return value

