"""Assignment with error feedback and the codebook refit, both on the full input covariance.

With a codebook fixed, sub-vectors are assigned block by block along the input features (optimal
brain quantization, as in GPTQ/GPTVQ): H⁻¹ = UᵀU (U upper Cholesky); block F is assigned under
the metric G = (U_FFᵀU_FF)⁻¹, then the blocks R not yet assigned absorb its error,
W_R −= U_FRᵀ U_FF⁻ᵀ (W_F − Ŵ_F). With the codes fixed, the codebook is refit by least squares on
the full H, min_C Σ_r (t̂_r(C) − t_r)ᵀ H (t̂_r(C) − t_r), with a block-Jacobi preconditioned
conjugate gradient.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg.lapack import dgetrf, dgetrs, dpotrf, dtrtri

from ...lstsq import cg
from .kmeans import bincount_rows, scalar_index


def hinv_cholesky(h):
    """U upper triangular with H⁻¹ = UᵀU (what ``gptq_assign`` works with; the same for every
    (d, K) tried on one layer, so callers may compute it once). With J the order-reversing
    permutation, J H J = L Lᵀ (Cholesky) gives H = M Mᵀ with M = J L J upper, so U = M⁻¹ = J L⁻¹ J:
    one Cholesky and one triangular inverse, no general inverse (a third of the work)."""
    l, info = dpotrf(np.ascontiguousarray(h[::-1, ::-1], dtype=np.float64), lower=1, clean=1)
    if info == 0:
        li, info = dtrtri(l, lower=1)
    if info != 0:
        raise np.linalg.LinAlgError("the damped input covariance is not positive definite")
    return np.ascontiguousarray(li[::-1, ::-1])   # dpotrf cleaned L's upper part: L⁻¹'s is 0 too


INNER = 8   # features within a group that a block's error reaches at once (``gptq_assign``)


def gptq_blocks(u, d):
    """What ``gptq_assign`` needs of U for sub-vectors of length d, before any codebook: the
    diagonal blocks U_bb, and for d > 1 each block's metric G_b = (U_bbᵀU_bb)⁻¹ and the LU factors
    of U_bbᵀ (the same for every K tried on a layer at one d: ``quantize`` keeps them)."""
    nb = len(u) // d
    ar = np.arange(nb)
    ubb = u.reshape(nb, d, nb, d)[ar, :, ar, :]
    if d == 1:
        return ubb, None, None
    gms = np.linalg.inv(np.matmul(ubb.transpose(0, 2, 1), ubb))
    gms = 0.5 * (gms + gms.transpose(0, 2, 1))
    lus = [dgetrf(ubb[b].T)[:2] for b in range(nb)]   # U_bbᵀ = LU, for the solves below (gesv's own steps)
    return ubb, gms, lus


def gptq_assign(t, d, c, h, group=64, u=None, inner=INNER, blocks=None):
    """Assign sub-vectors block by block along the input features with a fixed codebook,
    feeding each block's error forward to the blocks not yet assigned (optimal brain
    quantization with H⁻¹ = UᵀU, U upper Cholesky): metric G = (U_FFᵀU_FF)⁻¹ for block F, update
    W_R −= U_FRᵀ U_FF⁻ᵀ Δ_F. t: rows × d_in (row = one output). The updates are lazy on two
    levels: beyond the current group of ``group`` features they are applied once per group, and
    within the group beyond the current run of ``inner`` features once per run (one product
    each; a block's own rank-d update reaches only the rest of its run, so the per-block work is
    a few small steps whatever the group: on vit_focus's layers the scalar codes' assignment took
    about half the time of rank-1 updates over the whole group). Scalar codes (d = 1): the
    nearest centroid by binary search (the metric is a positive scalar). ``u``:
    ``hinv_cholesky(h)``, ``blocks``: ``gptq_blocks(u, d)``, when known."""
    rows, d_in = t.shape
    nb = d_in // d
    u = hinv_cholesky(h) if u is None else u
    w = t.T.copy()  # d_in × rows
    codes = np.empty((nb, rows), dtype=np.int64)   # block-major: each block writes one contiguous row
    per = max(1, group // d)
    sub = max(1, inner // d)
    ct = c.T.copy()
    ubb, gms, lus = gptq_blocks(u, d) if blocks is None else blocks
    if d > 1:   # every block's centroid norms c_kᵀG_b c_k, in a batch
        qs = np.einsum("kd,bde,ke->bk", c, gms, c).astype(np.float32)
        gct = (-2.0 * np.matmul(gms, ct)).astype(np.float32)   # −2 G_b Cᵀ: the scores are float32 products
    else:
        scalar = c[:, 0]
        mids, first = scalar_index(scalar)   # the sorted centroids, searched once per input feature
        diag = ubb[:, 0, 0]
    for g0 in range(0, nb, per):
        g1 = min(nb, g0 + per)
        lo, hi = g0 * d, g1 * d
        wg, ug = w[lo:hi], u[lo:hi, lo:hi]   # the group's features (a view: updated in place)
        zs = np.empty_like(wg)
        for s0 in range(g0, g1, sub):
            a, e = (s0 - g0) * d, (min(g1, s0 + sub) - g0) * d   # the run's features in the group
            for f0 in range(a, e, d):
                b, f1 = g0 + f0 // d, f0 + d
                wf, z = wg[f0:f1], zs[f0:f1]
                if d == 1:
                    cb = first[np.searchsorted(mids, wf[0])]   # ``nearest_scalar``
                    np.subtract(wf, scalar[cb], out=z)
                    z /= diag[b]
                else:
                    scores = wf.T.astype(np.float32) @ gct[b]
                    scores += qs[b]
                    cb = np.argmin(scores, axis=1)
                    z[:] = dgetrs(*lus[b], wf - ct[:, cb])[0]
                codes[b] = cb
                if f1 < e:
                    wg[f1:e] -= ug[f0:f1, f1:e].T @ z
            if e < hi - lo:
                wg[e:] -= ug[a:e, e:].T @ zs[a:e]
        if hi < d_in:
            w[hi:] -= u[lo:hi, hi:].T @ zs
    return np.ascontiguousarray(codes.T)


REFINE_TOL = 1e-3   # the codebook refit stops once a step lowers the output error by less than this fraction


def refine_codebook(t, codes, c, h, steps, th=None, tol=REFINE_TOL, h32=None):
    """Least squares for the codebook with the assignments fixed, on the full covariance:
    min_C Σ_r (t̂_r(C) − t_r)ᵀ H (t̂_r(C) − t_r); ``lstsq.cg``, matrix-free, preconditioned by
    the per-centroid blocks Σ_b count_bk H_b, at most ``steps`` steps, and none more once a step
    lowered the error by less than ``tol`` times the error left (the error is
    f(C) = CᵀAC − 2bᵀC + Σ_r t_rᵀHt_r, and a CG step lowers it by its step size times rᵀz).
    The operator's products with H are float32 (the steps refine a warm start; the error and
    the right-hand side stay float64). ``th``: T H when known (it is the same for every (d, K)
    tried on one layer), ``h32``: H in float32, when known (likewise)."""
    rows, nb = codes.shape
    k, d = c.shape
    flat = codes.reshape(-1)
    h32 = h.astype(np.float32) if h32 is None else h32
    th = t @ h if th is None else th
    tht = float((th * t).sum())

    def scatter(g):  # rows × d_in -> k × d
        return bincount_rows(flat, g.reshape(-1, d), k)

    def op(cc):
        return scatter(cc.astype(np.float32)[flat].reshape(rows, nb * d) @ h32)

    hb = h.reshape(nb, d, nb, d)[np.arange(nb), :, np.arange(nb), :]
    counts = np.bincount(np.tile(np.arange(nb), rows) * k + flat, minlength=nb * k).reshape(nb, k)
    pre = np.einsum("bk,bde->kde", counts.astype(np.float64), hb)
    used = counts.sum(0) > 0
    pre[~used] = np.eye(d)
    pinv = np.linalg.inv(pre)

    def project(r):  # centroids no sub-vector uses stay as they are
        r[~used] = 0

    rhs = scatter(th)

    def until(x, r, lowered):   # f(x) = tᵀHt − bᵀx − rᵀx (A x = b − r)
        return lowered <= tol * max(tht - float((rhs * x).sum()) - float((r * x).sum()), 0.0)

    return cg(op, rhs, c, steps, precond=lambda r: np.einsum("kde,ke->kd", pinv, r), project=project,
              until=until if tol > 0 else None)
