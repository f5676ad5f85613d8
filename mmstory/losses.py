"""CoCa's losses and their weighted sum, kept apart from the model so they can be tested against hand-computed values.

`StoryModel.forward` returns each head's features and logits (`story_outputs`) and, with captions, the losses a
`StoryLoss` makes of them (or, for self-critical training, `self_critical_output`): the model computes, this module
weighs and adds. The weights are a training setting (`TrainConfig.loss`), not part of the model config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from mmstory.model import StoryModel

IGNORE_INDEX = -100


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                     heads: int = 1) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matched (image, text) pairs; row i of each is a positive pair.

    Embeddings are expected L2-normalised; `logit_scale` is exp(learned log-scale), i.e. 1/temperature. With `heads`
    > 1 the embeddings are that many heads' outputs side by side, and each head gets its own InfoNCE (the mean is
    returned): trained apart like this, the heads make a deep ensemble rather than one wider head.
    """
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image and text embeddings differ in shape: {image_embeds.shape} vs {text_embeds.shape}")
    if image_embeds.shape[-1] % heads:
        raise ValueError(f"embedding width {image_embeds.shape[-1]} does not split into {heads} heads")
    if heads == 1:
        logits = (logit_scale * image_embeds @ text_embeds.t()).unsqueeze(0)
    else:  # each head's cosines, whatever the scale of its slice
        image = F.normalize(image_embeds.unflatten(-1, (heads, -1)), dim=-1).transpose(0, 1)  # [heads, B, D]
        text = F.normalize(text_embeds.unflatten(-1, (heads, -1)), dim=-1).transpose(0, 1)
        logits = logit_scale * image @ text.transpose(1, 2)  # [heads, B, B]
    targets = torch.arange(logits.shape[1], device=logits.device).expand(heads, -1)
    per_image = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    per_text = F.cross_entropy(logits.transpose(1, 2).flatten(0, 1), targets.flatten())
    return 0.5 * (per_image + per_text)


def caption_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy; positions labelled IGNORE_INDEX (prefix, prompt, padding) do not count.

    `logits[:, t]` predicts `labels[:, t + 1]`, as in Hugging Face causal LMs.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    if (shift_labels != IGNORE_INDEX).sum() == 0:
        return shift_logits.sum() * 0.0  # nothing to predict; keep the graph intact
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


