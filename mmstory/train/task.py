"""What the training loop (`mmstory.train.trainer.Trainer`) asks of a task. A task owns its model, its batches, its
loss and its dev evaluation; the loop owns everything else (optimiser, schedule, accumulation, precision, devices,
data-parallel wrapping, logs, checkpoints). The tasks: `captioning_task.CaptioningTask` (contrastive + captioners,
or the caption decoder's self-critical phase) and `writer.WriterTask` (the story writer, LoRA or full)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from mmstory.model import StoryModel
    from mmstory.train.config import OptimConfig


class Task(Protocol):
    model: StoryModel  # what checkpoints and best/ save (`save_pretrained`) and resume loads
    module: torch.nn.Module  # what the loop wraps for data-parallel training and passes to `loss`
    bad_items: dict[str, str]  # data items this process skipped, with the reason
    has_dev: bool

    def param_groups(self, optim: OptimConfig) -> list[dict]:
        """The optimiser's groups, each with `name`, `part`, `lr` and `weight_decay`."""

    def micro_batches_per_epoch(self) -> int:
        """How many batches this process gets in one epoch (the same on every process)."""

    def batches(self, epoch: int, start: int) -> Iterator[Any]:
        """This process's batches of `epoch` in the run's fixed order, from the `start`-th on."""

    def loss(self, module: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise (through `module`, the wrapped model) and the values to log (detached scalars)."""

    def evaluate(self) -> dict[str, float]:
        """Dev metrics over the whole dev set, with `loss` among them; the model is in eval mode only inside."""

    def samples(self) -> list[dict[str, Any]]:
        """What to show at an evaluation (e.g. sample captions); may be empty."""

    def fingerprint(self) -> str:
        """Of the training data, to notice a resumed run reading other data."""

    def report(self) -> dict[str, Any]:
        """The task's own part of report.json."""
