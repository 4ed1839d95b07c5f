"""Scaling-law fits: closed-form least squares, pure functions on numpy arrays.

- ``fit_log``: metric = a * ln(x) + b (the LUM paper's form for HR/NDCG vs parameters or sequence length).
- ``fit_power_law``: L = A * C^(-alpha), fitted as ln L = ln A - alpha ln C (loss vs training compute).
R^2 is computed in the space of the fit (linear metric for ``fit_log``, log loss for the power law).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LogFit:
    a: float
    b: float
    r2: float
    n: int

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.a * np.log(x) + self.b

    def equation(self, y: str = "y", x: str = "x") -> str:
        return f"{y} = {self.a:.4g} * ln({x}) {'+' if self.b >= 0 else '-'} {abs(self.b):.4g}"


@dataclass(frozen=True)
class PowerLawFit:
    coef: float  # A
    alpha: float
    r2: float  # in log-log space
    n: int

    def __call__(self, c: np.ndarray) -> np.ndarray:
        return self.coef * np.power(c, -self.alpha)

    def equation(self, y: str = "L", x: str = "C") -> str:
        # the exponent with its sign: a loss that rises with C reads C^(+0.1), never C^(--0.1)
        return f"{y} = {self.coef:.4g} * {x}^({-self.alpha:+.4g})"


def r_squared(y: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination; NaN when y is constant (R^2 is undefined)."""
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0.0:
        return math.nan
    return 1.0 - float(np.sum((y - pred) ** 2)) / ss_tot


def _line(u: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least squares y = slope * u + intercept; returns (slope, intercept, R^2)."""
    if u.shape != y.shape or u.ndim != 1:
        raise ValueError(f"expected two 1-D arrays of equal length, got shapes {u.shape} and {y.shape}")
    if not (np.isfinite(u).all() and np.isfinite(y).all()):
        raise ValueError("fit inputs contain NaN or infinity")
    if len(np.unique(u)) < 2:
        raise ValueError(f"need at least two distinct x values to fit a line, got {np.unique(u).tolist()}")
    design = np.stack([u, np.ones_like(u)], axis=1)
    (slope, intercept), *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(slope), float(intercept), r_squared(y, slope * u + intercept)


def _positive(name: str, v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    if (v <= 0).any():
        raise ValueError(f"{name} must be > 0 for a logarithmic fit, got {v[v <= 0].tolist()}")
    return v


def fit_log(x: np.ndarray, y: np.ndarray) -> LogFit:
    """Fit y = a * ln(x) + b by least squares (x > 0)."""
    x = _positive("x", x)
    y = np.asarray(y, dtype=np.float64)
    a, b, r2 = _line(np.log(x), y)
    return LogFit(a, b, r2, len(x))


def fit_power_law(c: np.ndarray, loss: np.ndarray) -> PowerLawFit:
    """Fit L = A * C^(-alpha) by least squares on ln L = ln A - alpha * ln C (C, L > 0)."""
    c, loss = _positive("compute", c), _positive("loss", loss)
    slope, intercept, r2 = _line(np.log(c), np.log(loss))
    return PowerLawFit(math.exp(intercept), -slope, r2, len(c))
