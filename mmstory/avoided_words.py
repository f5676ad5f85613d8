"""Words a story may not write, and the token-level bans that keep them out of the writer's choices.

A word the tokenizer spells with one token is suppressed outright (`suppress_tokens`); a longer one ("policeman" is
" police" + "man") is banned as a sequence, its last token refused after the others (transformers'
`NoBadWordsLogitsProcessor`), so that " police" alone or "man" inside another word stays writable.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import NoBadWordsLogitsProcessor

from mmstory.caption_policy import CaptionChoice
from mmstory.config import GenerationConfig
from mmstory.text import FEMALE_WORDS, MALE_WORDS, PERSON_WORDS, names_person, sexes_named

FIRST_PERSON = ("I", "I'm", "I've", "I'd", "I'll", "me", "my", "mine", "myself", "we", "we're", "us", "our", "ours",
                "ourselves")


@dataclass
class AvoidedWords:
    """One story's bans: single tokens to suppress, and token sequences whose last token is refused after the rest."""

    tokens: list[int] = field(default_factory=list)
    sequences: list[list[int]] = field(default_factory=list)

    def processor(self, eos_token_id: int | Sequence[int]) -> NoBadWordsLogitsProcessor | None:
        """The logits processor for the multi-token words (None when there are none)."""
        return NoBadWordsLogitsProcessor(self.sequences, eos_token_id) if self.sequences else None


def _spellings(word: str, spaced_only: bool) -> list[str]:
    """The word as written after a space, in lower and sentence case, and (unless `spaced_only`) without the space."""
    forms = sorted({word, word.lower(), word[:1].upper() + word[1:]})
    return [text for form in forms for text in ((" " + form,) if spaced_only else (form, " " + form))]


@functools.lru_cache(maxsize=32)
def _encoded(tokenizer, words: tuple[str, ...], spaced_only: bool) -> tuple[tuple[int, ...], ...]:
    """Every spelling of every word, tokenized once per tokenizer and word list: a story request would otherwise
    tokenize the ~300 person words again (80 ms)."""
    return tuple(tuple(tokenizer(text, add_special_tokens=False).input_ids)
                 for word in words for text in _spellings(word, spaced_only))


def word_token_ids(tokenizer, words: Sequence[str], spaced_only: bool = False) -> list[int]:
    """The tokenizer's single-token spellings of each word (with and without a leading space, lower and sentence
    case): what `suppress_tokens` needs to keep a word out of a story. `spaced_only`: only the spellings that start
    a word after a space, so that a short word's piece inside longer words ("son" in "season") stays writable."""
    return sorted({ids[0] for ids in _encoded(tokenizer, tuple(words), spaced_only) if len(ids) == 1})


def word_token_sequences(tokenizer, words: Sequence[str]) -> list[list[int]]:
    """The multi-token spellings of each word after a space (lower and sentence case): what `word_token_ids` cannot
    suppress without banning a piece that other words share."""
    return [list(ids) for ids in sorted(set(_encoded(tokenizer, tuple(words), True))) if len(ids) > 1]


def avoided_words(tokenizer, config: GenerationConfig, choices: Sequence[CaptionChoice], prompt: str | None,
                  previous: str | None, dark: bool = False) -> AvoidedWords:
    """One story's bans: the config's avoided words, grim words unless the request is `dark`, person words (in every
    spelling) where nothing shows a person, the other sex's words where the pictures show one, first-person words
    where the story is to stay in the third person."""
    avoided = AvoidedWords(word_token_ids(tokenizer, config.story_avoid_words))
    tokens = set(avoided.tokens)
    if not dark:  # " devoured" is " dev" + "oured": grim words need their sequences too
        tokens.update(word_token_ids(tokenizer, config.story_grim_words, spaced_only=True))
        avoided.sequences += word_token_sequences(tokenizer, config.story_grim_words)
    if not people_shown(choices, prompt, previous, config):
        tokens.update(word_token_ids(tokenizer, PERSON_WORDS, spaced_only=True))
        avoided.sequences += word_token_sequences(tokenizer, PERSON_WORDS)
    other = other_sex_words(choices, prompt, previous) if config.story_cast_from_pictures else ()
    if other:
        tokens.update(word_token_ids(tokenizer, other, spaced_only=True))
        avoided.sequences += word_token_sequences(tokenizer, other)
    if config.story_third_person and not first_person(prompt) and not first_person(previous):
        tokens.update(word_token_ids(tokenizer, FIRST_PERSON, spaced_only=True))
    avoided.tokens = sorted(tokens)
    return avoided


def people_shown(choices: Sequence[CaptionChoice], prompt: str | None, previous: str | None,
                 config: GenerationConfig) -> bool:
    """A story may name people: a picture shows one (its caption policy says so), the request speaks of one, or the
    model's generation config lets the writer bring them in (`story_people_from_pictures` off)."""
    if not config.story_people_from_pictures:
        return True
    return any(choice.people for choice in choices) or names_person(prompt or "") or names_person(previous or "")


def other_sex_words(choices: Sequence[CaptionChoice], prompt: str | None, previous: str | None) -> tuple[str, ...]:
    """The words of the sex no picture shows, where the captions name people of one sex only and the request names
    no other (else none)."""
    shown = set().union(*(sexes_named(choice.caption) for choice in choices))
    asked = sexes_named(prompt or "") | sexes_named(previous or "")
    if len(shown) != 1 or asked - shown:
        return ()
    return FEMALE_WORDS if shown == {"male"} else MALE_WORDS


def first_person(text: str | None) -> bool:
    """The text speaks in the first person (then a story continuing it or asked for with it may too)."""
    return bool(text) and any(w.lower() in {f.lower() for f in FIRST_PERSON} for w in re.findall(r"[A-Za-z']+", text))
