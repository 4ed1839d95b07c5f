"""Turn a ZeRO checkpoint into things anyone can use without DeepSpeed.

* ``consolidate``: the sharded fp32 weights -> one ``LUMModel`` -> ``save_pretrained`` (safetensors).
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

from lum_dist.config import PretrainConfig, from_dict
from lum_dist.data.loader import eval_batches
from lum_dist.data.prepare import load_vocab
from lum_dist.data.schema import ITEM_FIELD, NUM_SPECIAL_IDS, DatasetMeta, float_list_column
from lum_dist.model import LUMModel, build_model
from lum_dist.train.checkpoint import DS_TAG, find_best_checkpoint, find_resume_checkpoint
from lum_dist.utils import atomic_dir


def resolve_checkpoint(path: Path) -> Path:
    """Accept a checkpoint directory, a ``checkpoints/`` root or a run's output directory; a root resolves to
    its best validation checkpoint when the run selected one, else to its newest complete checkpoint."""
    path = Path(path)
    if (path / "checkpoint.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = find_best_checkpoint(root) or find_resume_checkpoint(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"no complete checkpoint at or under {path}")


def load_run_config(ckpt: Path) -> PretrainConfig:
    return from_dict(PretrainConfig, json.loads((ckpt / "checkpoint.json").read_text())["config"]["pretrain"])


def consolidate(ckpt: Path) -> tuple[LUMModel, PretrainConfig, DatasetMeta]:
    """Load the full fp32 model from a (ZeRO-sharded) checkpoint on the CPU, in one process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from lum_dist.train.trainer import model_config_for

    cfg = load_run_config(ckpt)
    meta = DatasetMeta.load(Path(cfg.data.path) / "meta.json")
    model = build_model(model_config_for(cfg, meta))
    if cfg.train.zero_stage >= 1:  # sharded fp32 master weights: DeepSpeed's converter gathers them
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)
    else:  # ZeRO off: one replica of the module's weights (DeepSpeed's own pickle file)
        state = torch.load(ckpt / DS_TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        state = {k: v.float() for k, v in state.items()}
    model_state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", None) or []]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt} does not match the model: missing {missing}, unexpected {unexpected}")
    model.eval()
    return model, cfg, meta


@torch.no_grad()
def export_embeddings(model: LUMModel, cfg: PretrainConfig, meta: DatasetMeta, split: str, out: Path,
                      max_users: int = 0) -> dict[str, int]:
    data_path = Path(cfg.data.path)
    cosine = cfg.loss.similarity == "cosine"
    user_ids: list[str] = []
    user_emb: list[np.ndarray] = []
    batches = eval_batches(data_path, meta, split, cfg.data.max_seq_len, cfg.eval.token_budget, max_users=max_users,
                           item_attributes=cfg.data.item_attributes)
    for batch in tqdm(batches, desc=f"users ({split})", unit="batch"):
        out_tok = model.forward_batch(batch)
        u = out_tok[batch.cu_seqlens[1:].long() - 1].float()
        u = torch.nn.functional.normalize(u, dim=-1) if cosine else u
        user_ids.extend(batch.user_ids)
        user_emb.append(u.numpy())
    items = model.item_embeddings(None).float()
    items = torch.nn.functional.normalize(items, dim=-1) if cosine else items
    vocab = load_vocab(data_path, ITEM_FIELD).sort_by("id")
    ids = vocab.column("id").to_numpy()
    keep = ids >= NUM_SPECIAL_IDS
    item_table = pa.table({"item_id": vocab.column("raw").filter(pa.array(keep)),
                           "embedding": float_list_column(items[torch.as_tensor(ids[keep])].numpy())})
    users = np.concatenate(user_emb) if user_emb else np.zeros((0, items.shape[1]), np.float32)
    user_table = pa.table({"user_id": pa.array(user_ids, pa.string()), "embedding": float_list_column(users)})
    with atomic_dir(out) as tmp:
        pq.write_table(user_table, tmp / "users.parquet")
        pq.write_table(item_table, tmp / "items.parquet")
        (tmp / "export.json").write_text(json.dumps(
            {"split": split, "similarity": cfg.loss.similarity, "score": "dot product of the two embeddings",
             "num_users": len(user_ids), "num_items": item_table.num_rows}, indent=2))
    return {"users": len(user_ids), "items": item_table.num_rows}
