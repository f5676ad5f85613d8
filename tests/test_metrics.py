"""Metric functions: the Java-free PTB tokenizer, pycocoevalcap parity, retrieval ranks and story statistics."""

from __future__ import annotations

import csv
import math
import shutil

import numpy as np
import pytest
import torch

from mmstory.eval import metrics
from mmstory.eval.metrics import (
    CiderDReward,
    caption_scores,
    content_word_recall,
    distinct_caption_fraction,
    distinct_n,
    length_stats,
    recall_at_k,
    recall_curve,
    repeated_ngram_rate,
    retrieval_metrics,
    retrieval_ranks,
    score_tokenized,
    shared_content_words,
)
from mmstory.ptb import ptb_tokenize, ptb_tokenize_lines

requires_java = pytest.mark.skipif(shutil.which("java") is None, reason="java is not installed")

# What pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, -preserveLines -lowerCase, then its punctuation filter)
# returns for each sentence; recorded from the Java tool and re-checked against it by test_matches_java_ptbtokenizer.
TRICKY = [
    ("A man's dog doesn't like cats, can't it? I'm sure they'll go.",
     "a man 's dog does n't like cats ca n't it i 'm sure they 'll go"),
    ('"Hello," she said (quietly) -- then left...', "hello she said -lrb- quietly -rrb- then left"),
    ("The U.S. Army at 3:30 p.m. costs $5.50 & more!", "the u.s. army at 3:30 p.m. costs $ 5.50 & more"),
    ("Mr. Smith's t-shirt is red/blue; he's 5'10\" tall.", "mr. smith 's t-shirt is red/blue he 's 5 10 tall"),
    ("Two kids , one in red , play on the grass .", "two kids one in red play on the grass"),
    ("They cannot won't gonna wanna gimme lemme", "they can not wo n't gon na wan na gim me lem me"),
    ("A boy 's bike and the girls' toys.", "a boy 's bike and the girls toys"),
    ("He said `yes' and ''no'' [maybe] {ok}", "he said yes and no -lsb- maybe -rsb- -lcb- ok -rcb-"),
    ("Rock 'n' roll, 'tis the '90s.", "rock 'n' roll 't is the '90s"),
    ("A \"quoted\" word and \u2018curly\u2019 \u201cquotes\u201d \u2014 dash \u2013 en\u2026",
     "a quoted word and curly quotes dash en"),
    ("Costs \u00a35 or \u20ac10 and 50% off * stars", "costs # 5 or $ 10 and 50 % off * stars"),
    ("WHAT?!? Really!!", "what ?!? really !!"),
    ("a dog.A cat", "a dog.a cat"),
    ("AT&T and Q&A, 1,000 people; 3.14 pi", "at&t and q&a 1,000 people 3.14 pi"),
    ("I'd've y'all D'Artagnan O'Neil", "i 'd 've y' all d'artagnan o'neil"),
    ("e.g. i.e. etc. vs. Dr. St.", "e.g. i.e. etc. vs. dr. st."),
    ("a... b.. c . . .", "a. b. c"),
    (":-) ;) :( <3", ":--rrb- ;-rrb- :-lrb- < 3"),
    ("a 10-year-old boy and 3-year-olds at 5:00pm", "a 10-year-old boy and 3-year-olds at 5:00 pm"),
    ("A biker (in red) rides a BMX-bike", "a biker -lrb- in red -rrb- rides a bmx-bike"),
    ("the dog''s toy", "the dog s toy"),
    ("&amp; &lt; &gt;", "& < >"),
    ("A man wearing a helmet , jacket,and gloves.", "a man wearing a helmet jacket and gloves"),
    ("three men in hats...two women", "three men in hats two women"),
]

REFS = [
    ["A black dog runs on the grass .", "A dog running through grass", "The black dog plays outside .",
     "A puppy in a field .", "Black dog on green grass"],
    ["Two children play soccer in a park.", "kids playing football", "Two boys kick a ball on the grass .",
     "Children running after a soccer ball", "two young boys play soccer"],
    ["A man rides a bike down a hill.", "A cyclist on a mountain trail", "a person riding a bicycle",
     "A biker (in red) rides downhill", "man on a bike"],
]
HYPS = ["A black dog is running on the grass.", "Two kids play soccer.", "A man is riding a bicycle down a hill."]


