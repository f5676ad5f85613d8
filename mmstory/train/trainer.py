"""Train or fine-tune a StoryModel on paired image-text data, with Hugging Face Accelerate as the distributed engine.

    mmstory train --config tiny [--resume] [--output-dir DIR] [--max-steps N] [--set optim.lr.bridge=1e-3]
    torchrun --nproc_per_node 2 -m mmstory.train --config ...          (or: accelerate launch --multi_gpu ...)

One process per device; `batch_size` is per process. The data order is fixed by (seed, epoch) and a checkpoint records
the epoch and the step within it, so a resumed run continues exactly: it ends with the weights an uninterrupted run
would have had. Tested: one process, and DDP with 2 CPU processes over gloo (GPUs go through the same Accelerate
calls); the checkpoint code does not gather FSDP/DeepSpeed-sharded states. Relative paths in a config (data, cache,
output) resolve against the current working directory; the shipped configs are meant to be run from the repository
root.

Outputs in `output_dir`: `checkpoint-<step>/` (the last `keep_checkpoints`, each loadable with
`StoryModel.from_pretrained`), `best/` (lowest dev loss), `metrics.jsonl` (one JSON object per logged train step and
per evaluation), `samples.jsonl` (sample captions at each evaluation), `tensorboard/`, `train_config.yaml` and, at the
end, `report.json` (final metrics, throughput, feature-cache timings and every skipped data item with its reason).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mmstory.components import similarity
from mmstory.config import ModelConfig, from_dict, to_yaml
from mmstory.data import (
    EpochBatchSampler,
    ImageCaptions,
    ImageTextDataset,
    Skipped,
    clean_records,
    collate_pixels,
    item_name,
    load_records,
    records_fingerprint,
)
from mmstory.eval.metrics import CiderDReward, caption_scores
from mmstory.images import MAX_PIXELS, ImageProcessor
from mmstory.losses import leave_one_out_baseline
from mmstory.model import WEIGHTS_NAME, StoryModel
from mmstory.registry import get_model_config
from mmstory.train.features import FeatureCache, TextFeatures, collate_features, tensors_sha256, text_features

PARTS = ("bridge", "caption_decoder", "projections", "vision", "text", "decoder")
PART_OF = {"bridge": "bridge", "caption_decoder": "caption_decoder", "image_projection": "projections",
           "text_projection": "projections", "logit_scale": "projections", "vision": "vision", "text": "text",
           "decoder": "decoder"}
DEFAULT_LR = {"bridge": 3e-4, "caption_decoder": 5e-4, "projections": 5e-4, "vision": 1e-5, "text": 1e-5,
              "decoder": 2e-5}
LOSSES = ("loss", "contrastive_loss", "caption_loss", "caption_decoder_loss")
SCORES = ("cider_d",)  # dev scores (higher is better): CIDEr-D of the caption decoder's greedy captions
OBJECTIVES = ("xe", "scst")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("no", "bf16", "fp16")


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class DataSource:
    """One dataset: a captions file or shards (see `mmstory.data.load_records`)."""

    path: str
    format: str | None = None  # csv | jsonl | coco | flickr | webdataset | stories; None: guessed from the path
    split: str | None = None  # a file of image names to keep (or a Karpathy split name)
    image_root: str | None = None  # default: an images/ folder beside the file
    limit: int | None = None  # keep the first N images (quick runs, benchmarks)


@dataclass
class ModelSection:
    name: str | None = "tiny"  # a registered config (mmstory.factory), unless `config` is given
    config: dict[str, Any] | None = None  # a full ModelConfig mapping
    overrides: dict[str, Any] = field(default_factory=dict)  # deep-merged in, e.g. {caption_weight: 0}
    init_from: str | None = None  # a save_pretrained() directory whose trained tensors start this run (stages)


@dataclass
class DataConfig:
    train: DataSource | None = None
    dev: DataSource | None = None
    caption_sampling: str = "random"  # random: each image once per epoch with one caption; all: every pair
    num_workers: int = 2
    max_pixels: int = MAX_PIXELS
    use_feature_cache: bool = False  # frozen vision encoder only: encode each image once, train from features
    feature_cache_dir: str = "cache/features"
    feature_dtype: str = "float16"
    encode_batch_size: int = 64


@dataclass
class OptimConfig:
    lr: dict[str, float] = field(default_factory=dict)  # per part; missing parts take DEFAULT_LR
    weight_decay: float = 0.05  # on matrices only, not on biases, norms or the temperature
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float | None = 1.0
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | linear | constant, after the linear warmup
    min_lr_ratio: float = 0.0  # the decay ends at this fraction of each peak rate

    def __post_init__(self) -> None:
        unknown = set(self.lr) - set(PARTS)
        if unknown:
            raise ValueError(f"optim.lr has unknown part(s) {sorted(unknown)}; parts: {', '.join(PARTS)}")
        self.lr = {**DEFAULT_LR, **{k: float(v) for k, v in self.lr.items()}}
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    output_dir: str = "runs/train"
    batch_size: int = 16  # per process
    grad_accum_steps: int = 1
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs when set
    mixed_precision: str = "no"  # no | bf16 (autocast, also on CPU) | fp16 (GPU)
    seed: int = 0
    log_every: int = 10
    eval_every: int | None = None  # steps between dev evaluations; None: only at the end
    save_every: int | None = 500  # steps between checkpoints; one is always written at the end
    keep_checkpoints: int = 1
    early_stopping_patience: int | None = None  # stop after this many evaluations without a better best_metric
    best_metric: str = "loss"  # what picks best/ and drives early stopping: a dev loss (LOSSES) or score (SCORES)
    # the caption decoder's objective: "xe" (cross-entropy on reference captions) or "scst" (self-critical sequence
    # training: sample captions, reward each by CIDEr-D against its image's references, baseline = the mean of the
    # image's other samples; a fine-tuning stage after "xe", with the other heads off)
    caption_objective: str = "xe"
    scst_samples: int = 5  # samples per image (>= 2: each one's baseline is the others' mean reward)
    scst_temperature: float = 1.0
    # + this x log p(own image | sample) among the batch's images under the contrastive head: a discriminability
    # reward (Luo et al. 2018) against the generic captions that CIDEr alone drifts towards
    scst_discriminability: float = 0.0
    num_sample_captions: int = 4
    progress: bool = True

    def __post_init__(self) -> None:
        if self.data.train is None:
            raise ValueError("data.train is required")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        if self.best_metric not in LOSSES + SCORES:
            raise ValueError(f"best_metric must be one of {LOSSES + SCORES}, got {self.best_metric!r}")
        if self.caption_objective not in OBJECTIVES:
            raise ValueError(f"caption_objective must be one of {OBJECTIVES}, got {self.caption_objective!r}")
        if self.caption_objective == "scst" and self.scst_samples < 2:
            raise ValueError("scst_samples must be >= 2 (each sample's baseline is the mean of the others)")
        for name in ("batch_size", "grad_accum_steps", "epochs", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return from_dict(cls, data)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        """Read a YAML config and apply `key.sub=value` overrides (values parsed as YAML)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        for item in overrides or []:
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"override {item!r} is not KEY=VALUE")
            *parents, last = key.split(".")
            node = data
            for part in parents:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            node[last] = yaml.safe_load(value)
        return cls.from_dict(data)


