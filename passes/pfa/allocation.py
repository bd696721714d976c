"""pfa, budget mode: how many channels each group keeps so that the model meets its goals.

The cost of the pruned model as a function of the kept counts k_g (``CostModel``) is identified from
a few probe prunes: a node's params/FLOPs are at most bilinear in its input and output channel counts
(and quadratic in one group when a layer's input and output are tied), so

    cost(k) = cost(n) + Σ_g [L_g u_g + Q_g (k_g² − n_g²)] + Σ_{g<h} C_gh u_g u_h,   u_g = k_g − n_g

is exact for such graphs. Two allocations search it:
- ``by_error`` (default): from every group whole, repeatedly shrink (by the group's step) the group
  whose next step adds the least reconstruction error e_g(k) per unit of cost saved until every
  target holds, then give back steps that still fit;
- ``by_energy`` (the paper): the largest global energy whose PFA-En recipe meets the targets
  (bisection), then the same fraction of the way to the next recipe for every group.

A target is an absolute value per metric ({"flops": ..., "params": ...}) the cost must not exceed.
"""

from __future__ import annotations

import numpy as np

from ...cost import signature_costs
from ...graph import import_graph
from .recipes import round_up


def multiple_of(g, channel_multiple: int) -> int:
    """The step of a group's kept count: ``channel_multiple`` columns, where one channel of the group
    spans several columns of its sources (an attention head: head-size columns of Q, K and V)."""
    sources = [s for s in getattr(g, "sources", []) if s.prunable]
    width = min(len(s.comps) for s in sources) // max(g.size, 1) if sources else 1
    return max(1, channel_multiple // max(width, 1))


SMALL_GROUP = 4   # a group of fewer steps than this moves by an eighth of it (``step_of``)


def step_of(g, channel_multiple: int) -> int:
    """The step of a group's kept count in a budget search: ``multiple_of``, except for a group of
    fewer than ``SMALL_GROUP`` steps (10, 16 or 24 channels at the default 8, where one step is a
    third or more of the layer and overshoots any budget): it moves in steps of at most an eighth of
    its size (the largest power of two that is: 1, 2 or 4 channels)."""
    step = multiple_of(g, channel_multiple)
    size = max(int(getattr(g, "size", 1)), 1)
    if size >= SMALL_GROUP * step:
        return step
    return max(1, min(step, 1 << max(int(np.floor(np.log2(max(size / 8, 1)))), 0)))


# ----------------------------------------------------------------------------- cost without rebuilding
class CostModel:
    """Model cost as a function of the kept counts k_g, identified from a few probe prunes:
    cost(k) = cost(n) + Σ_g [L_g u_g + Q_g (k_g² − n_g²)] + Σ_{g<h} C_gh u_g u_h, u_g = k_g − n_g.
    Every node's params/FLOPs are at most bilinear in the counts of the groups it touches (in and out
    channels), and quadratic in one group (a layer whose input and output are tied), so this is exact
    for such graphs; groups that share a node are probed in pairs.

    A probe prunes the whole model and recounts it, so groups (and pairs) whose nodes are disjoint
    (the nodes whose tensors carry their channels, ``_supports``) are probed together and each one's
    change read off its own nodes. A node that changes outside every support of a joint probe, or a
    joint check (all groups at 1 and at 2 channels) that the model misses, falls back to probing
    one group (pair) at a time; either way the coefficients are the same numbers."""

    def __init__(self, an, model, groups, cost_nodes, joint=True):
        self.groups = [g.index for g in groups]
        self.n = {g.index: g.size for g in groups}
        base = cost_nodes(model)
        self._names = names = sorted(base)
        self._b = b = self._vec(base)
        self.base = b.sum(axis=1)
        self.probes = 0
        self._an, self._model, self._cost_nodes = an, model, cost_nodes
        if joint:
            try:
                self._identify(_supports(an, model, self.groups, names))
                return
            except _Leak:
                pass
        self._identify(None)

    def _vec(self, c):
        names = self._names
        return np.array([[c.get(k, (0, 0))[0] for k in names], [c.get(k, (0, 0))[1] for k in names]],
                        dtype=np.float64)

    def _probe(self, ks):
        self.probes += 1
        keep = {gi: np.arange(k) for gi, k in ks.items()}
        return self._vec(self._cost_nodes(self._an.prune(self._model, keep))) - self._b

    def _deltas(self, items, ks_of, support):
        """{item: per-node change of the cost} for ``items`` (groups or pairs of groups) probed at
        ``ks_of(item)``: one probe per item, or (``support``: {item: node mask}) one per batch of
        items with disjoint supports, each item's change its own nodes' part."""
        if support is None:
            return {it: self._probe(ks_of(it)) for it in items}
        batches = []
        for it in items:
            for bt in batches:
                if not np.any(bt[1] & support[it]):
                    bt[0].append(it)
                    bt[1] |= support[it]
                    break
            else:
                batches.append([[it], support[it].copy()])
        out = {}
        for members, union in batches:
            ks = {}
            for it in members:
                ks.update(ks_of(it))
            d = self._probe(ks)
            if np.any(d[:, ~union]):
                raise _Leak
            for it in members:
                out[it] = np.where(support[it], d, 0.0)
        return out

    def _pair_deltas(self, pairs, touched):
        """{pair: per-node change of the cost} with the pairs' groups at one channel, pairs probed
        together where every node is touched by at most two of a probe's groups and, where by
        two, by the groups of one of its pairs: each node's change is then that pair's (or one
        group's) alone, whatever the other groups of the probe."""
        batches = []   # [pairs, groups, per-node count of touching groups, nodes two groups of a pair touch]
        for p in pairs:
            both = touched[p[0]] & touched[p[1]]
            for bt in batches:
                new = [g for g in p if g not in bt[1]]
                count = bt[2] + sum(touched[g].astype(np.int64) for g in new) if new else bt[2]
                covered = bt[3] | both
                if np.all(count <= 2) and not np.any((count == 2) & ~covered):
                    bt[0].append(p)
                    bt[1].update(new)
                    bt[2], bt[3] = count, covered
                    break
            else:
                batches.append([[p], set(p), touched[p[0]].astype(np.int64) + touched[p[1]], both])
        out = {}
        for members, groups, _, _ in batches:
            d = self._probe({g: 1 for g in groups})
            for p in members:
                out[p] = d
        return out

    def _identify(self, supports):
        n = self.n
        self.L, self.Q, self.C, touched, per_node = {}, {}, {}, {}, {}
        d1s = self._deltas(self.groups, lambda gi: {gi: 1}, supports)
        wide = [gi for gi in self.groups if n[gi] >= 3]
        d2s = self._deltas(wide, lambda gi: {gi: 2}, supports)
        for gi in self.groups:
            d1 = d1s[gi]
            if n[gi] >= 3:
                d2 = d2s[gi]
                u1, u2 = 1.0 - n[gi], 2.0 - n[gi]
                s1, s2 = 1.0 - n[gi] * n[gi], 4.0 - n[gi] * n[gi]
                det = u1 * s2 - u2 * s1
                lq = [(d1 * s2 - d2 * s1) / det, (u1 * d2 - u2 * d1) / det]
                touched[gi] = (np.abs(d1) + np.abs(d2)).sum(axis=0) > 0
            else:
                lq = [d1 / (1.0 - n[gi]), np.zeros_like(d1)]
                touched[gi] = np.abs(d1).sum(axis=0) > 0
            self.L[gi], self.Q[gi] = lq[0].sum(axis=1), lq[1].sum(axis=1)
            per_node[gi] = lq
        pairs = [(gi, gj) for i, gi in enumerate(self.groups) for gj in self.groups[i + 1:]
                 if np.any(touched[gi] & touched[gj])]
        if supports is None:
            ds = self._deltas(pairs, lambda p: {p[0]: 1, p[1]: 1}, None)
            for gi, gj in pairs:
                d = ds[(gi, gj)].sum(axis=1)
                rest = self._single(gi, 1) + self._single(gj, 1)
                self.C[(gi, gj)] = (d - rest) / ((1.0 - n[gi]) * (1.0 - n[gj]))
        else:
            ds = self._pair_deltas(pairs, touched)
            for gi, gj in pairs:   # read on the nodes both touch; elsewhere the singles give the change
                both = touched[gi] & touched[gj]
                rest = sum(per_node[g][0] * (1 - n[g]) + per_node[g][1] * (1 - n[g] * n[g]) for g in (gi, gj))
                self.C[(gi, gj)] = (ds[(gi, gj)] - rest)[:, both].sum(axis=1) / ((1.0 - n[gi]) * (1.0 - n[gj]))
        if supports is not None:   # the joint check: every group at its smallest counts at once
            for k in (1, 2):
                ks = {gi: min(k, n[gi]) for gi in self.groups}
                real = self.base + self._probe(ks).sum(axis=1)
                pred = self(ks)
                if any(abs(pred[m] - real[i]) > 1e-9 * max(abs(real[i]), 1.0) for i, m in enumerate(("params", "flops"))):
                    raise _Leak

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


class _Leak(Exception):
    """A joint probe changed a node outside its groups' supports: probe one at a time."""


def _supports(an, model, groups, names) -> dict:
    """{group index: boolean mask over ``names``}: the nodes whose cost can change with the group's
    count, i.e. that read or write a tensor carrying its channels, or whose weights it slices."""
    index = {name: i for i, name in enumerate(names)}
    of = lambda comps: set(an.class_group[an.roots[np.asarray(comps, dtype=np.int64)]].tolist())  # noqa: E731
    tensor_groups = {t: of(m.comps) for t, m in an.tmap.items() if len(m.comps)}
    node_groups = {}
    for node in import_graph(model).nodes:
        s = node_groups.setdefault(node.name, set())
        for t in list(node.inputs) + list(node.outputs):
            s |= tensor_groups.get(t.name, set())
    for e in an.edits:
        parts = e.comps if isinstance(e.comps, (list, tuple)) else [e.comps]
        comps = [np.asarray(c, dtype=np.int64).ravel() for c in parts]
        comps = np.concatenate(comps) if comps else np.zeros(0, np.int64)
        if len(comps):
            node_groups.setdefault(e.node, set()).update(of(comps))
    out = {gi: np.zeros(len(names), dtype=bool) for gi in groups}
    for node, gs_ in node_groups.items():
        if node not in index:
            continue
        for gi in gs_ & set(out):
            out[gi][index[node]] = True
    return out


# ----------------------------------------------------------------------------- the two allocations
def by_error(groups, curves, channel_multiple, cost, targets, details, ks=None):
    """Greedy allocation: starting from ``ks`` (default: every group whole), repeatedly shrink the
    group whose next step down (to the next multiple of its step) adds the least reconstruction
    error ``curves[g][k]`` per unit of cost saved, until every target is met; then give channels back
    where they buy the most error per unit of cost while the targets hold.

    The best ratio can be a step far larger than what is still missing (the last 0.01 % of a
    budget met by removing a quarter of a layer): at each step the candidate that meets every
    target with the least total error is kept aside, and it is the answer when its total error
    Σ_g e_g(k_g) is below the greedy's."""
    ks = dict(ks) if ks is not None else {g.index: g.size for g in groups}
    mult = {g.index: step_of(g, channel_multiple) for g in groups}
    total = lambda kk: float(sum(curves[gi][k] for gi, k in kk.items() if gi in mult))  # noqa: E731
    steps, finish = 0, None
    while True:
        c = cost(ks)
        unmet = [k for k, target in targets.items() if c[k] > target]
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
            saved = sum((c[k2] - c2[k2]) / max(targets[k2], 1e-12) for k2 in unmet)
            if saved <= 0:
                continue
            added = curves[g.index][nxt] - curves[g.index][k]
            ratio = added / saved
            if best_ratio is None or ratio < best_ratio:
                best, best_ratio = (g.index, nxt), ratio
            if all(c2[k2] <= target for k2, target in targets.items()):
                err = total(ks) + added
                if finish is None or err < finish[0]:
                    finish = (err, trial)
        if best is None:
            details["budget"] = "not reachable: every group is at its smallest count"
            break
        ks[best[0]] = best[1]
        steps += 1
    if not steps:
        details["allocation_steps"] = details.get("allocation_steps", 0)
        return ks
    ks = _give_back(ks, groups, curves, mult, cost, targets)
    if finish is not None and finish[1] != ks:
        alt = _give_back(finish[1], groups, curves, mult, cost, targets)
        if total(alt) < total(ks) - 1e-12:
            ks = alt
    details["allocation_steps"] = details.get("allocation_steps", 0) + steps
    return ks


def _give_back(ks, groups, curves, mult, cost, targets):
    """The last step can overshoot (one step of a wide layer is several percent of the cost): give
    channels back where they buy the most error per unit of cost, while the targets hold."""
    ks = dict(ks)
    while True:
        best, best_gain = None, None
        for g in groups:
            k, m = ks[g.index], mult[g.index]
            if k >= g.size:
                continue
            up = min(g.size, (k // m + 1) * m)
            trial = dict(ks)
            trial[g.index] = up
            c2 = cost(trial)
            if any(c2[k2] > target for k2, target in targets.items()):
                continue
            c = cost(ks)
            added = sum(max(c2[k2] - c[k2], 0.0) / max(targets[k2], 1e-12) for k2 in targets)
            gain = (curves[g.index][k] - curves[g.index][up]) / max(added, 1e-12)
            if best_gain is None or gain > best_gain:
                best, best_gain = (g.index, up), gain
        if best is None:
            return ks
        ks[best[0]] = best[1]


PROBE_SHARE = 0.25   # a group's output effect is measured with this share of its channels removed


def probe_count(g, channel_multiple: int) -> int:
    """The kept count at which a group's output effect is measured (``measured_curves``): a
    quarter of its channels gone, rounded down to its budget step (at least one step gone, at
    least one step kept)."""
    step = step_of(g, channel_multiple)
    k = int(np.floor(g.size * (1.0 - PROBE_SHARE) / step)) * step
    return int(min(max(k, step), g.size - 1)) if g.size > 1 else g.size


def measured_curves(groups, curves, channel_multiple, measure, details):
    """The error curves rescaled by each group's measured effect on the model's outputs:
    e'_g(k) = γ_g (e_g(k) − e_g(n)), γ_g = measure(g, k̂) / (e_g(k̂) − e_g(n)) at the probe count
    k̂ (``probe_count``), where ``measure(g, k)`` is the model's output error (per-sample, the
    worst samples weighing in) with only ``g`` pruned to k and its consumers refit.

    The in-sample reconstruction error of a group's consumers says how well they are refit, not
    how far that error travels: through the layers after them an early full-resolution group's
    error grows, a late one's is averaged out, and a metric read on the worst sample or on
    decisions sees what the mean hides. Measured, the budget goes to the groups the outputs feel
    least. A group whose probe's predicted error is ~0 keeps its curve scaled by the median gain."""
    out, gains, probes = {}, {}, {}
    for g in groups:
        k = probe_count(g, channel_multiple)
        if k >= g.size:
            continue
        c = np.asarray(curves[g.index], dtype=np.float64)
        pred = float(c[k] - c[g.size])
        err = float(measure(g, k))
        probes[g.index] = (k, err)
        if pred > 1e-12:
            gains[g.index] = err / pred
    typical = float(np.median(list(gains.values()))) if gains else 1.0
    rows = {}
    for g in groups:
        c = np.asarray(curves[g.index], dtype=np.float64)
        base = c - c[g.size]
        if g.index in probes and g.index not in gains:   # a probe the curve called free: its error per channel
            k, err = probes[g.index]
            gone = np.arange(len(c))[::-1].astype(np.float64)   # channels removed at each count
            out[g.index] = np.maximum(base * typical, err * gone / max(g.size - k, 1))
        else:
            out[g.index] = base * gains.get(g.index, typical)
        if g.index in probes:
            rows[g.name] = {"probe_kept": probes[g.index][0], "output_error": round(probes[g.index][1], 6),
                            "gain": round(gains.get(g.index, typical), 4)}
    details["measured"] = rows
    return out


REFINE_ROUNDS = 4   # rounds of probes at the counts an allocation chose (``refined_curves``)


def gain_curve(curve, points) -> np.ndarray:
    """A group's error curve e'(k) = γ(k) (e(k) − e(n)) through its measured points ({k: output
    error}): γ at each point is its measured error over the curve's, interpolated linearly in k
    between points and held beyond them; made non-increasing in k (a channel more never costs
    error). A point whose curve is ~0 is taken as measured, spread per channel removed."""
    c = np.asarray(curve, dtype=np.float64)
    n = len(c) - 1
    base = c - c[n]
    ks = sorted(points)
    gains = [points[k] / base[k] if base[k] > 1e-12 else None for k in ks]
    known = [(k, gn) for k, gn in zip(ks, gains) if gn is not None]
    if known:
        gamma = np.interp(np.arange(n + 1), [k for k, _ in known], [gn for _, gn in known])
        out = gamma * base
    else:
        out = np.zeros(n + 1)
    for k in ks:   # every measured point is met exactly; below it, at least its error per channel gone
        out[k] = points[k]
        gone = np.arange(n + 1)[::-1].astype(np.float64)
        out[:k] = np.maximum(out[:k], points[k] * gone[:k] / max(n - k, 1))
    out[n] = 0.0
    return np.maximum.accumulate(out[::-1])[::-1]


def refined_curves(groups, raw, curves, points, ks, measure, details):
    """The measured ``curves``, sharpened where the allocation ``ks`` went: each group cut to a count
    not measured yet is measured there too (``measure(g, k)``, recorded in ``points``: {group index:
    {k: output error}}, which holds the probes so far) and its curve redrawn from its in-sample one
    ``raw`` through its measured points (``gain_curve``). The probes at a quarter of each group say
    how far its error travels at that depth; an allocation that cuts a group by an eighth reads an
    extrapolation, and the output error of a small cut is not proportional to the consumers'
    in-sample one. Returns (curves, number of new measurements)."""
    return remeasure([(g.index, g.name, g, ks.get(g.index, g.size), g.size) for g in groups], raw, curves,
                     points, measure, details.get("measured", {}))


def remeasure(units, raw, curves, points, measure, rows):
    """The re-measuring step both measured allocations share (groups here, layers' ranks in
    ``_factor.refined_curves``): ``units`` lists (key, label, unit, k, limit) for every unit, ``k``
    the count or rank chosen (None: not cut). A unit cut below its ``limit`` to a ``k`` not measured
    yet is measured there (``measure(unit, k)``, into ``points[key]`` and ``rows[label]["refined"]``);
    every unit with more than one measured point gets its curve redrawn from ``raw[key]`` through
    them (``gain_curve``). Returns (curves, number of new measurements)."""
    new = 0
    for key, label, unit, k, limit in units:
        if k is None or k >= limit or k in points.get(key, {}):
            continue
        points.setdefault(key, {})[k] = float(measure(unit, k))
        rows.setdefault(label, {}).setdefault("refined", {})[str(k)] = round(points[key][k], 6)
        new += 1
    out = dict(curves)
    for key, *_ in units:
        if len(points.get(key, {})) > 1:
            out[key] = gain_curve(raw[key], points[key])
    return out, new


def by_energy(groups, lams, channel_multiple, cost, targets, details):
    """One global energy threshold (the paper's recipe), searched by bisection: (ks, energy)."""
    cums = {g.index: np.cumsum(lams[g.index]) for g in groups}
    cands = np.unique(np.concatenate([np.clip(c, 0, 1) for c in cums.values()] + [np.array([0.0, 1.0])]))

    def ks_at(e):
        return {g.index: round_up(g.size if e >= 1.0 else
                                  min(g.size, np.searchsorted(cums[g.index], e - 1e-12) + 1),
                                  g.size, step_of(g, channel_multiple)) for g in groups}

    def fits(ks):
        c = cost(ks)
        return all(c[m] <= target for m, target in targets.items())

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
                             step_of(groups_by[gi], channel_multiple))
                if k_hi[gi] > k_lo[gi] else k_lo[gi] for gi in k_lo}

    t_lo, t_hi = 0.0, 1.0
    for _ in range(8):
        t = 0.5 * (t_lo + t_hi)
        if fits(ks_t(t)):
            t_lo = t
        else:
            t_hi = t
    return ks_t(t_lo), float(cands[lo])


def overshoot_note(real, goals, multiple) -> dict:
    """{"note": ...} when whole steps of ``multiple`` channels left the model well below a goal (a
    small group, 10 or 16 channels, can only go to 8: one step is a large share of a small net)."""
    over = [f"{m} {real[m] / max(goal.final / goal.fraction, 1e-12):.3f} of the original for a goal of "
            f"{goal.limit / max(goal.final / goal.fraction, 1e-12):.3f}"
            for m, goal in goals.items() if real.get(m) is not None and goal.overshot(real[m])]
    if not over:
        return {}
    return {"note": f"channels go in steps of pfa.channel_multiple={multiple}: the smallest allocation meeting "
                    f"the goal leaves {'; '.join(over)} (pfa.channel_multiple=1 allows finer steps)"}


# ----------------------------------------------------------------------------- reach
def cost_table(model, shapes):
    """{"total": {metric: value or None}, "nodes": {metric: {node: value}}}: params, and FLOPs per
    sample averaged over ``shapes`` (a dict of input shapes, a list of signatures, or None)."""
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
