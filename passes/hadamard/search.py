"""The structure search of one layer: which (K blocks, rank r) Fastfood structure to fit.

The cheapest structure whose relative error on held-out calibration rows is within the tolerance
is wanted. The held-out error falls with the rank, so the largest affordable rank is tried first
(a layer no structure fits is given up after one rank), then the smallest rank that reaches the
tolerance is found by bisection over the rank candidates 0, 1, 2, 4, …; at each rank blocks are
added one at a time until the tolerance is met or a geometric extrapolation of the gain per block
says it will not be. One decomposition of the layer (``LowRankBasis``) gives the low-rank part at
every rank. The chosen structure is the search's own fit, backfitted, or with few rows refit on all of them.
"""

from __future__ import annotations

import copy
import time

import numpy as np

from .config import HadamardConfig
from .fastfood import FastfoodFit, LowRankBasis, whitening
from ...lstsq import fit_error_rows
from ...parallel import gram


def rank_candidates(d_in, d_out, cap_params, fixed=None):
    """0 and the powers of two whose low-rank part fits in ``cap_params`` (or just ``fixed``)."""
    if fixed is not None:
        return [fixed]
    out, r = [0], 1
    while r * (d_in + d_out) <= cap_params and r < min(d_in, d_out):
        out.append(r)
        r *= 2
    return out


