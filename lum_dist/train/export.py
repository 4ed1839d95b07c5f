"""Turn a trained model into things anyone can use without lum-dist (``launch/export.py``).

* ``lum_dist.checkpoint.load_model`` + ``save_pretrained``: the consolidated model (safetensors).
* ``export_embeddings``: ``users.parquet`` (raw ``user_id``, ``embedding``: the representation that ranks
  the user's held-out item of the split) and ``items.parquet`` (raw ``item_id``, ``embedding``). The score of
  a (user, item) pair is the dot product of the two; with cosine similarity both sides are L2-normalised
  here so that this holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from lum_dist.config import PretrainConfig
from lum_dist.data.loader import eval_batches
from lum_dist.data.prepare import item_embedding_table
from lum_dist.data.schema import DatasetMeta, float_list_column
from lum_dist.model import LUMModel, SASRecModel
from lum_dist.utils import atomic_dir


@torch.no_grad()
def export_embeddings(model: LUMModel | SASRecModel, cfg: PretrainConfig, meta: DatasetMeta, split: str, out: Path,
                      max_users: int = 0) -> dict[str, int]:
    data_path = Path(cfg.data.path)
    cosine = cfg.loss.similarity == "cosine"
    user_ids: list[str] = []
    user_emb: list[np.ndarray] = []
    batches = eval_batches(data_path, meta, split, cfg.data.max_seq_len, cfg.eval.token_budget, max_users=max_users,
                           item_attributes=cfg.data.item_attributes)
    for batch in tqdm(batches, desc=f"users ({split})", unit="batch"):
        u = model.forward_batch(batch)[batch.query_index()].float()
        u = torch.nn.functional.normalize(u, dim=-1) if cosine else u
        user_ids.extend(batch.user_ids)
        user_emb.append(u.numpy())
    items = model.item_embeddings(None).float()
    items = torch.nn.functional.normalize(items, dim=-1) if cosine else items
    item_table = item_embedding_table(data_path, items.numpy())
    users = np.concatenate(user_emb) if user_emb else np.zeros((0, items.shape[1]), np.float32)
    user_table = pa.table({"user_id": pa.array(user_ids, pa.string()), "embedding": float_list_column(users)})
    with atomic_dir(out) as tmp:
        pq.write_table(user_table, tmp / "users.parquet")
        pq.write_table(item_table, tmp / "items.parquet")
        (tmp / "export.json").write_text(json.dumps(
            {"split": split, "similarity": cfg.loss.similarity, "score": "dot product of the two embeddings",
             "num_users": len(user_ids), "num_items": item_table.num_rows}, indent=2))
    return {"users": len(user_ids), "items": item_table.num_rows}
