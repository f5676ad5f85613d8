"""The captioning task: a StoryModel's contrastive head and captioners trained with cross-entropy on image-caption
pairs, or (caption_objective: scst) the caption decoder's self-critical phase. It owns the model, the data
(`mmstory.train.inputs`), the loss and the dev evaluation (`mmstory.train.dev_eval`); `mmstory.train.trainer` runs
it."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from mmstory.data import records_fingerprint
from mmstory.imagenet_words import imagenet_words
from mmstory.model import WEIGHTS_NAME, StoryModel
from mmstory.train.config import LOSSES, OptimConfig, TrainConfig, build_configs
from mmstory.train.dev_eval import CaptionDevEval
from mmstory.train.inputs import CaptionData, _model_inputs
from mmstory.train.novel_objects import NovelObjectSwap
from mmstory.train.optimizer import param_groups
from mmstory.train.scst import scst_reward, self_critical_forward

if TYPE_CHECKING:
    from accelerate import Accelerator


def freeze_unused_heads(model: StoryModel) -> None:
    """A head whose loss weight is 0 gets no gradient; freezing it keeps it out of the optimiser and DDP's reducer."""
    cfg = model.loss_fn
    if cfg.contrastive_weight == 0:
        for module in (model.image_projection, model.text_projection):
            module.requires_grad_(False)
        model.logit_scale.requires_grad_(False)
    if cfg.caption_weight == 0:
        model.bridge.requires_grad_(False)
    if model.caption_decoder is not None and cfg.caption_decoder_weight == 0:
        model.caption_decoder.requires_grad_(False)


def build_model(config: TrainConfig) -> StoryModel:
    """The config's StoryModel (started from `model.init_from` when given), with the heads it does not train frozen."""
    model = StoryModel(*build_configs(config.model), loss=config.loss)
    if config.model.init_from is not None:
        model.load_trained_state(load_file(str(Path(config.model.init_from) / WEIGHTS_NAME)))
    freeze_unused_heads(model)
    return model


class CaptioningTask:
    """Contrastive + captioning cross-entropy, or self-critical training of the caption decoder (see `Task`)."""

    def __init__(self, config: TrainConfig, accelerator: Accelerator):
        self.config, self.accelerator = config, accelerator
        self.model = self.module = build_model(config)
        self.data = CaptionData(config, accelerator, self.model)
        decoder = self.model.caption_decoder
        records = self.data.train.records
        self.swap = None
        if config.novel_object_swap > 0 and config.caption_objective == "xe":
            if decoder is None or not self.model.config.caption_decoder.image_tags:
                raise ValueError("novel_object_swap needs a caption decoder that reads image tags (image_tags > 0)")
            self.swap = NovelObjectSwap(imagenet_words(), config.novel_object_swap)
        if decoder is not None and decoder.needs_vocabulary:  # its compact vocabulary comes from the training captions
            # (and, with swaps, the words they write and the class names the tags read)
            required = [] if self.swap is None else (self.swap.target_words() + self.model.vision.class_names()
                                                     + imagenet_words().class_word)
            self.model.fit_caption_vocabulary([c for r in records for c in r.captions], required=required)
        if self.model.config.caption_distractors:  # frozen-encoder features of training images, for caption reranking
            self.model.set_distractors(self.data.distractor_features(self.model.config.caption_distractors))
        self.reward = scst_reward(config, self.model, records)
        self.dev_eval = CaptionDevEval(config, accelerator, self.data) if self.data.dev is not None else None

    @property
    def bad_items(self) -> dict[str, str]:
        return self.data.bad_items

    @property
    def has_dev(self) -> bool:
        return self.dev_eval is not None

    def param_groups(self, optim: OptimConfig) -> list[dict]:
        return param_groups(self.model, optim.lr, optim.weight_decay)

    def micro_batches_per_epoch(self) -> int:
        return self.data.sampler(0).batches_per_epoch()

    def batches(self, epoch: int, start: int) -> Iterator[dict]:
        sampler = self.data.sampler(epoch, start=start)
        return iter(self.data.loader(self.data.train, sampler, self.config.seed + epoch))

    def loss(self, module: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.data.note_skipped(batch["skipped"])
        device = self.accelerator.device
        if self.reward is not None:
            out, logged = self_critical_forward(module, self.model, batch, self.config, self.reward, device)
        else:
            inputs = _model_inputs(batch, device)
            if self.swap is not None:
                inputs = self._swapped_inputs(batch["captions"], inputs)
            out, logged = module(captions=batch["captions"], **inputs), {}
        for name in LOSSES:
            value = getattr(out, name)
            if value is not None:
                logged[name] = value.detach().float()
        return out.loss, logged

    def _swapped_inputs(self, captions: list[str], inputs: dict) -> dict:
        """The model's inputs plus the caption decoder's own captions and tags, some novel objects swapped in. The
        swaps are drawn from the batch's captions and the run's seed, so a resumed run draws the same ones."""
        if "pixel_values" in inputs:
            with torch.no_grad():
                inputs = dict(zip(("image_tokens", "image_pooled"), self.model.encode_image(inputs["pixel_values"])))
        seed = zlib.crc32("\n".join(captions).encode()) + self.config.seed
        swapped, classes = self.swap(captions, self.model.top_classes(inputs["image_pooled"]), seed=seed)
        return {**inputs, "decoder_captions": swapped, "tag_classes": classes}

    def evaluate(self) -> dict[str, float]:
        return self.dev_eval.evaluate(self.model)

    def samples(self) -> list[dict[str, Any]]:
        return self.dev_eval.samples(self.model) if self.config.num_sample_captions > 0 else []

    def fingerprint(self) -> str:
        return records_fingerprint(self.data.train.records)

    def report(self) -> dict[str, Any]:
        return {"feature_cache": self.data.cache_report}
