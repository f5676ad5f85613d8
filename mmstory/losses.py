"""CoCa's losses and their weighted sum, kept apart from the model so they can be tested against hand-computed values.

`StoryModel.forward` returns each head's features and logits (a `StoryModelOutput`) and, with captions, the losses a
`StoryLoss` makes of them: the model computes, this module weighs and adds, reading nothing but those outputs. The
weights are a training setting (`TrainConfig.loss`), not part of the model config.

In a data-parallel run (`gather=True`, one process per device) each process's loss is its share of the global
batch's loss: the contrastive head contrasts its rows with every process's (open_clip's `local_loss` with
`gather_with_grad`) and the captioners' cross-entropy is divided by the token count of the global batch. Averaged over
processes, as data-parallel averages the gradients and as the trainer logs the losses, it is the loss one process
would compute on the whole global batch: how a batch is split over devices does not change what is trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmstory.distributed import gather_with_grad, sum_over_processes, world

IGNORE_INDEX = -100


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                     heads: int = 1, gather: bool = False) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matched (image, text) pairs; row i of each is a positive pair.

    Embeddings are expected L2-normalised; `logit_scale` is exp(learned log-scale), i.e. 1/temperature. With `heads`
    > 1 the embeddings are that many heads' outputs side by side, and each head gets its own InfoNCE (the mean is
    returned): trained apart like this, the heads make a deep ensemble rather than one wider head.

    With `gather` (in a process group of N > 1; every process passes the same number of rows) this process's rows are
    contrasted with all N processes' rows, gradients flowing back to each row's own process: the mean over processes
    is the InfoNCE of the global batch.
    """
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image and text embeddings differ in shape: {image_embeds.shape} vs {text_embeds.shape}")
    if image_embeds.shape[-1] % heads:
        raise ValueError(f"embedding width {image_embeds.shape[-1]} does not split into {heads} heads")
    rank, size = world() if gather else (0, 1)

    def per_head(embeds: torch.Tensor) -> torch.Tensor:  # [heads, rows, D]; each head's cosines, whatever its scale
        if heads == 1:
            return embeds.unsqueeze(0)
        return F.normalize(embeds.unflatten(-1, (heads, -1)), dim=-1).transpose(0, 1)

    image, text = per_head(image_embeds), per_head(text_embeds)
    every_image, every_text = ((per_head(gather_with_grad(image_embeds)), per_head(gather_with_grad(text_embeds)))
                               if size > 1 else (image, text))
    rows = image_embeds.shape[0]
    targets = (torch.arange(rows, device=image.device) + rank * rows).expand(heads, -1).flatten()
    per_image = F.cross_entropy((logit_scale * image @ every_text.transpose(1, 2)).flatten(0, 1), targets)
    per_text = F.cross_entropy((logit_scale * text @ every_image.transpose(1, 2)).flatten(0, 1), targets)
    return 0.5 * (per_image + per_text)


