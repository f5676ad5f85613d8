"""The trainer: config I/O, optimiser groups and schedule, real training runs (feature cache, bad data, early stopping),
a SIGKILLed run resumed to the same weights, a real 2-process distributed run, and 2-process runs that train, log and
evaluate as one process with the same global batch."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FLICKR8K, ROOT, make_photo
from PIL import Image
from safetensors.torch import load_file

from mmstory import StoryModel, create_model
from mmstory.config import to_yaml
from mmstory.eval.metrics import caption_scores
from mmstory.losses import StoryLoss
from mmstory.train.trainer import (
    DEFAULT_LR,
    TrainConfig,
    Trainer,
    freeze_unused_heads,
    lr_factor,
    main,
    param_groups,
    train,
)

TINY = ROOT / "mmstory" / "configs" / "tiny.yaml"


def write_dataset(folder: Path, count: int) -> Path:
    """`count` generated photos with two captions each, as images/ + captions.csv."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = ["image,caption"]
    for i in range(count):
        make_photo(i, size=(48, 36)).save(folder / "images" / f"p{i}.jpg")
        rows += [f"p{i}.jpg,a photo with stripes number {i % 4}", f"p{i}.jpg,stripes and noise {i % 4}"]
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    return folder / "captions.csv"


def tiny_config(csv: Path, output_dir: Path, *overrides: str) -> TrainConfig:
    return TrainConfig.load(TINY, [f"data.train.path={csv}", f"output_dir={output_dir}", "progress=false",
                                   *overrides])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------------------------------
# Configuration, optimiser, schedule
# --------------------------------------------------------------------------------------------------------------------
def test_config_yaml_round_trip_and_overrides(tmp_path: Path):
    config = TrainConfig.load(TINY, ["optim.lr.bridge=0.01", "data.dev.path=dev.csv", "model.overrides.embed_dim=16"])
    assert config.model.name == "tiny" and config.optim.lr["bridge"] == 0.01
    assert config.optim.lr["writer"] == DEFAULT_LR["writer"]  # parts not named keep their default rate
    assert config.data.dev.path == "dev.csv" and config.data.dev.split is None
    (tmp_path / "saved.yaml").write_text(to_yaml(config))
    assert TrainConfig.load(tmp_path / "saved.yaml") == config
    with pytest.raises(ValueError, match="unknown DataConfig field"):
        TrainConfig.load(TINY, ["data.shuffle=true"])
    with pytest.raises(ValueError, match="unknown part"):
        TrainConfig.load(TINY, ["optim.lr.bridges=0.1"])
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig.load(TINY, ["mixed_precision=fp8"])
    assert TrainConfig.load(TINY, ["optim.eps=1e-8"]).optim.eps == 1e-8  # YAML 1.1 reads 1e-8 as a string
    with pytest.raises(ValueError, match="expected a number, got 'small'"):
        TrainConfig.load(TINY, ["optim.eps=small"])
    # YAML 1.1 reads `no` as False: a text field gets the word back, a flag stays a flag
    loaded = TrainConfig.load(TINY, ["mixed_precision=no", "progress=no"])
    assert (loaded.mixed_precision, loaded.progress) == ("no", False)
    (tmp_path / "no.yaml").write_text(TINY.read_text().replace('mixed_precision: "no"', "mixed_precision: no"))
    assert TrainConfig.load(tmp_path / "no.yaml").mixed_precision == "no"


