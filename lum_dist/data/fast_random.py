"""``np.random.default_rng(key).random(n)`` for many keys at once, bit for bit, in vectorised numpy.

The loader draws condition dropout from one generator per (epoch, user): ``default_rng([seed, epoch,
rank, user])``. Building a generator costs ~25 us (SeedSequence hashing + PCG64 seeding), more than
tokenizing a short user, so a Python loop over users caps the loader far below the GPU's demand. This
module runs the same algorithms over arrays of keys instead, so the draws (and the batches) stay
exactly those of the per-user generators:

* ``SeedSequence(key)``: the uint32 hash mixing of its entropy pool, then ``generate_state(4, uint64)``
  (numpy's ``bit_generator.pyx``);
* ``PCG64``: 128-bit LCG ``s <- s * A + inc`` seeded by ``pcg_setseq_128_srandom_r``; draw ``k`` is the
  XSL-RR output of state ``k + 1``, reached directly by the jump ``s_k = A^k s_0 + (A^{k-1} + ... + 1) inc``;
* ``Generator.random``: ``(next_uint64 >> 11) * 2**-53``.

128-bit numbers are (high, low) pairs of uint64 arrays. ``reference_uniform`` is numpy itself, which
the tests compare against; keys with a word >= 2**32 (a multi-word seed entropy) are refused here and
the caller falls back to it.
"""

from __future__ import annotations

import numpy as np

M32 = 0xFFFFFFFF
M64 = (1 << 64) - 1
# SeedSequence constants (numpy/random/bit_generator.pyx)
POOL_SIZE = 4
INIT_A, MULT_A = 0x43B0D7E5, 0x931E8875
INIT_B, MULT_B = 0x8B51F9DD, 0x58F38DED
MIX_MULT_L, MIX_MULT_R = 0xCA01F9DD, 0x4973F715
XSHIFT = 16
# PCG64 (numpy/random/src/pcg64/pcg64.h): the default 128-bit multiplier
PCG_MULT = (2549297995355413924 << 64) | 4865540595714422341
U64 = np.uint64

Pair = tuple[np.ndarray, np.ndarray]  # (high, low) uint64 arrays of a 128-bit value


def reference_uniform(key: list[int], n: int) -> np.ndarray:
    """What the fast path must reproduce."""
    return np.random.default_rng(key).random(n)


def _hashmix(value: np.ndarray, h: int) -> tuple[np.ndarray, int]:
    value = value ^ np.uint32(h)
    h = (h * MULT_A) & M32
    value = value * np.uint32(h)
    return value ^ (value >> np.uint32(XSHIFT)), h


def _mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r = np.uint32(MIX_MULT_L) * x - np.uint32(MIX_MULT_R) * y
    return r ^ (r >> np.uint32(XSHIFT))


def seed_pool(words: np.ndarray) -> np.ndarray:
    """uint32 [n, 4]: ``SeedSequence(list(row)).pool`` for each row of ``words`` (uint32 [n, w], w <= 4,
    each row one 32-bit word per entropy integer)."""
    n, w = words.shape
    if w > POOL_SIZE:
        raise ValueError(f"seed_pool: {w} entropy words > pool size {POOL_SIZE}")
    h = INIT_A
    pool = []
    for i in range(POOL_SIZE):
        src = words[:, i] if i < w else np.zeros(n, np.uint32)
        v, h = _hashmix(src, h)
        pool.append(v)
    for i_src in range(POOL_SIZE):
        for i_dst in range(POOL_SIZE):
            if i_src != i_dst:
                v, h = _hashmix(pool[i_src], h)
                pool[i_dst] = _mix(pool[i_dst], v)
    return np.stack(pool, axis=1)


def _generate_state_u64(pool: np.ndarray) -> list[np.ndarray]:
    """``SeedSequence.generate_state(4, np.uint64)`` per row of ``pool``: four uint64 arrays."""
    h = INIT_B
    words = []
    for i in range(8):
        v = pool[:, i % POOL_SIZE] ^ np.uint32(h)
        h = (h * MULT_B) & M32
        v = v * np.uint32(h)
        words.append((v ^ (v >> np.uint32(XSHIFT))).astype(U64))
    return [words[2 * i] | (words[2 * i + 1] << U64(32)) for i in range(4)]  # little-endian word pairs


