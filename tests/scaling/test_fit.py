"""Fits recover known coefficients from synthetic points; R^2 is 1 on exact data and lower with noise."""

import math

import numpy as np
import pytest

from lum_dist.scaling.fit import fit_log, fit_power_law, r_squared


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_log_recovers_coefficients(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(-0.1, 0.1), rng.uniform(-1, 1)
    x = np.geomspace(1e5, 1e9, 7)
    fit = fit_log(x, a * np.log(x) + b)
    assert fit.a == pytest.approx(a, abs=1e-10) and fit.b == pytest.approx(b, abs=1e-8)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12) and fit.n == 7
    np.testing.assert_allclose(fit(x), a * np.log(x) + b, atol=1e-9)


def test_fit_log_with_noise_matches_numpy_polyfit():
    rng = np.random.default_rng(3)
    x = np.geomspace(32, 8192, 9)
    y = 0.02 * np.log(x) + 0.1 + rng.normal(0, 0.005, x.shape)
    fit = fit_log(x, y)
    slope, intercept = np.polyfit(np.log(x), y, 1)
    assert fit.a == pytest.approx(slope, rel=1e-9) and fit.b == pytest.approx(intercept, rel=1e-9)
    assert 0.5 < fit.r2 < 1.0
    # R^2 by its definition, computed independently.
    pred = slope * np.log(x) + intercept
    assert fit.r2 == pytest.approx(1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2))


@pytest.mark.parametrize("seed", [0, 1])
def test_power_law_recovers_coefficients(seed):
    rng = np.random.default_rng(seed)
    coef, alpha = rng.uniform(1, 50), rng.uniform(0.03, 0.5)
    c = np.geomspace(1e12, 1e20, 6)
    fit = fit_power_law(c, coef * c ** -alpha)
    assert fit.coef == pytest.approx(coef, rel=1e-8) and fit.alpha == pytest.approx(alpha, rel=1e-8)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert "C^(-" in fit.equation() and "--" not in fit.equation()  # a falling loss: one minus sign


def test_power_law_equation_of_a_rising_loss_has_a_positive_exponent():
    c = np.geomspace(1e3, 1e6, 4)
    fit = fit_power_law(c, 2.0 * c ** 0.1)
    assert fit.alpha == pytest.approx(-0.1, rel=1e-8)
    assert "C^(+0.1)" in fit.equation()


def test_power_law_noisy_r2_below_one():
    rng = np.random.default_rng(4)
    c = np.geomspace(1e12, 1e18, 12)
    loss = 8.0 * c**-0.07 * np.exp(rng.normal(0, 0.05, c.shape))
    fit = fit_power_law(c, loss)
    assert fit.alpha == pytest.approx(0.07, abs=0.02)
    assert 0.0 < fit.r2 < 1.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="x must be > 0"):
        fit_log(np.array([0.0, 1.0]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="two distinct"):
        fit_log(np.array([5.0, 5.0]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="loss must be > 0"):
        fit_power_law(np.array([1.0, 2.0]), np.array([1.0, -2.0]))
    with pytest.raises(ValueError, match="NaN"):
        fit_log(np.array([1.0, 2.0]), np.array([1.0, math.nan]))
    assert math.isnan(r_squared(np.ones(3), np.ones(3)))
