"""lstsq against direct numpy solutions on random problems."""

import numpy as np
import pytest

from onnxshrink import lstsq
from onnxshrink.stats import CrossMoments


def _problem(rng, n=400, d_in=6, d_out=3, noise=0.01):
    x = rng.standard_normal((n, d_in)) @ rng.standard_normal((d_in, d_in)) + rng.standard_normal(d_in)
    w = rng.standard_normal((d_in, d_out))
    b = rng.standard_normal(d_out)
    y = x @ w + b + noise * rng.standard_normal((n, d_out))
    cm = CrossMoments(d_in, d_out)
    cm.update(x[:150], y[:150])
    cm.update(x[150:], y[150:])
    return x, y, w, b, cm


@pytest.mark.parametrize("fit_bias", [True, False])
@pytest.mark.parametrize("pull", [False, True])
def test_ridge_solve_matches_the_normal_equations(fit_bias, pull, rng):
    x, y, w_true, _, cm = _problem(rng)
    w0 = rng.standard_normal(w_true.shape) if pull else None
    ridge = 0.3
    w, b = lstsq.ridge_solve(cm, ridge, fit_bias=fit_bias, w0=w0)
    mx, my = (x.mean(0), y.mean(0)) if fit_bias else (np.zeros(6), np.zeros(3))
    xc, yc = x - mx, y - my
    a = xc.T @ xc / len(x)
    alpha = ridge * np.trace(a) / 6
    ref = np.linalg.solve(a + alpha * np.eye(6), xc.T @ yc / len(x) + (alpha * w0 if pull else 0))
    np.testing.assert_allclose(w, ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(b, my - mx @ ref if fit_bias else 0, atol=1e-9)


def test_ridge_rows_equals_moments_and_tiny_ridge_recovers(rng):
    x, y, w_true, b_true, cm = _problem(rng, noise=0.0)
    w1, b1 = lstsq.ridge_rows(x, y, ridge=1e-3)
    w2, b2 = lstsq.ridge_solve(cm, ridge=1e-3)
    np.testing.assert_allclose(w1, w2, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(b1, b2, rtol=1e-7, atol=1e-8)
    w, b = lstsq.ridge_solve(cm, ridge=1e-12)
    np.testing.assert_allclose(w, w_true, atol=1e-6)
    np.testing.assert_allclose(b, b_true, atol=1e-6)
    assert lstsq.fit_error(cm, w, b) < 1e-10


def test_fit_errors_agree_between_moments_and_rows(rng):
    x, y, _, _, cm = _problem(rng, noise=0.5)
    w, b = lstsq.ridge_solve(cm, 1e-2)
    rows = lstsq.fit_error_rows(x @ w + b, y)
    assert lstsq.fit_error(cm, w, b) == pytest.approx(rows, rel=1e-8)
    assert 0.0 < rows < 1.0
    # predicting the mean misses exactly all of the variance
    assert lstsq.fit_error(cm, np.zeros_like(w), y.mean(0)) == pytest.approx(1.0, rel=1e-9)


def test_weighted_error(rng):
    t = rng.standard_normal((4, 6))
    h = np.eye(6) * 2
    assert lstsq.weighted_error(t, t, h) == 0.0
    assert lstsq.weighted_error(t, np.zeros_like(t), h) == pytest.approx(1.0)
    t_hat = t + 0.1 * rng.standard_normal(t.shape)
    assert lstsq.weighted_error(t, t_hat, h) == pytest.approx(lstsq.weighted_error(t, t_hat))


@pytest.mark.parametrize("iters", [0, 5, 60])
def test_pcg_converges_and_never_raises_the_objective(iters, rng):
    m = rng.standard_normal((30, 20))
    a = m.T @ m
    rhs = rng.standard_normal(20)
    ridge = 1e-3
    exact = lstsq.spd_solve(a, rhs, ridge)
    alpha = ridge * np.trace(a) / 20
    np.testing.assert_allclose((a + alpha * np.eye(20)) @ exact, rhs, atol=1e-8)

    def obj(u):
        return 0.5 * u @ (a + alpha * np.eye(20)) @ u - rhs @ u

    x0 = np.zeros(20)
    u = lstsq.pcg(a, rhs, x0, ridge, iters)
    assert obj(u) <= obj(x0) + 1e-12
    if iters in (0, 60):
        np.testing.assert_allclose(u, exact, rtol=1e-6, atol=1e-8)


def test_solve_falls_back_on_singular():
    a = np.array([[1.0, 1.0], [1.0, 1.0]])
    x = lstsq.solve(a, np.array([2.0, 2.0]))
    np.testing.assert_allclose(a @ x, [2.0, 2.0])


def test_cross_moments_helpers(rng):
    x, y, _, _, cm = _problem(rng)
    cxx, cxy, mx, my = cm.moments()
    np.testing.assert_allclose(cxx, np.cov(x.T, bias=True), atol=1e-10)
    np.testing.assert_allclose(cxy, (x - x.mean(0)).T @ (y - y.mean(0)) / len(x), atol=1e-10)
    sxx, sxy, zx, zy = cm.moments(centered=False)
    np.testing.assert_allclose(sxy, x.T @ y / len(x), atol=1e-10)
    assert not zx.any() and not zy.any()
    bias = rng.standard_normal(3)
    shifted = cm.minus_bias(bias)
    ref = CrossMoments(6, 3)
    ref.update(x, y - bias)
    for a, b in ((shifted.sum_y, ref.sum_y), (shifted.xy, ref.xy), (shifted.yy, ref.yy)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
    mask = np.array([True, False, True])
    sub = cm.outputs(mask)
    np.testing.assert_allclose(sub.xy, cm.xy[:, mask])
    assert sub.n == cm.n
