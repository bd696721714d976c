"""pfa, the paper's recipes on a response spectrum (Suau et al., "Filter Distillation for Network
Compression", WACV 2020). With λ the eigenvalues of the channels' response covariance, descending,
normalised to sum 1:

    PFA-En:  keep the smallest k with Σ_{i≤k} λ_i ≥ energy;
    PFA-KL:  KL = Σ λ_i log(n λ_i) (the divergence from uniform, at most log n),
             keep ceil(n · (1 − KL / log n));

and the paper's order of removal: repeatedly the channel whose |Pearson correlations| with the
remaining channels sum highest."""

from __future__ import annotations

import numpy as np


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
