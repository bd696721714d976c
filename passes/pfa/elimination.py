"""pfa, reconstruction-aware selection: greedy backward elimination of a group's channels on its
consumers' least-squares problems (ThiNet, Luo et al. 2017; He et al. 2017 channel pruning).

For a consumer with inputs x (its im2col/feature columns) and outputs y, H = (Cov(x) + αI)⁻¹ and
W = H Cov(x, y) is the ridge fit. Dropping a channel c (its block B of input columns, k·k for a
k×k Conv) raises min ‖XW − Y‖² by tr(W_Bᵀ H_BB⁻¹ W_B), and the block elimination

    H ← H − H_·B H_BB⁻¹ H_B·,    W ← W − H_·B H_BB⁻¹ W_B

refits the remaining columns without a new solve. Summed over a group's consumers (each relative to
its tr Cov(y)), the increases give the order of removal and the group's error curve e_g(k), which the
budget allocation trades against cost.

That error is measured on the rows it was fitted to. With n rows and p columns left, a least-squares
residual underestimates the error on new data by about (n − p)/(n + p) (ordinary least squares'
in-sample vs. prediction error), so each consumer's share of the curve is scaled by (n + p)/(n − p)
(by n + p where n ≤ p: its fit is then held by the ridge alone). Counting such a consumer as wholly
lost once it loses a channel was tried and dropped: on the digits CNN with 40 samples it moved the
budget onto the early convs (accuracy 99.56 → 95.33 %, against 99.33 % with the scaled curve)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import lapack

from ...lstsq import relative_alpha


@dataclass
class Problem:
    """One consumer's least-squares problem seen from a group: Cov(x) (d×d) and Cov(x, y) (d×m) of its
    inputs and outputs on the unpruned network, the total output variance tr Cov(y), and for each of
    the group's channels the input columns it feeds (an empty array where it feeds none). ``own``:
    tr Cov(y) where ``var`` is another total the error is measured against (a block's output)."""
    cxx: np.ndarray
    cxy: np.ndarray
    var: float
    blocks: list
    rows: int = 0          # rows the moments were summed over (0: unknown, no correction)
    own: float | None = None



def _spd_inverse(a: np.ndarray) -> np.ndarray:
    """The inverse of a symmetric positive definite ``a`` from its Cholesky factor (LAPACK potrf +
    potri: n³ flops, half of an LU inverse's 2n³), mirrored to exact symmetry; an LU inverse where
    the factorization fails (``a`` not numerically positive definite), the pseudo-inverse where
    that fails too."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 2 and a.shape[0] == a.shape[1] and a.shape[0] > 0 and np.isfinite(a).all():
        c, info = lapack.dpotrf(a, lower=False, clean=False)
        if info == 0:
            inv, info = lapack.dpotri(c, lower=False)
            if info == 0:
                inv = np.triu(inv)
                return inv + np.triu(inv, 1).T
    try:
        return np.linalg.inv(a)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(a)


class _Elim:
    """One consumer's state during elimination: H = (Cov(x) + αI)⁻¹ and W = H Cov(x, y) over the
    columns still alive (compacted as columns go), and each channel's columns, by block size."""

    def __init__(self, p: Problem, ridge: float):
        d = p.cxx.shape[0]
        alpha = relative_alpha(p.cxx, ridge)
        self.h = _spd_inverse(p.cxx + alpha * np.eye(d))
        self.w = self.h @ p.cxy
        self.var = max(p.var, 1e-12)
        own = p.var if p.own is None else p.own
        self.base = max(own - float(np.sum(self.w * p.cxy)), 0.0) / self.var
        self.pos = np.arange(d)                       # original column -> current row, -1 once removed
        self.dead = np.zeros(d, dtype=bool)           # current rows already eliminated
        self.blocks = [np.asarray(b, dtype=np.int64) for b in p.blocks]
        self.rows, self.cols = int(p.rows), d         # rows of the fit, columns alive
        self.raw = self.base                          # in-sample relative error so far
        sizes = np.array([len(b) for b in self.blocks])
        self.by_size = {int(s): (np.nonzero(sizes == s)[0], np.stack([self.blocks[c] for c in np.nonzero(sizes == s)[0]]))
                        for s in np.unique(sizes) if s > 0}

    def scores(self, alive: np.ndarray) -> np.ndarray:
        """tr(W_Bᵀ (H_BB)⁻¹ W_B) / tr Cov(y) for every channel (0 for channels without columns here)."""
        out = np.zeros(len(alive))
        h, w = self.h, self.w
        for size, (chans, idx) in self.by_size.items():
            sel = alive[chans]
            if not sel.any():
                continue
            cur = self.pos[idx[sel]]
            if size == 1:
                j = cur[:, 0]
                val = np.einsum("ij,ij->i", w[j], w[j]) / np.maximum(h[j, j], 1e-300)
            else:
                hb = h[cur[:, :, None], cur[:, None, :]]
                wb = w[cur]
                try:
                    x = np.linalg.solve(hb, wb)
                except np.linalg.LinAlgError:
                    x = np.matmul(np.linalg.pinv(hb), wb)
                val = np.einsum("sbm,sbm->s", wb, x)
            out[chans[sel]] = np.maximum(val, 0.0) / self.var
        return out

    def remove(self, chans) -> float:
        """Drop the channels' columns; returns the increase of the relative error. The update runs
        in place on the current arrays (dropped rows become zero and are no longer read); they are
        compacted once a quarter of their rows is dead."""
        orig = np.concatenate([self.blocks[c] for c in chans])
        if len(orig) == 0:
            return 0.0
        cols = self.pos[orig]
        h, w = self.h, self.w
        hb = h[:, cols]
        rhs = np.concatenate([hb.T, w[cols]], axis=1)
        try:
            k = np.linalg.solve(hb[cols], rhs)
        except np.linalg.LinAlgError:
            k = np.linalg.pinv(hb[cols]) @ rhs
        d = h.shape[0]
        inc = max(float(np.sum(w[cols] * k[:, d:])), 0.0) / self.var
        self.raw += inc
        self.cols -= len(cols)
        h -= hb @ k[:, :d]
        w -= hb @ k[:, d:]
        self.pos[orig] = -1
        self.dead[cols] = True
        if self.dead.sum() * 4 >= d:
            keep = ~self.dead
            self.h = h[np.ix_(keep, keep)]
            self.w = w[keep]
            newpos = np.cumsum(keep) - 1
            live = self.pos >= 0
            self.pos[live] = newpos[self.pos[live]]
            self.dead = np.zeros(int(keep.sum()), dtype=bool)
        return inc

    def expected(self) -> float:
        """The relative error to expect on new rows: ``raw`` scaled by (n + p)/max(n − p, 1)."""
        if self.rows <= 0:
            return self.raw
        return self.raw * (self.rows + self.cols) / max(self.rows - self.cols, 1)


class Elimination:
    """Greedy backward elimination of a group's n channels on its consumers' least-squares problems
    (ThiNet, Luo et al. 2017; He et al. 2017): repeatedly drop the channel whose removal increases
    Σ_j min_W ‖X_j W − Y_j‖² / tr Cov(Y_j) the least. With H = (Cov(x) + αI)⁻¹ and W = H Cov(x, y)
    the fit on the kept columns, dropping the columns B costs exactly tr(W_Bᵀ H_BB⁻¹ W_B), and
    H ← H − H_·B H_BB⁻¹ H_B·, W ← W − H_·B H_BB⁻¹ W_B give the fit without them (block elimination).
    Large groups drop ``step_fraction`` of the remaining channels per update (the cheapest ones;
    twice that while more than 256 remain).

    It runs on demand: ``err[k]`` and ``kept(k)`` eliminate only down to k channels (a budget that
    removes a tenth of the channels needs the first steps only, the widest and dearest, not the
    ~16·ln n of a full curve); the steps are the same whenever they run, so a value never depends
    on what was asked before."""

    def __init__(self, problems: list, n: int, ridge: float = 1e-3, step_fraction: float = 1 / 16):
        self.states = [_Elim(p, ridge) for p in problems]
        self.n, self.step_fraction = n, step_fraction
        self.alive = np.ones(n, dtype=bool)
        self.left = n
        self.removed: list = []
        self.err = np.full(n + 1, np.nan)
        self.total = self.err[n] = sum(st.expected() for st in self.states)
        self.err_view = _Curve(self)
        self.closed = False

    def _step(self) -> None:
        alive = self.alive
        score = sum(st.scores(alive) for st in self.states)
        cand = np.nonzero(alive)[0]
        frac = self.step_fraction if len(cand) <= 256 else 2 * self.step_fraction   # wide layers: coarser early steps
        r = max(1, min(int(len(cand) * frac), len(cand) - 1))
        ranked = cand[np.argsort(score[cand], kind="stable")[:r]]
        for st in self.states:
            st.remove(ranked)
        inc = sum(st.expected() for st in self.states) - self.total
        # spread a joint step's increase over its channels in proportion to their single scores
        s = score[ranked]
        share = s / s.sum() if s.sum() > 0 else np.full(r, 1.0 / r)
        for c, f in zip(ranked, share):
            self.total += inc * f
            self.removed.append(int(c))
            alive[c] = False
            self.left -= 1
            self.err[self.left] = self.total

    def run_to(self, k: int) -> None:
        """Eliminate until at most max(k, 1) channels are left (err[k] known)."""
        while self.left > max(int(k), 1):
            if self.closed:
                raise RuntimeError("elimination closed before reaching the count asked")
            self._step()
        if self.left <= 1:
            self.states = []      # done: the consumers' matrices are no longer needed
        if k <= 0:
            self.err[0] = self.err[1]

    def close(self) -> None:
        """Free the consumers' matrices: no further step can run (values already known stay)."""
        self.states = []
        self.closed = True

    def order(self) -> np.ndarray:
        """All n channels in removal order (the full elimination)."""
        self.run_to(0)
        return np.asarray(self.removed + [int(c) for c in np.nonzero(self.alive)[0]], dtype=np.int64)

    def kept(self, k: int) -> np.ndarray:
        """The sorted channels left with ``k`` kept (the last k of ``order()``)."""
        self.run_to(k)
        gone = np.asarray(self.removed[:self.n - int(k)], dtype=np.int64)
        mask = np.ones(self.n, dtype=bool)
        mask[gone] = False
        return np.nonzero(mask)[0]


class _Curve:
    """The error curve e(k) of an ``Elimination``, indexable like the array it fills on demand."""

    def __init__(self, elim: Elimination):
        self.elim = elim

    def __getitem__(self, k):
        self.elim.run_to(k)
        return self.elim.err[k]

    def __len__(self):
        return self.elim.n + 1


def elimination_order(problems: list, n: int, ridge: float = 1e-3, step_fraction: float = 1 / 16):
    """The full ``Elimination``: (order, err), all n channels in removal order, and err[k] = the summed
    relative error with the last k channels of ``order`` kept (err[n]: nothing removed)."""
    e = Elimination(problems, n, ridge, step_fraction)
    return e.order(), e.err
