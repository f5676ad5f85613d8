"""The training batches StoryModel builds from captions: the story writer's [prompt, visual prefix, caption] rows
with their labels, and the caption decoder's compact-vocabulary rows. Mixed into StoryModel."""

from __future__ import annotations

import re

import torch

from mmstory.losses import IGNORE_INDEX
from mmstory.prompts import IMAGE_PLACEHOLDER


class CaptionBatchesMixin:
    """Captions as the tokens each captioner trains on (mixed into `mmstory.model.StoryModel`)."""

    def _caption_ids(self, captions: list[str], max_tokens: int, eos: int | None = None) -> list[list[int]]:
        ids = self.tokenize_captions(captions)
        eos = self.tokenizer.eos_token_id if eos is None else eos
        return [row[:max_tokens] + [eos] for row in ids]

    def tokenize_captions(self, captions: list[str]) -> list[list[int]]:
        return self.tokenizer([normalize_caption(c) for c in captions], add_special_tokens=False).input_ids

    def fit_caption_vocabulary(self, captions: list[str], required: list[str] = ()) -> None:
        """Give the caption decoder its compact vocabulary from the training captions (once, before training), with
        room for every token of the `required` words."""
        if self.caption_decoder is not None:
            pieces = self.tokenizer([" " + w for w in required], add_special_tokens=False).input_ids if required else []
            self.caption_decoder.fit_vocabulary(self.tokenize_captions(captions),
                                                required=sorted({t for ids in pieces for t in ids}))

    def _caption_batch(self, prefix: torch.Tensor, captions: list[str]):
        """[prefix inside the chat prompt][caption][EOS][pad]; only caption and EOS are labelled."""
        device, embed = prefix.device, self.writer.get_input_embeddings()
        before, after = self.caption_prompt().split(IMAGE_PLACEHOLDER)
        before_ids = self.tokenizer(before, add_special_tokens=False).input_ids
        after_ids = self.tokenizer(after, add_special_tokens=False).input_ids
        targets = self._caption_ids(captions, self.config.max_caption_tokens)
        width = max(len(t) for t in targets)
        rows = [after_ids + t + [self.tokenizer.pad_token_id] * (width - len(t)) for t in targets]
        after_tensor = torch.tensor(rows, device=device)
        batch = prefix.shape[0]
        before_tensor = torch.tensor([before_ids] * batch, device=device, dtype=torch.long)
        embeds = torch.cat([embed(before_tensor), prefix, embed(after_tensor)], dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
        labels = torch.full(embeds.shape[:2], IGNORE_INDEX, dtype=torch.long, device=device)
        start = len(before_ids) + prefix.shape[1] + len(after_ids)
        for i, t in enumerate(targets):
            labels[i, start: start + len(t)] = torch.tensor(t, device=device)
            mask[i, start + len(t):] = 0
        return embeds, mask, labels

    def _caption_decoder_batch(self, captions: list[str], device: torch.device):
        dec = self.caption_decoder
        if dec.needs_vocabulary:
            raise RuntimeError("the caption decoder has no vocabulary yet: call model.fit_caption_vocabulary(captions) "
                               "with the training captions before training")
        return self._compact_batch(dec.to_compact(self.tokenize_captions(captions)), device)

    def _compact_batch(self, compact: list[list[int]], device: torch.device):
        """[BOS, ids..., EOS, PAD...] rows (cut to the decoder's length) and their padding mask."""
        dec = self.caption_decoder
        targets = [(row + [dec.EOS])[: dec.max_length - 1] for row in compact]
        width = max(len(t) for t in targets) + 1
        ids = torch.full((len(targets), width), dec.PAD, dtype=torch.long, device=device)
        padding = torch.ones(len(targets), width, dtype=torch.bool, device=device)
        for i, t in enumerate(targets):
            ids[i, : len(t) + 1] = torch.tensor([dec.BOS] + t, device=device)
            padding[i, : len(t) + 1] = False
        return ids, padding


def normalize_caption(text: str) -> str:
    """Crowd captions arrive as 'A dog runs .': collapse spaces, drop the detached final period, keep the case."""
    text = re.sub(r"\s+", " ", str(text)).strip()
    text = re.sub(r"\s+([.,!?;:])", r"\1", text)
    return text
