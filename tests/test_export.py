"""scripts/export_default.py: merging runs into a packaged model, with the contrastive heads from their own run."""

import subprocess
import sys

import torch
from conftest import ROOT

from mmstory import StoryModel, create_model, get_model_config


def _saved(path, seed, heads, distractors=0, hidden=16, embed=32):
    config = get_model_config("tiny")
    config.text_head_hidden, config.contrastive_heads, config.caption_distractors = hidden, heads, distractors
    config.embed_dim = embed
    torch.manual_seed(seed)
    model = create_model(config)
    if distractors:
        model.set_distractors(torch.randn(distractors, model.vision.pooled_dim))
    return model.save_pretrained(path)


def test_export_takes_the_contrastive_heads_their_shapes_and_distractors_from_the_heads_run(tmp_path):
    main, heads, out = _saved(tmp_path / "main", 0, 1), _saved(tmp_path / "heads", 1, 3, 2, 8, 24), tmp_path / "out"
    subprocess.run([sys.executable, "scripts/export_default.py", str(main), "--projections-from", str(heads),
                    "--name", "tiny", "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    exported, source, rest = (StoryModel.from_pretrained(p) for p in (out, heads, main))
    assert exported.config.contrastive_heads == 3 and exported.config.caption_distractors == 2
    assert (exported.config.text_head_hidden, exported.config.embed_dim) == (8, 24)
    assert torch.equal(exported.distractor_pooled, source.distractor_pooled.to(torch.float8_e4m3fn).float())
    assert exported.image_projection.weight.shape[0] == 3 * 24
    bf16 = lambda t: t.to(torch.bfloat16).float()  # noqa: E731 - the export stores bf16
    assert torch.equal(exported.text_projection.mlp[4].weight, bf16(source.text_projection.mlp[4].weight))
    assert torch.equal(exported.caption_decoder.embed.weight, bf16(rest.caption_decoder.embed.weight))
