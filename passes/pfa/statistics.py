"""pfa, what it measures on the unpruned model, in one calibration run:
- per group, the covariance of its channels' responses r ∈ R^n (conv maps max-pooled over space,
  rows of linear outputs), summed over the tensors that show them (``Group.observations``);
- per consumer of a group, its least-squares problem (``elimination.Problem``: Cov(x), Cov(x, y),
  tr Cov(y) and the input columns each channel feeds), for the reconstruction-aware selection and
  the error curves of the budget allocation.

A Conv's rows are sampled output positions, enough of them for a least-squares fit when samples
are few (``stats.positions_for``)."""

from __future__ import annotations

import numpy as np

from ...graph import import_graph
from ...layers import WeightLayer
from ...stats import ResponseStats
from ...stats import positions_for as stats_positions
from .edits import consumer_blocks, refit_consumers
from .elimination import Problem


def positions_for(layer: WeightLayer, cfg, ctx) -> int:
    """Sampled output positions per sample for ``layer``'s statistics (``stats.positions_for``)."""
    if layer.op != "Conv":
        return cfg.positions
    return stats_positions(layer.matrix().shape[0], getattr(ctx.data, "n", 0) or 0, cfg.positions)


def collect_statistics(model, an, groups, cfg, ctx, consumers: bool, rows: dict | None = None):
    """({group index: response covariance}, {group index: [Problem]}) from one calibration run; the
    consumers' problems only when ``consumers`` (every list empty otherwise). ``rows``, a dict, gets
    {group index: the rows of its response statistics} (the fewest of its observations)."""
    reqs, layer = {}, {}
    for g in groups:
        for o in g.observations:
            reqs.setdefault((o.tensor, o.reduce), ResponseStats(o.tensor, o.reduce))
    nodes = {}
    if consumers:
        graph = import_graph(model)
        nodes = {n.name: n for n in graph.nodes}
        for g in groups:
            for c in refit_consumers(nodes, g.consumers):
                if c not in layer:
                    wl = WeightLayer(nodes[c])
                    layer[c] = wl.stats_request("pfa-sel:" + c, positions=positions_for(wl, cfg, ctx))
    accs = ctx.collect(list(reqs.values()) + list(layer.values()), desc="pfa statistics")
    covs = {}
    for g in groups:
        c = np.zeros((g.size, g.size))
        for o in g.observations:
            cov = accs[reqs[(o.tensor, o.reduce)].key].cov
            np.add.at(c, (o.indices[:, None], o.indices[None, :]), cov[np.ix_(o.positions, o.positions)])
        covs[g.index] = c
        if rows is not None:
            rows[g.index] = min(accs[reqs[(o.tensor, o.reduce)].key].n for o in g.observations)
    problems = {g.index: [] for g in groups}
    for c, req in layer.items():
        cm = accs[req.key]
        cxx, cxy, _, my = cm.moments(centered=True)
        var = float(np.sum(cm.yy / max(cm.n, 1) - my ** 2))
        for gi, blocks in consumer_blocks(an, c, nodes[c]).items():
            if gi in problems:
                problems[gi].append(Problem(cxx, cxy, var, blocks, rows=cm.n))
    return covs, problems
