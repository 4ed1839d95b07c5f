"""The LUM model: config and presets (config.py), token + user encoder (modeling.py)."""

from transformers import AutoConfig, AutoModel

from lum_dist.model.config import LUMConfig, flops_per_token, load_preset, param_counts
from lum_dist.model.modeling import LUMModel

# An exported model directory loads with transformers' Auto classes too.
AutoConfig.register(LUMConfig.model_type, LUMConfig, exist_ok=True)
AutoModel.register(LUMConfig, LUMModel, exist_ok=True)

__all__ = ["LUMConfig", "LUMModel", "flops_per_token", "load_preset", "param_counts"]
