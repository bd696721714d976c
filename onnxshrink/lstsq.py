"""Least squares: the ridge solves, the relative errors and the iterative solver the passes share.

A weight layer computes y = x W + b (x a feature row, W d_in × d_out, see ``layers``). A refit
looks for

    W', b' = argmin ‖X W' + 1 b'ᵀ − Y‖² + α ‖W' − W0‖²

(W0 = 0: plain ridge; W0 the layer's own weights: a pull toward them, so a layer whose inputs
changed little stays close to what it was where the data cannot pin every weight down). With the
moments of the rows (centred when a bias is fitted) the normal equations are

    (Cov(x) + α I) W' = Cov(x, y) + α W0,        b' = E[y] − E[x]ᵀ W',

and without a bias the uncentred second moments E[x xᵀ], E[x yᵀ] take their place, b' = 0.
α is relative: α = ridge × the mean diagonal of the left-hand matrix (``relative_alpha``), so one
``ridge`` means the same on layers of any scale. This refit is what keeps a model's accuracy
without fine-tuning (ThiNet, Luo et al. 2017; He et al. 2017 channel pruning).

- ``ridge_solve(cm, …)``: from streamed ``stats.CrossMoments`` (memory bounded by d_in·d_out);
  ``ridge_from_moments(cxx, cxy, mx, my, …)`` from the moments themselves (a caller that maps
  them first, e.g. z = x A: Cov z = Aᵀ Cov x A); ``ridge_rows(x, y, …)`` from raw rows.
- ``ridge_cholesky(cxx, ridge)``: the factor L Lᵀ = cxx + αI, and ``ridge_with_factor(L, cxy)``
  the solve with it (several right-hand sides on one factor, or whitening by it);
  ``diagonal_ridge(den, num, ridge)``: the ridge solve of a diagonal system.
- ``solve(a, rhs, spd)``: LU (or Cholesky for SPD) with a least-squares fallback when singular;
  ``spd_solve(a, rhs, ridge)``: (a + αI) u = rhs, α relative.
- ``cg(matvec, rhs, x0, iters, precond, …)``: the preconditioned conjugate-gradient loop, for any
  operator; ``pcg(a, rhs, x0, ridge, iters)`` runs it on (a + αI) u = rhs with a Jacobi
  preconditioner. Each iterate lowers the quadratic ½uᵀAu − rhsᵀu, so a truncated run inside an
  alternating scheme never raises the objective (Hestenes & Stiefel 1952).
- ``choose_ridge(cm_a, cm_b, w0)``: the ridge of a few (``RIDGES``) whose fit on one set of moments
  generalises best to held-out moments, one Cholesky factor per ridge.

Two relative errors with different meanings:
- ``fit_error`` (moments) / ``fit_error_rows`` (rows): how much of the output's variance a fit
  misses, Σ‖x W + b − y‖² / Σ‖y − ȳ‖² (1 − R²; 0 exact, 1 no better than the mean);
- ``weighted_error(t, t_hat, h)``: the relative change of weights under the metric of the input
  second moments, Σ_r (t̂_r − t_r)ᵀ H (t̂_r − t_r) / Σ_r t_rᵀ H t_r (rows r of Wᵀ): the output
  error of a replaced weight relative to the output's own energy (plain relative weight error
  without H). Used by quantizers, whose target is a weight, not a fit.
"""

from __future__ import annotations


import numpy as np
import scipy.linalg

ALPHA_FLOOR = 1e-12


def relative_alpha(a: np.ndarray, ridge: float, floor: float = ALPHA_FLOOR) -> float:
    """α = ridge × the mean diagonal of ``a`` (at least ridge × ``floor``)."""
    d = a.shape[0]
    return ridge * max(float(np.trace(a)) / max(d, 1), floor)


def solve(a: np.ndarray, rhs: np.ndarray, spd: bool = False) -> np.ndarray:
    """x with a x = rhs: LU (``spd``: Cholesky-based, for a symmetric positive definite ``a``);
    least squares when ``a`` is singular."""
    try:
        if spd:
            return scipy.linalg.solve(a, rhs, assume_a="pos", check_finite=False)
        return np.linalg.solve(a, rhs)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return np.linalg.lstsq(a, rhs, rcond=None)[0]


def spd_solve(a: np.ndarray, rhs: np.ndarray, ridge: float, floor: float = 1e-30) -> np.ndarray:
    """(a + αI) u = rhs with α = ``relative_alpha(a, ridge, floor)``, ``a`` SPD."""
    return solve(a + relative_alpha(a, ridge, floor) * np.eye(len(a)), rhs, spd=True)


def ridge_cholesky(cxx: np.ndarray, ridge: float, floor: float = ALPHA_FLOOR) -> np.ndarray:
    """L (lower triangular) with L Lᵀ = cxx + αI, α = ``relative_alpha(cxx, ridge, floor)``: the
    factor of a ridge system, for a caller that solves it for several right-hand sides
    (``ridge_with_factor``) or whitens by it (the rows x L⁻ᵀ have identity covariance)."""
    return np.linalg.cholesky(cxx + relative_alpha(cxx, ridge, floor) * np.eye(len(cxx)))


