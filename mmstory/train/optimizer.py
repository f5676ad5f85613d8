"""The optimiser's parameter groups (one learning rate per model part) and the learning-rate schedule, the same for
every task."""

from __future__ import annotations

import math

import torch

from mmstory.train.config import PART_OF


def param_groups(model: torch.nn.Module, lr: dict[str, float], weight_decay: float) -> list[dict]:
    """One AdamW group per (part, decay): each part has its own rate; only matrices are decayed, as in open_clip."""
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = PART_OF[name.split(".", 1)[0]]
        decay = param.ndim >= 2
        group = groups.setdefault((part, decay), {"params": [], "name": f"{part}{'' if decay else '/no_decay'}",
                                                  "part": part, "lr": lr[part],
                                                  "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters: every part is frozen or has a zero loss weight")
    return [groups[key] for key in sorted(groups)]


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup from 1/(warmup+1), then cosine or linear decay to `min_ratio` at `total` (nanoGPT's shape)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay
