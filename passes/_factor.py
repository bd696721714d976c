"""Shared engine of the factorizing passes (basisconv, lowrank): whitened SVD, cross-layer rank
allocation, sequential refit.

A weight layer computes y = x W + b (x a feature row: an im2col patch row for a Conv, an input
row for Gemm/MatMul; W d_in × d_out). A rank-r factorization W ≈ A B (A d_in × r, B r × d_out)
becomes two layers x → z = x A → y = z B + b.

Whitened (data-aware) SVD: the output error E‖x(W − Ŵ)‖² = ‖Lᵀ(W − Ŵ)‖²_F with L Lᵀ = Σ + εI
(Σ the input covariance, Cholesky). SVD Lᵀ W = U S Vᵀ; the best rank r is A = L⁻ᵀ U_r,
B = S_r V_rᵀ, and the relative output error is Σ_{i>r} s_i² / Σ s_i² (Eckart–Young on the
whitened matrix; the data-aware truncation of Zhang et al. 2015 "Accelerating very deep
convolutional networks", used here for the BasisConv basis and for low-rank Gemm/MatMul).
Without data (whiten=false) it is the plain SVD of W, the truncated eigen-decomposition of the
filters of the BasisConv paper.

Refit: with A fixed, B and b are refit by ridge least squares so that z̃ B + b, z̃ = x̃ A computed
from the *rewritten* network's inputs x̃, reproduces the *reference* layer output y. The moments
of z̃ follow from those of x̃ (Cov z̃ = Aᵀ Cov x̃ A, Cov(z̃, y) = Aᵀ Cov(x̃, y)), so one calibration
run per level of layers gives both the whitening and the refit (sequential reconstruction).

Rank allocation for a budget: per layer the candidate ranks give (cost saved, relative error)
points; the lower convex hulls of all layers are merged by error per unit of cost saved, and
segments are taken in that order until the saving is reached (a Lagrangian allocation), then
ranks are raised back where the budget allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
import scipy.linalg

from ..graph import concrete_input_shapes, import_graph, infer_shapes, node_by_name
from ..layers import WeightLayer, per_column_bias
from ..lstsq import ridge_from_moments as ridge
from ..lstsq import RIDGES, relative_alpha, ridge_errors, ridge_solve
from ..parallel import ordered_map
from ..refit import Again, refit_levels
from ..registry import Pass, PassReport, Plan, Requires, Skip
from ..stats import CrossMoments, PooledStats, SplitStats


@dataclass
class FactorConfig:
    """Options basisconv and lowrank share; each adds its rank-rounding option."""

    energy: float = 0.95          # per-layer whitened singular-value energy kept (no budget given)
    whiten: bool = True           # factor whitened by the input covariance; false: plain SVD of W
    refit: bool = True            # refit the second factor and bias on calibration outputs
    alloc: str = "auto"           # rank allocation errors: "data", "weights" or "auto" (= data if whiten)
    eps: float = 1e-3             # diagonal loading of the covariance, relative to its mean diagonal
    ridge: float = 1e-4           # ridge of the refit, relative; < 0: chosen per layer on held-out rows
                                  # (``held_out_ridge``), pulled toward the truncated factor
    positions: int = 32           # conv: sampled output positions per image for the statistics
    force: bool = False           # rewrite even where it does not save (tests, inspection)

    def __post_init__(self):
        if not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        for name in ("channel_multiple", "rank_multiple"):
            if getattr(self, name, 1) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.alloc not in ("auto", "data", "weights"):
            raise ValueError(f"alloc must be auto, data or weights, got '{self.alloc}'")
        if self.eps < 0:
            raise ValueError("eps must be >= 0")
        if self.positions < 1:
            raise ValueError("positions must be >= 1")


# ----------------------------------------------------------------------------- linear algebra
def cholesky_loaded(cov: np.ndarray, eps: float) -> np.ndarray:
    """Lower L with L Lᵀ = cov + λI, λ = eps × mean diagonal (raised until it factors)."""
    d = cov.shape[0]
    scale = relative_alpha(cov, 1.0)
    lam = eps * scale
    sym = (cov + cov.T) / 2
    for _ in range(8):
        try:
            return scipy.linalg.cholesky(sym + lam * np.eye(d), lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            lam = max(lam * 10, 1e-8 * scale)
    w, v = np.linalg.eigh(sym)
    return np.linalg.cholesky(v @ np.diag(np.clip(w, 1e-6 * scale, None)) @ v.T)


def factor(w: np.ndarray, cov: np.ndarray | None = None, eps: float = 1e-3):
    """Full factorization W = A B with the columns of A ordered by output energy.

    Returns A (d_in × k), B (k × d_out), s (k) with k = min(d_in, d_out); truncate to the first
    r columns/rows. ``cov`` None: plain SVD.

    Computed without the Cholesky factor: with Lᵀ W = U S Vᵀ, V and S² are the eigenvectors and
    eigenvalues of the output covariance Wᵀ (Σ + εI) W, and A = L⁻ᵀ U_r = W V_r S_r⁻¹, so the
    rank-r layer is W V_r V_rᵀ (projection of the outputs on their top principal subspace)."""
    d_in, d_out = w.shape
    k = min(d_in, d_out)
    if d_in < d_out:  # thin side is the input: SVD of Lᵀ W (d_in × d_out) is the cheaper route
        if cov is None:
            u, s, vt = np.linalg.svd(w, full_matrices=False)
            return u, s[:, None] * vt, s
        L = cholesky_loaded(cov, eps)
        u, s, vt = np.linalg.svd(L.T @ w, full_matrices=False)
        a = scipy.linalg.solve_triangular(L.T, u, lower=False, check_finite=False)
        return a, s[:, None] * vt, s
    ev, v = _output_basis(_output_gram(w, cov, eps), k)
    s = np.sqrt(ev)
    floor = max(float(s[0]) if len(s) else 0.0, 1e-30) * 1e-12
    safe = np.maximum(s, floor)
    a = (w @ v) / safe
    b = safe[:, None] * v.T
    return a, b, s


def _output_gram(w, cov, eps):
    """Wᵀ (Σ + εI) W (Wᵀ W without ``cov``), symmetrised: ``factor``'s eigenproblem when d_in ≥ d_out."""
    if cov is None:
        gram = w.T @ w
    else:
        lam = relative_alpha(cov, eps)
        gram = w.T @ ((cov + cov.T) / 2) @ w + lam * (w.T @ w)
    return (gram + gram.T) / 2


