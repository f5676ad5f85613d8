import pytest

from mmstory.config import ModelConfig, from_dict, load_yaml, save_yaml
from mmstory.factory import get_model_config, list_models


def test_yaml_and_json_round_trip(tmp_path):
    config = get_model_config("mmstory-small")
    save_yaml(config, tmp_path / "c.yaml")
    assert load_yaml(ModelConfig, tmp_path / "c.yaml") == config
    config.save_json(tmp_path / "c.json")
    assert ModelConfig.load_json(tmp_path / "c.json") == config


def test_unknown_keys_and_bad_values_fail_loudly():
    data = get_model_config("tiny").to_dict()
    data["bridge"]["num_querys"] = 3
    with pytest.raises(ValueError, match="num_querys"):
        from_dict(ModelConfig, data)
    data = get_model_config("tiny").to_dict()
    data["decoder"]["train"] = "sometimes"
    with pytest.raises(ValueError, match="train must be one of"):
        from_dict(ModelConfig, data)
    data = get_model_config("tiny").to_dict()
    data["caption_concepts"] = 50
    with pytest.raises(ValueError, match="caption_concepts"):
        from_dict(ModelConfig, data)
    data = get_model_config("tiny").to_dict()
    data["contrastive_heads"] = 0
    with pytest.raises(ValueError, match="contrastive_heads"):
        from_dict(ModelConfig, data)
    data = get_model_config("tiny").to_dict()
    data["caption_distractors"] = -1
    with pytest.raises(ValueError, match="caption_distractors"):
        from_dict(ModelConfig, data)


def test_registry_lists_models():
    assert {"tiny", "mmstory-small"} <= set(list_models())
    with pytest.raises(KeyError, match="unknown model config"):
        get_model_config("nope")


def test_create_model_overrides_are_validated():
    from mmstory.factory import create_model, override

    with pytest.raises(ValueError, match="contrastive_heads must be >= 1"):
        create_model("tiny", contrastive_heads=0)
    with pytest.raises(ValueError, match="captioner must be one of"):
        create_model("tiny", captioner="poet")
    with pytest.raises(AttributeError, match="no field"):
        create_model("tiny", contrastive_headz=2)
    config = get_model_config("tiny")
    assert override(config, embed_dim=16).embed_dim == 16 and config.embed_dim == 32  # a copy: the given one stays
