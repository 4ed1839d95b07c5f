"""What a checkpoint is on disk, and how to read a trained model out of one: below train, eval and query.

Layout (written by :mod:`lum_dist.train.checkpoint`, on a file system every rank sees)::

    <output_dir>/.lock         held by rank 0 while a run uses the folder: a second run refuses
    <output_dir>/checkpoints/
      step_00000100/
        ds/...                 DeepSpeed shards: parameters and optimizer states of every rank
        trainer_rank0.json ... per rank: step, loader state, selection state, flags, Python/numpy RNG states
        rng_rank0.pt ...       per rank: the torch (and CUDA) RNG states, plain tensors (weights_only=True)
        ema_rank0.pt ...       with optim.ema_decay: each rank's weight average (its ZeRO-3 shards; rank 0 only
                               without ZeRO-3), plain tensors; what evaluation, export and query read
        checkpoint.json        written last before the rename: the step, the run config and every file's size
      latest                   text file naming the newest complete checkpoint, updated last
      best                     text file naming the checkpoint with the best validation metric (kept
                               whatever ``keep_last`` says; evaluation, export and query read it)

A checkpoint is complete once renamed into place (``checkpoint.json`` present) and intact if every file it
lists has its recorded size. :func:`find_resume_checkpoint` picks what a run resumes from (a damaged one is
skipped with a warning); :func:`resolve_checkpoint` what a reader uses (the best one, else the newest);
:func:`load_model` rebuilds the model a checkpoint describes, in one process, from its (ZeRO-sharded)
weights. DeepSpeed's own files under ``ds/`` are pickles that DeepSpeed reads (:mod:`lum_dist.parallel`);
everything lum-dist writes is JSON or plain tensors.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from lum_dist import parallel
from lum_dist.config import PretrainConfig, from_dict
from lum_dist.data.prepare import (
    item_attribute_ids,
    item_neighbour_ids,
    item_tag_ids,
    item_train_counts,
    load_meta,
)
from lum_dist.data.schema import TAGS_FIELD, DatasetMeta
from lum_dist.model import LUMConfig, LUMModel, SASRecConfig, SASRecModel, build_model, load_preset
from lum_dist.utils import dist_info

STEP_DIR = re.compile(r"^step_(\d{8})$")
DS_TAG = "ds"
INFO = "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names it and the first missing or damaged file."""


def trainer_state_file(rank: int) -> str:
    return f"trainer_rank{rank}.json"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def ema_file(rank: int) -> str:
    """This rank's weight average (``optim.ema_decay``; :class:`lum_dist.train.ema.WeightAverage`)."""
    return f"ema_rank{rank}.pt"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (renamed into place: ``checkpoint.json`` present), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / INFO).is_file()]
    return sorted(found, key=lambda p: p.name)


def file_sizes(ckpt: Path) -> dict[str, int]:
    """What a checkpoint needs to resume: DeepSpeed's files and each rank's state, with their sizes."""
    files = [f for f in ckpt.rglob("*") if f.is_file()
             and (f.parts[len(ckpt.parts)] == DS_TAG or f.name.startswith(("trainer_rank", "rng_rank", "ema_rank")))]
    return {f.relative_to(ckpt).as_posix(): f.stat().st_size for f in sorted(files)}


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from (its first missing or truncated file), or None if it is intact.
    Checkpoints of older lum-dist versions hold no file list: only their DeepSpeed folder is checked."""
    info_file = ckpt / INFO
    if not info_file.is_file():
        return f"{info_file} is missing"
    try:
        files = json.loads(info_file.read_text()).get("files")
    except ValueError as e:
        return f"{info_file} is not valid JSON ({e})"
    if files is None:
        return None if (ckpt / DS_TAG).is_dir() else f"{ckpt / DS_TAG} is missing"
    for rel, size in files.items():
        file = ckpt / rel
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, {size} were written (truncated or replaced)"
    return None


def validate(ckpt: Path, world_size: int | None = None) -> None:
    """Raise CheckpointError if ``ckpt`` is damaged or (``world_size`` given) was written by another number
    of ranks."""
    problem = checkpoint_problem(ckpt)
    if problem is not None:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {problem}")
    written_by = json.loads((ckpt / INFO).read_text()).get("config", {}).get("world_size")
    if world_size is not None and written_by not in (None, world_size):
        raise CheckpointError(f"checkpoint {ckpt} was written by {written_by} ranks and this run has "
                              f"{world_size}: a ZeRO checkpoint resumes on the same number of ranks")


def _warn(message: str) -> None:
    if dist_info()[0] == 0:
        print(f"[lum-dist] warning: {message}", file=sys.stderr, flush=True)


def find_resume_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` names if it is intact, else the newest intact one (each damaged one skipped
    with a warning); None if there is none at all. Raises CheckpointError if every checkpoint is damaged:
    starting over silently would throw a run's progress away (and rotate the damaged ones out)."""
    found = complete_checkpoints(root)
    latest = root / "latest"
    named = root / latest.read_text().strip() if latest.is_file() else None
    candidates = ([named] if named is not None and STEP_DIR.match(named.name) else [])
    candidates += [p for p in reversed(found) if p != named]
    problems = []
    for ckpt in candidates:
        if not ckpt.is_dir():
            continue  # `latest` names a checkpoint that keep_last or a person removed
        problem = checkpoint_problem(ckpt)
        if problem is None:
            if problems:
                _warn(f"resuming from {ckpt.name}, the newest intact checkpoint; skipped: "
                      + "; ".join(problems))
            return ckpt
        problems.append(f"{ckpt.name} ({problem})")
    if problems:
        raise CheckpointError(f"no intact checkpoint under {root}: " + "; ".join(problems) + ". Restore "
                              "the missing files, or start over with train.resume=never (or another "
                              "train.output_dir)")
    return None


