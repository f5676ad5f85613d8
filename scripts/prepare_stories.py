"""Prepare human-written picture stories for training the story writer, into a cache outside the repository.

Source: VIST, "Visual Storytelling" (Huang et al., NAACL 2016), test split, as republished with the code of
"Commonsense Knowledge Aware Concept Selection for Diverse and Informative Visual Storytelling" (Chen et al., AAAI
2021; MIT licence; github.com/sairin1202/ Commonsense-Knowledge-Aware-Concept-Selection-For-Diverse-and-
Informative-Visual-Storytelling): `visualstorytelling/reference/test_desc_reference.json` (VIST's
descriptions-in-isolation, up to 3 per photo), `visualstorytelling/reference/test_reference.json` (5
stories-in-sequence per album) and `result/results.csv` (each album's photo sequence, in the same album order as
`result/mcsm+RNN.json`). VIST's photos
are not used. Nothing here is committed: the output is a JSONL file per split under --out.

    python scripts/prepare_stories.py --source /path/to/that/repository --out ~/.cache/mmstory/stories/vist

--source is a checkout, or a bare git directory (as the `fetch` tool leaves it), read with `git show`.
Each record: {"album", "scenes": [one description per photo, in order], "words": [...], "story"}; `words` are content
words the story shares with the photos' other descriptions (the "also seen" hints a writer gets from the classifier).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import re
import subprocess
from pathlib import Path

FILES = {"descriptions": "visualstorytelling/reference/test_desc_reference.json",
         "stories": "visualstorytelling/reference/test_reference.json",
         "sequences": "result/results.csv", "album_order": "result/mcsm+RNN.json"}
NAMES = {"[female]": ["Anna", "Maria", "Emma", "Sarah", "Lucy", "Grace"],
         "[male]": ["Tom", "James", "Sam", "David", "Ben", "Mark"]}
_STOPWORD_TEXT = ("a an the and or but of in on at to for with from by is are was were be been it its this that these "
                  "those there here we i you he she they them his her our my your their some all very so as up out "
                  "into over about after before had has have do did not no one two three lot lots day time great "
                  "good nice fun")
STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def read(source: Path, name: str) -> str:
    path = source / FILES[name]
    if path.is_file():
        return path.read_text()
    return subprocess.run(["git", "--git-dir", str(source), "show", f"HEAD:{FILES[name]}"], check=True,
                          capture_output=True, text=True).stdout


def detokenize(text: str, names: dict[str, str] | None = None) -> str:
    """VIST text is lower-cased and tokenised ("we 're here ."); give it back its sentence case and contractions."""
    text = re.sub(r"\s+", " ", text.replace("|", " ")).strip()
    for placeholder, name in (names or {}).items():
        text = text.replace(placeholder, name)
    text = re.sub(r" (n't|'s|'re|'ve|'ll|'m|'d)\b", r"\1", text)
    text = re.sub(r" ([.,!?;:])", r"\1", text)
    text = re.sub(r"\bi\b", "I", text)
    sentences = re.split(r"(?<=[.!?])\s+", text)
    text = " ".join(s[:1].upper() + s[1:] for s in sentences if s)
    return text if text.endswith((".", "!", "?")) else text + "."


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 2 and w not in STOPWORDS}


def albums(source: Path) -> list[dict]:
    descriptions = json.loads(read(source, "descriptions"))
    stories = json.loads(read(source, "stories"))
    order = list(json.loads(read(source, "album_order")))
    rows = list(csv.DictReader(io.StringIO(read(source, "sequences"))))
    if len(rows) != len(order):
        raise SystemExit(f"{len(rows)} photo sequences for {len(order)} albums: not the files this script knows")
    out = []
    for album, row in zip(order, rows):
        photos = [re.search(r"/(\d+)\.jpg", row[f"image{i}"]).group(1) for i in range(1, 6)]
        out.append({"album": album, "photos": [descriptions.get(p, []) for p in photos], "stories": stories[album]})
    return out


def records(album: dict, rng: random.Random, per_album: int, min_described: int = 3, windows: int = 0) -> list[dict]:
    """The album's stories that share the most with its descriptions, each with one description per photo.

    The photo sequence is that of one of the album's five stories, and the story sharing the most words with the
    photos' descriptions is, as measured, that one: its i-th sentence shares 2.3x the words with photo i's
    descriptions that it shares with the other photos'. `windows` adds that many runs of 1-3 consecutive photos with
    just their sentences (5-sentence stories only), so the writer also learns stories of one or two pictures.
    """
    photos = [p for p in album["photos"] if p]
    if len(photos) < max(3, min_described):
        return []
    seen = set().union(*(content_words(d) for p in photos for d in p))
    usable = [s for s in album["stories"] if "location" not in s and "organization" not in s and len(s.split()) >= 25]
    usable.sort(key=lambda s: -len(content_words(s) & seen) / len(content_words(s) or {""}))
    out = []
    for story in usable[:per_album]:
        names = {k: rng.choice(v) for k, v in NAMES.items()}
        chosen = [rng.randrange(len(p)) for p in photos]
        scenes = [detokenize(p[i]) for p, i in zip(photos, chosen)]
        others = set().union(set(), *(content_words(d) for p, i in zip(photos, chosen)
                                      for j, d in enumerate(p) if j != i))
        hint = sorted((others - set().union(*(content_words(s) for s in scenes))) & content_words(story))
        out.append({"album": album["album"], "scenes": scenes, "words": hint[:4],
                    "story": detokenize(story, names)})
    sentences = [s for s in re.split(r"(?<=[.!?]) ", out[0]["story"]) if s] if out else []
    if len(photos) == 5 and len(sentences) == 5:
        for _ in range(windows):
            size = rng.choice((1, 1, 2, 3))
            start = rng.randrange(5 - size + 1)
            out.append({"album": album["album"], "scenes": out[0]["scenes"][start: start + size], "words": [],
                        "story": " ".join(sentences[start: start + size])})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="a checkout or bare git directory of the repo")
    parser.add_argument("--out", type=Path, default=Path("~/.cache/mmstory/stories/vist").expanduser())
    parser.add_argument("--per-album", type=int, default=1, help="stories kept per album (most grounded first)")
    parser.add_argument("--min-described", type=int, default=5, help="photos of 5 that must have a description")
    parser.add_argument("--windows", type=int, default=1, help="runs of 1-3 photos added per 5-sentence story")
    parser.add_argument("--dev-albums", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    all_albums = albums(args.source)
    rng.shuffle(all_albums)
    splits = {"dev": all_albums[: args.dev_albums], "train": all_albums[args.dev_albums:]}
    args.out.mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        rows = [r for album in items for r in records(album, rng, args.per_album, args.min_described, args.windows)]
        path = args.out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        words = sum(len(r["story"].split()) for r in rows)
        print(f"{split}: {len(rows)} stories from {len(items)} albums, {words / max(len(rows), 1):.0f} words each "
              f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
