"""The embedded synthetic dataset: deterministic from a seed, with structure a sequence model can learn.

Items are grouped into categories (contiguous id blocks) with Zipf popularity within a category.
Each user has a few interest categories (Dirichlet weights over a small random subset) and a
long-tailed (lognormal) number of behaviours in [min_len, max_len]. The next item is, with
probability ``p_next``, the item right after the previous one in the same category (a sequential
pattern popularity cannot capture), else drawn from an interest category by popularity, else (with
probability ``p_noise``) from any category. Conditions: ``category`` (item attribute) and
``behavior`` (click/cart/buy). Timestamps strictly increase.
The ingest adapter is :mod:`lum_dist.data.ingest.synthetic`.
"""

from __future__ import annotations

import numpy as np

BEHAVIORS = np.array(["click", "cart", "buy"])
BEHAVIOR_P = [0.8, 0.15, 0.05]


def synthetic_arrays(
    num_users: int = 3000,
    num_items: int = 1000,
    num_categories: int = 20,
    seed: int = 0,
    interests: int = 3,
    p_next: float = 0.5,
    p_noise: float = 0.1,
    min_len: int = 5,
    max_len: int = 200,
    median_len: float = 25.0,
) -> dict[str, np.ndarray]:
    """Behaviours as flat arrays (user, item, category, behavior, ts), each user's interest categories and
    each item's category."""
    if num_items < num_categories:
        raise ValueError(f"synthetic: num_items={num_items} must be >= num_categories={num_categories}")
    rng = np.random.default_rng(seed)
    cat_of_item = np.sort(np.arange(num_items) % num_categories)  # contiguous blocks per category
    starts = np.searchsorted(cat_of_item, np.arange(num_categories))
    sizes = np.bincount(cat_of_item, minlength=num_categories)
    cat_pop = 1.0 / np.arange(1, num_categories + 1) ** 0.8
    cat_pop /= cat_pop.sum()
    lens = np.clip(np.round(rng.lognormal(np.log(median_len), 0.9, num_users)), min_len, max_len).astype(
        np.int64
    )
    total = int(lens.sum())
    users = np.repeat(np.arange(num_users), lens)
    # Interest categories: `interests` draws without replacement by popularity (Gumbel top-k).
    gumbel = np.log(cat_pop) - np.log(-np.log(rng.random((num_users, num_categories))))
    interest = np.argsort(-gumbel, axis=1)[:, :interests]
    weights = rng.dirichlet(np.ones(interests), size=num_users)

    # Random draws for every behaviour at once; only the "next item" chain is sequential.
    u_mode = rng.random(total)
    pick = (weights[users].cumsum(1) < rng.random(total)[:, None]).sum(1).clip(max=interests - 1)
    cat = np.where(
        u_mode < 1 - p_noise, interest[users, pick], rng.choice(num_categories, size=total, p=cat_pop)
    )
    # Zipf rank within the category by inverse CDF of p(r) ~ 1/(r+1).
    r = np.floor(np.exp(rng.random(total) * np.log(sizes[cat] + 1.0))).astype(np.int64) - 1
    item = starts[cat] + np.clip(r, 0, sizes[cat] - 1)
    follow = rng.random(total) < p_next
    first = np.r_[True, users[1:] != users[:-1]]
    # A run of "follow" steps continues from its anchor (the last fresh draw): k steps later it is the
    # k-th successor of the anchor item within the anchor's category.
    follow &= ~first
    idx = np.arange(total)
    anchor = np.maximum.accumulate(np.where(follow, 0, idx))
    c = cat_of_item[item[anchor]]
    item = np.where(follow, starts[c] + (item[anchor] - starts[c] + idx - anchor) % sizes[c], item)
    gaps = np.maximum(1, rng.exponential(3600.0, total)).astype(np.int64)
    offsets = np.repeat(np.cumsum(lens) - lens, lens)
    cum = np.cumsum(gaps)
    ts = 1_600_000_000 + rng.integers(0, 86400 * 30, num_users)[users] + cum - np.r_[0, cum][offsets]
    behavior = rng.choice(len(BEHAVIORS), size=total, p=BEHAVIOR_P)
    return {
        "user": users,
        "item": item,
        "category": cat_of_item[item],
        "behavior": behavior,
        "ts": ts,
        "interest": interest,
        "item_category": cat_of_item,
    }
