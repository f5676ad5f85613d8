"""Export trained runs as the packaged default model: mmstory/pretrained/<name>/{config.json, generation_config.json,
model.safetensors}.

    python scripts/export_default.py runs/flickr8k/best --bridge-from runs/flickr8k_bridge/best

The bridge's tensors come from `--bridge-from` (stage 2), the contrastive heads' (and the distractor images that caption
reranking compares against) from `--projections-from` (the heads stage, config flickr8k_heads), and everything
else from the first run.
Trained tensors are stored in bfloat16 and the distractor images' features in float8 (e4m3; they only feed a
logsumexp, and dev captions did not change measurably); all load back into float32, and the shipped file stays small.
The loss weights are no part of the model config (they are the training config's `loss` section); the
inference settings are the registered ones (chosen on dev after training), with --captioner.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mmstory.factory import PRETRAINED_ROOT, get_generation_config
from mmstory.model import CONFIG_NAME, GENERATION_CONFIG_NAME, WEIGHTS_NAME
from mmstory.saving import load_configs
from mmstory.train.trainer import latest_checkpoint

CONTRASTIVE_HEAD = ("image_projection.", "text_projection.", "logit_scale", "distractor_pooled")
HEAD_FIELDS = ("contrastive_heads", "embed_dim", "text_head_hidden", "caption_distractors")  # their sizes
STORED_DTYPE = {"distractor_pooled": torch.float8_e4m3fn}  # every other float tensor: bfloat16


def _weights_dir(source: Path) -> Path:
    """A checkpoint, or a run's output directory: its latest checkpoint."""
    return source if (source / WEIGHTS_NAME).is_file() else latest_checkpoint(source) or source


def _part(source: Path, prefixes: tuple[str, ...], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors under `prefixes` in another run's weights; they must match the main run's set of names."""
    source = _weights_dir(source)
    part = {k: v for k, v in load_file(str(source / WEIGHTS_NAME)).items() if k.startswith(prefixes)}
    if not part or not {k for k in tensors if k.startswith(prefixes)} <= set(part):
        raise SystemExit(f"{source} holds no {'/'.join(prefixes)} tensors matching the main run's")
    return part


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a save_pretrained() directory, e.g. runs/flickr8k/best")
    parser.add_argument("--bridge-from", type=Path, default=None, help="take the bridge's tensors from this run")
    parser.add_argument("--projections-from", type=Path, default=None,
                        help="take the contrastive head (image/text projections, temperature) from this checkpoint "
                             "or from the latest checkpoint of this run directory")
    parser.add_argument("--name", default="mmstory-small")
    parser.add_argument("--captioner", choices=["writer", "caption_decoder"], default="caption_decoder",
                        help="which path writes captions at inference (choose by dev-split metrics)")
    parser.add_argument("--out", type=Path, default=None, help=f"default: {PRETRAINED_ROOT}/<name>")
    args = parser.parse_args()

    config = load_configs(args.run_dir)[0]
    config.name = args.name
    if args.projections_from is not None:  # the heads' shapes (and distractor images) of the run they come from
        heads = load_configs(_weights_dir(args.projections_from))[0]
        for field in HEAD_FIELDS:
            setattr(config, field, getattr(heads, field))
    generation = dataclasses.replace(
        get_generation_config(args.name), captioner=args.captioner,
        story_prefix=args.bridge_from is not None)  # an untrained bridge would only feed the writer noise
    generation.check(config)
    tensors = load_file(str(args.run_dir / WEIGHTS_NAME))
    for source, prefixes in ((args.bridge_from, ("bridge.",)), (args.projections_from, CONTRASTIVE_HEAD)):
        if source is not None:
            tensors.update(_part(source, prefixes, tensors))
    tensors = {k: v.to(STORED_DTYPE.get(k, torch.bfloat16)) if v.is_floating_point() else v
               for k, v in tensors.items()}
    out = args.out or PRETRAINED_ROOT / args.name
    out.mkdir(parents=True, exist_ok=True)
    config.save_json(out / CONFIG_NAME)
    generation.save_json(out / GENERATION_CONFIG_NAME)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt", "source": str(args.run_dir)})
    size = (out / WEIGHTS_NAME).stat().st_size / 2**20
    print(json.dumps({"exported": str(out), "tensors": len(tensors), "megabytes": round(size, 2),
                      "captioner": generation.captioner}))


if __name__ == "__main__":
    main()
