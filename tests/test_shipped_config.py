"""One truth for each setting: the registry's defaults for a packaged model are what its shipped files say, so that
`create_model("mmstory-small")` and `StoryModel.from_pretrained("mmstory-small")` write stories the same way."""

from __future__ import annotations

import json

import pytest

from mmstory.config import GenerationConfig
from mmstory.registry import PRETRAINED_ROOT, get_generation_config, packaged_models


@pytest.mark.parametrize("name", packaged_models())
def test_registered_generation_config_is_the_shipped_one(name):
    """scripts/export_default.py writes generation_config.json from the registry; a change to either alone fails
    here (the registry once said story_prefix=True while the shipped file said false)."""
    shipped = GenerationConfig.from_dict(json.loads((PRETRAINED_ROOT / name / "generation_config.json").read_text()))
    assert get_generation_config(name).to_dict() == shipped.to_dict()


def test_mmstory_small_writer_reads_captions_only():
    assert get_generation_config("mmstory-small").story_prefix is False
