"""scripts/export_default.py: merging runs into a packaged model, with the contrastive heads from their own run."""

import subprocess
import sys

import torch
from conftest import ROOT

from mmstory import StoryModel, create_model, get_model_config


def _saved(path, seed, heads):
    config = get_model_config("tiny")
    config.text_head_hidden, config.contrastive_heads = 16, heads
    torch.manual_seed(seed)
    return create_model(config).save_pretrained(path)


def test_export_takes_the_contrastive_heads_and_their_count_from_the_heads_run(tmp_path):
    main, heads, out = _saved(tmp_path / "main", 0, 1), _saved(tmp_path / "heads", 1, 3), tmp_path / "out"
    subprocess.run([sys.executable, "scripts/export_default.py", str(main), "--projections-from", str(heads),
                    "--name", "tiny", "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    exported, source, rest = (StoryModel.from_pretrained(p) for p in (out, heads, main))
    assert exported.config.contrastive_heads == 3
    assert exported.image_projection.weight.shape[0] == 3 * exported.config.embed_dim
    bf16 = lambda t: t.to(torch.bfloat16).float()  # noqa: E731 - the export stores bf16
    assert torch.equal(exported.text_projection.mlp[4].weight, bf16(source.text_projection.mlp[4].weight))
    assert torch.equal(exported.caption_decoder.embed.weight, bf16(rest.caption_decoder.embed.weight))
