"""Pure metric functions (no model): captioning, retrieval and story statistics.

Captioning numbers come from pycocoevalcap's own scorer classes (BLEU, ROUGE-L, CIDEr-D), so they are comparable with
published results; only the tokenization before them is ours (`mmstory.ptb`, a Java-free copy of PTBTokenizer).
METEOR and SPICE are Java programs and run only where `java` is on PATH.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs, cook_test

from mmstory.ptb import ptb_tokenize, ptb_tokenize_lines

CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D")
RECALL_KS = (1, 5, 10)
# English function words (close to NLTK's list) and the PTB tokenizer's clitics: what is left is what a picture shows.
_STOPWORD_TEXT = """
a an the and or but nor so if than then too very of in on at to from by with without for into onto upon over under
above below between among through across along around about against behind beside near off out up down after
before during while until again further once as here there this that these those it its he him his she her hers
they them their theirs we us our ours you your yours i me my mine myself who whom whose which what where when why
how all any both each few more most other some such no not only own same can will just should would could may might
must shall is are was were be been being am has have had having do does did doing 's 'm 're 've 'd 'll n't
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())


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
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

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
        self._cooked = {key: cook_refs(group) for key, group in zip(keys, tokenized)}
        corpus = CiderScorer()
        corpus.crefs = list(self._cooked.values())
        corpus.compute_doc_freq()
        self._document_frequency = corpus.document_frequency
        self._log_corpus_size = math.log(len(keys))

    def __call__(self, hypotheses: Sequence[str], keys: Sequence[str]) -> np.ndarray:
        """CIDEr-D (x10 scale, as reported) of hypothesis i against the references of image keys[i]."""
        if len(hypotheses) != len(keys):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(keys)} reference keys")
        scorer = _CorpusCider(self._log_corpus_size)
        scorer.document_frequency = self._document_frequency
        scorer.ctest = [cook_test(h) for h in ptb_tokenize_lines(list(hypotheses))]
        scorer.crefs = [self._cooked[key] for key in keys]
        return np.asarray(scorer.compute_cider(), dtype=np.float64)


class _CorpusCider(CiderScorer):
    """pycocoevalcap's scorer with the idf's log corpus size fixed (`compute_cider` would reset it per batch)."""

    def __init__(self, log_corpus_size: float):
        super().__init__()
        self._log_corpus_size = log_corpus_size

    ref_len = property(lambda self: self._log_corpus_size, lambda self, value: None)


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
def words(text: str) -> list[str]:
    """Lower-cased word tokens without punctuation (the captioning tokenizer, so all metrics count alike)."""
    return ptb_tokenize(text)


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


def shared_content_words(captions: Sequence[str], min_captions: int = 3) -> set[str]:
    """Content words (not stopwords, containing a letter) used by at least `min_captions` of the captions."""
    counts = Counter(w for caption in captions for w in set(words(caption))
                     if w not in STOPWORDS and any(ch.isalpha() for ch in w))
    return {w for w, c in counts.items() if c >= min_captions}


def content_word_recall(text: str, captions: Sequence[str], min_captions: int = 3) -> float | None:
    """Share of the references' shared content words that the text uses; None when the references share none."""
    wanted = shared_content_words(captions, min_captions)
    if not wanted:
        return None
    return len(wanted & set(words(text))) / len(wanted)


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
