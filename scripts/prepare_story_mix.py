"""Prepare a mix of public-domain tales and third-person VIST stories for the story writer, outside the repository.

The VIST-only writer learnt album commentary ("I took a good shot ..."): no one wants anything and nothing ends. The
tales below have what it lacks: a small cast, a want, a turn and an end, told in the third person.

Sources (Project Gutenberg texts of authors dead for more than 70 years, as republished in these GitHub repositories):

    prakash2903/FairyTaleGenerator   data/fairy_tales.txt       Andersen, Fairy Tales (tr. H. L. Braekstad)   fairy tale
    lpodol/books                     andersen.txt               Andersen's Fairy Tales (tr. H. P. Paull)      fairy tale
    luolin19850304/StoryGenerator    data/grimm.txt             Grimms' Fairy Tales (tr. Taylor, Edwardes)    fairy tale
    lpodol/books                     aesop.txt                  Aesop's Fables (tr. G. F. Townsend)           fable
    luolin19850304/StoryGenerator    data/bryant-stories.txt    S. C. Bryant, Stories to Tell to Children     bedtime
    VIST (scripts/prepare_stories.py --source ...)              album stories, rewritten into the third person everyday
    Niklas6/Mini_GPT                 tinystories.txt            TinyStories (Eldan and Li 2023), ~190 stories  children
    Arnoochka/Transformer-Parallelism  tinystories.txt (911b9e7)  the same file's first ~5,500 stories, lower-cased

TinyStories (huggingface.co/datasets/roneneldan/TinyStories) is published under CDLA-Sharing-1.0, which places no
terms on results such as trained weights; the repository above holds the first stories of its V2 training file as
plain paragraphs (`tiny_stories` finds where each story starts); the second holds more of them, one per line and
lower-cased (`recase` gives back the capitals: sentence starts, "I", and the names the stories bring in with
"named"). They are what the tales are not: simple words, a small cast, a want, a turn and a gentle end within 100-250
words.

Left out: Burgess's Buster Bear (1920; Burgess died in 1965, so public domain in the US but not where copyright runs
for 70 years after death), Peter Pan (a novel, its chapters have no ending of their own; and the UK's royalty right),
and ROCStories / Story Cloze (given out on request, no terms for shipped weights). `--whole-tales-only` leaves out
tales cut to their opening paragraphs (they teach a story without an end).

    python scripts/prepare_story_mix.py --mirrors /path/to/checkouts --vist /path/to/vist/checkout \\
        --vocab ../shared/data/flickr8k/captions.csv --out ~/.cache/mmstory/stories/mix

--mirrors holds each repository as `owner+name/repo` (a bare git directory or a checkout, as the `fetch` tool leaves
them); --repo OWNER/NAME=PATH names one elsewhere. Each record is the writer's one prompt form: {"source", "title",
"scenes": [one caption-like line], "words": [...], "style", "tone", "audience", "story"}; see `scene_line` for how a
tale's one "photo" line is made (from its title or its first clause: the tales come without pictures).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_stories import NAMES, STOPWORDS, albums  # noqa: E402
from prepare_stories import records as vist_records  # noqa: E402

BOOKS = [  # (name, repository, path, kind)
    ("andersen-braekstad", "prakash2903/FairyTaleGenerator", "data/fairy_tales.txt", "fairy tale"),
    ("andersen-paull", "lpodol/books", "andersen.txt", "fairy tale"),
    ("grimm", "luolin19850304/StoryGenerator", "data/grimm.txt", "fairy tale"),
    ("aesop", "lpodol/books", "aesop.txt", "fable"),
    ("bryant", "luolin19850304/StoryGenerator", "data/bryant-stories.txt", "bedtime"),
]
TINY_STORIES = ("Niklas6/Mini_GPT", "tinystories.txt")
TINY_STORIES_LOWER = ("Arnoochka/Transformer-Parallelism", "tinystories.txt",
                      "911b9e732fbe6d228ba0feacbd6735395f0d279e")  # the only commit that holds the file
SAD = re.compile(r"\b(died|dead|death|killed|drowned|perished|wept|devoured|ate (him|her|them) up|grief|sorrow)\b",
                 re.I)
GLAD = re.compile(r"\b(happily|happy|joy|glad|merry|laughed|rejoiced|married)\b", re.I)
NOT_HINTS = frozenset(["which", "him", "who", "what", "when", "then", "than", "each", "other", "just", "like",
                       "where", "while", "around", "will", "would", "could", "little", "old", "big", "put", "get",
                       "got", "said", "back", "down", "away", "off"])
FAIRY_OPENING = re.compile(r"^(once upon a time|there (was|were|lived) once|once there (was|were|lived)|long,? long ago"
                           r"|long ago|in (the )?olden times|a long time ago|there was a)", re.I)


# --- reading --------------------------------------------------------------------------------------------------------
def read_text(repo_dir: Path, path: str, commit: str = "HEAD") -> str:
    """A file from a checkout or a bare git directory (at `commit`: a file a later commit deleted)."""
    if commit == "HEAD" and (repo_dir / path).is_file():
        raw = (repo_dir / path).read_bytes()
    else:
        git = repo_dir / ".git" if (repo_dir / ".git").is_dir() else repo_dir
        raw = subprocess.run(["git", "--git-dir", str(git), "show", f"{commit}:{path}"], check=True,
                             capture_output=True).stdout
    return raw.decode("utf-8", errors="replace").lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def strip_gutenberg(text: str) -> str:
    """The book without Project Gutenberg's header (up to '*** START OF ...') and trailer (from 'End of ...')."""
    start = re.search(r"^\*\*\* ?START OF.*$", text, re.M | re.I)
    if start:
        text = text[start.end():]
    end = re.search(r"^(\*\*\* ?END OF|End of (the )?Project Gutenberg)", text, re.M | re.I)
    return text[: end.start()] if end else text