@pytest.mark.parametrize("name", ["flickr8k", "flickr8k_scst", "flickr8k_bridge", "flickr8k_heads"])
def test_flickr8k_configs_point_at_the_shared_data(name):
    config = TrainConfig.load(ROOT / "mmstory" / "configs" / f"{name}.yaml")
    assert config.model.name == "mmstory-small" and config.data.use_feature_cache
    if name == "flickr8k_scst":  # stage 1b starts from stage 1's best model and trains the caption decoder alone
        assert config.caption_objective == "scst" and config.model.init_from == "runs/flickr8k/best"
        assert config.model.overrides == {"contrastive_heads": 1, "text_head_hidden": 1024}
        assert config.loss == StoryLoss(contrastive_weight=0.0, caption_weight=0.0)
    if name != "flickr8k_heads":  # stages 1, 1b and 2 keep the one 1,024-wide head they were tuned with (reproducible)
        assert (config.model.overrides["contrastive_heads"], config.model.overrides["text_head_hidden"]) == (1, 1024)
    if name == "flickr8k_heads":  # the contrastive heads alone, as many as the registry says
        assert config.model.overrides == {} and config.loss == StoryLoss(caption_weight=0.0, caption_decoder_weight=0.0)
    if not (FLICKR8K / "captions.csv").is_file():
        pytest.skip("../shared/data/flickr8k is not present on this machine")
    for source in (config.data.train, config.data.dev):
        for path in (source.path, source.split):
            assert (ROOT / path).resolve().is_file(), path  # relative to the repository root, where it is run


def test_lr_schedule_warmup_then_decay():
    cosine = [lr_factor(s, 4, 20, "cosine", 0.1) for s in range(21)]
    assert cosine[0] == pytest.approx(1 / 5) and cosine[3] == pytest.approx(4 / 5) and cosine[4] == 1.0
    assert all(a >= b for a, b in zip(cosine[4:], cosine[5:])) and cosine[20] == pytest.approx(0.1)
    assert cosine[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    linear = [lr_factor(s, 0, 10, "linear", 0.0) for s in range(11)]
    assert linear[5] == pytest.approx(0.5) and linear[10] == 0.0
    assert lr_factor(50, 2, 10, "constant", 0.0) == 1.0


def test_param_groups_per_part(tiny_model):
    lrs = {**DEFAULT_LR, "bridge": 1.0, "caption_decoder": 2.0, "projections": 3.0}
    groups = {g["name"]: g for g in param_groups(tiny_model, lrs, weight_decay=0.1)}
    assert set(groups) == {"bridge", "bridge/no_decay", "caption_decoder", "caption_decoder/no_decay", "projections",
                           "projections/no_decay"}  # frozen vision/text/decoder have no group
    assert groups["bridge"]["lr"] == 1.0 and groups["caption_decoder/no_decay"]["lr"] == 2.0
    assert groups["projections/no_decay"]["params"] == [tiny_model.logit_scale]
    assert groups["projections"]["weight_decay"] == 0.1 and groups["bridge/no_decay"]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups.values()) == sum(p.requires_grad for p in tiny_model.parameters())

    torch.manual_seed(0)
    lora = create_model("tiny", caption_weight=0.0)
    lora.config.writer.train = "full"
    lora._set_train_mode("writer", lora.config.writer)
    freeze_unused_heads(lora)
    names = {g["name"] for g in param_groups(lora, DEFAULT_LR, 0.0)}
    assert "writer" in names and not any(n.startswith("bridge") for n in names)


# --------------------------------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------------------------------
def test_prepare_only_fills_the_caches_and_trains_nothing(tmp_path: Path, capsys):
    csv = write_dataset(tmp_path / "data", 6)
    config = tmp_path / "config.yaml"
    config.write_text(TINY.read_text())
    cache = tmp_path / "cache"
    argv = ["--config", str(config), "--output-dir", str(tmp_path / "run"), "--no-progress", "--prepare-only",
            "--set", f"data.train.path={csv}", "--set", f"data.dev.path={csv}", "--set", "data.use_feature_cache=true",
            "--set", f"data.feature_cache_dir={cache}"]
    assert main(argv) == 0
    assert "train: 6 images encoded" in capsys.readouterr().out
    assert list(cache.glob("*/shard-*.safetensors")) and list(cache.glob("text-*/*.safetensors"))
    assert not (tmp_path / "run").exists()
    assert main(argv) == 0 and "dev: 0 images encoded, 6 reused" in capsys.readouterr().out


