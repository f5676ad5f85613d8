"""A reader's benchmark of a writer: 24 photos (12 of coco_dev's check half, 12 Flickr8k dev), stories at 1, 3 or 6
candidates, one story per style for a few photos, and the form checks of `mmstory.eval.story_checks`.

    python scripts/story_reading.py write --name new --model runs/writer_mix/best --candidates 6 1 3 --styles \\
        --out runs/reading/new.json
    PYTHONPATH=/path/to/older/checkout python scripts/story_reading.py write --name today --model mmstory-small ...
    python scripts/story_reading.py report runs/reading/today.json runs/reading/new.json
    python scripts/blind_pairs.py sheet runs/reading/today.json runs/reading/new.json --out /tmp/reading

`write` imports only what every mmstory version has (StoryTeller, the eval records), so an older checkout's writer,
prompt and all, writes its stories with the same photos and seed. Its JSON has blind_pairs.py's layout (one variant
per candidate count, the first the first --candidates given). `report` prints narrator, invented-people, repetition,
grounding and made-up-object numbers per variant, and the per-style check table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STYLE_REQUESTS = [("default", {}), ("fairy tale", {"style": "fairy tale"}), ("bedtime", {"style": "bedtime"}),
                  ("poem", {"style": "poem"}), ("children", {"audience": "children"}),
                  ("negative", {"tone": "negative"})]


def photos(data: Path = DATA) -> list:
    """coco_dev's check half (file names sorted, from index 128) and Flickr8k dev images 96-107, 12 each: photos
    the decoding settings were not tuned on (docs/stories.md used Flickr8k dev 0-95)."""
    from mmstory.eval.evaluate import load_eval_records

    coco = sorted(load_eval_records(data / "coco_dev", "all"), key=lambda r: Path(str(r.image)).name)[128:140]
    flickr = load_eval_records(data / "flickr8k", "dev", limit=108)[96:108]
    return coco + flickr


def write(args: argparse.Namespace) -> None:
    import mmstory
    from mmstory.data import open_image
    from mmstory.generation import StoryTeller

    records = photos(args.data)
    teller = StoryTeller.from_pretrained(args.model, quantize="int4")
    for setting in args.set_generation:  # e.g. story_beats=false (a JSON value)
        key, _, value = setting.partition("=")
        setattr(teller.model.generation_config, key, json.loads(value))
    teller.warmup()
    variants = []
    for n in args.candidates:
        entries = []
        for i, record in enumerate(records):
            t = time.perf_counter()
            result = teller.generate_story(open_image(record.image), length=args.length, seed=args.seed,
                                           num_candidates=n)
            entries.append({"image": Path(str(record.image)).name, "captions": list(result.captions),
                            "story": result.story, "seconds": time.perf_counter() - t})
            print(f"[{args.name} x{n}] {i + 1}/{len(records)} {entries[-1]['seconds']:.1f} s", file=sys.stderr,
                  flush=True)
        variants.append({"name": f"{args.name}" if n == args.candidates[0] else f"{args.name} x{n}",
                         "candidates": n, "stories": entries})
    styled = []
    if args.styles:
        for record in records[:: max(1, len(records) // args.style_photos)][: args.style_photos]:
            for label, request in STYLE_REQUESTS:
                result = teller.generate_story(open_image(record.image), length=args.length, seed=args.seed, **request)
                styled.append({"image": Path(str(record.image)).name, "request": label, **request,
                               "captions": list(result.captions), "story": result.story})
                print(f"[{args.name} {label}] {Path(str(record.image)).name}", file=sys.stderr, flush=True)
    out = {"model": args.model, "mmstory": str(Path(mmstory.__file__).parent), "seed": args.seed,
           "length": args.length, "variants": variants, "styles": styled}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"-> {args.out}")


def report(args: argparse.Namespace) -> None:
    from mmstory.eval.evaluate import score_stories
    from mmstory.eval.story_checks import album_narrator, invented_people, people_in, repetition, style_check

    by_name = {Path(str(r.image)).name: r for r in photos(args.data)}
    print("| writer | stories | album narrator | invented people (coco, no people in refs) |"
          " ... not in the caption either | repetition (3-gram) | gap | CHAIR_i | last third | judge ppl | s/story |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    style_rows = []
    for path in args.files:
        saved = json.loads(path.read_text())
        for variant in saved["variants"]:
            entries = variant["stories"]
            records = [by_name[e["image"]] for e in entries]
            stories = [e["story"] for e in entries]
            empty = [e for e, r in zip(entries, records)
                     if e["image"].startswith("COCO") and not any(people_in(c) for c in r.captions)]
            invented = sum(invented_people(e["story"], by_name[e["image"]].captions) for e in empty)
            # the writer's own: people neither the references nor the model's caption name
            own = sum(invented_people(e["story"], [*by_name[e["image"]].captions, *e["captions"]]) for e in empty)
            flickr = [i for i, e in enumerate(entries) if not e["image"].startswith("COCO")]
            judge = None
            if args.judge:
                from mmstory.eval.evaluate import try_load_judge
                judge, _ = try_load_judge()
            m = score_stories([records[i] for i in flickr], [stories[i] for i in flickr], None, saved["length"],
                              judge=judge)
            seconds = sum(e["seconds"] for e in entries) / len(entries)
            ppl = m["judge"].get("perplexity")
            print(f"| {variant['name']} | {len(entries)} | {sum(map(album_narrator, stories))} / {len(stories)} | "
                  f"{invented} / {len(empty)} | {own} / {len(empty)} | "
                  f"{sum(map(repetition, stories)) / len(stories):.3f} | "
                  f"{m['grounding_gap']['gap']:.3f} | {m['hallucination']['chair_i']:.3f} | "
                  f"{m['staying_on_picture']['last']['on_picture']:.3f} | "
                  f"{'n/a' if ppl is None else f'{ppl:.1f}'} | {seconds:.1f} |")
        for entry in saved.get("styles", []):
            checks = style_check(entry["story"], entry.get("style"), entry.get("tone"), entry.get("audience"))
            style_rows.append((saved["variants"][0]["name"], entry["request"], checks, album_narrator(entry["story"])))
    if style_rows:
        print("\n(gap, CHAIR_i, last third: the 12 Flickr8k photos, against their reference captions)\n")
        writers = list(dict.fromkeys(w for w, *_ in style_rows))
        print("| request | " + " | ".join(f"{w}: check passed | {w}: album narrator" for w in writers) + " |")
        print("| --- | " + " | ".join("--- | ---" for _ in writers) + " |")
        for label, _ in [*STYLE_REQUESTS]:
            cells = []
            for w in writers:
                rows = [(c, n) for ww, lab, c, n in style_rows if ww == w and lab == label]
                passed = [all(c.values()) for c, _ in rows if c]
                cells += [f"{sum(passed)} / {len(passed)}" if passed else "-",
                          f"{sum(n for _, n in rows)} / {len(rows)}"]
            print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="the folder holding coco_dev/ and flickr8k/")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("--name", required=True)
    w.add_argument("--model", default="mmstory-small")
    w.add_argument("--candidates", type=int, nargs="+", default=[6])
    w.add_argument("--length", default="short")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--styles", action="store_true", help="also one story per style for --style-photos photos")
    w.add_argument("--style-photos", type=int, default=4)
    w.add_argument("--set-generation", action="append", default=[], metavar="KEY=VALUE",
                   help="override a generation_config.json key (JSON value) for this run")
    w.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("report")
    r.add_argument("files", type=Path, nargs="+")
    r.add_argument("--judge", action="store_true", help="judge perplexity (Gemma-3-270M, when installed)")
    args = parser.parse_args()
    write(args) if args.command == "write" else report(args)


if __name__ == "__main__":
    main()
