"""k-means on sub-vectors: plain (Euclidean) and under per-block metrics.

Plain k-means (k-means++ seeding, vectorised Lloyd steps) initialises a layer's codebook C from
its sub-vectors w_i. The activation-aware EM ("And the Bit Goes Down: Revisiting the Quantization
of Neural Networks") then measures a sub-vector of input block b with H_b, the b-th diagonal
block of the damped input covariance H:
    E-step  code(i) = argmin_k (w_i − c_k)ᵀ H_b (w_i − c_k) = argmin_k c_kᵀH_b c_k − 2 (H_b w_i)ᵀ c_k,
    M-step  c_k = (Σ_{i∈k} H_b(i))⁻¹ Σ_{i∈k} H_b(i) w_i.
Distances are float32 products in cache-sized chunks (the EM's: one product per block with the
centroid norms in it, ``scores``); scalar centroids (d = 1) need no n × k table: the points, the
same every round, are sorted once and the k − 1 midpoints between the sorted centroids searched in
them (``nearest_scalar``); a code is then a run of the sorted points, and the per-code sums a
Lloyd or EM round needs are differences of prefix sums at the runs' ends (``Sorted``: O(k log n) a
round, the points touched once). Both iterate until the codes no longer change or a round lowers
the objective by less than ``TOL`` of it (early stop).
"""

from __future__ import annotations

import numpy as np


def scalar_index(c):
    """(midpoints between the sorted scalar centroids c, the centroid index of each interval):
    what ``nearest_scalar`` searches, computed once for a codebook used many times."""
    order = np.argsort(c, kind="stable")
    cs = c[order]
    mids = 0.5 * (cs[1:] + cs[:-1])
    # equal centroids: the lowest index among them, as argmin would
    first = order[np.searchsorted(cs, cs, side="left")].astype(np.int64)
    return mids, first


def ranked(v):
    """(the order that sorts v, v sorted): for ``nearest_scalar`` on points searched again and again."""
    order = np.argsort(v, kind="stable")
    return order, v[order]


def nearest_scalar(v, c, index=None, rank=None):
    """Index of the nearest of the scalar centroids c for each v (ties to the lower index), by
    binary search in the sorted centroids: O(n log k) instead of the n × k distance table.
    ``index``: ``scalar_index(c)`` when known. ``rank``: ``ranked(v)`` when known; then the k − 1
    midpoints are searched in the sorted points instead (O(k log n)): the interval of v_i is the
    count of midpoints below it, a step function along the sorted points."""
    mids, first = scalar_index(c) if index is None else index
    if rank is None:
        return first[np.searchsorted(mids, v, side="left")]
    order, vs = rank
    steps = np.searchsorted(vs, mids, side="right")   # the first sorted point above each midpoint
    pos = np.repeat(np.arange(len(mids) + 1), np.diff(steps, prepend=0, append=len(vs)))
    out = np.empty(len(vs), dtype=first.dtype)
    out[order] = first[pos]
    return out


def bincount_rows(codes, vals, k):
    """Σ of the rows of vals per code: (k, d)."""
    return np.stack([np.bincount(codes, weights=vals[:, e], minlength=k) for e in range(vals.shape[1])], axis=1)


