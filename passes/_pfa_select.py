"""pfa, choosing channels: the PFA recipes on a response spectrum (PFA-En, PFA-KL), the paper's
Pearson-correlation removal order, and reconstruction-aware backward elimination on the consumers'
least-squares problems (which also gives each group's error curve for the budget allocation)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs


# ----------------------------------------------------------------------------- recipes


def spectrum(cov: np.ndarray) -> np.ndarray:
    """Eigenvalues of a covariance, descending, clipped at 0, normalised to sum 1."""
    cov = np.asarray(cov, dtype=np.float64)
    try:
        import scipy.linalg
        ev = scipy.linalg.eigh(cov, eigvals_only=True, driver="ev")
    except Exception:  # no scipy, or no convergence
        ev = np.linalg.eigvalsh(cov)
    lam = np.clip(ev[::-1], 0.0, None)
    total = lam.sum()
    if total <= 0:
        out = np.zeros_like(lam)
        out[0] = 1.0
        return out
    return lam / total


def kept_energy(lam: np.ndarray, energy: float) -> int:
    """PFA-En: smallest k with Σ_{i≤k} λ_i ≥ energy (all of them at energy 1)."""
    n = len(lam)
    if energy >= 1.0:
        return n
    cum = np.cumsum(lam)
    return int(min(n, np.searchsorted(cum, energy - 1e-12, side="left") + 1))


def kept_kl(lam: np.ndarray) -> int:
    """PFA-KL: ceil(n · (1 − KL(λ ‖ uniform) / log n))."""
    n = len(lam)
    if n < 2:
        return n
    nz = lam[lam > 0]
    kl = float(np.sum(nz * np.log(n * nz)))
    return int(min(n, max(1, np.ceil(n * (1.0 - kl / np.log(n)) - 1e-9))))


def round_up(k: int, n: int, multiple: int) -> int:
    k = max(int(k), 1)
    return int(min(n, -(-k // multiple) * multiple))


def pearson_removal_order(cov: np.ndarray) -> np.ndarray:
    """All channels in the order PFA removes them: channels with no variance first, then the one
    whose |Pearson correlations| with the remaining channels sum highest (ties: the highest single
    correlation), recomputed after each removal."""
    cov = np.asarray(cov, dtype=np.float64)
    n = len(cov)
    d = np.diag(cov).copy()
    dead = d <= 1e-10 * max(d.max(initial=0.0), 1e-30)
    s = np.sqrt(np.where(dead, 1.0, d))
    a = np.abs(cov / np.outer(s, s))
    a[dead, :] = 0.0
    a[:, dead] = 0.0
    np.fill_diagonal(a, 0.0)
    alive = np.ones(n, dtype=bool)
    order = [int(i) for i in np.nonzero(dead)[0][np.argsort(d[dead])]]
    alive[order] = False
    sums = a[:, alive].sum(axis=1)
    while alive.sum() > 0:
        cand = np.nonzero(alive)[0]
        best = sums[cand].max()
        ties = cand[sums[cand] >= best - 1e-12]
        j = int(ties[0]) if len(ties) == 1 else int(ties[np.argmax(a[np.ix_(ties, cand)].max(axis=1))])
        order.append(j)
        alive[j] = False
        sums -= a[:, j]
    return np.asarray(order, dtype=np.int64)


# ----------------------------------------------------------------------------- reconstruction-aware selection


@dataclass


class Problem:
    """One consumer's least-squares problem seen from a group: Cov(x) (d×d) and Cov(x, y) (d×m) of its
    inputs and outputs on the unpruned network, the total output variance tr Cov(y), and for each of
    the group's channels the input columns it feeds (an empty array where it feeds none)."""
    cxx: np.ndarray
    cxy: np.ndarray
    var: float
    blocks: list