def _is_title(line: str, before: str, after: str) -> bool:
    words = line.split()
    if before.strip() or after.strip() or line != line.lstrip() or not 1 <= len(words) <= 12:
        return False
    if line.rstrip()[-1] in ".,;:!?\"')]" or not line[0].isalpha():
        return False
    small = {"a", "an", "and", "the", "of", "in", "on", "to", "who", "with", "by", "for", "at", "from", "or", "his",
             "her", "their"}
    return line.isupper() or all(w[0].isupper() or w in small for w in words)


def tales(text: str) -> list[tuple[str, list[str]]]:
    """(title, paragraphs) per tale: titles are lone, unindented, capitalised lines without end punctuation."""
    lines = text.split("\n")
    found: list[tuple[str, list[str]]] = []
    paragraph: list[str] = []

    def close() -> None:
        if paragraph and found:
            found[-1][1].append(" ".join(s.strip() for s in paragraph))
        paragraph.clear()

    for i, line in enumerate(lines):
        before = lines[i - 1] if i else ""
        after = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and _is_title(line, before, after):
            close()
            found.append((line.strip(), []))
        elif not line.strip():
            close()
        else:
            paragraph.append(line)
    close()
    return [(t, ps) for t, ps in found if ps]


def clean(paragraph: str) -> str:
    paragraph = re.sub(r"_([^_]+)_", r"\1", paragraph)  # Gutenberg italics
    paragraph = re.sub(r"\[[^\]]*\]", "", paragraph)  # illustrations and notes
    paragraph = paragraph.replace("--", " - ").replace("''", '"')
    return re.sub(r"\s+", " ", paragraph).strip()


# --- one tale -> examples ---------------------------------------------------------------------------------------------
def _article(phrase: str) -> str:
    phrase = re.sub(r"^(the|a|an)\s+", "", phrase)
    return ("an " if phrase[:1] in "aeiou" and not phrase.startswith("one") else "a ") + phrase


def scene_line(title: str, story: str) -> tuple[str, str]:
    """The one caption-like line a tale is told from, and how it was made.

    A title that is a list of characters ("The Wolf And The Lamb") becomes "A wolf and a lamb."; otherwise the
    story's first clause, cut at its first comma or semicolon ("A certain king had a beautiful garden."), which
    reads like a caption of the tale's first picture. Neither is a real picture: that is the gap this data has.
    """
    words = title.lower().replace("'s", "").split()
    names_only = re.fullmatch(r"(the |a |an )?[a-z-]+( [a-z-]+)?( and (the |a |an )?[a-z-]+( [a-z-]+)?)?",
                              " ".join(words))
    verbs = {"how", "why", "what", "who", "went", "goes", "became", "fooled", "saved", "was", "is", "my"}
    if names_only and not verbs & set(words):
        parts = [_article(p.strip()) for p in " ".join(words).split(" and ")]
        line = " and ".join(parts)
        return line[0].upper() + line[1:] + ".", "title"
    first = re.split(r"(?<=[.!?])\s", story, maxsplit=1)[0]
    clause = re.split(r"[,;:]", first)[0].strip().rstrip(".!?")
    clause = re.sub(r"^(once upon a time|once|one day|long ago|there once)\s*", "", clause, flags=re.I).strip()
    if len(clause.split()) < 3:
        clause = first.rstrip(".!?")
    clause = " ".join(clause.split()[:16])
    return clause[0].upper() + clause[1:] + ".", "first clause"


