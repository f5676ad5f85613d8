"""The caption decoder's open vocabulary: every ImageNet word (and its plural) as compact ids, the ones the training
captions never used added after the fitted vocabulary with a known word's embedding (`CaptionDecoder.set_added_words`).

Which known word each new one borrows from is `resources/word_donors.json`: per word, known caption nouns ranked by
the text encoder's similarity (all-MiniLM-L6-v2; `scripts/make_word_donors.py` writes it). A model takes the first
of them its fitted vocabulary has among its most frequent words.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from mmstory.imagenet_words import ImageNetWords, plural
from mmstory.text import CREATURE_GROUPS, OBJECT_FORMS

DONORS_FILE = Path(__file__).parent / "resources" / "word_donors.json"
DONOR_RANK = 2000  # a donor must be among the fitted vocabulary's this many most frequent ids: a word it writes well
# without the open vocabulary, a word must be one of the fitted vocabulary's this many most frequent ids: one the
# training captions use often enough to write around
CONCEPT_VOCABULARY = 2000
# with the open vocabulary, a word the fitted vocabulary has but the training captions used so rarely (rank past
# this) that its embedding learnt little is added too, with a donor, like a word they never used
KNOWN_RANK = 3000


@functools.cache
def word_donors() -> dict[str, list[str]]:
    return json.loads(DONORS_FILE.read_text())


def _compact_word(decoder, tokenizer, word: str, max_rank: int | None = None) -> int | None:
    """The compact id of a word that is one token of the fitted vocabulary (within `max_rank`), or None."""
    ids = tokenizer(" " + word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        return None
    rank = int(decoder.compact_table()[ids[0]])
    limit = decoder.SPECIALS + (max_rank if max_rank is not None else decoder.base_size)
    return rank if decoder.SPECIALS <= rank < limit else None


def creature_forms(decoder, tokenizer) -> dict[str, tuple[int, ...]]:
    """Per person or animal group ('dog', 'person', ...), the compact ids of its words that are one token of the
    fitted vocabulary ("dog", "dogs", "puppy", ...): what a caption may not write once the classifier has ruled that
    subject out."""
    ids: dict[str, set[int]] = {}
    for form, group in OBJECT_FORMS.items():
        found = _compact_word(decoder, tokenizer, form) if group in CREATURE_GROUPS else None
        if found is not None:
            ids.setdefault(group, set()).add(found)
    return {group: tuple(sorted(found)) for group, found in ids.items()}


def word_forms(decoder, tokenizer, table: ImageNetWords, open_vocabulary: bool) -> dict[str, tuple[int, ...]]:
    """Each ImageNet word's compact ids (singular, plural). With `open_vocabulary`, every word the fitted vocabulary
    lacks is added to `decoder` (a word with no usable donor is left out); without, only words among the fitted
    vocabulary's CONCEPT_VOCABULARY most frequent ids count, and `decoder` has no added words."""
    donors = word_donors()
    forms_of: dict[str, tuple[int, ...]] = {}
    pieces: list[list[int]] = []
    donor_ids: list[int] = []
    base = decoder.base_size

    def known_or_added(form: str, donor_form: str | None) -> int | None:
        known = _compact_word(decoder, tokenizer, form, KNOWN_RANK if open_vocabulary else CONCEPT_VOCABULARY)
        if known is not None or not open_vocabulary:
            return known
        donor = None if donor_form is None else _compact_word(decoder, tokenizer, donor_form, DONOR_RANK)
        if donor is None:
            return None
        pieces.append(tokenizer(" " + form, add_special_tokens=False).input_ids)
        donor_ids.append(donor)
        return base + len(pieces) - 1

    for word in table.words:
        usable = [d for d in donors.get(word.text, []) if _compact_word(decoder, tokenizer, d, DONOR_RANK) is not None]
        donor = usable[0] if usable else None
        plural_donor = None
        if donor is not None:
            plural_donor = plural(donor) if _compact_word(decoder, tokenizer, plural(donor), DONOR_RANK) else donor
        ids = [known_or_added(word.text, donor), known_or_added(word.plural, plural_donor)]
        ids = [i for i in dict.fromkeys(ids) if i is not None]
        if ids:
            forms_of[word.text] = tuple(ids)
    decoder.set_added_words(pieces, donor_ids, word_starts(decoder, tokenizer) if pieces else None)
    return forms_of


def word_starts(decoder, tokenizer) -> torch.Tensor:
    """[base_size]: True for the fitted vocabulary's ids that begin a new word (a leading space in the tokenizer's
    byte-level pieces, or a comma): what may follow a word the caption was made to start with, so that "A
    microwave" does not go on "-haired"."""
    ids = decoder.token_ids.tolist()
    pieces = tokenizer.convert_ids_to_tokens([max(t, 0) for t in ids])
    starts = [t >= 0 and (p.startswith(("Ġ", "▁", " ")) or p == ",") for t, p in zip(ids, pieces)]
    return torch.tensor(starts, dtype=torch.bool)
