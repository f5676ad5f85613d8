"""Compare caption decoding settings on a split, from the training feature cache (no image decoding).

    python scripts/caption_sweep.py --model mmstory-small --data ../shared/data/flickr8k --split dev \\
        '{"num_beams": 5, "rerank": 5}' '{"num_beams": 8, "rerank": 40}'

Each setting is a JSON object of `generate_captions` keywords (the caption repetition penalty unless given, as
`StoryTeller.caption` uses); one JSON line per setting: BLEU-4, CIDEr-D, ROUGE-L (x100), distinct captions (%).
The cache is the fp16 one `mmstory train` writes, so the numbers are within a few hundredths of `mmstory eval`'s,
which decodes the images again; this is how the shipped `caption_beams` and `caption_rerank` were chosen.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mmstory.captioning import CAPTION_REPETITION_PENALTY
from mmstory.eval.evaluate import load_eval_records
from mmstory.eval.metrics import caption_scores, distinct_caption_fraction
from mmstory.model import StoryModel
from mmstory.train.features import FeatureCache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+", help='JSON keyword objects, e.g. \'{"num_beams": 8, "rerank": 40}\'')
    parser.add_argument("--model", default="mmstory-small")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="dev")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--cache", default="cache/features", help="the feature cache directory (encoded on a miss)")
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    model = StoryModel.from_pretrained(args.model).eval()
    records = load_eval_records(args.data, args.split, args.limit)
    cached = FeatureCache(args.cache, model.vision, model.config.vision.spec, torch.float16).build(records)
    dataset = cached.dataset()
    references = [r.captions for r in cached.records]
    for text in args.settings:
        setting = {"repetition_penalty": CAPTION_REPETITION_PENALTY, **json.loads(text)}
        start, captions = time.perf_counter(), []
        for first in range(0, len(cached.records), args.batch_size):
            items = [dataset.features(i) for i in range(first, min(first + args.batch_size, len(cached.records)))]
            tokens = torch.stack([t for t, _ in items]).float()
            pooled = torch.stack([p for _, p in items]).float()
            captions += model.generate_captions(image_tokens=tokens, image_pooled=pooled, captioner="caption_decoder",
                                                **setting)
        scores, _ = caption_scores(references, captions, use_java=False)
        print(json.dumps({"model": args.model, "images": len(captions), **setting,
                          **{k: round(100 * scores[k], 2) for k in ("BLEU-4", "CIDEr-D", "ROUGE-L")},
                          "distinct": round(100 * distinct_caption_fraction(captions), 1),
                          "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
