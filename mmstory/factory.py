"""create_model: a StoryModel from a registered name or a ModelConfig, in the manner of open_clip and timm.

The registry (named configs, packaged and hub locations) is `mmstory.registry`, re-exported here.
"""

from __future__ import annotations

from mmstory.config import ModelConfig
from mmstory.model import StoryModel
from mmstory.registry import (  # noqa: F401 - the registry's names, where open_clip users look for them
    PRETRAINED_ROOT,
    get_model_config,
    list_models,
    packaged_models,
    register,
    resolve_pretrained,
)


def create_model(name_or_config: str | ModelConfig, **overrides):
    """Build an untrained StoryModel from a registered name or a ModelConfig (pretrained parts load from specs)."""
    config = get_model_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise AttributeError(f"ModelConfig has no field {key!r}")
        setattr(config, key, value)
    return StoryModel(config)