def _spd_inverse(a: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.inv(a)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(a)


class _Elim:
    """One consumer's state during elimination: H = (Cov(x) + αI)⁻¹ and W = H Cov(x, y) over the
    columns still alive (compacted as columns go), and each channel's columns, by block size."""

    def __init__(self, p: Problem, ridge: float):
        d = p.cxx.shape[0]
        alpha = ridge * max(np.trace(p.cxx) / max(d, 1), 1e-12)
        self.h = _spd_inverse(p.cxx + alpha * np.eye(d))
        self.w = self.h @ p.cxy
        self.var = max(p.var, 1e-12)
        self.base = max(self.var - float(np.sum(self.w * p.cxy)), 0.0) / self.var
        self.pos = np.arange(d)                       # original column -> current row, -1 once removed
        self.dead = np.zeros(d, dtype=bool)           # current rows already eliminated
        self.blocks = [np.asarray(b, dtype=np.int64) for b in p.blocks]
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


def elimination_order(problems: list, n: int, ridge: float = 1e-3, step_fraction: float = 1 / 16):
    """Greedy backward elimination of a group's channels on its consumers' least-squares problems
    (ThiNet, Luo et al. 2017; He et al. 2017): repeatedly drop the channel whose removal increases
    Σ_j min_W ‖X_j W − Y_j‖² / tr Cov(Y_j) the least. With H = (Cov(x) + αI)⁻¹ and W = H Cov(x, y)
    the fit on the kept columns, dropping the columns B costs exactly tr(W_Bᵀ H_BB⁻¹ W_B), and
    H ← H − H_·B H_BB⁻¹ H_B·, W ← W − H_·B H_BB⁻¹ W_B give the fit without them (block elimination).
    Large groups drop ``step_fraction`` of the remaining channels per update (the cheapest ones;
    twice that while more than 256 remain).

    Returns (order, err): all n channels in removal order, and err[k] = the summed relative error
    with the last k channels of ``order`` kept (err[n]: nothing removed)."""
    states = [_Elim(p, ridge) for p in problems]
    alive = np.ones(n, dtype=bool)
    order, err = [], np.zeros(n + 1)
    total = err[n] = sum(st.base for st in states)
    while alive.sum() > 1:
        score = sum(st.scores(alive) for st in states)
        cand = np.nonzero(alive)[0]
        frac = step_fraction if len(cand) <= 256 else 2 * step_fraction   # wide layers: coarser early steps
        r = max(1, min(int(len(cand) * frac), len(cand) - 1))
        ranked = cand[np.argsort(score[cand], kind="stable")[:r]]
        inc = sum(st.remove(ranked) for st in states)
        # spread a joint step's increase over its channels in proportion to their single scores
        s = score[ranked]
        share = s / s.sum() if s.sum() > 0 else np.full(r, 1.0 / r)
        for c, f in zip(ranked, share):
            total += inc * f
            order.append(int(c))
            alive[c] = False
            err[int(alive.sum())] = total
    order.extend(int(c) for c in np.nonzero(alive)[0])
    err[0] = err[1]
    return np.asarray(order, dtype=np.int64), err


def consumer_blocks(an, consumer: str, node: gs.Node) -> dict:
    """{group index: [input columns of ``consumer``'s LayerStats features fed by each channel]}."""
    comps = None
    for e in an.edits:
        if e.kind == "in" and e.node == consumer:
            comps = np.asarray(e.comps)
            break
    if comps is None:
        return {}
    kk = 1
    if node.op == "Conv":
        kk = int(np.prod(node.inputs[1].values.shape[2:]))
    cls = an.roots[comps]
    gids, idx = an.class_group[cls], an.class_index[cls]
    out = {}
    for g in np.unique(gids):
        size = an.groups[g].size
        cols = [[] for _ in range(size)]
        for p in np.nonzero(gids == g)[0]:
            cols[idx[p]].extend(range(p * kk, (p + 1) * kk))
        out[int(g)] = [np.asarray(c, dtype=np.int64) for c in cols]
    return out


def weight_row_norms(node: gs.Node) -> np.ndarray:
    """Squared L2 norm of each output channel's weights."""
    w = node.inputs[1].values.astype(np.float64)
    if node.op == "Conv":
        return (w.reshape(w.shape[0], -1) ** 2).sum(axis=1)
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return (w ** 2).sum(axis=1)
    return (w ** 2).sum(axis=0)
