"""The writer task: examples, training in the one loop and its resume (after a SIGKILL, and from the old writer
loop's checkpoint layout), the old flat config layout, and adapters in PEFT's own format."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmstory.config import to_yaml
from mmstory.generation import build_instruction
from mmstory.losses import IGNORE_INDEX
from mmstory.model import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, WEIGHTS_NAME, StoryModel
from mmstory.saving import load_writer_adapters
from mmstory.train.config import CONFIG_DIR, TrainConfig, WriterSection
from mmstory.train.trainer import Trainer, train
from mmstory.train.trainer import main as train_main
from mmstory.train.writer import add_writer_adapters, encode_example, story_budget

STORIES = [
    {"scenes": ["A dog runs on the beach.", "The dog swims."], "words": ["ball"],
     "story": "We took the dog to the beach. He ran after his ball and then swam in the waves."},
    {"scenes": ["A cake on a table.", "A girl blows out candles.", "Children play outside."],
     "story": "It was Anna's birthday. She blew out the candles on her cake. Then we all played in the yard."},
    {"scenes": ["A snowy mountain."], "story": "The mountain was white with snow. We climbed until the sun went down."},
]


@pytest.fixture
def tiny_dir(tiny_model, tmp_path):
    return tiny_model.save_pretrained(tmp_path / "tiny")


@pytest.fixture
def story_files(tmp_path):
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in STORIES * 4))
    dev.write_text("".join(json.dumps(r) + "\n" for r in STORIES[:2]))
    return train, dev


def _config(tiny_dir, story_files, out, **kw) -> TrainConfig:
    train, dev = story_files
    settings = {"task": "writer",
                "writer": {"pretrained": str(tiny_dir), "lora_r": 4, "lora_targets": ["q_proj", "v_proj"]},
                "data": {"train": {"path": str(train)}, "dev": {"path": str(dev)}, "num_workers": 0},
                "optim": {"lr": {"writer": 1e-2}, "warmup_steps": 1, "weight_decay": 0.0},
                "output_dir": str(out), "batch_size": 2, "eval_every": 2, "save_every": 1, "log_every": 1,
                "mixed_precision": "no", "max_steps": 4, "progress": False}
    return TrainConfig.from_dict({**settings, **kw})


def _adapters(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / ADAPTER_WEIGHTS_NAME))


def _train_losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def test_a_training_example_labels_the_story_only(tiny_model):
    record = STORIES[0]
    ids, labels = encode_example(tiny_model, record, max_tokens=1000)
    tok = tiny_model.tokenizer
    story = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(story[:-1]) == tok.decode(tok(record["story"], add_special_tokens=False).input_ids)
    assert story[-1] == tok.eos_token_id and len(ids) == len(labels)
    prompt = tok.decode(ids[: len(ids) - len(story)])
    assert "Photo 1: a dog runs on the beach." in prompt and "Also seen: ball." in prompt
    assert f"about {story_budget(record['story'])} words" in prompt and "<image>" not in prompt


def test_the_request_is_the_one_the_teller_builds():
    text = build_instruction(["A cat on a sofa"], None, None, None, None, 80, None, with_images=False,
                             hints=[["espresso"]])
    assert text.startswith("Write a short story (about 80 words) about this photo.")
    assert text.endswith("Photo 1: a cat on a sofa. Also seen: espresso.")
    # a class of the kind the caption already names is no news, and would give the writer a second cat
    same = build_instruction(["A cat on a sofa"], None, None, None, None, 80, None, with_images=False,
                             hints=[["tabby cat", "espresso"]])
    assert same == text
    # nor is a class whose caption word the caption says: its variety would become a character ("The granny smith
    # was very happy."), its own word a second one
    for caption, hint in (("An apple on the grass", "granny smith"), ("A cheetah in the grass", "cheetah"),
                          ("Two airplanes on a runway", "airliner")):
        line = build_instruction([caption], None, None, None, None, 80, None, with_images=False, hints=[[hint]])
        assert "Also seen" not in line, line
    kept = build_instruction(["A man on a bench"], None, None, None, None, 80, None, with_images=False,
                             hints=[["granny smith"]])
    assert kept.endswith("Also seen: granny smith.")


def test_writer_training_learns_and_resumes_exactly(tiny_dir, story_files, tmp_path):
    straight = Trainer(_config(tiny_dir, story_files, tmp_path / "straight"))
    before = straight.task.evaluate()["loss"]
    report = straight.fit()
    assert report["steps"] == 4 and report["task"] == "writer" and report["best"]["value"] < before
    train(_config(tiny_dir, story_files, tmp_path / "part", max_steps=2))
    resumed = Trainer(_config(tiny_dir, story_files, tmp_path / "part"), resume=True)
    assert resumed.state.global_step == 2
    resumed.fit()
    a, b = _adapters(tmp_path / "straight" / "checkpoint-4"), _adapters(tmp_path / "part" / "checkpoint-4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _train_losses(tmp_path / "part") == pytest.approx(_train_losses(tmp_path / "straight"), abs=1e-6)
    with pytest.raises(FileExistsError, match="resume"):
        Trainer(_config(tiny_dir, story_files, tmp_path / "part"))


def test_writer_training_can_start_from_saved_adapters(tiny_dir, story_files, tmp_path):
    """`init_adapters` teaches a shipped writer more (its LoRA tensors, not fresh ones); other shapes are refused."""
    train(_config(tiny_dir, story_files, tmp_path / "first", max_steps=2))
    saved = load_writer_adapters(tmp_path / "first" / "checkpoint-2")
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # a fresh B is zero: these are not
    writer = {"pretrained": str(tiny_dir), "lora_r": 4, "lora_targets": ["q_proj", "v_proj"],
              "init_adapters": str(tmp_path / "first" / "checkpoint-2")}
    task = Trainer(_config(tiny_dir, story_files, tmp_path / "more", writer=writer)).task
    own = {name: p for name, p in task.model.named_parameters() if "lora_" in name}
    assert own.keys() == saved.keys() and all(torch.equal(p, saved[k]) for k, p in own.items())
    fresh = Trainer(_config(tiny_dir, story_files, tmp_path / "fresh")).task
    assert not all(torch.equal(p, saved[k]) for k, p in fresh.model.named_parameters() if "lora_" in k)
    with pytest.raises(ValueError, match="lora_r and lora_targets"):
        Trainer(_config(tiny_dir, story_files, tmp_path / "wide", writer={**writer, "lora_r": 8}))


def test_an_old_writer_checkpoint_resumes(tiny_dir, story_files, tmp_path):
    """The old writer loop's layout (adapters.safetensors; optimizer.pt = {optimizer, torch RNG}; state.json =
    {step, best, config}; no schedule) resumes as this layout's checkpoint of the same step would."""
    straight = train(_config(tiny_dir, story_files, tmp_path / "straight", eval_every=4))
    train(_config(tiny_dir, story_files, tmp_path / "old", max_steps=2, eval_every=4))
    checkpoint = tmp_path / "old" / "checkpoint-2"
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    optimizer["param_groups"] = [{k: v for k, v in group.items() if k not in ("name", "part", "initial_lr")}
                                 for group in optimizer["param_groups"]]  # the old loop's one plain group
    rng = torch.load(checkpoint / "rng-0.pt", weights_only=True)["torch"]
    adapters = load_writer_adapters(checkpoint)
    for path in checkpoint.iterdir():
        path.unlink()
    (tmp_path / "old" / "latest").unlink()
    save_file(adapters, str(checkpoint / "adapters.safetensors"))
    torch.save({"optimizer": optimizer, "rng": rng}, checkpoint / "optimizer.pt")
    (checkpoint / "state.json").write_text(json.dumps({"step": 2, "best": float("inf"), "config": {}}))

    resumed = Trainer(_config(tiny_dir, story_files, tmp_path / "old", eval_every=4), resume=True)
    assert resumed.state.global_step == 2 and resumed.state.best_value is None
    report = resumed.fit()
    a, b = _adapters(tmp_path / "straight" / "checkpoint-4"), _adapters(tmp_path / "old" / "checkpoint-4")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert report["best"]["value"] == pytest.approx(straight["best"]["value"], abs=1e-6)


