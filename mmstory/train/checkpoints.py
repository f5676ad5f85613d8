"""Checkpoints that a killed run never leaves half-written: the training state, every rank's RNG, the optimiser and
the model, swapped into place only when complete."""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file

from mmstory.files import atomic_write_text
from mmstory.train.features import tensors_sha256

if TYPE_CHECKING:
    from mmstory.model import StoryModel


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
    atomic_write_text(path, json.dumps(data, indent=2) + "\n", tmp_name=f".{path.name}.tmp")


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


class CheckpointMixin:
    """Saving and resuming the Trainer's run (mixed into `mmstory.train.trainer.Trainer`)."""

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
            atomic_write_text(self.out / "latest", final.name + "\n", tmp_name=".latest.tmp")
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