def test_train_from_feature_cache(tmp_path: Path):
    csv = write_dataset(tmp_path / "data", 8)
    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(TINY.read_text())
    argv = ["--config", str(config), "--output-dir", str(out), "--max-steps", "4", "--no-progress",
            "--set", f"data.train.path={csv}", "--set", f"data.dev.path={csv}", "--set", "data.use_feature_cache=true",
            "--set", f"data.feature_cache_dir={tmp_path / 'cache'}", "--set", "eval_every=2",
            "--set", "model.overrides.max_caption_tokens=8"]
    assert main(argv) == 0

    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "completed" and report["steps"] == 4 and report["world_size"] == 1
    assert report["feature_cache"]["train"]["encoded"] == 8 and report["feature_cache"]["dev"]["reused"] == 8
    assert report["feature_cache"]["train_text"] == {"captions": 8, "encoded": 8,
                                                     "seconds": report["feature_cache"]["train_text"]["seconds"]}
    assert report["feature_cache"]["dev_text"]["encoded"] == 0  # the same captions: the train run's file
    assert report["bad_items"] == [] and report["samples_per_second"] > 0
    assert report["best"]["value"] == min(r["loss"] for r in read_jsonl(out / "metrics.jsonl")
                                             if r["split"] == "dev")
    metrics = read_jsonl(out / "metrics.jsonl")
    train_rows = [r for r in metrics if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4] and [r["step"] for r in metrics if r["split"] == "dev"] == [
        2, 4]
    assert {"loss", "contrastive_loss", "caption_loss", "caption_decoder_loss", "lr/bridge", "grad_norm",
            "samples_per_second"} <= set(train_rows[0])
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 4 and {"step", "image", "caption", "reference"} <= set(samples[0])
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert yaml.safe_load((out / "train_config.yaml").read_text())["max_steps"] == 4

    best = StoryModel.from_pretrained(out / "best")  # a normal model directory
    final = StoryModel.from_pretrained(out / "checkpoint-4")
    assert best.config.max_caption_tokens == 8
    assert (out / "latest").read_text().strip() == "checkpoint-4"
    assert set(final.trained_state_dict()) == set(load_file(str(out / "checkpoint-4" / "model.safetensors")))
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(TrainConfig.load(config, [f"data.train.path={csv}", f"output_dir={out}"]))


