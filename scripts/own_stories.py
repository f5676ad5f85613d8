"""Stories the project writes itself, kept by a reader, as training data for the next writer (best-of-n
distillation: the shipped pipeline picks one of 6 candidates, a reader keeps the ones worth keeping).

    python scripts/own_stories.py write --images 300 --shard 0 --shards 2 --out runs/own/shard0.jsonl
    python scripts/own_stories.py sheet runs/own/shard*.jsonl --out runs/own/sheet.md
    python scripts/own_stories.py keep runs/own/shard*.jsonl --kept runs/own/kept.txt --out ~/.cache/mmstory/stories/own

`write`: Flickr8k training photos (the writer's own training world; never coco_dev), short stories with the shipped
settings, two in three without a request and the rest with a style, audience or tone in turn. `sheet`: the stories
numbered for a reader, without anything else. `keep`: the numbers the reader kept (one per line) -> writer records
(`mmstory.train.writer.read_stories`' form: the caption as the scene, no hint words), with a tenth held out.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"
REQUESTS = [{}, {}, {"style": "fairy tale"}, {}, {}, {"style": "bedtime"}, {}, {}, {"audience": "children"}, {}, {},
            {"tone": "negative"}]


def write(args: argparse.Namespace) -> None:
    from mmstory.generation import StoryTeller

    names = (args.data / "train.txt").read_text().split()
    names = random.Random(0).sample(names, args.images)[args.shard:: args.shards]
    teller = StoryTeller.from_pretrained(args.model, quantize="int4")
    teller.warmup()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["image"] for line in args.out.read_text().splitlines()} if args.out.exists() else set()
    with args.out.open("a") as f:
        for i, name in enumerate(names):
            if name in done:
                continue
            request = REQUESTS[(i * args.shards + args.shard) % len(REQUESTS)]
            t = time.perf_counter()
            result = teller.generate_story(str(args.data / "images" / name), length="short", seed=i, **request)
            choice = result.caption_details[0]
            f.write(json.dumps({"image": name, "request": request, "caption": result.captions[0],
                                "sure": choice["sure"], "trace": choice["trace"],
                                "story": result.story}, ensure_ascii=False) + "\n")
            f.flush()
            print(f"{i + 1}/{len(names)} {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)


def _rows(paths: list[Path]) -> list[dict]:
    return [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]


def sheet(args: argparse.Namespace) -> None:
    lines = [f"{i}. [{' '.join(f'{k}: {v}' for k, v in row['request'].items()) or 'no request'}] {row['story']}"
             for i, row in enumerate(_rows(args.files), 1)]
    args.out.write_text("\n\n".join(lines) + "\n")
    print(f"{len(lines)} stories -> {args.out}")


def keep(args: argparse.Namespace) -> None:
    rows = _rows(args.files)
    kept = sorted({int(n) for n in args.kept.read_text().split() if n.strip().isdigit()})
    records = [{"source": "own", "scenes": [rows[n - 1]["caption"]], "words": [],
                "story": rows[n - 1]["story"], "style": rows[n - 1]["request"].get("style"),
                "tone": rows[n - 1]["request"].get("tone"), "audience": rows[n - 1]["request"].get("audience")}
               for n in kept if 0 < n <= len(rows)]
    random.Random(0).shuffle(records)
    held = max(1, len(records) // 10)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("dev", records[:held]), ("train", records[held:])):
        (args.out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    print(f"kept {len(records)} of {len(rows)}: {len(records) - held} train, {held} dev -> {args.out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("--images", type=int, default=300)
    w.add_argument("--shard", type=int, default=0)
    w.add_argument("--shards", type=int, default=1)
    w.add_argument("--model", default="mmstory-small")
    w.add_argument("--data", type=Path, default=DATA)
    w.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("sheet")
    s.add_argument("files", type=Path, nargs="+")
    s.add_argument("--out", type=Path, required=True)
    k = sub.add_parser("keep")
    k.add_argument("files", type=Path, nargs="+")
    k.add_argument("--kept", type=Path, required=True)
    k.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    {"write": write, "sheet": sheet, "keep": keep}[args.command](args)


if __name__ == "__main__":
    main()
