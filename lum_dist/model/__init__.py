"""The LUM model: config and presets (config.py), token + user encoder (modeling.py)."""

from lum_dist.model.config import LUMConfig, flops_per_token, load_preset, param_counts
from lum_dist.model.modeling import LUMModel

__all__ = ["LUMConfig", "LUMModel", "flops_per_token", "load_preset", "param_counts"]
