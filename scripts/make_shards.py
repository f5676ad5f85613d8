"""Write WebDataset tar shards from any supported captions source (CSV/TSV, JSONL, COCO, Flickr tokens, stories).

    python scripts/make_shards.py ../shared/data/flickr8k/captions.csv --out shards/flickr8k-train \
        --split ../shared/data/flickr8k/train.txt --maxcount 1000

Each sample keeps the original image bytes plus `.txt` (captions, one per line) and `.json` ({"image", "captions"});
train on the result with `data.train.path: shards/flickr8k-train` (a directory, a .tar, or a brace pattern).
"""

from __future__ import annotations

import argparse
import sys

from mmstory.data import FORMATS, load_records, write_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="captions file (or shards) readable by mmstory.data.load_records")
    parser.add_argument("--out", required=True, help="output directory for shard-000000.tar, ...")
    parser.add_argument("--format", choices=FORMATS, help="source format (default: guessed from the path)")
    parser.add_argument("--split", help="file of image names to keep")
    parser.add_argument("--image-root", help="folder the image names resolve against")
    parser.add_argument("--limit", type=int, help="write only the first N images")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    parser.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard")
    args = parser.parse_args(argv)
    records = load_records(args.source, args.format, args.split, args.image_root, args.limit)
    shards, skipped = write_shards(records, args.out, maxcount=args.maxcount, maxsize=args.maxsize)
    for item in skipped:
        print(f"skipped {item.item}: {item.reason}", file=sys.stderr)
    print(f"wrote {len(records) - len(skipped)} samples in {len(shards)} shard(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
