"""Step 2, knowledge querying: ask a trained LUM many condition queries per user in one pass.

Each user's history is encoded once and followed by Q query condition tokens; the group-query mask
lets every query see the whole history and itself, never the other queries, so one forward pass
answers all Q (``lum_dist.ops.group_query``; a Triton kernel on CUDA).

Output directory::

    part-00000.parquet ...  user_id (raw), history_len (behaviours the answer has seen), condition ("*" or
                            "<field>=<raw value>"), embedding, model_version
    items.parquet           item_id (raw), embedding: the model's item embeddings
    manifest.json           written last; "complete": true once every shard exists

The history ends at the split's target (``valid``: train_end, ``test``: valid_end), or ``lag`` behaviours
earlier: stored outputs are refreshed offline and then serve the requests that follow, so a downstream
training request at position t may only use an answer with history_len <= t (checked by the downstream
stage against the ``history_len`` column).

Users are cut into fixed chunks in a deterministic order; chunk k becomes ``part-k`` (written atomically)
and is computed by rank ``k % world_size``. A killed job re-run with the same arguments skips the shards
that exist, so it resumes without duplicates or gaps.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from tqdm import tqdm

from lum_dist.checkpoint import load_model, resolve_checkpoint
from lum_dist.config import GENERIC_CONDITION, QUERY_MANIFEST, QueryConfig
from lum_dist.data.packing import best_fit_decreasing, collate
from lum_dist.data.prepare import item_embedding_table, load_vocab, read_users
from lum_dist.data.schema import MASK_ID, NUM_SPECIAL_IDS, DatasetMeta, float_list_column
from lum_dist.data.tokenize import tokenize_group_query
from lum_dist.model import LUMModel, SASRecModel
from lum_dist.utils import atomic_write_bytes, atomic_write_text, dist_info


def parse_conditions(specs: list[str], meta: DatasetMeta, data_path: Path) -> tuple[list[str], np.ndarray]:
    """Condition specs -> (names, cond ids [Q, F]). Unspecified fields are MASK (the generic value).

    ``field=ALL`` expands to every training value of that field (most frequent first)."""
    names: list[str] = []
    rows: list[np.ndarray] = []
    for spec in specs:
        if spec == GENERIC_CONDITION:
            names.append(GENERIC_CONDITION)
            rows.append(np.full(len(meta.cond_fields), MASK_ID, np.int64))
            continue
        if "=" not in spec:
            raise ValueError(f"condition {spec!r}: expected '*' or '<field>=<value>' (fields: {meta.cond_fields})")
        fname, value = spec.split("=", 1)
        if fname not in meta.cond_fields:
            raise ValueError(f"condition {spec!r}: unknown field {fname!r}; fields: {meta.cond_fields}")
        vocab = load_vocab(data_path, fname).sort_by("id")
        raw, ids = vocab.column("raw").to_pylist(), vocab.column("id").to_numpy()
        lookup = dict(zip(raw, ids, strict=True))
        values = [r for r, i in zip(raw, ids, strict=True) if i >= NUM_SPECIAL_IDS] if value == "ALL" else [value]
        for v in values:
            if v not in lookup:
                raise ValueError(f"condition {spec!r}: value {v!r} is not in the training vocabulary of {fname}")
            row = np.full(len(meta.cond_fields), MASK_ID, np.int64)
            row[meta.cond_fields.index(fname)] = lookup[v]
            names.append(f"{fname}={v}")
            rows.append(row)
    return names, np.stack(rows)


def model_version(ckpt: Path) -> str:
    state = json.loads((ckpt / "checkpoint.json").read_text())
    digest = hashlib.sha1(json.dumps(state["config"], sort_keys=True).encode()).hexdigest()[:8]
    return f"{ckpt.parent.parent.name}/{ckpt.name}/{digest}"


def history_ends(users: pa.Table, split: str, lag: int = 0) -> np.ndarray:
    """Per user, the number of behaviours its answers see: the split's target index minus ``lag`` (>= 0)."""
    if split not in ("valid", "test"):
        raise ValueError(f"split={split!r}: expected 'valid' or 'test'")
    if lag < 0:
        raise ValueError(f"lag={lag}: must be >= 0")
    end = users.column("train_end" if split == "valid" else "valid_end").to_numpy().astype(np.int64)
    return np.maximum(end - lag, 0)


