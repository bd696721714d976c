"""The size budget (``--target-size``): one (d, K) setting per layer, or dense.

Each layer gets candidate settings s with their relative output error e(s) (measured with a quick
quantization on the reference statistics) and serialized bytes b(s); a Lagrangian relaxation
picks per layer argmin_s e(s) + λ·b(s), bisecting λ until the model's bytes meet the goal.
"""

from __future__ import annotations

import zlib
from dataclasses import replace

import numpy as np

from ...lstsq import deterministic, weighted_error
from .layer import candidates
from .quantize import quantize
from .sizes import dense_bytes, setting_bytes
from .target import gather, layer_problem


def quick_config(cfg):
    """The config of the search's quick quantizations: few rounds, targets from the reference."""
    return replace(cfg, iters=min(cfg.iters, 2), kmeans_iters=min(cfg.kmeans_iters, 3),
                   refine=min(cfg.refine, 2), sequential=False)


def size_search(ctx, model, layers: dict, cfg, goal):
    """Per layer (d, K) or None (dense) minimising Σ relative output error subject to the
    serialized size meeting ``goal`` (a ``budget.Goal`` on bytes); ``layers``: {name: Layer}.
    Returns (choice, the search's report)."""
    quick = quick_config(cfg)
    aware = [l for l in layers.values() if l.aware and (cfg.aware or cfg.bias_correct)]
    stats = gather(ctx, aware, quick, ctx.reference) if aware else {}
    options = {}
    bar = ctx.bar(total=len(layers), desc="pq size search")
    for name, layer in sorted(layers.items()):
        bar.update(0, postfix=name)
        opts = [(None, 0.0, dense_bytes(layer))]
        t, h, _ = layer_problem(layer, stats.get(name), quick)  # the same for every (d, K)
        for d, k in candidates(layer, cfg):
            rng = np.random.default_rng([ctx.seed, zlib.crc32(name.encode())])
            with ctx.timed("search"), deterministic():
                _, _, t_hat = quantize(t, d, k, h if cfg.aware else None, quick, rng, cfg.dtype)
            # k, not len(cb): the final quantization may keep more centroids than this quick one
            opts.append(((d, k), weighted_error(t, t_hat, h), setting_bytes(layer, d, k, cfg)))
        options[name] = opts
        bar.update(1)
    bar.close()
    fixed = ctx.cost(model)["bytes"] - sum(o[0][2] for o in options.values())
    choice, size = lagrangian(options, fixed, goal)
    report = {"goal_bytes": int(getattr(goal, "limit", goal)), "estimated_bytes": int(size),
              "choice": {n: (list(c[0]) if c[0] else "dense") for n, c in choice.items()},
              "estimated_rel_error": {n: round(c[1], 6) for n, c in choice.items()}}
    return {n: c[0] for n, c in choice.items()}, report


def lagrangian(options: dict, fixed: int, goal):
    """({name: (setting, error, bytes)}, total bytes): per name the option minimising
    error + λ·bytes (ties: fewer bytes), λ the smallest found by bisection whose total
    ``fixed`` + Σ bytes meets ``goal`` (the largest λ tried when none does). ``goal``: a
    ``budget.Goal`` (its ``met`` decides) or a plain byte count."""
    met = goal.met if hasattr(goal, "met") else (lambda size: size <= goal)

    def pick(lam):
        choice = {n: min(o, key=lambda c: (c[1] + lam * c[2], c[2])) for n, o in options.items()}
        return choice, fixed + sum(c[2] for c in choice.values())

    lo, hi = 0.0, 1.0
    choice, size = pick(hi)
    while not met(size) and hi < 1e12:
        hi *= 10
        choice, size = pick(hi)
    if met(size):
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            c, sz = pick(mid)
            if met(sz):
                hi, choice, size = mid, c, sz
            else:
                lo = mid
    return choice, size
