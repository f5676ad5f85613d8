"""Saving and loading a StoryModel: config.json (architecture) + generation_config.json (inference settings) +
model.safetensors (only what a spec cannot rebuild), and a LoRA writer's adapters beside them in PEFT's own format.
Mixed into StoryModel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Self

import torch
from safetensors.torch import load_file, save_file

from mmstory.config import GenerationConfig, ModelConfig, PartConfig, split_generation
from mmstory.registry import resolve_pretrained
from mmstory.specs import is_reproducible

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"  # as Hugging Face names it
WEIGHTS_NAME = "model.safetensors"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's own file names, for the story writer's LoRA
ADAPTER_CONFIG_NAME = "adapter_config.json"


class PretrainedMixin:
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a spec cannot rebuild: bridge, projections, caption decoder, LoRA and fully trained parts."""
        keep = {}
        for name, tensor in self.state_dict().items():
            part = name.split(".", 1)[0]
            if part in ("vision", "text", "writer"):
                cfg = getattr(self.config, part)
                if not (cfg.train == "full" or not is_reproducible(cfg.spec, cfg.pretrained)
                        or (cfg.train == "lora" and "lora_" in name)):
                    continue
            keep[name] = tensor.detach().to("cpu").clone().contiguous()  # clone: tied weights share storage
        return keep

    def save_pretrained(self, directory: str | Path) -> Path:
        """config.json + generation_config.json + model.safetensors; a LoRA writer's adapters go beside them in
        PEFT's own format (adapter_config.json + adapter_model.safetensors), so `peft.PeftModel.from_pretrained` loads
        them too."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_json(directory / CONFIG_NAME)
        self.generation_config.save_json(directory / GENERATION_CONFIG_NAME)
        tensors = self.trained_state_dict()
        adapters = {k: tensors.pop(k) for k in list(tensors) if k.startswith("writer.") and "lora_" in k}
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        if adapters:
            save_writer_adapters(adapters, self.config.writer, directory)
        return directory

    def load_trained_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load saved tensors; every saved tensor must find its place (shape and name)."""
        if "text_projection.weight" in tensors:  # saved before the text projection became a ProjectionHead
            tensors = {("text_projection.linear.weight" if k == "text_projection.weight" else k): v
                       for k, v in tensors.items()}
        # saved while the story writer's module was called decoder
        tensors = {("writer." + k[len("decoder."):] if k.startswith("decoder.") else k): v for k, v in tensors.items()}
        own = self.state_dict()
        unexpected = sorted(set(tensors) - set(own))
        if unexpected:
            raise ValueError(f"saved weights do not fit this model: unexpected tensors {unexpected[:5]}")
        mismatched = [k for k, v in tensors.items() if own[k].shape != v.shape]
        if mismatched:
            raise ValueError(f"saved weights do not fit this model: shape mismatch for {mismatched[:5]}")
        self.load_state_dict(tensors, strict=False)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> Self:
        """Load from a packaged name (e.g. 'mmstory-small'), a local directory, or a hub id (needs network)."""
        directory = resolve_pretrained(name_or_path)
        model = cls(*load_configs(directory))
        weights = directory / WEIGHTS_NAME
        tensors = load_file(str(weights)) if weights.is_file() else {}
        if (directory / ADAPTER_WEIGHTS_NAME).is_file():
            tensors.update(load_writer_adapters(directory))
        if tensors:
            model.load_trained_state(tensors)
        model.eval()
        return model


def load_configs(directory: str | Path) -> tuple[ModelConfig, GenerationConfig]:
    """A saved directory's architecture and inference settings. A config.json of the single-file form (inference
    settings inside it, no generation_config.json) loads too; generation_config.json wins where both name a field."""
    directory = Path(directory)
    model, generation = split_generation(json.loads((directory / CONFIG_NAME).read_text()))
    if (directory / GENERATION_CONFIG_NAME).is_file():
        generation.update(json.loads((directory / GENERATION_CONFIG_NAME).read_text()))
    return ModelConfig.from_dict(model), GenerationConfig.from_dict(generation)


def save_writer_adapters(adapters: dict[str, torch.Tensor], part: PartConfig, directory: Path) -> None:
    """The writer's LoRA tensors under PEFT's names ("base_model.model.<module>.lora_A.weight") and its config."""
    from peft import LoraConfig

    peft_names = {"base_model.model." + k[len("writer."):].replace(".default.", "."): v for k, v in adapters.items()}
    save_file(peft_names, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapters})
    config = LoraConfig(r=part.lora_r, lora_alpha=part.lora_alpha, lora_dropout=part.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM", base_model_name_or_path=part.spec)
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True,
                                                            default=sorted) + "\n")


def load_writer_adapters(directory: Path) -> dict[str, torch.Tensor]:
    """PEFT-named adapter tensors back under this model's names (peft's injected adapter is called "default")."""
    out = {}
    for name, tensor in load_file(str(directory / ADAPTER_WEIGHTS_NAME)).items():
        if not name.startswith("base_model.model.") or ".lora_" not in name:
            raise ValueError(f"{directory / ADAPTER_WEIGHTS_NAME}: {name!r} is not a LoRA tensor of PEFT's format")
        module, rest = name[len("base_model.model."):].split(".lora_", 1)
        kind, leaf = rest.split(".", 1)
        out[f"writer.{module}.lora_{kind}.default.{leaf}"] = tensor
    return out
