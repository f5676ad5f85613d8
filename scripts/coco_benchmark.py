"""Captions and stories on photos from outside Flickr8k's world, printed as one table.

    python scripts/coco_benchmark.py --set coco-check --stories --out docs/coco-benchmark-check.json
    python scripts/coco_benchmark.py --set flickr8k-dev          # the in-domain captions beside it

Sets: `coco-tune` / `coco-check` are the first 128 / the other 129 photos of ../shared/data/coco_dev by sorted file
name (tune on the first, report the second); `flickr8k-dev` is Flickr8k's 1,000 dev photos. Captions: BLEU-4 and
CIDEr-D (pycocoevalcap), made-up objects (COCO's 80 categories, `mmstory.eval.coco_objects`), invented people (a
person named where no reference names one). Stories (`--stories`, short, seed 0): the same object rates, and the
grounding gap. Every caption and story goes into the JSON (`--out`), with the object words no reference names; the
references themselves do not (coco_dev's terms).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from mmstory.eval.coco_objects import made_up_objects, object_rates
from mmstory.eval.metrics import caption_scores, grounding_gap

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TUNE_SIZE = 128


def _rate(value: float | None) -> str:
    """n/a where a set has nothing to count (no photo without people, say, in a --limit run)."""
    return "n/a" if value is None else f"{value:.3f}"


def load_set(name: str, data_root: Path, limit: int | None) -> list[tuple[Path, list[str]]]:
    """[(image path, reference captions)] for one of the named sets."""
    folder = data_root / ("coco_dev" if name.startswith("coco") else "flickr8k")
    grouped: dict[str, list[str]] = {}
    with open(folder / "captions.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            grouped.setdefault(row["image"], []).append(row["caption"])
    if name == "flickr8k-dev":
        names = (folder / "dev.txt").read_text().split()
    else:
        ordered = sorted(grouped)
        names = ordered[:TUNE_SIZE] if name == "coco-tune" else ordered[TUNE_SIZE:]
    records = [(folder / "images" / n, grouped[n]) for n in names]
    return records[:limit] if limit else records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", choices=["coco-tune", "coco-check", "flickr8k-dev"], default="coco-tune")
    p.add_argument("--model", default="mmstory-small")
    p.add_argument("--data-root", type=Path, default=SHARED)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--stories", action="store_true", help="also write a short story per photo (slow: ~4 s each)")
    p.add_argument("--set-generation", action="append", default=[], metavar="KEY=VALUE",
                   help="override a generation_config.json key (JSON value), e.g. caption_hedge=0")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    from mmstory import StoryTeller

    records = load_set(args.set, args.data_root, args.limit)
    teller = StoryTeller.from_pretrained(args.model, device="cpu")
    for item in args.set_generation:
        key, _, value = item.partition("=")
        setattr(teller.model.generation_config, key, json.loads(value))
    paths, references = [str(r[0]) for r in records], [r[1] for r in records]
    describe = getattr(teller, "caption_choices", None)  # None: a model from before the caption policy
    (describe or teller.caption)(paths[:2])  # warm-up
    start = time.perf_counter()
    details = describe(paths) if describe else []
    captions = [d.caption for d in details] if describe else teller.caption(paths)
    seconds = (time.perf_counter() - start) / len(paths)
    scores, _ = caption_scores(references, captions, use_java=False)
    report = {"set": args.set, "images": len(paths), "generation": args.set_generation,
              "captions": {"BLEU-4": 100 * scores["BLEU-4"], "CIDEr-D": 100 * scores["CIDEr-D"],
                           **object_rates(captions, references), "seconds_per_caption": seconds}}
    # the references stay out of the JSON (coco_dev's terms: its captions are never copied into the repository);
    # each row keeps the object words none of them names
    rows = [{"image": Path(path).name, "caption": caption, "made_up": made_up_objects(caption, refs)}
            for path, caption, refs in zip(paths, captions, references)]
    for row, d in zip(rows, details):
        row.update(confidence=d.confidence, sure=d.sure, agreement=d.agreement, words=d.words, trace=d.trace)
    if args.stories:
        stories = []
        for path in paths:
            stories.append(teller.generate_story(path, length="short", seed=0).story)
        report["stories"] = {**object_rates(stories, references),
                             "grounding_gap": grounding_gap(stories, references)["gap"]}
        for row, story, refs in zip(rows, stories, references):
            row.update(story=story, story_made_up=made_up_objects(story, refs))
    c = report["captions"]
    print("| set | images | BLEU-4 | CIDEr-D | made-up objects (captions) | invented people (captions) | s/caption |")
    print(f"| {args.set} | {len(paths)} | {c['BLEU-4']:.1f} | {c['CIDEr-D']:.1f} | {_rate(c['chair_i'])} | "
          f"{_rate(c['invented_person'])} | {seconds:.3f} |")
    if args.stories:
        s = report["stories"]
        print(f"stories: made-up objects {_rate(s['chair_i'])}, invented people {_rate(s['invented_person'])}, "
              f"grounding gap {_rate(s['grounding_gap'])}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**report, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