def hint_words(story: str, scene: str, vocab: set[str] | None) -> list[str]:
    """Up to 3 words the story names at least twice that a picture could show (Flickr8k's caption words), as the
    classifier's 'Also seen' hints; none without a vocabulary."""
    if not vocab:
        return []
    in_scene = set(re.findall(r"[a-z]+", scene.lower()))
    counts = Counter(w for w in re.findall(r"[a-z]+", story.lower())
                     if len(w) > 2 and w not in STOPWORDS | NOT_HINTS and w in vocab and w not in in_scene)
    return [w for w, n in counts.most_common(3) if n >= 2]


def cut(paragraphs: list[str], max_words: int) -> tuple[str, bool]:
    """The whole tale if it fits, else its opening paragraphs up to max_words (complete=False)."""
    text = " ".join(paragraphs)
    if len(text.split()) <= max_words:
        return text, True
    kept: list[str] = []
    for p in paragraphs:
        if len(" ".join(kept + [p]).split()) > max_words:
            break
        kept.append(p)
    return " ".join(kept), False


def request_for(kind: str, story: str, complete: bool, rng: random.Random) -> dict[str, str | None]:
    """Style, tone and audience a reader asking for this story would name (STYLES/TONES/AUDIENCES keys)."""
    style = audience = tone = None
    if kind == "fairy tale" and FAIRY_OPENING.match(story):
        style = "fairy tale"
    elif kind == "fairy tale" and re.match(r"(A|An|In|There|Many years ago) ", story):
        style = "fairy tale"  # the opening is then added: "Once upon a time, a certain king had ..."
    elif kind == "bedtime":
        style, audience = rng.choice([("bedtime", "children"), ("bedtime", None), (None, "children")])
    elif kind == "fable" and rng.random() < 0.25:
        audience = "children"
    if complete and rng.random() < 0.5:
        tone = ending_mood(story)
    return {"style": style, "tone": tone, "audience": audience}


def ending_mood(story: str) -> str | None:
    """"negative" or "positive" where the last three sentences are only sad or only glad, else None."""
    ending = " ".join(re.split(r"(?<=[.!?])\s", story)[-3:])
    sad, glad = bool(SAD.search(ending)), bool(GLAD.search(ending))
    return None if sad == glad else "negative" if sad else "positive"


def book_records(name: str, text: str, kind: str, max_words: int, min_words: int, vocab: set[str] | None,
                 rng: random.Random) -> list[dict]:
    out = []
    for title, paragraphs in tales(strip_gutenberg(text)):
        paragraphs = [clean(p) for p in paragraphs if clean(p)]
        if not paragraphs or title.upper() in {"CONTENTS", "PREFACE", "INTRODUCTION", "NOTES", "FOOTNOTES"}:
            continue
        verse = sum(1 for p in paragraphs if len(p.split()) < 12) > len(paragraphs) / 2
        story, complete = cut(paragraphs, max_words)
        if verse or len(story.split()) < min_words or '"' in story[-3:] and not complete:
            continue
        scene, how = scene_line(title, story)
        if not scene[0].isalpha() or "evening" in title.lower():  # numbered parts; Andersen's 33 evenings
            continue
        request = request_for(kind, story, complete, rng)
        if request["style"] == "fairy tale" and not FAIRY_OPENING.match(story):
            story = "Once upon a time, " + story[0].lower() + story[1:]
        out.append({"source": name, "title": title.title(), "complete": complete, "scene_from": how,
                    "scenes": [scene], "words": hint_words(story, scene, vocab), "story": story,
                    **request})
    return out


# --- TinyStories ------------------------------------------------------------------------------------------------------
TINY_START = re.compile(r"(Once upon a time|Once,? there|There (was|were|lived|once)|Long ago"
                        r"|In a (small|big|little|far))")
