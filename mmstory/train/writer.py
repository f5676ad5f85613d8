"""Fine-tune the story writer with LoRA on text stories: (what each picture shows, hints) -> a human-written story.

The writer is taught with the very message `StoryTeller` sends it (`generation.build_instruction`), without visual
prefixes: the story corpora come without their photos, and the caption decoder's captions are what ground a story.
Run through `mmstory train --config mmstory/configs/writer_vist.yaml` (a config whose `task` is `writer`); `--resume`
continues from the newest checkpoint. `best/` (lowest dev loss) and `final/` are `StoryModel.save_pretrained`
directories: the base model's trained tensors plus the writer's adapters.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmstory.config import PartConfig, from_dict
from mmstory.losses import IGNORE_INDEX, caption_loss
from mmstory.model import StoryModel

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class WriterTrainConfig:
    task: str = "writer"
    model: str = "mmstory-small"  # the StoryModel whose writer is adapted (a packaged name or directory)
    train: str = "~/.cache/mmstory/stories/vist/train.jsonl"  # records from scripts/prepare_stories.py
    dev: str | None = "~/.cache/mmstory/stories/vist/dev.jsonl"
    output_dir: str = "runs/writer"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    max_tokens: int = 320  # longer examples are cut (prompt first, so the story's start is kept)
    mixed_precision: str = "bf16"  # bf16 autocast (also on CPU) | no
    eval_every: int = 50
    save_every: int = 25
    log_every: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task != "writer":
            raise ValueError(f"a writer config has task: writer, got {self.task!r}")
        if self.mixed_precision not in ("bf16", "no"):
            raise ValueError(f"mixed_precision must be 'bf16' or 'no', got {self.mixed_precision!r}")
        for name in ("batch_size", "epochs", "log_every", "save_every", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


def read_stories(path: str | Path) -> list[dict]:
    """Records with `scenes` (one description per picture), optional `words`, `style`, `tone`, `audience`, and the
    `story`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no story data at {path}; prepare it with scripts/prepare_stories.py")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    bad = [i for i, r in enumerate(rows) if not r.get("scenes") or not str(r.get("story", "")).strip()]
    if bad:
        raise ValueError(f"{path}: records {bad[:5]} need non-empty 'scenes' and 'story'")
    return rows


def story_budget(story: str) -> int:
    """The word budget a request for this story would name: its length, rounded to ten, at least 20."""
    return max(20, int(round(len(story.split()) / 10.0)) * 10)


