"""Give a packaged model the story writer's LoRA adapters from a writer run (`mmstory train`, task: writer).

    python scripts/export_writer.py runs/writer_vist/best            # -> mmstory/pretrained/mmstory-small

The packaged model.safetensors is left byte for byte as it is (the writer run trains nothing else, which is checked);
config.json takes the run's writer settings (LoRA rank, targets), generation_config.json its story_prefix (no visual
prefix), and the adapters are written in
PEFT's own format beside it (adapter_config.json + adapter_model.safetensors), in bfloat16.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmstory.factory import PRETRAINED_ROOT
from mmstory.model import (
    ADAPTER_WEIGHTS_NAME,
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    WEIGHTS_NAME,
    load_writer_adapters,
    save_writer_adapters,
)
from mmstory.saving import load_configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the writer run's best/ or a checkpoint-<step>/ directory")
    parser.add_argument("--name", default="mmstory-small")
    parser.add_argument("--out", type=Path, default=None, help=f"default: {PRETRAINED_ROOT}/<name>")
    args = parser.parse_args()
    out = args.out or PRETRAINED_ROOT / args.name
    run, run_generation = load_configs(args.run_dir)
    if run.writer.train != "lora":
        raise SystemExit(f"{args.run_dir} has no LoRA writer (writer.train is {run.writer.train!r})")
    tensors = load_file(str(args.run_dir / WEIGHTS_NAME))
    adapters = {k: tensors.pop(k) for k in list(tensors) if "lora_" in k}
    if (args.run_dir / ADAPTER_WEIGHTS_NAME).is_file():
        adapters.update(load_writer_adapters(args.run_dir))
    shipped = load_file(str(out / WEIGHTS_NAME))
    changed = [k for k, v in tensors.items() if k not in shipped or not torch.equal(v.float(), shipped[k].float())]
    if changed or set(shipped) != set(tensors):
        raise SystemExit(f"the run's other tensors differ from {out}'s ({changed[:3]}): it was not trained from them")
    config, generation = load_configs(out)
    config.writer, generation.story_prefix = run.writer, run_generation.story_prefix
    config.save_json(out / CONFIG_NAME)
    generation.save_json(out / GENERATION_CONFIG_NAME)
    save_writer_adapters({k: v.to(torch.bfloat16) for k, v in adapters.items()}, run.writer, out)
    size = (out / ADAPTER_WEIGHTS_NAME).stat().st_size / 2**20
    print(f"{out}: {len(adapters)} adapter tensors ({size:.1f} MiB) from {args.run_dir}")


if __name__ == "__main__":
    main()
