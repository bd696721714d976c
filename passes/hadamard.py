"""hadamard: replace a Gemm/MatMul by Fastfood-structured blocks fitted post hoc (Deep Fried
Convnets, Yang et al. 2015; Fastfood, Le, Sarlós & Smola 2013).

A dense layer y = W x + c (W: d_out × d_in) becomes, with x zero-padded to d = 2^⌈log2 d_in⌉,

    y = [ Σ_k S_jk H G_jk Π_jk H B_jk pad(x) ]_{j = 1..⌈d_out/d⌉, sliced to d_out} + U Vᵀ x + c,

B, G, S diagonal (fitted), Π a fixed random permutation, H = H_d/√d the orthonormal Walsh–Hadamard
matrix, K summed blocks per output stack j, and an optional rank-r correction U Vᵀ. Storage is
3d per block instead of d_in·d_out; H is emitted as Kronecker factors (``_hadamard_ops``).

Fitting, on calibration rows (x from the already-rewritten network, y = the reference network's
output of this layer, so every layer is reconstructed sequentially): the output error
E = ‖Ṽ X − Y‖² is quadratic in each diagonal with the other two fixed, so the diagonals are fitted
by alternating least squares. With L, R the fixed factors left and right of a diagonal u,
(Lᵀ L ⊙ R Xᵀ X Rᵀ + αI) u = diag(R Xᵀ Y L); for S the system is diagonal, for G, Lᵀ L = H S² H is a
dyadic (XOR) convolution matrix. Blocks are added one at a time on the residual (stagewise), the
low-rank part is a whitened truncated SVD of the least-squares fit of the residual. Per layer the
cheapest (K, r) whose error on held-out calibration rows is within ``tolerance`` wins; layers where
none is, or where the dense layer is cheaper, stay dense (refit by least squares when their
inputs changed) and are reported with the best error reached.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
import scipy.linalg

from ..graph import export_model, import_graph, opset
from ..reconstruct import layer_matrix, set_layer_matrix
from ..registry import Pass, PassReport, Plan, Skip, register
from ._factor import gemm_bias_problem
from ._hadamard_ops import Emitter, emit_fastfood, factors, next_pow2


@dataclass
class HadamardConfig:
    tolerance: float = 0.03     # relative squared output error on held-out calibration rows
    blocks: int | None = None   # fixed K (blocks per output stack); None: search 1..max_blocks
    max_blocks: int = 8
    rank: int | None = None     # fixed low-rank correction; None: search 0, 1, 2, 4, 8, ...
    max_params: float = 0.25    # a structure may hold at most this fraction of the layer's params
    min_dim: int = 16           # layers with d_in or d_out below this stay dense
    max_fits: int = 24          # blocks fitted in the structure search at most, per layer (0: no bound)
    search_seconds: float = 0.0  # structure search time per layer at most (0: no bound); the best
                                 # structure found within it is kept. Off by default: a time bound
                                 # makes the result depend on the machine's speed (max_fits does not)
    row_memory_mb: int = 256    # calibration rows of several layers are gathered in one run up to this
    time_budget: float = 0.0    # seconds for the whole pass's structure searches (0: no bound); layers
                                # reached after it stay dense (refit where their inputs changed).
                                # Off by default, for the same reason as search_seconds
    iters: int = 4              # ALS sweeps per added block
    restarts: int = 1           # random starts per added block (the best is kept)
    cg_iters: int = 10          # conjugate-gradient iterations per diagonal solve (0: exact)
    final_iters: int = 3        # backfitting sweeps over all blocks for the chosen structure
    max_rows: int = 4096        # calibration rows kept per layer
    holdout: float = 0.2        # fraction of rows used to choose the structure
    ridge: float = 1e-6         # relative ridge of the diagonal solves
    refit: bool = True          # least-squares refit of layers kept dense whose inputs changed
    seed: int = 0

    def __post_init__(self):
        if not self.tolerance > 0:
            raise ValueError("tolerance must be > 0")
        if self.blocks is not None and self.blocks < 1:
            raise ValueError("blocks must be ≥ 1")
        if self.max_blocks < 1:
            raise ValueError("max_blocks must be ≥ 1")
        if self.rank is not None and self.rank < 0:
            raise ValueError("rank must be ≥ 0")
        if not 0 < self.max_params <= 1:
            raise ValueError("max_params must be in (0, 1]")
        if not 0 < self.holdout < 0.9:
            raise ValueError("holdout must be in (0, 0.9)")
        if self.max_fits < 0:
            raise ValueError("max_fits must be ≥ 0")
        if not self.search_seconds >= 0:
            raise ValueError("search_seconds must be ≥ 0")
        if not self.time_budget >= 0:
            raise ValueError("time_budget must be ≥ 0")
        if self.row_memory_mb < 1:
            raise ValueError("row_memory_mb must be ≥ 1")
        if self.iters < 1 or self.final_iters < 0 or self.max_rows < 8:
            raise ValueError("iters ≥ 1, final_iters ≥ 0, max_rows ≥ 8")


# ----------------------------------------------------------------------------- numpy transform
_HCACHE = {}


def _hfac(n):
    if n not in _HCACHE:
        _HCACHE[n] = scipy.linalg.hadamard(n).astype(np.float64)
    return _HCACHE[n]


def fwht(z: np.ndarray) -> np.ndarray:
    """Orthonormal Walsh–Hadamard transform H_d z/√d along the last axis (Kronecker form)."""
    d = z.shape[-1]
    a, b = factors(d)
    shp = z.shape
    y = z.reshape(-1, a, b) @ _hfac(b)
    y = np.matmul(_hfac(a), y)
    return y.reshape(shp) / math.sqrt(d)


def _xor_conv(v: np.ndarray) -> np.ndarray:
    """H diag(v) H (orthonormal H) = (1/d)(H_d v)[i ⊕ j]."""
    d = len(v)
    w = fwht(v[None])[0] / math.sqrt(d)
    idx = np.bitwise_xor.outer(np.arange(d), np.arange(d))
    return w[idx]


def _spd_solve(a, rhs, ridge):
    a = a + (ridge * max(np.trace(a) / len(a), 1e-30)) * np.eye(len(a))
    try:
        return scipy.linalg.solve(a, rhs, assume_a="pos", check_finite=False)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return np.linalg.lstsq(a, rhs, rcond=None)[0]


def _pcg(a, rhs, x0, ridge, iters):
    """Jacobi-preconditioned conjugate gradients on (a + αI) u = rhs from the warm start x0. Each
    iterate lowers the quadratic objective, so an inexact ALS step still never increases it."""
    if iters <= 0:
        return _spd_solve(a, rhs, ridge)
    diag = np.diag(a).copy()
    alpha = ridge * max(diag.mean(), 1e-30)
    diag += alpha
    matvec = lambda v: a @ v + alpha * v  # noqa: E731
    x = x0.copy()
    r = rhs - matvec(x)
    z = r / diag
    p = z.copy()
    rz = r @ z
    for _ in range(iters):
        if rz <= 1e-30:
            break
        ap = matvec(p)
        pap = p @ ap
        if pap <= 0:
            break
        step = rz / pap
        x += step * p
        r -= step * ap
        z = r / diag
        rz_new = r @ z
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


class Block:
    """One Fastfood block s ⊙ H(g ⊙ Π H(b ⊙ x)), rows x (n × d)."""

    def __init__(self, d, rng, mask, perm):
        self.d = d
        self.b = rng.choice([-1.0, 1.0], d)
        self.g = rng.standard_normal(d)
        self.s = np.zeros(d)
        self.perm = perm
        self.mask = mask

    def _z2(self, x):
        """Π H (b ⊙ x), cached while x and b stay the same arrays (b is replaced, never changed
        in place, when it is refit)."""
        c = getattr(self, "_z2c", None)
        if c is not None and c[0] is x and c[1] is self.b:
            return c[2]
        z2 = fwht(x * self.b)[:, self.perm]
        self._z2c = (x, self.b, z2)
        return z2

    def out(self, x):
        return fwht(self._z2(x) * self.g) * self.s

    def _fit_s(self, x, t, ridge):
        z4 = fwht(self._z2(x) * self.g)
        num, den = (z4 * t).sum(0), (z4 * z4).sum(0)
        self.s = np.where(self.mask, num / (den + ridge * max(den.mean(), 1e-30) + 1e-30), 0.0)

    def step(self, x, t, xtx, ridge, cg=0):
        """One ALS sweep (S, G, B, S) towards the target rows t (n × d); ``cg`` > 0: that many
        conjugate-gradient iterations per diagonal solve instead of a Cholesky solve."""
        self._fit_s(x, t, ridge)
        z2 = self._z2(x)
        hsh = _xor_conv(self.s ** 2)
        hts = fwht(t * self.s)
        self.g = _pcg(hsh * (z2.T @ z2), (z2 * hts).sum(0), self.g, ridge, cg)
        inv = np.argsort(self.perm)
        a = (hsh * np.outer(self.g, self.g))[inv][:, inv]
        a = fwht(fwht(a).T).T
        mtt = fwht((hts * self.g)[:, inv])
        self.b = _pcg(a * xtx, (x * mtt).sum(0), self.b, ridge, cg)
        self._fit_s(x, t, ridge)


# ----------------------------------------------------------------------------- a layer's fit
class FastfoodFit:
    """Stacked/summed Fastfood blocks + low-rank + bias for a d_in → d_out layer."""

    def __init__(self, d_in, d_out, seed=0):
        self.d_in, self.d_out = d_in, d_out
        self.d = next_pow2(d_in)
        self.n_stack = -(-d_out // self.d)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.blocks = [[] for _ in range(self.n_stack)]   # per stack: list of Block
        self.u = np.zeros((d_in, 0))
        self.vt = np.zeros((0, d_out))
        self.mx = np.zeros(d_in)
        self.my = np.zeros(d_out)

    @property
    def K(self):
        return len(self.blocks[0])

    @property
    def r(self):
        return self.u.shape[1]

    def params(self, K=None, r=None):
        K = self.K if K is None else K
        r = self.r if r is None else r
        return 3 * self.d * self.n_stack * K + r * (self.d_in + self.d_out) + self.d_out

    def _pad(self, x):
        if self.d == self.d_in:
            return x
        out = np.zeros((x.shape[0], self.d))
        out[:, : self.d_in] = x
        return out

    def perm(self, j, k):
        """The fixed permutation Π of block k of stack j (a function of the seed only)."""
        return np.random.default_rng([self.seed, j, k]).permutation(self.d)

    def _mask(self, j):
        return np.arange(j * self.d, (j + 1) * self.d) < self.d_out

    def _cols(self, y, j):
        """Target columns of stack j, zero-padded to d."""
        t = np.zeros((y.shape[0], self.d))
        lo, hi = j * self.d, min((j + 1) * self.d, self.d_out)
        t[:, : hi - lo] = y[:, lo:hi]
        return t

    def blocks_out(self, xp):
        out = np.zeros((xp.shape[0], self.n_stack * self.d))
        for j, bl in enumerate(self.blocks):
            for blk in bl:
                out[:, j * self.d:(j + 1) * self.d] += blk.out(xp)
        return out[:, : self.d_out]

    def predict(self, x):
        xc = x - self.mx
        return self.blocks_out(self._pad(xc)) + xc @ self.u @ self.vt + self.my

    def dense(self):
        """(W_eff d_in × d_out, bias) of the fitted function."""
        eye = np.eye(self.d_in)
        w = self.blocks_out(self._pad(eye)) + self.u @ self.vt
        return w, self.my - self.mx @ w

    def graph_params(self):
        M = (self.n_stack, self.K, self.d)
        pick = lambda f: np.array([[f(b) for b in bl] for bl in self.blocks]).reshape(M)  # noqa: E731
        ff = {"b": pick(lambda b: b.b), "g": pick(lambda b: b.g), "s": pick(lambda b: b.s),
              "perms": pick(lambda b: b.perm).astype(np.int64)}
        _, bias = self.dense()
        return ff, (self.u, self.vt), bias

    # ---------------------------------------------------------------- fitting
    def set_data(self, x, y):
        self.mx, self.my = x.mean(0), y.mean(0)

    def set_lowrank(self, basis, r):
        """The rank-r part from a ``LowRankBasis`` of the same rows (one decomposition, every rank)."""
        self.u, self.vt = basis.factors(r)

    def fit_lowrank(self, xc, t, r, ridge=1e-4, chol=None):
        """Rank-r minimiser of ‖xc L − t‖ (whitened truncated SVD of the ridge solution)."""
        if r == 0:
            self.u, self.vt = np.zeros((self.d_in, 0)), np.zeros((0, self.d_out))
            return
        c = xc.T @ xc / len(xc)
        alpha = ridge * max(np.trace(c) / len(c), 1e-12)
        if chol is None:
            chol = np.linalg.cholesky(c + alpha * np.eye(len(c)))
        full = scipy.linalg.cho_solve((chol, True), xc.T @ t / len(xc))
        # top r of the SVD U S Vᵀ of m = Lᵀ full, from the eigenvectors of the smaller Gram matrix
        # (only r of them: much faster than a full SVD of a wide layer); u = L⁻ᵀ U_r S_r = full V_r
        m = chol.T @ full
        r = min(r, *m.shape)
        by_cols = m.shape[1] <= m.shape[0]
        gram = m.T @ m if by_cols else m @ m.T
        ev, vec = scipy.linalg.eigh(gram, subset_by_index=[len(gram) - r, len(gram) - 1], check_finite=False)
        ev, vec = ev[::-1], vec[:, ::-1]
        if by_cols:                     # vec = V_r
            self.u, self.vt = full @ vec, vec.T
        else:                           # vec = U_r, ev = S_r²
            sv = np.sqrt(np.clip(ev, 0.0, None))
            self.u = scipy.linalg.solve_triangular(chol.T, vec * sv, lower=False)
            self.vt = (vec.T @ m) / np.maximum(sv, 1e-30 + 1e-12 * sv[0])[:, None]

    def add_block(self, xp, resid, xtx, iters, ridge, cg=10, restarts=1):
        """Add one block per stack, fitted to the residual rows (the best of ``restarts`` random
        starts: the problem is not convex); returns the new residual."""
        resid = resid.copy()
        for j in range(self.n_stack):
            t = self._cols(resid, j)
            best = None
            perm = self.perm(j, len(self.blocks[j]))
            for _ in range(max(1, restarts)):
                blk = Block(self.d, self.rng, self._mask(j), perm)
                for _ in range(iters):
                    blk.step(xp, t, xtx, ridge, cg)
                err = float(((blk.out(xp) - t) ** 2).sum())
                if best is None or err < best[0]:
                    best = (err, blk)
            blk = best[1]
            self.blocks[j].append(blk)
            lo, hi = j * self.d, min((j + 1) * self.d, self.d_out)
            resid[:, lo:hi] -= blk.out(xp)[:, : hi - lo]
            blk._z2c = None  # the cached transform of the rows: n × d floats per block
        return resid

    def backfit(self, xp, xc, yc, xtx, sweeps, ridge, cg=10, lowrank_ridge=1e-4):
        """Sweeps of block-coordinate ALS over all blocks, then refit the low-rank part."""
        r = self.r
        chol = None
        if r and sweeps:
            c = xc.T @ xc / len(xc)
            chol = np.linalg.cholesky(c + lowrank_ridge * max(np.trace(c) / len(c), 1e-12) * np.eye(len(c)))
        for _ in range(sweeps):
            total = yc - xc @ self.u @ self.vt
            for j, bl in enumerate(self.blocks):
                outs = [blk.out(xp) for blk in bl]
                t_all = self._cols(total, j)
                acc = sum(outs) if outs else 0
                for k, blk in enumerate(bl):
                    t = t_all - (acc - outs[k])
                    blk.step(xp, t, xtx, ridge, cg)
                    new = blk.out(xp)
                    acc = acc - outs[k] + new
                    outs[k] = new
            if r:
                self.fit_lowrank(xc, yc - self.blocks_out(xp), r, lowrank_ridge, chol=chol)
        for bl in self.blocks:
            for blk in bl:
                blk._z2c = None


class LowRankBasis:
    """The whitened SVD of the ridge least-squares fit of ``t`` on ``xc``, decomposed once: the
    rank-r minimiser of ‖xc L − t‖ for every r is a slice (``FastfoodFit.fit_lowrank`` does one r)."""

    def __init__(self, xc, t, chol, max_rank):
        self.d_in, self.d_out = xc.shape[1], t.shape[1]
        self.full = scipy.linalg.cho_solve((chol, True), xc.T @ t / len(xc))
        m = chol.T @ self.full
        self.by_cols = m.shape[1] <= m.shape[0]
        gram = m.T @ m if self.by_cols else m @ m.T
        r = max(0, min(max_rank, *m.shape))
        if r == 0:
            self.ev, self.vec = np.zeros(0), np.zeros((len(gram), 0))
        else:
            ev, vec = scipy.linalg.eigh(gram, subset_by_index=[len(gram) - r, len(gram) - 1], check_finite=False)
            self.ev, self.vec = ev[::-1], vec[:, ::-1]
        self.chol, self.m = chol, m

    def factors(self, r):
        if r == 0:
            return np.zeros((self.d_in, 0)), np.zeros((0, self.d_out))
        vec, ev = self.vec[:, :r], self.ev[:r]
        if self.by_cols:
            return self.full @ vec, vec.T.copy()
        sv = np.sqrt(np.clip(ev, 0.0, None))
        u = scipy.linalg.solve_triangular(self.chol.T, vec * sv, lower=False)
        return u, (vec.T @ self.m) / np.maximum(sv, 1e-30 + 1e-12 * sv[0])[:, None]


def rel_error(pred, y, mean_y):
    den = float(((y - mean_y) ** 2).sum())
    return float(((pred - y) ** 2).sum()) / max(den, 1e-30)


def rank_candidates(d_in, d_out, cap_params, fixed=None):
    if fixed is not None:
        return [fixed]
    out, r = [0], 1
    while r * (d_in + d_out) <= cap_params and r < min(d_in, d_out):
        out.append(r)
        r *= 2
    return out


def choose_structure(x, y, cfg: HadamardConfig, dense_params: int):
    """Search (K, r) on the fit rows, judge on held-out rows; refit the chosen one on all rows.

    The cheapest structure within tolerance is wanted. The held-out error falls with the rank, so
    the largest affordable rank is tried first (a layer no structure fits is given up after one
    rank), then the smallest rank that reaches the tolerance is found by bisection over the rank
    candidates; at each rank blocks are added one at a time until the tolerance is met or the
    extrapolated gain says it will not be. ``cfg.max_fits`` bounds the blocks fitted in the search
    and ``cfg.search_seconds`` its time (the best structure found so far is kept). One
    decomposition of the layer gives the low-rank part at every rank.

    Returns (fit or None, info dict)."""
    n = len(x)
    d_in, d_out = x.shape[1], y.shape[1]
    n_hold = max(1, int(round(n * cfg.holdout))) if n >= 10 else 0
    xf, yf = x[: n - n_hold], y[: n - n_hold]
    xh, yh = (x[n - n_hold:], y[n - n_hold:]) if n_hold else (xf, yf)
    cap = cfg.max_params * dense_params
    probe = FastfoodFit(d_in, d_out, cfg.seed)
    ks = [cfg.blocks] if cfg.blocks is not None else list(range(1, cfg.max_blocks + 1))
    tried = []
    state = {"best_any": None, "best_ok": None, "fits": 0, "stopped": None}
    ranks = [r for r in rank_candidates(d_in, d_out, cap, cfg.rank) if probe.params(min(ks), r) <= cap]
    if not ranks:   # nothing affordable: decided before any decomposition or fit
        return None, {"tried": tried, "best_error": None}
    deadline = time.perf_counter() + cfg.search_seconds if cfg.search_seconds else None
    mx, my = xf.mean(0), yf.mean(0)
    xc, yc = xf - mx, yf - my
    c = xc.T @ xc / len(xc)
    chol = np.linalg.cholesky(c + 1e-4 * max(np.trace(c) / len(c), 1e-12) * np.eye(len(c)))
    basis = LowRankBasis(xc, yc, chol, max(ranks) if ranks else 0)
    xp = probe._pad(xc)
    xtx = xp.T @ xp

    def evaluate(r):
        """Blocks at rank r until within tolerance (then it is the best so far): True if so."""
        best_ok = state["best_ok"]
        if best_ok and probe.params(min(ks), r) >= best_ok[0]:
            return False
        fit = FastfoodFit(d_in, d_out, cfg.seed)
        fit.mx, fit.my = mx, my
        fit.set_lowrank(basis, r)
        resid = yc - xc @ fit.u @ fit.vt
        prev = None
        for k in range(1, max(ks) + 1):
            limit = min(cap, best_ok[0] - 1) if best_ok else cap
            if fit.params(k, r) > limit:
                return False
            if cfg.max_fits and state["fits"] >= cfg.max_fits:
                state["stopped"] = f"max_fits={cfg.max_fits}"
                return False
            if deadline is not None and state["fits"] and time.perf_counter() > deadline:
                state["stopped"] = f"search_seconds={cfg.search_seconds}"
                return False
            resid = fit.add_block(xp, resid, xtx, cfg.iters, cfg.ridge, cfg.cg_iters, cfg.restarts)
            state["fits"] += 1
            if k not in ks:
                continue
            p = fit.params()
            err = rel_error(fit.predict(xh), yh, my)
            tried.append({"blocks": k, "rank": r, "params": p, "error": round(err, 5)})
            if state["best_any"] is None or err < state["best_any"][1]:
                state["best_any"] = (p, err, k, r)
            if err <= cfg.tolerance:
                state["best_ok"] = (p, err, k, r)
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

    if ranks and evaluate(ranks[-1]):
        lo, hi = 0, len(ranks) - 1           # ranks[hi] fits; find the smallest rank that does
        while lo < hi:
            mid = (lo + hi) // 2
            if evaluate(ranks[mid]):
                hi = mid
            else:
                lo = mid + 1
        if hi + 1 < len(ranks) - 1:         # a larger rank with fewer blocks may still be cheaper
            evaluate(ranks[hi + 1])
    best_any, best_ok = state["best_any"], state["best_ok"]
    info = {"tried": tried}
    if state["stopped"]:
        info["search_stopped_by"] = state["stopped"]
    if best_ok is None:
        info["best_error"] = None if best_any is None else round(best_any[1], 5)
        return None, info
    _, err, k, r = best_ok
    # the chosen structure, refit on all rows (stagewise, then backfitting sweeps)
    fit = FastfoodFit(d_in, d_out, cfg.seed)
    fit.set_data(x, y)
    xc, yc = x - fit.mx, y - fit.my
    fit.fit_lowrank(xc, yc, r)
    xp = fit._pad(xc)
    xtx = xp.T @ xp
    resid = yc - xc @ fit.u @ fit.vt
    for _ in range(k):
        resid = fit.add_block(xp, resid, xtx, cfg.iters, cfg.ridge, cfg.cg_iters, cfg.restarts)
    fit.backfit(xp, xc, yc, xtx, cfg.final_iters, cfg.ridge, cfg.cg_iters)
    info.update({"blocks": k, "rank": r, "holdout_error": round(err, 5),
                 "fit_error": round(rel_error(fit.predict(x), y, fit.my), 5), "params": fit.params()})
    return fit, info


# ----------------------------------------------------------------------------- calibration rows
class RowSample:
    """Calibration request: up to ``max_rows`` rows of a layer's input (from the rewritten model)
    and its target output (from the reference), kept in float32: memory max_rows·(d_in+d_out)·4 B."""

    def __init__(self, key, x_tensor, y_tensor, per_batch, max_rows, transpose_x=False):
        self.key, self.x_tensor, self.y_tensor = key, x_tensor, y_tensor
        self.per_batch, self.max_rows, self.transpose_x = per_batch, max_rows, transpose_x

    def tensors(self):
        return {"x": [self.x_tensor], "y": [self.y_tensor]}

    def new(self, xa, ya):
        return {"x": [], "y": [], "n": 0}

    def update(self, acc, xa, ya, rng):
        x = xa[self.x_tensor]
        x = x.T if self.transpose_x else x
        x = x.reshape(-1, x.shape[-1])
        y = ya[self.y_tensor].reshape(-1, ya[self.y_tensor].shape[-1])
        take = min(self.per_batch, self.max_rows - acc["n"], len(x))
        if take <= 0:
            return
        sel = np.arange(len(x)) if take >= len(x) else np.sort(rng.choice(len(x), take, replace=False))
        acc["x"].append(x[sel].astype(np.float32))
        acc["y"].append(y[sel].astype(np.float32))
        acc["n"] += len(sel)


# ----------------------------------------------------------------------------- graph side
def _linear_info(node: gs.Node):
    """(W d_in×d_out, bias or None, reason or None) of a Gemm/MatMul with constant weights."""
    if node.op not in ("Gemm", "MatMul"):
        return None, None, "not a Gemm/MatMul"
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        if isinstance(node.inputs[0], gs.Constant):
            return None, None, "constant weight on the left (W·x): not supported"
        return None, None, "weights are not constants"
    if isinstance(node.inputs[0], gs.Constant):
        return None, None, "input is a constant"
    if node.inputs[1].values.ndim != 2:
        return None, None, "weights are not a 2-D matrix"
    if not np.issubdtype(node.inputs[1].values.dtype, np.floating):
        return None, None, "weights are not floating point"
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return None, None, "Gemm with transA=1"
    if gemm_bias_problem(node):
        return None, None, gemm_bias_problem(node)
    w, bias = layer_matrix(node)
    return w, bias, None


def _input_rank(node):
    shape = node.inputs[0].shape
    return len(shape) if shape is not None else None


def _scan(graph, cfg):
    """[(node, reason or None)] over the Gemm/MatMul nodes."""
    out = []
    for node in graph.nodes:
        if node.op not in ("Gemm", "MatMul"):
            continue
        w, _, reason = _linear_info(node)
        if reason is None:
            d_in, d_out = w.shape
            readers = len(node.inputs[1].outputs)
            if readers > 1:
                reason = (f"weights shared by {readers} nodes: a Fastfood structure is fitted per layer, "
                          "so the dense weight would stay for the others")
            elif not np.isfinite(w).all() or (_linear_info(node)[1] is not None
                                              and not np.isfinite(_linear_info(node)[1]).all()):
                reason = "weights or bias contain NaN or Inf values: not rewritten"
            elif min(d_in, d_out) < cfg.min_dim:
                reason = f"{d_in}→{d_out} is below hadamard.min_dim={cfg.min_dim}"
            elif _input_rank(node) is None or _input_rank(node) < (2 if node.op == "Gemm" else 1):
                reason = "input rank unknown"
            else:
                # the smallest structure the config allows (one block, or the fixed blocks/rank)
                least = FastfoodFit(d_in, d_out).params(cfg.blocks or 1, cfg.rank or 0)
                if least > cfg.max_params * (d_in * d_out + d_out):
                    what = ("one Fastfood block" if cfg.blocks is None and not cfg.rank else
                            f"the structure of {cfg.blocks or 1} block(s) + rank {cfg.rank or 0}")
                    reason = (f"{what} ({least} params) is above hadamard.max_params="
                              f"{cfg.max_params} of the dense layer ({d_in * d_out + d_out})")
        out.append((node, reason))
    return out


def _replace(graph, node, fit: FastfoodFit, shared, op_set):
    ff, lowrank, bias = fit.graph_params()
    dtype = node.inputs[1].values.dtype
    y = node.outputs[0]
    x = node.inputs[0]
    rank = _input_rank(node)
    em = Emitter(graph, node.name + "/fastfood", shared, dtype=dtype, opset=op_set)
    lr = (lowrank[0].astype(dtype), lowrank[1].astype(dtype)) if fit.r else None
    node.inputs.clear()
    node.outputs.clear()
    emit_fastfood(em, x, rank, fit.d_in, fit.d_out, ff, lr, bias.astype(dtype), out=y)


def _ridge_refit(x, y, ridge=1e-3, fit_bias=True):
    mx = x.mean(0) if fit_bias else np.zeros(x.shape[1])
    my = y.mean(0) if fit_bias else np.zeros(y.shape[1])
    xc, yc = x - mx, y - my
    c = xc.T @ xc
    alpha = ridge * max(np.trace(c) / len(c), 1e-12)
    w = scipy.linalg.solve(c + alpha * np.eye(len(c)), xc.T @ yc, assume_a="pos", check_finite=False)
    return w, my - mx @ w


@register
class Hadamard(Pass):
    name = "hadamard"
    summary = "replace a Gemm/MatMul by a Fastfood-style Hadamard-structured subgraph"
    Config = HadamardConfig
    needs_data = True

    def plan(self, model, cfg):
        plan = Plan()
        for node, reason in _scan(import_graph(model), cfg):
            (plan.skipped.append(Skip(node.name, reason)) if reason else plan.targets.append(node.name))
        return plan

    def apply(self, model, cfg, ctx):
        data = ctx.require_data(self.name)
        graph = import_graph(model)
        report = PassReport(self.name)
        op_set = opset(model)
        scan = _scan(graph, cfg)
        linear = [n for n, _ in scan if _linear_info(n)[2] is None]
        targets = {n.name for n, r in scan if r is None}
        for node, reason in scan:
            if reason:
                report.skip(node, reason)
        if op_set < 11:
            for name in sorted(targets):
                report.skip(name, f"opset {op_set} < 11")
            return model, report
        shared, changed, layers, t0 = {}, set(), {}, time.perf_counter()
        n_batches = max(1, data.count_batches(ctx.batch_size))   # feeds of different shapes batch apart
        per_batch = max(1, -(-cfg.max_rows // n_batches))
        current = model
        mem = 0
        target_outs = {n.outputs[0].name for n in linear if n.name in targets}
        todo = [n for n in linear if n.name in targets or (cfg.refit and self._upstream_changed(n, target_outs))]
        bar = ctx.bar(total=len(todo), desc="hadamard")
        # Rows of the layers still to do are gathered together in one run of the current model (up
        # to row_memory_mb); a rewrite makes the rows of the layers after it stale, and the next
        # layer gathers again from the rewritten model: one calibration run per change, not per layer.
        cache = {}
        collect_runs = 0
        for node in linear:  # topological order: sequential reconstruction
            upstream_changed = self._upstream_changed(node, changed)
            search = node.name in targets
            if search and cfg.time_budget and time.perf_counter() - t0 > cfg.time_budget:
                report.skip(node, f"hadamard.time_budget={cfg.time_budget}s spent before this layer")
                search = False
            if not search and not (cfg.refit and upstream_changed):
                if node.name in targets:
                    bar.update(1, postfix=node.name)
                continue
            bar.update(0, postfix=f"{node.name}: statistics")
            if node.name not in cache:
                cache = self._gather(ctx, current, todo[todo.index(node):], per_batch, cfg)
                collect_runs += 1
            acc = cache.pop(node.name)
            x = np.concatenate(acc["x"]).astype(np.float64)
            y = np.concatenate(acc["y"]).astype(np.float64)
            mem = max(mem, x.nbytes // 2 + y.nbytes // 2)
            w, bias, _ = _linear_info(node)
            d_in, d_out = w.shape
            b0 = bias if bias is not None else np.zeros(d_out)
            cur_pred = x @ w + b0
            cur_err = rel_error(cur_pred, y, y.mean(0))
            entry = {"shape": [d_in, d_out], "dense_params": d_in * d_out + (d_out if bias is not None else 0),
                     "rows": len(x), "dense_error": round(cur_err, 5)}
            if search:
                bar.detail(f"{node.name}: structure search")
                with ctx.timed("search"):
                    fit, info = choose_structure(x, y, cfg, d_in * d_out + d_out)
                entry.update(info)
                if fit is not None:
                    changed.add(node.outputs[0].name)
                    _replace(graph, node, fit, shared, op_set)
                    entry["replaced"] = True
                    report.changed.append(f"{node.name}: {d_in}→{d_out} as {info['blocks']} Fastfood block(s)"
                                          f"{' + rank ' + str(info['rank']) if info['rank'] else ''}, "
                                          f"held-out error {info['holdout_error']:.4f}")
                    layers[node.name] = entry
                    with ctx.timed("export"):
                        current = export_model(graph.copy(), like=model)
                    cache = {}
                    bar.update(1, postfix=f"{node.name}: K={info['blocks']} r={info['rank']}")
                    continue
                best = (f"best held-out error {info['best_error']}" if info["tried"] else
                        "none of the structures tried fits in max_params")
                report.skip(node, f"no Fastfood structure within tolerance {cfg.tolerance} and "
                                  f"max_params {cfg.max_params} ({best})")
            if cfg.refit and upstream_changed and (node.op == "Gemm" or bias is None) \
                    and np.isfinite(w).all():
                with ctx.timed("fit"):
                    w2, b2 = _ridge_refit(x, y, fit_bias=node.op == "Gemm")
                    # judge on the last rows, as the structure search does
                    n = len(x)
                    nh = max(1, n // 5)
                    wv, bv = _ridge_refit(x[: n - nh], y[: n - nh], fit_bias=node.op == "Gemm")
                ym = y[: n - nh].mean(0)
                if rel_error(x[n - nh:] @ wv + bv, y[n - nh:], ym) < rel_error(cur_pred[n - nh:], y[n - nh:], ym):
                    set_layer_matrix(node, w2, b2 if node.op == "Gemm" else None)
                    entry["refit"] = True
                    entry["refit_error"] = round(rel_error(x @ w2 + b2, y, y.mean(0)), 5)
                    report.changed.append(f"{node.name}: kept dense, refit by least squares")
                    changed.add(node.outputs[0].name)
                    with ctx.timed("export"):
                        current = export_model(graph.copy(), like=model)
                    cache = {}
            layers[node.name] = entry
            bar.update(1, postfix=node.name)
        bar.close()
        report.details["layers"] = layers
        report.details["row_memory_bytes"] = int(mem)
        report.details["calibration_runs"] = collect_runs
        report.details["fit_seconds"] = round(time.perf_counter() - t0 - ctx.calibration_seconds, 3)
        with ctx.timed("export"):
            out = export_model(graph, like=model)
        return out, report

    @staticmethod
    def _gather(ctx, current, nodes, per_batch, cfg):
        """{layer name: rows} of ``nodes[0]`` and of the layers after it, as many as fit in
        ``cfg.row_memory_mb``, in one calibration run of ``current``."""
        reqs, budget = [], cfg.row_memory_mb * 2**20
        for n in nodes:
            w = n.inputs[1].values
            size = cfg.max_rows * (w.shape[0] + w.shape[1]) * 4
            if reqs and size > budget:
                break
            budget -= size
            reqs.append(RowSample(n.name, n.inputs[0].name, n.outputs[0].name, per_batch, cfg.max_rows))
        return ctx.collect(reqs, model_x=current, model_y=ctx.reference, desc=f"hadamard {nodes[0].name}")

    @staticmethod
    def _upstream_changed(node, changed):
        seen, stack = set(), [node.inputs[0]]
        while stack:
            t = stack.pop()
            if t.name in seen:
                continue
            seen.add(t.name)
            if t.name in changed:
                return True
            for p in t.inputs:
                stack.extend(i for i in p.inputs if not isinstance(i, gs.Constant))
        return False