def _bad_dataset(folder: Path) -> tuple[Path, dict[str, str]]:
    """Good images in every odd mode, and each kind of bad item; returns the CSV and {item: expected reason part}."""
    images = folder / "images"
    images.mkdir(parents=True)
    photo = make_photo(1, size=(40, 30))
    photo.convert("CMYK").save(images / "cmyk.jpg")
    photo.convert("L").save(images / "gray.png")
    photo.convert("RGBA").save(images / "alpha.png")
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(images / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    photo.save(images / "rotated.jpg", exif=exif.tobytes())
    for i in range(5):
        make_photo(10 + i, size=(40, 30)).save(images / f"good{i}.jpg")
    make_photo(2, size=(40, 30)).save(images / "whitespace.jpg")
    (images / "empty.jpg").write_bytes(b"")
    full = images / "good0.jpg"
    (images / "truncated.jpg").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    (images / "text.jpg").write_text("this is a text file, not a picture\n")
    (images / "bomb.png").write_bytes(_png_header(20000, 20000))
    good = ["cmyk.jpg", "gray.png", "alpha.png", "palette.png", "rotated.jpg"] + [f"good{i}.jpg" for i in range(5)]
    bad = ["missing.jpg", "empty.jpg", "truncated.jpg", "text.jpg", "bomb.png"]
    rows = ["image,caption"] + [f"{name},a picture called {name}" for name in good + bad]
    rows += ["good1.jpg,   ", "whitespace.jpg,  ", "whitespace.jpg,"]
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    expected = {"missing.jpg": "no such file", "empty.jpg": "empty", "truncated.jpg": "truncated",
                "text.jpg": "not a readable image", "bomb.png": "too large", "whitespace.jpg": "no non-empty caption",
                "whitespace.jpg caption #0": "empty caption", "whitespace.jpg caption #1": "empty caption",
                "good1.jpg caption #1": "empty caption"}
    return folder / "captions.csv", {str(images / k): v for k, v in expected.items()}


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_trainer_fills_the_distractor_images_without_touching_the_run(tmp_path: Path):
    csv = write_dataset(tmp_path / "data", 6)
    banks, rng = {}, {}
    cached = ["data.use_feature_cache=true", f"data.feature_cache_dir={tmp_path / 'cache'}"]
    for name, extra in (("none", []), ("pixels", ["model.overrides.caption_distractors=4"]),
                        ("cache_build", cached),  # encodes the cache; the next two find it
                        ("cache_none", cached), ("cache", ["model.overrides.caption_distractors=4", *cached])):
        trainer = Trainer(tiny_config(csv, tmp_path / name, *extra))
        rng[name] = torch.get_rng_state()
        model = trainer.accelerator.unwrap_model(trainer.model)
        banks[name] = model.distractor_pooled.clone() if model.has_distractors() else None
    assert banks["none"] is None and banks["pixels"].shape[0] == 4
    assert torch.allclose(banks["pixels"], banks["cache"], atol=1e-2)  # the same 4 images; the cache is fp16
    assert torch.equal(rng["none"], rng["pixels"]) and torch.equal(rng["cache_none"], rng["cache"])  # same runs
    assert torch.equal(rng["cache_build"], rng["cache_none"])  # building the cache draws nothing from the RNG either
    with pytest.raises(ValueError, match="needs a frozen vision encoder"):  # features taken once would go stale
        Trainer(tiny_config(csv, tmp_path / "lora", "model.overrides.caption_distractors=4",
                            "model.overrides.vision={spec: 'timm:test_efficientnet', pretrained: false, train: full}"))


@pytest.mark.parametrize("use_cache", [False, True], ids=["pixels", "feature-cache"])
def test_bad_data_is_skipped_and_reported(tmp_path: Path, use_cache: bool):
    csv, expected = _bad_dataset(tmp_path / "data")
    config = tiny_config(csv, tmp_path / "run", f"data.dev.path={csv}", "max_steps=2", "batch_size=4",
                         f"data.use_feature_cache={use_cache}", f"data.feature_cache_dir={tmp_path / 'cache'}",
                         "data.num_workers=1", "num_sample_captions=0")
    report = train(config)  # the dev pass visits every image, so every bad one is met
    assert report["status"] == "completed"
    reasons = {item["item"]: item["reason"] for item in report["bad_items"]}
    assert set(reasons) == set(expected) and report["num_bad_items"] == len(expected)
    for item, part in expected.items():
        assert part in reasons[item], (item, reasons[item])
    assert json.loads((tmp_path / "run" / "report.json").read_text())["bad_items"] == report["bad_items"]


def test_early_stopping_on_dev_loss(tmp_path: Path):
    csv = write_dataset(tmp_path / "data", 8)
    config = tiny_config(csv, tmp_path / "run", f"data.dev.path={csv}", "data.use_feature_cache=true",
                         f"data.feature_cache_dir={tmp_path / 'cache'}", "max_steps=20", "eval_every=1",
                         "early_stopping_patience=2", "num_sample_captions=0",
                         "optim.lr={bridge: 0.0, caption_decoder: 0.0, projections: 0.0}")
    report = train(config)  # no learning: the dev loss never improves after the first evaluation
    assert report["status"] == "early_stopped" and report["steps"] == 3 and report["best"]["step"] == 1
    assert (tmp_path / "run" / "checkpoint-3").is_dir()


def test_best_checkpoint_follows_the_chosen_dev_loss(tmp_path: Path):
    csv = write_dataset(tmp_path / "data", 8)
    config = tiny_config(csv, tmp_path / "run", f"data.dev.path={csv}", "data.use_feature_cache=true",
                         f"data.feature_cache_dir={tmp_path / 'cache'}", "max_steps=4", "eval_every=1",
                         "num_sample_captions=0", "best_metric=caption_decoder_loss")
    report = train(config)
    dev = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["split"] == "dev"]
    best = min(dev, key=lambda r: r["caption_decoder_loss"])
    assert report["best"]["value"] == best["caption_decoder_loss"] and report["best"]["step"] == best["step"]
    with pytest.raises(ValueError, match="best_metric"):
        tiny_config(csv, tmp_path / "other", "best_metric=bleu")


