"""pfa, what it measures on the unpruned model, in one calibration run:
- per group, the covariance of its channels' responses r ∈ R^n (conv maps max-pooled over space,
  rows of linear outputs), summed over the tensors that show them (``Group.observations``);
- per consumer of a group, its least-squares problem (``elimination.Problem``: Cov(x), Cov(x, y),
  tr Cov(y) and the input columns each channel feeds), for the reconstruction-aware selection and
  the error curves of the budget allocation.

A Conv's rows are ``positions`` sampled output positions per sample; with the tens of samples
users have, 32 positions give a 3×3 Conv over 64 channels (576 columns) fewer than three rows per
column, and its refit overfits the calibration rows. ``positions_for`` raises the count so that a
layer has at least ``ROWS_PER_COLUMN`` rows per column (at most ``MAX_POSITIONS`` per sample; a map
smaller than that gives all its positions)."""

from __future__ import annotations

import numpy as np

from ...graph import import_graph
from ...layers import WeightLayer
from ...stats import ResponseStats
from .edits import consumer_blocks, refit_consumers
from .elimination import Problem


ROWS_PER_COLUMN = 16
MAX_POSITIONS = 1024


def positions_for(layer: WeightLayer, cfg, ctx) -> int:
    """Sampled output positions per sample for ``layer``'s statistics: ``cfg.positions``, or more
    where the calibration samples are too few for ``ROWS_PER_COLUMN`` rows per input column."""
    if layer.op != "Conv":
        return cfg.positions
    samples = max(int(getattr(ctx.data, "n", 0) or 0), 1)
    cols = int(layer.matrix().shape[0])
    need = -(-ROWS_PER_COLUMN * cols // samples)
    return int(max(cfg.positions, min(need, MAX_POSITIONS)))


def collect_statistics(model, an, groups, cfg, ctx, consumers: bool):
    """({group index: response covariance}, {group index: [Problem]}) from one calibration run; the
    consumers' problems only when ``consumers`` (every list empty otherwise)."""
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
    problems = {g.index: [] for g in groups}
    for c, req in layer.items():
        cm = accs[req.key]
        cxx, cxy, _, my = cm.moments(centered=True)
        var = float(np.sum(cm.yy / max(cm.n, 1) - my ** 2))
        for gi, blocks in consumer_blocks(an, c, nodes[c]).items():
            if gi in problems:
                problems[gi].append(Problem(cxx, cxy, var, blocks, rows=cm.n))
    return covs, problems
