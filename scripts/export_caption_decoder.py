"""Put a run's caption decoder into a packaged model, leaving every other tensor and file as shipped.

    python scripts/export_caption_decoder.py runs/flickr8k_novel/best

For a caption decoder trained alone (`mmstory/configs/flickr8k_novel.yaml`) after the rest of the model shipped: its
tensors (with its vocabulary buffer, in bfloat16 like `scripts/export_default.py` stores them) replace the packaged
ones, and its `caption_decoder` config section replaces the packaged one. `scripts/export_default.py` exports a
whole model from its stages instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mmstory.factory import PRETRAINED_ROOT
from mmstory.model import CONFIG_NAME, WEIGHTS_NAME

PREFIX = "caption_decoder."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a checkpoint or save_pretrained() directory of the run")
    parser.add_argument("--name", default="mmstory-small")
    args = parser.parse_args()

    target = PRETRAINED_ROOT / args.name
    tensors = {k: v for k, v in load_file(str(target / WEIGHTS_NAME)).items() if not k.startswith(PREFIX)}
    decoder = {k: v for k, v in load_file(str(args.run_dir / WEIGHTS_NAME)).items() if k.startswith(PREFIX)}
    if not decoder:
        raise SystemExit(f"{args.run_dir} holds no caption decoder tensors")
    tensors.update({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in decoder.items()})
    config = json.loads((target / CONFIG_NAME).read_text())
    config["caption_decoder"] = json.loads((args.run_dir / CONFIG_NAME).read_text())["caption_decoder"]
    (target / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(target / WEIGHTS_NAME), metadata={"format": "pt", "caption_decoder": str(args.run_dir)})
    print(json.dumps({"exported": str(target), "caption_decoder_tensors": len(decoder),
                      "megabytes": round((target / WEIGHTS_NAME).stat().st_size / 2**20, 2)}))


if __name__ == "__main__":
    main()
