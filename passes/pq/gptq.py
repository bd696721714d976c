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
from scipy.linalg.lapack import dgetrf, dgetrs

from ...lstsq import cg
from .kmeans import bincount_rows


def hinv_cholesky(h):
    """U upper triangular with H⁻¹ = UᵀU (what ``gptq_assign`` works with; the same for every
    (d, K) tried on one layer, so callers may compute it once)."""
    hinv = np.linalg.inv(h)
    return np.linalg.cholesky(0.5 * (hinv + hinv.T)).T


def gptq_assign(t, d, c, h, group=256, u=None):
    """Assign sub-vectors block by block along the input features with a fixed codebook,
    feeding each block's error forward to the blocks not yet assigned (optimal brain
    quantization with H⁻¹ = UᵀU, U upper Cholesky): metric G = (U_FFᵀU_FF)⁻¹ for block F, update
    W_R −= U_FRᵀ U_FF⁻ᵀ Δ_F. t: rows × d_in (row = one output). Updates beyond the current group
    of blocks are applied once per group (lazy batch). ``u``: ``hinv_cholesky(h)`` when known."""
    rows, d_in = t.shape
    nb = d_in // d
    u = hinv_cholesky(h) if u is None else u
    w = t.T.copy()  # d_in × rows
    codes = np.empty((rows, nb), dtype=np.int64)
    per = max(1, group // d)
    ct = c.T.copy()
    # every block's metric G_b = (U_bbᵀU_bb)⁻¹ and centroid norms c_kᵀG_b c_k, in batches
    ar = np.arange(nb)
    ubb = u.reshape(nb, d, nb, d)[ar, :, ar, :]
    gms = np.linalg.inv(np.matmul(ubb.transpose(0, 2, 1), ubb))
    gms = 0.5 * (gms + gms.transpose(0, 2, 1))
    qs = np.einsum("kd,bde,ke->bk", c, gms, c)
    lus = [dgetrf(ubb[b].T)[:2] for b in range(nb)]   # U_bbᵀ = LU, for the solves below (gesv's own steps)
    for g0 in range(0, nb, per):
        g1 = min(nb, g0 + per)
        lo, hi = g0 * d, g1 * d
        wg = w[lo:hi].copy()
        zs = np.empty_like(wg)
        for b in range(g0, g1):
            f = slice(b * d - lo, (b + 1) * d - lo)
            fa = slice(b * d, (b + 1) * d)
            wf = wg[f]
            cb = np.argmin(qs[b][None, :] - 2.0 * (wf.T @ gms[b]) @ ct, axis=1)
            codes[:, b] = cb
            z = dgetrs(*lus[b], wf - ct[:, cb])[0]
            zs[f] = z
            if b + 1 < g1:
                wg[f.stop:] -= u[fa, (b + 1) * d:hi].T @ z
        if hi < d_in:
            w[hi:] -= u[lo:hi, hi:].T @ zs
    return codes


def refine_codebook(t, codes, c, h, steps):
    """Least squares for the codebook with the assignments fixed, on the full covariance:
    min_C Σ_r (t̂_r(C) − t_r)ᵀ H (t̂_r(C) − t_r); ``lstsq.cg``, matrix-free, preconditioned by
    the per-centroid blocks Σ_b count_bk H_b."""
    rows, nb = codes.shape
    k, d = c.shape
    flat = codes.reshape(-1)

    def scatter(g):  # rows × d_in -> k × d
        return bincount_rows(flat, g.reshape(-1, d), k)

    def op(cc):
        return scatter(cc[flat].reshape(rows, nb * d) @ h)

    hb = h.reshape(nb, d, nb, d)[np.arange(nb), :, np.arange(nb), :]
    counts = np.bincount(np.tile(np.arange(nb), rows) * k + flat, minlength=nb * k).reshape(nb, k)
    pre = np.einsum("bk,bde->kde", counts.astype(np.float64), hb)
    used = counts.sum(0) > 0
    pre[~used] = np.eye(d)
    pinv = np.linalg.inv(pre)

    def project(r):  # centroids no sub-vector uses stay as they are
        r[~used] = 0

    return cg(op, scatter(t @ h), c, steps, precond=lambda r: np.einsum("kde,ke->kd", pinv, r), project=project)
