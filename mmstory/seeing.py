"""The step a story and an answer share: the pictures captioned and their sure classes named, and the story writer's
prompt embedded with the pictures' visual prefixes in it."""

from __future__ import annotations

import threading
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
    hints = model.sure_classes(pooled, model.generation_config.caption_concepts)
    return Seen(tokens, pooled, choices, hints, time.perf_counter() - start)


def writer_prompt(model: StoryModel, seen: Seen, user_text: str, opening: str = "") -> torch.Tensor:
    """[1, L, D]: `user_text` in the writer's chat template (then `opening`, the start of its reply), with the
    pictures' visual prefixes in place of its image placeholders when the generation config uses them."""
    prefixes = list(model.visual_prefix(seen.tokens, seen.pooled)) if model.generation_config.story_prefix else []
    return model.prompt_embeddings(model.format_prompt(user_text) + opening, prefixes)[None]


class SharedSight:
    """The caption step of concurrent requests as one batch (a server's): each request queues its pictures before it
    waits for the model lock, and whoever holds the lock next captions every queued picture at once, in arrival
    order. One beam-search step over many pictures costs little more than over one (`beam_search`), so eight
    waiting requests are captioned in about the time of three."""

    def __init__(self, model: StoryModel, max_pictures: int = 32):
        self.model, self.max_pictures = model, max_pictures
        self._queued: list[_Ticket] = []
        self._mutex = threading.Lock()
        self.batches = 0  # caption steps run (each over one or more requests)

    def submit(self, pixel_values: torch.Tensor) -> _Ticket:
        ticket = _Ticket(pixel_values)
        with self._mutex:
            self._queued.append(ticket)
        return ticket

    def collect(self, ticket: _Ticket) -> Seen:
        """This request's Seen; call it holding the model lock. Captions the queue now unless an earlier holder did."""
        if not ticket.done:
            with self._mutex:
                self._queued.remove(ticket)
                batch, pictures = [ticket], ticket.pixels.shape[0]
                while self._queued and pictures + self._queued[0].pixels.shape[0] <= self.max_pictures:
                    batch.append(self._queued.pop(0))
                    pictures += batch[-1].pixels.shape[0]
            try:
                seen = see(self.model, torch.cat([t.pixels for t in batch]))
            except BaseException as err:
                for t in batch:
                    t.error, t.done = err, True
                raise
            self.batches += 1
            first = 0
            for t in batch:
                part = slice(first, first + t.pixels.shape[0])
                t.seen = Seen(seen.tokens[part], seen.pooled[part], seen.choices[part], seen.hints[part], seen.seconds)
                t.done, first = True, part.stop
        if ticket.error is not None:
            raise ticket.error
        return ticket.seen


@dataclass
class _Ticket:
    pixels: torch.Tensor
    seen: Seen | None = None
    error: BaseException | None = None
    done: bool = False
