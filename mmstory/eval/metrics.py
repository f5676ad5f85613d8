"""Pure metric functions (no model): captioning, retrieval and story statistics.

Captioning numbers come from pycocoevalcap's own scorer classes (BLEU, ROUGE-L, CIDEr-D), so they are comparable with
published results; only the tokenization before them is ours (`mmstory.ptb`, a Java-free copy of PTBTokenizer).
METEOR and SPICE are Java programs and run only where `java` is on PATH.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmstory.ptb import ptb_tokenize_lines

# the text helpers generation uses too live in the core; re-exported here, where the metrics that use them are
from mmstory.text import (  # noqa: F401
    OBJECT_FORMS,
    OBJECT_GROUPS,
    STOPWORDS,
    content_word_recall,
    hallucinated_mentions,
    object_mentions,
    reference_objects,
    shared_content_words,
    words,
)

CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D")
RECALL_KS = (1, 5, 10)
EVAL_EXTRA_HINT = "pip install 'mmstory[eval]'"


def _pycocoevalcap(module: str):
    """A pycocoevalcap module, imported on first use: the captioning scorers are the [eval] extra's, not core's."""
    try:
        return importlib.import_module(f"pycocoevalcap.{module}")
    except ImportError as err:
        raise ImportError(f"captioning metrics need pycocoevalcap: {EVAL_EXTRA_HINT}") from err


# --- captioning ------------------------------------------------------------------------------------------------------
def tokenize_captions(captions: Sequence[Sequence[str]]) -> list[list[str]]:
    """Tokenize every caption as pycocoevalcap's PTBTokenizer would, keeping the per-image grouping."""
    flat = [caption for group in captions for caption in group]
    tokens = iter(ptb_tokenize_lines(flat))
    return [[next(tokens) for _ in group] for group in captions]


def java_available() -> bool:
    return shutil.which("java") is not None


def score_tokenized(gts: dict, res: dict) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr-D with pycocoevalcap's scorers on already tokenized {id: [caption]} dicts."""
    Bleu = _pycocoevalcap("bleu.bleu").Bleu  # noqa: N806 - the scorer classes
    Cider = _pycocoevalcap("cider.cider").Cider  # noqa: N806
    Rouge = _pycocoevalcap("rouge.rouge").Rouge  # noqa: N806

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)  # the coco-caption "CIDEr" is CIDEr-D (clipping + length penalty)
    return {**{f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}, "ROUGE-L": float(rouge),
            "CIDEr-D": float(cider)}


