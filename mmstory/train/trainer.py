"""Train or fine-tune a StoryModel on paired image-text data, with Hugging Face Accelerate as the distributed engine.

    mmstory train --config tiny [--resume] [--output-dir DIR] [--max-steps N] [--set optim.lr.bridge=1e-3]
    torchrun --nproc_per_node 2 -m mmstory.train --config ...          (or: accelerate launch --multi_gpu ...)

One process per device; `batch_size` is per process. The losses are those of the global batch however it is split
(`mmstory.losses`: contrastive features gathered from every process, token means over the global batch), and the dev
metrics are over the whole dev set, so 1, 2 or 8 processes with the same global batch train the same model. The data
order is fixed by (seed, epoch) and a checkpoint records the epoch and the step within it, so a resumed run continues
exactly: it ends with the weights an uninterrupted run would have had. Tested: one process, and DDP with 2 CPU
processes over gloo (GPUs go through the same Accelerate calls); the checkpoint code does not gather FSDP/DeepSpeed-
sharded states. Relative paths in a config (data, cache, output) resolve against the current working directory; the
shipped configs are meant to be run from the repository root.

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
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from mmstory.config import to_yaml
from mmstory.data import Skipped, records_fingerprint
from mmstory.model import WEIGHTS_NAME, StoryModel
from mmstory.train.checkpoints import (  # noqa: F401 - re-exported: the checkpoint helpers were defined here
    CheckpointMixin,
    TrainState,
    _replace_dir,
    _rng_state,
    _set_rng_state,
    _write_json_atomic,
    latest_checkpoint,
    weights_digest,
)
from mmstory.train.config import (  # noqa: F401 - re-exported: the configuration was defined here
    CONFIG_DIR,
    DEFAULT_LR,
    LOSSES,
    OBJECTIVES,
    PART_OF,
    PARTS,
    PRECISIONS,
    SCHEDULES,
    SCORES,
    DataConfig,
    DataSource,
    ModelSection,
    OptimConfig,
    TrainConfig,
    _task,
    build_configs,
    move_loss_weights,
    packaged_configs,
    resolve_config,
)
from mmstory.train.dev_eval import DevEvalMixin
from mmstory.train.features import FeatureCache
from mmstory.train.inputs import Split, TrainDataMixin, _model_inputs, caption_features, read_source  # noqa: F401
from mmstory.train.scst import SelfCriticalMixin, scst_reward


# --------------------------------------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------------------------------------
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
# The trainer
# --------------------------------------------------------------------------------------------------------------------
class Trainer(TrainDataMixin, CheckpointMixin, DevEvalMixin, SelfCriticalMixin):
    """Owns the run: model, data, optimiser, schedule, logs and checkpoints; `fit()` trains and returns the report.

    The loop and the logs are here; the splits and feature caches (`mmstory.train.inputs`), checkpoints
    (`mmstory.train.checkpoints`), dev evaluation (`mmstory.train.dev_eval`) and the self-critical step
    (`mmstory.train.scst`) are mixed in from their own modules."""

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
        self.model = StoryModel(*build_configs(config.model), loss=config.loss)
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
            self.model.set_distractors(self._distractor_features(self.model.config.caption_distractors))
        self.reward = scst_reward(config, self.model, self.train_split.records)

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

    # --- logging ---------------------------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any], file: str = "metrics.jsonl") -> None:
        if self.accelerator.is_main_process:
            with (self.out / file).open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def _print(self, text: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(text)

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
