"""A story's plot as beats the writer must open: a want, a turn and an ending, each started by a few forced words.

A 135M writer left alone describes the picture and drifts ("This dog has a very small mouth ..."): nobody wants
anything and nothing happens. Plan-and-write story generation (Yao et al., AAAI 2019) and TinyStories' plot prompts
give a small model the story's shape and let it fill in the words. Here the shape is cheap: once the story has
reached a beat's share of the word budget and a sentence has just ended, the next tokens are forced to the beat's
opening words ("One day, the black dog wanted", "But", "In the end,"), and the writer goes on from them.

`BeatProcessor` is a transformers `LogitsProcessor` and keeps no state between calls (it reads each row's tokens), so
it works the same in `generate` (beam search reorders rows), `FastDecoder` and the server's shared decode loop.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from mmstory.imagenet_words import imagenet_words
from mmstory.story_text import ENDS_SENTENCE
from mmstory.text import CLOTHING_GROUPS, CREATURE_GROUPS, FOOD_GROUPS, OBJECT_FORMS, THING_GROUPS, words


@dataclass(frozen=True)
class Beat:
    """Forced words, and the share of the word budget the story must have reached before they may start."""

    words: str
    at: float


# per beat, phrasings a candidate picks from ("{who}": the caption's subject, "the black dog"); by style or tone
WANT = ("One day, {who} wanted", "More than anything, {who} wanted", "That morning, {who} wanted")
TURN = {"default": ("But", "Then, all of a sudden,", "But then"), "adventure": ("Suddenly,", "But then"),
        "mystery": ("Then something strange happened:", "But"), "negative": ("But", "Then, sadly,")}
ENDING = {"default": ("In the end,", "At last,"), "bedtime": ("When night came,", "At last, sleepy and happy,"),
          "negative": ("In the end, sadly,", "But in the end,")}
PREPOSITIONS = frozenset({"of", "in", "on", "with", "at", "by", "near", "from", "under", "behind"})
GROUP_NOUNS = frozenset({"group", "crowd", "herd", "flock", "pack", "team", "family", "pair", "couple", "bunch",
                         "litter", "line", "lot"})  # "a group of people" are people
SHARES = (0.1, 0.4, 0.7)  # where the want, the turn and the ending may start, as shares of the word budget
NO_BEATS = ("poem",)  # forms whose shape is not a plot: a poem gets lines (PoemLines) instead
LINE_WORDS = 4  # a poem's line breaks after a comma or a sentence end once it has this many words
SHORT_SENTENCE = 10  # words after which a story for children is pushed to end its sentence
PERIOD_BONUS = 4.0  # added to the period's logit then: a push, not a cut


def reaches_ending(story: str) -> bool:
    """The story got as far as an ending beat ("In the end,", "When night came,", ...): the word budget cuts some
    candidates off after the turn, and a story that stops at "Then, all of a sudden, ..." has no end."""
    return any(opening in story for openings in ENDING.values() for opening in openings)


def subject_words(caption: str) -> list[str] | None:
    """The caption's words up to its subject: a person or an animal ("A black and white dog is ..." -> "a black and
    white dog", "A tennis player" -> "a tennis player"), else the thing its first phrase names ("A plate of a black
    and white dog" -> "a plate"); None for a place ("A room.": where a story happens, not who it is about)."""
    tokens = caption.strip().rstrip(".").split()
    thing = None
    for i, token in enumerate(tokens[:8]):
        if i and token.lower() in PREPOSITIONS and tokens[i - 1].lower() not in GROUP_NOUNS:
            break
        found = words(token)
        kind = _kind(found[0]) if found else None
        if kind == "creature":
            return [tokens[0].lower(), *tokens[1: i + 1]]
        if kind == "thing":
            thing = i
    if thing is None:
        return None
    return [tokens[0].lower(), *tokens[1: thing + 1]]


def _kind(word: str) -> str | None:
    """"creature" (a person or an animal: Flickr8k's words and every ImageNet animal's), "food", "thing" or None (a
    place, or a word no list knows). A thing may want something, as Andersen's darning needle and fir tree do; food
    is what someone wants ("the food wanted to be sold at a price of $1.50")."""
    table = imagenet_words()
    word = table.singular.get(word, word)
    group = OBJECT_FORMS.get(word)
    if group in CREATURE_GROUPS or word in table.animal_words:
        return "creature"
    if group in FOOD_GROUPS or word in table.food_words:
        return "food"
    if (group in THING_GROUPS and group not in CLOTHING_GROUPS) or word in table.thing_words:
        return "thing"
    return None


def named_again(subject: list[str]) -> str:
    """The subject as the story names it a second time: "a black dog" -> "the black dog", "two dogs" -> "the two
    dogs"."""
    rest = subject[1:] if subject[0] in ("a", "an", "the", "some") else subject
    return " ".join(["the", *rest]).rstrip(",")


