"""Story benchmark: what a reader judges in a story about a photo, for one or more writers side by side.

    python scripts/story_benchmark.py --images 48 --out docs/story-benchmark.json --variant today=mmstory-small

For each variant (a packaged model name or a saved model directory) one story is written per Flickr8k dev image, as
the CLI writes it (int4 story writer, default decoding), and scored against the image's reference captions: grounding
(consensus content-word recall with the own image, with a shuffled image, and the gap: what the picture adds), made-up
objects (CHAIR_i / CHAIR_s), staying on the picture (first vs last third), fluency under a larger LM than the writer
(Gemma-3-270M), diversity, length against the request and seconds per story. `score_variant` takes stories from any
writer, so other writers' stories go through the same numbers; `--from-json` re-scores saved stories without writing.

The JSON keeps every story with the image's file name and the captions the model wrote, not the reference captions
(those stay in the data set; `--from-json` reads them again from --data).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from mmstory.data import ImageCaptions, open_image
from mmstory.eval.evaluate import (
    JUDGE_SPEC,
    JudgeLM,
    load_eval_records,
    score_stories,
    story_perplexity,
    try_load_judge,
)

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "flickr8k"
COLUMNS = ("variant", "grounding own", "shuffled", "gap", "CHAIR_i", "CHAIR_s", "on-picture first third",
           "last third", "judge ppl (Gemma-270M)", "distinct-3", "words / requested", "within 20%", "s/story")


def parse_variant(text: str) -> tuple[str, str]:
    """'NAME=MODEL' or just 'MODEL' (then named after it)."""
    name, sep, model = text.partition("=")
    if not sep:
        name, model = Path(text).name or text, text
    if not name.strip() or not model.strip():
        raise ValueError(f"bad variant {text!r}: expected NAME=MODEL_DIR_OR_NAME")
    return name.strip(), model.strip()


def image_name(record: ImageCaptions) -> str:
    """The image's file name: what the JSON stores to find the record again."""
    return Path(str(record.image)).name


def write_stories(teller, records: Sequence[ImageCaptions], length: str | int = "short", seed: int = 0,
                  label: str = "") -> list[dict]:
    """One story per image with the teller's default decoding: image name, model captions, story, seconds."""
    entries = []
    for i, record in enumerate(records):
        result = teller.generate_story(open_image(record.image), length=length, seed=seed)
        entries.append({"image": image_name(record), "captions": list(result.captions), "story": result.story,
                        "seconds": result.timings["total_s"]})
        print(f"[{label}] {i + 1}/{len(records)} {image_name(record)}: {result.timings['total_s']:.1f} s, "
              f"{len(result.story.split())} words", file=sys.stderr, flush=True)
    return entries


def score_variant(name: str, records: Sequence[ImageCaptions], stories: Sequence[str],
                  seconds: Sequence[float | None] | None = None, *, length: str | int = "short",
                  judge: JudgeLM | None = None, judge_note: str | None = None, seed: int = 0,
                  model: str | None = None, captions: Sequence[Sequence[str]] | None = None,
                  writer_perplexity: float | None = None, extra: dict | None = None) -> dict:
    """Score stories from any writer on their records (records[i] is story i's image): one variant's report."""
    metrics = score_stories(records, stories, seconds, length, judge=judge, seed=seed, judge_note=judge_note)
    per_story = metrics.pop("per_story")
    seconds = list(seconds) if seconds is not None else [None] * len(stories)
    captions = list(captions) if captions is not None else [None] * len(stories)
    entries = [{"image": image_name(r), "captions": c, "story": s, "seconds": t, **p}
               for r, c, s, t, p in zip(records, captions, stories, seconds, per_story)]
    return {"name": name, "model": model, "writer_perplexity": writer_perplexity, **(extra or {}),
            "metrics": metrics, "stories": entries}


def generate_variant(name: str, model: str, records: Sequence[ImageCaptions], *, length: str | int = "short",
                     seed: int = 0, judge: JudgeLM | None = None, judge_note: str | None = None) -> dict:
    """Load a writer as the CLI does (int4 story writer), warm it up, write the stories and score them."""
    from mmstory.generation import StoryTeller

    t = time.perf_counter()
    teller = StoryTeller.from_pretrained(model, quantize="int4")
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    teller.warmup()  # compile the decode step before timing: s/story is the served speed, not the first call's
    warmup_s = time.perf_counter() - t
    entries = write_stories(teller, records, length, seed, label=name)
    stories = [e["story"] for e in entries]
    writer_ppl = story_perplexity(teller.model, stories)
    return score_variant(name, records, stories, [e["seconds"] for e in entries], length=length, judge=judge,
                         judge_note=judge_note, seed=seed, model=model, captions=[e["captions"] for e in entries],
                         writer_perplexity=writer_ppl, extra={"load_s": load_s, "warmup_s": warmup_s})