# --- tokenizer -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sentence", "expected"), TRICKY)
def test_tokenizer_reproduces_ptbtokenizer(sentence, expected):
    assert ptb_tokenize_lines([sentence]) == [expected]


@requires_java
def test_matches_java_ptbtokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    java = PTBTokenizer().tokenize({i: [{"caption": s}] for i, (s, _) in enumerate(TRICKY)})
    assert [java[i][0] for i in range(len(TRICKY))] == ptb_tokenize_lines([s for s, _ in TRICKY])


@requires_java
def test_matches_java_ptbtokenizer_on_flickr8k(flickr8k):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with (flickr8k / "captions.csv").open(newline="", encoding="utf-8") as handle:
        captions = [row["caption"] for _, row in zip(range(3000), csv.DictReader(handle))]
    java = PTBTokenizer().tokenize({0: [{"caption": c} for c in captions]})[0]
    assert java == ptb_tokenize_lines(captions)


def test_sentence_final_abbreviation_looks_at_the_next_caption():
    # "A." before a capitalised sentence starter is the letter plus a full stop, as in the Java lexer.
    assert ptb_tokenize_lines(["the letter A.", "The end"]) == ["the letter a", "the end"]
    assert ptb_tokenize_lines(["the letter A.", "the end"]) == ["the letter a.", "the end"]


def test_tokenizer_edge_cases():
    assert ptb_tokenize_lines([]) == []
    assert ptb_tokenize_lines(["", "  ", "a\nb"]) == ["", "", "a b"]
    assert ptb_tokenize("A DOG, running!") == ["a", "dog", "running"]
    assert ptb_tokenize("emoji \U0001F600 here") == ["emoji", "here"]  # untokenizable characters are dropped


# --- captioning scores -----------------------------------------------------------------------------------------------
def _direct_scores(gts: dict, res: dict) -> dict:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"BLEU-1": bleu[0], "BLEU-2": bleu[1], "BLEU-3": bleu[2], "BLEU-4": bleu[3],
            "ROUGE-L": Rouge().compute_score(gts, res)[0], "CIDEr-D": Cider().compute_score(gts, res)[0]}


def test_caption_scores_equal_pycocoevalcap_on_the_same_tokens():
    refs = [[" ".join(ptb_tokenize(r)) for r in group] for group in REFS]
    gts = {f"img{i}": group for i, group in enumerate(refs)}
    res = {f"img{i}": [" ".join(ptb_tokenize(h))] for i, h in enumerate(HYPS)}
    direct = _direct_scores(gts, res)
    scores, notes = caption_scores(REFS, HYPS, use_java=False)
    assert set(metrics.CAPTION_METRICS) <= set(scores)
    for name in metrics.CAPTION_METRICS:
        assert scores[name] == pytest.approx(direct[name], abs=1e-6), name
    assert 0 < scores["BLEU-4"] < scores["BLEU-1"] < 1 and scores["CIDEr-D"] > 0
    assert "METEOR" not in scores and any("METEOR" in n for n in notes)


def test_cider_reward_equals_pycocoevalcap_when_the_corpus_is_the_batch():
    """With the training corpus = the scored images, the per-caption rewards average to the corpus CIDEr-D."""
    references = {f"img{i}": group for i, group in enumerate(REFS)}
    reward = CiderDReward(references)
    per_caption = reward(HYPS, list(references))
    assert per_caption.shape == (len(HYPS),)
    assert per_caption.mean() == pytest.approx(caption_scores(REFS, HYPS, use_java=False)[0]["CIDEr-D"], abs=1e-9)