def caption_scores(references: Sequence[Sequence[str]], hypotheses: Sequence[str],
                   use_java: bool | None = None) -> tuple[dict[str, float], list[str]]:
    """Corpus scores of one generated caption per image against that image's reference captions.

    Returns (scores, notes). `use_java=None` adds METEOR (and SPICE, when its CoreNLP models are installed) where
    `java` is on PATH; `False` never starts Java. The notes say what was skipped and why.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference groups but {len(hypotheses)} hypotheses")
    if not hypotheses:
        raise ValueError("no captions to score")
    if any(len(group) == 0 for group in references):
        raise ValueError("every image needs at least one reference caption")
    refs = tokenize_captions(references)
    hyps = ptb_tokenize_lines(hypotheses)
    gts = {i: group for i, group in enumerate(refs)}
    res = {i: [hyp] for i, hyp in enumerate(hyps)}
    scores = score_tokenized(gts, res)
    notes = ["tokenized with mmstory.ptb (a Java-free copy of pycocoevalcap's PTBTokenizer)"]
    java_scores, java_notes = _java_scores(gts, res, use_java)
    return {**scores, **java_scores}, notes + java_notes


class CiderDReward:
    """Per-caption CIDEr-D against an image's references, with document frequencies fixed on a training corpus.

    Self-critical training scores each sampled caption on its own; pycocoevalcap's `Cider` would take the n-gram
    document frequencies from whatever batch it is given, so, as SCST implementations do, they come from all the
    training references once. The references are tokenized once too; callers name them by key (the image).
    """

    def __init__(self, references: dict[str, Sequence[str]]):
        if not references:
            raise ValueError("CiderDReward needs reference captions")
        keys = list(references)
        tokenized = tokenize_captions([references[k] for k in keys])
        cider_scorer = _pycocoevalcap("cider.cider_scorer")
        self._cooked = {key: cider_scorer.cook_refs(group) for key, group in zip(keys, tokenized)}
        corpus = cider_scorer.CiderScorer()
        corpus.crefs = list(self._cooked.values())
        corpus.compute_doc_freq()
        self._document_frequency = corpus.document_frequency
        self._log_corpus_size = math.log(len(keys))

    def __call__(self, hypotheses: Sequence[str], keys: Sequence[str]) -> np.ndarray:
        """CIDEr-D (x10 scale, as reported) of hypothesis i against the references of image keys[i]."""
        if len(hypotheses) != len(keys):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(keys)} reference keys")
        scorer = _corpus_cider_class()(self._log_corpus_size)
        scorer.document_frequency = self._document_frequency
        cook_test = _pycocoevalcap("cider.cider_scorer").cook_test
        scorer.ctest = [cook_test(h) for h in ptb_tokenize_lines(list(hypotheses))]
        scorer.crefs = [self._cooked[key] for key in keys]
        return np.asarray(scorer.compute_cider(), dtype=np.float64)


@functools.cache
def _corpus_cider_class() -> type:
    """pycocoevalcap's CiderScorer with the idf's log corpus size fixed (defined on first use: [eval] extra)."""

    class _CorpusCider(_pycocoevalcap("cider.cider_scorer").CiderScorer):
        """pycocoevalcap's scorer with the idf's log corpus size fixed (`compute_cider` would reset it per batch)."""

        def __init__(self, log_corpus_size: float):
            super().__init__()
            self._log_corpus_size = log_corpus_size

        ref_len = property(lambda self: self._log_corpus_size, lambda self, value: None)

    return _CorpusCider


def _java_scores(gts: dict, res: dict, use_java: bool | None) -> tuple[dict[str, float], list[str]]:
    if use_java is False:
        return {}, ["METEOR and SPICE skipped: Java scorers turned off (use_java=False)"]
    if not java_available():
        return {}, ["METEOR and SPICE skipped: no `java` on PATH (they are Java programs)"]
    from pycocoevalcap.meteor.meteor import Meteor

    scores, notes = {}, []
    try:
        meteor = Meteor()
        scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
        del meteor  # stops the Java process
    except (OSError, ValueError) as err:
        notes.append(f"METEOR failed: {err}")
    spice_dir = Path(importlib.util.find_spec("pycocoevalcap").submodule_search_locations[0]) / "spice"
    if not (spice_dir / "lib" / "stanford-corenlp-3.6.0.jar").is_file():
        notes.append("SPICE skipped: the Stanford CoreNLP 3.6.0 models it needs are not installed (pycocoevalcap "
                     "would download them; nothing is downloaded here)")
        return scores, notes
    from pycocoevalcap.spice.spice import Spice

    try:
        scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
    except (OSError, ValueError, RuntimeError) as err:
        notes.append(f"SPICE failed: {err}")
    return scores, notes


def distinct_caption_fraction(captions: Sequence[str]) -> float:
    """Share of images whose caption (as tokenized for scoring) no other image got: 1.0 means no two alike."""
    if not captions:
        raise ValueError("no captions")
    keys = ptb_tokenize_lines(captions)
    counts = Counter(keys)
    return sum(counts[key] == 1 for key in keys) / len(keys)


# --- retrieval -------------------------------------------------------------------------------------------------------
def retrieval_ranks(similarity, text_image: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of the right answer for every image query (over texts) and every text query (over images).

    `similarity` is [images, texts]; `text_image[t]` is the image that text t describes. An image query counts its best
    ranked caption (any of its captions is a hit). Ties count against the model: a wrong candidate scoring the same
    as the right one ranks above it, so a constant model gets the worst rank, not the best.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    owner = np.asarray(text_image, dtype=np.int64)
    if sim.ndim != 2 or sim.shape[1] != owner.shape[0]:
        raise ValueError(f"similarity must be [images, texts] with one image index per text; got {sim.shape} and "
                         f"{owner.shape[0]} indices")
    if owner.min(initial=0) < 0 or owner.max(initial=0) >= sim.shape[0]:
        raise ValueError("text_image holds an index outside the image range")
    if np.isnan(sim).any():
        raise ValueError("similarity contains NaN")
    positive = owner[None, :] == np.arange(sim.shape[0])[:, None]  # [images, texts]
    if not positive.any(axis=1).all():
        raise ValueError("every image needs at least one text")
    best = np.where(positive, sim, -np.inf).max(axis=1)
    image_ranks = ((sim >= best[:, None]) & ~positive).sum(axis=1)
    right = sim[owner, np.arange(owner.shape[0])]
    text_ranks = (sim >= right[None, :]).sum(axis=0) - 1  # minus the right image itself
    return image_ranks, text_ranks


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Percentage of queries whose right answer is among the top k."""
    return float(100.0 * np.mean(np.asarray(ranks) < k))