class Sorted:
    """Scalar points v (n) with weights sorted once, for 1-D k-means (``hb``: point i weighs
    hb[i mod len(hb)], the metric of its input block; None: 1 each): the
    nearest of the scalar centroids c makes each code a run of the sorted points (between the
    midpoints of the sorted centroids, ``scalar_index``), so a round's per-code count, Σ h and
    Σ h·v are differences of prefix sums at the runs' ends (O(k log n), no pass over the points).
    ``runs(c)``: (ends, code of each run); ``codes(runs)``: the n codes in the points' order."""

    def __init__(self, v, hb=None):
        # not a stable sort (several times faster): equal points share their code whatever their order
        self.order = np.argsort(v)
        self.v = v[self.order]
        self.h = np.ones(len(v)) if hb is None else hb[self.order % len(hb)]
        self.cw = np.concatenate([[0.0], np.cumsum(self.h)])
        self.cs = np.concatenate([[0.0], np.cumsum(self.h * self.v)])
        self.vhv = float(self.h @ (self.v * self.v))   # Σ h·v²

    def runs(self, c):
        """(ends of the runs, k + 1; the code of each run) of the nearest of the centroids c (k)."""
        mids, first = scalar_index(c)
        ends = np.empty(len(c) + 1, dtype=np.int64)
        ends[0], ends[-1] = 0, len(self.v)
        ends[1:-1] = np.searchsorted(self.v, mids, side="right")   # the first point above each midpoint
        return ends, first

    def sums(self, runs, k):
        """(count, Σ h, Σ h·v) per code (k each)."""
        ends, first = runs
        return (np.bincount(first, weights=np.diff(ends), minlength=k),
                np.bincount(first, weights=np.diff(self.cw[ends]), minlength=k),
                np.bincount(first, weights=np.diff(self.cs[ends]), minlength=k))

    def sorted_codes(self, runs):
        """The codes of the sorted points."""
        ends, first = runs
        return np.repeat(first.astype(np.int16), np.diff(ends))

    def codes(self, sorted_codes):
        """Codes of the sorted points -> the codes in the points' order (int64)."""
        out = np.empty(len(self.v), dtype=np.int64)
        out[self.order] = sorted_codes
        return out

    def lloyd(self, c, iters, tol, codes=None):
        """At most ``iters`` rounds of c_k = Σ_{i∈k} h_i v_i / Σ_{i∈k} h_i, each from the codes of
        the round before (the first from ``codes``, None: the nearest of c), then the nearest codes
        of the new centroids; stopped when the codes no longer change or a round lowers
        Σ h (v − c_code)² by less than ``tol`` of it -> (centroids k × 1, codes in the points'
        order)."""
        k = len(c)
        c = c.copy()
        if codes is None:
            runs = self.runs(c[:, 0])
            cur = self.sorted_codes(runs)
            n, w, hv = self.sums(runs, k)
        else:
            cur = codes[self.order].astype(np.int16)
            n = np.bincount(cur, minlength=k).astype(np.float64)
            w = np.bincount(cur, weights=self.h, minlength=k)
            hv = np.bincount(cur, weights=self.h * self.v, minlength=k)

        def objective():
            return self.vhv - 2.0 * float(hv @ c[:, 0]) + float(w @ (c[:, 0] * c[:, 0]))

        before = objective() if tol > 0 else 0.0
        for _ in range(iters):
            nz = n > 0
            c[nz, 0] = hv[nz] / w[nz]
            runs = self.runs(c[:, 0])
            new = self.sorted_codes(runs)
            if np.array_equal(new, cur):
                break
            cur = new
            n, w, hv = self.sums(runs, k)
            if tol > 0:
                after = objective()
                if before - after <= tol * after:
                    break
                before = after
        return c, self.codes(cur)


CHUNK = 512   # sub-vectors scored at once (512 × 256 float32 scores: 512 KB, within L2; 2048 at a time took
              # 1.4 times as long)


def scores(c, const):
    """The (d+1) × K float32 factor of the score table [x, 1] @ [−2 Cᵀ; const]: the score of
    centroid k is const_k − 2 xᵀc_k, the constant riding in the product instead of a separate
    pass over the table (``_metric_assign``: const_k = c_kᵀH_b c_k, x = H_b w)."""
    out = np.empty((c.shape[1] + 1, len(c)), dtype=np.float32)
    out[:-1] = -2.0 * c.T
    out[-1] = const
    return out


def augmented(x):
    """[x, 1] in float32 (n × (d+1)): the points of ``_sqdist_argmin``'s products."""
    out = np.empty((len(x), x.shape[1] + 1), dtype=np.float32)
    out[:, :-1] = x
    out[:, -1] = 1.0
    return out


def _sqdist_argmin(x, c, chunk=CHUNK, xa=None, rank=None):
    """Nearest centroid (Euclidean) of each row of x: argmin_k ‖c_k‖² − 2 xᵀc_k, one float32
    product [x, 1] @ [−2 Cᵀ; ‖c‖²] (``scores``) per chunk of ``CHUNK`` rows (in
    cache; a product of its own and a sum with the norms over a fresh 4096 × 256 table took about
    four times as long). ``xa`` (d > 1): ``augmented(x)``, ``rank`` (d = 1): ``ranked(x[:, 0])``,
    when known (the same points searched again)."""
    if c.shape[1] == 1:
        return nearest_scalar(x[:, 0], c[:, 0], rank=rank)
    f = scores(c, (c.astype(np.float32) ** 2).sum(1))
    out = np.empty(len(x), dtype=np.int64)
    for s in range(0, len(x), chunk):
        part = xa[s:s + chunk] if xa is not None else augmented(x[s:s + chunk])
        out[s:s + chunk] = (part @ f).argmin(1)
    return out