def held_out(n: int, n_hold: int) -> np.ndarray:
    """A mask of ``n_hold`` of ``n`` rows spread evenly over them (every ~n/n_hold-th row). Rows come
    feed by feed: a tail would hold out the last feeds only, and when feeds differ (images of a
    vision transformer) its error misjudges the rest (vit_focus: 0.029 on the tail, 0.052 on the
    fit rows, for the same structure)."""
    mask = np.zeros(n, dtype=bool)
    if n_hold:
        mask[((np.arange(n_hold) + 1) * n) // n_hold - 1] = True
    return mask


def held_out_rows(n: int, units_held) -> np.ndarray:
    """The rows of the held-out calibration units: ``units_held`` is a mask over the units, and the
    ``n`` rows, which come unit by unit in order, are split into as many contiguous equal parts.
    Rows of one unit (the tokens of one image, the positions of one picture) are alike: rows held
    out among them measure how well a fit reproduces the units it saw, not others (vit_focus: its
    structures within 0.03 on such rows moved the map of held-out images past the gate)."""
    units = len(units_held)
    return np.asarray(units_held)[(np.arange(n) * units) // max(n, 1)]


REUSE_ROWS = 2    # fit rows per input from which the search's own fit is kept (fewer: refit on all rows)
FIT_WIDTH = 512   # hadamard.max_fits counts blocks of this width; a wider one counts (d/512)² (its sweeps' cost)


class _Search:
    """The search state of one layer: rows split into fit and held-out parts, the candidates, the
    best structure so far (``best_ok`` within tolerance, ``best_any`` at all) as (params, error,
    K, r), the blocks fitted, and why the search stopped early (a bound), if it did."""

    def __init__(self, x, y, cfg: HadamardConfig, dense_params: int, hold=None):
        n = len(x)
        self.cfg = cfg
        self.d_in, self.d_out = x.shape[1], y.shape[1]
        if hold is None:
            hold = held_out(n, max(1, int(round(n * cfg.holdout))) if n >= 10 else 0)
        n_hold = int(hold.sum())
        self.xf, self.yf = x[~hold], y[~hold]
        self.xh, self.yh = (x[hold], y[hold]) if n_hold else (self.xf, self.yf)
        self.cap = cfg.max_params * dense_params
        self.probe = FastfoodFit(self.d_in, self.d_out, cfg.seed)
        self.ks = [cfg.blocks] if cfg.blocks is not None else list(range(1, cfg.max_blocks + 1))
        self.ranks = [r for r in rank_candidates(self.d_in, self.d_out, self.cap, cfg.rank)
                      if self.probe.params(min(self.ks), r) <= self.cap]
        self.tried = []
        self.best_any = self.best_ok = self.best_fit = None
        self.lowrank_errors = self.lowrank_bounds = None
        self.fits = 0.0   # blocks fitted, each counted by its cost: a block of width d over n stacks
        self.fit_cost = self.probe.n_stack * (self.probe.d / FIT_WIDTH) ** 2   # counts n·(d/512)²
        self.stopped = None

    def prepare(self):
        """Centre the fit rows, decompose them once for every rank, drop the ranks the blocks cannot
        bring within tolerance (``reachable``), pad the rows for the blocks and take their moments."""
        cfg = self.cfg
        self.deadline = time.perf_counter() + cfg.search_seconds if cfg.search_seconds else None
        self.mx, self.my = self.xf.mean(0), self.yf.mean(0)
        self.xc, self.yc = self.xf - self.mx, self.yf - self.my
        self.xhc = self.xh - self.mx
        self.ranks = self.bounded()
        if not self.ranks:
            return
        self.chol = chol = whitening(self.xc, 1e-4)
        self.basis = LowRankBasis(self.xc, self.yc, chol, max(self.ranks))
        self.ranks = self.reachable()
        if not self.ranks:
            return
        self.xp = self.probe.pad(self.xc)
        self.xtx = gram(self.xp)
        self.xhp = self.probe.pad(self.xhc)
        # with moments, the blocks are fitted from Xᵀ(targets) alone (``FastfoodFit.add_block_moments``):
        # the decomposition's Xᵀ Y with zero rows for the padding (the bits of ``cross(xp, yc)``)
        self.xty = None
        if self.probe.moments(self.xp):
            self.xty = np.zeros((self.probe.d, self.d_out))
            self.xty[: self.d_in] = self.basis.xty
        self.basis.xty = None

    def k_max(self, r) -> int:
        """The most blocks affordable beside rank r (0: none)."""
        return max((k for k in self.ks if self.probe.params(k, r) <= self.cap), default=0)

    def bounded(self) -> list:
        """The ranks ``reachable`` could keep, judged before any decomposition of the inputs by a lower
        bound of the low-rank part's held-out error: a rank-r map of the inputs leaves at least the
        energy of the held-out targets (centred) beyond their r leading principal components
        (Eckart–Young), a fraction known from their Gram matrix alone (``lowrank_bounds``). A rank
        whose bound, lowered by the blocks affordable beside it at ``cfg.block_gain`` each, stays
        above tolerance is one ``reachable`` drops too; the bound costs a Gram matrix of the
        held-out targets instead of the inputs' whitening and decomposition."""
        cfg = self.cfg
        if not cfg.block_gain:
            return self.ranks
        c = self.yh - self.my
        den = float((c ** 2).sum())
        g = c @ c.T if len(c) < c.shape[1] else c.T @ c
        ev = np.clip(np.linalg.eigvalsh(g)[::-1], 0.0, None)
        captured = np.concatenate([[0.0], np.cumsum(ev)])
        bound = {r: max(den - float(captured[min(r, len(ev))]), 0.0) / max(den, 1e-30) * (1 - 1e-9)
                 for r in self.ranks}
        self.lowrank_bounds = {r: round(bound[r], 5) for r in self.ranks}
        return [r for r in self.ranks if bound[r] * cfg.block_gain ** self.k_max(r) <= cfg.tolerance]

    def reachable(self) -> list:
        """The ranks whose low-rank part alone (its held-out error e, no fit needed) could be brought
        within tolerance by the most blocks affordable beside it, each lowering the error by at most
        the factor ``cfg.block_gain``: e · block_gain^K ≤ tolerance. Their held-out errors are kept
        (``lowrank_errors``). vit_focus: the fc2 layers (1536 → 384, one block of width 2048 costs
        a sweep over 2048 × 2048 moments) are at 0.16–0.34 with rank 64 and four blocks left
        affordable, and the blocks beside a low-rank part lowered it by 0.82–0.95 each."""
        cfg = self.cfg
        self.lowrank_errors = {}
        out = []
        for r in self.ranks:
            u, vt = self.basis.factors(r)
            err = fit_error_rows(self.xhc @ u @ vt + self.my, self.yh, self.my)
            self.lowrank_errors[r] = round(err, 5)
            if not cfg.block_gain or err * cfg.block_gain ** self.k_max(r) <= cfg.tolerance:
                out.append(r)
        return out

    def bound_reached(self) -> bool:
        """max_fits or search_seconds spent (saying which in ``stopped``)."""
        cfg = self.cfg
        if cfg.max_fits and self.fits >= cfg.max_fits:
            self.stopped = f"max_fits={cfg.max_fits}"
            return True
        if self.deadline is not None and self.fits and time.perf_counter() > self.deadline:
            self.stopped = f"search_seconds={cfg.search_seconds}"
            return True
        return False

    def evaluate(self, r) -> bool:
        """Blocks at rank r until within tolerance (then it is the best so far): True if so."""
        cfg, ks, best_ok = self.cfg, self.ks, self.best_ok
        if best_ok and self.probe.params(min(ks), r) >= best_ok[0]:
            return False
        fit = FastfoodFit(self.d_in, self.d_out, cfg.seed)
        fit.mx, fit.my = self.mx, self.my
        fit.set_lowrank(self.basis, r)
        if self.xty is not None:   # Xᵀ(residual of the low-rank part) per stack: Xᵀ Y − (Xᵀ X) U Vᵀ
            resid = fit.stack_moments(self.xty - self.xtx[:, : self.d_in] @ fit.u @ fit.vt)
        else:
            resid = self.yc - self.xc @ fit.u @ fit.vt
        hold_lr = self.xhc @ fit.u @ fit.vt
        hold = np.zeros_like(self.yh)   # the blocks' output on the held-out rows, one block added at a time
        # the low-rank part's own held-out error: the first block's gain is judged against it (a
        # layer the blocks barely help is given up after one block, not two)
        prev = fit_error_rows(hold_lr + self.my, self.yh, self.my) if len(ks) > 1 and min(ks) == 1 else None
        for k in range(1, max(ks) + 1):
            limit = min(self.cap, best_ok[0] - 1) if best_ok else self.cap
            if fit.params(k, r) > limit or self.bound_reached():
                return False
            if self.xty is not None:
                resid = fit.add_block_moments(self.xtx, resid, cfg.iters, cfg.ridge, cfg.cg_iters, cfg.restarts)
            else:
                resid = fit.add_block(self.xp, resid, self.xtx, cfg.iters, cfg.ridge, cfg.cg_iters, cfg.restarts)
            self.fits += self.fit_cost
            for j, bl in enumerate(fit.blocks):
                lo, hi = j * fit.d, min((j + 1) * fit.d, self.d_out)
                hold[:, lo:hi] += bl[-1].out(self.xhp)[:, : hi - lo]
                bl[-1].forget()
            if k not in ks:
                continue
            p = fit.params()
            err = fit_error_rows(hold + hold_lr + self.my, self.yh, self.my)   # = fit.predict(self.xh)
            self.tried.append({"blocks": k, "rank": r, "params": p, "error": round(err, 5)})
            if self.best_any is None or err < self.best_any[1]:
                self.best_any = (p, err, k, r)
            if err <= cfg.tolerance:
                self.best_ok = (p, err, k, r)
                self.best_fit = fit   # K blocks now: the structure as judged
                return True
            # geometric extrapolation of the gain per block: give up on this rank when even the
            # most blocks the budget allows would not reach the tolerance
            if prev is not None and len(ks) > 1:
                k_max = max(kk for kk in ks if fit.params(kk, r) <= limit) if fit.params(k + 1, r) <= limit else k
                ratio = min(err / max(prev, 1e-30), 1.0)
                if err * ratio ** (k_max - k) > cfg.tolerance:
                    return False
            prev = err
        return False

    def run(self):
        """The largest rank first; if it fits, bisect for the smallest rank that does.

        Where the low-rank part alone is within tolerance at the largest rank, that rank is taken to
        fit with the fewest blocks (blocks fitted by least squares beside it do not raise the error)
        without fitting them: the bisection runs as after that fit (the same bound on the structures
        it tries, the same work counted against ``max_fits``), and the largest rank is fitted only
        when no smaller one fits (the digits MLP: rank 64 at 0.0074, then rank 16 is the structure;
        khmer_segmenter: rank 32 at 0.0067, then rank 1)."""
        ranks = self.ranks
        if not ranks:
            return
        top, k0 = ranks[-1], min(self.ks)
        assumed = self.lowrank_errors.get(top, np.inf) <= self.cfg.tolerance
        if assumed:   # the state ``evaluate(top)`` would leave, but for the fit itself
            self.best_ok, self.best_fit = (self.probe.params(k0, top), self.lowrank_errors[top], k0, top), None
            self.fits += k0 * self.fit_cost
        if not assumed and not self.evaluate(top):
            return
        lo, hi = 0, len(ranks) - 1           # ranks[hi] fits; find the smallest rank that does
        while lo < hi:
            mid = (lo + hi) // 2
            if self.evaluate(ranks[mid]):
                hi = mid
            else:
                lo = mid + 1
        if hi + 1 < len(ranks) - 1:         # a larger rank with fewer blocks may still be cheaper
            self.evaluate(ranks[hi + 1])
        if assumed and self.best_fit is None:   # no smaller rank fits: the largest one's fit after all,
            spent, self.fits = self.fits, 0.0   # with the work bound it would have had as the first
            self.best_ok = None
            self.evaluate(top)
            self.fits = spent


def refit_structure(x, y, cfg: HadamardConfig, k: int, r: int) -> FastfoodFit:
    """K blocks and rank r fitted on all rows: the low-rank part, the blocks stagewise on its
    residual, then ``cfg.final_iters`` backfitting sweeps."""
    fit = FastfoodFit(x.shape[1], y.shape[1], cfg.seed)
    fit.set_data(x, y)
    xc, yc = x - fit.mx, y - fit.my
    chol = whitening(xc, 1e-4) if r else None   # the low-rank part's whitening, once for the fit and backfit
    fit.fit_lowrank(xc, yc, r, 1e-4, chol=chol)
    xp = fit.pad(xc)
    xtx = xp.T @ xp
    resid = yc - xc @ fit.u @ fit.vt
    for _ in range(k):
        resid = fit.add_block(xp, resid, xtx, cfg.iters, cfg.ridge, cfg.cg_iters, cfg.restarts)
    fit.backfit(xp, xc, yc, xtx, cfg.final_iters, cfg.ridge, cfg.cg_iters, 1e-4, chol=chol)
    return fit


def choose_structure(x, y, cfg: HadamardConfig, dense_params: int, hold=None):
    """Search (K, r) on the fit rows, judge on held-out rows. With fit rows at least
    ``REUSE_ROWS`` times the inputs, the chosen structure is the search's own fit (no second
    stagewise fit), with ``cfg.final_iters`` backfitting sweeps on the fit rows kept when they lower
    its held-out error, the one reported; with fewer (the digits MLP: 328 rows for 1024 inputs) the
    held-out rows are worth fitting too, and the structure is refit on all rows.
    ``cfg.max_fits`` bounds the blocks fitted in the search (a block of width d over n stacks
    counting n·(d/512)²: a deterministic bound on its work) and ``cfg.search_seconds`` its time
    (the best structure found so far is kept).

    ``hold``: the held-out rows (a mask; default: every ~1/``cfg.holdout``-th row, ``held_out``).

    Returns (fit or None, info dict)."""
    search = _Search(x, y, cfg, dense_params, hold)
    if not search.ranks:   # nothing affordable: decided before any decomposition or fit
        return None, {"tried": search.tried, "best_error": None}
    search.prepare()
    if not search.ranks:   # no rank the blocks could bring within tolerance: decided before any block fit
        if search.lowrank_errors is None:   # by the targets' spectrum alone (``bounded``)
            return None, {"tried": search.tried, "lowrank_bounds": search.lowrank_bounds,
                          "best_error": min(search.lowrank_bounds.values()), "bound": True,
                          "unreachable": f"hadamard.block_gain={cfg.block_gain}"}
        best = min(search.lowrank_errors.values())
        return None, {"tried": search.tried, "lowrank_errors": search.lowrank_errors, "best_error": best,
                      "unreachable": f"hadamard.block_gain={cfg.block_gain}"}
    search.run()
    info = {"tried": search.tried, "lowrank_errors": search.lowrank_errors}
    if search.stopped:
        info["search_stopped_by"] = search.stopped
    if search.best_ok is None:
        best_any = search.best_any
        info["best_error"] = None if best_any is None else round(best_any[1], 5)
        return None, info
    _, err, k, r = search.best_ok
    if len(search.xf) < REUSE_ROWS * search.d_in:   # few rows: all of them fit the chosen structure
        fit = refit_structure(x, y, cfg, k, r)
        info.update({"blocks": k, "rank": r, "holdout_error": round(err, 5),
                     "fit_error": round(fit_error_rows(fit.predict(x), y, fit.my), 5), "params": fit.params()})
        return fit, info
    fit = search.best_fit
    if cfg.final_iters:   # backfitting on the fit rows, kept when the held-out rows agree
        tuned = copy.deepcopy(fit)
        tuned.backfit(search.xp, search.xc, search.yc, search.xtx, cfg.final_iters, cfg.ridge, cfg.cg_iters, 1e-4,
                      chol=search.chol, xty=search.xty)
        err2 = fit_error_rows(tuned.predict(search.xh), search.yh, tuned.my)
        if err2 < err:
            fit, err = tuned, err2
    info.update({"blocks": k, "rank": r, "holdout_error": round(err, 5),
                 "fit_error": round(fit_error_rows(fit.predict(search.xf), search.yf, fit.my), 5),
                 "params": fit.params()})
    return fit, info