def retrieval_metrics(similarity, text_image: Sequence[int], ks: Sequence[int] = RECALL_KS) -> dict:
    """Image->text and text->image Recall@K (percent), median and mean rank (1-based), and their R@K sum."""
    image_ranks, text_ranks = retrieval_ranks(similarity, text_image)
    out = {}
    for name, ranks in (("image_to_text", image_ranks), ("text_to_image", text_ranks)):
        out[name] = {**{f"R@{k}": recall_at_k(ranks, k) for k in ks},
                     "median_rank": float(np.median(ranks + 1)), "mean_rank": float(np.mean(ranks + 1))}
    out["rsum"] = sum(out[d][f"R@{k}"] for d in ("image_to_text", "text_to_image") for k in ks)
    return out


def recall_curve(ranks: np.ndarray, max_k: int) -> dict[str, list]:
    """Recall@K at K = 1, 2, 3, 5, 10, 20, 50, ... up to max_k: the points of a recall@K plot."""
    ks = sorted({k for base in (1, 2, 3, 5) for k in (base * 10 ** e for e in range(7)) if k <= max_k} | {max_k})
    return {"k": ks, "recall": [recall_at_k(ranks, k) for k in ks]}


# --- stories ---------------------------------------------------------------------------------------------------------
def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): unique n-grams over all n-grams, pooled across the texts; 0 when there are none."""
    grams = [g for text in texts for g in ngrams(words(text), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(text: str, n: int = 4) -> float:
    """Share of a text's n-grams that repeat an earlier one in the same text (Welleck et al.'s seq-rep-n)."""
    grams = ngrams(words(text), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def length_stats(word_counts: Sequence[int], requested: int) -> dict[str, float]:
    """How generated lengths compare with the requested word budget."""
    counts = np.asarray(word_counts, dtype=np.float64)
    if counts.size == 0:
        raise ValueError("no lengths")
    ratio = counts / requested
    return {"requested_words": requested, "mean_words": float(counts.mean()), "min_words": int(counts.min()),
            "max_words": int(counts.max()), "mean_ratio": float(ratio.mean()),
            "within_20_percent": float(np.mean(np.abs(ratio - 1.0) <= 0.2))}


def perplexity(total_nll: float, total_tokens: int) -> float:
    """Corpus perplexity from summed token negative log-likelihood (nats)."""
    if total_tokens <= 0:
        raise ValueError("no tokens")
    return math.exp(total_nll / total_tokens)


def hallucination_stats(texts: Sequence[str], references: Sequence[Sequence[str]], top: int = 10) -> dict:
    """CHAIR_i (made-up mentions / all mentions, pooled), CHAIR_s (share of texts with one) and mentions per text.

    CHAIR_i is None when the texts name no object at all; `top_hallucinated` lists the most frequent made-up objects
    so a reader can see what the number is made of.
    """
    if len(texts) != len(references):
        raise ValueError(f"{len(texts)} texts but {len(references)} reference groups")
    if not texts:
        raise ValueError("no texts")
    mentions = [object_mentions(t) for t in texts]
    made_up = [hallucinated_mentions(t, refs) for t, refs in zip(texts, references)]
    total, bad = sum(map(len, mentions)), sum(map(len, made_up))
    return {"chair_i": bad / total if total else None, "chair_s": sum(bool(m) for m in made_up) / len(texts),
            "mentions_per_story": total / len(texts), "mentions": total, "hallucinated": bad,
            "top_hallucinated": Counter(o for m in made_up for o in m).most_common(top)}


# --- grounding gap and staying on the picture ------------------------------------------------------------------------
def derangement(n: int, seed: int = 0) -> list[int]:
    """A seeded random permutation of range(n) with no fixed point: every text is paired with another image."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    rng = np.random.default_rng(seed)
    while True:  # rejection sampling: uniform over derangements, ~e tries on average
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm.tolist()


