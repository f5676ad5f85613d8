"""`mmstory eval`: run a model over an image-caption split and report captioning, retrieval and story metrics.

    mmstory eval --model mmstory-small --data ../shared/data/flickr8k --split dev

One batched pass encodes every image (and captions it); retrieval embeds the first five reference captions of each
image (the Flickr8k/Flickr30k protocol: a 1k-image split, 5 captions per image); stories are written for the first
`--stories` images. The JSON report holds the settings, counts, timings, every metric and a few examples; PNG plots
show recall@K curves and, given a training run directory, the metrics in its `metrics.jsonl` over training steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmstory.captioning import CAPTION_REPETITION_PENALTY
from mmstory.components import similarity
from mmstory.data import ImageCaptions, clean_records, item_name, load_records, open_image, skip_reason
from mmstory.devices import DEVICE_HELP, resolve_device
from mmstory.eval.metrics import (
    caption_scores,
    content_word_recall,
    distinct_caption_fraction,
    distinct_n,
    grounding_gap,
    hallucinated_mentions,
    hallucination_stats,
    java_available,
    length_stats,
    object_mentions,
    perplexity,
    recall_at_k,
    recall_curve,
    repeated_ngram_rate,
    retrieval_metrics,
    retrieval_ranks,
    staying_on_picture,
)
from mmstory.eval.plots import read_training_log, write_plots
from mmstory.images import ImageError

TASKS = ("captioning", "retrieval", "stories")
CAPTIONS_PER_IMAGE = 5
NUM_EXAMPLES = 5
JUDGE_SPEC = "packaged:gemma3-270m"  # a larger LM than the 135M story writer, so fluency is not self-judged


# --- data ------------------------------------------------------------------------------------------------------------
def load_eval_records(data: str | Path, split: str | None = "dev", limit: int | None = None) -> list[ImageCaptions]:
    """Records from a Flickr8k-layout folder (captions.csv, <split>.txt, images/) or any `data.load_records` source.

    `split` names `<split>.txt` beside the captions, or is a split file (or a Karpathy split name for COCO JSON);
    None or "all" keeps every image.
    """
    path = Path(data)
    flickr_layout = path.is_dir() and (path / "captions.csv").is_file()
    source = path / "captions.csv" if flickr_layout else path
    if not source.exists() and "{" not in str(source):
        raise FileNotFoundError(f"no data at {source} (expected a folder with captions.csv, or a captions file)")
    split_arg: str | Path | None = None
    if split not in (None, "all"):
        beside = (path if path.is_dir() else path.parent) / f"{split}.txt"
        split_arg = Path(split) if Path(split).is_file() else beside if beside.is_file() else split
        if flickr_layout and split_arg == split:
            raise FileNotFoundError(f"split file {beside} not found; pass --split all to evaluate every image")
    return load_records(source, split=split_arg, limit=limit)


# --- model passes ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_and_caption(model, processor, records: Sequence[ImageCaptions], batch_size: int = 32,
                       caption_kwargs: dict | None = None, progress: bool = False,
                       keep_tokens: list | None = None) -> tuple[list[int], list[str], torch.Tensor, list[dict]]:
    """One batched pass over the images: their contrastive embeddings and, given caption_kwargs, one caption each.

    Returns (indices of the records that loaded, their captions, image embeddings [N, E], skipped images); the
    image tokens (bf16) and pooled features of each batch are appended to `keep_tokens` when it is given.
    """
    from tqdm import tqdm

    kept, captions, embeddings, skipped = [], [], [], []
    starts = range(0, len(records), batch_size)
    for start in tqdm(starts, desc="images", unit="batch", disable=not progress):
        images, indices = [], []
        for index in range(start, min(start + batch_size, len(records))):
            image = records[index].image
            try:
                images.append(open_image(image))
                indices.append(index)
            except ImageError as err:
                skipped.append({"item": item_name(image), "reason": skip_reason(err, image)})
        if not images:
            continue
        tokens, pooled = model.encode_image(processor.batch(images).to(model.image_projection.weight.device))
        embeddings.append(model.image_embedding(pooled).cpu())
        if keep_tokens is not None:
            keep_tokens.append((tokens.to(torch.bfloat16).cpu(), pooled.float().cpu()))
        if caption_kwargs is not None:
            captions += model.generate_captions(image_tokens=tokens, image_pooled=pooled, **caption_kwargs)
        kept += indices
    if not kept:
        raise ValueError("none of the images could be loaded")
    return kept, captions, torch.cat(embeddings), skipped


@torch.no_grad()
def text_embeddings(model, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
    return torch.cat([model.text_embedding(list(texts[i: i + batch_size])).cpu()
                      for i in range(0, len(texts), batch_size)])


def retrieval_similarity(model, image_embeds: torch.Tensor, references: Sequence[Sequence[str]],
                         captions_per_image: int = CAPTIONS_PER_IMAGE,
                         batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity [images, texts] of the images against the first `captions_per_image` captions of each.

    Returns the matrix and, for each text, the index of its image (the input of `metrics.retrieval_metrics`).
    """
    texts, owner = [], []
    for index, group in enumerate(references):
        chosen = list(group)[:captions_per_image]
        texts += chosen
        owner += [index] * len(chosen)
    sim = similarity(image_embeds.float(), text_embeddings(model, texts, batch_size).float())
    return sim.numpy(), np.asarray(owner)


