"""The trainer's configuration: one YAML file read into `TrainConfig` (the task, model, data, optimiser, loss weights,
the writer task's section, run settings), older configs' keys moved to where they live now (the story writer's old
flat layout included), and the packaged configs found by name."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmstory.config import GenerationConfig, ModelConfig, deep_merge, from_dict, read_yaml, split_generation
from mmstory.images import MAX_PIXELS
from mmstory.losses import LOSS_WEIGHT_FIELDS, StoryLoss
from mmstory.registry import get_generation_config, get_model_config

LOSSES = ("loss", "contrastive_loss", "caption_loss", "caption_decoder_loss")
SCORES = ("cider_d",)  # dev scores (higher is better): CIDEr-D of the caption decoder's greedy captions

PARTS = ("bridge", "caption_decoder", "projections", "vision", "text", "writer")
PART_OF = {"bridge": "bridge", "caption_decoder": "caption_decoder", "image_projection": "projections",
           "text_projection": "projections", "logit_scale": "projections", "vision": "vision", "text": "text",
           "writer": "writer"}
DEFAULT_LR = {"bridge": 3e-4, "caption_decoder": 5e-4, "projections": 5e-4, "vision": 1e-5, "text": 1e-5,
              "writer": 2e-5}
OBJECTIVES = ("xe", "scst")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("no", "bf16", "fp16")
TASKS = ("captioning", "writer")  # what a run trains: mmstory.train.captioning_task / mmstory.train.writer
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
    overrides: dict[str, Any] = field(default_factory=dict)  # deep-merged in, e.g. {contrastive_heads: 1}
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
        if "decoder" in self.lr and "writer" not in self.lr:  # the story writer's part was called decoder
            self.lr["writer"] = self.lr.pop("decoder")
        unknown = set(self.lr) - set(PARTS)
        if unknown:
            raise ValueError(f"optim.lr has unknown part(s) {sorted(unknown)}; parts: {', '.join(PARTS)}")
        self.lr = {**DEFAULT_LR, **{k: float(v) for k, v in self.lr.items()}}
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")


@dataclass
class WriterSection:
    """The writer task: a pretrained StoryModel's story writer taught on text stories (`data.train` / `data.dev` are
    story JSONL files from scripts/prepare_stories.py), with LoRA adapters or in full."""

    pretrained: str = "mmstory-small"  # the StoryModel whose writer is adapted (a packaged name or directory)
    train: str = "lora"  # lora: only the adapters train | full: every writer weight trains
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    max_tokens: int = 320  # longer examples are cut (prompt first, so the story's start is kept)
    # a directory with adapter_model.safetensors (a packaged name or a save_pretrained directory) whose LoRA tensors
    # the new adapters start from: a shipped writer taught on more stories; None: fresh adapters
    init_adapters: str | None = None

    def __post_init__(self) -> None:
        if self.train not in ("lora", "full"):
            raise ValueError(f"writer.train must be 'lora' or 'full', got {self.train!r}")
        if self.lora_r < 1 or self.max_tokens < 1:
            raise ValueError("writer.lora_r and writer.max_tokens must be >= 1")


@dataclass
class TrainConfig:
    task: str = "captioning"  # captioning: contrastive + captioners (+ SCST) | writer: the story writer
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: StoryLoss = field(default_factory=StoryLoss)  # the heads' loss weights; a head weighed 0 is not run
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
    # the share of captions whose noun agrees with one of the image's ImageNet tags that has noun and tag swapped for
    # another ImageNet class (mmstory.train.novel_objects): how the caption decoder learns to name what no training
    # caption names. Cross-entropy only; 0 turns it off
    novel_object_swap: float = 0.0
    num_sample_captions: int = 4
    writer: WriterSection = field(default_factory=WriterSection)  # the writer task's settings
    progress: bool = True

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == "writer" and self.best_metric != "loss":
            raise ValueError("the writer task's only dev metric is its loss: best_metric must be 'loss'")
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
        return from_dict(cls, move_loss_weights(move_writer_fields(data)))

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        """Read a YAML config and apply `key.sub=value` overrides (values parsed as YAML)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = read_yaml(path)
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


