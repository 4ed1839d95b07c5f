"""The embedded synthetic datasets: deterministic from a seed, with structure a sequence model can learn.

:func:`synthetic_arrays` (source ``{format: synthetic}``, the default): short histories, a small catalogue.
:func:`longrange_arrays` (``{format: synthetic, kind: longrange}``): for scaling studies, a 100k+ item
catalogue, histories of hundreds of behaviours whose next item depends on behaviours far back, and
oracles (:func:`successor_oracle`, :func:`generic_oracle`) that measure how much each context length can
gain; ``python -m lum_dist.data.synthetic`` prints their table.

Default generator: items are grouped into categories (contiguous id blocks) with Zipf popularity within a category.
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


# ---------------------------------------------------------------------------------------------
# Long-range generator (source ``{format: synthetic, kind: longrange}``)

BUY = 2  # index of "buy" in BEHAVIORS: a purchase ends the chain, the next visit of that interest restarts


def _zipf_rank(u: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Rank r in [0, size) with p(r) = log((r + 2) / (r + 1)) / log(size + 1) (about 1/(r+1)), from uniforms."""
    return np.minimum(np.floor(np.exp(u * np.log(sizes + 1.0))).astype(np.int64) - 1, sizes - 1)


def zipf_rank_prob(rank: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """p(rank) of :func:`_zipf_rank`."""
    return np.log((rank + 2.0) / (rank + 1.0)) / np.log(sizes + 1.0)


def _gumbel_top_k(rng: np.random.Generator, logits: np.ndarray, k: int) -> np.ndarray:
    """Per row, k column indices drawn without replacement with p ~ exp(logits), in draw order."""
    keys = logits - np.log(-np.log(rng.random(logits.shape)))
    top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(keys, top, 1), axis=1), 1)


def _draw_slots(rng: np.random.Generator, weights: np.ndarray, users: np.ndarray) -> np.ndarray:
    """One interest slot per entry of ``users``, drawn by that user's weights (rows of ``weights`` sum to 1)."""
    num_users, k = weights.shape
    cw = np.cumsum(weights, 1)
    cw[:, -1] = 1.0
    flat = (cw + np.arange(num_users)[:, None]).ravel()  # increasing: row u lies in (u, u + 1]
    return np.minimum(np.searchsorted(flat, users + rng.random(len(users)), side="right") - users * k, k - 1)


def _catalogue(
    rng: np.random.Generator,
    num_items: int,
    num_clusters: int,
    num_categories: int,
    variants: int,
    cluster_zipf: float,
) -> dict[str, np.ndarray]:
    """Clusters of items (contiguous id blocks, lognormal sizes >= 2, base id = popularity rank within the
    cluster), each cluster in one category, and ``variants`` random cycles through every cluster."""
    share = rng.lognormal(0.0, 0.5, num_clusters)
    sizes = 2 + np.floor(share / share.sum() * (num_items - 2 * num_clusters)).astype(np.int64)
    sizes[: num_items - sizes.sum()] += 1  # the rounding remainder (< num_clusters items)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    item_cluster = np.repeat(np.arange(num_clusters), sizes)
    cluster_category = rng.permutation(num_clusters) % num_categories
    # cycle[v, starts[c] + p] = the item at position p of cluster c's cycle v; pos is its inverse.
    cycle = np.stack([np.lexsort((rng.random(num_items), item_cluster)) for _ in range(variants)]).astype(
        np.int32
    )
    pos = np.empty_like(cycle)
    for v in range(variants):
        pos[v, cycle[v]] = np.arange(num_items) - starts[item_cluster[cycle[v]]]
    cluster_pop = 1.0 / np.arange(1, num_clusters + 1) ** cluster_zipf
    return {
        "sizes": sizes,
        "starts": starts,
        "item_cluster": item_cluster,
        "item_category": cluster_category[item_cluster],
        "cycle": cycle,
        "cycle_pos": pos,
        "cluster_pop": cluster_pop / cluster_pop.sum(),
    }


