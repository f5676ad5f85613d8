"""A blind pairwise reading of two story benchmarks' stories: which one would a reader keep?

    python scripts/blind_pairs.py sheet before.json after.json --count 24 --out /tmp/reading    # sheet.md + key.json
    (read sheet.md; write one line per pair into choices.txt: "1 A", "2 B", ... ; "=" for no preference; optionally
     each story's 1-5 score for "a story a reader would keep", A's then B's: "1 A 4 2")
    python scripts/blind_pairs.py tally /tmp/reading/key.json /tmp/reading/choices.txt

The sheet shows, per image, the model's caption and the two stories in a random order (seeded), without saying
which system wrote which; the key stays in a separate file until the choices are written down.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def _stories(path: Path) -> tuple[str, dict[str, dict]]:
    saved = json.loads(path.read_text())
    variant = saved["variants"][0]
    return variant["name"], {entry["image"]: entry for entry in variant["stories"]}


def sheet(first: Path, second: Path, count: int, out: Path, seed: int) -> None:
    (name_a, a), (name_b, b) = _stories(first), _stories(second)
    images = [image for image in a if image in b][:count]
    rng = random.Random(seed)
    lines, key = ["# Blind reading: which story would you keep?", ""], []
    for i, image in enumerate(images, 1):
        pair = [(name_a, a[image]["story"]), (name_b, b[image]["story"])]
        rng.shuffle(pair)
        key.append({"pair": i, "image": image, "A": pair[0][0], "B": pair[1][0]})
        lines += [f"## {i}. {image}", "", f"*the picture, as captioned:* {a[image]['captions'][0]}", "",
                  f"**A.** {pair[0][1]}", "", f"**B.** {pair[1][1]}", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "sheet.md").write_text("\n".join(lines))
    (out / "key.json").write_text(json.dumps(key, indent=1))
    print(f"{len(images)} pairs -> {out / 'sheet.md'} (key: {out / 'key.json'})")


def tally(key_path: Path, choices_path: Path) -> None:
    key = {row["pair"]: row for row in json.loads(key_path.read_text())}
    wins: dict[str, list[int]] = {}
    scores: dict[str, list[int]] = {}
    for line in choices_path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        pair, choice, *marks = line.split()
        row = key[int(pair)]
        winner = "no preference" if choice == "=" else row[choice.upper()]
        wins.setdefault(winner, []).append(int(pair))
        for side, mark in zip("AB", marks[:2]):
            scores.setdefault(row[side], []).append(int(mark))
    for winner, pairs in sorted(wins.items(), key=lambda item: -len(item[1])):
        print(f"{winner}: {len(pairs)} ({', '.join(map(str, pairs))})")
    for name, marks in scores.items():
        kept = sum(m >= 4 for m in marks)
        print(f"{name}: mean score {sum(marks) / len(marks):.2f} of 5 over {len(marks)}; scored 4 or 5 (kept): {kept}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("sheet")
    make.add_argument("first", type=Path)
    make.add_argument("second", type=Path)
    make.add_argument("--count", type=int, default=24)
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--seed", type=int, default=0)
    count = sub.add_parser("tally")
    count.add_argument("key", type=Path)
    count.add_argument("choices", type=Path)
    args = parser.parse_args()
    if args.command == "sheet":
        sheet(args.first, args.second, args.count, args.out, args.seed)
    else:
        tally(args.key, args.choices)


if __name__ == "__main__":
    main()