def test_cider_reward_keeps_corpus_frequencies_and_rewards_the_right_image():
    references = {f"img{i}": group for i, group in enumerate(REFS)}
    reward = CiderDReward(references)
    own, other = reward([REFS[0][0], REFS[0][0]], ["img0", "img1"])
    assert own > other >= 0  # a reference caption scores high for its image, not for another
    # scores do not depend on what else is in the batch (fixed document frequencies)
    alone = reward([HYPS[0]], ["img0"])
    assert alone[0] == pytest.approx(reward(HYPS, list(references))[0])
    with pytest.raises(ValueError, match="reference keys"):
        reward(HYPS, ["img0"])
    with pytest.raises(KeyError):
        reward(["a dog"], ["unknown"])


@requires_java
def test_caption_scores_equal_the_java_pipeline():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in group] for i, group in enumerate(REFS)})
    res = tokenizer.tokenize({i: [{"caption": h}] for i, h in enumerate(HYPS)})
    direct = _direct_scores(gts, res)
    scores, _ = caption_scores(REFS, HYPS, use_java=False)
    for name in metrics.CAPTION_METRICS:
        assert scores[name] == pytest.approx(direct[name], abs=1e-6), name


def test_bleu_and_rouge_by_hand():
    # hypothesis "a dog runs" vs reference "a big dog runs fast": every unigram matches (precision 1) but the
    # hypothesis is shorter: brevity penalty exp(1 - 5/3). ROUGE-L: LCS 3, P = 1, R = 3/5, beta = 1.2.
    scores = score_tokenized({0: ["a big dog runs fast"]}, {0: ["a dog runs"]})
    assert scores["BLEU-1"] == pytest.approx(math.exp(1 - 5 / 3), abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx((1 + 1.44) * 1 * 0.6 / (0.6 + 1.44 * 1), abs=1e-9)
    identical = score_tokenized({0: ["a dog runs on the grass"]}, {0: ["a dog runs on the grass"]})
    assert identical["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and identical["ROUGE-L"] == 1.0


def test_caption_scores_survive_empty_captions_and_check_inputs():
    scores, _ = caption_scores(REFS, ["", "", "a man"], use_java=False)
    assert all(math.isfinite(v) for v in scores.values())
    assert scores["BLEU-1"] < 0.1
    with pytest.raises(ValueError, match="hypotheses"):
        caption_scores(REFS, HYPS[:2], use_java=False)
    with pytest.raises(ValueError, match="at least one reference"):
        caption_scores([[], ["a"]], ["a", "a"], use_java=False)


def test_java_scores_are_skipped_with_a_note_without_java(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    scores, notes = caption_scores(REFS, HYPS)
    assert "METEOR" not in scores and "SPICE" not in scores
    assert any("no `java` on PATH" in n for n in notes)


@requires_java
@pytest.mark.slow
def test_meteor_runs_where_java_is_present():
    scores, notes = caption_scores(REFS, HYPS, use_java=True)
    assert 0.2 < scores["METEOR"] < 1, notes  # close paraphrases: well above chance, below identical


def test_distinct_caption_fraction():
    # the first two are the same caption once tokenized; the other two are unique
    assert distinct_caption_fraction(["A dog runs.", "a dog runs", "a cat sits", "a bird"]) == 0.5
    assert distinct_caption_fraction(["x", "y"]) == 1.0


# --- retrieval -------------------------------------------------------------------------------------------------------
TEXT_IMAGE = [0, 0, 1, 1, 2, 2]
SIM = np.array([
    [0.90, 0.10, 0.50, 0.20, 0.30, 0.00],  # image 0: its best text (0.90) beats every other -> rank 0
    [0.80, 0.70, 0.60, 0.65, 0.10, 0.20],  # image 1: best own text 0.65; texts 0 and 1 score higher -> rank 2
    [0.30, 0.20, 0.10, 0.00, 0.05, 0.25],  # image 2: best own text 0.25; text 0 scores higher -> rank 1
])


def test_retrieval_ranks_on_a_hand_built_matrix():
    image_ranks, text_ranks = retrieval_ranks(SIM, TEXT_IMAGE)
    assert image_ranks.tolist() == [0, 2, 1]
    # text 1: its image scores 0.10, images 1 (0.70) and 2 (0.20) higher; text 4: 0.05 < 0.30 and 0.10
    assert text_ranks.tolist() == [0, 2, 0, 0, 2, 0]
    m = retrieval_metrics(torch.tensor(SIM), TEXT_IMAGE)
    assert m["image_to_text"] == {"R@1": pytest.approx(100 / 3), "R@5": 100.0, "R@10": 100.0,
                                  "median_rank": 2.0, "mean_rank": 2.0}
    assert m["text_to_image"]["R@1"] == pytest.approx(400 / 6)
    assert m["text_to_image"]["median_rank"] == 1.0
    assert m["text_to_image"]["mean_rank"] == pytest.approx(10 / 6)
    assert m["rsum"] == pytest.approx(100 / 3 + 200 + 400 / 6 + 200)


def test_ties_count_against_the_model():
    image_ranks, text_ranks = retrieval_ranks(np.ones((3, 6)), TEXT_IMAGE)
    assert image_ranks.tolist() == [4, 4, 4] and text_ranks.tolist() == [2] * 6
    assert recall_at_k(image_ranks, 1) == 0.0


def test_retrieval_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one text"):
        retrieval_ranks(np.zeros((3, 2)), [0, 1])
    with pytest.raises(ValueError, match="outside"):
        retrieval_ranks(np.zeros((2, 2)), [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_ranks(np.full((1, 1), np.nan), [0])


def test_recall_curve():
    curve = recall_curve(np.array([0, 1, 4, 9, 30]), 40)
    assert curve["k"] == [1, 2, 3, 5, 10, 20, 30, 40]
    assert curve["recall"] == [20.0, 40.0, 40.0, 60.0, 80.0, 80.0, 80.0, 100.0]


# --- stories ---------------------------------------------------------------------------------------------------------
def test_distinct_n_pools_ngrams_across_texts():
    assert distinct_n(["The cat sat on the mat."], 1) == pytest.approx(5 / 6)  # "the" twice
    assert distinct_n(["The cat sat on the mat."], 2) == 1.0
    assert distinct_n(["a b a b", "a b"], 2) == 0.5  # (a b) x3 and (b a): 2 unique of 4
    assert distinct_n(["one"], 3) == 0.0


def test_repeated_ngram_rate():
    assert repeated_ngram_rate("a b c d a b c d", 4) == pytest.approx(1 - 4 / 5)  # abcd repeats once in 5
    assert repeated_ngram_rate("The cat, the cat.", 2) == pytest.approx(1 - 2 / 3)  # punctuation is not a word
    assert repeated_ngram_rate("too short", 4) == 0.0


def test_content_words_shared_by_three_captions():
    assert shared_content_words(REFS[0]) == {"black", "dog", "grass"}  # dog in 4, black and grass in 3 captions
    assert content_word_recall("The dog slept on the grass.", REFS[0]) == pytest.approx(2 / 3)
    assert content_word_recall("A red car.", ["a cat", "one dog", "a bird"]) is None


def test_length_stats():
    stats = length_stats([80, 100, 40], 80)
    assert stats["mean_words"] == pytest.approx(220 / 3)
    assert stats["mean_ratio"] == pytest.approx((1 + 1.25 + 0.5) / 3)
    assert stats["within_20_percent"] == pytest.approx(1 / 3)
    assert (stats["min_words"], stats["max_words"], stats["requested_words"]) == (40, 100, 80)


def test_perplexity():
    assert metrics.perplexity(10 * math.log(4), 10) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        metrics.perplexity(1.0, 0)


def test_tidy_caption_reattaches_clitics_without_changing_scores():
    from mmstory.model import tidy_caption

    detached, tidy = "the cat 's face is n't green .", "the cat's face isn't green ."
    assert tidy_caption(" " + detached) == tidy
    references = [["a cat sits on the wall .", "the cat 's face is green"]]
    assert caption_scores(references, [detached], use_java=False)[0] == caption_scores(references, [tidy],
                                                                                       use_java=False)[0]