def ridge_with_factor(chol: np.ndarray, cxy: np.ndarray) -> np.ndarray:
    """W = (cxx + αI)⁻¹ cxy from ``chol = ridge_cholesky(cxx, ridge)``."""
    return scipy.linalg.cho_solve((chol, True), cxy)


def diagonal_ridge(den: np.ndarray, num: np.ndarray, ridge: float, floor: float = 1e-30) -> np.ndarray:
    """u with (diag(den) + αI) u = num, α = ridge × the mean of ``den`` (at least ridge × ``floor``):
    a ridge solve whose matrix is diagonal (one least-squares coefficient per column; a column
    whose ``den`` and ``num`` are 0 gets 0)."""
    return num / (den + ridge * max(den.mean(), floor) + 1e-30)


def ridge_from_moments(cxx, cxy, mx, my, ridge: float = 1e-4, fit_bias: bool = True, w0=None):
    """W (d_in × d_out), b (d_out) from moments: ``cxx``, ``cxy`` centred when ``fit_bias`` (else
    second moments, and b = 0); ``w0``: the weights the ridge pulls toward (None: zero)."""
    d = cxx.shape[0]
    alpha = relative_alpha(cxx, ridge)
    rhs = cxy if w0 is None else cxy + alpha * w0
    w = solve(cxx + alpha * np.eye(d), rhs)
    b = my - mx @ w if fit_bias else np.zeros(cxy.shape[1])
    return w, b


def ridge_solve(cm, ridge: float = 1e-4, fit_bias: bool = True, w0=None):
    """W, b minimising ‖X W + b − Y‖² + α‖W − W0‖² from ``stats.CrossMoments`` (see the module)."""
    cxx, cxy, _, _ = cm.moments(centered=fit_bias)
    return ridge_from_moments(cxx, cxy, cm.x.mean, cm.mean_y, ridge, fit_bias, w0)


def ridge_rows(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3, fit_bias: bool = True):
    """W, b of the ridge fit from raw rows x (n × d_in), y (n × d_out); Cholesky solve of the
    centred (when ``fit_bias``) normal equations, α relative to their mean diagonal."""
    mx = x.mean(0) if fit_bias else np.zeros(x.shape[1])
    my = y.mean(0) if fit_bias else np.zeros(y.shape[1])
    xc, yc = x - mx, y - my
    c = xc.T @ xc
    alpha = relative_alpha(c, ridge)
    w = scipy.linalg.solve(c + alpha * np.eye(len(c)), xc.T @ yc, assume_a="pos", check_finite=False)
    return w, my - mx @ w


def cg(matvec, rhs, x0, iters: int, precond=None, dot=None, stop: float = 0.0, project=None, until=None):
    """Preconditioned conjugate gradients on A u = rhs, A symmetric positive (semi)definite given
    by ``matvec`` (arrays of any shape: a matrix-free operator), from the warm start ``x0``, at
    most ``iters`` iterations. ``precond(r)``: an SPD approximation of A⁻¹ applied to the residual
    (default: none); ``dot(a, b)``: the inner product (default Σ a ⊙ b); stops when rᵀz ≤ ``stop``
    or a direction has no positive curvature; ``project(r)``: zero the residual where u is held
    fixed (in place), e.g. unused rows of a codebook; ``until(u, r, lowered)``: stop when it
    returns True, given the iterate, its residual and how much the step lowered the quadratic
    uᵀAu − 2 rhsᵀu (step size times rᵀz), e.g. once that is small against the objective."""
    precond = precond if precond is not None else (lambda r: r)
    dot = dot if dot is not None else (lambda a, b: float((a * b).sum()))
    x = x0.copy()
    r = rhs - matvec(x)
    if project is not None:
        project(r)
    z = precond(r)
    p = z.copy()
    rz = dot(r, z)
    for _ in range(iters):
        if rz <= stop:
            break
        ap = matvec(p)
        pap = dot(p, ap)
        if pap <= 0:
            break
        step = rz / pap
        x += step * p
        r -= step * ap
        if project is not None:
            project(r)
        if until is not None and until(x, r, step * rz):
            break
        z = precond(r)
        rz_new = dot(r, z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


def pcg(a: np.ndarray, rhs: np.ndarray, x0: np.ndarray, ridge: float, iters: int) -> np.ndarray:
    """``cg`` on (a + αI) u = rhs for a dense matrix ``a``, Jacobi-preconditioned (α relative, see
    ``spd_solve``); ``iters`` ≤ 0: the exact SPD solve."""
    if iters <= 0:
        return spd_solve(a, rhs, ridge)
    diag = np.diag(a).copy()
    alpha = ridge * max(diag.mean(), 1e-30)
    diag += alpha
    return cg(lambda v: a @ v + alpha * v, rhs, x0, iters, precond=lambda r: r / diag,
              dot=lambda u, v: u @ v, stop=1e-30)


def fit_error(cm, w: np.ndarray, b: np.ndarray) -> float:
    """Σ‖x W + b − y‖² / Σ‖y − ȳ‖² over the rows of ``stats.CrossMoments`` (matrix products only)."""
    n = max(cm.n, 1)
    mx, my = cm.x.mean, cm.mean_y
    pred2 = np.sum(w * (cm.x.second @ w), axis=0) + 2 * b * (mx @ w) + b * b
    cross = np.sum(w * (cm.xy / n), axis=0) + b * my
    err = pred2 - 2 * cross + cm.yy / n
    var = cm.yy / n - my * my
    return float(max(err.sum(), 0.0) / max(var.sum(), 1e-12))


def fit_error_rows(pred: np.ndarray, y: np.ndarray, mean_y=None) -> float:
    """Σ‖pred − y‖² / Σ‖y − ȳ‖² on rows (``mean_y``: ȳ, default the rows' mean; give the fit's
    own to judge held-out rows against it)."""
    mean_y = y.mean(0) if mean_y is None else mean_y
    den = float(((y - mean_y) ** 2).sum())
    return float(((pred - y) ** 2).sum()) / max(den, 1e-30)


def weighted_error(t: np.ndarray, t_hat: np.ndarray, h: np.ndarray | None = None) -> float:
    """Σ_r (t̂_r − t_r)ᵀ H (t̂_r − t_r) / Σ_r t_rᵀ H t_r over the rows of T (outputs × d_in);
    without ``h`` the relative squared weight error."""
    delta = t - t_hat
    if h is None:
        return float((delta ** 2).sum() / max((t ** 2).sum(), 1e-30))
    return float(((delta @ h) * delta).sum() / max(((t @ h) * t).sum(), 1e-30))


RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)   # the relative ridges ``choose_ridge`` tries by default