def find_best_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``best`` names, if it is complete (its files are checked when it is loaded)."""
    best = root / "best"
    if best.is_file():
        cand = root / best.read_text().strip()
        if (cand / INFO).is_file():
            return cand
    return None


def resolve_checkpoint(path: Path) -> Path:
    """Accept a checkpoint directory, a ``checkpoints/`` root or a run's output directory; a root resolves to
    its best validation checkpoint when the run selected one, else to its newest complete checkpoint."""
    path = Path(path)
    if (path / INFO).is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = find_best_checkpoint(root) or find_resume_checkpoint(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"no complete checkpoint at or under {path}")


def load_run_config(ckpt: Path) -> PretrainConfig:
    """The run config a checkpoint was trained with."""
    return from_dict(PretrainConfig, json.loads((ckpt / INFO).read_text())["config"]["pretrain"])


def model_config_for(cfg: PretrainConfig, meta: DatasetMeta) -> LUMConfig | SASRecConfig:
    """The preset's architecture with embedding tables sized from the dataset's vocabularies."""
    return load_preset(cfg.model.preset, num_items=meta.num_items, cond_vocab_sizes=meta.cond_vocab_sizes(),
                       num_numeric=len(meta.numeric_fields),
                       item_attr_vocab_sizes=[meta.vocab_sizes[f] for f in meta.item_cond_fields],
                       num_item_tags=meta.vocab_sizes.get(TAGS_FIELD, 0), max_item_tags=meta.max_item_tags,
                       **cfg.model.overrides)


def build_run_model(model_cfg: LUMConfig | SASRecConfig, data_path: str | Path,
                    meta: DatasetMeta) -> LUMModel | SASRecModel:
    """A run's model (``model_config_for``), freshly initialised, with what it reads from its dataset besides
    table sizes (each item's attributes, for ``attribute_targets``, and tags, for ``item_tags``)."""
    model = build_model(model_cfg)
    if isinstance(model, LUMModel) and model.config.attribute_targets:
        model.set_item_attributes(torch.from_numpy(item_attribute_ids(data_path, meta)))
    if isinstance(model, LUMModel) and model.config.item_tags:
        model.set_item_tags(torch.from_numpy(item_tag_ids(data_path, meta)))
    if isinstance(model, LUMModel) and model.config.item_neighbours:
        model.set_item_neighbours(torch.from_numpy(item_neighbour_ids(
            data_path, meta, model.config.item_neighbours, model.config.neighbour_window,
            model.config.neighbour_distance_weighted)),
            torch.from_numpy(item_train_counts(data_path, meta.num_items)))
    return model


def averaged_weights(ckpt: Path, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The whole weight-averaged tensors named in ``shapes``, of a run with ``optim.ema_decay``, from every rank's
    ``ema_rank*.pt`` (ZeRO-3 partitions concatenated in rank order, the last one's padding cut off; otherwise rank
    0's copy). Averaged tensors not named (the loss's own parameters, for a model alone) are left out."""
    files = sorted(ckpt.glob("ema_rank*.pt"), key=lambda f: int(f.stem.removeprefix("ema_rank")))
    if not files:
        raise CheckpointError(f"checkpoint {ckpt} was trained with optim.ema_decay but holds no {ema_file(0)}")
    ranks = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    first = ranks[0]
    absent = sorted(set(shapes) - set(first["names"]))
    if absent:
        raise CheckpointError(f"checkpoint {ckpt}: {files[0].name} holds no average of {absent}")
    out = {}
    for i, name in enumerate(first["names"]):
        if name not in shapes:
            continue
        parts = [r["shadow"][i].reshape(-1) for r in ranks] if first["sharded"] else [first["shadow"][i].reshape(-1)]
        out[name] = torch.cat(parts)[: first["numels"][i]].view(shapes[name])
    return out


def load_model(ckpt: Path) -> tuple[LUMModel | SASRecModel, PretrainConfig, DatasetMeta]:
    """The model a checkpoint describes, with its full fp32 weights (gathered from the ZeRO shards), on the CPU
    in eval mode, plus its run config and dataset meta. A run with ``optim.ema_decay`` gives its weight average
    (what it evaluated and selected)."""
    validate(ckpt)
    cfg = load_run_config(ckpt)
    meta = load_meta(cfg.data.path)
    model = build_run_model(model_config_for(cfg, meta), cfg.data.path, meta)
    if cfg.optim.ema_decay:
        # The average holds every trained parameter: consolidating ZeRO's fp32 weights as well would be a second
        # full gather (28 GB of host memory at 7B) only to be overwritten.
        shapes = {f"model.{k}": p.shape for k, p in model.named_parameters()}
        model_state = {k.removeprefix("model."): v for k, v in averaged_weights(ckpt, shapes).items()}
    else:
        state = parallel.fp32_state_dict(ckpt / DS_TAG, cfg.train.zero_stage)
        model_state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    missing = [k for k in missing if k not in (getattr(model, "_tied_weights_keys", None) or [])]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {ckpt} does not match the model it describes: missing {missing}, "
                              f"unexpected {unexpected}")
    return model.eval(), cfg, meta