@torch.no_grad()
def rerank_image_to_text(model, image_tokens: torch.Tensor, image_pooled: torch.Tensor, similarity: np.ndarray,
                         texts: Sequence[str], top_k: int = 20, weight: float = 0.1,
                         batch_size: int = 256) -> np.ndarray:
    """Image->text scores with each image's `top_k` texts (by contrastive similarity) re-scored, CoCa-style, with the
    caption decoder: logit_scale x cosine + weight x PMI, where PMI = log p(text | image) - log p(text | the average
    image of the gallery), so that captions which are likely under any image do not win. The re-scored texts rank
    above all others; the rest keep their order. Returns the new [images, texts] score matrix (image->text only)."""
    sim = torch.as_tensor(similarity, dtype=torch.float32)
    top_k = min(top_k, sim.shape[1])
    top = sim.topk(top_k, dim=1).indices  # [images, k]
    average = image_tokens.float().mean(dim=0, keepdim=True)
    average_pooled = image_pooled.float().mean(dim=0, keepdim=True)
    prior = []
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i: i + batch_size])
        prior.append(model.caption_log_likelihood(average.expand(len(chunk), -1, -1), chunk,
                                                  average_pooled.expand(len(chunk), -1)))
    prior = torch.cat(prior)
    pairs = [(i, int(j)) for i in range(sim.shape[0]) for j in top[i]]
    likelihood = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start: start + batch_size]
        rows = torch.tensor([i for i, _ in chunk])
        likelihood.append(model.caption_log_likelihood(image_tokens[rows], [texts[j] for _, j in chunk],
                                                       image_pooled[rows]))
    pmi = (torch.cat(likelihood).view(sim.shape[0], top_k) - prior[top])
    scale = float(model.contrastive_scale().detach())
    scores = sim * scale
    rescored = scores.gather(1, top) + weight * pmi
    offset = float(scores.max() - rescored.min()) + 1.0  # every re-scored text above every other one
    return scores.scatter(1, top, rescored + offset).numpy()


def story_perplexity(model, texts: Sequence[str]) -> float | None:
    """Perplexity of the texts under the plain decoder (no image, no prompt: just BOS then the text)."""
    return lm_perplexity(model.writer, model.tokenizer, texts)


