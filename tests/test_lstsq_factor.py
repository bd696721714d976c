"""lstsq.ridge_cholesky / ridge_with_factor against the direct ridge solution."""

import numpy as np

from onnxshrink import lstsq


def test_ridge_factor_solves_and_whitens():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 5)) @ rng.standard_normal((5, 5))
    y = x @ rng.standard_normal((5, 2)) + 0.1 * rng.standard_normal((300, 2))
    xc, yc = x - x.mean(0), y - y.mean(0)
    cxx, cxy = xc.T @ xc / len(x), xc.T @ yc / len(x)
    ridge = 0.05
    chol = lstsq.ridge_cholesky(cxx, ridge)
    alpha = ridge * np.trace(cxx) / 5
    np.testing.assert_allclose(chol @ chol.T, cxx + alpha * np.eye(5), rtol=1e-12, atol=1e-12)
    assert np.allclose(chol, np.tril(chol))
    w = lstsq.ridge_with_factor(chol, cxy)
    np.testing.assert_allclose(w, np.linalg.solve(cxx + alpha * np.eye(5), cxy), rtol=1e-10, atol=1e-12)
    # several right-hand sides on one factor, as the ridge_from_moments solve gives them
    w2, _ = lstsq.ridge_from_moments(cxx, cxy[:, :1], np.zeros(5), np.zeros(1), ridge, fit_bias=False)
    np.testing.assert_allclose(w[:, :1], w2, rtol=1e-10, atol=1e-12)


def test_diagonal_ridge_is_the_ridge_solve_of_a_diagonal_system():
    rng = np.random.default_rng(4)
    den = np.abs(rng.standard_normal(7)) + 0.1
    den[3] = 0.0
    num = rng.standard_normal(7)
    num[3] = 0.0
    u = lstsq.diagonal_ridge(den, num, 0.2)
    alpha = 0.2 * den.mean()
    expect = np.linalg.solve(np.diag(den) + alpha * np.eye(7), num)
    np.testing.assert_allclose(u, expect, rtol=1e-12)
    assert u[3] == 0.0
    assert np.array_equal(lstsq.diagonal_ridge(np.zeros(3), np.zeros(3), 0.1), np.zeros(3))