def test_the_old_flat_writer_config_reads_into_sections(tmp_path):
    config = TrainConfig.load(CONFIG_DIR / "writer_vist.yaml", ["lr=1e-3"])
    assert config.task == "writer" and config.writer.pretrained == "mmstory-small"
    assert (config.writer.lora_r, config.writer.lora_alpha, config.writer.max_tokens) == (16, 32, 320)
    assert config.data.train.path == "~/.cache/mmstory/stories/vist2/train.jsonl"
    assert config.optim.lr["writer"] == 1e-3 and tuple(config.optim.betas) == (0.9, 0.999)
    assert (config.optim.warmup_steps, config.optim.weight_decay, config.optim.eps) == (10, 0.0, 1e-8)
    assert (config.mixed_precision, config.save_every, config.eval_every, config.log_every) == ("bf16", 10, 50, 5)
    again = TrainConfig.from_dict(yaml_round_trip(config))  # written out, it reads back in the new layout
    assert again == config
    mix = TrainConfig.load(CONFIG_DIR / "writer_mix.yaml")
    assert (mix.max_steps, mix.epochs, mix.writer.max_tokens) == (200, 2, 448)
    more = TrainConfig.load(CONFIG_DIR / "writer_more.yaml")
    assert more.writer.init_adapters == "mmstory-small" and more.writer.lora_r == 16
    with pytest.raises(ValueError, match="writer.train"):
        WriterSection(train="frozen")
    with pytest.raises(ValueError, match="task must be"):
        TrainConfig.from_dict({"task": "captions", "data": {"train": {"path": "x.csv"}}})


