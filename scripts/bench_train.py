"""Training throughput on Flickr8k with and without the feature cache, and the time to encode the cache.

    python scripts/bench_train.py [--config configs/flickr8k.yaml] [--images 320] [--steps 10]

Runs the real trainer twice on the first `--images` training images (default model: mmstory-small, frozen packaged
parts, bf16 autocast, the config's batch size): once from pixels (JPEG decode + EfficientNet-Lite0 every step) and
once from a freshly encoded feature cache. The first step of each run is left out of samples/s (lazy initialisation).
The cache is encoded for `--images` images only; the time for the whole of Flickr8k is extrapolated from that rate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from mmstory.data import load_records
from mmstory.train import TrainConfig, train


def run(config_path: str, workdir: Path, name: str, use_cache: bool, args: argparse.Namespace) -> dict:
    overrides = [f"output_dir={workdir / name}", f"max_steps={args.steps}", "data.dev=null", "eval_every=null",
                 "save_every=null", "log_every=1", "progress=false", f"data.train.limit={args.images}",
                 f"data.use_feature_cache={str(use_cache).lower()}", f"data.feature_cache_dir={workdir / 'cache'}",
                 f"data.num_workers={args.num_workers}"]
    if args.batch_size:
        overrides.append(f"batch_size={args.batch_size}")
    config = TrainConfig.load(config_path, overrides)
    report = train(config)
    rows = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    batch = config.batch_size * config.grad_accum_steps
    seconds = [batch / r["samples_per_second"] for r in rows if r["split"] == "train"][1:]
    return {"samples_per_second": len(seconds) * batch / sum(seconds), "step_seconds": statistics.median(seconds),
            "batch_size": batch, "steps": len(seconds), "cache": report["feature_cache"].get("train"),
            "bad_items": report["num_bad_items"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/flickr8k.yaml")
    parser.add_argument("--images", type=int, default=320, help="training images used (and encoded for the cache)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--batch-size", type=int, help="override the config's batch size")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--workdir", help="where runs and the cache go (default: a temporary directory)")
    args = parser.parse_args(argv)

    config = TrainConfig.load(args.config)
    total_images = sum(len(load_records(s.path, s.format, s.split, s.image_root))
                       for s in (config.data.train, config.data.dev) if s is not None)
    with tempfile.TemporaryDirectory(prefix="mmstory-bench-") as tmp:
        workdir = Path(args.workdir or tmp)
        pixels = run(args.config, workdir, "pixels", False, args)
        cached = run(args.config, workdir, "cached", True, args)

    encode = cached["cache"]
    rate = encode["encoded"] / encode["seconds"]
    print(f"\nmmstory training benchmark: {args.config}, model {config.model.name}, "
          f"mixed precision {config.mixed_precision}, batch {pixels['batch_size']}, {args.images} images")
    print(f"machine: {os.cpu_count()} CPU(s), torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'':<28}{'samples/s':>12}{'s/step':>10}")
    print(f"{'from pixels (no cache)':<28}{pixels['samples_per_second']:>12.2f}{pixels['step_seconds']:>10.2f}")
    print(f"{'from the feature cache':<28}{cached['samples_per_second']:>12.2f}{cached['step_seconds']:>10.2f}")
    print(f"speed-up from the cache: {cached['samples_per_second'] / pixels['samples_per_second']:.2f}x "
          f"({pixels['steps']} timed steps each)")
    print(f"cache encoding: {encode['encoded']} images in {encode['seconds']:.1f} s = {rate:.1f} images/s; "
          f"all {total_images} Flickr8k images (train + dev): about {total_images / rate / 60:.1f} min (extrapolated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