def choose_ridge(cm_a, cm_b, w0=None, ridges=RIDGES, columns: int = 64, seed: int = 0) -> float:
    """The ridge of ``ridges`` whose fit on the moments ``cm_a`` (toward ``w0``, or zero) has the
    lowest ``fit_error`` on the held-out moments ``cm_b`` (both ``stats.CrossMoments``; ``ridge_errors``)."""
    held = ridge_errors(cm_a, cm_b, w0, ridges, columns, seed)
    return float(ridges[int(np.argmin(held))]) if held is not None else float(ridges[len(ridges) // 2])


def ridge_errors(cm_a, cm_b, w0=None, ridges=RIDGES, columns: int = 64, seed: int = 0):
    """[held-out ``fit_error`` on ``cm_b`` of the fit on ``cm_a`` at each ridge of ``ridges``] (None
    where Cov_a(x) has no eigendecomposition either).
    W_α = (Cov_a(x) + αI)⁻¹ (Cov_a(x, y) + α W0), α relative (``relative_alpha``), each α by its
    own Cholesky factor (a third of d³ each, the ridges side by side on the fitting workers:
    ``parallel.ordered_map``; one eigendecomposition serving every α costs several d³ on one
    core), or where a factor fails (Cov_a(x) not positive definite to rounding) from one
    eigendecomposition Cov_a(x) = V diag(e) Vᵀ, e clipped at 0. The held-out error is measured on at
    most ``columns`` output columns (a random subset drawn with ``seed``), which is enough to rank a
    scalar."""
    from .parallel import ordered_map
    m = cm_a.sum_y.shape[0]
    sub = np.sort(np.random.default_rng(seed).choice(m, size=columns, replace=False)) if m > columns else np.arange(m)
    mask = np.zeros(m, dtype=bool)
    mask[sub] = True
    a, b = cm_a.outputs(mask), cm_b.outputs(mask)
    cxx, cxy, mx, my = a.moments(centered=True)
    w0 = w0[:, sub] if w0 is not None else None

    def held_out(r):
        try:
            chol = ridge_cholesky(cxx, r)
        except np.linalg.LinAlgError:
            return None
        alpha = relative_alpha(cxx, r)
        w = ridge_with_factor(chol, cxy if w0 is None else cxy + alpha * w0)
        return fit_error(b, w, my - mx @ w)
    held = ordered_map(held_out, ridges)
    if any(h is None for h in held):
        try:
            e, v = np.linalg.eigh(cxx)
        except np.linalg.LinAlgError:
            return None
        e = np.clip(e, 0.0, None)
        p = v.T @ cxy
        p0 = v.T @ w0 if w0 is not None else np.zeros_like(p)
        held = []
        for r in ridges:
            alpha = relative_alpha(cxx, r)
            w = v @ ((p + alpha * p0) / (e + alpha)[:, None])
            held.append(fit_error(b, w, my - mx @ w))
    return held


def deterministic():
    """Run the block with one BLAS thread: k-means and code assignments compare float sums, and a
    BLAS that splits a product differently with more threads could round them differently and flip
    an argmin; the result must not depend on OMP/OPENBLAS/MKL_NUM_THREADS."""
    from .parallel import one_blas_thread
    return one_blas_thread()
