"""Behaviour order and train/valid/test boundaries (see :mod:`lum_dist.data.schema` for the layout).

Everything works on flat arrays of behaviours already grouped by user (``user`` non-decreasing),
so a million-user dataset splits in a few vectorised numpy calls.
"""

from __future__ import annotations

import numpy as np

SPLITS = ("loo", "temporal")
DEFAULT_QUANTILES = (0.8, 0.9)


def behaviour_order(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Permutation grouping behaviours by user (in first-appearance code order), then by (ts, input order)."""
    return np.lexsort((np.arange(len(user)), ts, user))


def user_offsets(user: np.ndarray, num_users: int) -> np.ndarray:
    """int64 [num_users + 1]: where each user's behaviours start in the grouped arrays."""
    return np.r_[0, np.cumsum(np.bincount(user, minlength=num_users))].astype(np.int64)


def positions(user: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Index of each behaviour within its user's sequence."""
    return np.arange(len(user), dtype=np.int64) - offsets[user]


def loo_bounds(lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out: last behaviour = test, the one before = validation."""
    return (lens - 2).astype(np.int32), (lens - 1).astype(np.int32)


def default_cutoffs(ts: np.ndarray, quantiles: tuple[float, float] = DEFAULT_QUANTILES) -> list[int]:
    t1, t2 = np.quantile(ts, quantiles, method="lower")
    return [int(t1), int(t2)]


def temporal_bounds(
    user: np.ndarray, ts: np.ndarray, num_users: int, cutoffs: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Global cut-offs t1 < t2: train_end = #(ts < t1), valid_end = #(ts < t2), per user."""
    t1, t2 = cutoffs
    if not t1 < t2:
        raise ValueError(f"temporal_cutoffs must satisfy t1 < t2, got {cutoffs}")
    train_end = np.bincount(user, weights=ts < t1, minlength=num_users).astype(np.int32)
    valid_end = np.bincount(user, weights=ts < t2, minlength=num_users).astype(np.int32)
    return train_end, valid_end