def _sessions(
    rng: np.random.Generator,
    user: np.ndarray,
    lens: np.ndarray,
    weights: np.ndarray,
    mean_session: float,
    p_routine: float,
    routine_min: int,
    routine_max: int,
) -> dict[str, np.ndarray]:
    """Session starts and each behaviour's interest slot. A routine session takes the next interest of the
    user's routine (a cycle of ``routine_len[u]`` slots drawn by weight), any other one a slot by weight."""
    num_users = len(lens)
    session_start = rng.random(len(user)) < 1.0 / mean_session
    session_start[np.cumsum(lens) - lens] = True
    s_pos = np.flatnonzero(session_start)
    s_user = user[s_pos]
    log_len = rng.uniform(np.log(routine_min), np.log(routine_max), num_users)
    routine_len = np.round(np.exp(log_len)).astype(np.int64)
    routine = _draw_slots(rng, weights, np.repeat(np.arange(num_users), routine_max)).reshape(num_users, -1)
    s_routine = rng.random(len(s_pos)) < p_routine
    r_count = np.cumsum(s_routine)
    s_first = np.r_[True, s_user[1:] != s_user[:-1]]
    r_idx = r_count - 1 - np.maximum.accumulate(np.where(s_first, r_count - s_routine, 0))  # within the user
    s_slot = np.where(
        s_routine,
        routine[s_user, np.maximum(r_idx, 0) % routine_len[s_user]],
        _draw_slots(rng, weights, s_user),
    )
    routine_start = np.zeros(len(user), bool)
    routine_start[s_pos[s_routine]] = True
    return {
        "slot": np.repeat(s_slot.astype(np.int16), np.diff(np.r_[s_pos, len(user)])),
        "session_start": session_start,
        "routine_start": routine_start,
        "routine": routine.astype(np.int16),
        "routine_len": routine_len,
    }