def move_loss_weights(data: dict[str, Any]) -> dict[str, Any]:
    """Loss weights that older configs set under `model.overrides` or `model.config` (ModelConfig fields once) moved
    to the `loss` section; where both name one, the old place (the more specific: `--set model.overrides...`) wins."""
    model = data.get("model")
    if not isinstance(model, dict):
        return data
    moved: dict[str, Any] = {}
    model = dict(model)
    for key in ("config", "overrides"):
        if isinstance(model.get(key), dict) and any(k in LOSS_WEIGHT_FIELDS for k in model[key]):
            section = dict(model[key])
            moved.update({k: section.pop(k) for k in LOSS_WEIGHT_FIELDS if k in section})
            model[key] = section
    if not moved:
        return data
    loss = data.get("loss") or {}
    if not isinstance(loss, dict):
        return data  # from_dict says what is wrong with it
    return {**data, "model": model, "loss": {**loss, **moved}}


# the story writer's old flat config (`task: writer` with `model: <name>`, `train: <file>`, `lr: ...` at the top) and
# its defaults there, where they differ from this config's
WRITER_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "max_tokens", "init_adapters")
OLD_WRITER_DEFAULTS = {"train": "~/.cache/mmstory/stories/vist/train.jsonl",
                       "dev": "~/.cache/mmstory/stories/vist/dev.jsonl", "output_dir": "runs/writer",
                       "batch_size": 8, "mixed_precision": "bf16", "eval_every": 50, "save_every": 25, "log_every": 5}


def move_writer_fields(data: dict[str, Any]) -> dict[str, Any]:
    """A writer config of the old flat layout read into this one's sections: the writer's fields under `writer`, its
    story files under `data`, its rate and warmup under `optim` with the old loop's AdamW settings (betas 0.9/0.999,
    eps 1e-8, no weight decay, gradients clipped at 1); a config already in sections is returned as it is."""
    if data.get("task") != "writer" or isinstance(data.get("data"), dict) or isinstance(data.get("writer"), dict):
        return data
    old = {**OLD_WRITER_DEFAULTS, **data}
    writer = {"pretrained": old.pop("model", "mmstory-small"), **{k: old.pop(k) for k in WRITER_FIELDS if k in old}}
    train, dev = old.pop("train"), old.pop("dev")
    optim = {"lr": {"writer": old.pop("lr", 3e-4)}, "weight_decay": old.pop("weight_decay", 0.0),
             "warmup_steps": old.pop("warmup_steps", 10), "betas": [0.9, 0.999], "eps": 1e-8, "grad_clip": 1.0}
    return {**old, "writer": writer, "optim": optim,
            "data": {"train": {"path": train}, "dev": {"path": dev} if dev else None, "num_workers": 0}}


def build_configs(section: ModelSection) -> tuple[ModelConfig, GenerationConfig]:
    """The section's architecture and inference settings: a registered name's (or a full mapping, which may be of
    the single-file form holding both), with `overrides` deep-merged into whichever of the two names the field."""
    if section.config is not None:
        base, generation = split_generation(dict(section.config))
        generation = {**GenerationConfig().to_dict(), **generation}
    else:
        base = get_model_config(section.name).to_dict()
        generation = get_generation_config(section.name).to_dict()
    overrides, generation_overrides = split_generation(section.overrides)
    return (ModelConfig.from_dict(deep_merge(base, overrides)),
            GenerationConfig.from_dict({**generation, **generation_overrides}))


CONFIG_DIR = Path(__file__).parents[1] / "configs"  # the shipped configs, package data


def packaged_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("_"))  # _*: shared parts


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
    """A config file's `task` key, without reading the rest: `writer` marks the story writer's fine-tuning."""
    file = Path(path)
    data = yaml.safe_load(file.read_text()) if file.is_file() else None
    return data.get("task") if isinstance(data, dict) else None