@torch.no_grad()
def lm_perplexity(decoder, tokenizer, texts: Sequence[str]) -> float | None:
    """Corpus perplexity of the texts under a causal LM: BOS then each text, no prompt; None when all are empty."""
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    limit = getattr(decoder.config, "max_position_embeddings", 2048) - 1
    device = decoder.get_input_embeddings().weight.device
    total_nll, total_tokens = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids[:limit]
        if not ids:
            continue
        ids = torch.tensor([[start_id] + ids], device=device)
        logits = decoder(input_ids=ids).logits.float()
        total_nll += float(F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
        total_tokens += ids.shape[1] - 1
    return perplexity(total_nll, total_tokens) if total_tokens else None


@dataclass
class JudgeLM:
    """A causal LM other than the writer that scores the stories' fluency (a writer rates its own text too kindly)."""

    spec: str
    decoder: torch.nn.Module
    tokenizer: object

    @classmethod
    def load(cls, spec: str = JUDGE_SPEC, dtype: torch.dtype = torch.float32) -> JudgeLM:
        """Load a decoder spec (raises `specs.SpecError`, saying what to install, when it is missing)."""
        from mmstory.specs import load_decoder

        decoder, tokenizer = load_decoder(spec, dtype=dtype)
        return cls(spec, decoder.eval(), tokenizer)

    def perplexity(self, texts: Sequence[str]) -> float | None:
        return lm_perplexity(self.decoder, self.tokenizer, texts)


def try_load_judge(spec: str | None = JUDGE_SPEC) -> tuple[JudgeLM | None, str | None]:
    """(judge, None), or (None, why not) where the judge's weights are not installed: the eval runs without it."""
    from mmstory.specs import SpecError

    if spec is None:
        return None, "judge perplexity skipped: no judge LM given"
    try:
        return JudgeLM.load(spec), None
    except SpecError as err:
        return None, f"judge perplexity skipped: {err}"


def score_stories(records: Sequence[ImageCaptions], stories: Sequence[str], seconds: Sequence[float | None] | None,
                  length: str | int = "short", judge: JudgeLM | None = None, seed: int = 0,
                  judge_note: str | None = None) -> dict:
    """Every text-only story metric, for stories from any writer (records[i] holds story i's reference captions).

    Length against the request, diversity, repetition, consensus content-word recall with the own image and a
    shuffled one (the grounding gap), made-up objects (CHAIR), staying on the picture from the first to the last
    third, and perplexity under a judge LM (None skips it; the report's judge note says why).
    """
    from mmstory.prompts import word_budget
    from mmstory.text import split_sentences

    if len(records) != len(stories):
        raise ValueError(f"{len(records)} records but {len(stories)} stories")
    if not stories:
        raise ValueError("no stories to score")
    references = [r.captions for r in records]
    recalls = [content_word_recall(story, refs) for story, refs in zip(stories, references)]
    scored = [r for r in recalls if r is not None]
    timed = [s for s in (seconds or []) if s is not None]
    t = time.perf_counter()
    judge_info = {"spec": None if judge is None else judge.spec,
                  "perplexity": None if judge is None else judge.perplexity(stories),
                  "seconds": None if judge is None else time.perf_counter() - t,
                  "input": "BOS + story text, no prompt", "note": judge_note}
    if judge is None and judge_note is None:
        judge_info["note"] = f"judge perplexity skipped: no judge LM given (e.g. {JUDGE_SPEC})"
    return {
        "count": len(stories),
        "length": length_stats([len(s.split()) for s in stories], word_budget(length)),
        **{f"distinct_{n}": distinct_n(stories, n) for n in (1, 2, 3)},
        "repeated_4gram_rate": float(np.mean([repeated_ngram_rate(story, 4) for story in stories])),
        "content_word_recall": float(np.mean(scored)) if scored else None,
        "content_word_recall_images": len(scored),
        "grounding_gap": grounding_gap(stories, references, seed=seed),
        "hallucination": hallucination_stats(stories, references),
        "staying_on_picture": staying_on_picture([split_sentences(s) for s in stories], references),
        "judge": judge_info,
        "seconds_per_story": float(np.mean(timed)) if timed else None,
        "per_story": [{"content_word_recall": r, "object_mentions": len(object_mentions(story)),
                       "hallucinated": hallucinated_mentions(story, refs)}
                      for story, refs, r in zip(stories, references, recalls)],
    }


def story_metrics(teller, records: Sequence[ImageCaptions], image_embeds: torch.Tensor, length: str | int = "short",
                  candidates: int | None = None, seed: int = 0, progress: bool = False, judge: JudgeLM | None = None,
                  judge_note: str | None = None) -> dict:
    """Write one story per image and measure length, diversity, grounding, made-up objects and fluency."""
    from tqdm import tqdm

    model = teller.model
    stories, seconds, filtered = [], [], 0
    chosen = {} if candidates is None else {"num_candidates": candidates}
    for record in tqdm(records, desc="stories", unit="story", disable=not progress):
        result = teller.generate_story(open_image(record.image), length=length, seed=seed, **chosen)
        stories.append(result.story)
        seconds.append(result.timings["total_s"])
        filtered += result.filtered
    agreement = similarity(image_embeds.float(), text_embeddings(model, stories).float()).numpy()  # [images, stories]
    matched = np.diag(agreement)
    mismatched = agreement[~np.eye(len(stories), dtype=bool)]
    scores = score_stories(records, stories, seconds, length, judge=judge, seed=seed, judge_note=judge_note)
    per_story = scores.pop("per_story")
    return {
        "count": scores.pop("count"),
        "filtered_by_content_filter": filtered,
        **{key: scores.pop(key) for key in ("length", "distinct_1", "distinct_2", "distinct_3",
                                            "repeated_4gram_rate")},
        "grounding": {
            "agreement": float(matched.mean()),
            "agreement_other_images": float(mismatched.mean()) if mismatched.size else None,
            "content_word_recall": scores.pop("content_word_recall"),
            "content_word_recall_images": scores.pop("content_word_recall_images"),
        },
        "perplexity": story_perplexity(model, stories),  # under the writer itself
        "judge_perplexity": scores["judge"]["perplexity"],
        **scores,
        "examples": [{"image": item_name(record.image), "story": story, "agreement": float(a), **extra}
                     for record, story, a, extra in zip(records, stories, matched, per_story)],
    }


# --- the whole evaluation --------------------------------------------------------------------------------------------
def evaluate(model, records: Sequence[ImageCaptions], *, tasks: Sequence[str] = TASKS, num_beams: int | None = None,
             repetition_penalty: float = CAPTION_REPETITION_PENALTY, max_new_tokens: int | None = None,
             captioner: str | None = None,
             stories: int = 20, story_length: str | int = "short", story_candidates: int | None = None,
             batch_size: int = 32, captions_per_image: int = CAPTIONS_PER_IMAGE, use_java: bool | None = None,
             dtype: str = "bfloat16", seed: int = 0, rerank_top_k: int = 20, rerank_weight: float = 0.1,
             progress: bool = False, judge: JudgeLM | None = None, judge_note: str | None = None,
             device=None) -> dict:
    """Evaluate a StoryModel on (image, reference captions) records; returns the report as a dict.

    The model is wrapped in a StoryTeller (which casts the decoder to `dtype`), so the numbers are those of the
    product as served. Decoding settings default to StoryTeller.caption's (the generation config's caption_beams,
    CAPTION_REPETITION_PENALTY). `judge` (a JudgeLM) adds the stories' perplexity under a larger LM; None skips it.
    `device`: where the model runs, as for StoryTeller (None/"auto": cuda when available, else cpu).
    """
    from mmstory import __version__
    from mmstory.generation import Decoding, StoryTeller, word_budget

    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; choose from {', '.join(TASKS)}")
    records, dropped = clean_records(records)
    if not records:
        raise ValueError("no records with a non-empty caption to evaluate")
    if "stories" in tasks and stories > 0:
        word_budget(story_length)  # a bad length fails now, not after the captioning pass
    num_beams = model.generation_config.caption_beams if num_beams is None else num_beams
    begin = time.perf_counter()
    torch.manual_seed(seed)
    teller = StoryTeller(model, dtype=dtype, device=device)
    captioning = "captioning" in tasks
    caption_kwargs = dict(num_beams=num_beams, repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens,
                          captioner=captioner)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    rerank = "retrieval" in tasks and rerank_top_k > 0 and model.caption_decoder is not None
    token_batches: list | None = [] if rerank else None
    kept, captions, image_embeds, unreadable = encode_and_caption(
        model, teller.processor, records, batch_size, caption_kwargs if captioning else None, progress, token_batches)
    timings["images_s"] = time.perf_counter() - t
    good = [records[i] for i in kept]
    references = [r.captions for r in good]
    report: dict = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "mmstory_version": __version__,
        "settings": {"tasks": list(tasks), "model_name": model.config.name, "dtype": dtype,
                     "device": str(teller.device), "batch_size": batch_size,
                     "seed": seed,
                     "captioning": {**caption_kwargs, "captioner": captioner or model.generation_config.captioner},
                     "captions_per_image": captions_per_image, "stories": stories, "story_length": story_length,
                     "rerank_top_k": rerank_top_k if rerank else 0, "rerank_weight": rerank_weight,
                     "story_candidates": story_candidates or Decoding.num_candidates,
                     "judge": judge.spec if judge is not None else None,
                     "use_java": use_java, "java_on_path": java_available()},
        "counts": {"images": len(records), "images_evaluated": len(good), "images_skipped": len(unreadable),
                   "reference_captions": sum(len(r) for r in references), "dropped_captions": len(dropped)},
        "skipped": unreadable + [{"item": d.item, "reason": d.reason} for d in dropped],
    }
    if captioning:
        t = time.perf_counter()
        scores, notes = caption_scores(references, captions, use_java=use_java)
        timings["caption_metrics_s"] = time.perf_counter() - t
        report["captioning"] = {**scores, "distinct_caption_fraction": distinct_caption_fraction(captions),
                                "unique_captions": len(set(captions)), "notes": notes,
                                "examples": [{"image": item_name(r.image), "caption": c}
                                             for r, c in zip(good[:NUM_EXAMPLES], captions)]}
    if "retrieval" in tasks:
        t = time.perf_counter()
        sim, owner = retrieval_similarity(model, image_embeds, references, captions_per_image)
        image_ranks, text_ranks = retrieval_ranks(sim, owner)
        curve_i2t, curve_t2i = recall_curve(image_ranks, len(good)), recall_curve(text_ranks, len(good))
        report["retrieval"] = {**retrieval_metrics(sim, owner), "images": len(good), "texts": len(owner),
                               "curve": {"k": curve_i2t["k"], "image_to_text": curve_i2t["recall"],
                                         "text_to_image": curve_t2i["recall"]}}
        timings["retrieval_s"] = time.perf_counter() - t
        if rerank:
            t = time.perf_counter()
            texts = [c for group in references for c in list(group)[:captions_per_image]]
            tokens, pooled = (torch.cat(parts) for parts in zip(*token_batches))
            rescored = rerank_image_to_text(model, tokens, pooled, sim, texts, rerank_top_k, rerank_weight)
            ranks = retrieval_ranks(rescored, owner)[0]
            report["retrieval"]["image_to_text_reranked"] = {
                **{f"R@{k}": recall_at_k(ranks, k) for k in (1, 5, 10)}, "median_rank": float(np.median(ranks + 1)),
                "top_k": rerank_top_k, "weight": rerank_weight,
                "method": "top-k by contrastive similarity, re-scored with the caption decoder's PMI"}
            timings["retrieval_rerank_s"] = time.perf_counter() - t
    if "stories" in tasks and stories > 0:
        t = time.perf_counter()
        report["stories"] = story_metrics(teller, good[:stories], image_embeds[:stories], story_length,
                                          story_candidates, seed, progress, judge=judge, judge_note=judge_note)
        timings["stories_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - begin
    timings["images_per_s"] = len(good) / timings["images_s"]
    report["timings"] = timings
    return report


# --- command line ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmstory eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mmstory-small", help="packaged name, directory or hub id")
    p.add_argument("--data", required=True, help="Flickr8k-layout folder (captions.csv, <split>.txt, images/) or any "
                                                 "source mmstory.data.load_records reads (CSV, JSONL, COCO, shards)")
    p.add_argument("--split", default="dev", help="split name (<split>.txt beside the captions), a split file, or "
                                                  "'all'")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images of the split")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--num-beams", type=int, default=None, help="default: the generation config's caption_beams")
    p.add_argument("--repetition-penalty", type=float, default=CAPTION_REPETITION_PENALTY)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--captioner", choices=["writer", "caption_decoder"], default=None,
                   help="captioning path (default: the model's own setting)")
    p.add_argument("--stories", type=int, default=20, help="write stories for the first N images (0: none)")
    p.add_argument("--story-length", default="short", help="short, medium, long, or a number of words")
    p.add_argument("--story-candidates", type=int, default=None,
                   help="stories sampled per image and reranked by image agreement (default: StoryTeller's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--device", default="auto", help=DEVICE_HELP + " (default: auto); checked before the model loads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rerank-top-k", type=int, default=20,
                   help="image->text retrieval: re-score each image's top K texts with the caption decoder (0: off)")
    p.add_argument("--rerank-weight", type=float, default=0.1, help="weight of the caption decoder's PMI score")
    p.add_argument("--judge", default=None, metavar="SPEC",
                   help=f"score the stories' perplexity under this decoder spec too, e.g. {JUDGE_SPEC} "
                        "(default: off; a missing package is noted in the report, not an error)")
    p.add_argument("--no-java", action="store_true", help="skip METEOR/SPICE even where java is installed")
    p.add_argument("--out", default="eval_report.json", help="where to write the JSON report")
    p.add_argument("--plots", default=None, help="folder for PNG plots (default: beside the report)")
    p.add_argument("--run-dir", default=None, help="a training run directory (or its metrics.jsonl) to plot")
    return p