def caption_loss(logits: torch.Tensor, labels: torch.Tensor, gather: bool = False) -> torch.Tensor:
    """Next-token cross-entropy; positions labelled IGNORE_INDEX (prefix, prompt, padding) do not count.

    `logits[:, t]` predicts `labels[:, t + 1]`, as in Hugging Face causal LMs. With `gather` (in a process group of
    N > 1) the sum over this process's tokens is divided by the global batch's token count / N: the mean over
    processes is the cross-entropy per token of the global batch, however its tokens fall on the processes.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    counted = (shift_labels != IGNORE_INDEX).sum()
    size = world()[1] if gather else 1
    total = sum_over_processes(counted) if size > 1 else counted
    if total == 0:
        return shift_logits.sum() * 0.0  # nothing to predict; keep the graph intact
    if size == 1:
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
    summed = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return summed * size / total


def caption_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The summed next-token cross-entropy and the number of tokens it counts: pieces of a mean over many batches."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    summed = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return summed, int((shift_labels != IGNORE_INDEX).sum())


def self_critical_loss(token_logprobs: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                       gather: bool = False) -> torch.Tensor:
    """REINFORCE with a baseline (self-critical sequence training, Rennie et al. 2017): every token of a sampled
    caption is pushed up or down by its caption's advantage (reward minus baseline); mean over real tokens (of the
    global batch with `gather`, as in `caption_loss`).

    `token_logprobs` [N, T] are log p(sampled token), `mask` [N, T] marks real tokens (EOS included), `advantages` [N].
    """
    if token_logprobs.shape != mask.shape or advantages.shape != token_logprobs.shape[:1]:
        raise ValueError(f"shapes differ: log-probs {tuple(token_logprobs.shape)}, mask {tuple(mask.shape)}, "
                         f"advantages {tuple(advantages.shape)}")
    mask = mask.to(token_logprobs.dtype)
    size = world()[1] if gather else 1
    tokens = sum_over_processes(mask.sum()) / size if size > 1 else mask.sum()
    return -(token_logprobs * mask * advantages.detach()[:, None]).sum() / tokens.clamp(min=1)


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
    # in a data-parallel run, each process's share of the global batch's loss (see the module's docstring); false:
    # each process's batch on its own (fewer negatives, per-process token means). One process: no difference.
    gather: bool = True

    def __post_init__(self) -> None:
        for name in LOSS_WEIGHT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"loss {name} must be a number, got {value!r}")
            if value < 0:
                raise ValueError(f"loss {name} must be >= 0, got {value}")
        if not any(getattr(self, name) > 0 for name in LOSS_WEIGHT_FIELDS):
            raise ValueError(f"at least one loss weight ({', '.join(LOSS_WEIGHT_FIELDS)}) must be > 0")
        if not isinstance(self.gather, bool):
            raise TypeError(f"loss gather must be true or false, got {self.gather!r}")

    def to_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in LOSS_WEIGHT_FIELDS}

    def check_self_critical(self) -> None:
        """Self-critical training trains the caption decoder alone."""
        if self.caption_decoder_weight == 0:
            raise ValueError("self-critical training needs the caption decoder (caption_decoder_weight > 0)")
        if self.contrastive_weight > 0 or self.caption_weight > 0:
            raise ValueError("self-critical training trains the caption decoder alone: set contrastive_weight and "
                             "caption_weight to 0")

    def __call__(self, out: StoryModelOutput) -> StoryModelOutput:
        """`out` (features and logits, as `StoryModel.forward` returns them) with its losses and total filled in."""
        if out.sample_logprobs is not None:  # the caption decoder's own samples: the policy gradient
            self.check_self_critical()
            loss = self_critical_loss(out.sample_logprobs, out.sample_mask, out.sample_advantages, gather=self.gather)
            out.caption_decoder_loss, out.loss = loss, self.caption_decoder_weight * loss
            return out
        parts = (out.logit_scale, out.image_embeds, out.caption_logits, out.caption_decoder_logits)
        ref = next((t for t in parts if t is not None), None)
        out.loss = ref.new_zeros(()) if ref is not None else torch.zeros(())  # adding 0: the same sum in any dtype
        if self.contrastive_weight > 0 and out.image_embeds is not None:
            out.contrastive_loss = contrastive_loss(out.image_embeds, out.text_embeds, out.logit_scale,
                                                    heads=out.contrastive_heads, gather=self.gather)
            out.loss = out.loss + self.contrastive_weight * out.contrastive_loss
        if self.caption_weight > 0 and out.caption_logits is not None:
            out.caption_loss = caption_loss(out.caption_logits, out.caption_labels, gather=self.gather)
            out.loss = out.loss + self.caption_weight * out.caption_loss
        if self.caption_decoder_weight > 0 and out.caption_decoder_logits is not None:
            out.caption_decoder_loss = caption_loss(out.caption_decoder_logits, out.caption_decoder_labels,
                                                    gather=self.gather)
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
    # self-critical training: log p of the caption decoder's own sampled tokens [N, T], the mask of real tokens and
    # each sample's advantage [N]
    sample_logprobs: torch.Tensor | None = None
    sample_mask: torch.Tensor | None = None
    sample_advantages: torch.Tensor | None = None
