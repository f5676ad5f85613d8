"""Checkpoints that a killed run never leaves half-written: the training state, every rank's RNG, the optimiser, the
schedule and the model, swapped into place only when complete. One layout for every task; the story writer's old
checkpoints (adapters.safetensors + optimizer.pt holding the optimiser and torch's RNG) still resume."""

from __future__ import annotations

import json
import math
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
from mmstory.saving import ADAPTER_WEIGHTS_NAME, WEIGHTS_NAME, load_writer_adapters
from mmstory.train.features import tensors_sha256

if TYPE_CHECKING:
    from accelerate import Accelerator

    from mmstory.model import StoryModel

OLD_WRITER_WEIGHTS = "adapters.safetensors"  # the story writer's own loop saved its adapters under this name


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
    """Restore what `_rng_state` saved (an old writer checkpoint saved torch's generator alone)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def weights_digest(model: StoryModel) -> str:
    return tensors_sha256(model.trained_state_dict())


def model_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's trained tensors under the model's names: model.safetensors and a LoRA writer's PEFT-format
    adapters, or an old writer checkpoint's adapters.safetensors."""
    tensors = load_file(str(directory / WEIGHTS_NAME)) if (directory / WEIGHTS_NAME).is_file() else {}
    if (directory / ADAPTER_WEIGHTS_NAME).is_file():
        tensors.update(load_writer_adapters(directory))
    if (directory / OLD_WRITER_WEIGHTS).is_file():
        tensors.update(load_file(str(directory / OLD_WRITER_WEIGHTS)))
    return tensors


def _scheduled_lr(optimizer: torch.optim.Optimizer, scheduler: Any, step: int) -> None:
    """Set the rates of `step` by this run's schedule (LambdaLR), which may end later than the saved run's did."""
    scheduler.last_epoch = step
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _old_writer_state(directory: Path, optimizer: torch.optim.Optimizer, scheduler: Any,
                      steps_per_epoch: int) -> tuple[dict, dict]:
    """An old writer checkpoint's optimiser moments loaded (the rates come from this run's config and schedule), and
    its state.json ({step, best}) and torch RNG in this layout's terms."""
    saved = torch.load(directory / "optimizer.pt", weights_only=True)
    current = optimizer.state_dict()
    if len(saved["optimizer"]["param_groups"]) != len(current["param_groups"]):
        raise ValueError(f"{directory}: the old writer checkpoint's optimiser does not fit this run's parameters")
    groups = [{**group, "params": old["params"]}
              for group, old in zip(current["param_groups"], saved["optimizer"]["param_groups"])]
    optimizer.load_state_dict({"state": saved["optimizer"]["state"], "param_groups": groups})
    old = json.loads((directory / "state.json").read_text())
    step = int(old["step"])
    _scheduled_lr(optimizer, scheduler, step)
    best = old.get("best")
    state = {"global_step": step, "epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch,
             "best_value": best if best is not None and math.isfinite(best) else None, "bad_items": {}}
    return state, {"torch": saved["rng"]}


class CheckpointStore:
    """A run's checkpoint-<step>/ folders (each loadable with `StoryModel.from_pretrained`), `latest` and best/:
    written atomically, pruned to the last `keep`, read back for `--resume`. The same for every task."""

    def __init__(self, out: Path, accelerator: Accelerator, keep: int):
        self.out, self.accelerator, self.keep = out, accelerator, keep

    def load(self, directory: Path, model: StoryModel, optimizer: torch.optim.Optimizer, scheduler: Any,
             steps_per_epoch: int) -> tuple[dict, dict]:
        """Load the model, optimiser and schedule in place; return the saved TrainState fields and this rank's RNG."""
        model.load_trained_state(model_tensors(directory))
        if (directory / OLD_WRITER_WEIGHTS).is_file():
            return _old_writer_state(directory, optimizer, scheduler, steps_per_epoch)
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
        _scheduled_lr(optimizer, scheduler, scheduler.last_epoch)  # a run resumed with a longer max_steps
        rng = directory / f"rng-{self.accelerator.process_index}.pt"
        rng_state = torch.load(rng if rng.is_file() else directory / "rng-0.pt", weights_only=True)
        return json.loads((directory / "state.json").read_text()), rng_state

    def save(self, model: StoryModel, optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState) -> Path:
        """Write checkpoint-<step>/ atomically: into a temporary folder, renamed when complete; then prune old ones."""
        acc = self.accelerator
        step = state.global_step
        final = self.out / f"checkpoint-{step}"
        tmp = self.out / f".checkpoint-{step}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)  # config.json + model.safetensors (+ adapters): a loadable model
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
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
            for path in old[: max(len(old) - self.keep + 1, 0)]:
                shutil.rmtree(path, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def save_best(self, model: StoryModel) -> None:
        if self.accelerator.is_main_process:
            tmp = self.out / ".best.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            _fsync_dir(tmp)
            _replace_dir(tmp, self.out / "best")