def yaml_round_trip(config: TrainConfig) -> dict:
    import yaml

    return yaml.safe_load(to_yaml(config))


def test_mmstory_train_runs_a_writer_config(tiny_dir, story_files, tmp_path):
    train_file, dev = story_files
    config = tmp_path / "writer.yaml"  # the old flat layout, as the shipped writer configs are written
    config.write_text(f"task: writer\nmodel: {tiny_dir}\ntrain: {train_file}\ndev: {dev}\nbatch_size: 3\n"
                      f"lora_r: 2\nlora_targets: [q_proj]\nmixed_precision: 'no'\n")
    assert train_main(["--config", str(config), "--output-dir", str(tmp_path / "run"), "--max-steps", "2",
                       "--no-progress"]) == 0
    loaded = StoryModel.from_pretrained(tmp_path / "run" / "checkpoint-2")
    assert loaded.config.writer.train == "lora" and not loaded.generation_config.story_prefix
    assert StoryModel.from_pretrained(tmp_path / "run" / "best").config.writer.lora_r == 2


def test_the_whole_writer_can_train(tiny_dir, story_files, tmp_path):
    report = train(_config(tiny_dir, story_files, tmp_path / "full", max_steps=2, eval_every=2,
                           writer={"pretrained": str(tiny_dir), "train": "full"}))
    before = StoryModel.from_pretrained(tiny_dir).trained_state_dict()
    after = StoryModel.from_pretrained(tmp_path / "full" / "checkpoint-2")
    assert after.config.writer.train == "full" and report["steps"] == 2
    changed = {k.split(".")[0] for k, v in after.trained_state_dict().items() if k not in before
               or not torch.equal(v, before[k])}
    assert changed == {"writer"}


