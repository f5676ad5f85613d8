"""The captioning task's data: each split read and cleaned, as pixels or as cached encoder features, batched in the
run's fixed order; the caption features and the distractor images' features computed once."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmstory.data import (
    EpochBatchSampler,
    ImageCaptions,
    ImageTextDataset,
    Skipped,
    clean_records,
    collate_pixels,
    load_records,
)
from mmstory.images import ImageProcessor
from mmstory.train.features import FeatureCache, TextFeatures, collate_features, tensors_sha256, text_features

if TYPE_CHECKING:
    from accelerate import Accelerator

    from mmstory.model import StoryModel
    from mmstory.train.config import DataConfig, DataSource, TrainConfig


@dataclass
class Split:
    """A ready dataset and how to batch it."""

    dataset: Dataset
    records: list[ImageCaptions]
    collate: Callable[[list[dict]], dict]

    @property
    def caption_counts(self) -> list[int]:
        return [len(r.captions) for r in self.records]


def read_source(source: DataSource) -> tuple[list[ImageCaptions], list[Skipped]]:
    records = load_records(source.path, source.format, source.split, source.image_root, source.limit)
    return clean_records(records)


def _model_inputs(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    if "pixel_values" in batch:
        return {"pixel_values": batch["pixel_values"].to(device).contiguous(memory_format=torch.channels_last)}
    inputs = {"image_tokens": batch["image_tokens"].to(device), "image_pooled": batch["image_pooled"].to(device)}
    if "text_pooled" in batch:
        inputs["text_pooled"] = batch["text_pooled"].to(device)
    return inputs


def caption_features(model: StoryModel, records: list[ImageCaptions], data: DataConfig,
                     progress: bool = False) -> TextFeatures | None:
    """A frozen text encoder's features for every caption, computed once (the contrastive loss needs them)."""
    if model.config.text.train != "frozen" or model.loss_fn.contrastive_weight <= 0:
        return None
    fingerprint = {"spec": model.config.text.spec, "weights_sha256": tensors_sha256(model.text.state_dict()),
                   "pooling": "mean", "max_length": 128, "dtype": data.feature_dtype}
    model.text.eval()  # a frozen encoder: no dropout in the features that stand in for it
    return text_features(data.feature_cache_dir, model.encode_text, fingerprint,
                         [c for r in records for c in r.captions], dtype=getattr(torch, data.feature_dtype),
                         progress=progress)