TINY_DAY = re.compile(r"One (\w+ )?(day|night|morning|evening),? (a|an|two|the) (?:\w+ ){0,3}named (\w+)")
MOJIBAKE = {"\u00e2\u20ac\u0153": '"', "\u00e2\u20ac\u009d": '"', "\u00e2\u20ac\u2122": "'", "\u00e2\u20ac\u02dc": "'",
            "\u00e2\u20ac\u00a6": "...", "\u00e2\u20ac\u201d": " - ", "\u00e2\u20ac\u201c": " - ",
            "\u201c": '"', "\u201d": '"', "\u2019": "'"}


def tiny_stories(text: str) -> list[str]:
    """Whole stories from paragraphs that carry no story boundary: a story starts at an opening ("Once upon a time",
    "There was") or at "One day, a ... named X" where X is new; a few neighbours stay joined (filtered by length)."""
    for bad, good in MOJIBAKE.items():
        text = text.replace(bad, good)
    stories: list[list[str]] = [[]]
    for paragraph in (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)):
        if not paragraph:
            continue
        day = TINY_DAY.match(paragraph)
        if stories[-1] and (TINY_START.match(paragraph) or day and day.group(4) not in " ".join(stories[-1])):
            stories.append([])
        stories[-1].append(paragraph)
    return [" ".join(s) for s in stories if s and "\u00e2" not in " ".join(s)]


def tiny_scene(story: str) -> str:
    """The story's first sentence as a caption of its first picture, without the opening formula or the name the
    picture could not know: "One day, a little girl named Lily found a needle in her room." -> "A little girl found
    a needle in her room."."""
    first = re.split(r"(?<=[.!?])\s", story, maxsplit=1)[0].rstrip(".!?")
    first = re.sub(r"^(once upon a time|once|one (\w+ )?(day|night|morning|evening)|long ago|in a [^,]+),?\s*", "",
                   first, flags=re.I)
    first = re.sub(r"^there (was|were|lived|once was) ", "", first, flags=re.I)
    first = re.sub(r",? (named|called) [A-Z]\w*", "", first)
    first = " ".join(first.split()[:16]) or story.split(".")[0]
    return first[0].upper() + first[1:] + "."


def lowercased_tiny_stories(text: str, known: list[str]) -> list[str]:
    """The lower-cased copy's stories (one per line, paragraphs split by blank lines), capitals given back, without
    those already in `known` (the cased copy holds the file's first ones)."""
    def key(story: str) -> str:
        return re.sub(r"[^a-z]", "", story.lower())[:80]

    for bad, good in MOJIBAKE.items():
        text = text.replace(bad, good)
    stories = [" ".join(p.split()) for p in re.split(r"(?<!\n)\n(?!\n)", text.replace("\n\n", "\u2029"))]
    stories = [s.replace("\u2029", " ").strip() for s in stories]
    seen = {key(s) for s in known}
    names = Counter(re.findall(r"\b(?:named|called) ([a-z]+)\b", text))
    common = {w.lower() for s in known for w in re.findall(r"(?<=[a-z,] )[a-z]+", s)}
    sure = {n for n, count in names.items() if count >= 2 and n not in common}
    return [recase(s, sure) for s in stories if s and key(s) not in seen and "\u00e2" not in s]


FAMILY_NAMES = re.compile(r"\b(mom|dad|mommy|daddy|mama|papa|grandma|grandpa)\b")
NOT_A_NAME_AFTER = frozenset(["his", "her", "my", "your", "their", "our", "the", "a", "its", "and", "to"])


