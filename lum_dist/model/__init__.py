"""The models: LUM (config.py: config, presets, counts; modeling.py) and the SASRec baseline (sasrec.py).

Both read the same packed batches and expose the same surface to training, evaluation and querying:
``forward_batch(batch) -> [T, E]`` (the user state at every token), ``can_predict(batch) -> bool [T]``,
``item_embeddings(ids=None)`` (the scoring table) and ``config.item_emb_dim``.
"""

from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from lum_dist.model.config import (
    ARCHS,
    LUMConfig,
    check_model_spec,
    flops_per_token,
    load_preset,
    param_counts,
)
from lum_dist.model.modeling import LUMModel
from lum_dist.model.sasrec import SASRecConfig, SASRecModel

MODELS: dict[str, type[PreTrainedModel]] = {"lum": LUMModel, "sasrec": SASRecModel}
assert MODELS.keys() == ARCHS.keys()


def build_model(config: PretrainedConfig) -> LUMModel | SASRecModel:
    """The model a config describes (freshly initialised)."""
    return MODELS[config.model_type](config)


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute every block in the backward pass (transformers' checkpointing of GradientCheckpointingLayer):
    ``activation_checkpointing_enable`` from transformers 5 on, where the 4.x name ``gradient_checkpointing_enable``
    is deprecated; that name before it."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


# An exported model directory loads with transformers' Auto classes too.
for _arch, _model in MODELS.items():
    AutoConfig.register(ARCHS[_arch].model_type, ARCHS[_arch], exist_ok=True)
    AutoModel.register(ARCHS[_arch], _model, exist_ok=True)

__all__ = ["LUMConfig", "LUMModel", "MODELS", "SASRecConfig", "SASRecModel", "build_model", "check_model_spec",
           "enable_activation_checkpointing", "flops_per_token",
           "load_preset", "param_counts"]
