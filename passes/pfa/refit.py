"""pfa, refitting: every weight layer that reads a pruned tensor is refit, level by level on the
pruned network's own inputs x̃ (``refit.refit_levels``), to the reference network's pre-activation y:

    W', b' = argmin ‖X̃ W' + b' − Y‖² + α‖W' − W0‖²

(toward the layer's sliced weights W0 with ``prior``, else toward zero; ``lstsq.ridge_solve``), α
relative to the mean diagonal of Cov(x̃) and chosen per layer on held-out calibration batches
(``stats.SplitStats``, ``lstsq.choose_ridge``). A layer whose output goes only into a residual Add is
fit to what it must add to the pruned skip tensor to give the reference sum (``stats.ResidualStats``,
``edits.residual_target``); a MatMul's bias goes into its bias Add (``WeightLayer.add_bias``).

The consumers' outputs still differ from the reference network's, and so do the inputs of the
layers they feed: with ``refit_depth`` d > 0 the weight layers within d weight layers downstream of
the consumers are refit the same way (``edits.downstream_layers``), each absorbing what it can of
the error that reaches it (their ridge, toward their own weights, is chosen on held-out batches
like the consumers', so a refit that does not generalise leaves a layer near its weights)."""

from __future__ import annotations

from dataclasses import fields

from ...graph import import_graph, node_by_name
from ...layers import WeightLayer
from ...lstsq import RIDGES, choose_ridge, fit_error, ridge_solve
from ...refit import refit_levels
from ...stats import CrossMoments, LayerStats, ResidualStats, SplitStats
from .edits import downstream_layers, residual_target
from .statistics import positions_for


def sequential_refit(pruned, an, keep, consumers, cfg, ctx):
    """Refit ``consumers`` of the pruned channels of ``pruned`` (``keep``: {group: kept channels} of the
    analysis ``an``). Returns (model, {layer: relative error}, {layer: chosen ridge})."""
    errors, ridges, residual = {}, {}, set()
    if cfg.refit_depth > 0:   # the layers the consumers feed, toward the reference network's output too
        consumers = set(consumers) | set(downstream_layers(import_graph(pruned), consumers, cfg.refit_depth))
        consumers -= getattr(ctx, "frozen", frozenset())   # the nodes the user keeps as they are
    batches = ctx.calibration_batches()   # one batch (a few samples): SplitStats splits its samples

    def requests(name, graph):
        layer = WeightLayer(node_by_name(graph, name), graph)
        req = layer.stats_request(name, positions=positions_for(layer, cfg, ctx))
        res = residual_target(layer) if cfg.residual_targets else None
        if res is not None:
            inner = {f.name: getattr(req, f.name) for f in fields(LayerStats)}
            inner["y_tensor"] = res[0]
            req = ResidualStats(**inner, skip=res[1], mask=an.output_mask(name, keep), shift=res[2])
            residual.add(name)
        return [SplitStats(req, batches)]

    def solve(name, stats, graph, level):
        cm_a, cm_b = stats[name]
        mask = an.output_mask(name, keep)
        if mask is not None and not mask.all() and name not in residual:
            cm_a, cm_b = cm_a.outputs(mask), cm_b.outputs(mask)
        w0 = WeightLayer(node_by_name(graph, name), graph).matrix() if cfg.prior else None
        ridge = cfg.ridge
        if ridge < 0:  # pick the ridge that generalises best to the held-out batches
            ridge = RIDGES[2]
            if cm_b.n > 0 and cm_a.n > 0:
                ridge = choose_ridge(cm_a, cm_b, w0)
            ridges[name] = ridge
        cm = CrossMoments.pooled([cm_a, cm_b])
        ctx.note_rows(name, cm.n, cm.xy.shape[0])
        w, b = ridge_solve(cm, ridge, w0=w0)
        errors[name] = fit_error(cm, w, b)
        return w, b

    def write(name, fit, graph, level):
        layer = WeightLayer(node_by_name(graph, name), graph)
        w, b = fit
        if layer.op == "MatMul":   # b is what the MatMul's output lacks: it adds to its bias Add
            layer.write(w)
            layer.add_bias(b)
        else:
            layer.write(w, b)

    model = refit_levels(ctx, pruned, consumers, solve, write, requests, desc="pfa refit", reimport=True)
    return model, errors, ridges
