"""What the ImageNet classifier vouches for, as the caption policy asks it: whether a caption names a word, and
whether a captioned person, animal or thing has the classifier's support (`mmstory.caption_policy` decides what to
do about it)."""

from __future__ import annotations

from typing import Protocol

import torch

from mmstory.config import GenerationConfig
from mmstory.imagenet_words import ImageNetWords, Word
from mmstory.text import CLOTHING_GROUPS, CREATURE_GROUPS, OBJECT_FORMS, THING_GROUPS, names_person, words

# ImageNet-1k's order: the animals come first; dogs and house cats are the ones people are photographed with
ANIMAL_CLASSES, DOG_CLASSES, HOUSE_CAT_CLASSES = range(0, 398), range(151, 269), range(281, 286)
# what a thing stands, lies or sits on or in: ImageNet's "dining table" or "stone wall" is the whole object, never
# the surface a photo shows under a laptop or behind a sink, and its only bed is the four-poster, so the classifier
# does not vouch for these and trimming does not ask it
SURFACES = frozenset({"table", "wall", "door", "window", "stairs", "fence", "roof", "bed"})
# a captioned animal needs at least this share of the sure word's confidence behind its own word
ANIMAL_SHARE = 0.25


class CaptionPlan(Protocol):
    """What the evidence reads of `mmstory.caption_policy.CaptionPlan` (named here, not imported: no import circle)."""

    pooled: torch.Tensor
    probs: torch.Tensor
    opening: str


def names(caption: str | list[str], word: Word) -> bool:
    """The caption (text, or its `words`) names the word, its kind or its object group."""
    said = words(caption) if isinstance(caption, str) else caption
    named = set(said) | {OBJECT_FORMS[w] for w in said if w in OBJECT_FORMS}
    text = " ".join(said)
    return bool(named & kind(word)) or f" {word.text} " in f" {text} " or f" {word.plural} " in f" {text} "


def kind(word: Word) -> set[str]:
    """What a caption may call this word's creature or thing: its own words, its object group, dog or cat."""
    own = {word.text, word.plural} if " " in word.text else set(word.text.split()) | set(word.plural.split())
    if set(word.classes) <= set(DOG_CLASSES):
        own.add("dog")
    elif set(word.classes) <= set(HOUSE_CAT_CLASSES):
        own.add("cat")
    return own | {OBJECT_FORMS[w] for w in own if w in OBJECT_FORMS}


class Evidence:
    """The classifier's support for what a caption names, under one model's settings and word table."""

    def __init__(self, config: GenerationConfig, table: ImageNetWords):
        self.config, self.table = config, table

    def supported(self, plan: CaptionPlan, group: str, rival: float = 0.0) -> bool:
        """The classifier gives a captioned person or animal some support: clothes or sports kit for a person
        (`caption_person_evidence`); for an animal its own word ("dog": the 118 breeds pooled), or any animal where
        ImageNet has no word for it, at `caption_animal_support` and at ANIMAL_SHARE of a `rival` word's confidence."""
        if group == "person":
            return self.table.person_evidence(plan.probs) >= self.config.caption_person_evidence
        support = (self.table.confidence(plan.pooled, group) if group in self.table.index
                   else self.table.animal_mass(plan.probs))
        return support >= max(self.config.caption_animal_support, ANIMAL_SHARE * rival)

    def seen(self, plan: CaptionPlan, word: str) -> bool:
        """A caption word names something the picture may show: not a thing, or a thing the classifier supports;
        people and surfaces are never judged (no ImageNet class is a person or a floor), and clothes only on a
        thing ("An apple in a green dress": a thing wears none)."""
        group = OBJECT_FORMS.get(word)
        if group is None or group not in THING_GROUPS or group in SURFACES or group == "person":
            return True
        if group in CLOTHING_GROUPS:
            return self.wearer(plan.opening)
        if group in CREATURE_GROUPS:
            return self.supported(plan, group)
        known = [w for w in (word, self.table.singular.get(word, word), group) if w in self.table.index]
        return not known or self.table.confidence(plan.pooled, known[0]) >= self.config.caption_trim

    def wearer(self, opening: str) -> bool:
        """The forced opening ("A baseball player", "A zebra") names a person or an animal: it may wear clothes."""
        text = opening.split(" ", 1)[-1]
        word = self.table.words[self.table.index[text]] if text in self.table.index else None
        return names_person(text) or (word is not None and set(word.classes) <= set(ANIMAL_CLASSES))