def test_dev_cider_from_pixels_leaves_an_undecodable_image_out(tmp_path: Path, monkeypatch):
    import mmstory.train.dev_eval as train_module

    csv = write_dataset(tmp_path / "data", 4)
    (tmp_path / "data" / "images" / "p1.jpg").write_bytes(b"not an image")  # the pixel dataset lends p2 in its place
    scored = []

    def recording_scores(references, captions, **kwargs):
        scored.append(references)
        return caption_scores(references, captions, **kwargs)

    monkeypatch.setattr(train_module, "caption_scores", recording_scores)
    trainer = Trainer(tiny_config(csv, tmp_path / "run", f"data.dev.path={csv}", "best_metric=cider_d"))
    assert trainer.task.dev_eval.cider(trainer.task.model) >= 0
    expected = {f"p{i}.jpg": [f"a photo with stripes number {i % 4}", f"stripes and noise {i % 4}"] for i in (0, 2, 3)}
    assert sorted(map(sorted, scored[0])) == sorted(map(sorted, expected.values()))  # p2 once, p1 not at all


def test_self_critical_stage_trains_the_caption_decoder_and_keeps_the_best_dev_cider(tmp_path: Path):
    csv = write_dataset(tmp_path / "data", 8)
    common = [f"data.dev.path={csv}", "data.use_feature_cache=true", f"data.feature_cache_dir={tmp_path / 'cache'}",
              "num_sample_captions=0"]
    train(tiny_config(csv, tmp_path / "xe", *common, "max_steps=6", "model.overrides={caption_weight: 0.0}"))
    stage = [*common, f"model.init_from={tmp_path / 'xe' / 'best'}", "caption_objective=scst", "scst_samples=3",
             "best_metric=cider_d", "scst_discriminability=0.5",
             "loss={caption_weight: 0.0, contrastive_weight: 0.0}"]
    before = StoryModel.from_pretrained(tmp_path / "xe" / "best").trained_state_dict()
    report = train(tiny_config(csv, tmp_path / "scst", *stage, "max_steps=4", "eval_every=2"))
    after = StoryModel.from_pretrained(tmp_path / "scst" / "checkpoint-4").trained_state_dict()
    changed = {name.split(".")[0] for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"caption_decoder"}  # the other heads are frozen in this stage
    records = read_jsonl(tmp_path / "scst" / "metrics.jsonl")
    train_rows = [r for r in records if r["split"] == "train"]
    assert len(train_rows) == 4 and all(r["sample_cider_d"] >= 0 for r in train_rows)
    assert all(-math.inf < r["sample_image_logprob"] <= 0 for r in train_rows)  # log p(own image | sample)
    dev = [r for r in records if r["split"] == "dev"]
    assert [r["step"] for r in dev] == [2, 4] and all(r["cider_d"] >= 0 for r in dev)
    best = max(dev, key=lambda r: r["cider_d"])  # a score: higher is better, the first of equals is kept
    assert report["best"] == {"step": best["step"], "metric": "cider_d", "value": best["cider_d"],
                              "path": str(tmp_path / "scst" / "best")}
    with pytest.raises(ValueError, match="caption decoder alone"):
        Trainer(tiny_config(csv, tmp_path / "bad", *common, "caption_objective=scst"))
    with pytest.raises(ValueError, match="scst_samples"):
        tiny_config(csv, tmp_path / "bad", "caption_objective=scst", "scst_samples=1")
    with pytest.raises(ValueError, match="caption_objective"):
        tiny_config(csv, tmp_path / "bad", "caption_objective=rl")