def summary(report: dict) -> str:
    lines = [f"{report['counts']['images_evaluated']} images ({report['counts']['images_skipped']} skipped) "
             f"in {report['timings']['total_s']:.1f} s"]
    if "captioning" in report:
        c = report["captioning"]
        names = [k for k in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D", "METEOR", "SPICE") if k in c]
        lines.append("captioning: " + "  ".join(f"{k} {c[k]:.3f}" for k in names)
                     + f"  distinct {c['distinct_caption_fraction']:.2f}")
    if "retrieval" in report:
        r = report["retrieval"]
        for direction in ("image_to_text", "image_to_text_reranked", "text_to_image"):
            if direction not in r:
                continue
            d = r[direction]
            lines.append(f"{direction}: R@1 {d['R@1']:.1f}  R@5 {d['R@5']:.1f}  R@10 {d['R@10']:.1f}  "
                         f"median rank {d['median_rank']:.0f}")
    if "stories" in report:
        s = report["stories"]
        ppl = "n/a" if s["perplexity"] is None else f"{s['perplexity']:.1f}"
        lines.append(f"stories: {s['length']['mean_words']:.0f}/{s['length']['requested_words']} words  "
                     f"distinct-2 {s['distinct_2']:.2f}  rep-4 {s['repeated_4gram_rate']:.3f}  "
                     f"agreement {s['grounding']['agreement']:.3f}  perplexity {ppl}")
        gap, chair = s["grounding_gap"]["gap"], s["hallucination"]["chair_i"]
        judge = s["judge"]["perplexity"]
        lines.append(f"stories: grounding gap {_fmt(gap)}  CHAIR_i {_fmt(chair)}  "
                     f"CHAIR_s {s['hallucination']['chair_s']:.2f}  judge perplexity {_fmt(judge, 1)}"
                     + (f"  ({s['judge']['note']})" if s["judge"]["note"] else ""))
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        device = resolve_device(args.device)  # a device this machine lacks fails now, before data and model load
        records = load_eval_records(args.data, args.split, args.limit)
        if args.run_dir is not None:
            read_training_log(args.run_dir)  # fail before the slow part, not after it
    except (FileNotFoundError, ValueError) as err:
        print(f"mmstory eval: {err}", file=sys.stderr)
        return 2
    from mmstory.model import StoryModel

    try:
        model = StoryModel.from_pretrained(args.model)
    except (OSError, ValueError) as err:
        print(f"mmstory eval: cannot load model {args.model!r}: {err}", file=sys.stderr)
        return 2
    judge, judge_note = (None, None)
    if args.judge and "stories" in tasks and args.stories > 0:
        judge, judge_note = try_load_judge(args.judge)
        if judge_note:
            print(f"mmstory eval: {judge_note}", file=sys.stderr)
    try:
        report = evaluate(model, records, tasks=tasks, num_beams=args.num_beams,
                          repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                          captioner=args.captioner, stories=args.stories, story_length=args.story_length,
                          story_candidates=args.story_candidates,
                          batch_size=args.batch_size, use_java=False if args.no_java else None, dtype=args.dtype,
                          seed=args.seed, rerank_top_k=args.rerank_top_k, rerank_weight=args.rerank_weight,
                          progress=sys.stderr.isatty(), judge=judge, judge_note=judge_note, device=device)
    except ValueError as err:
        print(f"mmstory eval: {err}", file=sys.stderr)
        return 2
    report["settings"].update(model=str(args.model), data=str(args.data), split=args.split, limit=args.limit,
                              command="mmstory eval " + " ".join(sys.argv[1:] if argv is None else argv))
    out = Path(args.out)
    report["plots"] = write_plots(report, Path(args.plots) if args.plots else out.parent, args.run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(summary(report))
    print(f"report: {out}" + "".join(f"\nplot: {p}" for p in report["plots"]))
    return 0
