"""The linear algebra under the hadamard fits: SPD solves with a relative ridge, Jacobi-
preconditioned conjugate gradients from a warm start, the relative error, and the ridge
least-squares refit of a layer kept dense.

The ridge is relative: (A + α I) u = r with α = ridge × the mean diagonal of A, so one setting
serves layers of every scale.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg


def spd_solve(a, rhs, ridge):
    a = a + (ridge * max(np.trace(a) / len(a), 1e-30)) * np.eye(len(a))
    try:
        return scipy.linalg.solve(a, rhs, assume_a="pos", check_finite=False)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return np.linalg.lstsq(a, rhs, rcond=None)[0]


def pcg(a, rhs, x0, ridge, iters):
    """Jacobi-preconditioned conjugate gradients on (a + αI) u = rhs from the warm start x0. Each
    iterate lowers the quadratic objective, so an inexact ALS step still never increases it.
    ``iters`` ≤ 0: the exact solve."""
    if iters <= 0:
        return spd_solve(a, rhs, ridge)
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


def rel_error(pred, y, mean_y):
    """Σ‖pred − y‖² / Σ‖y − mean_y‖²."""
    den = float(((y - mean_y) ** 2).sum())
    return float(((pred - y) ** 2).sum()) / max(den, 1e-30)


def ridge_refit(x, y, ridge=1e-3, fit_bias=True):
    """(W d_in × d_out, b) minimising ‖x W + b − y‖² + α‖W‖² on rows (b = 0 without ``fit_bias``)."""
    mx = x.mean(0) if fit_bias else np.zeros(x.shape[1])
    my = y.mean(0) if fit_bias else np.zeros(y.shape[1])
    xc, yc = x - mx, y - my
    c = xc.T @ xc
    alpha = ridge * max(np.trace(c) / len(c), 1e-12)
    w = scipy.linalg.solve(c + alpha * np.eye(len(c)), xc.T @ yc, assume_a="pos", check_finite=False)
    return w, my - mx @ w