# --------------------------------------------------------------------------------------------------------------------
# Resume after SIGKILL
# --------------------------------------------------------------------------------------------------------------------
def _wait_for_checkpoint(process: subprocess.Popen, out: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (out / "latest").is_file():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no checkpoint before the run ended: {process.communicate()[0][-3000:]}")
        time.sleep(0.02)


def kill_after_checkpoint(config: TrainConfig, out: Path) -> tuple[Callable[[], None], int]:
    """Start `mmstory train` on `config` into `out` in a subprocess and SIGKILL it once a checkpoint is complete;
    returns a function that resumes it (checking that it resumed from that checkpoint) and the checkpoint's step."""
    path = out.with_name(out.name + ".yaml")
    path.write_text(to_yaml(config))
    command = [sys.executable, "-m", "mmstory.cli", "train", "--config", str(path), "--output-dir", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_checkpoint(process, out)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "report.json").exists(), "the run finished before it could be killed"
    killed_at = int((out / "latest").read_text().split("-")[1])

    def resume() -> None:
        resumed = subprocess.run(command + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert f"resumed from {out / f'checkpoint-{killed_at}'}" in resumed.stdout + resumed.stderr

    return resume, killed_at


def test_resume_after_sigkill_ends_with_the_same_weights(tmp_path: Path):
    csv = write_dataset(tmp_path / "data", 8)
    # Dropout makes the result depend on the restored RNG; accumulation, 2 steps per epoch and checkpoints at odd
    # steps (mid-epoch) make it depend on the restored data position.
    config = tiny_config(csv, tmp_path / "reference", f"data.dev.path={csv}", "max_steps=9", "save_every=3",
                         "batch_size=2", "grad_accum_steps=2", "eval_every=4", "num_sample_captions=0",
                         "model.overrides={bridge: {dropout: 0.1}, caption_decoder: {dropout: 0.1}}")
    out = tmp_path / "killed"
    resume, killed_at = kill_after_checkpoint(config, out)
    assert killed_at in (3, 6)
    reference = train(config)  # uninterrupted, same seed, in this process
    resume()

    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == reference["steps"] == 9
    for name in ("checkpoint-9", "best"):
        ours = load_file(str(out / name / "model.safetensors"))
        theirs = load_file(str(tmp_path / "reference" / name / "model.safetensors"))
        assert set(ours) == set(theirs)
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    assert report["best"]["step"] == reference["best"]["step"]
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"]
    assert steps == list(range(1, 10))  # what the killed run logged after its checkpoint was dropped
    ours = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"]
    theirs = [r["loss"] for r in read_jsonl(tmp_path / "reference" / "metrics.jsonl") if r["split"] == "train"]
    assert ours == pytest.approx(theirs, abs=1e-6)  # the loss at every step


# --------------------------------------------------------------------------------------------------------------------
# Distributed: two real processes on the CPU (gloo), under bf16 autocast
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_process_distributed_run(tmp_path: Path):
    csv = write_dataset(tmp_path / "data", 16)
    config = tiny_config(csv, tmp_path / "run", f"data.dev.path={csv}", "data.use_feature_cache=true",
                         f"data.feature_cache_dir={tmp_path / 'cache'}", "max_steps=8", "batch_size=2",
                         "eval_every=4", "save_every=4", "num_sample_captions=1", "mixed_precision=bf16",
                         "optim.lr={bridge: 0.005, caption_decoder: 0.005, projections: 0.005}")
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(config))
    # torchrun (--standalone: a free port, so parallel test runs do not collide); the trainer picks gloo on a CPU
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mmstory.train", "--config", str(path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-10000:]

    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 8 and report["samples"] == 8 * 2 * 2
    assert report["mixed_precision"] == "bf16"
    digests = report["weights_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks hold identical weights
    losses = [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])
    dev = [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["split"] == "dev"]
    assert len(dev) == 2 and dev[1] < dev[0]
    assert report["feature_cache"]["train"]["encoded"] == 16  # encoded once, by the main process


# --------------------------------------------------------------------------------------------------------------------
# Data-parallel runs train as one process with the global batch
# --------------------------------------------------------------------------------------------------------------------
def _torchrun(processes: int, *args: str) -> subprocess.CompletedProcess:
    """`args` under torchrun with this many CPU processes (gloo), importing this checkout's mmstory."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-10000:]
    return result


@pytest.mark.slow
def test_two_processes_step_as_one_process_with_the_global_batch(tmp_path: Path):
    """The same global batch of 4 (captions of different lengths) in one process or split over two: the same losses
    and the same gradients after data-parallel's averaging, for cross-entropy training (contrastive, captioner and
    caption decoder) and for self-critical training (tests/distributed_step.py)."""
    runs = {}
    for processes in (1, 2):
        _torchrun(processes, str(ROOT / "tests" / "distributed_step.py"), str(tmp_path / f"{processes}.pt"))
        runs[processes] = torch.load(tmp_path / f"{processes}.pt")
    assert runs[2]["world_size"] == 2
    for objective, names in (("xe", {"loss", "contrastive_loss", "caption_loss", "caption_decoder_loss"}),
                             ("scst", {"loss", "caption_decoder_loss"})):
        (one_losses, one_grads), (two_losses, two_grads) = runs[1][objective], runs[2][objective]
        assert set(one_losses) == set(two_losses) == names
        for name in names:
            assert two_losses[name] == pytest.approx(one_losses[name], abs=1e-5), (objective, name)
        assert set(two_grads) == set(one_grads) and one_grads
        for name, grad in one_grads.items():
            torch.testing.assert_close(two_grads[name], grad, rtol=1e-5, atol=1e-5, msg=f"{objective} {name}")
        assert sum(float(g.norm()) for g in one_grads.values()) > 1e-2  # a step that trains something
    assert "logit_scale" in runs[1]["xe"][1] and "caption_decoder.embed.weight" in runs[1]["scst"][1]


@pytest.mark.slow
def test_two_process_training_logs_and_evaluates_as_one_process(tmp_path: Path):
    """The trainer over a global batch of 4: one process of 4 or two of 2 log the same per-step losses and gradient
    norms, and the same dev losses over the whole dev set; CIDEr-D, captioned in shares and gathered, is computed too
    (near 0 here: these captions share almost every word, so it is a weak check of its own)."""
    csv = write_dataset(tmp_path / "data", 12)
    logs = {}
    for processes in (1, 2):
        config = tiny_config(csv, tmp_path / f"run{processes}", f"data.dev.path={csv}", "data.use_feature_cache=true",
                             f"data.feature_cache_dir={tmp_path / 'cache'}", f"batch_size={4 // processes}",
                             "max_steps=2", "eval_every=1", "save_every=null", "num_sample_captions=0",
                             "best_metric=cider_d", "optim.warmup_steps=0")
        path = tmp_path / f"config{processes}.yaml"
        path.write_text(to_yaml(config))
        _torchrun(processes, "-m", "mmstory.train", "--config", str(path))
        logs[processes] = read_jsonl(tmp_path / f"run{processes}" / "metrics.jsonl")
    one, two = logs[1], logs[2]
    assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in two]
    assert [r["split"] for r in one].count("dev") == 2 and two[0]["world_size"] == 2
    names = ("loss", "contrastive_loss", "caption_loss", "caption_decoder_loss")
    for a, b in zip(one, two):
        for name in names + (("grad_norm",) if a["split"] == "train" else ("cider_d",)):
            assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-5), (a["step"], a["split"], name)
    assert all(r["contrastive_loss"] > 0.1 and r["caption_loss"] > 0.1 for r in one)
