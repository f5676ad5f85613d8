"""The two CoCa losses, kept apart from the model so they can be tested against hand-computed values."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matched (image, text) pairs; row i of each is a positive pair.

    Embeddings are expected L2-normalised; `logit_scale` is exp(learned log-scale), i.e. 1/temperature.
    """
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image and text embeddings differ in shape: {image_embeds.shape} vs {text_embeds.shape}")
    logits = logit_scale * image_embeds @ text_embeds.t()
    targets = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def caption_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy; positions labelled IGNORE_INDEX (prefix, prompt, padding) do not count.

    `logits[:, t]` predicts `labels[:, t + 1]`, as in Hugging Face causal LMs.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    if (shift_labels != IGNORE_INDEX).sum() == 0:
        return shift_logits.sum() * 0.0  # nothing to predict; keep the graph intact
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
