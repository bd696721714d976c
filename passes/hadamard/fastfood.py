"""The Fastfood model of a dense layer and its fit by alternating least squares (Deep Fried
Convnets, Yang et al. 2015; Fastfood, Le, Sarlós & Smola 2013).

A dense layer y = W x + c (W: d_out × d_in) becomes, with x zero-padded to d = 2^⌈log2 d_in⌉,

    y = [ Σ_k S_jk H G_jk Π_jk H B_jk pad(x) ]_{j = 1..⌈d_out/d⌉, sliced to d_out} + U Vᵀ x + c,

B, G, S diagonal (fitted), Π a fixed random permutation, H = H_d/√d the orthonormal Walsh–Hadamard
matrix, K summed blocks per output stack j, and an optional rank-r correction U Vᵀ. Storage is
3d per block instead of d_in·d_out.

The output error E = ‖Ṽ X − Y‖² is quadratic in each diagonal with the other two fixed, so the
diagonals are fitted by alternating least squares. With L, R the fixed factors left and right of a
diagonal u, (Lᵀ L ⊙ R Xᵀ X Rᵀ + αI) u = diag(R Xᵀ Y L); for S the system is diagonal, for G,
Lᵀ L = H S² H is a dyadic (XOR) convolution matrix. The rows enter these systems only through
Xᵀ X and Xᵀ T (T: a block's target rows), so a sweep works on d × d moments (``Block``). Blocks are added one at a time on the residual
(stagewise), then refit together (backfitting); the low-rank part is a whitened truncated SVD of
the least-squares fit of the residual.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from ...lstsq import diagonal_ridge, pcg, ridge_cholesky, ridge_with_factor
from ...parallel import by_columns, matmul, ordered_map
from .transform import diag_fwht, diag_hmh, fwht, hh, next_pow2, xor_index, xor_kernel


MOMENT_ROWS = 1.5   # rows per padded input width from which a sweep from the moments is the cheaper
                    # (measured with one thread, CPU s per sweep rows | moments: d = 512, 410 rows 0.051 | 0.061,
                    # 3316 rows 0.30 | 0.058; d = 1024, 1000 rows 0.26 | 0.38, 3316 rows 0.77 | 0.37; d = 2048,
                    # 3316 rows 2.44 | 2.01)


class Block:
    """One Fastfood block s ⊙ H(g ⊙ Π H(b ⊙ x)), rows x (n × d).

    Its diagonals are fitted from d × d moments only: with Z₂ = X B H Π the rows before G, every
    quantity of a diagonal's normal equations is a product of B, G, S, Π, H with XᵀX and XᵀT (T the
    target rows), so one sweep costs O(d² log d) whatever the row count; the rows are read once
    per target (XᵀT) and once for the block's output (``out``). With few rows (n below a few times
    d) the same sweep from the rows is cheaper (``step_rows``: O(n d²))."""

    def __init__(self, d, rng, mask, perm):
        self.d = d
        self.b = rng.choice([-1.0, 1.0], d)
        self.g = rng.standard_normal(d)
        self.s = np.zeros(d)
        self.perm = perm
        self.mask = mask
        self._z2c = None
        self._z4c = None   # (x, b, g, H(g ⊙ z2)): the transform before S
        self._c2c = None   # (xtx, b, Z₂ᵀZ₂)
        self._w2c = None   # (q, b, Z₂ᵀT)
        self._sfit = None  # (xtx, q, b, g, ridge, (diag(Z₄ᵀZ₄), diag(Z₄ᵀT))) S was last fitted to
        self._sfit_rows = None  # (x, b, g, t, ridge) of ``step_rows``

    # ------------------------------------------------------------ rows (n × d)
    def _z2(self, x):
        """Π H (b ⊙ x), cached while x and b stay the same arrays (b is replaced, never changed
        in place, when it is refit)."""
        c = self._z2c
        if c is not None and c[0] is x and c[1] is self.b:
            return c[2]
        z2 = fwht(x * self.b)[:, self.perm]
        self._z2c = (x, self.b, z2)
        return z2

    def _z4(self, x):
        """H (g ⊙ Π H (b ⊙ x)), cached like ``_z2`` while x, b and g stay the same arrays."""
        c = self._z4c
        if c is not None and c[0] is x and c[1] is self.b and c[2] is self.g:
            return c[3]
        z4 = fwht(self._z2(x) * self.g)
        self._z4c = (x, self.b, self.g, z4)
        return z4

    def forget(self):
        """Drop the cached transforms (n × d floats each per block for the rows, d × d for the
        moments)."""
        self._z2c = self._z4c = self._sfit = self._sfit_rows = self._c2c = self._w2c = None

    def out(self, x):
        return self._z4(x) * self.s

    def _fit_s_rows(self, x, t, ridge):
        """S from the rows; skipped when it was last fitted to the same x, b, g, t and ridge."""
        key = self._sfit_rows
        if key is not None and key[0] is x and key[1] is self.b and key[2] is self.g and key[3] is t \
                and key[4] == ridge:
            return
        z4 = self._z4(x)
        self.s = np.where(self.mask, diagonal_ridge((z4 * z4).sum(0), (z4 * t).sum(0), ridge), 0.0)
        self._sfit_rows = (x, self.b, self.g, t, ridge)

    def _b_kernel(self, hs2h):
        """(H (H S² H ⊙ g gᵀ)_{Π⁻¹} H, Π⁻¹): the matrix B's normal equations multiply XᵀX by
        (``hs2h`` = H S² H; the same in ``step`` and ``step_rows``)."""
        inv = np.argsort(self.perm)
        gi = self.g[inv]
        return hh(hs2h[np.ix_(inv, inv)] * np.outer(gi, gi)), inv   # (H S² H ⊙ g gᵀ) permuted by Π⁻¹

    def step_rows(self, x, t, xtx, ridge, cg=0):
        """``step`` from the rows x (n × d) and targets t themselves: cheaper than the moments
        when there are fewer rows than a few times d (``FastfoodFit.moments``)."""
        self._fit_s_rows(x, t, ridge)
        z2 = self._z2(x)
        hs2h = xor_kernel(self.s ** 2)[xor_index(self.d)]   # H S² H
        hts = fwht(t * self.s)
        self.g = pcg(hs2h * (z2.T @ z2), (z2 * hts).sum(0), self.g, ridge, cg)
        a, inv = self._b_kernel(hs2h)
        mtt = fwht((hts * self.g)[:, inv])
        self.b = pcg(a * xtx, (x * mtt).sum(0), self.b, ridge, cg)
        self._fit_s_rows(x, t, ridge)

    # ------------------------------------------------------------ moments (d × d)
    def _c2(self, xtx):
        """Z₂ᵀZ₂ = Πᵀ H B XᵀX B H Π, cached while xtx and b stay the same arrays."""
        c = self._c2c
        if c is not None and c[0] is xtx and c[1] is self.b:
            return c[2]
        c2 = hh(xtx * np.outer(self.b, self.b))[np.ix_(self.perm, self.perm)]
        self._c2c = (xtx, self.b, c2)
        return c2

    def _w2(self, q):
        """Z₂ᵀT = Πᵀ H B XᵀT (``q`` = XᵀT), cached while q and b stay the same arrays."""
        c = self._w2c
        if c is not None and c[0] is q and c[1] is self.b:
            return c[2]
        w2 = fwht((q * self.b[:, None]).T).T[self.perm]
        self._w2c = (q, self.b, w2)
        return w2

    def gram_out(self, xtx):
        """Xᵀ(block output) = XᵀX B H Π G H S (d × d) from the moments."""
        z = fwht(xtx * self.b)[:, self.perm] * self.g
        return fwht(z) * self.s

    def _fit_s(self, xtx, q, ridge):
        """S from the moments: diag(Z₄ᵀZ₄) S = diag(Z₄ᵀT), Z₄ = Z₂ G H; skipped when it was last
        fitted to the same xtx, q, b, g and ridge (the same solve: an ALS sweep ends with the S
        its next sweep would begin with)."""
        key = self._sfit
        if key is not None and key[0] is xtx and key[1] is q and key[2] is self.b and key[3] is self.g \
                and key[4] == ridge:
            return
        g = self.g
        den = diag_hmh(self._c2(xtx) * np.outer(g, g))                 # diag(H G C₂ G H)
        num = diag_fwht((self._w2(q) * g[:, None]).T)                  # diag(H G Z₂ᵀT)
        self.s = np.where(self.mask, diagonal_ridge(den, num, ridge), 0.0)
        self._sfit = (xtx, q, self.b, self.g, ridge, (den, num))

    def sq_error(self, xtx, q, tt, ridge):
        """‖out − T‖² from the moments (``tt`` = ‖T‖²): Σ_i s_i² (Z₄ᵀZ₄)_ii − 2 s_i (Z₄ᵀT)_ii + ‖T‖²."""
        self._fit_s(xtx, q, ridge)
        den, num = self._sfit[5]
        return float(self.s ** 2 @ den) - 2.0 * float(self.s @ num) + tt

    def step(self, xtx, q, ridge, cg=0):
        """One ALS sweep (S, G, B, S) towards target rows T, from ``xtx`` = XᵀX and ``q`` = XᵀT
        (d × d); ``cg`` > 0: that many conjugate-gradient iterations per diagonal solve instead
        of a Cholesky solve."""
        self._fit_s(xtx, q, ridge)
        c2 = self._c2(xtx)
        hs2h = xor_kernel(self.s ** 2)[xor_index(self.d)]   # H S² H
        rhs_g = diag_fwht(self._w2(q) * self.s)                         # diag(Z₂ᵀ T S H)
        self.g = pcg(hs2h * c2, rhs_g, self.g, ridge, cg)
        a, inv = self._b_kernel(hs2h)
        m = (fwht(q * self.s) * self.g)[:, inv]      # XᵀT S H G Πᵀ
        rhs_b = diag_fwht(m)                          # diag(XᵀT S H G Πᵀ H)
        self.b = pcg(a * xtx, rhs_b, self.b, ridge, cg)
        self._fit_s(xtx, q, ridge)


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

    def pad(self, x):
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
        return self.blocks_out(self.pad(xc)) + xc @ self.u @ self.vt + self.my

    def dense(self):
        """(W_eff d_in × d_out, bias) of the fitted function."""
        eye = np.eye(self.d_in)
        w = self.blocks_out(self.pad(eye)) + self.u @ self.vt
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

    def fit_lowrank(self, xc, t, r, ridge=1e-4, chol=None, xty=None):
        """Rank-r minimiser of ‖xc L − t‖ (whitened truncated SVD of the ridge solution); ``chol``:
        ``whitening(xc, ridge)`` when the caller has it; ``xty``: xcᵀt when the caller has it (then
        ``t`` is not read)."""
        if r == 0:
            self.u, self.vt = np.zeros((self.d_in, 0)), np.zeros((0, self.d_out))
            return
        chol = whitening(xc, ridge) if chol is None else chol
        self.u, self.vt = LowRankBasis(xc, t, chol, r, xty).factors(r)

    def moments(self, xp) -> bool:
        """Whether the sweeps work on d × d moments (many rows) or on the rows (``Block``)."""
        return len(xp) >= MOMENT_ROWS * self.d

    def add_block(self, xp, resid, xtx, iters, ridge, cg=10, restarts=1):
        """Add one block per stack, fitted to the residual rows (the best of ``restarts`` random
        starts: the problem is not convex); returns the new residual. ``xtx`` = xpᵀxp; the sweeps
        read the rows only through it and xpᵀ(residual) (``Block``). The stacks are independent:
        their random starts are drawn in order, then they are fitted on the workers
        (``parallel.ordered_map``)."""
        resid = resid.copy()
        starts = self._starts(restarts)
        moments = self.moments(xp)

        def fit_stack(j):
            t = self._cols(resid, j)
            if moments:
                q = matmul(xp.T, t)
                return _best_start(starts[j], iters, lambda blk: blk.step(xtx, q, ridge, cg),
                                   lambda blk: blk.sq_error(xtx, q, 0.0, ridge))
            return _best_start(starts[j], iters, lambda blk: blk.step_rows(xp, t, xtx, ridge, cg),
                               lambda blk: float(((blk.out(xp) - t) ** 2).sum()))

        for j, blk in enumerate(ordered_map(fit_stack, range(self.n_stack))):
            self.blocks[j].append(blk)
            lo, hi = j * self.d, min((j + 1) * self.d, self.d_out)
            resid[:, lo:hi] -= blk.out(xp)[:, : hi - lo]
            blk.forget()
        return resid

    def _starts(self, restarts):
        """Per stack, ``restarts`` random starts of its next block (drawn in stack order)."""
        starts = []
        for j in range(self.n_stack):
            perm = self.perm(j, len(self.blocks[j]))
            starts.append([Block(self.d, self.rng, self._mask(j), perm) for _ in range(max(1, restarts))])
        return starts

    def add_block_moments(self, xtx, qs, iters, ridge, cg=10, restarts=1):
        """``add_block`` from the moments alone: ``qs`` holds per stack Xᵀ(its residual target) (d × d),
        and the new residual's is Xᵀ(residual) − Xᵀ(block output) (``Block.gram_out``), so no row is
        read (the rows enter through ``xtx`` only). The same blocks as ``add_block`` with moments
        (``moments``); returns the new ``qs``."""
        starts = self._starts(restarts)

        def fit_stack(j):
            q = qs[j]
            return _best_start(starts[j], iters, lambda blk: blk.step(xtx, q, ridge, cg),
                               lambda blk: blk.sq_error(xtx, q, 0.0, ridge))

        out = []
        for j, blk in enumerate(ordered_map(fit_stack, range(self.n_stack))):
            self.blocks[j].append(blk)
            out.append(qs[j] - blk.gram_out(xtx))
            blk.forget()
        return out

    def stack_moments(self, xty):
        """Per stack, Xᵀ(its target columns, zero-padded to d) from ``xty`` = Xᵀ(targets) (d × d_out)."""
        return [self._cols(xty, j) for j in range(self.n_stack)]

    def backfit(self, xp, xc, yc, xtx, sweeps, ridge, cg=10, lowrank_ridge=1e-4, chol=None, xty=None):
        """Sweeps of block-coordinate ALS over all blocks (the stacks, independent, on the
        workers), then refit the low-rank part; ``chol``: ``whitening(xc, lowrank_ridge)`` when the
        caller has it. ``xty``: xpᵀyc (d × d_out) when the caller has it: with sweeps from the
        moments, the targets' moments then come from it and ``xtx`` (Xᵀ(yc − xc U Vᵀ) = XᵀY − XᵀX U Vᵀ,
        and the low-rank part's Xᵀ(yc − blocks) = XᵀY − Σ Xᵀ(block outputs)), not from the rows."""
        r = self.r
        if r and sweeps and chol is None:
            chol = whitening(xc, lowrank_ridge)
        moments = self.moments(xp)
        by_moments = moments and xty is not None
        for _ in range(sweeps):
            if by_moments:
                total = xty - xtx[:, : self.d_in] @ self.u @ self.vt   # Xᵀ(the blocks' target)
            else:
                total = yc - xc @ self.u @ self.vt

            def sweep_rows(j):
                bl = self.blocks[j]
                outs = [blk.out(xp) for blk in bl]
                t_all = self._cols(total, j)
                acc = sum(outs) if outs else 0
                for k, blk in enumerate(bl):
                    t = t_all - (acc - outs[k])
                    blk.step_rows(xp, t, xtx, ridge, cg)
                    new = blk.out(xp)
                    acc = acc - outs[k] + new
                    outs[k] = new

            def sweep_stack(j):   # from the moments: Xᵀ(target of block k) = XᵀT − Σ_{others} Xᵀ(out)
                bl = self.blocks[j]
                if not moments:
                    return sweep_rows(j)
                q_all = self._cols(total, j) if by_moments else matmul(xp.T, self._cols(total, j))
                outs = [blk.gram_out(xtx) for blk in bl]
                acc = sum(outs) if outs else 0
                for k, blk in enumerate(bl):
                    blk.step(xtx, q_all - (acc - outs[k]), ridge, cg)
                    new = blk.gram_out(xtx)
                    acc = acc - outs[k] + new
                    outs[k] = new
                return acc   # Xᵀ(the stack's output)
            accs = ordered_map(sweep_stack, range(self.n_stack))
            if r and by_moments:   # Xᵀ(yc − blocks) from the moments
                xt_blocks = np.concatenate(accs, axis=1)[: self.d_in, : self.d_out]
                self.fit_lowrank(xc, None, r, lowrank_ridge, chol=chol, xty=xty[: self.d_in] - xt_blocks)
            elif r:
                self.fit_lowrank(xc, yc - self.blocks_out(xp), r, lowrank_ridge, chol=chol)
        for bl in self.blocks:
            for blk in bl:
                blk.forget()


