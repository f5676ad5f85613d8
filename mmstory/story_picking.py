"""Which of the sampled candidates is kept: the story that meets the request, reaches its ending, speaks of every
picture and best balances what the pictures show against what they do not (and, weighed in, what the writer itself
finds likely). `StoryTeller` samples the candidates; this module only scores them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmstory.components import similarity
from mmstory.story_beats import reaches_ending
from mmstory.text import content_word_recall, hallucinated_mentions, object_mentions, split_sentences


def caption_coverage(story: str, captions: Sequence[str]) -> float:
    """Share of the captions (one per picture) that the story shares at least one content word with."""
    recalls = [content_word_recall(story, [caption], min_captions=1) for caption in captions]
    scored = [r for r in recalls if r is not None]
    return sum(r > 0 for r in scored) / len(scored) if scored else 0.0


def unseen_object_share(story: str, seen: Sequence[str]) -> float:
    """Share of the story's object words (people, animals, things, places) that no caption or class name names."""
    mentions = object_mentions(story)
    return len(hallucinated_mentions(story, seen)) / len(mentions) if mentions else 0.0


def pick_candidate(candidates: Sequence[str], captions: Sequence[str], hints: Sequence[Sequence[str]],
                   agreement: Sequence[float], blocked: Sequence[bool], budget: int,
                   likelihood: Sequence[float] | None = None, likelihood_weight: float = 0.0) -> int:
    """The index of the story to keep.

    Among the candidates the content filter passes (all of them, when none does), those that meet the length request,
    then those that reach an ending beat (a story cut off after its turn has no end), then those that speak of the
    most pictures (a content word of each picture's caption), then the best balance of image agreement, things the
    pictures show (half the share of the captions' content words the story uses) and things they do not (objects
    neither a caption nor the classifier named, counted again in the last third, where a small writer drifts), plus
    `likelihood_weight` x the candidate's mean token log-probability under the writer
    where given. In an album the mean agreement alone lets a story about one picture win.
    """
    seen = list(captions) + [word for words in hints for word in words]

    def key(i: int) -> tuple:
        story = candidates[i]
        named = content_word_recall(story, captions, min_captions=1) or 0.0
        sentences = split_sentences(story)
        last_third = " ".join(sentences[len(sentences) - max(1, len(sentences) // 3):])
        balance = (agreement[i] + named / 2 - unseen_object_share(story, seen)
                   - unseen_object_share(last_third, seen))
        if likelihood:
            balance += likelihood_weight * likelihood[i]
        return (not blocked[i], meets_budget(story, budget), reaches_ending(story), caption_coverage(story, captions),
                balance)

    return max(range(len(candidates)), key=key)


@torch.no_grad()
def text_agreements(model, texts: Sequence[str], image_embeds: torch.Tensor) -> list[float]:
    """Mean cosine agreement of each text with the images under the model's contrastive heads (-1 for an empty
    one), the texts encoded in one batch (the picker's hot path)."""
    written = [i for i, text in enumerate(texts) if text.strip()]
    scores = [-1.0] * len(texts)
    if written:
        embeds = model.text_embedding([texts[i] for i in written])
        for i, row in zip(written, similarity(image_embeds, embeds).mean(dim=0).tolist()):
            scores[i] = row
    return scores


def meets_budget(story: str, budget: int) -> bool:
    """Within the tolerance a reader would accept for "about N words": 70% to 120% of the budget."""
    return 0.7 * budget <= len(story.split()) <= 1.2 * budget


class WriterLikelihood:
    """A logits processor that adds up each row's log-probability of the tokens it writes (under the scores it is
    given: the writer's, after penalties and before temperature and top-p) until the row's end of text."""

    def __init__(self, eos_token_id: int | Sequence[int]):
        self.eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        self.total = self.count = self.alive = self._last = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._last is None:
            self.total, self.count = torch.zeros(scores.shape[0]), torch.zeros(scores.shape[0])
            self.alive = torch.ones(scores.shape[0], dtype=torch.bool)
        elif input_ids.shape[1]:
            chosen = input_ids[:, -1].cpu()
            logprob = self._last.gather(1, chosen[:, None])[:, 0]
            counted = self.alive & torch.isfinite(logprob)
            self.total += torch.where(counted, logprob, 0.0)
            self.count += counted
            self.alive &= ~torch.isin(chosen, self.eos)
        self._last = scores.detach().float().log_softmax(-1).cpu()
        return scores

    def mean(self) -> list[float]:
        """Each row's mean log-probability per counted token."""
        return [] if self.total is None else (self.total / self.count.clamp(min=1)).tolist()