def self_critical_loss(token_logprobs: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE with a baseline (self-critical sequence training, Rennie et al. 2017): every token of a sampled
    caption is pushed up or down by its caption's advantage (reward minus baseline); mean over real tokens.

    `token_logprobs` [N, T] are log p(sampled token), `mask` [N, T] marks real tokens (EOS included), `advantages` [N].
    """
    if token_logprobs.shape != mask.shape or advantages.shape != token_logprobs.shape[:1]:
        raise ValueError(f"shapes differ: log-probs {tuple(token_logprobs.shape)}, mask {tuple(mask.shape)}, "
                         f"advantages {tuple(advantages.shape)}")
    mask = mask.to(token_logprobs.dtype)
    return -(token_logprobs * mask * advantages.detach()[:, None]).sum() / mask.sum().clamp(min=1)


def leave_one_out_baseline(rewards: torch.Tensor, samples_per_image: int) -> torch.Tensor:
    """Each sample's baseline is the mean reward of the other samples of its image (Luo 2020's SCST variant, no
    greedy decode needed); rewards are image-major, `samples_per_image` (>= 2) per image."""
    if samples_per_image < 2 or rewards.numel() % samples_per_image:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {samples_per_image} (>= 2) samples")
    groups = rewards.view(-1, samples_per_image)
    return ((groups.sum(dim=1, keepdim=True) - groups) / (samples_per_image - 1)).reshape(-1)


LOSS_WEIGHT_FIELDS = ("contrastive_weight", "caption_weight", "caption_decoder_weight")


@dataclass
class StoryLoss:
    """CoCa's objective: the weighted sum of the three heads' losses, from `StoryModel.forward`'s features and logits.

    A training setting (`TrainConfig.loss`), not part of the model: a head whose weight is 0 is not run."""

    contrastive_weight: float = 1.0
    caption_weight: float = 1.0  # captioning loss through the causal-LM decoder
    caption_decoder_weight: float = 1.0  # captioning loss through the caption decoder (when enabled)

    def __post_init__(self) -> None:
        for name in LOSS_WEIGHT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"loss {name} must be a number, got {value!r}")
            if value < 0:
                raise ValueError(f"loss {name} must be >= 0, got {value}")
        if not any(getattr(self, name) > 0 for name in LOSS_WEIGHT_FIELDS):
            raise ValueError(f"at least one loss weight ({', '.join(LOSS_WEIGHT_FIELDS)}) must be > 0")

    def to_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in LOSS_WEIGHT_FIELDS}

    def __call__(self, out: StoryModelOutput) -> StoryModelOutput:
        """`out` (features and logits, as `StoryModel.forward` returns them) with its losses and total filled in."""
        parts = (out.logit_scale, out.image_embeds, out.caption_logits, out.caption_decoder_logits)
        ref = next((t for t in parts if t is not None), None)
        out.loss = ref.new_zeros(()) if ref is not None else torch.zeros(())  # adding 0: the same sum in any dtype
        if self.contrastive_weight > 0 and out.image_embeds is not None:
            out.contrastive_loss = contrastive_loss(out.image_embeds, out.text_embeds, out.logit_scale,
                                                    heads=out.contrastive_heads)
            out.loss = out.loss + self.contrastive_weight * out.contrastive_loss
        if self.caption_weight > 0 and out.caption_logits is not None:
            out.caption_loss = caption_loss(out.caption_logits, out.caption_labels)
            out.loss = out.loss + self.caption_weight * out.caption_loss
        if self.caption_decoder_weight > 0 and out.caption_decoder_logits is not None:
            out.caption_decoder_loss = caption_loss(out.caption_decoder_logits, out.caption_decoder_labels)
            out.loss = out.loss + self.caption_decoder_weight * out.caption_decoder_loss
        return out


@dataclass
class StoryModelOutput:
    loss: torch.Tensor | None = None
    contrastive_loss: torch.Tensor | None = None
    caption_loss: torch.Tensor | None = None
    caption_decoder_loss: torch.Tensor | None = None
    # features and logits (CoCa's forward): the contrastive head's embeddings and scale, each captioner's logits and
    # the labels they predict (IGNORE_INDEX where nothing is); None for a head that was not run
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None
    contrastive_heads: int = 1
    caption_logits: torch.Tensor | None = None
    caption_labels: torch.Tensor | None = None
    caption_decoder_logits: torch.Tensor | None = None
    caption_decoder_labels: torch.Tensor | None = None


def story_outputs(model: StoryModel, captions: list[str], image_tokens: torch.Tensor, image_pooled: torch.Tensor,
                  text_pooled: torch.Tensor | None, heads: StoryLoss) -> StoryModelOutput:
    """Each head's features and logits, for the heads `heads` weighs above 0 (the others are not run)."""
    out = StoryModelOutput(contrastive_heads=model.config.contrastive_heads)
    if heads.contrastive_weight > 0:
        out.logit_scale = model.contrastive_scale()
        out.text_embeds = model.text_embedding(captions, pooled=text_pooled)
        out.image_embeds = model.image_embedding(image_pooled)
    if heads.caption_weight > 0:
        embeds, mask, labels = model._caption_batch(model.visual_prefix(image_tokens, image_pooled), captions)
        out.caption_logits = model.writer(inputs_embeds=embeds, attention_mask=mask).logits
        out.caption_labels = labels
    if model.caption_decoder is not None and heads.caption_decoder_weight > 0:
        ids, padding = model._caption_decoder_batch(captions, image_tokens.device)
        out.caption_decoder_logits = model.caption_decoder(ids, image_tokens.float(), padding,
                                                           model.image_tags(image_pooled))
        labels = ids.masked_fill(padding, IGNORE_INDEX)
        labels[:, 0] = IGNORE_INDEX  # BOS is given, never predicted
        out.caption_decoder_labels = labels
    return out


def story_losses(model: StoryModel, captions: list[str], image_tokens: torch.Tensor, image_pooled: torch.Tensor,
                 text_pooled: torch.Tensor | None, loss: StoryLoss | None = None) -> StoryModelOutput:
    """`loss` (default: the model's `loss_fn`) applied to the heads' features and logits."""
    loss = model.loss_fn if loss is None else loss
    return loss(story_outputs(model, captions, image_tokens, image_pooled, text_pooled, loss))


def self_critical_output(model: StoryModel, samples: list[list[int]], advantages: torch.Tensor | None,
                         pixel_values: torch.Tensor | None, image_tokens: torch.Tensor | None,
                         image_pooled: torch.Tensor | None) -> StoryModelOutput:
    """The caption decoder's policy-gradient loss on its own samples (`StoryModel.forward` with caption_samples)."""
    cfg = model.loss_fn
    if model.caption_decoder is None or cfg.caption_decoder_weight == 0:
        raise ValueError("self-critical training needs the caption decoder (caption_decoder_weight > 0)")
    if cfg.contrastive_weight > 0 or cfg.caption_weight > 0:
        raise ValueError("self-critical training trains the caption decoder alone: set contrastive_weight and "
                         "caption_weight to 0")
    if advantages is None or advantages.shape != (len(samples),):
        raise ValueError("pass one advantage per caption sample")
    if image_tokens is None:
        image_tokens, image_pooled = model.encode_image(pixel_values)
    if image_tokens.shape[0] != len(samples):
        raise ValueError(f"{len(samples)} caption samples for {image_tokens.shape[0]} image rows")
    ids, padding = model._compact_batch(samples, image_tokens.device)
    logprobs, real = model._token_logprobs(ids, padding, image_tokens, image_pooled)
    loss = self_critical_loss(logprobs, real, advantages.to(logprobs.device))
    return StoryModelOutput(loss=cfg.caption_decoder_weight * loss, caption_decoder_loss=loss)