def mean_recall(texts: Sequence[str], references: Sequence[Sequence[str]],
                min_captions: int = 3) -> tuple[float | None, int]:
    """Mean `content_word_recall` over the pairs whose references share content words; (mean or None, pairs)."""
    recalls = [content_word_recall(t, refs, min_captions) for t, refs in zip(texts, references)]
    scored = [r for r in recalls if r is not None]
    return (float(np.mean(scored)) if scored else None), len(scored)


def grounding_gap(texts: Sequence[str], references: Sequence[Sequence[str]], seed: int = 0,
                  min_captions: int = 3) -> dict:
    """Content-word recall with each text's own image minus that with a shuffled (deranged) pairing.

    What the picture adds: generic text that would fit any photo scores the same both ways. Each reference group is
    used once in both pairings, so only the pairing differs. Shuffled and gap are None with fewer than 2 texts.
    """
    if len(texts) != len(references):
        raise ValueError(f"{len(texts)} texts but {len(references)} reference groups")
    own, images = mean_recall(texts, references, min_captions)
    shuffled = None
    if len(texts) >= 2:
        perm = derangement(len(texts), seed)
        shuffled, _ = mean_recall(texts, [references[j] for j in perm], min_captions)
    gap = own - shuffled if own is not None and shuffled is not None else None
    return {"own": own, "shuffled": shuffled, "gap": gap, "images": images, "seed": seed}


def first_last_thirds(sentences: Sequence[str]) -> tuple[str, str]:
    """The first and the last third of a story's sentences as text (at least one sentence each).

    With fewer than 3 sentences: the first and the last sentence (the same one for a one-sentence story).
    """
    if not sentences:
        return "", ""
    k = max(1, len(sentences) // 3)
    return " ".join(sentences[:k]), " ".join(sentences[-k:])


def on_picture_rate(texts: Sequence[str], references: Sequence[Sequence[str]]) -> float | None:
    """1 - CHAIR_i: the share of object mentions the references name; None when no text names an object."""
    chair_i = hallucination_stats(texts, references)["chair_i"] if texts else None
    return None if chair_i is None else 1.0 - chair_i


def staying_on_picture(story_sentences: Sequence[Sequence[str]], references: Sequence[Sequence[str]],
                       min_captions: int = 3) -> dict:
    """On-picture rate and consensus content-word recall in the first and the last third of each story.

    A story that starts with the photo and drifts into invention shows a negative last - first. Takes each story
    already split into sentences, so that the splitter is the writer's own (`generation.split_sentences`).
    """
    if len(story_sentences) != len(references):
        raise ValueError(f"{len(story_sentences)} stories but {len(references)} reference groups")
    firsts, lasts = zip(*(first_last_thirds(s) for s in story_sentences)) if story_sentences else ((), ())
    out: dict = {}
    for name, part in (("first", firsts), ("last", lasts)):
        out[name] = {"on_picture": on_picture_rate(part, references),
                     "content_word_recall": mean_recall(part, references, min_captions)[0]}
    out["last_minus_first"] = {key: (None if out["first"][key] is None or out["last"][key] is None
                                     else out["last"][key] - out["first"][key]) for key in out["first"]}
    return out
