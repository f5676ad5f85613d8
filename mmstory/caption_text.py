"""A chosen caption's text: where its subject is (`caption_subject`), what is mended (`tidy`, `agree_in_number`: the
forms a forced word leaves behind), the phrases that name a thing the picture does not show (`trim`: say less), and
its place said alone (`place`: say only that).

A caption written again from the classifier's word ("A hot dog ...") is finished by a decoder that learnt Flickr8k's
captions, and it goes on with Flickr8k's things ("... in front of a white boat", "... with a small black dog"). What
is left after the forced subject is cut into phrases (a verb, a direct object, a prepositional phrase), and a phrase
that names an unseen thing is dropped, with the verb whose object it was and any later phrase that points back at it
("in its mouth"). Written by hand: no parser on PyPI that this package could depend on is small enough for a
caption (spaCy's models alone are larger than mmstory-small).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from mmstory.text import CREATURE_GROUPS, OBJECT_FORMS, STOPWORDS, words

# the words that open a prepositional phrase ("of" continues one: "in front of a boat", "on the edge of a tree")
PREPOSITIONS = frozenset({
    "in", "on", "at", "with", "near", "by", "under", "over", "behind", "beside", "through", "into", "onto", "across",
    "along", "around", "from", "inside", "outside", "against", "toward", "towards", "beneath", "below", "above",
    "among", "between", "past", "next", "while", "down"})
BE = frozenset({"is", "are", "sits", "stands"})
POINTERS = frozenset({"its", "his", "her", "their", "it", "them"})  # a later phrase about a dropped thing
# what only a person or an animal does: after a forced thing, "A train is walking down the street." is the decoder's
# Flickr8k habit, and the verb goes ("A train on the street.")
ACTIONS = frozenset({
    "walking", "running", "jumping", "playing", "climbing", "riding", "swimming", "surfing", "skiing", "smiling",
    "looking", "eating", "dancing", "posing", "kicking", "throwing", "catching", "chasing", "reading", "laughing",
    "talking", "walks", "runs", "jumps", "plays", "climbs", "rides", "swims", "surfs", "skis", "smiles", "eats"})
# the path of a dropped action, said as a place: "[is walking] down the street" -> "on the street"
MOTION = {"down": "on", "along": "on", "across": "on", "over": "on", "onto": "on", "through": "in", "into": "in"}


def phrases(tail: list[str]) -> list[tuple[str, list[str]]]:
    """The words after the subject as (kind, words) phrases: kind "verb" ("is riding"), "object" (the words after
    a verb up to the next preposition: "a black horse"), or "place" (a prepositional phrase, "in front of a boat")."""
    out: list[tuple[str, list[str]]] = []
    for token in tail:
        bare = token.lower().strip(".,!?;:")
        kind = out[-1][0] if out else "place"
        if bare in BE:
            out.append(("verb", [token]))
        elif bare in PREPOSITIONS and not (out and out[-1][1][-1].lower() in ("next", "front", "top")):
            out.append(("place", [token]))
        elif kind == "verb" and len(out[-1][1]) >= 2 and not out[-1][1][-1].lower().endswith("ing"):
            out[-1][1].append(token)  # "is sitting" ends a verb; an adverb or particle stays with it
        elif kind == "verb" and len(out[-1][1]) >= 2:
            out.append(("object", [token]))
        elif out:
            out[-1][1].append(token)
        else:
            out.append(("place", [token]))
    return out


def trim(caption: str, keep: int, unseen: Callable[[str], bool], thing: bool = False) -> tuple[str, list[str]]:
    """`caption` without the phrases that name an unseen thing, and the phrases dropped. The first `keep` words (the
    forced subject, "A hot dog") always stay; `unseen(word)` says whether a word names a thing the picture lacks;
    `thing`: the subject is a thing, and a verb in `ACTIONS` goes with its object."""
    body = caption.strip().rstrip(".")
    tokens = body.split()
    if len(tokens) <= keep:
        return caption, []
    parts = phrases(tokens[keep:])
    said = [{t.lower().strip(".,!?;:") for t in part} for _, part in parts]
    names_unseen = [any(unseen(w) for w in phrase) for phrase in said]
    kept: list[int] = []
    dropped: list[int] = []
    for i, (kind, _) in enumerate(parts):
        if kind == "verb":
            # its subject was cut off ("A toilet [of a dog] are playing"), or its object goes ("[is riding] a horse")
            object_unseen = i + 1 < len(parts) and parts[i + 1][0] == "object" and names_unseen[i + 1]
            gone = names_unseen[i] or bool(dropped) or object_unseen or (thing and bool(ACTIONS & said[i]))
        elif kind == "object":
            gone = names_unseen[i] or i - 1 in dropped
        else:
            gone = names_unseen[i] or bool(dropped and POINTERS & said[i])
        (dropped if gone else kept).append(i)
    if not dropped:
        return caption, []
    for i in [i for i in dropped if parts[i][0] == "verb" and ACTIONS & said[i]]:
        after = i + 1
        if after in kept and parts[after][0] == "place":  # the path of what went: "[is walking] down the street"
            lead = parts[after][1][0].lower()
            if lead == "with":
                kept.remove(after)
                dropped.append(after)  # "[is playing] with a stick"
            elif lead in MOTION:
                parts[after] = ("place", [MOTION[lead], *parts[after][1][1:]])
        for later in [j for j in kept if j > i and parts[j][1][0].lower() == "while"]:
            kept.remove(later)
            dropped.append(later)  # "... while another watches": someone else at the dropped action
    singular = tokens[0].lower() in ("a", "an")
    if kept and parts[kept[-1]][0] == "verb" and kept[-1] + 1 in dropped and singular and (
            parts[kept[-1]][1][0].lower() == "are"):
        dropped.append(kept.pop())  # a plural verb left without its phrase: "A cauliflower [are playing]"
    text = " ".join(tokens[:keep] + [t for i in kept for t in parts[i][1]]).rstrip(",;:")
    return text + ".", [" ".join(parts[i][1]) for i in sorted(dropped)]


# prepositions that open no place ("with a ball", "while running"); and the words between a preposition and its
# place ("in front of a fountain", "on the top of a wall", "next to a tree")
NOT_PLACES = frozenset({"with", "while", "from", "past", "between", "among"})
# "in the air" is where a jump goes, not a place a caption (or a story) can be about
NOT_A_PLACE = frozenset({"air", "mid-air", "midair"})
COLOURS = frozenset({"white", "black", "brown", "red", "blue", "green", "yellow", "pink", "orange", "purple", "grey",
                     "gray", "tan", "golden", "silver"})
PLACE_LEADS = frozenset({"front", "top", "edge", "side", "middle", "the"})


def place(caption: str, subject: int) -> str | None:
    """The first place after the caption's subject (its word index), as a caption of its own: "A brown dog is sitting
    in a room." -> "A room."; None when the caption names no place."""
    tokens = caption.strip().rstrip(".").split()
    for kind, part in phrases(tokens[subject + 1:]):
        if kind != "place" or part[0].lower() in NOT_PLACES:
            continue
        rest = part[1:]
        lowered = [t.lower() for t in rest]
        for lead in ("of", "to"):
            if lead in lowered[:3] and all(w in PLACE_LEADS for w in lowered[:lowered.index(lead)]):
                rest = rest[lowered.index(lead) + 1:]
                break
        text = " ".join(rest).rstrip(",;:")
        if text and text.lower().split()[-1] in NOT_A_PLACE:
            continue
        if text:
            return text[0].upper() + text[1:] + "."
    return None


