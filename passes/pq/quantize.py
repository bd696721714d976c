"""One layer's product quantization: T (rows × d_in, row r = the weights of output r) → a
codebook of K centroids of length d and one code per sub-vector.

Steps (activation-aware, with H the damped input covariance, see ``target``):
1. plain k-means on the sub-vectors initialises C (``kmeans.kmeans``);
2. EM under the diagonal blocks H_b of H (``kmeans.aware_em``), on every sub-vector (the EM on a
   sample of whole rows was tried: one LSTM gate matrix of captcha_crnn lost 12x in error with
   another seed, nsfw_resnet50's file grew from 0.253 to 0.361 of the original);
3. assignment block by block with error feedback on the full H (``gptq.gptq_assign``);
4. the codebook refit on the full H with the codes fixed (``gptq.refine_codebook``).
Without H (``pq.aware=false``, or a layer without input statistics) only step 1 runs. A layer with
at most K distinct sub-vectors is stored exactly. The quality measure is the relative output error
Σ_r (t̂_r − t_r)ᵀ H (t̂_r − t_r) / Σ_r t_rᵀ H t_r (the relative weight error without H),
``lstsq.weighted_error``. Under a budget on it, a setting is first screened (``screened_error``: a
quick quantization of every 8th row) and fitted in full only when the screen is within a margin of
the budget; a setting another one nests (``nests``: its quantizers are among the other's) is not
screened where that one's screen is already over the margin (``Screens``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .gptq import gptq_assign, gptq_blocks, hinv_cholesky, refine_codebook
from ...lstsq import deterministic
from .kmeans import aware_em, em_points, kmeans


def quantize(t, d, k, h, cfg, rng, dtype, cache: dict | None = None):
    """T (rows × d_in) -> (codebook K'×d in ``dtype``, codes rows × B uint8, T̂).

    h: the damped input covariance (d_in × d_in) for activation-aware layers, else None.
    cache: a dict kept across calls on the same (t, h) (the settings tried on one layer), which
    holds what depends on (t, h) alone: the Cholesky factor of H⁻¹, T H (``budget_error``
    reads the latter too), H in float32, and per sub-vector length d the EM's sorted or metric-weighted points
    (``kmeans.em_points``) and the assignment's diagonal blocks (``gptq.gptq_blocks``)."""
    rows, d_in = t.shape
    nb = d_in // d
    x = t.reshape(rows * nb, d).astype(np.float64)
    # at most k distinct sub-vectors: they are the codebook. Sorting every row to find out costs
    # more than the k-means of a large layer, so the first 4k + 1 rows are looked at first.
    few = len(np.unique(x[: 4 * k + 1], axis=0)) <= k
    uniq, inv = np.unique(x, axis=0, return_inverse=True) if few else (None, None)
    if few and len(uniq) <= k:
        c, codes = uniq, inv.reshape(-1)
    else:
        em = h is not None and cfg.aware and cfg.iters > 0
        # scalar codes going on to the EM: it takes the nearest codes of the centroids itself
        c, codes = kmeans(x, k, cfg.kmeans_iters, rng, assign=not (em and d == 1))
        if h is not None and cfg.aware:
            cache = {} if cache is None else cache
            if cfg.iters:
                hblocks = h.reshape(nb, d, nb, d)[np.arange(nb), :, np.arange(nb), :]
                if ("em", d) not in cache:   # the same for every K tried at this d
                    cache[("em", d)] = em_points(x, hblocks)
                c, codes = aware_em(x, np.tile(np.arange(nb), rows), hblocks, c, codes, cfg.iters,
                                    points=cache[("em", d)])
            if cfg.gptq:
                if "u" not in cache:
                    cache["u"] = hinv_cholesky(h)
                if ("gptq", d) not in cache:
                    cache[("gptq", d)] = gptq_blocks(cache["u"], d)
                codes = gptq_assign(t, d, c, h, u=cache["u"], blocks=cache[("gptq", d)]).reshape(-1)
            if cfg.refine:
                if "th" not in cache:
                    cache["th"] = t @ h
                if "h32" not in cache:
                    cache["h32"] = h.astype(np.float32)
                c = refine_codebook(t, codes.reshape(rows, nb), c, h, cfg.refine, th=cache["th"], h32=cache["h32"])
        # drop unused centroids (fewer bytes, same weights)
        used = np.flatnonzero(np.bincount(codes, minlength=len(c)))   # np.unique's, without sorting the codes
        remap = np.zeros(len(c), dtype=np.int64)
        remap[used] = np.arange(len(used))
        c, codes = c[used], remap[codes]
    cb = c.astype(dtype)
    t_hat = cb.astype(np.float64)[codes].reshape(rows, d_in)
    return cb, codes.reshape(rows, nb).astype(np.uint8), t_hat


ROW_SLACK = 4.0   # the mean per-output relative error may be this many times pq.max_error


def budget_error(t, t_hat, h, floor=1e-3, cache: dict | None = None) -> float:
    """The error ``pq.max_error`` bounds: the larger of the relative output error of the layer
    (``lstsq.weighted_error``) and 1/``ROW_SLACK`` of the mean over its outputs of each output's
    own relative error e_r = (t̂_r − t_r)ᵀ H (t̂_r − t_r) / t_rᵀ H t_r, over the outputs whose
    energy t_rᵀ H t_r is at least ``floor`` times the mean (dead outputs left out). The mean keeps
    weak outputs (the high bands of a filter bank or an STFT, which a log scales up) from hiding
    behind strong ones. Without ``h``: the same on the weights. ``cache``: ``quantize``'s for the
    same (t, h) (T H is taken from it, or kept there)."""
    delta = t - t_hat
    if h is None:
        num, den = (delta ** 2).sum(1), (t ** 2).sum(1)
    else:
        if cache is not None and "th" not in cache:
            cache["th"] = t @ h
        th = cache["th"] if cache is not None else t @ h
        num, den = ((delta @ h) * delta).sum(1), (th * t).sum(1)
    total = float(num.sum() / max(float(den.sum()), 1e-30))   # ``lstsq.weighted_error``, from the rows' sums
    live = den >= floor * max(float(den.mean()), 1e-30)
    if not live.any():
        return total
    return max(total, float((num[live] / den[live]).mean()) / ROW_SLACK)


# ----------------------------------------------------------------------------- screening a setting
SCREEN_STRIDE = 8            # the screen fits every 8th row of T
SCREEN_MIN_ROWS = 32         # ... and at least this many rows,
SCREEN_MIN_SUBVECTORS = 4096  # ... holding at least this many sub-vectors; a layer needing half its rows is not screened
SCREEN_MARGIN = 3.0          # a setting whose screened error is over this many times the budget is not fitted in full


def screen_rows(rows: int, nb: int):
    """The rows of T the screen fits (every ``SCREEN_STRIDE``-th, more where a layer has few
    sub-vectors a row), or None when that would be half of them or more (a small layer is fitted
    in full: its screen would cost about as much)."""
    n = max(-(-rows // SCREEN_STRIDE), SCREEN_MIN_ROWS, -(-SCREEN_MIN_SUBVECTORS // max(nb, 1)))
    if 2 * n > rows:
        return None
    return np.linspace(0, rows - 1, n).round().astype(np.int64)


def quick_config(cfg):
    """The config of quick quantizations (the size search's, the error allocation's and the
    screen's): few rounds, targets from the reference."""
    return replace(cfg, iters=min(cfg.iters, 2), kmeans_iters=min(cfg.kmeans_iters, 3),
                   refine=min(cfg.refine, 2), sequential=False)


def screened_error(t, d, k, h, cfg, rng, dtype, cache: dict | None = None) -> float | None:
    """``budget_error`` of a quick quantization (``quick_config``) of evenly spaced rows of T
    (``screen_rows``): a cheap estimate of what the full quantization of setting (d, K) reaches,
    or None for a layer too small to screen. Fitted on fewer rows, the codebook follows them more
    closely (the estimate leans low); with fewer rounds it fits less well (it leans high): over 254
    settings of 31 vit_focus layers and of the digits models the estimate was 0.11–1.91 times the
    full fit's error (median 0.93), so a setting screened over ``SCREEN_MARGIN`` times the budget is
    not fitted in full (rows evenly spaced, not drawn: the gates of an LSTM matrix, rows of unlike
    scales, are all seen). ``cache``:
    ``quantize``'s for (t, h) (the gptq factor of H is shared with it)."""
    idx = screen_rows(t.shape[0], t.shape[1] // d)
    if idx is None:
        return None
    ts = t[idx]
    # the screens of one d fit the same rows: what quantize keeps of them is kept in the layer's cache
    own = {} if cache is None else cache.setdefault(("screen", len(idx)), {})
    if cache is not None and "u" in cache:
        own["u"] = cache["u"]
    _, _, t_hat = quantize(ts, d, k, h, quick_config(cfg), rng, dtype, own)
    if cache is not None and "u" in own:
        cache["u"] = own["u"]
    return budget_error(ts, t_hat, h, cache=own)


def nests(a, b) -> bool:
    """Whether setting a = (d_a, K_a) holds every quantizer of setting b = (d_b, K_b), b ≠ a: d_a is
    a multiple m of d_b and K_a ≥ K_b^m (m sub-vectors of b side by side, K_b^m codewords, are one
    codebook of a). The best fit of a then errs no more than the best fit of b: (1, 64) nests
    (1, 16); (2, 256) nests (2, 64) and (1, 16)."""
    (da, ka), (db, kb) = a, b
    return a != b and da % db == 0 and ka >= kb ** (da // db)


class Screens:
    """The screens of one layer's ladder under a budget (``screened_error``, each from the same
    seed, computed once). ``over(s)``: (the estimate, the setting screened) when setting s is not
    worth a full fit, else None: s's own screen is over ``limit`` (``SCREEN_MARGIN`` times the
    budget), or, screened first, that of the first of ``pivots`` after s that nests it (``nests``):
    a setting nested in one that errs far over the budget errs at least as much (vit_focus's
    layers: the 4-bit pairs (2, 256), screened 2–8 times over the budget, spare the screens of the
    3-bit pairs and the 4-bit scalar codes before them, 11–30 times over it). ``pivots``: the
    settings that may be screened, in the order they are tried."""

    def __init__(self, t, h, cfg, dtype, cache, rng, limit, pivots):
        self.t, self.h, self.cfg, self.dtype, self.cache, self.rng = t, h, cfg, dtype, cache, rng
        self.limit, self.pivots, self.est = limit, list(pivots), {}

    def estimate(self, s):
        if s not in self.est:
            with deterministic():
                self.est[s] = screened_error(self.t, s[0], s[1], self.h, self.cfg, self.rng(), self.dtype, self.cache)
        return self.est[s]

    def over(self, s):
        later = self.pivots[self.pivots.index(s) + 1:] if s in self.pivots else []
        for a in [next((a for a in later if nests(a, s)), None), s]:
            if a is not None:
                est = self.estimate(a)
                if est is not None and est > self.limit:
                    return est, a
        return None
