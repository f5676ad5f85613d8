"""The story writer's LoRA fine-tuning: examples, the loop and its resume, and adapters in PEFT's own format."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mmstory.generation import build_instruction
from mmstory.losses import IGNORE_INDEX
from mmstory.model import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, WEIGHTS_NAME, StoryModel
from mmstory.train.trainer import main as train_main
from mmstory.train.writer import (
    WriterTrainConfig,
    WriterTrainer,
    add_writer_adapters,
    encode_example,
    story_budget,
)

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


def _config(tiny_dir, story_files, out, **kw) -> WriterTrainConfig:
    train, dev = story_files
    settings = dict(model=str(tiny_dir), train=str(train), dev=str(dev), output_dir=str(out), batch_size=2,
                    lora_r=4, lora_targets=["q_proj", "v_proj"], eval_every=2, save_every=1, log_every=1,
                    warmup_steps=1, lr=1e-2, mixed_precision="no", max_steps=4)
    return WriterTrainConfig(**{**settings, **kw})


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
                             hints=[["tabby cat"]])
    assert text.startswith("Write a short story (about 80 words) about this photo.")
    assert text.endswith("Photo 1: a cat on a sofa. Also seen: tabby cat.")


def test_writer_training_learns_and_resumes_exactly(tiny_dir, story_files, tmp_path):
    straight = WriterTrainer(_config(tiny_dir, story_files, tmp_path / "straight"))
    before = straight.dev_loss()
    report = straight.fit()
    assert report["steps"] == 4 and report["best_dev_loss"] < before
    part = WriterTrainer(_config(tiny_dir, story_files, tmp_path / "part", max_steps=2))
    part.fit()
    resumed = WriterTrainer(_config(tiny_dir, story_files, tmp_path / "part"), resume=True)
    assert resumed.step == 2
    resumed.fit()
    a = load_file(str(tmp_path / "straight" / "final" / ADAPTER_WEIGHTS_NAME))
    b = load_file(str(tmp_path / "part" / "final" / ADAPTER_WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileExistsError, match="resume"):
        WriterTrainer(_config(tiny_dir, story_files, tmp_path / "part"))


def test_mmstory_train_runs_a_writer_config(tiny_dir, story_files, tmp_path):
    train, dev = story_files
    config = tmp_path / "writer.yaml"
    config.write_text(f"task: writer\nmodel: {tiny_dir}\ntrain: {train}\ndev: {dev}\nbatch_size: 3\n"
                      f"lora_r: 2\nlora_targets: [q_proj]\nmixed_precision: 'no'\n")
    assert train_main(["--config", str(config), "--output-dir", str(tmp_path / "run"), "--max-steps", "2"]) == 0
    loaded = StoryModel.from_pretrained(tmp_path / "run" / "final")
    assert loaded.config.writer.train == "lora" and not loaded.generation_config.story_prefix


def test_adapters_are_saved_in_peft_format_and_load_both_ways(tiny_model, tiny_dir, tmp_path):
    from peft import PeftModel

    config = WriterTrainConfig(lora_r=4, lora_targets=["q_proj", "v_proj"])
    add_writer_adapters(tiny_model, config)
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


def test_bad_story_data_is_refused_with_the_reason(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"scenes": [], "story": "x"}) + "\n")
    with pytest.raises(ValueError, match="non-empty 'scenes' and 'story'"):
        WriterTrainer(WriterTrainConfig(model=str(tiny_dir), train=str(bad), dev=None, output_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="prepare_stories"):
        WriterTrainer(WriterTrainConfig(model=str(tiny_dir), train=str(tmp_path / "none.jsonl"), dev=None))
    with pytest.raises(ValueError, match="task: writer"):
        WriterTrainConfig(task="captions")


def test_a_record_may_name_the_style_tone_and_audience_a_reader_asked_for(tiny_model):
    record = {**STORIES[2], "style": "fairy tale", "tone": "negative", "audience": "children"}
    ids, labels = encode_example(tiny_model, record, max_tokens=1000)
    story = [t for t in labels if t != IGNORE_INDEX]
    prompt = tiny_model.tokenizer.decode(ids[: len(ids) - len(story)])
    assert "Write a fairy tale, beginning with 'Once upon a time'" in prompt
    assert "for young children, with simple words, dark and melancholy in tone," in prompt
    plain = tiny_model.tokenizer.decode(encode_example(tiny_model, STORIES[2], max_tokens=1000)[0])
    assert "Write a short story (about" in plain and "in tone" not in plain