def build_model_config(section: ModelSection) -> ModelConfig:
    base = dict(section.config) if section.config is not None else get_model_config(section.name).to_dict()
    return ModelConfig.from_dict(_deep_merge(base, section.overrides))


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


# --------------------------------------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------------------------------------
def freeze_unused_heads(model: StoryModel) -> None:
    """A head whose loss weight is 0 gets no gradient; freezing it keeps it out of the optimiser and DDP's reducer."""
    cfg = model.config
    if cfg.contrastive_weight == 0:
        for module in (model.image_projection, model.text_projection):
            module.requires_grad_(False)
        model.logit_scale.requires_grad_(False)
    if cfg.caption_weight == 0:
        model.bridge.requires_grad_(False)
    if model.caption_decoder is not None and cfg.caption_decoder_weight == 0:
        model.caption_decoder.requires_grad_(False)


def param_groups(model: torch.nn.Module, lr: dict[str, float], weight_decay: float) -> list[dict]:
    """One AdamW group per (part, decay): each part has its own rate; only matrices are decayed, as in open_clip."""
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = PART_OF[name.split(".", 1)[0]]
        decay = param.ndim >= 2
        group = groups.setdefault((part, decay), {"params": [], "name": f"{part}{'' if decay else '/no_decay'}",
                                                  "part": part, "lr": lr[part],
                                                  "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters: every part is frozen or has a zero loss weight")
    return [groups[key] for key in sorted(groups)]


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup from 1/(warmup+1), then cosine or linear decay to `min_ratio` at `total` (nanoGPT's shape)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint as state.json."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    samples: int = 0
    train_seconds: float = 0.0
    best_value: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    last_eval_step: int | None = None
    world_size: int = 1
    data_fingerprint: str = ""  # of the training records, to notice a resumed run reading other data
    bad_items: dict[str, str] = field(default_factory=dict)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (named in `latest`, else the highest step)."""
    pointer = output_dir / "latest"
    if pointer.is_file() and (output_dir / pointer.read_text().strip() / "state.json").is_file():
        return output_dir / pointer.read_text().strip()
    done = [p for p in output_dir.glob("checkpoint-*") if (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def _fsync_dir(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _replace_dir(tmp: Path, target: Path) -> None:
    """Swap a fully written directory into place; a complete copy exists under one of the two names at all times."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def weights_digest(model: StoryModel) -> str:
    return tensors_sha256(model.trained_state_dict())


# --------------------------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------------------------
class Trainer:
    """Owns the run: model, data, optimiser, schedule, logs and checkpoints; `fit()` trains and returns the report."""

    def __init__(self, config: TrainConfig, resume: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config, self.out = config, Path(config.output_dir)
        # Several processes but no GPU (torchrun, `accelerate launch --multi_gpu` on a CPU machine): DDP over gloo.
        cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=config.mixed_precision, log_with="tensorboard",
                                       project_dir=str(self.out))
        acc = self.accelerator
        self.checkpoint = latest_checkpoint(self.out) if resume else None
        if resume and self.checkpoint is None:
            acc.print(f"mmstory train: no checkpoint in {self.out}; starting from scratch")
        if not resume and latest_checkpoint(self.out) is not None:
            raise FileExistsError(f"{self.out} already holds checkpoints; pass --resume to continue that run or "
                                  "choose another --output-dir")
        set_seed(config.seed)
        self.model = StoryModel(build_model_config(config.model))
        if config.model.init_from is not None:
            self.model.load_trained_state(load_file(str(Path(config.model.init_from) / WEIGHTS_NAME)))
        freeze_unused_heads(self.model)
        self.state = TrainState(world_size=acc.num_processes)
        self.rng_to_restore: dict | None = None
        self.last_dev: dict[str, float] | None = None
        self.cache_report: dict[str, Any] = {"used": config.data.use_feature_cache}
        self.train_split = self._split(config.data.train, "train")
        self.dev_split = self._split(config.data.dev, "dev") if config.data.dev is not None else None
        self.state.data_fingerprint = records_fingerprint(self.train_split.records)
        decoder = self.model.caption_decoder
        if decoder is not None and decoder.needs_vocabulary:  # its compact vocabulary comes from the training captions
            self.model.fit_caption_vocabulary([c for r in self.train_split.records for c in r.captions])
        if self.model.config.caption_distractors:  # frozen-encoder features of training images, for caption reranking
            if self.model.config.vision.train != "frozen":
                raise ValueError("caption_distractors keeps image features taken once, so it needs a frozen vision "
                                 "encoder: set model.overrides.caption_distractors: 0 to train the vision encoder")
            self.model.set_distractors(self._distractor_features(self.model.config.caption_distractors))
        self.reward = None
        if config.caption_objective == "scst":
            if decoder is None or self.model.config.contrastive_weight > 0 or self.model.config.caption_weight > 0:
                raise ValueError("caption_objective: scst trains the caption decoder alone: the model needs one, and "
                                 "model.overrides must set contrastive_weight and caption_weight to 0")
            self.reward = CiderDReward({item_name(r.image): r.captions for r in self.train_split.records})

        opt = config.optim
        self.optimizer = torch.optim.AdamW(param_groups(self.model, opt.lr, opt.weight_decay), betas=tuple(opt.betas),
                                           eps=opt.eps)
        self.steps_per_epoch = self._sampler(0).batches_per_epoch() // config.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_split.records)} training images make no full optimizer step of "
                             f"{config.batch_size} x {acc.num_processes} process(es) x {config.grad_accum_steps}")
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, opt.warmup_steps, self.total_steps, opt.schedule,
                                                   opt.min_lr_ratio))
        if self.checkpoint is not None:
            self._load_checkpoint(self.checkpoint)
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self._start_logging()

    # --- setup -----------------------------------------------------------------------------------------------------
    def _split(self, source: DataSource, name: str) -> Split:
        acc, cfg = self.accelerator, self.config.data
        records, skipped = read_source(source)
        self._note_skipped(skipped)
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
        self._note_skipped(cached.skipped)
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
    def _distractor_features(self, count: int) -> torch.Tensor:
        """Pooled features of `count` training images, picked by the run's seed (its own generator: the global RNG,
        and with it the run, stays as it was)."""
        split = self.train_split
        order = np.random.default_rng(self.config.seed).permutation(len(split.records))[:count]
        pooled, was_training = [], self.model.training
        self.model.eval()  # a frozen encoder's batch norm on its running statistics, as when the cache was built
        for _, inputs in self._image_batches(split, order, self.model.logit_scale.device):  # not prepared yet
            if "image_pooled" not in inputs:
                inputs["image_pooled"] = self.model.encode_image(inputs["pixel_values"])[1]
            pooled.append(inputs["image_pooled"].float().cpu())
        self.model.train(was_training)
        return torch.cat(pooled)

    def _image_batches(self, split: Split, records: Iterable[int],
                       device: torch.device | str) -> Iterator[tuple[dict, dict[str, torch.Tensor]]]:
        """Batches of the given records' images (first caption), as the batch and its image inputs on `device`."""
        records = [int(i) for i in records]
        for start in range(0, len(records), self.config.batch_size):
            batch = split.collate([split.dataset[(i, 0)] for i in records[start: start + self.config.batch_size]])
            inputs = _model_inputs(batch, device)
            inputs.pop("text_pooled", None)
            yield batch, inputs

    def _sampler(self, epoch: int, start: int = 0) -> EpochBatchSampler:
        acc = self.accelerator
        return EpochBatchSampler(self.train_split.caption_counts, self.config.batch_size, seed=self.config.seed,
                                 epoch=epoch, rank=acc.process_index, world_size=acc.num_processes,
                                 caption_sampling=self.config.data.caption_sampling, start=start)

    def _loader(self, split: Split, sampler: EpochBatchSampler, seed: int) -> DataLoader:
        # Its own generator: creating a loader must not draw from the global RNG, or a resumed run would diverge.
        return DataLoader(split.dataset, batch_sampler=sampler, collate_fn=split.collate,
                          num_workers=self.config.data.num_workers, generator=torch.Generator().manual_seed(seed))

    def _start_logging(self) -> None:
        acc = self.accelerator
        step = self.state.global_step
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in self.out.glob(".*.tmp"):  # half-written checkpoints of a killed run
                shutil.rmtree(stale, ignore_errors=True)
            (self.out / "train_config.yaml").write_text(to_yaml(self.config))
            for name in ("metrics.jsonl", "samples.jsonl"):  # drop what a killed run logged after its checkpoint
                path = self.out / name
                if path.is_file():
                    lines = [line for line in path.read_text().splitlines()
                             if line.strip() and json.loads(line)["step"] <= step]
                    path.write_text("".join(line + "\n" for line in lines))
        acc.init_trackers("tensorboard", init_kwargs={"tensorboard": {"purge_step": step + 1} if step else {}})
        if acc.is_main_process:
            acc.get_tracker("tensorboard", unwrap=True).add_text("config", f"```\n{to_yaml(self.config)}\n```", step)

    def _note_skipped(self, skipped: list[Skipped]) -> None:
        for item in skipped:
            self.state.bad_items.setdefault(item.item, item.reason)

    # --- checkpoints -----------------------------------------------------------------------------------------------
    def _load_checkpoint(self, directory: Path) -> None:
        acc = self.accelerator
        self.model.load_trained_state(load_file(str(directory / "model.safetensors")))
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
        saved = json.loads((directory / "state.json").read_text())
        bad = {**saved.pop("bad_items"), **self.state.bad_items}
        fingerprint = self.state.data_fingerprint
        self.state = TrainState(**saved, bad_items=bad)
        if self.state.data_fingerprint != fingerprint:
            acc.print("warning: the training data differ from the checkpoint's; the data order will not match")
            self.state.data_fingerprint = fingerprint
        if self.state.world_size != acc.num_processes:
            acc.print(f"warning: the checkpoint was written by {self.state.world_size} process(es), this run has "
                      f"{acc.num_processes}: training continues, but not in the same data order")
            self.state.world_size = acc.num_processes
        rng = directory / f"rng-{acc.process_index}.pt"
        self.rng_to_restore = torch.load(rng if rng.is_file() else directory / "rng-0.pt", weights_only=True)
        acc.print(f"resumed from {directory} at step {self.state.global_step} (epoch {self.state.epoch}, "
                  f"step {self.state.step_in_epoch} of {self.steps_per_epoch})")

    def _gather_bad_items(self) -> None:
        from accelerate.utils import gather_object

        for item, reason in gather_object(sorted(self.state.bad_items.items())):
            self.state.bad_items.setdefault(item, reason)

    def save_checkpoint(self) -> Path:
        """Write checkpoint-<step>/ atomically: into a temporary folder, renamed when complete; then prune old ones."""
        acc = self.accelerator
        self._gather_bad_items()
        step = self.state.global_step
        final = self.out / f"checkpoint-{step}"
        tmp = self.out / f".checkpoint-{step}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            acc.unwrap_model(self.model).save_pretrained(tmp)  # config.json + model.safetensors: a loadable model
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps(asdict(self.state), indent=2) + "\n")
        acc.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng-{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer = self.out / ".latest.tmp"
            pointer.write_text(final.name + "\n")
            os.replace(pointer, self.out / "latest")
            old = sorted((p for p in self.out.glob("checkpoint-*") if p != final),
                         key=lambda p: int(p.name.split("-")[1]))
            for path in old[: max(len(old) - self.config.keep_checkpoints + 1, 0)]:
                shutil.rmtree(path, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _save_best(self) -> None:
        if self.accelerator.is_main_process:
            tmp = self.out / ".best.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.accelerator.unwrap_model(self.model).save_pretrained(tmp)
            _fsync_dir(tmp)
            _replace_dir(tmp, self.out / "best")

    # --- logging ---------------------------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any], file: str = "metrics.jsonl") -> None:
        if self.accelerator.is_main_process:
            with (self.out / file).open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def _print(self, text: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(text)

    # --- evaluation ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean dev losses over the whole dev set (shared across processes), plus sample captions on the main one."""
        acc, split = self.accelerator, self.dev_split
        model = acc.unwrap_model(self.model)  # no DDP wrapper: ranks may run different numbers of dev batches
        model.eval()
        sums = torch.zeros(len(LOSSES) + 1, dtype=torch.float64, device=acc.device)
        sampler = EpochBatchSampler(split.caption_counts, self.config.batch_size, rank=acc.process_index,
                                    world_size=acc.num_processes, shuffle=False)
        for batch in self._loader(split, sampler, self.config.seed):
            self._note_skipped(batch["skipped"])
            with acc.autocast():
                out = model(captions=batch["captions"], **_model_inputs(batch, acc.device))
            n = len(batch["captions"])
            for i, name in enumerate(LOSSES):
                value = getattr(out, name)
                if value is not None:
                    sums[i] += value.double() * n
            sums[-1] += n
        sums = acc.reduce(sums, "sum")
        metrics = {name: (sums[i] / sums[-1]).item() for i, name in enumerate(LOSSES) if sums[i] != 0}
        if self.config.best_metric == "cider_d":
            metrics["cider_d"] = self._dev_cider(model)
        if acc.is_main_process and self.config.num_sample_captions > 0:
            self._sample_captions(model)
        model.train()
        return metrics

    def _dev_cider(self, model: StoryModel) -> float:
        """Corpus CIDEr-D of greedy caption-decoder captions, one per dev image (every rank computes the same)."""
        if model.caption_decoder is None:
            raise ValueError("best_metric cider_d needs a caption decoder")
        split, captions = self.dev_split, {}
        for batch, inputs in self._image_batches(split, range(len(split.records)), self.accelerator.device):
            written = model.generate_captions(**inputs, num_beams=1, captioner="caption_decoder")
            # from pixels, an undecodable image arrives as its neighbour: score each image that was read, once,
            # against its own references
            for name, caption in zip(batch["names"], written):
                captions.setdefault(name, caption)
        references = {item_name(r.image): r.captions for r in split.records}
        scores, _ = caption_scores([references[name] for name in captions], list(captions.values()), use_java=False)
        return scores["CIDEr-D"] * 100

    def _sample_captions(self, model: StoryModel) -> None:
        split = self.dev_split
        count = min(self.config.num_sample_captions, len(split.records))
        batch = split.collate([split.dataset[(i, 0)] for i in range(count)])
        # show the captioner this run trains: the LM through the bridge, or else the caption decoder
        captioner = "decoder" if model.config.caption_weight > 0 or model.caption_decoder is None else "caption_decoder"
        inputs = _model_inputs(batch, self.accelerator.device)
        inputs.pop("text_pooled", None)
        captions = model.generate_captions(**inputs, captioner=captioner)
        step = self.state.global_step
        lines = []
        for name, caption, reference in zip(batch["names"], captions, batch["captions"]):
            self._log({"step": step, "image": name, "caption": caption, "reference": reference}, "samples.jsonl")
            lines.append(f"  {Path(name).name}: {caption!r} (reference: {reference!r})")
        self._print(f"sample captions at step {step}:\n" + "\n".join(lines))
        self.accelerator.get_tracker("tensorboard", unwrap=True).add_text("samples", "\n\n".join(lines), step)

    def _after_eval(self, metrics: dict[str, float]) -> bool:
        """Track the best dev loss (saving that model) and return True when early stopping says stop."""
        state = self.state
        state.last_eval_step, self.last_dev = state.global_step, metrics
        value = metrics.get(self.config.best_metric)
        if value is None:
            raise ValueError(f"best_metric {self.config.best_metric!r} is not computed by this run's losses")
        better = (lambda a, b: a > b) if self.config.best_metric in SCORES else (lambda a, b: a < b)
        improved = state.best_value is None or better(value, state.best_value)
        if improved:
            state.best_value, state.best_step, state.evals_since_best = value, state.global_step, 0
            self._save_best()
        else:
            state.evals_since_best += 1
        self._log({"step": state.global_step, "split": "dev", **metrics, "best_value": state.best_value,
                   "epoch": state.epoch})
        self.accelerator.log({f"dev/{k}": v for k, v in metrics.items()}, step=state.global_step)
        self._print(f"step {state.global_step}: dev loss {metrics['loss']:.4f}, {self.config.best_metric} "
                    f"{value:.4f} (best {state.best_value:.4f} "
                    f"at step {state.best_step})")
        patience = self.config.early_stopping_patience
        return patience is not None and state.evals_since_best >= patience

    # --- training --------------------------------------------------------------------------------------------------
    def _train_step(self, batches: list[dict]) -> tuple[dict[str, torch.Tensor], float | None]:
        acc = self.accelerator
        totals: dict[str, torch.Tensor] = {}
        for micro, batch in enumerate(batches):
            self._note_skipped(batch["skipped"])
            sync = micro == len(batches) - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                if self.reward is not None:
                    out, rewards = self._self_critical_forward(batch)
                    for name, value in rewards.items():
                        totals[name] = totals.get(name, 0.0) + value / len(batches)
                else:
                    out = self.model(captions=batch["captions"], **_model_inputs(batch, acc.device))
                acc.backward(out.loss / len(batches))
            for name in LOSSES:
                value = getattr(out, name)
                if value is not None:
                    totals[name] = totals.get(name, 0.0) + value.detach().float() / len(batches)
        grad_norm = None
        if self.config.optim.grad_clip:
            grad_norm = float(acc.clip_grad_norm_(self.trainable, self.config.optim.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals, grad_norm

    def _self_critical_forward(self, batch: dict) -> tuple[Any, dict[str, torch.Tensor]]:
        """Sample captions (no gradient), reward them, then the policy-gradient loss through the (DDP) model."""
        cfg, acc = self.config, self.accelerator
        inputs = _model_inputs(batch, acc.device)
        inputs.pop("text_pooled", None)
        model = acc.unwrap_model(self.model)
        if "image_tokens" not in inputs:
            with torch.no_grad():
                inputs["image_tokens"], inputs["image_pooled"] = model.encode_image(inputs.pop("pixel_values"))
        k = cfg.scst_samples
        compact, texts = model.sample_captions(inputs["image_tokens"], inputs["image_pooled"], k, cfg.scst_temperature)
        cider = torch.as_tensor(self.reward(texts, [name for name in batch["names"] for _ in range(k)]),
                                dtype=torch.float32)
        logged = {"sample_cider_d": cider.mean() * 100}
        rewards = cider
        if cfg.scst_discriminability > 0:
            with torch.no_grad():
                images = model.image_embedding(inputs["image_pooled"])
                logits = model.contrastive_scale() * similarity(model.text_embedding(texts), images)
                own = torch.arange(len(batch["names"]), device=logits.device).repeat_interleave(k)
                retrieval = logits.log_softmax(dim=-1).gather(1, own[:, None])[:, 0].float().cpu()
            rewards = cider + cfg.scst_discriminability * retrieval
            logged["sample_image_logprob"] = retrieval.mean()
        advantages = rewards - leave_one_out_baseline(rewards, k)
        repeated = {name: value.repeat_interleave(k, dim=0) for name, value in inputs.items()}
        out = self.model(**repeated, caption_samples=compact, sample_advantages=advantages.to(acc.device))
        return out, {name: value.to(acc.device) for name, value in logged.items()}

    def fit(self) -> dict[str, Any]:
        acc, cfg, state = self.accelerator, self.config, self.state
        if self.rng_to_restore is not None:
            _set_rng_state(self.rng_to_restore)
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=state.global_step, desc="training", unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and acc.is_main_process))
        window: dict[str, torch.Tensor] = {}
        window_steps, window_seconds = 0, 0.0
        last_train: dict[str, float] = {}
        global_batch = cfg.batch_size * acc.num_processes * cfg.grad_accum_steps
        stop = False
        while state.global_step < self.total_steps and not stop:
            sampler = self._sampler(state.epoch, start=state.step_in_epoch * cfg.grad_accum_steps)
            batches = iter(self._loader(self.train_split, sampler, cfg.seed + state.epoch))
            while state.step_in_epoch < self.steps_per_epoch and state.global_step < self.total_steps:
                started = time.perf_counter()
                losses, grad_norm = self._train_step([next(batches) for _ in range(cfg.grad_accum_steps)])
                seconds = time.perf_counter() - started
                state.global_step += 1
                state.step_in_epoch += 1
                state.samples += global_batch
                state.train_seconds += seconds
                window_steps, window_seconds = window_steps + 1, window_seconds + seconds
                for name, value in losses.items():
                    window[name] = window.get(name, 0.0) + value
                bar.update(1)
                last = state.global_step == self.total_steps
                if state.global_step % cfg.log_every == 0 or last:
                    last_train = self._log_train(window, window_steps, window_seconds, global_batch, grad_norm)
                    bar.set_postfix(loss=f"{last_train['loss']:.4f}")
                    window, window_steps, window_seconds = {}, 0, 0.0
                if self.dev_split is not None and cfg.eval_every and state.global_step % cfg.eval_every == 0:
                    stop = self._after_eval(self.evaluate())
                if (cfg.save_every and state.global_step % cfg.save_every == 0) or stop:
                    self.save_checkpoint()
                if stop:
                    self._print(f"early stopping: no dev improvement in {cfg.early_stopping_patience} evaluations")
                    break
            if state.step_in_epoch >= self.steps_per_epoch:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
        bar.close()
        return self._finish(last_train, early_stopped=stop)

    def _log_train(self, window: dict[str, torch.Tensor], steps: int, seconds: float, global_batch: int,
                   grad_norm: float | None) -> dict[str, float]:
        acc, state = self.accelerator, self.state
        names = sorted(window)
        means = acc.reduce(torch.stack([window[n] / steps for n in names]).to(acc.device), "mean").tolist()
        record = {"step": state.global_step, "split": "train", "epoch": state.epoch, **dict(zip(names, means)),
                  "samples_per_second": steps * global_batch / max(seconds, 1e-9), "grad_norm": grad_norm,
                  "world_size": acc.num_processes}
        for group in self.optimizer.param_groups:
            record.setdefault(f"lr/{group['part']}", group["lr"])
        self._log(record)
        acc.log({f"train/{k}": v for k, v in record.items() if k not in ("step", "split") and v is not None},
                step=state.global_step)
        return record

    def _finish(self, last_train: dict[str, float], early_stopped: bool) -> dict[str, Any]:
        from accelerate.utils import gather_object

        acc, state = self.accelerator, self.state
        if self.dev_split is not None and state.last_eval_step != state.global_step:
            self._after_eval(self.evaluate())
        elif self.dev_split is None:
            self._save_best()  # nothing to compare on: the final model is the one to use
        checkpoint = latest_checkpoint(self.out)
        if checkpoint is None or checkpoint.name != f"checkpoint-{state.global_step}":
            checkpoint = self.save_checkpoint()
        else:
            self._gather_bad_items()
        digests = gather_object([weights_digest(acc.unwrap_model(self.model))])
        report = {
            "status": "early_stopped" if early_stopped else "completed",
            "steps": state.global_step, "total_steps": self.total_steps, "epoch": state.epoch,
            "world_size": acc.num_processes, "mixed_precision": acc.mixed_precision,
            "final_train": last_train, "final_dev": self.last_dev,
            "best": {"step": state.best_step, "metric": self.config.best_metric, "value": state.best_value,
                     "path": str(self.out / "best")},
            "checkpoint": str(checkpoint),
            "samples_per_second": state.samples / max(state.train_seconds, 1e-9),
            "train_seconds": state.train_seconds, "samples": state.samples,
            "feature_cache": self.cache_report,
            "num_bad_items": len(state.bad_items),
            "bad_items": [{"item": k, "reason": v} for k, v in sorted(state.bad_items.items())],
            "weights_sha256_per_rank": digests,
        }
        if acc.is_main_process:
            _write_json_atomic(self.out / "report.json", report)
            self._print(f"done: {state.global_step} steps, {report['samples_per_second']:.1f} samples/s, "
                        f"{len(state.bad_items)} skipped item(s); report in {self.out / 'report.json'}")
        acc.wait_for_everyone()  # no rank tears the process group down while another still uses it
        acc.end_training()
        return report


def train(config: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run training to the end and return the report (also written to `<output_dir>/report.json`)."""
    return Trainer(config, resume=resume).fit()


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------
def caption_features(model: StoryModel, records: list[ImageCaptions], data: DataConfig,
                     progress: bool = False) -> TextFeatures | None:
    """A frozen text encoder's features for every caption, computed once (the contrastive loss needs them)."""
    if model.config.text.train != "frozen" or model.config.contrastive_weight <= 0:
        return None
    fingerprint = {"spec": model.config.text.spec, "weights_sha256": tensors_sha256(model.text.state_dict()),
                   "pooling": "mean", "max_length": 128, "dtype": data.feature_dtype}
    model.text.eval()  # a frozen encoder: no dropout in the features that stand in for it
    return text_features(data.feature_cache_dir, model.encode_text, fingerprint,
                         [c for r in records for c in r.captions], dtype=getattr(torch, data.feature_dtype),
                         progress=progress)


def prepare_features(config: TrainConfig) -> None:
    """Fill the image (and caption) feature caches for the config's splits, e.g. before parallel stages."""
    model = StoryModel(build_model_config(config.model))
    freeze_unused_heads(model)
    for name, source in (("train", config.data.train), ("dev", config.data.dev)):
        if source is None:
            continue
        records, _ = read_source(source)
        cache = FeatureCache(config.data.feature_cache_dir, model.vision, model.config.vision.spec,
                             getattr(torch, config.data.feature_dtype), max_pixels=config.data.max_pixels)
        built = cache.build(records, batch_size=config.data.encode_batch_size, num_workers=config.data.num_workers,
                            progress=config.progress)
        text = caption_features(model, built.records, config.data, progress=config.progress)
        print(f"{name}: {built.encoded} images encoded, {built.reused} reused, {len(built.skipped)} skipped"
              + (f"; {text.encoded} of {len(text.lookup)} captions encoded" if text is not None else ""), flush=True)


CONFIG_DIR = Path(__file__).parents[1] / "configs"  # the shipped configs, package data


def packaged_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config(name_or_path: str | Path) -> Path:
    """An existing file as given; else a bare name (`flickr8k`, `tiny.yaml`) of a packaged config."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if len(path.parts) == 1:
        packaged = CONFIG_DIR / (path.name if path.suffix == ".yaml" else path.name + ".yaml")
        if packaged.is_file():
            return packaged
    raise FileNotFoundError(f"config file not found: {name_or_path} "
                            f"(packaged configs: {', '.join(packaged_configs())})")


def _task(path: str) -> str | None:
    """`task: writer` marks a config for the story writer's fine-tuning; anything else trains the StoryModel."""
    file = Path(path)
    data = yaml.safe_load(file.read_text()) if file.is_file() else None
    return data.get("task") if isinstance(data, dict) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmstory train", description="Train a StoryModel from a YAML config.")
    parser.add_argument("--config", required=True,
                        help=f"YAML file, or a packaged config's name ({', '.join(packaged_configs())})")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output dir")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--max-steps", type=int, help="override max_steps")
    parser.add_argument("--epochs", type=int, help="override epochs")
    parser.add_argument("--batch-size", type=int, help="override batch_size (per process)")
    parser.add_argument("--seed", type=int, help="override seed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any field, e.g. --set optim.lr.bridge=1e-3 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--prepare-only", action="store_true",
                        help="build the feature caches (data.use_feature_cache) and exit without training")
    args = parser.parse_args(argv)
    try:
        args.config = str(resolve_config(args.config))
    except FileNotFoundError as err:
        parser.error(str(err))
    if _task(args.config) == "writer":  # the story writer's own loop (mmstory.train.writer)
        from mmstory.train.writer import load_config, train_writer

        writer = load_config(args.config, args.overrides)
        for name in ("output_dir", "max_steps", "epochs", "batch_size", "seed"):
            if getattr(args, name) is not None:
                setattr(writer, name, getattr(args, name))
        print(json.dumps(train_writer(writer, resume=args.resume)))
        return 0
    config = TrainConfig.load(args.config, args.overrides)
    for name in ("output_dir", "max_steps", "epochs", "batch_size", "seed"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    config.progress = config.progress and not args.no_progress
    if args.prepare_only:
        if not config.data.use_feature_cache:
            parser.error("--prepare-only needs data.use_feature_cache: true")
        prepare_features(config)
        return 0
    report = train(config, resume=args.resume)
    return 0 if report["status"] in ("completed", "early_stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