def _chains(
    rng: np.random.Generator,
    user: np.ndarray,
    slot: np.ndarray,
    noise: np.ndarray,
    behavior: np.ndarray,
    interest: np.ndarray,
    variant: np.ndarray,
    cat: dict[str, np.ndarray],
    p_jump: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Items of the non-noise behaviours (the rest left 0) and their restart flags. The behaviours of one
    (user, slot) form a chain in time order: each item is the successor, on the user's cycle variant of the
    cluster, of the chain's previous item, however far back; a restart (first visit, after a buy, with
    ``p_jump``) draws a popular item of the cluster instead."""
    k_slots = interest.shape[1]
    idx = np.flatnonzero(~noise).astype(np.int32)
    key = user[idx] * np.int64(k_slots) + slot[idx]
    order = np.argsort(key, kind="stable")  # stable: time order within a chain
    idx, key = idx[order], key[order]
    del order
    jump = np.r_[True, key[1:] != key[:-1]]
    c, v = interest.ravel()[key], variant.ravel()[key]  # cluster and cycle variant of each chain behaviour
    del key
    jump[1:] |= behavior[idx[:-1]] == BUY
    jump |= rng.random(len(idx)) < p_jump
    k = np.arange(len(idx), dtype=np.int32)
    steps = k - np.maximum.accumulate(np.where(jump, k, 0))  # since the chain's last restart
    del k
    sizes, starts = cat["sizes"][c], cat["starts"][c]
    start = starts[jump] + _zipf_rank(rng.random(int(jump.sum())), sizes[jump])
    start = start[np.cumsum(jump) - 1]  # each behaviour's restart item
    pos = (cat["cycle_pos"][v, start] + steps) % sizes
    item = np.zeros(len(user), np.int64)
    item[idx] = cat["cycle"][v, starts + pos]
    jumps = np.zeros(len(user), bool)
    jumps[idx] = jump
    return item, jumps


def _timestamps(rng: np.random.Generator, lens: np.ndarray, session_start: np.ndarray) -> np.ndarray:
    """Strictly increasing per user: gaps of ~2 minutes inside a session, >= 10 minutes (~8 hours) between."""
    gaps = rng.exponential(1.0, len(session_start)) * np.where(session_start, 8 * 3600.0, 120.0)
    cum = np.cumsum((gaps + np.where(session_start, 600, 1)).astype(np.int64))
    before = np.repeat(np.r_[0, cum][np.cumsum(lens) - lens], lens)  # cum before each user's first
    return 1_600_000_000 + np.repeat(rng.integers(0, 86400 * 30, len(lens)), lens) + cum - before


def longrange_arrays(
    num_users: int = 10000,
    num_items: int = 131072,
    num_clusters: int = 1024,
    num_categories: int = 128,
    seed: int = 0,
    interests: int = 64,
    interest_zipf: float = 1.0,
    personas: int = 256,
    persona_clusters: int = 128,
    variants: int = 2,
    mean_session: float = 2.5,
    p_routine: float = 0.5,
    routine_min: int = 2,
    routine_max: int = 96,
    p_noise: float = 0.1,
    p_jump: float = 0.05,
    cluster_zipf: float = 0.8,
    min_len: int = 128,
    max_len: int = 2048,
    median_len: float = 800.0,
) -> dict[str, np.ndarray]:
    """Behaviours with long-range, capacity-hungry structure (user, item, category, behavior, ts as in
    :func:`synthetic_arrays`) plus the latent variables :func:`successor_oracle` and :func:`generic_oracle` read.

    Catalogue: ``num_items`` items in ``num_clusters`` clusters (Zipf(``cluster_zipf``) popularity, items
    Zipf within), each cluster in one of ``num_categories`` categories and with ``variants`` random cycles
    through its items: about variants x num_items transitions to memorise, most of them rare, so capacity
    keeps paying. Users: a persona (``persona_clusters`` clusters drawn by popularity) and ``interests``
    clusters drawn from it, with Zipf(``interest_zipf``) weights, a cycle variant per interest and a routine
    (a cycle of ``routine_min``..``routine_max`` interests drawn by weight, log-uniform length). History:
    sessions (geometric length, mean ``mean_session``; gaps of minutes inside, hours between). A session
    takes the routine's next interest with ``p_routine``, else one by weight, and continues that interest's
    chain where the user left it, possibly hundreds of behaviours back (the k-th interest returns about
    every mean_session x H_K x k behaviours: each doubling of the context reaches a similar share of
    returns; the routine's next interest is known from its last lap). A chain restarts at a popular item of
    the cluster on its first visit, after a ``buy`` and with ``p_jump``; a behaviour is noise (an item by
    global popularity) with ``p_noise``. Lengths: lognormal around ``median_len`` in [min_len, max_len].
    """
    if num_items < 2 * num_clusters or num_clusters < num_categories or persona_clusters > num_clusters:
        raise ValueError(
            f"longrange: need num_items >= 2 x num_clusters >= 2 x num_categories and persona_clusters <= "
            f"num_clusters; got {num_items=}, {num_clusters=}, {num_categories=}, {persona_clusters=}"
        )
    if not interests <= persona_clusters or min_len < 1 or max_len < min_len or mean_session < 1:
        raise ValueError(
            f"longrange: need interests <= persona_clusters, 1 <= min_len <= max_len, "
            f"mean_session >= 1; got {interests=}, {min_len=}, {max_len=}, {mean_session=}"
        )
    rng = np.random.default_rng(seed)
    cat = _catalogue(rng, num_items, num_clusters, num_categories, variants, cluster_zipf)
    sizes, starts = cat["sizes"], cat["starts"]
    log_pop = np.log(cat["cluster_pop"])

    # Users: persona -> interest clusters (in draw order: the first drawn gets the largest weight).
    persona_cl = _gumbel_top_k(rng, np.broadcast_to(log_pop, (personas, num_clusters)), persona_clusters)
    persona = rng.integers(personas, size=num_users)
    pick = _gumbel_top_k(rng, np.zeros((num_users, persona_clusters)), interests)
    interest = np.take_along_axis(persona_cl[persona], pick, 1)
    weights = np.broadcast_to(1.0 / np.arange(1, interests + 1) ** interest_zipf, (num_users, interests))
    weights = weights / weights.sum(1, keepdims=True)
    variant = rng.integers(variants, size=(num_users, interests))
    lens = np.clip(np.round(rng.lognormal(np.log(median_len), 0.6, num_users)), min_len, max_len).astype(
        np.int64
    )
    user = np.repeat(np.arange(num_users, dtype=np.int32), lens)
    ses = _sessions(rng, user, lens, weights, mean_session, p_routine, routine_min, routine_max)
    noise = rng.random(len(user)) < p_noise
    behavior = rng.choice(len(BEHAVIORS), size=len(user), p=BEHAVIOR_P).astype(np.int8)
    item, jump = _chains(rng, user, ses["slot"], noise, behavior, interest, variant, cat, p_jump)
    # Noise: a cluster by global popularity, an item by popularity within it.
    n_idx = np.flatnonzero(noise)
    nc = rng.choice(num_clusters, size=len(n_idx), p=cat["cluster_pop"])
    item[n_idx] = starts[nc] + _zipf_rank(rng.random(len(n_idx)), sizes[nc])
    ts = _timestamps(rng, lens, ses["session_start"])
    return {
        "user": user,
        "item": item,
        "category": cat["item_category"][item],
        "behavior": behavior,
        "ts": ts,
        # latent variables (oracles, tests)
        "noise": noise,
        "jump": jump,
        **ses,
        "interest": interest,
        "weights": weights,
        "variant": variant,
        "item_category": cat["item_category"],
        "item_cluster": cat["item_cluster"],
        "cluster_sizes": sizes,
        "cluster_starts": starts,
        "cluster_pop": cat["cluster_pop"],
        "cycle": cat["cycle"],
        "cycle_pos": cat["cycle_pos"],
        "params": np.array([p_noise, p_jump, mean_session, p_routine]),
    }


# ---------------------------------------------------------------------------------------------
# Oracles of the long-range generator: how well the true process predicts the next item from the last
# W behaviours only; about the best a model with a context of W behaviours can reach (they read latent
# labels, which behaviour is noise or which interest, that a model has to infer from the items).

NEVER = np.iinfo(np.int64).max // 4  # "no such behaviour" as a distance


def chain_distances(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per behaviour: ``gap``, the behaviours back to the previous element of its chain (its own interest's
    last visit: the item it continues from; NEVER for noise and first visits); ``reveal``, the behaviours
    back to the oldest behaviour of the most recent transition that showed the user's cycle variant of
    that interest; ``step``, whether the item is its chain predecessor's successor."""
    total, k_slots = len(a["user"]), a["interest"].shape[1]
    chain_idx = np.flatnonzero(~a["noise"])
    key = a["user"][chain_idx].astype(np.int64) * k_slots + a["slot"][chain_idx]
    order = np.argsort(key, kind="stable")
    chain_idx, key = chain_idx[order], key[order]
    new_group = np.r_[True, key[1:] != key[:-1]]
    prev = np.where(new_group, -NEVER, np.r_[0, chain_idx[:-1]])
    step = ~a["jump"][chain_idx]
    # Latest predecessor position of an earlier step in the same group (group-offset running max).
    group = np.cumsum(new_group) - 1
    big = 4 * total
    shown = np.maximum.accumulate(np.where(step, prev, -1) + group * big) - group * big
    shown = np.where(new_group, -1, np.r_[-1, shown[:-1]])
    shown = np.where(shown < 0, -NEVER, shown)
    out = {"gap": np.full(total, NEVER), "reveal": np.full(total, NEVER), "step": np.zeros(total, bool)}
    out["gap"][chain_idx] = chain_idx - prev
    out["reveal"][chain_idx] = chain_idx - shown
    out["step"][chain_idx] = step
    return out


def successor_oracle(a: dict[str, np.ndarray], windows: list[int]) -> dict[int, float]:
    """Top-1 accuracy, over all behaviours but each user's first, of an oracle that knows the process and the
    current behaviour's interest (as a category condition nearly tells) and sees the last W behaviours: it
    predicts the successor of that interest's last item (on the user's variant if a transition within W
    showed it, else on variant 0) if that item is within W, else the interest's most popular item."""
    d = chain_distances(a)
    first = np.r_[True, a["user"][1:] != a["user"][:-1]]
    idx = np.arange(len(a["user"]))
    starts, sizes = a["cluster_starts"], a["cluster_sizes"]
    c = a["interest"][a["user"], a["slot"]]
    v_true = a["variant"][a["user"], a["slot"]]
    prev_item = a["item"][np.clip(idx - np.minimum(d["gap"], len(idx)), 0, None)]
    out = {}
    for w in windows:
        visible = d["gap"] <= w
        v = np.where(d["reveal"] <= w, v_true, 0)
        succ = a["cycle"][v, starts[c] + (a["cycle_pos"][v, prev_item] + 1) % sizes[c]]
        pred = np.where(visible, succ, starts[c])  # base id starts[c] = the cluster's most popular item
        out[w] = float(np.mean((pred == a["item"])[~first]))
    return out


def generic_oracle(
    a: dict[str, np.ndarray], windows: list[int], max_users: int = 1000, stride: int = 4, alpha: float = 0.5
) -> dict[int, dict[str, float]]:
    """HR@10 and cross-entropy (bits per behaviour) of the process's own prediction of the next item from the
    last W behaviours, with no condition (the generic query of evaluation), over the first ``max_users``
    users, every ``stride``-th behaviour but each user's first. W = 0 is popularity.

    The oracle knows the generator's parameters and, for every interest seen within W, its cluster, last item,
    last behaviour type (a buy restarts the chain) and the user's cycle variant if a transition within W
    showed it (else each variant is equally likely). The next behaviour is noise (global popularity) with
    p_noise, else it continues the current session's interest with 1 - 1/mean_session, else a new session
    picks interest k with (sessions of k within W + alpha) / (sessions within W + K alpha), an unseen interest
    getting popularity. HR@10 counts a hit when the target is among the ten largest point masses (successors
    and each seen interest's most popular item); a target without one counts as a miss.
    """
    n_users = min(max_users, int(a["user"].max()) + 1)
    bounds = np.searchsorted(a["user"], np.arange(0, n_users + 50, 50).clip(max=n_users))
    dist = chain_distances(a)
    sums = {w: np.zeros(3) for w in windows}  # hits, bits, count
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if hi > lo:
            for w, counts in _generic_chunk(a, dist, lo, hi, windows, stride, alpha).items():
                sums[w] += counts
    return {w: {"hr@10": float(s[0] / s[2]), "bits": float(s[1] / s[2])} for w, s in sums.items()}


def _generic_chunk(
    a: dict[str, np.ndarray],
    dist: dict[str, np.ndarray],
    lo: int,
    hi: int,
    windows: list[int],
    stride: int,
    alpha: float,
) -> dict[int, np.ndarray]:
    """:func:`generic_oracle` on behaviours [lo, hi) (whole users): per-slot state as [n, K] arrays."""
    p_noise, p_jump, mean_session, p_routine = (float(x) for x in a["params"])
    user, slot = a["user"][lo:hi], a["slot"][lo:hi].astype(np.int64)
    n, k_slots = hi - lo, a["interest"].shape[1]
    t = np.arange(n)
    first = np.r_[True, user[1:] != user[:-1]]
    ustart = np.maximum.accumulate(np.where(first, t, 0))
    chain = ~a["noise"][lo:hi]
    rows = t[chain]

    def before(values: np.ndarray, fill: int, op: np.ufunc = np.maximum) -> np.ndarray:
        """[n + 1, K]: at row t, ``op`` accumulated over rows < t of ``values`` placed at (row, slot)."""
        m = np.full((n + 1, k_slots), fill, np.int32)
        m[rows + 1, slot[chain]] = values
        return op.accumulate(m, axis=0)

    gap, reveal = dist["gap"][lo:hi][chain], dist["reveal"][lo:hi][chain]
    last = before(rows, -1)  # last chain behaviour of each slot
    # Start of the latest transition showing the slot's variant, this behaviour's own included.
    shown_here = np.where(reveal < NEVER, rows - reveal, -1)
    shown = before(np.where(dist["step"][lo:hi][chain], rows - np.minimum(gap, n), shown_here), -1)
    ss = a["session_start"][lo:hi][chain]
    sessions = before(ss, 0, np.add)  # session starts of each slot

    # Targets: every stride-th behaviour but the first of each user.
    tt = t[(t % stride == 0) & ~first]
    item = a["item"][lo:hi][tt]
    last, shown = last[tt], shown[tt]
    u_int, v_true = a["interest"][user[tt]], a["variant"][user[tt]]  # [m, K]
    starts, sizes, pos, cyc, icl = (
        a[k] for k in ("cluster_starts", "cluster_sizes", "cycle_pos", "cycle", "item_cluster")
    )
    zipf_t = zipf_rank_prob(item - starts[icl[item]], sizes[icl[item]])
    pop = a["cluster_pop"][icl[item]] * zipf_t
    last_item = a["item"][lo:hi][np.maximum(last, 0)]
    restart = np.where(a["behavior"][lo:hi][np.maximum(last, 0)] == BUY, 1.0, p_jump)
    variants = cyc.shape[0]
    is_succ = np.stack(
        [
            cyc[v, starts[u_int] + (pos[v, last_item] + 1) % sizes[u_int]] == item[:, None]
            for v in range(variants)
        ],
        -1,
    )  # [m, K, V]
    top1 = zipf_rank_prob(0, sizes[u_int])
    is_top = starts[u_int] == item[:, None]
    zipf_slot = (u_int == icl[item][:, None]) * zipf_t[:, None]  # restart mass at the target per slot
    cur = slot[tt - 1][:, None] == np.arange(k_slots)  # the current session's slot
    # The next routine interest, known once the window holds the whole last lap of the routine.
    r_pos = t[a["routine_start"][lo:hi]]
    r_before, r_first = np.searchsorted(r_pos, tt), np.searchsorted(r_pos, ustart[tt])
    r_len = a["routine_len"][user[tt]]
    r_next = a["routine"][user[tt], (r_before - r_first) % r_len][:, None] == np.arange(k_slots)
    lap = np.where(r_before - r_len >= r_first, np.r_[r_pos, -1][np.maximum(r_before - r_len, 0)], -1)
    q = 1.0 / mean_session
    out = {}
    for w in windows:
        lo_t = np.maximum(tt - w, ustart[tt])
        seen = (last >= lo_t[:, None]) & (w > 0)
        n_k = np.where(seen, sessions[tt] - sessions[lo_t], 0)
        pi = (n_k + alpha) / (n_k.sum(1, keepdims=True) + k_slots * alpha)
        routine_known = p_routine * ((lap >= lo_t) & (w > 0))[:, None]
        omega = q * ((1 - routine_known) * pi + routine_known * r_next) + (1 - q) * cur
        unseen = np.where(seen, 0.0, omega).sum(1)
        omega = np.where(seen, omega, 0.0) * (1 - p_noise)
        known = shown >= lo_t[:, None]
        pv = np.where(known[..., None], np.arange(variants) == v_true[..., None], 1.0 / variants)
        point = (omega * (1 - restart))[..., None] * pv  # [m, K, V] at each successor
        top = omega * restart * top1  # [m, K] at each slot's most popular item
        p_t = (point * is_succ).sum((1, 2)) + (omega * restart * zipf_slot).sum(1)
        p_t += (p_noise + (1 - p_noise) * unseen) * pop
        cand = np.concatenate([point.reshape(len(tt), -1), top], 1)
        hit = np.concatenate([(point * is_succ).reshape(len(tt), -1), top * is_top], 1).max(1) > 0
        rank = (cand > p_t[:, None]).sum(1)
        out[w] = np.array([(hit & (rank < 10)).sum(), -np.log2(p_t).sum(), len(tt)])
    return out


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    """Print the oracle table of the long-range generator: ``python -m lum_dist.data.synthetic``."""
    import argparse
    import time

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--num-users", type=int, default=2500, help="users generated (successor oracle: all)")
    p.add_argument("--max-users", type=int, default=1000, help="users the generic oracle reads")
    p.add_argument("--windows", type=int, nargs="*", default=[0, 32, 64, 128, 256, 512, 1024, 10**9])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    start = time.perf_counter()
    a = longrange_arrays(num_users=args.num_users, seed=args.seed)
    print(f"{args.num_users} users, {len(a['user'])} behaviours in {time.perf_counter() - start:.1f} s")
    succ, gen = successor_oracle(a, args.windows), generic_oracle(a, args.windows, max_users=args.max_users)
    print("| window (behaviours) | successor top-1 (interest known) | generic HR@10 | generic bits |")
    print("|---|---|---|---|")
    for w in args.windows:
        label = "all" if w >= 10**9 else str(w)
        print(f"| {label} | {succ[w]:.3f} | {gen[w]['hr@10']:.3f} | {gen[w]['bits']:.2f} |")
    return {w: {"successor": succ[w], **gen[w]} for w in args.windows}


if __name__ == "__main__":
    main()
