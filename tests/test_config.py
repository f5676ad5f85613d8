import pytest

from mmstory.config import GenerationConfig, ModelConfig, from_dict, load_yaml, save_yaml
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
    data["writer"]["train"] = "sometimes"
    with pytest.raises(ValueError, match="train must be one of"):
        from_dict(ModelConfig, data)
    with pytest.raises(ValueError, match="caption_concepts is a classifier confidence"):
        from_dict(GenerationConfig, {"caption_concepts": 50})
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
    from mmstory.config import CaptionDecoderConfig
    from mmstory.factory import create_model, override

    with pytest.raises(ValueError, match="contrastive_heads must be >= 1"):
        create_model("tiny", contrastive_heads=0)
    with pytest.raises(ValueError, match="captioner must be one of"):
        create_model("tiny", captioner="poet")  # a GenerationConfig field: checked the same way
    with pytest.raises(ValueError, match="needs caption_decoder.enabled"):
        create_model("tiny", captioner="caption_decoder", caption_decoder=CaptionDecoderConfig(enabled=False))
    assert create_model("tiny", caption_beams=5).generation_config.caption_beams == 5
    with pytest.raises(AttributeError, match="no field"):
        create_model("tiny", contrastive_headz=2)
    config = get_model_config("tiny")
    assert override(config, embed_dim=16).embed_dim == 16 and config.embed_dim == 32  # a copy: the given one stays


def test_generation_config_is_saved_beside_the_weights_and_the_single_file_form_still_loads(tmp_path):
    import json

    from mmstory.factory import create_model
    from mmstory.saving import CONFIG_NAME, GENERATION_CONFIG_NAME, load_configs

    model = create_model("tiny", caption_beams=4, story_prefix=False)
    model.save_pretrained(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / GENERATION_CONFIG_NAME).read_text())
    assert saved == GenerationConfig(caption_beams=4, story_prefix=False).to_dict()
    assert not set(saved) & set(json.loads((tmp_path / "new" / CONFIG_NAME).read_text()))
    assert load_configs(tmp_path / "new") == (model.config, model.generation_config)
    old = tmp_path / "old"  # the single-file form: the inference settings inside config.json
    old.mkdir()
    (old / CONFIG_NAME).write_text(json.dumps({**model.config.to_dict(), **saved}))
    assert load_configs(old) == (model.config, model.generation_config)


def test_the_registered_generation_config_comes_with_the_name():
    from mmstory.registry import get_generation_config

    small = get_generation_config("mmstory-small")
    assert (small.captioner, small.caption_beams, small.caption_rerank, small.caption_concepts) == (
        "caption_decoder", 10, 120.0, 0.3)
    assert get_generation_config("tiny") == GenerationConfig()


def test_a_yaml_base_is_read_first_and_merged_under(tmp_path):
    from mmstory.config import read_yaml

    (tmp_path / "_shared.yaml").write_text("data: {train: {path: a.csv, split: t.txt}, num_workers: 2}\nepochs: 3\n")
    (tmp_path / "stage.yaml").write_text("base: _shared.yaml\ndata: {train: {split: other.txt}}\nepochs: 5\n")
    assert read_yaml(tmp_path / "stage.yaml") == {"data": {"train": {"path": "a.csv", "split": "other.txt"},
                                                           "num_workers": 2}, "epochs": 5}
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ValueError, match="include it again"):
        read_yaml(tmp_path / "loop.yaml")
    (tmp_path / "lost.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match="base config not found"):
        read_yaml(tmp_path / "lost.yaml")


def test_the_flickr8k_stages_share_one_data_block():
    from pathlib import Path

    from mmstory.train.trainer import CONFIG_DIR, TrainConfig, packaged_configs

    shared = TrainConfig.load(CONFIG_DIR / "_flickr8k_data.yaml").data
    for name in ("flickr8k", "flickr8k_bridge", "flickr8k_heads", "flickr8k_scst"):
        assert "base: _flickr8k_data.yaml" in (CONFIG_DIR / f"{name}.yaml").read_text()
        data = TrainConfig.load(CONFIG_DIR / f"{name}.yaml").data
        assert (data.train, data.feature_cache_dir, data.encode_batch_size) == (
            shared.train, shared.feature_cache_dir, shared.encode_batch_size)
        assert Path(data.dev.split) == Path(shared.dev.split)
    assert "_flickr8k_data" not in packaged_configs()  # a shared part, not a config to train from


def test_loss_weights_left_in_an_old_model_config_still_load(tmp_path):
    import json

    from mmstory.train.trainer import TrainConfig

    old = {**get_model_config("tiny").to_dict(), "contrastive_weight": 0.0, "caption_weight": 0.5,
           "caption_decoder_weight": 1.0}
    assert "caption_weight" not in get_model_config("tiny").to_dict()  # no longer a ModelConfig field
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    assert ModelConfig.load_json(path) == get_model_config("tiny")  # an old config.json: the weights are dropped
    # a training config that sets them the old way (model.overrides or model.config) has them moved to `loss`
    data = {"data": {"train": {"path": "x.csv"}}, "model": {"name": "tiny", "overrides": {"caption_weight": 0.0}}}
    config = TrainConfig.from_dict(data)
    assert config.model.overrides == {} and config.loss.to_dict() == {
        "contrastive_weight": 1.0, "caption_weight": 0.0, "caption_decoder_weight": 1.0}
    assert data["model"]["overrides"] == {"caption_weight": 0.0}  # the caller's mapping is left as it was
    config = TrainConfig.from_dict({"data": {"train": {"path": "x.csv"}}, "loss": {"caption_decoder_weight": 2.0},
                                    "model": {"name": None, "config": old}})
    assert "caption_weight" not in config.model.config
    assert config.loss.to_dict() == {"contrastive_weight": 0.0, "caption_weight": 0.5, "caption_decoder_weight": 1.0}
    config = TrainConfig.from_dict({"data": {"train": {"path": "x.csv"}}, "loss": {"caption_weight": 0.0}})
    assert config.loss.caption_weight == 0.0 and config.loss.contrastive_weight == 1.0


def test_the_story_writer_s_old_name_decoder_still_loads(tiny_model):
    import torch

    from mmstory.train.trainer import OptimConfig

    data = get_model_config("tiny").to_dict()
    data["decoder"] = data.pop("writer")
    assert ModelConfig.from_dict(data) == get_model_config("tiny")
    assert GenerationConfig(captioner="decoder").captioner == "writer"
    assert OptimConfig(lr={"decoder": 1e-3}).lr["writer"] == 1e-3
    # a checkpoint saved while the module was `decoder`: its tensors load into `writer`
    tiny_model.config.writer.train = "full"
    saved = {("decoder." + k[len("writer."):] if k.startswith("writer.") else k): v + 1
             for k, v in tiny_model.trained_state_dict().items()}
    assert any(k.startswith("decoder.") for k in saved)
    tiny_model.load_trained_state(saved)
    name = next(k for k in saved if k.startswith("decoder."))
    assert torch.equal(tiny_model.state_dict()["writer." + name[len("decoder."):]], saved[name])


def test_every_packaged_config_reads_into_the_one_training_config():
    from mmstory.train.trainer import CONFIG_DIR, TrainConfig, _task, packaged_configs

    for name in packaged_configs():
        config = TrainConfig.load(CONFIG_DIR / f"{name}.yaml")
        assert config.task == (_task(str(CONFIG_DIR / f"{name}.yaml")) or "captioning"), name
        assert config.data.train.path, name
