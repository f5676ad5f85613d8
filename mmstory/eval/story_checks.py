"""Simple, readable checks on a story's form: is it told by an album narrator, does it bring in people the picture
does not show, does it repeat itself, and does it follow the style, tone and audience asked for.

Each check is a rule a reader can verify by eye, not a model: they count what the issue names ("I", "we", "this
photo"; a fairy tale that opens like one; a calm bedtime story ...), so a pass is necessary, not sufficient. Reading
the stories stays part of every comparison (docs/stories.md).
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


# the album narrator: a first-person teller or one who points at the picture
NARRATOR = re.compile(r"\b(I|I'm|I've|I'd|I'll|me|my|we|we're|we've|us|our|this (photo|picture|image|shot)|here is|"
                      r"here's|here are)\b", re.I)
PERSON_NOUNS = wordset("""man men woman women boy boys girl girls child children kid kids baby people person persons
    family friend friends mother father mom dad mum brother sister son daughter grandmother grandfather grandma grandpa
    husband wife lady ladies gentleman guy guys player players rider riders crowd tourist tourists couple king queen
    prince princess farmer teacher owner parents""")  # no pronouns: a dog is "he" too
FAIRY_OPENING = re.compile(r"^\W*(once upon a time|once,? long ago|long,? long ago|long ago|there (was|were|lived) once"
                           r"|once there (was|were|lived)|in a (land|kingdom|village) far)", re.I)
ALARM = wordset("""scream screamed screaming shout shouted shouting danger dangerous monster monsters terrified terror
    explode exploded crash crashed fight fought blood bloody kill killed attack attacked chase chased fear afraid
    panic storm thunder gun guns war""")
CHEERFUL = wordset("""happy happily happiest joy joyful fun funny laugh laughed laughing laughter smile smiled smiling
    wonderful amazing great excited exciting delighted cheerful love loved lovely beautiful bright sunny celebrate
    celebrated glad best""")
DARK = wordset("""sad sadly sorrow alone lonely cold lost cried cry crying tears gloomy grey gray empty silent
    quiet dark darkness never gone lonely fear afraid dead died death rain shadow shadows nobody forgotten tired
    broken""")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def without_speech(story: str) -> str:
    """The story without what its characters say aloud ("'Help me!' cried the fox" is still told about the fox)."""
    return re.sub(r'"[^"]*"|\u201c[^\u201d]*\u201d', " ", story)


def album_narrator(story: str) -> bool:
    """Told by an "I" or "we", or pointing at the picture ("this photo", "here is"), outside quoted speech: VIST's
    album commentary."""
    return bool(NARRATOR.search(without_speech(story)))


def people_in(text: str) -> set[str]:
    """The person nouns a text names ("a man", "the children"); pronouns are left out (a dog is "he" too)."""
    return {w for w in words(text) if w in PERSON_NOUNS}


def invented_people(story: str, references: Sequence[str]) -> bool:
    """The story names people although no reference caption of the photo names anyone."""
    return bool(people_in(story)) and not any(people_in(r) for r in references)


def repetition(story: str, n: int = 3) -> float:
    """The share of the story's word n-grams that already occurred earlier in it (0: none repeats)."""
    tokens = words(story)
    grams = [tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)]
    return 0.0 if not grams else 1 - len(set(grams)) / len(grams)


def long_word_share(story: str, letters: int = 8) -> float:
    tokens = words(story)
    return sum(len(w) > letters for w in tokens) / max(len(tokens), 1)


def mean_sentence_words(story: str) -> float:
    sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n+", story) if s.strip()]
    return sum(len(s.split()) for s in sentences) / max(len(sentences), 1)


def style_check(story: str, style: str | None = None, tone: str | None = None,
                audience: str | None = None) -> dict[str, bool]:
    """One pass/fail per thing asked that has a simple rule (keys: the request's style, tone or audience).

    fairy tale: opens like one ("Once upon a time", "Long ago", "There once was"). bedtime: calm, no alarm words
    (scream, danger, monster ...) and at most one "!". poem: at least four lines. children: simple words, at most
    6% longer than 8 letters and sentences of 14 words or fewer on average. negative tone: not cheerful, more dark
    words (sad, alone, cold ...) than cheerful ones (happy, fun, wonderful ...) and no "!".
    """
    tokens = words(story)
    out = {}
    if style == "fairy tale":
        out["fairy tale"] = bool(FAIRY_OPENING.match(story))
    if style == "bedtime":
        out["bedtime"] = not ALARM & set(tokens) and story.count("!") <= 1
    if style == "poem":
        out["poem"] = len([line for line in story.splitlines() if line.strip()]) >= 4
    if audience == "children":
        out["children"] = long_word_share(story) <= 0.06 and mean_sentence_words(story) <= 14
    if tone == "negative":
        cheer, dark = sum(w in CHEERFUL for w in tokens), sum(w in DARK for w in tokens)
        out["negative"] = dark > cheer and "!" not in story
    return out