def says_twice(caption: str) -> bool:
    """The caption names something twice ("A shuttle into the air in the air.", "on a snow covered in the snow"):
    a language model finds a repeat likely, a reader finds it broken. Colours may repeat ("a white shirt ... a
    white wall")."""
    said = [w for w in words(caption) if w not in STOPWORDS and w not in COLOURS]
    return len(said) != len(set(said))


def tidy(caption: str, singular: dict[str, str]) -> str:
    """"A woman is sitting on a buses." -> "... on a bus."; "A baseball baseball player" -> "A baseball player";
    "A elephant" -> "An elephant": an added or copied word may be written in either number or after the wrong
    article, and a caption made to start with a word may say it again."""
    out: list[str] = []
    for token in caption.split(" "):
        if out and token.lower() == out[-1].lower() and token.isalpha():
            continue
        bare = token.rstrip(".,!?;:")
        if out and out[-1].lower() in ("a", "an") and bare.lower() in singular:
            token = singular[bare.lower()] + token[len(bare):]
        if out and out[-1].lower() in ("a", "an") and token[:1].isalpha():
            # a copied word takes its article ("A elephant"); "u" and "h" words are left as written ("a uniform")
            first = token[0].lower()
            article = "an" if first in "aeio" else "a" if first not in "uh" else out[-1].lower()
            out[-1] = article.capitalize() if out[-1][0].isupper() else article
        out.append(token)
    return " ".join(out)