def _best_start(starts, iters, step, sq_error):
    """The start (a ``Block``) of ``starts`` with the least squared error after ``iters`` sweeps
    (``step(blk)``; ``sq_error(blk)`` up to a constant); with one start, it."""
    best = None
    for blk in starts:
        for _ in range(iters):
            step(blk)
        if len(starts) == 1:
            return blk
        err = sq_error(blk)
        if best is None or err < best[0]:
            best = (err, blk)
    return best[1]


def whitening(xc, ridge=1e-4):
    """L with L Lᵀ = Cov(xc) + αI (α relative: ``ridge`` × its mean diagonal), xc centred rows."""
    return ridge_cholesky(xc.T @ xc / len(xc), ridge)


class LowRankBasis:
    """The whitened SVD of the ridge least-squares fit of ``t`` on ``xc``, decomposed once: the
    rank-r minimiser of ‖xc L − t‖ for every r is a slice. The top r of the SVD U S Vᵀ of
    m = Lᵀ full come from the eigenvectors of the smaller Gram matrix (only r of them: much faster
    than a full SVD of a wide layer); u = L⁻ᵀ U_r S_r = full V_r."""

    def __init__(self, xc, t, chol, max_rank, xty=None):
        self.xty = matmul(xc.T, t) if xty is None else xty   # kept: the blocks' moments start from it
        self.d_in, self.d_out = self.xty.shape                 # (``_Search.prepare``)
        self.full = by_columns(lambda rhs: ridge_with_factor(chol, rhs), self.xty / len(xc))
        m = matmul(chol.T, self.full)
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

