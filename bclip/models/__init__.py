"""CLIP models in Flax linen: build one from a preset with `build_model(model_config(name))`."""

from bclip.models.clip import (
    CLIP,
    PRESETS,
    apply_model,
    build_model,
    count_params,
    forward_flops_per_pair,
    image_tower_flops,
    init_variables,
    model_config,
    text_tower_flops,
)

__all__ = [
    "CLIP",
    "PRESETS",
    "apply_model",
    "build_model",
    "count_params",
    "forward_flops_per_pair",
    "image_tower_flops",
    "init_variables",
    "model_config",
    "text_tower_flops",
]
