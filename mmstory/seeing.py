"""The step a story and an answer share: the pictures captioned and their sure classes named, and the story writer's
prompt embedded with the pictures' visual prefixes in it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mmstory.caption_policy import CaptionChoice
from mmstory.captioning import CAPTION_REPETITION_PENALTY
from mmstory.model import StoryModel


@dataclass
class Seen:
    """What the captioner saw in the pictures, and their encoder features for the writer's visual prefixes."""

    tokens: torch.Tensor
    pooled: torch.Tensor
    choices: list[CaptionChoice]  # each caption with how sure it is and the caption policy's trace
    hints: list[list[str]]  # per picture, the classifier's sure classes (they correct a caption that misses one)
    seconds: float  # encoding and captioning

    @property
    def captions(self) -> list[str]:
        return [choice.caption for choice in self.choices]


@torch.no_grad()
def see(model: StoryModel, pixel_values: torch.Tensor) -> Seen:
    """Encode and caption a batch of pictures, and name the classes the classifier is sure of."""
    start = time.perf_counter()
    tokens, pooled = model.encode_image(pixel_values)
    choices = model.caption_choices(image_tokens=tokens, image_pooled=pooled,
                                    repetition_penalty=CAPTION_REPETITION_PENALTY)
    hints = [sure + [w for w in choice.also if w not in sure] for sure, choice in
             zip(model.sure_classes(pooled, model.generation_config.caption_concepts), choices)]
    return Seen(tokens, pooled, choices, hints, time.perf_counter() - start)


def writer_prompt(model: StoryModel, seen: Seen, user_text: str, opening: str = "") -> torch.Tensor:
    """[1, L, D]: `user_text` in the writer's chat template (then `opening`, the start of its reply), with the
    pictures' visual prefixes in place of its image placeholders when the generation config uses them."""
    prefixes = list(model.visual_prefix(seen.tokens, seen.pooled)) if model.generation_config.story_prefix else []
    return model.prompt_embeddings(model.format_prompt(user_text) + opening, prefixes)[None]