def _output_basis(gram, k):
    """The k largest eigenvalues (≥ 0, descending) of the symmetric ``gram`` and their eigenvectors."""
    try:
        ev, v = scipy.linalg.eigh(gram, driver="evr", check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        ev, v = np.linalg.eigh(gram)
    order = np.argsort(ev)[::-1][:k]
    return np.clip(ev[order], 0.0, None), v[:, order]


def singular_values(w: np.ndarray, cov: np.ndarray | None = None, eps: float = 1e-3) -> np.ndarray:
    """The s of ``factor(w, cov, eps)`` without the factors (no singular or eigen vectors: a
    fraction of the cost), for the rank allocation."""
    d_in, d_out = w.shape
    if d_in < d_out:
        m = w if cov is None else cholesky_loaded(cov, eps).T @ w
        return np.linalg.svd(m, compute_uv=False)
    gram = _output_gram(w, cov, eps)
    try:
        ev = scipy.linalg.eigh(gram, driver="evr", eigvals_only=True, check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        ev = np.linalg.eigvalsh(gram)
    return np.sqrt(np.clip(np.sort(ev)[::-1][: min(d_in, d_out)], 0.0, None))


def gemm_bias_problem(node) -> str | None:
    """Why a Gemm's bias C is not one constant value per output (None when it is): a bias that
    differs between rows (shape M × N) has no place in a rewritten layer."""
    if node.op != "Gemm" or len(node.inputs) < 3:
        return None
    if not isinstance(node.inputs[2], gs.Constant):
        return "Gemm bias is not a constant"
    return per_column_bias(WeightLayer(node))


def round_rank(r: int, multiple: int) -> int:
    multiple = max(int(multiple), 1)
    return int(-(-max(r, 1) // multiple) * multiple)


# ----------------------------------------------------------------------------- layers
@dataclass
class FactorLayer:
    """One factorizable layer, split into ``groups`` independent blocks of W."""

    node: str
    x: str                      # input tensor (same name in the rewritten model)
    y: str                      # reference tensor to reproduce (the product before any bias Add)
    ws: list                    # per group: W_g (d_in_g × d_out_g), float64
    bias: np.ndarray | None     # (d_out,) or None
    fit_bias: bool              # the rewritten layer has a bias (Conv/Gemm, or MatMul + Add)
    request: object             # callable(key, x, y) -> LayerStats (features in W's row order)
    cost0: dict                 # {"flops", "params"} of the layer as it is
    cost_at: object             # callable(r) -> {"flops", "params"} of the factorized layer
    max_rank: int               # exact rank (min over groups of min(d_in_g, d_out_g))
    feature_map: object = None  # optional callable(cov, mean) -> (cov, mean) before factorizing
    extra: dict = field(default_factory=dict)
    readers: list = field(default_factory=list)  # a shared weight: [(node, x, y)] of every reader

    @property
    def sources(self):
        """[(node, x, y)] whose statistics pool into this layer's (one, unless the weight is shared)."""
        return self.readers or [(self.node, self.x, self.y)]

    @property
    def groups(self):
        return len(self.ws)


def candidate_ranks(layer: FactorLayer, multiple: int, metrics=("flops", "params"), force=False):
    """Ranks (multiples of ``multiple``, below the exact rank) that make the layer cheaper in
    every metric (``force``: all of them)."""
    out = []
    r = max(int(multiple), 1)
    while r < layer.max_rank:
        c = layer.cost_at(r)
        if force or all(c[m] < layer.cost0[m] for m in metrics):
            out.append(r)
        r += max(int(multiple), 1)
    return out


def pays(layer: FactorLayer, r: int, metrics=("flops", "params")) -> bool:
    c = layer.cost_at(r)
    return all(c[m] < layer.cost0[m] for m in metrics)


def energy_curve(layer: FactorLayer, covs=None, eps=1e-3):
    """Relative output error after truncation to rank r, for r = 0..max_rank (array)."""
    tails = np.zeros(layer.max_rank + 1)
    total = 0.0
    for g, w in enumerate(layer.ws):
        s = singular_values(w, None if covs is None else covs[g], eps)
        e = s ** 2
        total += e.sum()
        tail = np.concatenate([np.cumsum(e[::-1])[::-1], [0.0]])  # tail[r] = Σ_{i≥r} e_i
        tails += tail[: layer.max_rank + 1]     # len(e) ≥ max_rank: the smallest group's rank
    return tails / max(total, 1e-30)


def rank_by_energy(curve: np.ndarray, energy: float, multiple: int, max_rank: int) -> int:
    if energy >= 1.0:
        return max_rank
    ok = np.nonzero(curve <= 1.0 - energy + 1e-12)[0]
    r = int(ok[0]) if len(ok) else max_rank
    return min(round_rank(r, multiple), max_rank)


def allocate(options: dict, saving: float):
    """Choose one option per layer so that Σ saved ≥ ``saving`` with little total error.

    options: {layer: [(rank or None, saved, err)]}, the first entry (None, 0, 0) = unchanged.
    Returns ({layer: rank or None}, total saved)."""
    choice = {k: 0 for k in options}
    segments = []
    for k, pts in options.items():
        pts = sorted(range(len(pts)), key=lambda i: (pts[i][1], pts[i][2]))
        hull = [0]
        opts = options[k]
        for i in pts:
            if opts[i][1] <= opts[hull[-1]][1]:
                continue
            while len(hull) >= 2:
                a, b = opts[hull[-2]], opts[hull[-1]]
                c = opts[i]
                # b is above the chord a–c: drop it
                if (b[2] - a[2]) * (c[1] - a[1]) >= (c[2] - a[2]) * (b[1] - a[1]):
                    hull.pop()
                else:
                    break
            hull.append(i)
        for j in range(1, len(hull)):
            a, b = opts[hull[j - 1]], opts[hull[j]]
            segments.append(((b[2] - a[2]) / max(b[1] - a[1], 1e-30), k, hull[j]))
    segments.sort(key=lambda t: t[0])
    saved = 0.0
    for _, k, i in segments:
        if saved >= saving:
            break
        if options[k][i][1] <= options[k][choice[k]][1]:
            continue
        saved += options[k][i][1] - options[k][choice[k]][1]
        choice[k] = i
    # give back: raise ranks where the saving stays reached, best error gain first
    improved = True
    while improved and saved >= saving:
        improved = False
        best = None
        for k, opts in options.items():
            cur = opts[choice[k]]
            for i, o in enumerate(opts):
                if o[2] < cur[2] and saved - (cur[1] - o[1]) >= saving:
                    gain = cur[2] - o[2]
                    if best is None or gain > best[0]:
                        best = (gain, k, i)
        if best is not None:
            _, k, i = best
            saved -= options[k][choice[k]][1] - options[k][i][1]
            choice[k] = i
            improved = True
    return {k: options[k][choice[k]][0] for k in options}, saved


def stream_effects(model, layers, covs):
    """{layer: weight of its relative error} where every layer is part of a residual block, else
    None. A block ends in a MatMul/Gemm whose output, through its bias Add and a constant layer
    scale λ, adds into the residual stream it read (``pfa.edits.block_output``); the block's other
    weight layers (attention projections, an MLP's first layer) are the ones whose outputs reach only
    that layer among the weight layers. An error reaching the residual stream passes on to the
    network's output along the identity path, so a layer's relative output error is weighed by its
    block's contribution to the stream, E_b = Σ_j λ_j² Var(y_j) (y the block's last layer's output;
    from its input covariance ``covs``): with layer scales that grow with depth, a late block's error
    costs more than an early one's of the same relative size, which per-layer relative errors miss."""
    from .pfa.edits import block_output   # the residual-block rule pfa judges its MLP/attention groups by
    graph = import_graph(model)
    nodes = {n.name: n for n in graph.nodes}
    ends, out = {}, {}
    for layer in layers:
        if len(layer.sources) > 1 or layer.node not in nodes:
            return None
        end = _block_end(nodes[layer.node], graph, block_output)
        if end is None or end[0] not in covs:
            return None
        name, scale = end
        if name not in ends:
            w = WeightLayer(nodes[name], graph).matrix()
            var = np.einsum("ij,ik,kj->j", w, covs[name][0], w)   # diag(Wᵀ Σ W)
            ends[name] = float(np.sum(np.clip(var, 0.0, None) * scale ** 2))
        out[layer.node] = ends[name]
    return out


def _block_end(node, graph, block_output, limit: int = 400):
    """(name, layer scale) of the residual block's last layer that ``node``'s output reaches (itself
    when it adds into the stream), or None: its output reaches no such layer, or several weight
    layers (shape computations are not followed)."""
    own = block_output(WeightLayer(node, graph))
    if own is not None:
        return node.name, own[1]
    found, seen, todo = set(), set(), list(node.outputs)
    while todo and len(seen) < limit:
        t = todo.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        for user in t.outputs:
            if user.op == "Shape":
                continue
            if user.op in ("Gemm", "MatMul") and WeightLayer.problem(user) is None:
                found.add(user.name)
                continue
            todo.extend(user.outputs)
    if todo or len(found) != 1:
        return None
    end = next(n for n in graph.nodes if n.name in found)
    res = block_output(WeightLayer(end, graph))
    return None if res is None else (end.name, res[1])


def fine_give_back(layers, choice: dict, saved: float, need: float, metric: str, curves: dict, multiple: int):
    """Ranks move in steps of ``multiple``, and one step of a wide layer can overshoot the goal by
    much (P-Net: 0.769 of the FLOPs for a goal of 0.9): raise the rank of one chosen layer off
    the multiple, to the highest rank that still meets the saving, in the layer where that buys
    the most error. At most one layer ends off the multiple. Returns (choice, saved)."""
    if multiple <= 1 or saved <= need:
        return choice, saved
    best = None
    for l in layers:
        r = choice.get(l.node)
        if r is None:
            continue
        here = float(l.cost0[metric] - l.cost_at(r)[metric])
        for r2 in range(min(r + multiple - 1, l.max_rank - 1), r, -1):
            s2 = float(l.cost0[metric] - l.cost_at(r2)[metric])
            if s2 <= 0 or saved - here + s2 < need:
                continue
            gain = float(curves[l.node][r] - curves[l.node][r2])
            if gain > 0 and (best is None or gain > best[0]):
                best = (gain, l.node, r2, saved - here + s2)
            break
    if best is None:
        return choice, saved
    choice = dict(choice)
    choice[best[1]] = best[2]
    return choice, best[3]


def output_effect(model, covs, means, rewrite, cfg, ctx, folds=None):
    """measure(l, r): the model's output error (``validate.OutputProbe``) with only layer ``l``
    factorized at rank ``r``: its whitened truncation with the mean-corrected bias, no refit.

    Held out, as pfa's probes (``pfa.pass_.probe_folds``): the truncation is taken from the input
    moments of one half of the calibration units (``plan_moments`` on that half) and its error
    measured on the other half, both ways, the mean of the two. Measured on the rows it was fitted
    on, a layer whose input moments have fewer rows than columns (a late Conv over a 1-position
    map, a classifier's dense layer: 48 samples, 288 columns) is truncated exactly at any rank
    above its row count and looks free (error 0, gain 0); on new rows it is not. ``folds``:
    ``fold_moments`` of (at least) the measured layers; None (fewer than
    ``pfa.pass_.MIN_FOLD_UNITS`` units a side): fitted and measured on the same data (``covs``,
    ``means``)."""
    from ..graph import export_model
    from ..validate import OutputProbe
    if folds is None:
        sides = [(covs, means, OutputProbe(ctx, model))]
    else:
        sides = [(c, mu, OutputProbe(held, model)) for c, mu, held in folds]

    def truncated(l, r, covs, means):
        graph = import_graph(model)
        As, Bs, bs = [], [], []
        for g, w in enumerate(l.ws):
            a, b_mat, _ = factor(w, covs[l.node][g], cfg.eps)
            a, b_mat = a[:, :r], b_mat[:r]
            so = l.extra["out_slices"][g] if "out_slices" in l.extra else slice(None)
            corr = means[l.node][g] @ (w - a @ b_mat) if l.fit_bias else None
            b0 = l.bias[so] if l.bias is not None else None
            bs.append(None if corr is None else (corr if b0 is None else b0 + corr))
            As.append(a)
            Bs.append(b_mat)
        bias = None if all(b is None for b in bs) else np.concatenate(
            [b if b is not None else np.zeros(Bs[i].shape[1]) for i, b in enumerate(bs)])
        rewrite(graph, l, r, As, Bs, bias)
        return export_model(graph, like=model)

    def measure(l, r):
        return float(np.mean([probe.error(truncated(l, r, c, mu)) for c, mu, probe in sides]))
    return measure


def fold_moments(ctx, layers, pass_name):
    """[(covs, means, held-out context)] per fold of ``pfa.pass_.probe_folds``: the planning moments
    (``plan_moments``) of ``layers`` on one half of the calibration units, and the context of the
    other half; None where the data has too few units to split."""
    from .pfa.pass_ import probe_folds
    folds = probe_folds(ctx)
    if folds[0][0] is ctx:
        return None
    out = []
    for fit, held in folds:
        c, mu = plan_moments(fit, list(layers), f"{pass_name}: held-out statistics")
        ctx.calibration_runs += fit.calibration_runs
        ctx.calibration_seconds += fit.calibration_seconds
        out.append((c, mu, held))
    return out


def held_out_curve(layer: FactorLayer, halves, eps=1e-3):
    """``energy_curve`` held out: the relative output error on one half's input moments of the
    truncation taken from the other half's (``halves``: the two halves' {layer: [covariance per
    group]}), both ways, for r = 0..max_rank: Σ_g,folds ‖W − Ŵ_r‖²_Σheld / Σ_g,folds ‖W‖²_Σheld
    (‖·‖_Σ the output norm under Σ, Ŵ_r the rank-r truncation of ``factor(W, Σ_fit)``). With
    d_in ≥ d_out, Ŵ_r = W V_r V_rᵀ (``factor``) and the error is tr G − Σ_{i<r} v_iᵀ G v_i,
    G = Wᵀ Σheld W: one d_out × d_out product per half; else from the factors' k × k products."""
    tails = np.zeros(layer.max_rank + 1)
    total = 0.0
    for g, w in enumerate(layer.ws):
        covs = [(h[layer.node][g] + h[layer.node][g].T) / 2 for h in halves]
        if w.shape[0] >= w.shape[1]:
            grams = [w.T @ c @ w for c in covs]
            wtw = w.T @ w
            for fit, held in ((0, 1), (1, 0)):
                _, v = _output_basis(grams[fit] + relative_alpha(covs[fit], eps) * wtw, w.shape[1])
                kept = np.sum(v * (grams[held] @ v), axis=0)   # vᵢᵀ G vᵢ per column: one GEMM (an einsum of three operands loops in C)
                err = np.concatenate([[0.0], np.cumsum(kept)])
                tails += np.clip(np.trace(grams[held]) - err[: layer.max_rank + 1], 0.0, None)
                total += float(np.trace(grams[held]))
            continue
        for fit, held in ((0, 1), (1, 0)):
            a, b, _ = factor(w, covs[fit], eps)
            ca = covs[held] @ a
            tot = float(np.sum(w * (covs[held] @ w)))
            cross = np.sum((ca.T @ w) * b, axis=1)                  # ⟨a_i b_i, W⟩_Σ
            h = (a.T @ ca) * (b @ b.T)                               # ⟨a_i b_i, a_j b_j⟩_Σ
            quad = 2 * np.tril(h, -1).sum(axis=1) + np.diag(h)
            err = tot - 2 * np.concatenate([[0.0], np.cumsum(cross)]) + np.concatenate([[0.0], np.cumsum(quad)])
            tails += np.clip(err[: layer.max_rank + 1], 0.0, None)
            total += tot
    return tails / max(total, 1e-30)


def short_of_rows(layers, rows):
    """The layers whose planning moments have fewer rows (``rows``: {layer: n}) than input columns
    in a group: their whitened truncation is exact on those rows at any rank above the row count."""
    return [l for l in layers if l.node in rows and rows[l.node] < max(w.shape[0] for w in l.ws)]


def plan_moments(ctx, layers, desc, rows=None):
    """({layer: [input covariance per group]}, {layer: [input mean per group]}) of ``layers`` on
    ``ctx``'s reference model and data (one run); means only where the layer has no feature map.
    ``rows``: a dict that receives {layer: number of rows of its moments}."""
    covs, means = {}, {}
    reqs = [r for layer in layers for r in layer_requests(layer, "plan:", with_y=False)]
    stats = ctx.collect(reqs, model_x=ctx.reference, desc=desc)
    for layer in layers:
        cm = stats["plan:" + layer.node]
        if rows is not None:
            rows[layer.node] = int(cm.n)
        moments = [_group_cov(layer, cm, g, layer.fit_bias) for g in range(layer.groups)]
        covs[layer.node] = [m[0] for m in moments]
        if layer.feature_map is None:
            means[layer.node] = [m[2] for m in moments]
    return covs, means


def measured_curves(layers, curves, cands, measure):
    """The error curves rescaled by each layer's measured effect on the model's outputs:
    curve'_l = γ_l curve_l, γ_l = measure(l, r̂) (``output_effect``) / curve_l(r̂); r̂ is the
    candidate rank nearest half the exact rank. The truncation error of a layer's own output says
    little of how far it travels (an early full-resolution layer's error grows through the net, a
    late one's is averaged out; the task metrics read the worst sample): measured, the budget
    goes to the layers the outputs feel least. A layer whose probe the curve calls free gets the
    median gain. Returns (curves, {layer: {"probe_rank", "output_error", "gain"}}, {layer: {r̂: error}})."""
    gains, probes = {}, {}
    for l in layers:
        c = cands.get(l.node) or []
        if not c:
            continue
        r = min(c, key=lambda x: (abs(x - l.max_rank / 2), x))
        err = measure(l, r)
        probes[l.node] = (r, err)
        if curves[l.node][r] > 1e-12:
            gains[l.node] = err / float(curves[l.node][r])
    typical = float(np.median(list(gains.values()))) if gains else 1.0
    out = {n: np.asarray(c, dtype=np.float64) * gains.get(n, typical) for n, c in curves.items()}
    return out, {n: {"probe_rank": r, "output_error": round(e, 6), "gain": round(gains.get(n, typical), 4)}
                 for n, (r, e) in probes.items()}, {n: {r: e} for n, (r, e) in probes.items()}


REFINE_ROUNDS = 4   # rounds of measurements at the ranks an allocation chose (the measured allocation)


def refined_curves(layers, raw, curves, points, ranks, measure, rows):
    """The measured ``curves``, sharpened where the allocation ``ranks`` went: each layer at a rank
    not measured yet is measured there (recorded in ``points``: {layer: {rank: output error}}) and
    its curve redrawn from its own truncation curve ``raw`` through its measured points
    (``pfa.allocation.remeasure``, the step pfa's refined allocation takes too; ``gain_curve``: the
    gain interpolated between them). One probe at half the rank misjudges other cuts (digits
    cnn_plain at FLOPs 0.4: late layers sent to rank 8); measured where the allocation goes, a
    cut's effect is read, not extrapolated. Returns (curves, new measurements)."""
    from .pfa.allocation import remeasure
    return remeasure([(l.node, l.node, l, ranks.get(l.node), l.max_rank) for l in layers], raw, curves, points,
                     measure, rows)


def allocate_ranks(layers, curves, cands, effect, goal_metrics, ctx, model, cfg, multiple):
    """({layer: rank}, {metric: budget figures}): the ranks meeting every goal of ``ctx`` with the
    least total error on ``curves`` (``allocate``, then ``fine_give_back`` where enabled)."""
    ranks, budget = {}, {}
    current = ctx.cost(model)
    for m in goal_metrics:
        goal = ctx.goals[m]
        need = current[m] - goal.limit
        options = {}
        for l in layers:
            opts = [(None, 0.0, 0.0)]
            for r in cands[l.node]:
                err = float(curves[l.node][r]) * (effect[l.node] if effect else 1.0)
                opts.append((r, float(l.cost0[m] - l.cost_at(r)[m]), err))
            options[l.node] = opts
        possible = sum(max(o[1] for o in opts) for opts in options.values())
        if goal.met(current[m]):
            choice, saved = {k: None for k in options}, 0.0
        else:
            choice, saved = allocate(options, need)
            if getattr(cfg, "off_multiple", False):
                choice, saved = fine_give_back(layers, choice, saved, need, m, curves, multiple)
        budget[m] = {"goal": round(float(goal.limit)), "needed_saving": round(float(need)),
                     "planned_saving": round(float(saved)), "max_saving": round(float(possible))}
        if need > 0 and goal.overshot(current[m] - saved) and need <= possible:
            budget[m]["note"] = (f"ranks move in steps of {multiple}: the closest allocation found is "
                                 f"{(saved - need) / goal.limit:.1%} below the goal")
        if need > possible:
            budget[m]["why_not"] = (f"factorizing every eligible layer at the lowest rank multiple of "
                                    f"{multiple} saves at most {possible:.0f} {m}, {need:.0f} needed")
        for k, r in choice.items():
            if r is None:
                continue
            ranks[k] = r if ranks.get(k) is None else min(ranks[k], r)
    return ranks, budget


# ----------------------------------------------------------------------------- shapes
def shape_info(model, sample_shapes):
    return infer_shapes(model, concrete_input_shapes(model, sample_shapes, batch=1))


def non_finite_skips(layers):
    """Layers whose weights hold NaN or Inf, removed from ``layers``: [(node, reason)]."""
    out = []
    for layer in list(layers):
        if not all(np.isfinite(w).all() for w in layer.ws) or \
                (layer.bias is not None and not np.isfinite(layer.bias).all()):
            layers.remove(layer)
            out.extend((n, "weights or bias contain NaN or Inf values: not factorized") for n, _, _ in layer.sources)
    return out


# ----------------------------------------------------------------------------- the driver
def layer_requests(layer: FactorLayer, prefix: str, with_y: bool = True) -> list:
    """The statistics request of a layer, under the key ``prefix + layer.node``: its own
    LayerStats, or for a weight several nodes read one ``stats.PooledStats`` over the readers
    (one accumulator, each reader's means kept under ``prefix + reader``)."""
    parts = [layer.request(prefix + rn, x, y if with_y else None) for rn, x, y in layer.sources]
    if len(parts) == 1:   # the layer's own node: rn == layer.node
        return parts
    return [PooledStats(prefix + layer.node, parts)]


def _group_cov(layer: FactorLayer, cm, g: int, fit_bias: bool):
    cxx, cxy, mx, my = cm.moments(centered=fit_bias)
    si, so = layer.extra["in_slices"][g], layer.extra["out_slices"][g]
    cxy_g = cxy[si, so] if cxy.shape[1] else cxy[si]
    my_g = my[so] if my.shape[0] else my
    cxx_g, mx_g = cxx[si, si], mx[si]
    if layer.feature_map is not None:
        cxx_g, mx_g = layer.feature_map(cxx_g, mx_g)
    return cxx_g, cxy_g, mx_g, my_g


def _projected(cm, a, si, so) -> CrossMoments:
    """The moments of (z, y[so]) with z = x[si] A, from those of (x, y) (``stats.CrossMoments``)."""
    out = CrossMoments(a.shape[1], len(cm.sum_y[so]))
    out.x.n, out.x.sum, out.x.outer = cm.x.n, cm.x.sum[si] @ a, a.T @ cm.x.outer[si, si] @ a
    out.sum_y, out.xy, out.yy = cm.sum_y[so], a.T @ cm.xy[si, so], cm.yy[so]
    return out


HELD_OUT_MARGIN = 0.01   # a larger ridge must lower the held-out error by more than this share


def held_out_ridge(halves, a, b0, si, so) -> float:
    """The relative ridge of the second factor's refit (toward ``b0``, the truncated factor): the
    smallest of ``lstsq.RIDGES`` whose fit on one half of the rows has a held-out error on the other
    half (``halves``: the two ``CrossMoments`` of a ``stats.SplitStats``; ``lstsq.ridge_errors``)
    within ``HELD_OUT_MARGIN`` of the lowest. With few rows per column a refit that fits its rows
    but not new ones is pulled back toward the whitened SVD's own factor; where the ridges do about
    as well (many rows), the refit stays the plain one. The smallest ridge where a half has no rows."""
    cm_a, cm_b = halves
    if cm_a.n == 0 or cm_b.n == 0:
        return float(RIDGES[0])
    errs = ridge_errors(_projected(cm_a, a, si, so), _projected(cm_b, a, si, so), b0)
    if errs is None:
        return float(RIDGES[0])
    best = min(errs)
    return float(next(r for r, e in zip(RIDGES, errs) if e <= best * (1 + HELD_OUT_MARGIN) + 1e-15))


def factorize(pass_name, model, cfg, ctx, layers, skipped, rewrite, multiple, report):
    """Allocate ranks, then rewrite and refit level by level. ``rewrite(graph, layer, r, As, Bs,
    bias)`` edits the graph and returns the name of a node to refit by a full ridge solve on its
    own input patches (or None when the moments refit already did it)."""
    for s in list(skipped) + non_finite_skips(layers):
        report.skip(s[0], s[1])
    layers = ctx.unprotected(layers, lambda l: (rn for rn, _, _ in l.sources), report)   # the accuracy search's
    goal_metrics = [m for m in ("flops", "params") if m in (ctx.goals or {})]
    use_data_alloc = cfg.alloc == "data" or (cfg.alloc == "auto" and cfg.whiten)
    # candidates
    cands = {}
    for layer in list(layers):
        c = candidate_ranks(layer, multiple, force=cfg.force)
        if not c and not cfg.force:
            for rn, _, _ in layer.sources:
                report.skip(rn, f"no rank that is a multiple of {multiple} makes it cheaper "
                                f"(exact rank {layer.max_rank})")
            layers.remove(layer)
            continue
        cands[layer.node] = c
    if not layers:
        return model, {}
    # planning statistics on the reference
    rows = {}
    covs, means = plan_moments(ctx, layers, f"{pass_name}: statistics", rows) if use_data_alloc else ({}, {})
    measuring = bool(goal_metrics) and getattr(cfg, "measured", False) and use_data_alloc and cfg.whiten \
        and not all(ctx.goals[m].met(ctx.cost(model)[m]) for m in goal_metrics)
    probed = [l for l in layers if l.node in means] if measuring else []
    short = short_of_rows(layers, rows)
    held = short + [l for l in probed if l not in short]   # one run per half for both uses
    folds = fold_moments(ctx, held, pass_name) if held else None
    with ctx.timed("fit"):
        curves = dict(zip([l.node for l in layers],   # each layer's decomposition on its own (``parallel``)
                          ordered_map(lambda l: energy_curve(l, covs.get(l.node), cfg.eps), layers)))
        if folds is not None and short:   # short of rows: the in-sample curve calls every rank above the row count free
            halves = [c for c, _, _ in folds]
            for l in short:
                curves[l.node] = np.maximum(curves[l.node], held_out_curve(l, halves, cfg.eps))
            report.details["held_out_curves"] = {l.node: rows[l.node] for l in short}
    effect = None
    if goal_metrics and covs and getattr(cfg, "effect", "layer") == "stream":
        effect = stream_effects(model, layers, covs)
    if measuring:
        with ctx.timed("search"):
            measure = output_effect(model, covs, means, rewrite, cfg, ctx, folds)
            raw = curves
            curves, measured, points = measured_curves(probed, curves, cands, measure)
            for _ in range(REFINE_ROUNDS):   # measure where the allocation goes, and allocate again
                trial, _ = allocate_ranks(layers, curves, cands, effect, goal_metrics, ctx, model, cfg, multiple)
                curves, new = refined_curves(probed, raw, curves, points, trial, measure, measured)
                if not new:
                    break
        report.details["measured"] = measured
    ranks, budget = {}, {}
    if goal_metrics:
        ranks, budget = allocate_ranks(layers, curves, cands, effect, goal_metrics, ctx, model, cfg, multiple)
        for l in layers:
            if l.node not in ranks:
                for rn, _, _ in l.sources:
                    report.skip(rn, "left whole: the budget is met at lower error elsewhere")
    else:
        for l in layers:
            r = rank_by_energy(curves[l.node], cfg.energy, multiple, l.max_rank)
            if cfg.force or pays(l, r):
                ranks[l.node] = r
            else:
                for rn, _, _ in l.sources:
                    report.skip(rn, f"rank {r} for energy {cfg.energy} does not make it cheaper")
    layers = [l for l in layers if l.node in ranks]
    if not layers:
        return model, budget
    by_name = {l.node: l for l in layers}
    bar = ctx.bar(total=len(by_name), desc=pass_name)
    use_data = cfg.whiten or cfg.refit
    chosen = {}   # {layer: [ridge per group]} where the ridge is chosen on held-out rows
    held = cfg.ridge < 0 and cfg.refit
    batches = ctx.calibration_batches() if held else None
    fixed_ridge = cfg.ridge if cfg.ridge >= 0 else RIDGES[0]

    def held_out(layer):
        return held and len(layer.sources) == 1 and layer.fit_bias and layer.feature_map is None

    def requests(n, graph):
        if not use_data:
            return []
        reqs = layer_requests(by_name[n], "lv:")
        return [SplitStats(reqs[0], batches)] if held_out(by_name[n]) else reqs

    def solve(n, stats, graph, level):
        """The rank-r factors of every group and the bias: (As, Bs, bias)."""
        layer, r = by_name[n], ranks[n]
        halves = None
        if use_data:
            cm = stats["lv:" + n]
            if held_out(layer):
                halves, cm = cm, CrossMoments.pooled(cm)
        As, Bs, bs = [], [], []
        for g, w in enumerate(layer.ws):
            if use_data:
                cxx, cxy, mx, my = _group_cov(layer, cm, g, layer.fit_bias)
            a, b_mat, _ = factor(w, cxx if cfg.whiten else None, cfg.eps)   # timed as "fit" by refit_levels
            a, b_mat = a[:, :r], b_mat[:r]
            so = layer.extra["out_slices"][g]
            b_orig = layer.bias[so] if layer.bias is not None else None
            bias = b_orig
            if cfg.refit and layer.feature_map is None:
                czz = a.T @ cxx @ a
                czy = a.T @ cxy
                if halves is not None:
                    r_g = held_out_ridge(halves, a, b_mat, layer.extra["in_slices"][g], layer.extra["out_slices"][g])
                    chosen.setdefault(n, []).append(r_g)
                    b_mat, bias = ridge(czz, czy, mx @ a, my, r_g, layer.fit_bias, w0=b_mat)
                else:
                    b_mat, bias = ridge(czz, czy, mx @ a, my, fixed_ridge, layer.fit_bias)
                if not layer.fit_bias:
                    bias = None
            elif cfg.whiten and layer.fit_bias and layer.feature_map is None:
                corr = mx @ (w - a @ b_mat)
                bias = corr if b_orig is None else b_orig + corr
            As.append(a)
            Bs.append(b_mat)
            bs.append(bias)
        bias = None if all(b is None for b in bs) else np.concatenate(
            [b if b is not None else np.zeros(Bs[i].shape[1]) for i, b in enumerate(bs)])
        if len(layer.sources) > 1 and layer.fit_bias and use_data:
            # one weight, several readers: each reader's own bias absorbs its own mean shift
            w_new = As[0] @ Bs[0]
            means = {rn: cm.part_means("lv:" + rn) for rn, _, _ in layer.sources}
            layer.extra["reader_bias"] = {rn: my - mx @ w_new for rn, (mx, my) in means.items()}
        return As, Bs, bias

    def write(n, factors, graph, level):
        """Rewrite the layer; a second node to refit on its own new inputs comes back as ``Again``."""
        layer, r = by_name[n], ranks[n]
        second = rewrite(graph, layer, r, *factors)
        if len(layer.sources) > 1:
            report.changed.extend(f"{rn} (rank {r} of {layer.max_rank}, weight shared by "
                                  f"{len(layer.sources)} nodes, factorized once)" for rn, _, _ in layer.sources)
        else:
            report.changed.append(f"{n} (rank {r} of {layer.max_rank})")
        report.unit(n, [rn for rn, _, _ in layer.sources], 1.0 - r / max(layer.max_rank, 1))
        bar.update(1, postfix=f"{n}: rank {r}")
        if second is None or not cfg.refit:
            return None
        node = node_by_name(graph, second)
        req = WeightLayer(node, graph).stats_request("nr:" + n, node.inputs[0].name, layer.y, positions=cfg.positions)

        def refit_second(stats, graph):
            cm = stats["nr:" + n]
            ctx.note_rows(second, cm.n, cm.xy.shape[0])
            wmat, b = ridge_solve(cm, fixed_ridge, fit_bias=layer.fit_bias)
            WeightLayer(node_by_name(graph, second), graph).write(wmat, b if layer.fit_bias else None)
        return Again([req], refit_second)

    working = refit_levels(ctx, model, {n: [r[0] for r in l.sources] for n, l in by_name.items()}, solve, write,
                           requests=requests, desc=f"{pass_name}: level")
    bar.close()
    details = {"ranks": {n: ranks[n] for n in by_name}}
    if chosen:
        details["ridges"] = {n: (r[0] if len(set(r)) == 1 else r) for n, r in sorted(chosen.items())}
    if goal_metrics:
        details["allocation_errors"] = "residual stream" if effect else "per layer"
    if budget:
        details["budget"] = budget
    return working, details


def reach_of(model, layers, multiple, shapes):
    """{"acts_on", "floor"} ({metric: fraction of ``model``'s cost}) for ``layers``: the share in
    them, and what is left with each at its smallest candidate rank (None: not countable)."""
    from ..cost import model_cost
    total = model_cost(model, shapes)
    acts, floor = {}, {}
    for m in ("params", "flops"):
        if not total.get(m):
            acts[m] = floor[m] = None
            continue
        share = sum(float(l.cost0[m]) for l in layers)
        saving = 0.0
        for l in layers:
            c = candidate_ranks(l, multiple)
            if c:
                saving += max(float(l.cost0[m] - l.cost_at(c[0])[m]), 0.0)
        acts[m], floor[m] = share / total[m], (total[m] - saving) / total[m]
    return {"acts_on": acts, "floor": floor}


class FactorPass(Pass):
    """What basisconv and lowrank share: find the layers, then factor them (``factorize``).
    A subclass gives ``find_layers(graph, info, cfg)``, ``rewrite(graph, layer, r, As, Bs, bias)``
    and the name of its rank-rounding option."""

    requires = Requires(data=True)
    budgets = ("flops", "params")
    multiple_option = "channel_multiple"

    @staticmethod
    def find_layers(graph, info, cfg):
        raise NotImplementedError

    @staticmethod
    def rewrite(graph, layer, r, As, Bs, bias):
        raise NotImplementedError

    def plan(self, model, cfg):
        layers, skipped = self.find_layers(import_graph(model), shape_info(model, None), cfg)
        multiple = getattr(cfg, self.multiple_option)
        targets, skips = [], [Skip(n, r) for n, r in skipped]
        for l in layers:   # a layer no rank makes smaller is not a target (FLOPs need the data's shapes: not here)
            if cfg.force or candidate_ranks(l, multiple, metrics=("params",)):
                targets.extend(rn for rn, _, _ in l.sources)
            else:
                skips.extend(Skip(rn, f"no rank that is a multiple of {multiple} has fewer params "
                                      f"(exact rank {l.max_rank})") for rn, _, _ in l.sources)
        return Plan(nodes=targets, skipped=skips)

    def reach(self, model, cfg, shapes=None):
        """What this pass alone can do to ``model`` at input ``shapes`` (a dict of input shapes):
        {"acts_on": {metric: share of the model's cost in the layers it can factor}, "floor":
        {metric: the fraction of the cost left with every layer at its lowest paying rank}}."""
        layers, _ = self.find_layers(import_graph(model), shape_info(model, shapes), cfg)
        return reach_of(model, layers, getattr(cfg, self.multiple_option), shapes)

    def apply(self, model, cfg, ctx):
        report = PassReport(self.name)
        graph = import_graph(model)
        layers, skipped = self.find_layers(graph, shape_info(model, ctx.sample_shapes), cfg)
        multiple = getattr(cfg, self.multiple_option)
        if any(m in self.budgets for m in (ctx.goals or {})):
            report.details["reach"] = reach_of(model, layers, multiple, ctx.sample_shapes)
        new, details = factorize(self.name, model, cfg, ctx, layers, skipped, self.rewrite, multiple, report)
        report.details.update(details)
        return new, report