def encode_example(model: StoryModel, record: dict, max_tokens: int) -> tuple[list[int], list[int]]:
    """Token ids of [chat prompt][story][end of turn] and labels for the story and end of turn only."""
    from mmstory.prompts import AUDIENCES, STYLES, TONES, build_instruction

    scenes = record["scenes"]
    words = record.get("words") or []
    hints = [words if i == len(scenes) - 1 else [] for i in range(len(scenes))] if words else None
    # optional style / tone / audience keys (prompts.STYLES ...), as a reader's request for this story names them
    style, tone, audience = (table.get(record.get(key) or "") for table, key in
                             ((STYLES, "style"), (TONES, "tone"), (AUDIENCES, "audience")))
    instruction = build_instruction(scenes, None, style, tone, audience, story_budget(record["story"]), None,
                                    with_images=False, hints=hints)
    tok = model.tokenizer
    prompt = tok(model.format_prompt(instruction), add_special_tokens=False).input_ids
    story = tok(record["story"].strip(), add_special_tokens=False).input_ids + [tok.eos_token_id]
    ids = (prompt + story)[:max_tokens]
    labels = ([IGNORE_INDEX] * len(prompt) + story)[:max_tokens]
    return ids, labels


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)], labels[row, : len(y)], mask[row, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def writer_loss(model: StoryModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model.writer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return caption_loss(logits, batch["labels"])


def add_writer_adapters(model: StoryModel, config: WriterTrainConfig) -> None:
    """Switch the writer to LoRA (only the adapters train) and stop it reading visual prefixes."""
    part = PartConfig(spec=model.config.writer.spec, train="lora", pretrained=model.config.writer.pretrained,
                      lora_r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      lora_targets=list(config.lora_targets))
    model.generation_config.story_prefix = False
    model.configure_part("writer", part)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("writer.") and "lora_" in name)


def adapter_state(model: StoryModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items() if "lora_" in k}


class WriterTrainer:
    """A small loop, nanoGPT-style: shuffled epochs, AdamW with warmup + cosine, checkpoints, dev loss, best/."""

    def __init__(self, config: WriterTrainConfig, resume: bool = False):
        self.config, self.out = config, Path(config.output_dir)
        self.train_rows = read_stories(config.train)
        self.dev_rows = read_stories(config.dev) if config.dev else []
        checkpoint = self.latest_checkpoint() if resume else None
        if not resume and self.latest_checkpoint() is not None:
            raise FileExistsError(f"{self.out} already holds checkpoints; pass --resume or choose another output_dir")
        torch.manual_seed(config.seed)
        self.model = StoryModel.from_pretrained(config.model)
        add_writer_adapters(self.model, config)
        self.model.writer.float()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.steps_per_epoch = len(self.train_rows) // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_rows)} stories make no batch of {config.batch_size}")
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.step, self.best = 0, math.inf
        if checkpoint is not None:
            self._load(checkpoint)

    # --- checkpoints -----------------------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        return found[-1] if found else None

    def _save(self) -> None:
        final = self.out / f"checkpoint-{self.step}"
        tmp = self.out / f".tmp-checkpoint-{self.step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(adapter_state(self.model), str(tmp / "adapters.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state()},  # rng: LoRA dropout
                   tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": self.step, "best": self.best,
                                                    "config": asdict(self.config)}))
        tmp.rename(final)  # a checkpoint appears whole or not at all
        for old in self.out.glob("checkpoint-*"):
            if old != final:
                shutil.rmtree(old)

    def _load(self, directory: Path) -> None:
        self.model.load_state_dict(load_file(str(directory / "adapters.safetensors")), strict=False)
        saved = torch.load(directory / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        state = json.loads((directory / "state.json").read_text())
        self.step, self.best = state["step"], state["best"]
        print(f"mmstory train: resumed from {directory} at step {self.step}")

    # --- training --------------------------------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.train_rows)))
        random.Random(self.config.seed + epoch).shuffle(order)
        return order

    def _batch(self, step: int) -> dict[str, torch.Tensor]:
        epoch, within = divmod(step, self.steps_per_epoch)
        size = self.config.batch_size
        rows = [self.train_rows[i] for i in self._order(epoch)[within * size: (within + 1) * size]]
        return self._collate(rows)

    def _collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        examples = [encode_example(self.model, r, self.config.max_tokens) for r in rows]
        return collate(examples, self.model.tokenizer.pad_token_id)

    def _lr(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        progress = (step - c.warmup_steps) / max(1, self.total_steps - c.warmup_steps)
        return c.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def _autocast(self):
        return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16,
                              enabled=self.config.mixed_precision == "bf16")

    @torch.no_grad()
    def dev_loss(self) -> float | None:
        if not self.dev_rows:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for start in range(0, len(self.dev_rows), self.config.batch_size):
            batch = self._collate(self.dev_rows[start: start + self.config.batch_size])
            with self._autocast():
                loss = writer_loss(self.model, batch)
            tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total, count = total + float(loss) * tokens, count + tokens
        self.model.train()
        return total / max(count, 1)

    def _log(self, record: dict[str, Any]) -> None:
        print(json.dumps(record), flush=True)
        with open(self.out / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _export(self, name: str) -> Path:
        return self.model.save_pretrained(self.out / name)

    def fit(self) -> dict[str, Any]:
        c = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        if self.step == 0 and self.dev_rows:
            self._log({"step": 0, "split": "dev", "loss": self.dev_loss()})
        self.model.train()
        window, started = [], time.perf_counter()
        while self.step < self.total_steps:
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr(self.step)
            with self._autocast():
                loss = writer_loss(self.model, self._batch(self.step))
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            window.append(float(loss.detach()))
            if self.step % c.log_every == 0 or self.step == self.total_steps:
                seconds = time.perf_counter() - started
                self._log({"step": self.step, "split": "train", "loss": sum(window) / len(window),
                           "lr": self._lr(self.step - 1), "seconds_per_step": seconds / len(window)})
                window, started = [], time.perf_counter()
            if self.dev_rows and (self.step % c.eval_every == 0 or self.step == self.total_steps):
                dev = self.dev_loss()
                self._log({"step": self.step, "split": "dev", "loss": dev})
                if dev < self.best:
                    self.best = dev
                    self._export("best")
            if self.step % c.save_every == 0 or self.step == self.total_steps:
                self._save()
        final = self._export("final")
        report = {"steps": self.step, "best_dev_loss": self.best, "final": str(final)}
        (self.out / "report.json").write_text(json.dumps(report, indent=2))
        return report


def load_config(path: str | Path, overrides: list[str] | None = None) -> WriterTrainConfig:
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    for item in overrides or []:
        key, eq, value = item.partition("=")
        if not eq or "." in key:
            raise ValueError(f"override {item!r} is not KEY=VALUE for a writer config")
        data[key] = yaml.safe_load(value)
    return from_dict(WriterTrainConfig, data)


def train_writer(config: WriterTrainConfig, resume: bool = False) -> dict[str, Any]:
    return WriterTrainer(config, resume=resume).fit()
