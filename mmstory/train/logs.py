"""A run's logs, one format for every task: `metrics.jsonl` (one JSON object per logged train step and per
evaluation), `samples.jsonl` (what a task shows at each evaluation), TensorBoard, and the lines printed under the
progress bar. A resumed run drops what the killed run logged after its checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from accelerate import Accelerator


class RunLog:
    """Writes on the main process only; every rank may call it."""

    def __init__(self, out: Path, accelerator: Accelerator):
        self.out, self.accelerator = out, accelerator

    def start(self, step: int, config_yaml: str) -> None:
        """Create the output folder, clear half-written checkpoints, cut the logs back to `step`, open TensorBoard."""
        acc = self.accelerator
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in self.out.glob(".*.tmp"):  # half-written checkpoints of a killed run
                shutil.rmtree(stale, ignore_errors=True)
            (self.out / "train_config.yaml").write_text(config_yaml)
            for name in ("metrics.jsonl", "samples.jsonl"):
                path = self.out / name
                if path.is_file():
                    lines = [line for line in path.read_text().splitlines()
                             if line.strip() and json.loads(line)["step"] <= step]
                    path.write_text("".join(line + "\n" for line in lines))
        acc.init_trackers("tensorboard", init_kwargs={"tensorboard": {"purge_step": step + 1} if step else {}})
        if acc.is_main_process:
            self.tensorboard().add_text("config", f"```\n{config_yaml}\n```", step)

    def tensorboard(self) -> Any:
        return self.accelerator.get_tracker("tensorboard", unwrap=True)

    def write(self, record: dict[str, Any], file: str = "metrics.jsonl") -> None:
        if self.accelerator.is_main_process:
            with (self.out / file).open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def scalars(self, prefix: str, record: dict[str, Any], step: int) -> None:
        self.accelerator.log({f"{prefix}/{k}": v for k, v in record.items()
                              if k not in ("step", "split") and isinstance(v, (int, float))}, step=step)

    def print(self, text: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(text)

    def samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """A task's samples at an evaluation (e.g. {image, caption, reference}): samples.jsonl, printed, TensorBoard."""
        if not samples or not self.accelerator.is_main_process:
            return
        lines = []
        for sample in samples:
            self.write({"step": step, **sample}, "samples.jsonl")
            lines.append("  " + ", ".join(f"{k}: {v!r}" for k, v in sample.items()))
        self.print(f"samples at step {step}:\n" + "\n".join(lines))
        self.tensorboard().add_text("samples", "\n\n".join(lines), step)