def test_resume_after_sigkill_ends_as_an_uninterrupted_run(tiny_dir, story_files, tmp_path):
    """A writer run killed (SIGKILL) after a checkpoint and resumed logs the same loss at every step and ends with
    the same adapters as one that ran straight through (LoRA dropout on: the restored RNG matters; 6 steps an epoch
    and checkpoints every 4 steps: the restored position in the epoch does)."""
    from test_train import kill_after_checkpoint

    config = _config(tiny_dir, story_files, tmp_path / "reference", max_steps=40, save_every=4, eval_every=10,
                     writer={"pretrained": str(tiny_dir), "lora_r": 4, "lora_targets": ["q_proj", "v_proj"],
                             "lora_dropout": 0.1})
    out = tmp_path / "killed"
    resume, killed_at = kill_after_checkpoint(config, out)
    assert killed_at < 40
    reference = train(config)  # uninterrupted, same seed, in this process
    resume()
    assert json.loads((out / "report.json").read_text())["steps"] == reference["steps"] == 40
    assert _train_losses(out) == pytest.approx(_train_losses(tmp_path / "reference"), abs=1e-6)
    for name in ("checkpoint-40", "best"):
        ours, theirs = _adapters(out / name), _adapters(tmp_path / "reference" / name)
        assert ours.keys() == theirs.keys()
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=f"{name}: {key}")


def test_adapters_are_saved_in_peft_format_and_load_both_ways(tiny_model, tiny_dir, tmp_path):
    from peft import PeftModel

    add_writer_adapters(tiny_model, WriterSection(lora_r=4, lora_targets=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, param in tiny_model.writer.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)  # peft starts B at zero, which would make any loading look right
    out = tiny_model.save_pretrained(tmp_path / "lora")
    assert (out / ADAPTER_CONFIG_NAME).is_file() and (out / ADAPTER_WEIGHTS_NAME).is_file()
    assert not any("lora_" in k for k in load_file(str(out / WEIGHTS_NAME)))
    saved = json.loads((out / ADAPTER_CONFIG_NAME).read_text())
    assert saved["r"] == 4 and sorted(saved["target_modules"]) == ["q_proj", "v_proj"]

    ids = torch.tensor([[1, 5, 9, 2, 7]])
    tiny_model.eval()
    with torch.no_grad():
        expected = tiny_model.writer(input_ids=ids).logits
        base = StoryModel.from_pretrained(tiny_dir).writer.float()
        plain = base(input_ids=ids).logits
        ours = StoryModel.from_pretrained(out).writer.float()(input_ids=ids).logits
        theirs = PeftModel.from_pretrained(base, str(out)).eval()(input_ids=ids).logits
    assert not torch.allclose(expected, plain, atol=1e-4)  # the adapters change the writer
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=1e-5)


def test_bad_story_data_is_refused_with_the_reason(tiny_dir, story_files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"scenes": [], "story": "x"}) + "\n")
    with pytest.raises(ValueError, match="non-empty 'scenes' and 'story'"):
        Trainer(_config(tiny_dir, story_files, tmp_path / "a", data={"train": {"path": str(bad)}}))
    with pytest.raises(FileNotFoundError, match="prepare_stories"):
        Trainer(_config(tiny_dir, story_files, tmp_path / "b", data={"train": {"path": str(tmp_path / "none.jsonl")}}))
    with pytest.raises(ValueError, match="best_metric must be 'loss'"):
        _config(tiny_dir, story_files, tmp_path / "c", best_metric="cider_d")


def test_a_record_may_name_the_style_tone_and_audience_a_reader_asked_for(tiny_model):
    record = {**STORIES[2], "style": "fairy tale", "tone": "negative", "audience": "children"}
    ids, labels = encode_example(tiny_model, record, max_tokens=1000)
    story = [t for t in labels if t != IGNORE_INDEX]
    prompt = tiny_model.tokenizer.decode(ids[: len(ids) - len(story)])
    assert "Write a fairy tale, beginning with 'Once upon a time'" in prompt
    assert "for young children, with simple words, dark and melancholy in tone," in prompt
    plain = tiny_model.tokenizer.decode(encode_example(tiny_model, STORIES[2], max_tokens=1000)[0])
    assert "Write a short story (about" in plain and "in tone" not in plain