def article(word: str) -> str:
    return "An" if word[:1].lower() in "aeiou" else "A"


def caption_subject(caption: str) -> int | None:
    """The index (in `caption.split()`) of the caption's subject: its first person or animal word among the first
    eight ("A black and white dog is ..." -> 4), or None."""
    for i, token in enumerate(caption.split()[:8]):
        found = words(token)
        if found and OBJECT_FORMS.get(found[0]) in CREATURE_GROUPS:
            return i
    return None


def subject_group(caption: str) -> str | None:
    """The object group of the caption's subject ('person', 'dog', ...), or None."""
    subject = caption_subject(caption)
    return None if subject is None else OBJECT_FORMS[words(caption.split()[subject])[0]]


def agree_in_number(caption: str, mass: Iterable[str]) -> str:
    """"Some coffee are ..." -> "Some coffee is ...": a mass noun a caption was made to start with takes a singular
    verb, which a decoder that learnt "Some dogs are" does not know."""
    for word in mass:
        start = f"Some {word} are "
        if caption.startswith(start):
            return f"Some {word} is " + caption[len(start):]
    return caption


# what a caption's subject does ("sits", "runs", "skis"), as the caption decoder writes it, beside `BE`; "-ing" words
# are verbs but for the nouns below
_VERB_TEXT = """sit stand run runs jump jumps play plays pose poses look looks ride rides ski skis drive drives climb
climbs walk walks paddle paddles swim swims lie lies lay lays hold holds wait waits fly flies eat eats watch watches"""
VERBS = BE | frozenset(_VERB_TEXT.split())
_ING_NOUN_TEXT = """building buildings railing railings ceiling clothing painting paintings wedding evening
morning king ring rings thing things something string swing wing wings"""
ING_NOUNS = frozenset(_ING_NOUN_TEXT.split())
NUMBERS = frozenset({"two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "many", "several"})


def is_fragment(caption: str) -> bool:
    """"A plate on the lap." has no verb: a caption, not yet a story's first sentence. A word right after an article
    is a noun ("A ski on the beach.")."""
    tokens = _lowered(caption)
    return not any((t in VERBS and i > 1 and tokens[i - 1] not in ("a", "an", "the"))
                   or (t.endswith("ing") and len(t) > 5 and t not in ING_NOUNS) for i, t in enumerate(tokens))


def plural_subject(caption: str) -> bool:
    """"Two trains on the street", "Some apples": the fragment's subject is more than one."""
    tokens = _lowered(caption)
    if not tokens or tokens[0] in ("a", "an", "one"):
        return False
    if tokens[0] in NUMBERS:
        return True
    head = next((t for t in tokens[1:] if t in PREPOSITIONS or t == "of"), None)
    nouns = tokens[1: tokens.index(head)] if head else tokens[1:]
    return bool(nouns) and nouns[-1].endswith("s") and not nouns[-1].endswith("ss")


def _lowered(caption: str) -> list[str]:
    """The caption's words as written, lower-cased, without the commas and the final period."""
    return [t.strip(".,").lower() for t in caption.split()]