def _kmeanspp(x, k, rng, sample=20000):
    if len(x) > sample:
        x = x[np.sort(rng.choice(len(x), size=sample, replace=False))]
    centers = np.empty((k, x.shape[1]))
    centers[0] = x[rng.integers(len(x))]
    scalar = x[:, 0] if x.shape[1] == 1 else None   # d = 1: distances on the 1-D array
    xx = (x ** 2).sum(1)
    xt = np.ascontiguousarray(x.T)   # d × n: the product below runs along the points

    buf = np.empty(len(x)) if scalar is not None else None

    def dist2(c):   # ‖x − c‖² = ‖x‖² − 2 xᵀc + ‖c‖² (a matrix-vector product), not below 0
        if scalar is not None:   # (x − c)², in a buffer of its own
            np.subtract(scalar, c[0], out=buf)
            return np.multiply(buf, buf, out=buf)
        out = (-2.0 * c) @ xt
        out += xx
        out += c @ c
        return np.maximum(out, 0.0, out=out)

    d2 = dist2(centers[0]).copy()   # (the buffer is the next call's)
    # the draw ∝ d2 in two steps: a block of SEED_BLOCK points by the running sum of the blocks' sums,
    # then a point in it (one running sum over every point each round took half the seeding's time)
    starts = np.arange(0, len(x), SEED_BLOCK)
    for i in range(1, k):
        cb = np.cumsum(np.add.reduceat(d2, starts))
        total = cb[-1]
        if total <= 0:
            centers[i:] = centers[0]
            break
        r = rng.random() * total
        b = min(int(np.searchsorted(cb, r)), len(cb) - 1)
        lo = starts[b]
        j = lo + int(np.searchsorted(np.cumsum(d2[lo:lo + SEED_BLOCK]), r - (cb[b - 1] if b else 0.0)))
        centers[i] = x[min(j, len(x) - 1)]
        np.minimum(d2, dist2(centers[i]), out=d2)
    return centers


SEED_BLOCK = 256   # points a block of the seeding's draw holds


TOL = 1e-3   # Lloyd and EM rounds stop once a round lowers the objective by less than this fraction of it
SAMPLE = 65536   # sub-vectors the Lloyd steps fit on (then one assignment of all)


def kmeans(x, k, iters, rng, sample=SAMPLE, tol=TOL, assign=True):
    """Plain k-means (k-means++ seeding, at most ``iters`` Lloyd steps on at most ``sample``
    points, stopped early when the codes no longer change or a step lowers the summed squared
    distance by less than ``tol`` of it; then one assignment of all points) -> (centroids k×d,
    codes). Scalar points (d = 1): the steps on the points sorted once (``Sorted``).
    ``assign`` False: no assignment of all points (codes None; scalar points only, for
    ``aware_em``, which takes the nearest codes of the centroids itself)."""
    c = _kmeanspp(x, k, rng)
    full = x
    if len(x) > sample:
        x = x[np.sort(rng.choice(len(x), size=sample, replace=False))]
    if x.shape[1] == 1:
        c, codes = Sorted(x[:, 0]).lloyd(c, iters, tol)
        if x is full:
            return c, codes
        return c, (nearest_scalar(full[:, 0], c[:, 0]) if assign else None)
    xa = augmented(x)   # searched every step
    codes = _sqdist_argmin(x, c, xa=xa)
    before = float(((x - c[codes]) ** 2).sum())
    for _ in range(iters):
        counts = np.bincount(codes, minlength=k)
        sums = bincount_rows(codes, x, k)
        nz = counts > 0
        c[nz] = sums[nz] / counts[nz, None]
        new = _sqdist_argmin(x, c, xa=xa)
        if np.array_equal(new, codes):
            break
        codes = new
        after = float(((x - c[codes]) ** 2).sum())
        if before - after <= tol * after:
            break
        before = after
    return c, (codes if x is full else _sqdist_argmin(full, c))