def _mulhi64(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """High 64 bits of the 128-bit products x * y (uint64 arrays), from 32-bit limbs."""
    m = U64(M32)
    x0, x1, y0, y1 = x & m, x >> U64(32), y & m, y >> U64(32)
    p00, p01, p10, p11 = x0 * y0, x0 * y1, x1 * y0, x1 * y1
    mid = (p00 >> U64(32)) + (p01 & m) + (p10 & m)
    return p11 + (p01 >> U64(32)) + (p10 >> U64(32)) + (mid >> U64(32))


def _mul128(a: Pair, b: Pair) -> Pair:
    """a * b mod 2**128."""
    return _mulhi64(a[1], b[1]) + a[0] * b[1] + a[1] * b[0], a[1] * b[1]


def _add128(a: Pair, b: Pair) -> Pair:
    lo = a[1] + b[1]
    return a[0] + b[0] + (lo < a[1]).astype(U64), lo


def _split(v: int) -> tuple[int, int]:
    return v >> 64, v & M64


def pcg64_seed(pool: np.ndarray) -> tuple[Pair, Pair]:
    """(state, inc) of ``PCG64(SeedSequence)`` per row of ``pool`` (``pcg_setseq_128_srandom_r``)."""
    s_hi, s_lo, i_hi, i_lo = _generate_state_u64(pool)
    inc = ((i_hi << U64(1)) | (i_lo >> U64(63)), (i_lo << U64(1)) | U64(1))
    mult = (np.full_like(s_hi, _split(PCG_MULT)[0]), np.full_like(s_hi, _split(PCG_MULT)[1]))
    state = _add128(inc, (s_hi, s_lo))  # step from state 0 gives inc; then add the initial state
    state = _add128(_mul128(state, mult), inc)
    return state, inc


class _JumpTable:
    """A^k and (A^{k-1} + ... + 1) mod 2**128 for k = 0, 1, ..., grown on demand."""

    def __init__(self) -> None:
        self.mult: list[int] = [1]
        self.incs: list[int] = [0]
        self._arrays: tuple[np.ndarray, ...] = ()

    def arrays(self, k_max: int) -> tuple[np.ndarray, ...]:
        if k_max >= len(self.mult):
            for _ in range(len(self.mult), max(k_max + 1, 2 * len(self.mult))):
                self.incs.append((self.incs[-1] * PCG_MULT + 1) % (1 << 128))
                self.mult.append((self.mult[-1] * PCG_MULT) % (1 << 128))
            self._arrays = tuple(np.array([f(v) for v in table], dtype=U64) for table in (self.mult, self.incs)
                                 for f in (lambda v: v >> 64, lambda v: v & M64))
        return self._arrays


_JUMPS = _JumpTable()


def _xsl_rr(state: Pair) -> np.ndarray:
    x = state[0] ^ state[1]
    rot = state[0] >> U64(58)
    return (x >> rot) | (x << ((U64(64) - rot) & U64(63)))


def uniform_at(keys: np.ndarray, key_index: np.ndarray, draw: np.ndarray) -> np.ndarray:
    """float64 [m]: draw ``draw[j]`` (0-based) of ``default_rng(list(keys[key_index[j]])).random``.

    ``keys``: int64 [n, w] (w <= 4), entropy integers in [0, 2**32); ``key_index``, ``draw``: int64 [m].
    """
    keys = np.asarray(keys, dtype=np.int64)
    if keys.ndim != 2 or ((keys < 0) | (keys > M32)).any():
        raise ValueError("uniform_at: keys must be a 2-d array of integers in [0, 2**32)")
    state, inc = pcg64_seed(seed_pool(keys.astype(np.uint32)))
    draw = np.asarray(draw, dtype=np.int64)
    a_hi, a_lo, c_hi, c_lo = _JUMPS.arrays(int(draw.max(initial=0)) + 1)
    k = draw + 1
    s0 = (state[0][key_index], state[1][key_index])
    inc_k = (inc[0][key_index], inc[1][key_index])
    s_k = _add128(_mul128((a_hi[k], a_lo[k]), s0), _mul128((c_hi[k], c_lo[k]), inc_k))
    return (_xsl_rr(s_k) >> U64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def uniform(keys: np.ndarray, key_index: np.ndarray, draw: np.ndarray) -> np.ndarray:
    """``uniform_at``, or numpy's own generators (one per key, slow) for keys it refuses."""
    keys = np.asarray(keys, dtype=np.int64)
    if keys.ndim == 2 and keys.shape[1] <= POOL_SIZE and not ((keys < 0) | (keys > M32)).any():
        return uniform_at(keys, key_index, draw)
    draw = np.asarray(draw, dtype=np.int64)
    out = np.empty(len(draw), dtype=np.float64)
    for k in np.unique(key_index).tolist():
        at = np.flatnonzero(key_index == k)
        out[at] = reference_uniform([int(v) for v in keys[k]], int(draw[at].max()) + 1)[draw[at]]
    return out
