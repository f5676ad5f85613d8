"""The writer task: the story writer taught on text stories, (what each picture shows, hints) -> a human-written story,
with LoRA adapters (the default) or in full.

The writer is taught with the very message `StoryTeller` sends it (`generation.build_instruction`), without visual
prefixes: the story corpora come without their photos, and the caption decoder's captions are what ground a story.
Run through `mmstory train --config mmstory/configs/writer_vist.yaml` (a config whose `task` is `writer`; the loop is
`mmstory.train.trainer`'s, `--resume` continues from the newest checkpoint). `best/` (lowest dev loss) and each
`checkpoint-<step>/` are `StoryModel.save_pretrained` directories: the base model's trained tensors plus the writer's
adapters.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmstory.config import PartConfig
from mmstory.losses import IGNORE_INDEX, caption_loss
from mmstory.model import StoryModel
from mmstory.train.config import LORA_TARGETS, OptimConfig, TrainConfig, WriterSection
from mmstory.train.optimizer import param_groups

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["LORA_TARGETS", "WriterTask", "add_writer_adapters", "collate", "encode_example", "read_stories",
           "story_budget"]


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


def add_writer_adapters(model: StoryModel, section: WriterSection) -> None:
    """Make the writer trainable (LoRA adapters, or every weight) and stop it reading visual prefixes; nothing else
    trains."""
    part = PartConfig(spec=model.config.writer.spec, train=section.train, pretrained=model.config.writer.pretrained,
                      lora_r=section.lora_r, lora_alpha=section.lora_alpha, lora_dropout=section.lora_dropout,
                      lora_targets=list(section.lora_targets))
    model.generation_config.story_prefix = False
    model.configure_part("writer", part)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("writer.") and (section.train == "full" or "lora_" in name))


def start_from_adapters(model: StoryModel, source: str) -> None:
    """Copy a saved writer's LoRA tensors into the fresh adapters (same rank and targets, or a clear error)."""
    from mmstory.registry import resolve_pretrained
    from mmstory.saving import load_writer_adapters

    saved = load_writer_adapters(resolve_pretrained(source))
    own = {name: param for name, param in model.named_parameters() if "lora_" in name}
    if set(saved) != set(own) or any(saved[k].shape != own[k].shape for k in own):
        raise ValueError(f"{source}: its adapters do not match the writer's (lora_r and lora_targets must be the "
                         f"ones it was trained with)")
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(saved[name])


class WriterLoss(torch.nn.Module):
    """The writer's token cross-entropy as a module's forward, so data-parallel wrapping sees the forward pass."""

    def __init__(self, model: StoryModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.model.writer(input_ids=input_ids, attention_mask=attention_mask).logits
        return caption_loss(logits, labels)


class WriterTask:
    """Story examples in a fixed order per (seed, epoch), the writer's loss and its dev loss (see `Task`)."""

    has_dev: bool

    def __init__(self, config: TrainConfig, accelerator: Accelerator):
        self.config, self.accelerator, self.section = config, accelerator, config.writer
        self.train_rows = read_stories(config.data.train.path)
        self.dev_rows = read_stories(config.data.dev.path) if config.data.dev is not None else []
        self.has_dev, self.bad_items = bool(self.dev_rows), {}
        self.model = StoryModel.from_pretrained(self.section.pretrained)
        add_writer_adapters(self.model, self.section)
        if self.section.init_adapters:
            start_from_adapters(self.model, self.section.init_adapters)
        self.model.writer.float()
        self.module = WriterLoss(self.model)
        self.global_batch = config.batch_size * accelerator.num_processes
        if len(self.train_rows) < self.global_batch:
            raise ValueError(f"{len(self.train_rows)} stories make no batch of {self.global_batch}")

    def param_groups(self, optim: OptimConfig) -> list[dict]:
        return param_groups(self.model, optim.lr, optim.weight_decay)

    def micro_batches_per_epoch(self) -> int:
        return len(self.train_rows) // self.global_batch

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.train_rows)))
        random.Random(self.config.seed + epoch).shuffle(order)
        return order

    def batches(self, epoch: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """Global batches of the epoch's order; this process takes its slice of each."""
        order, size = self._order(epoch), self.config.batch_size
        offset = self.accelerator.process_index * size
        for index in range(start, self.micro_batches_per_epoch()):
            first = index * self.global_batch + offset
            yield self._collate([self.train_rows[i] for i in order[first: first + size]])

    def _collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        examples = [encode_example(self.model, r, self.section.max_tokens) for r in rows]
        return collate(examples, self.model.tokenizer.pad_token_id)

    def loss(self, module: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = self.accelerator.device
        loss = module(**{name: value.to(device) for name, value in batch.items()})
        return loss, {"loss": loss.detach().float()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The dev stories' cross-entropy per story token (every process reads the whole dev set)."""
        self.model.eval()
        total, count = 0.0, 0
        for start in range(0, len(self.dev_rows), self.config.batch_size):
            batch = self._collate(self.dev_rows[start: start + self.config.batch_size])
            with self.accelerator.autocast():
                loss = self.module(**{name: value.to(self.accelerator.device) for name, value in batch.items()})
            tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total, count = total + float(loss) * tokens, count + tokens
        self.model.train()
        return {"loss": total / max(count, 1)}

    def samples(self) -> list[dict[str, Any]]:
        return []

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.train_rows, sort_keys=True).encode()).hexdigest()[:16]

    def report(self) -> dict[str, Any]:
        return {"train_stories": len(self.train_rows), "dev_stories": len(self.dev_rows)}