def recase(story: str, names: set[str]) -> str:
    """A lower-cased TinyStories story with its capitals back: "one day, lily said, "i found it."" -> "One day, Lily
    said, "I found it."". `names` are capitalised everywhere, any word after "named"/"called", "Mom" and "Dad" where
    they are used as names ("mom said", not "her mom")."""
    story = re.sub(r"\b[a-z]+\b", lambda m: m.group(0).capitalize() if m.group(0) in names else m.group(0), story)
    story = re.sub(r"\b(named|called) ([a-z])", lambda m: f"{m.group(1)} {m.group(2).upper()}", story)
    story = re.sub(r"\b(mr|mrs|ms|dr)\. ([a-z])", lambda m: f"{m.group(1).capitalize()}. {m.group(2).upper()}",
                   story)
    story = re.sub(r"\bi\b", "I", story)

    def family(m: re.Match) -> str:
        before = story[: m.start()].split()
        return m.group(0) if before and before[-1].lower().strip("\"'") in NOT_A_NAME_AFTER else m.group(0).capitalize()

    story = FAMILY_NAMES.sub(family, story)
    # sentence starts: the story's, after . ! ? and a space, after a quotation ending in a full stop, and a
    # quotation's first word (after ?" and !" a small letter is kept: '"Why?" the bird asked')
    return re.sub(r'(^"?|[.!?] +"?|\." +"?|[.!?]" +"|[,:] +")([a-z])', lambda m: m.group(1) + m.group(2).upper(),
                  story)


def tiny_records(stories: list[str], min_words: int, max_words: int, vocab: set[str] | None,
                 rng: random.Random) -> list[dict]:
    out = []
    for story in stories:
        if not min_words <= len(story.split()) <= max_words:
            continue
        scene = tiny_scene(story)
        style = rng.choice([None, None, "bedtime", "slice of life"] + (["fairy tale"] * 2 if FAIRY_OPENING.match(story)
                                                                        else []))
        tone = "positive" if ending_mood(story) == "positive" and rng.random() < 0.3 else None
        out.append({"source": "tinystories", "title": scene, "complete": True, "scene_from": "first sentence",
                    "scenes": [scene], "words": hint_words(story, scene, vocab), "story": story, "style": style,
                    "tone": tone, "audience": "children" if rng.random() < 0.5 else None})
    return out


# --- VIST in the third person -----------------------------------------------------------------------------------------
FIRST_PERSON = [(r"\bI am\b|\bI'm\b", "{n} is"), (r"\bI have\b|\bI've\b", "{n} has"), (r"\bI'd\b", "{n} would"),
                (r"\bI'll\b", "{n} will"), (r"\bI was\b", "{n} was"), (r"\bwe're\b", "they're"),
                (r"\bwe've\b", "they've"), (r"\bwe'd\b", "they'd"), (r"\bwe'll\b", "they'll"), (r"\bwe\b", "they"),
                (r"\bour\b", "their"), (r"\bours\b", "theirs"), (r"\bus\b", "them"), (r"\bmy\b", "{p}"),
                (r"\bme\b", "{o}"), (r"^(?:her|him) &|(?<=[.!?] )(?:her|him) &", "{n} &"),
                (r"\bmyself\b", "{o}self"), (r"\bI\b", "{n}")]
PAST_AFTER_I = re.compile(r"\bI (?!(?:was|had|could|would|did|went|saw|got|took|made|had|felt|thought|found|came|"
                          r"decided|wanted|knew|told|said|left|gave|met|bought|ate|loved|liked|\w+ed)\b)\w+")


