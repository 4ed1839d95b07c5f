"""Features from the step-2 outputs (lum_dist/query/job.py) for the downstream models.

A query directory holds, per user and condition ("*" generic or "<field>=<raw value>"), the LUM output
embedding and the history length it was computed from, plus the LUM item embeddings. The manifest says
which history it was computed from; opening it checks that against the use (train samples need
``split=valid`` with enough ``lag`` for the earliest training request, evaluation samples ``split=test``),
and every lookup checks that the output's history ends at or before the request it serves: an output
that has seen the request's own behaviour (a leak) is an error.

Shards are read one at a time and only the rows asked for are kept: a directory with every attribute value
as a condition is (users x values x dim) floats and need not fit in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lum_dist.config import GENERIC_CONDITION, QUERY_MANIFEST
from lum_dist.data.schema import NUM_SPECIAL_IDS

SEP = "\x1f"  # joins user id and condition into one lookup key; never in either


def open_query_dir(path: str | Path, split: str, dataset_name: str, min_lag: int = 0) -> dict:
    """The directory's manifest, after checking it is complete and computed for ``split`` on the dataset,
    with histories ending at least ``min_lag`` behaviours before the split's target."""
    path = Path(path)
    manifest_path = path / QUERY_MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: missing; run launch/query.py --split {split} first")
    manifest = json.loads(manifest_path.read_text())
    problems = []
    if not manifest.get("complete"):
        problems.append("complete is not true (some shards are missing: re-run the query job)")
    if manifest.get("split") != split:
        problems.append(f"split is {manifest.get('split')!r}, this use needs {split!r} "
                        f"(history up to {'train_end' if split == 'valid' else 'valid_end'})")
    if manifest.get("lag", 0) < min_lag:
        problems.append(f"lag is {manifest.get('lag', 0)}: the earliest training request is {min_lag} behaviour(s) "
                        f"before the target, so its outputs would have seen it (re-run launch/query.py --lag {min_lag})")
    if manifest.get("dataset") != dataset_name:
        problems.append(f"dataset is {manifest.get('dataset')!r}, the prepared data is {dataset_name!r}")
    if problems:
        raise ValueError(f"{manifest_path}: " + "; ".join(problems))
    return manifest


def model_versions(dirs: dict[str, str | Path]) -> dict[str, str]:
    """Which pretrained model (run, checkpoint and weights hash) computed each split's query directory: the
    provenance a downstream table prints. Splits whose directory has no manifest (base-only runs) are left out."""
    versions = {}
    for split, path in dirs.items():
        manifest_path = Path(path) / QUERY_MANIFEST
        if manifest_path.is_file():
            versions[split] = json.loads(manifest_path.read_text()).get("model_version", "unknown")
    return versions


def lookup(path: str | Path, manifest: dict, users: list[str], conditions: list[str],
           positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings [n, E] of the (user, condition) pairs and whether each was found (zeros where not).

    ``positions[i]``: the index of the behaviour request i predicts; an output whose history is longer
    (it has seen that behaviour) raises."""
    keys = pa.array([u + SEP + c for u, c in zip(users, conditions, strict=True)], pa.string())
    out = np.zeros((len(keys), int(manifest["embedding_dim"])), np.float32)
    found = np.zeros(len(keys), bool)
    positions = np.asarray(positions)
    for shard in manifest["shards"]:
        table = pq.read_table(Path(path) / shard, columns=["user_id", "condition", "history_len"])
        shard_keys = pc.binary_join_element_wise(table.column("user_id"), table.column("condition"), SEP)
        at = pc.index_in(keys, value_set=shard_keys)
        hit = at.is_valid().to_numpy(zero_copy_only=False)
        if not hit.any():
            continue
        rows = at.filter(at.is_valid()).to_numpy()
        seen = table.column("history_len").to_numpy()[rows]
        late = np.flatnonzero(seen > positions[hit])
        if len(late):
            i = int(np.flatnonzero(hit)[late[0]])
            raise ValueError(f"{Path(path) / shard}: row {int(rows[late[0]])}, field 'history_len': the output for "
                             f"user {users[i]!r} has seen {int(seen[late[0]])} behaviours, but it would serve the "
                             f"request for behaviour {int(positions[i])} (a leak); re-run the query job with more lag")
        emb = pq.read_table(Path(path) / shard, columns=["embedding"]).column("embedding").take(pa.array(rows))
        out[hit] = _matrix(emb, Path(path) / shard, rows, out.shape[1])
        found |= hit
    return out, found


def item_embeddings(path: str | Path, item_raw: list[str]) -> np.ndarray:
    """LUM item embeddings [num_items, E] in the dataset's dense id order (zeros for reserved/unknown ids)."""
    table = pq.read_table(Path(path) / "items.parquet")
    index = {raw: i for i, raw in enumerate(table.column("item_id").to_pylist())}
    emb = _matrix(table.column("embedding"), Path(path) / "items.parquet", np.arange(table.num_rows))
    out = np.zeros((len(item_raw), emb.shape[1]), np.float32)
    for dense, raw in enumerate(item_raw):
        if dense >= NUM_SPECIAL_IDS and raw in index:
            out[dense] = emb[index[raw]]
    return out


@dataclass
class UserOutputs:
    generic: np.ndarray  # [R, E] the "*" output of each request's user
    item: np.ndarray  # [num_items, E] LUM item embeddings


def user_outputs(path: str | Path, manifest: dict, user_ids: list[str], positions: np.ndarray,
                 item_raw: list[str]) -> UserOutputs:
    generic, found = lookup(path, manifest, user_ids, [GENERIC_CONDITION] * len(user_ids), positions)
    if not found.all():
        missing = [u for u, f in zip(user_ids, found, strict=True) if not f]
        raise ValueError(f"{path}: no '*' output for {len(missing)} user(s), e.g. {missing[:3]}; re-run the "
                         f"query job over every user or set the downstream max_users to match its max_users")
    return UserOutputs(generic=generic, item=item_embeddings(path, item_raw))


def conditional_outputs(path: str | Path, manifest: dict, user_ids: list[str], positions: np.ndarray,
                        attr_field: str, attr_raw: list[str], cand_attr: np.ndarray,
                        generic: np.ndarray) -> tuple[np.ndarray, float]:
    """Per sample, the output for "<attr_field>=<candidate's value>", falling back to the user's "*" output;
    and the fraction of samples that had their conditional output (a low one: the query job lacked the field)."""
    conds = [f"{attr_field}={attr_raw[a]}" if a >= NUM_SPECIAL_IDS else GENERIC_CONDITION for a in cand_attr]
    emb, found = lookup(path, manifest, user_ids, conds, positions)
    found &= np.array([c != GENERIC_CONDITION for c in conds], bool)
    return np.where(found[:, None], emb, generic), float(found.mean()) if len(found) else 0.0


def _matrix(column: pa.ChunkedArray | pa.Array, file: Path, rows: np.ndarray, dim: int | None = None) -> np.ndarray:
    """A list<float> column as [n, dim] float32; ``rows`` are the file rows, for the error message."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(column), -1).to_numpy(zero_copy_only=False)
    dim = int(lengths[0]) if dim is None and len(lengths) else dim
    bad = np.flatnonzero(lengths != dim)
    if len(bad):
        raise ValueError(f"{file}: row {int(rows[bad[0]])}, field 'embedding': {int(lengths[bad[0]])} values, "
                         f"expected {dim} (null = -1)")
    out = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), dim)
    bad = np.flatnonzero(~np.isfinite(out).all(1))
    if len(bad):
        raise ValueError(f"{file}: row {int(rows[bad[0]])}, field 'embedding': not finite")
    return out