@torch.no_grad()
def answer_users(model: LUMModel | SASRecModel, users: pa.Table, meta: DatasetMeta, queries: np.ndarray, ends: np.ndarray,
                 max_seq_len: int, token_budget: int, device: torch.device, item_attributes: bool = False) -> np.ndarray:
    """Outputs [U, Q, E] for the users of one shard, user u's history being behaviours [0, ends[u]):
    histories and queries packed many users per row."""
    q_per_pass = max(1, token_budget - max_seq_len)  # a user with many queries is split into several sequences
    seqs, owner = [], []  # owner[i] = (user index, first query) of sequence i
    for u, row in enumerate(users.to_pylist()):
        row = {k: (np.asarray(v) if isinstance(v, list) else v) for k, v in row.items()}
        for q0 in range(0, len(queries), q_per_pass):
            seqs.append(tokenize_group_query(row, meta, max_seq_len, int(ends[u]), queries[q0:q0 + q_per_pass],
                                             item_attributes))
            owner.append((u, q0))
    result = np.zeros((users.num_rows, len(queries), model.config.item_emb_dim), np.float32)
    for rows in best_fit_decreasing(np.array([len(s.item) for s in seqs]), token_budget):
        batch = collate(seqs, [rows], token_budget).to(device)
        out = model.forward_batch(batch)[batch.query_index()].float().cpu().numpy()
        start = 0
        for s, i in enumerate(rows):  # collate keeps the row's sequence order; query_index too
            u, q0 = owner[i]
            nq = int(batch.num_queries[s])
            result[u, q0:q0 + nq] = out[start:start + nq]
            start += nq
    return result


def run(job: QueryConfig) -> Path:
    """Answer every user's conditions (this rank's shards of them); returns the output folder. Under torchrun
    the ranks join a process group, so rank 0 writes the manifest once every rank's shards exist."""
    device = torch.device(job.device if job.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = join_launcher_group(device)
    ckpt = resolve_checkpoint(Path(job.checkpoint))
    model, cfg, meta = load_model(ckpt)
    if device.type == "cuda":
        model = model.to(device, dtype=torch.bfloat16)
    data_path = Path(cfg.data.path)
    names, queries = parse_conditions(job.conditions, meta, data_path)
    version = model_version(ckpt)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    end_col = {"test": "valid_end", "valid": "train_end"}[job.split]

    users = read_users(data_path)
    if job.max_users:
        users = users.slice(0, job.max_users)
    ends = history_ends(users, job.split, job.lag)
    _record_or_check_job(out, job, version)
    chunks = [(k, s) for k, s in enumerate(range(0, users.num_rows, job.users_per_shard))]
    mine = [(k, s) for k, s in chunks if k % world == rank and not (out / shard_name(k)).is_file()]
    for k, start in tqdm(mine, desc=f"query rank {rank}", unit="shard", disable=rank != 0 and world > 1):
        part = users.slice(start, job.users_per_shard)
        part_ends = ends[start:start + part.num_rows]
        emb = answer_users(model, part, meta, queries, part_ends, cfg.data.max_seq_len, job.token_budget, device,
                           cfg.data.item_attributes)
        uids = part.column("user_id").to_pylist()
        emb = emb.reshape(len(uids) * len(names), -1)
        table = pa.table({
            "user_id": pa.array(np.repeat(uids, len(names)).tolist(), pa.string()),
            "history_len": pa.array(np.repeat(part_ends, len(names)), pa.int32()),
            "condition": pa.array(names * len(uids), pa.string()),
            "embedding": float_list_column(emb),
            "model_version": pa.array([version] * len(emb), pa.string()),
        })
        atomic_write_bytes(out / shard_name(k), _parquet_bytes(table))

    if world > 1:
        dist.barrier()  # every rank's shards are written
    if rank == 0:
        with torch.no_grad():
            items = item_embedding_table(data_path, model.item_embeddings(None).float().cpu().numpy())
        atomic_write_bytes(out / "items.parquet", _parquet_bytes(items))
        shards = [shard_name(k) for k, _ in chunks]
        complete = all((out / s).is_file() for s in shards)
        manifest = {"model_version": version, "checkpoint": str(ckpt), "dataset": meta.name, "split": job.split,
                    "history_end": end_col, "lag": job.lag, "conditions": names, "embedding_dim": int(model.config.item_emb_dim),
                    "shards": shards, "num_rows": users.num_rows * len(names), "complete": complete,
                    "job": asdict(job)}
        atomic_write_text(out / QUERY_MANIFEST, json.dumps(manifest, indent=2))
    return out


def join_launcher_group(device: torch.device) -> tuple[int, int]:
    """(rank, world size): started by a launcher (WORLD_SIZE > 1 in the environment), join its process group
    (gloo on the CPU, nccl on CUDA) if nobody has; else the current group's, or (0, 1) alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist_info()


OUTPUT_FIELDS = ("conditions", "split", "lag", "max_users", "users_per_shard")  # what the shards depend on


def _record_or_check_job(out: Path, job: QueryConfig, version: str) -> None:
    """Resuming into ``out`` is only safe for the same job: record it on the first run, refuse a different one."""
    spec = {"model_version": version, **{k: getattr(job, k) for k in OUTPUT_FIELDS}}
    path = out / "job.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in spec if old.get(k) != spec[k])
        if diff:
            raise ValueError(f"{out}: holds shards of another query job (differs in {diff}: "
                             f"{ {k: old.get(k) for k in diff} } vs { {k: spec[k] for k in diff} }); use a new --out")
        return
    atomic_write_text(path, json.dumps(spec, indent=2))


def shard_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()
