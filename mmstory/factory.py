"""create_model: a StoryModel from a registered name or a ModelConfig, in the manner of open_clip and timm.

The registry (named configs, packaged and hub locations) is `mmstory.registry`, re-exported here.
"""

from __future__ import annotations

import dataclasses

from mmstory.config import GENERATION_FIELDS, GenerationConfig, ModelConfig
from mmstory.losses import LOSS_WEIGHT_FIELDS, StoryLoss
from mmstory.model import StoryModel
from mmstory.registry import (  # noqa: F401 - the registry's names, where open_clip users look for them
    PRETRAINED_ROOT,
    get_generation_config,
    get_model_config,
    list_models,
    packaged_models,
    register,
    resolve_pretrained,
)


def create_model(name_or_config: str | ModelConfig, generation_config: GenerationConfig | None = None, **overrides):
    """Build an untrained StoryModel from a registered name or a ModelConfig (pretrained parts load from specs).

    `overrides` replace ModelConfig or GenerationConfig fields through `dataclasses.replace`, so their checks run on
    them; loss weights (`contrastive_weight=0.0`, ...) make the model's `loss_fn` (a `StoryLoss`). The generation
    config defaults to the one registered with the name."""
    config = get_model_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if generation_config is None:
        generation_config = get_generation_config(config.name)
    generation = {k: overrides.pop(k) for k in list(overrides) if k in GENERATION_FIELDS}
    weights = {k: overrides.pop(k) for k in list(overrides) if k in LOSS_WEIGHT_FIELDS}
    return StoryModel(override(config, **overrides), override(generation_config, **generation), StoryLoss(**weights))


def override(config, **overrides):
    """A copy of a config dataclass with `overrides` replaced and validated (`__post_init__` runs again)."""
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise AttributeError(f"{type(config).__name__} has no field(s) {unknown}; known: {sorted(names)}")
    return dataclasses.replace(config, **overrides) if overrides else config
