"""pfa, what it measures on the unpruned model, in one calibration run:
- per group, the covariance of its channels' responses r ∈ R^n (conv maps max-pooled over space,
  rows of linear outputs), summed over the tensors that show them (``Group.observations``);
- per consumer of a group, its least-squares problem (``elimination.Problem``: Cov(x), Cov(x, y),
  tr Cov(y) and the input columns each channel feeds), for the reconstruction-aware selection and
  the error curves of the budget allocation. A MatMul/Gemm consumer that adds (through a constant
  layer scale λ) into a residual stream s is judged by its contribution to the block's output:
  y ← λ ⊙ y (Cov(x, y) columns scaled) and the error relative to tr Cov(s) (Kwon et al. 2022
  select heads and FFN units by the block's output error), so that groups of blocks with a small
  layer scale, or a small share of a large residual stream, are not overrated against the others.

A Conv's (and a ConvTranspose's) rows are sampled output positions, enough of them for a least-squares fit when samples
are few (``stats.positions_for``)."""

from __future__ import annotations

import numpy as np

from ...graph import import_graph
from ...layers import WeightLayer
from ...stats import ResponseStats
from ...stats import positions_for as stats_positions
from .edits import block_output, consumer_blocks, refit_consumers, residual_target
from .elimination import Problem


def positions_for(layer: WeightLayer, cfg, ctx) -> int:
    """Sampled output positions per sample for ``layer``'s statistics (``stats.positions_for``)."""
    if layer.op not in ("Conv", "ConvTranspose"):
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
    nodes, streams = {}, {}
    if consumers:
        graph = import_graph(model)
        nodes = {n.name: n for n in graph.nodes}
        for g in groups:
            for c in refit_consumers(nodes, g.consumers):
                if c not in layer:
                    wl = WeightLayer(nodes[c])
                    layer[c] = wl.stats_request("pfa-sel:" + c, positions=positions_for(wl, cfg, ctx))
                    out = block_output(WeightLayer(nodes[c], graph))
                    if out is not None:
                        reqs.setdefault((out[0], "rows"), ResponseStats(out[0], "rows"))
                        streams[c] = ((out[0], "rows"), out[1])
    # the reference tensors the consumers' refit will fit to (``refit.sequential_refit``: a layer's
    # output, or the residual sum it adds to), fetched with this run and kept for the refit where
    # that costs no second run (``PassContext.prefetch_reference``): the refit then runs no
    # reference model of its own. The statistics are those of the run without them (an Add's
    # output blocks no fusion); a residual sum is that of a run that also fetches the layer's
    # own output, which keeps ONNX Runtime from fusing a MatMul with its bias Add: its last bits
    # can differ from those of a run fetching the sum alone.
    model_y = None
    prefetch = getattr(ctx, "prefetch_reference", None)
    if layer and prefetch is not None and model is getattr(ctx, "reference", None):
        order = [n.name for n in graph.nodes if n.name in layer]
        targets = []
        for c in order:
            res = residual_target(WeightLayer(nodes[c], graph)) if cfg.residual_targets else None
            targets.append(res[0] if res is not None else layer[c].y_tensor)
        if prefetch([t for t in targets if t]):
            model_y = model
    # a tensor's rows that a linear consumer reads whole are in that consumer's Cov(x) already
    # (the same rows, summed the same way): one accumulation, not two (a transformer's MLP hidden)
    plain = {r.x_tensor: r.key for r in layer.values()
             if r.kind == "linear" and not r.transpose_x and not r.rows_per_batch}
    shared = {k: plain[k[0]] for k in reqs if k[1] == "rows" and k[0] in plain}
    asked = [r for k, r in reqs.items() if k not in shared] + list(layer.values())
    accs = ctx.collect(asked, model_y=model_y, desc="pfa statistics") if model_y is not None \
        else ctx.collect(asked, desc="pfa statistics")

    def moments(k):
        return accs[shared[k]].x if k in shared else accs[reqs[k].key]

    covs = {}
    for g in groups:
        c = np.zeros((g.size, g.size))
        for o in g.observations:
            cov = moments((o.tensor, o.reduce)).cov
            if _whole(o.indices, g.size) and _whole(o.positions, len(cov)):   # the tensor shows the group as it is
                c += cov   # the same sums as the scatter below, without its gather (0.12 s for 1536 channels)
            else:
                np.add.at(c, (o.indices[:, None], o.indices[None, :]), cov[np.ix_(o.positions, o.positions)])
        covs[g.index] = c
        if rows is not None:
            rows[g.index] = min(moments((o.tensor, o.reduce)).n for o in g.observations)
    problems = {g.index: [] for g in groups}
    for c, req in layer.items():
        cm = accs[req.key]
        cxx, cxy, _, my = cm.moments(centered=True)
        var = float(np.sum(cm.yy / max(cm.n, 1) - my ** 2))
        own = None
        if c in streams:   # judged in the block's output: λ ⊙ y, relative to the residual sum
            k, scale = streams[c]
            cxy = cxy * scale[None, :]
            own = float(np.sum((cm.yy / max(cm.n, 1) - my ** 2) * scale ** 2))
            var = float(np.trace(moments(k).cov))
        for gi, blocks in consumer_blocks(an, c, nodes[c]).items():
            if gi in problems:
                problems[gi].append(Problem(cxx, cxy, var, blocks, rows=cm.n, own=own))
    return covs, problems


def _whole(idx, n: int) -> bool:
    """Whether ``idx`` is 0, 1, …, n − 1 in order."""
    idx = np.asarray(idx)
    return idx.shape == (n,) and bool(np.array_equal(idx, np.arange(n)))