def block_major(hx, nb):
    """The sub-vectors H_b w ordered (row, block), regrouped by block and augmented by a 1 in
    float32 ([H_b w, 1], see ``scores``): (B, rows, d+1)."""
    d = hx.shape[1]
    out = np.empty((nb, len(hx) // nb, d + 1), dtype=np.float32)
    out[..., :-1] = hx.reshape(-1, nb, d).transpose(1, 0, 2)
    out[..., -1] = 1.0
    return out


def scalar_points(hx, nb, hblocks):
    """w = (H_b w) / h_b: the sub-vectors of scalar codes (d = 1) ``_metric_assign`` searches."""
    return (hx.reshape(-1, nb) / hblocks.reshape(nb)[None, :]).reshape(-1)


def _metric_assign(hx, nb, c, hblocks, chunk=CHUNK, ha=None):
    """argmin_k c_kᵀH_b c_k − 2 (H_b w)ᵀ c_k for each sub-vector; hx = H_b w, ordered (row, block).
    Block by block, one float32 product [H_b w, 1] @ [−2 Cᵀ; c_kᵀH_b c_k] per block and chunk;
    ``ha``, when known (the EM searches the same sub-vectors each round): ``block_major(hx, nb)``,
    or for d = 1 ``ranked(scalar_points(hx, nb, hblocks))``."""
    k, d = c.shape
    if d == 1:  # h_b (c − w)² with h_b > 0: the nearest centroid to w = hx / h_b
        return nearest_scalar(scalar_points(hx, nb, hblocks) if ha is None else None, c[:, 0], rank=ha)
    q = np.einsum("kd,bde,ke->bk", c, hblocks, c).astype(np.float32)  # (B, K)
    ha = block_major(hx, nb) if ha is None else ha
    f = scores(c, 0.0)
    rows = ha.shape[1]
    out = np.empty((nb, rows), dtype=np.int64)
    for b in range(nb):
        f[-1] = q[b]
        for s in range(0, rows, chunk):
            out[b, s:s + chunk] = (ha[b, s:s + chunk] @ f).argmin(1)
    return out.T.reshape(-1)


def em_points(x, hblocks):
    """What ``aware_em`` computes from the sub-vectors x and the block metrics alone, before any
    centroid: for d = 1 the points sorted once with their weights (``Sorted``), else
    (H_b w, ``block_major`` of it, Σ wᵀH_b w). The same for every K tried on a layer at one d:
    ``quantize`` keeps it across the layer's ladder."""
    nb, d = len(hblocks), x.shape[1]
    if d == 1:
        return Sorted(x[:, 0], hblocks.reshape(nb))
    hx = np.einsum("bde,rbe->rbd", hblocks, x.reshape(-1, nb, d)).reshape(-1, d)
    return hx, block_major(hx, nb), float(np.einsum("id,id->", x, hx))


def aware_em(x, blk, hblocks, c, codes, iters, tol=TOL, points=None):
    """EM under per-block metrics: returns (centroids, codes). x: (rows·B, d), blk = i mod B. At
    most ``iters`` rounds, stopped early when the codes no longer change or a round lowers the
    summed metric distance by less than ``tol`` of it. The distance is expanded,
    Σ (w − c)ᵀH_b(w − c) = Σ wᵀH_b w − 2 Σ_k (Σ_{i∈k} H_b w_i)ᵀc_k + Σ_{b,k} n_bk c_kᵀH_b c_k,
    from the per-code sums the next M-step needs anyway (no pass over the sub-vectors of its own).
    Scalar codes (d = 1): ``Sorted.lloyd`` with weights h_b. ``codes`` None (d = 1 only): the
    nearest of c. ``points``: ``em_points(x, hblocks)`` when known."""
    k, d = c.shape
    nb = len(hblocks)
    points = em_points(x, hblocks) if points is None else points
    if d == 1:   # h_b (w − c)²: the nearest centroid whatever h_b, c_k the h-weighted mean of its points
        return points.lloyd(c, iters, tol, codes)
    hx, ha, whw = points   # ha: searched every round

    def sums(codes):   # per (block, code) counts and per code Σ H_b w: the M-step's and the objective's
        counts = np.bincount(blk * k + codes, minlength=nb * k).reshape(nb, k)
        return counts, bincount_rows(codes, hx, k)

    def objective(c, counts, rhs):   # Σ (w − c)ᵀ H_b (w − c)
        q = np.einsum("kd,bde,ke->bk", c, hblocks, c)
        return whw - 2.0 * float((rhs * c).sum()) + float((counts * q).sum())

    counts, rhs = sums(codes)
    before = objective(c, counts, rhs) if tol > 0 else 0.0
    for _ in range(iters):
        hsum = np.einsum("bk,bde->kde", counts.astype(np.float64), hblocks)
        nz = counts.sum(0) > 0
        if nz.any():
            c = c.copy()
            c[nz] = np.linalg.solve(hsum[nz], rhs[nz][..., None])[..., 0]
        new = _metric_assign(hx, nb, c, hblocks, ha=ha)
        if np.array_equal(new, codes):
            break
        codes = new
        counts, rhs = sums(codes)
        if tol > 0:
            after = objective(c, counts, rhs)
            if before - after <= tol * after:
                break
            before = after
    return c, codes
