"""The one training loop, for every task, with Hugging Face Accelerate as the distributed engine.

    mmstory train --config tiny [--resume] [--output-dir DIR] [--max-steps N] [--set optim.lr.bridge=1e-3]
    mmstory train --config writer_vist                                  (task: writer: the story writer's fine-tuning)
    torchrun --nproc_per_node 2 -m mmstory.train --config ...          (or: accelerate launch --multi_gpu ...)

A task (`mmstory.train.task.Task`: `captioning_task.CaptioningTask`, contrastive + captioners or the caption decoder's
self-critical phase; `writer.WriterTask`, the story writer with LoRA or in full) owns its model, batches, loss and dev
evaluation. The loop here owns the optimiser and schedule, gradient accumulation, mixed precision and devices,
data-parallel wrapping, logs (`mmstory.train.logs`), checkpoints and resume (`mmstory.train.checkpoints`), the dev
evaluations, best/ and early stopping, and the report.

One process per device; `batch_size` is per process. The captioning losses are those of the global batch however it
is split (`mmstory.losses`: contrastive features gathered from every process, token means over the global batch), and
its dev metrics are over the whole dev set, so 1, 2 or 8 processes with the same global batch train the same model.
The data order is fixed by (seed, epoch) and a checkpoint records the epoch and the step within it, so a resumed run
continues exactly: it ends with the weights an uninterrupted run would have had. Tested: one process, and DDP with 2
CPU processes over gloo (GPUs go through the same Accelerate calls); the checkpoint code does not gather FSDP/
DeepSpeed-sharded states. Relative paths in a config (data, cache, output) resolve against the current working
directory; the shipped configs are meant to be run from the repository root.

Outputs in `output_dir`: `checkpoint-<step>/` (the last `keep_checkpoints`, each loadable with
`StoryModel.from_pretrained`), `best/` (best dev metric), `metrics.jsonl` (one JSON object per logged train step and
per evaluation), `samples.jsonl` (the task's samples at each evaluation), `tensorboard/`, `train_config.yaml` and, at
the end, `report.json` (final metrics, throughput, the task's own report and every skipped data item with its reason).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mmstory.config import to_yaml
from mmstory.devices import cpu_multiplies_bf16
from mmstory.model import StoryModel
from mmstory.train.captioning_task import CaptioningTask, freeze_unused_heads
from mmstory.train.checkpoints import (
    CheckpointStore,
    TrainState,
    _set_rng_state,
    _write_json_atomic,
    latest_checkpoint,
    weights_digest,
)
from mmstory.train.config import (  # noqa: F401 - re-exported: the configuration was defined here
    CONFIG_DIR,
    DEFAULT_LR,
    LOSSES,
    SCORES,
    OptimConfig,
    TrainConfig,
    _task,
    build_configs,
    packaged_configs,
    resolve_config,
)
from mmstory.train.features import FeatureCache
from mmstory.train.inputs import caption_features, read_source
from mmstory.train.logs import RunLog
from mmstory.train.optimizer import lr_factor, param_groups  # noqa: F401 - re-exported
from mmstory.train.task import Task
from mmstory.train.writer import WriterTask


def make_task(config: TrainConfig, accelerator: Any) -> Task:
    """The config's task, built after the run's seed is set (it builds the model and reads the data)."""
    return WriterTask(config, accelerator) if config.task == "writer" else CaptioningTask(config, accelerator)


class Trainer:
    """Owns the run around a task: optimiser, schedule, accumulation, precision, devices, logs and checkpoints;
    `fit()` trains and returns the report."""

    def __init__(self, config: TrainConfig, resume: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config, self.out = config, Path(config.output_dir)
        # Several processes but no GPU (torchrun, `accelerate launch --multi_gpu` on a CPU machine): DDP over gloo.
        cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        self.accelerator = acc = Accelerator(cpu=cpu, mixed_precision=config.mixed_precision,
                                             log_with="tensorboard", project_dir=str(self.out))
        if config.mixed_precision == "bf16" and acc.device.type == "cpu" and not cpu_multiplies_bf16():
            acc.print("mmstory train: this CPU has no bf16 matrix instructions (AMX, AVX512-BF16); bf16 autocast "
                      "runs many times slower than float32 here (mixed_precision: \"no\")")
        checkpoint = latest_checkpoint(self.out) if resume else None
        if resume and checkpoint is None:
            acc.print(f"mmstory train: no checkpoint in {self.out}; starting from scratch")
        if not resume and latest_checkpoint(self.out) is not None:
            raise FileExistsError(f"{self.out} already holds checkpoints; pass --resume to continue that run or "
                                  "choose another --output-dir")
        set_seed(config.seed)
        self.task = make_task(config, acc)
        self.state = TrainState(world_size=acc.num_processes, data_fingerprint=self.task.fingerprint())
        self.rng_to_restore: dict | None = None
        self.last_dev: dict[str, float] | None = None
        opt = config.optim
        self.optimizer = torch.optim.AdamW(self.task.param_groups(opt), betas=tuple(opt.betas), eps=opt.eps)
        self.steps_per_epoch = self.task.micro_batches_per_epoch() // config.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training data make no full optimizer step of {config.batch_size} x "
                             f"{acc.num_processes} process(es) x {config.grad_accum_steps}")
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, opt.warmup_steps, self.total_steps, opt.schedule,
                                                   opt.min_lr_ratio))
        self.checkpoints = CheckpointStore(self.out, acc, config.keep_checkpoints)
        if checkpoint is not None:
            self._resume(checkpoint)
        self.model, self.optimizer = acc.prepare(self.task.module, self.optimizer)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.log = RunLog(self.out, acc)
        self.log.start(self.state.global_step, to_yaml(config))

    def _resume(self, directory: Path) -> None:
        acc = self.accelerator
        saved, self.rng_to_restore = self.checkpoints.load(directory, self.task.model, self.optimizer,
                                                           self.scheduler, self.steps_per_epoch)
        saved.setdefault("world_size", acc.num_processes)
        saved.setdefault("data_fingerprint", self.state.data_fingerprint)
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
        acc.print(f"resumed from {directory} at step {self.state.global_step} (epoch {self.state.epoch}, "
                  f"step {self.state.step_in_epoch} of {self.steps_per_epoch})")

    def _gather_bad_items(self) -> None:
        from accelerate.utils import gather_object

        self.state.bad_items.update({k: v for k, v in self.task.bad_items.items() if k not in self.state.bad_items})
        for item, reason in gather_object(sorted(self.state.bad_items.items())):
            self.state.bad_items.setdefault(item, reason)

    def save_checkpoint(self) -> Path:
        self._gather_bad_items()
        return self.checkpoints.save(self.task.model, self.optimizer, self.scheduler, self.state)

    # --- training --------------------------------------------------------------------------------------------------
    def _train_step(self, batches: list[Any]) -> tuple[dict[str, torch.Tensor], float | None]:
        acc = self.accelerator
        totals: dict[str, torch.Tensor] = {}
        for micro, batch in enumerate(batches):
            sync = micro == len(batches) - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                loss, logged = self.task.loss(self.model, batch)
                acc.backward(loss / len(batches))
            for name, value in logged.items():
                totals[name] = totals.get(name, 0.0) + value / len(batches)
        grad_norm = None
        if self.config.optim.grad_clip:
            grad_norm = float(acc.clip_grad_norm_(self.trainable, self.config.optim.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals, grad_norm

    def fit(self) -> dict[str, Any]:
        acc, cfg, state = self.accelerator, self.config, self.state
        if self.rng_to_restore is not None:
            _set_rng_state(self.rng_to_restore)
        self.model.train()
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=state.global_step, desc="training", unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and acc.is_main_process))
        window: dict[str, torch.Tensor] = {}
        window_steps, window_seconds = 0, 0.0
        last_train: dict[str, float] = {}
        global_batch = cfg.batch_size * acc.num_processes * cfg.grad_accum_steps
        stop = False
        while state.global_step < self.total_steps and not stop:
            batches = self.task.batches(state.epoch, state.step_in_epoch * cfg.grad_accum_steps)
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
                if self.task.has_dev and cfg.eval_every and state.global_step % cfg.eval_every == 0:
                    stop = self._evaluate()
                if (cfg.save_every and state.global_step % cfg.save_every == 0) or stop:
                    self.save_checkpoint()
                if stop:
                    self.log.print(f"early stopping: no dev improvement in {cfg.early_stopping_patience} evaluations")
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
        self.log.write(record)
        self.log.scalars("train", record, state.global_step)
        return record

    def _evaluate(self) -> bool:
        """The task's dev metrics: logged, best/ kept; returns True when early stopping says stop."""
        cfg, state = self.config, self.state
        metrics = self.task.evaluate()
        self.log.samples(state.global_step, self.task.samples())
        state.last_eval_step, self.last_dev = state.global_step, metrics
        value = metrics.get(cfg.best_metric)
        if value is None:
            raise ValueError(f"best_metric {cfg.best_metric!r} is not computed by this run's losses")
        better = (lambda a, b: a > b) if cfg.best_metric in SCORES else (lambda a, b: a < b)
        if state.best_value is None or better(value, state.best_value):
            state.best_value, state.best_step, state.evals_since_best = value, state.global_step, 0
            self.checkpoints.save_best(self.task.model)
        else:
            state.evals_since_best += 1
        self.log.write({"step": state.global_step, "split": "dev", **metrics, "best_value": state.best_value,
                        "epoch": state.epoch})
        self.log.scalars("dev", metrics, state.global_step)
        self.log.print(f"step {state.global_step}: dev loss {metrics['loss']:.4f}, {cfg.best_metric} {value:.4f} "
                       f"(best {state.best_value:.4f} at step {state.best_step})")
        patience = cfg.early_stopping_patience
        return patience is not None and state.evals_since_best >= patience

    def _finish(self, last_train: dict[str, float], early_stopped: bool) -> dict[str, Any]:
        from accelerate.utils import gather_object

        acc, state = self.accelerator, self.state
        if self.task.has_dev and state.last_eval_step != state.global_step:
            self._evaluate()
        elif not self.task.has_dev:
            self.checkpoints.save_best(self.task.model)  # nothing to compare on: the final model is the one to use
        checkpoint = latest_checkpoint(self.out)
        if checkpoint is None or checkpoint.name != f"checkpoint-{state.global_step}":
            checkpoint = self.save_checkpoint()
        else:
            self._gather_bad_items()
        report = {
            "status": "early_stopped" if early_stopped else "completed", "task": self.config.task,
            "steps": state.global_step, "total_steps": self.total_steps, "epoch": state.epoch,
            "world_size": acc.num_processes, "mixed_precision": acc.mixed_precision,
            "final_train": last_train, "final_dev": self.last_dev,
            "best": {"step": state.best_step, "metric": self.config.best_metric, "value": state.best_value,
                     "path": str(self.out / "best")},
            "checkpoint": str(checkpoint),
            "samples_per_second": state.samples / max(state.train_seconds, 1e-9),
            "train_seconds": state.train_seconds, "samples": state.samples, **self.task.report(),
            "num_bad_items": len(state.bad_items),
            "bad_items": [{"item": k, "reason": v} for k, v in sorted(state.bad_items.items())],
            "weights_sha256_per_rank": gather_object([weights_digest(self.task.model)]),
        }
        if acc.is_main_process:
            _write_json_atomic(self.out / "report.json", report)
            self.log.print(f"done: {state.global_step} steps, {report['samples_per_second']:.1f} samples/s, "
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
def prepare_features(config: TrainConfig) -> None:
    """Fill the image (and caption) feature caches for the config's splits, e.g. before parallel stages."""
    model = StoryModel(*build_configs(config.model), loss=config.loss)
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
    config = TrainConfig.load(args.config, args.overrides)
    for name in ("output_dir", "max_steps", "epochs", "batch_size", "seed"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    config.progress = config.progress and not args.no_progress
    if args.prepare_only:
        if config.task != "captioning" or not config.data.use_feature_cache:
            parser.error("--prepare-only needs data.use_feature_cache: true")
        prepare_features(config)
        return 0
    report = train(config, resume=args.resume)
    return 0 if report["status"] in ("completed", "early_stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