def third_person(story: str, rng: random.Random) -> str | None:
    """An album story retold about one named person and 'they' ("We went to the beach. I swam." -> "They went to
    the beach. Anna swam."); None where an "I" is followed by a present-tense verb the swap would break."""
    if PAST_AFTER_I.search(story) or re.search(r"\b(photo|picture|pic)s?\b", story, re.I):
        return None
    female = rng.random() < 0.5
    name = rng.choice(NAMES["[female]" if female else "[male]"])
    values = {"n": name, "p": "her" if female else "his", "o": "her" if female else "him"}
    for pattern, repl in FIRST_PERSON:
        flags = 0 if "I" in pattern else re.I  # "I" only as the capital pronoun; "We", "we", "Our" alike
        story = re.sub(pattern, repl.format(**values), story, flags=flags)
    story = re.sub(r"(^|[.!?] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), story)
    return story


def vist_mix(source: Path, count: int, rng: random.Random) -> list[dict]:
    out = []
    for album in albums(source):
        for record in vist_records(album, rng, per_album=1, min_described=5, windows=0):
            story = third_person(record["story"], rng)
            if story and len(story.split()) >= 30:
                out.append({"source": "vist", "title": record["album"], "complete": True, "scene_from": "vist",
                            "scenes": record["scenes"], "words": record["words"], "story": story,
                            "style": rng.choice([None, None, "slice of life"]), "tone": None, "audience": None})
    rng.shuffle(out)
    return out[:count]


def flickr_vocab(path: Path | None) -> set[str] | None:
    if not path or not path.is_file():
        return None
    with open(path) as handle:
        counts = Counter(w for row in csv.DictReader(handle) for w in re.findall(r"[a-z]+", row["caption"].lower()))
    return {w for w, n in counts.items() if n >= 20}


def _repo_dir(repo: str, mirrors: Path | None, named: dict[str, Path]) -> Path:
    if repo in named:
        return named[repo]
    base = (mirrors or Path(".")) / repo.replace("/", "+") / "repo"
    return base / ".git" if (base / ".git").is_dir() else base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mirrors", type=Path, help="folder of owner+name/repo checkouts or bare git directories")
    parser.add_argument("--repo", action="append", default=[], help="OWNER/NAME=PATH for one repository")
    parser.add_argument("--vist", type=Path, help="the VIST references' repository (see prepare_stories.py)")
    parser.add_argument("--vist-count", type=int, default=300)
    parser.add_argument("--vocab", type=Path, help="Flickr8k captions.csv: words a picture could show, for hints")
    parser.add_argument("--out", type=Path, default=Path("~/.cache/mmstory/stories/mix").expanduser())
    parser.add_argument("--max-words", type=int, default=300)
    parser.add_argument("--min-words", type=int, default=40)
    parser.add_argument("--dev", type=int, default=64, help="held-out examples")
    parser.add_argument("--whole-tales-only", action="store_true", help="leave out tales cut to their opening")
    parser.add_argument("--tinystories", action="store_true", help="add TinyStories (see TINY_STORIES)")
    parser.add_argument("--tiny-repeat", type=int, default=1, help="how often each TinyStories example is seen")
    parser.add_argument("--tiny-more", type=int, default=0, help="add this many stories of the lower-cased copy "
                        "(TINY_STORIES_LOWER), 1 in 50 held out; the split above stays as it is")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    named = {k: Path(v) for k, _, v in (r.partition("=") for r in args.repo)}
    vocab = flickr_vocab(args.vocab)
    rows, seen = [], set()
    for name, repo, path, kind in BOOKS:
        found = book_records(name, read_text(_repo_dir(repo, args.mirrors, named), path), kind, args.max_words,
                             args.min_words, vocab, rng)
        found = [r for r in found if r["title"].lower() not in seen]  # the two Andersen books share tales
        found = [r for r in found if r["complete"] or not args.whole_tales_only]
        seen.update(r["title"].lower() for r in found)
        print(f"{name}: {len(found)} ({sum(r['complete'] for r in found)} whole tales)")
        rows += found
    if args.vist:
        vist = vist_mix(args.vist, args.vist_count, rng)
        print(f"vist: {len(vist)} third-person stories")
        rows += vist
    tiny: list[dict] = []
    cased: list[str] = []
    if args.tinystories:
        repo, path = TINY_STORIES
        cased = tiny_stories(read_text(_repo_dir(repo, args.mirrors, named), path))
        tiny = tiny_records(cased, 60, args.max_words, vocab, rng)
        print(f"tinystories: {len(tiny)} stories")
    rng.shuffle(rows)
    rng.shuffle(tiny)
    dev_tiny = args.dev * len(tiny) // max(len(rows) + len(tiny), 1)  # the dev set holds each source in its share
    splits = {"dev": rows[: args.dev - dev_tiny] + tiny[:dev_tiny],
              "train": rows[args.dev - dev_tiny:] + tiny[dev_tiny:] * args.tiny_repeat}
    rng.shuffle(splits["train"])
    if args.tiny_more:
        repo, path, commit = TINY_STORIES_LOWER
        text = read_text(_repo_dir(repo, args.mirrors, named), path, commit)
        more = tiny_records(lowercased_tiny_stories(text, cased), 60, args.max_words, vocab, random.Random(args.seed))
        more = more[: args.tiny_more]
        held = len(more) // 50
        print(f"tinystories, lower-cased copy: {len(more)} stories, {held} held out")
        splits["dev"] += more[:held]
        splits["train"] += more[held:]
        rng.shuffle(splits["train"])
    args.out.mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        (args.out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
        words = sum(len(r["story"].split()) for r in items)
        styles = Counter(r["style"] or "-" for r in items)
        print(f"{split}: {len(items)} stories, {words:,} words ({words / max(len(items), 1):.0f} each), "
              f"styles {dict(styles)} -> {args.out / f'{split}.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
