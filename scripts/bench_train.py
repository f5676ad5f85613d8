"""Training throughput on Flickr8k with and without the feature cache, and the time to encode the cache.

    python scripts/bench_train.py [--config mmstory/configs/flickr8k.yaml] [--images 320] [--steps 6] [--batch-size 16]

Runs the real trainer on the first `--images` training images with the config's model (mmstory-small: frozen packaged
parts, bf16 autocast), from pixels (JPEG decode + EfficientNet-Lite0 every step) and from a freshly encoded feature
cache, for two objectives whatever the config says: every loss on (`loss.caption_weight: 1`: the caption loss runs the
frozen SmolLM2 forward and backward, which dominates a step), and the CPU-cheap one without it (`caption_weight: 0`:
contrastive + caption decoder only), where the image encoder is a large share of a step. samples/s is the batch size
over the median step time (the first step, lazy set-up, left out): on a shared machine other processes' bursts
inflate single steps, not the median.
The cache is encoded for `--images` images only; the time for all of Flickr8k is extrapolated from that rate.
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
from mmstory.train.trainer import TrainConfig, train

OBJECTIVES = {"all losses (LM caption loss on)": ["loss.caption_weight=1.0"],
              "no LM (caption decoder + con.)": ["loss.caption_weight=0.0"]}


def run(args: argparse.Namespace, workdir: Path, name: str, use_cache: bool, overrides: list[str]) -> dict:
    config = TrainConfig.load(args.config, [
        f"output_dir={workdir / name}", f"max_steps={args.steps + 1}", f"batch_size={args.batch_size}",
        "grad_accum_steps=1", "data.dev=null", "eval_every=null", "save_every=null", "log_every=1", "progress=false",
        f"data.train.limit={args.images}", f"data.use_feature_cache={str(use_cache).lower()}",
        f"data.feature_cache_dir={workdir / 'cache'}", f"data.num_workers={args.num_workers}", *overrides])
    report = train(config)
    rows = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    seconds = [args.batch_size / r["samples_per_second"] for r in rows if r["split"] == "train"][1:]
    median = statistics.median(seconds)
    return {"samples_per_second": args.batch_size / median, "seconds": (min(seconds), median, max(seconds)),
            "cache": report["feature_cache"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="mmstory/configs/flickr8k.yaml")
    parser.add_argument("--images", type=int, default=320, help="training images used (and encoded for the cache)")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run (plus one warm-up)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--workdir", help="where runs and the cache go (default: a temporary directory)")
    args = parser.parse_args(argv)

    config = TrainConfig.load(args.config)
    total_images = sum(len(load_records(s.path, s.format, s.split, s.image_root))
                       for s in (config.data.train, config.data.dev) if s is not None)
    load_before = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory(prefix="mmstory-bench-") as tmp:
        workdir = Path(args.workdir or tmp)
        for i, (objective, overrides) in enumerate(OBJECTIVES.items()):
            for use_cache in (False, True):  # the first cached run encodes the cache, the second reuses it
                name = f"{i}-{'cached' if use_cache else 'pixels'}"
                results[objective, use_cache] = run(args, workdir, name, use_cache, overrides)

    encode = results[next(iter(OBJECTIVES)), True]["cache"]["train"]
    rate = encode["encoded"] / encode["seconds"]
    print(f"\nmmstory training benchmark: {args.config}, model {config.model.name}, mixed precision "
          f"{config.mixed_precision}, batch {args.batch_size}, {args.images} images, {args.steps} timed steps per run")
    print(f"machine: {os.cpu_count()} CPU(s), torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other processes share the CPUs)")
    print(f"{'objective':<32}{'pixels samples/s':>18}{'cache samples/s':>18}{'speed-up':>10}   "
          "s/step min/median/max (pixels; cache)")
    for objective in OBJECTIVES:
        pixels, cached = results[objective, False], results[objective, True]
        spread = "; ".join("/".join(f"{s:.2f}" for s in r["seconds"]) for r in (pixels, cached))
        print(f"{objective:<32}{pixels['samples_per_second']:>18.2f}{cached['samples_per_second']:>18.2f}"
              f"{cached['samples_per_second'] / pixels['samples_per_second']:>9.2f}x   {spread}")
    print(f"cache encoding: {encode['encoded']} images in {encode['seconds']:.1f} s = {rate:.1f} images/s; "
          f"all {total_images} Flickr8k images (train + dev): about {total_images / rate / 60:.1f} min (extrapolated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