class CaptionData:
    """The captioning task's splits, caches and loaders for this process; the items it skipped, with the reason, in
    `bad_items`. The train split is read on construction, the dev split too when the config names one."""

    def __init__(self, config: TrainConfig, accelerator: Accelerator, model: StoryModel):
        self.config, self.accelerator, self.model = config, accelerator, model
        self.bad_items: dict[str, str] = {}
        self.cache_report: dict[str, Any] = {"used": config.data.use_feature_cache}
        self.train = self._split(config.data.train, "train")
        self.dev = self._split(config.data.dev, "dev") if config.data.dev is not None else None

    def note_skipped(self, skipped: list[Skipped]) -> None:
        for item in skipped:
            self.bad_items.setdefault(item.item, item.reason)

    def _split(self, source: DataSource, name: str) -> Split:
        acc, cfg = self.accelerator, self.config.data
        records, skipped = read_source(source)
        self.note_skipped(skipped)
        if not records:
            raise ValueError(f"the {name} data at {source.path} has no usable records")
        if not cfg.use_feature_cache:
            vision = self.model.vision.to(memory_format=torch.channels_last)  # faster CNNs on CPU; pixels match
            dataset = ImageTextDataset(records, ImageProcessor(vision.image_size, vision.mean, vision.std),
                                       cfg.max_pixels)
            return Split(dataset, records, collate_pixels)
        if self.model.config.vision.train != "frozen":
            raise ValueError("use_feature_cache needs a frozen vision encoder (model.vision.train: frozen)")
        cache = FeatureCache(cfg.feature_cache_dir, self.model.vision, self.model.config.vision.spec,
                             getattr(torch, cfg.feature_dtype), max_pixels=cfg.max_pixels)
        with acc.main_process_first():  # the main process encodes; the others then find everything cached
            cached = cache.build(records, batch_size=cfg.encode_batch_size, num_workers=cfg.num_workers,
                                 device=acc.device, progress=self.config.progress and acc.is_main_process)
        self.note_skipped(cached.skipped)
        if acc.is_main_process:
            self.cache_report[name] = {"directory": str(cache.directory), "images": len(records),
                                       "encoded": cached.encoded, "reused": cached.reused,
                                       "seconds": round(cached.seconds, 3)}
            acc.print(f"feature cache ({name}): {cached.encoded} encoded, {cached.reused} reused, "
                      f"{cached.seconds:.1f} s, {cache.directory}")
        if not cached.records:
            raise ValueError(f"none of the {name} images could be encoded")
        return Split(cached.dataset(self._text_features(cached.records, name)), cached.records, collate_features)

    def _text_features(self, records: list[ImageCaptions], name: str) -> TextFeatures | None:
        acc = self.accelerator
        with acc.main_process_first():  # the main process encodes; the others then load its file
            text = caption_features(self.model, records, self.config.data,
                                    progress=self.config.progress and acc.is_main_process)
        if text is not None and acc.is_main_process:
            self.cache_report[f"{name}_text"] = {"captions": len(text.lookup), "encoded": text.encoded,
                                                 "seconds": round(text.seconds, 3)}
            acc.print(f"text features ({name}): {len(text.lookup)} captions, {text.encoded} encoded, "
                      f"{text.seconds:.1f} s")
        return text

    @torch.no_grad()
    def distractor_features(self, count: int) -> torch.Tensor:
        """Pooled features of `count` training images, picked by the run's seed (its own generator: the global RNG,
        and with it the run, stays as it was)."""
        if self.model.config.vision.train != "frozen":
            raise ValueError("caption_distractors keeps image features taken once, so it needs a frozen vision "
                             "encoder: set model.overrides.caption_distractors: 0 to train the vision encoder")
        split = self.train
        order = np.random.default_rng(self.config.seed).permutation(len(split.records))[:count]
        pooled, was_training = [], self.model.training
        self.model.eval()  # a frozen encoder's batch norm on its running statistics, as when the cache was built
        for _, inputs in self.image_batches(split, order, self.model.logit_scale.device):  # not prepared yet
            if "image_pooled" not in inputs:
                inputs["image_pooled"] = self.model.encode_image(inputs["pixel_values"])[1]
            pooled.append(inputs["image_pooled"].float().cpu())
        self.model.train(was_training)
        return torch.cat(pooled)

    def image_batches(self, split: Split, records: Iterable[int],
                       device: torch.device | str) -> Iterator[tuple[dict, dict[str, torch.Tensor]]]:
        """Batches of the given records' images (first caption), as the batch and its image inputs on `device`."""
        records = [int(i) for i in records]
        for start in range(0, len(records), self.config.batch_size):
            batch = split.collate([split.dataset[(i, 0)] for i in records[start: start + self.config.batch_size]])
            inputs = _model_inputs(batch, device)
            inputs.pop("text_pooled", None)
            yield batch, inputs

    def sampler(self, epoch: int, start: int = 0) -> EpochBatchSampler:
        acc = self.accelerator
        return EpochBatchSampler(self.train.caption_counts, self.config.batch_size, seed=self.config.seed,
                                 epoch=epoch, rank=acc.process_index, world_size=acc.num_processes,
                                 caption_sampling=self.config.data.caption_sampling, start=start)

    def loader(self, split: Split, sampler: EpochBatchSampler, seed: int) -> DataLoader:
        # Its own generator: creating a loader must not draw from the global RNG, or a resumed run would diverge.
        return DataLoader(split.dataset, batch_sampler=sampler, collate_fn=split.collate,
                          num_workers=self.config.data.num_workers, generator=torch.Generator().manual_seed(seed))
