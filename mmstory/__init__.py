"""mmstory: image-to-story models built from pretrained parts (CoCa-style), trained and served on a CPU or GPUs."""

from mmstory.config import BridgeConfig, CaptionDecoderConfig, ModelConfig, PartConfig
from mmstory.factory import create_model
from mmstory.model import StoryModel
from mmstory.registry import get_model_config, list_models

__version__ = "0.1.0"

__all__ = [
    "BridgeConfig",
    "CaptionDecoderConfig",
    "ModelConfig",
    "PartConfig",
    "StoryModel",
    "create_model",
    "get_model_config",
    "list_models",
    "__version__",
]


def __getattr__(name: str):
    # StoryTeller pulls in generation code; import it lazily so `import mmstory` stays light.
    if name in ("StoryTeller", "StoryResult"):
        from mmstory import generation

        return getattr(generation, name)
    raise AttributeError(f"module 'mmstory' has no attribute {name!r}")