def plan_beats(caption: str, style: str | None = None, tone: str | None = None, seed: int = 0) -> list[Beat]:
    """The beats of one candidate (`seed` picks among the phrasings, so candidates differ): a fairy tale first opens
    with "Once upon a time, there lived <the caption's subject>"; a poem gets none."""
    key = (style or "").strip().lower()
    if key in NO_BEATS:
        return []
    mood = "negative" if (tone or "").strip().lower() == "negative" else None
    pick = random.Random(seed).choice
    subject = subject_words(caption)
    turn = pick(TURN.get(key) or TURN.get(mood) or TURN["default"])
    ending = pick(ENDING.get(key) or ENDING.get(mood) or ENDING["default"])
    beats = [Beat(turn, SHARES[1]), Beat(ending, SHARES[2])]
    if subject:  # a thing's want is forced to a verb: "the food wanted by everyone was ..." is no want
        want = pick(WANT).format(who=named_again(subject))
        beats.insert(0, Beat(want if _kind(words(subject[-1])[0]) == "creature" else want + " to", SHARES[0]))
    if key == "fairy tale":
        beats.insert(0, Beat("Once upon a time, there lived " + " ".join(subject).rstrip(",") if subject else
                             "Once upon a time,", 0.0))
    return beats


def story_shape(tokenizer, caption: str, style: str | None, tone: str | None, audience: str | None, budget: int,
                opening: str, rows: int, seed: int = 0) -> list[LogitsProcessor]:
    """The logits processors that give one request's `rows` candidates their shape: a poem's lines; else the beats
    (each candidate its own phrasings), and short sentences for children."""
    if (style or "").strip().lower() == "poem":
        return [PoemLines(tokenizer, opening)]
    shape: list[LogitsProcessor] = [BeatProcessor(tokenizer, [plan_beats(caption, style, tone, seed=seed + row)
                                                              for row in range(rows)], budget, opening)]
    if (audience or "").strip().lower() == "children":
        shape.insert(0, ShortSentences(tokenizer, opening))
    return shape


class PoemLines(LogitsProcessor):
    """A poem has lines: once a line has `LINE_WORDS` words and ends at a comma or a sentence end, the next token is
    a line break (the writer, trained on prose, otherwise writes a poem as one paragraph)."""

    def __init__(self, tokenizer, opening: str = ""):
        self.tokenizer, self.opening = tokenizer, opening
        self.newline = tokenizer("\n", add_special_tokens=False).input_ids[-1]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in range(input_ids.shape[0]):
            text = self.opening + self.tokenizer.decode(input_ids[row].tolist(), skip_special_tokens=True)
            line = text.rsplit("\n", 1)[-1]
            if len(line.split()) >= LINE_WORDS and re.search(r"[,;:.!?][\"'”’)]*$", line):
                scores[row] = float("-inf")
                scores[row, self.newline] = 0.0
        return scores


class ShortSentences(LogitsProcessor):
    """Simple words for children start with short sentences: past `SHORT_SENTENCE` words the period's logit is
    raised (the writer learnt from tales whose sentences run to thirty words)."""

    def __init__(self, tokenizer, opening: str = ""):
        self.tokenizer, self.opening = tokenizer, opening
        self.period = tokenizer(".", add_special_tokens=False).input_ids[-1]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in range(input_ids.shape[0]):
            text = self.opening + self.tokenizer.decode(input_ids[row].tolist(), skip_special_tokens=True)
            if len(re.split(r"[.!?]\s", text)[-1].split()) >= SHORT_SENTENCE:
                scores[row, self.period] += PERIOD_BONUS
        return scores


class BeatProcessor(LogitsProcessor):
    """Forces each row's next beat once its story (opening + new tokens) ends a sentence past the beat's share of the
    word budget. `plans`: one beat list per candidate (rows past their number reuse them in turn)."""

    def __init__(self, tokenizer, plans: Sequence[Sequence[Beat]], budget: int, opening: str = ""):
        self.tokenizer, self.budget, self.opening = tokenizer, budget, opening
        self.plans = [[(self._ids(beat.words, first=not opening and beat.at <= 0), beat.at * budget) for beat in plan]
                      for plan in plans] or [[]]

    def _ids(self, text: str, first: bool) -> list[int]:
        return self.tokenizer(text if first else " " + text, add_special_tokens=False).input_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in range(input_ids.shape[0]):
            token = self._forced(input_ids[row].tolist(), self.plans[row % len(self.plans)])
            if token is not None:
                scores[row] = float("-inf")
                scores[row, token] = 0.0
        return scores

    def _forced(self, ids: list[int], plan: list[tuple[list[int], float]]) -> int | None:
        start = 0
        for beat, at in plan:
            found = _find(ids, beat, start)
            if found >= 0:
                start = found + len(beat)
                continue
            for j in range(len(beat) - 1, 0, -1):  # inside the beat's words: the next one
                if ids[len(ids) - j:] == beat[:j] and self._sentence_ended(ids[: len(ids) - j], at):
                    return beat[j]
            return beat[0] if self._sentence_ended(ids, at) else None
        return None

    def _sentence_ended(self, ids: list[int], at: float) -> bool:
        text = self.opening + self.tokenizer.decode(ids, skip_special_tokens=True)
        if not text.strip():
            return at <= 0
        closed = text.count('"') % 2 == 0 and text.count("“") <= text.count("”")  # not inside what someone says
        return closed and len(text.split()) >= at and bool(ENDS_SENTENCE.search(text.rstrip()))


def _find(ids: list[int], part: list[int], start: int) -> int:
    for i in range(start, len(ids) - len(part) + 1):
        if ids[i: i + len(part)] == part:
            return i
    return -1