def rescore(saved: dict, records_by_name: dict[str, ImageCaptions], judge: JudgeLM | None = None,
            judge_note: str | None = None) -> list[dict]:
    """Re-score the stories of a saved benchmark JSON (its variants) with the current metrics."""
    settings = saved.get("settings", {})
    out = []
    for variant in saved["variants"]:
        entries = variant["stories"]
        missing = [e["image"] for e in entries if e["image"] not in records_by_name]
        if missing:
            raise ValueError(f"variant {variant['name']!r}: images not in the data: {', '.join(missing[:5])}")
        out.append(score_variant(
            variant["name"], [records_by_name[e["image"]] for e in entries], [e["story"] for e in entries],
            [e.get("seconds") for e in entries], length=settings.get("length", "short"), judge=judge,
            judge_note=judge_note, seed=settings.get("seed", 0), model=variant.get("model"),
            captions=[e.get("captions") for e in entries], writer_perplexity=variant.get("writer_perplexity")))
    return out


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table_row(variant: dict) -> list[str]:
    m = variant["metrics"]
    gap, chair, stay, length = m["grounding_gap"], m["hallucination"], m["staying_on_picture"], m["length"]
    return [variant["name"], _num(gap["own"]), _num(gap["shuffled"]), _num(gap["gap"]), _num(chair["chair_i"]),
            _num(chair["chair_s"], 2), _num(stay["first"]["on_picture"]), _num(stay["last"]["on_picture"]),
            _num(m["judge"]["perplexity"], 1), _num(m["distinct_3"]),
            f"{length['mean_words']:.0f} / {length['requested_words']}", f"{100 * length['within_20_percent']:.0f}%",
            _num(m["seconds_per_story"], 1)]


def markdown_table(variants: Sequence[dict]) -> str:
    """One row per variant: the numbers a reader would compare first."""
    rows = [list(COLUMNS), ["---"] * len(COLUMNS)] + [table_row(v) for v in variants]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="story_benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=48, help="the first N images of the split")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Flickr8k-layout folder (captions.csv, dev.txt, images/)")
    p.add_argument("--split", default="dev")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=MODEL",
                   help="a writer to benchmark: NAME=<packaged name or model dir> (repeatable; default mmstory-small)")
    p.add_argument("--length", default="short", help="short, medium, long or a number of words")
    p.add_argument("--seed", type=int, default=0, help="decoding seed and the shuffled pairing's seed")
    p.add_argument("--judge", default=JUDGE_SPEC, help="decoder spec of the judge LM, or 'none' to skip it")
    p.add_argument("--out", default=None, help="JSON with every story and metric (default when writing stories: "
                                               "docs/story-benchmark.json; with --from-json: not written)")
    p.add_argument("--from-json", default=None, metavar="FILE", help="re-score the stories saved in FILE; write none")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variant] or [("mmstory-small", "mmstory-small")]
        saved = json.loads(Path(args.from_json).read_text(encoding="utf-8")) if args.from_json else None
        data = args.data
        split = args.split
        if saved is not None and args.data == str(DEFAULT_DATA):
            data, split = saved.get("settings", {}).get("data", data), saved.get("settings", {}).get("split", split)
        records = load_eval_records(data, split, limit=None if saved is not None else args.images)
    except (OSError, ValueError) as err:
        print(f"story_benchmark: {err}", file=sys.stderr)
        return 2
    judge, note = try_load_judge(None if args.judge.lower() == "none" else args.judge)
    if note:
        print(f"story_benchmark: {note}", file=sys.stderr)
    t = time.perf_counter()
    if saved is not None:
        try:
            results = rescore(saved, {image_name(r): r for r in records}, judge, note)
        except (KeyError, ValueError) as err:
            print(f"story_benchmark: cannot re-score {args.from_json}: {err}", file=sys.stderr)
            return 2
        settings = saved.get("settings", {})
    else:
        results = [generate_variant(name, model, records, length=args.length, seed=args.seed, judge=judge,
                                    judge_note=note) for name, model in variants]
        settings = {"data": str(data), "split": split, "images": len(records), "length": args.length,
                    "seed": args.seed, "quantize": "int4", "decoding": "StoryTeller defaults"}
    from mmstory import __version__

    report = {"created": datetime.now(UTC).isoformat(timespec="seconds"), "mmstory_version": __version__,
              "settings": {**settings, "judge": None if judge is None else judge.spec,
                           "command": "python scripts/story_benchmark.py " + " ".join(
                               sys.argv[1:] if argv is None else argv)},
              "notes": [n for n in (note,) if n], "total_s": time.perf_counter() - t, "variants": results}
    out = args.out or (None if saved is not None else "docs/story-benchmark.json")
    table = markdown_table(results)
    print(table)
    if note:
        print(f"\n{note}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"\nreport: {out}")
    return 0
