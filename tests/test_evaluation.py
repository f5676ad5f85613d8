"""Evaluation runs: data loading, model-level metrics on the tiny model, plots and the `mmstory eval` command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mmstory import cli
from mmstory.data import ImageCaptions
from mmstory.eval.evaluate import (
    evaluate,
    load_eval_records,
    rerank_image_to_text,
    retrieval_similarity,
    story_perplexity,
)
from mmstory.eval.metrics import distinct_caption_fraction, retrieval_ranks
from mmstory.eval.plots import plot_training_metrics, read_training_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_load_eval_records_from_a_flickr8k_layout(photo_dir):
    (photo_dir / "dev.txt").write_text("img3.png\nimg0.jpg\n")
    records = load_eval_records(photo_dir, "dev")
    assert [r.image.name for r in records] == ["img3.png", "img0.jpg"]  # split order, captions grouped
    assert len(records[0].captions) == 2 and records[0].image == photo_dir / "images" / "img3.png"
    assert len(load_eval_records(photo_dir, "all")) == 8
    assert len(load_eval_records(photo_dir / "captions.csv", None, limit=3)) == 3
    with pytest.raises(FileNotFoundError, match="--split all"):
        load_eval_records(photo_dir, "test")
    with pytest.raises(FileNotFoundError, match="no data"):
        load_eval_records(photo_dir / "missing", "dev")


def test_load_eval_records_on_flickr8k_dev(flickr8k):
    records = load_eval_records(flickr8k, "dev")
    assert len(records) == 1000 and all(len(r.captions) == 5 for r in records)  # the standard 1k/5k protocol


def test_retrieval_similarity_pairs_each_caption_with_its_image(tiny_model):
    tiny_model.eval()  # no dropout: the same text must embed the same way twice
    image_embeds = torch.nn.functional.normalize(torch.randn(3, tiny_model.config.embed_dim), dim=-1)
    refs = [["a", "b", "c"], ["d"], ["e", "f"]]
    sim, owner = retrieval_similarity(tiny_model, image_embeds, refs, captions_per_image=2)
    assert owner.tolist() == [0, 0, 1, 2, 2]  # at most two captions per image, in order
    with torch.no_grad():
        expected = image_embeds @ tiny_model.text_embedding(["a", "b", "d", "e", "f"]).T
    np.testing.assert_allclose(sim, expected.numpy(), atol=1e-5)


def test_story_perplexity_is_the_decoders_own_loss(tiny_model):
    tok = tiny_model.tokenizer
    texts = ["A dog runs.", "Once upon a time there was a cat who liked boxes."]
    losses, counts = [], []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids])
            losses.append(float(tiny_model.writer(input_ids=ids, labels=ids).loss))  # mean NLL over the text
            counts.append(ids.shape[1] - 1)
    expected = math.exp(sum(loss * n for loss, n in zip(losses, counts)) / sum(counts))
    assert story_perplexity(tiny_model, texts) == pytest.approx(expected, rel=1e-4)
    assert story_perplexity(tiny_model, ["", ""]) is None


def test_evaluate_retrieval_only_skips_unreadable_images(tiny_model, photo_dir):
    (photo_dir / "images" / "broken.jpg").write_bytes(b"not an image")
    records = load_eval_records(photo_dir, "all")[:4] + [ImageCaptions(photo_dir / "images" / "broken.jpg", ["x"]),
                                                         ImageCaptions(photo_dir / "images" / "img0.jpg", ["", " "])]
    report = evaluate(tiny_model, records, tasks=("retrieval",), dtype="float32", batch_size=3)
    assert "captioning" not in report and "stories" not in report
    assert report["counts"]["images_evaluated"] == 4 and report["counts"]["images_skipped"] == 1
    assert report["counts"]["dropped_captions"] == 3  # two empty captions, then their image
    assert {s["item"] for s in report["skipped"]} >= {str(photo_dir / "images" / "broken.jpg")}
    assert report["retrieval"]["images"] == 4 and report["retrieval"]["texts"] == 8
    assert report["retrieval"]["curve"]["k"] == [1, 2, 3, 4]
    assert report["retrieval"]["image_to_text_reranked"]["R@10"] == 100.0  # 8 texts: all within top 10
    assert report["retrieval"]["curve"]["text_to_image"][-1] == 100.0  # K = all images: always a hit


def test_plot_training_metrics_reads_the_trainers_log(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "split": "train", "loss": 3.0 / s, "lr": 1e-4} for s in range(1, 6)]
    rows += [{"step": 5, "split": "dev", "loss": 0.9, "R@1": 12.5}]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n\n" + json.dumps({"note": "no step"}) + "\n")
    assert len(read_training_log(tmp_path)) == 6  # the directory or the file; broken lines are left out
    path = plot_training_metrics(read_training_log(log), tmp_path / "plots" / "training.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="no numeric"):
        plot_training_metrics([{"step": 1, "split": "train", "epoch": 2}], tmp_path / "empty.png")  # bookkeeping only


def test_mmstory_eval_end_to_end(tiny_model, photo_dir, tmp_path, capsys):
    model_dir = tiny_model.save_pretrained(tmp_path / "model")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "split": sp, "loss": 2.0 - s / 10}) for s in (10, 20, 30)
                  for sp in ("train", "dev")) + "\n")
    (photo_dir / "dev.txt").write_text("\n".join(f"img{i}.{'jpg' if i % 2 == 0 else 'png'}" for i in range(4)))
    out = tmp_path / "eval" / "report.json"
    fast = ["--num-beams", "1", "--max-new-tokens", "6", "--story-length", "20", "--story-candidates", "1",
            "--batch-size", "3", "--dtype", "float32", "--no-java"]
    rc = cli.main(["eval", "--model", str(model_dir), "--data", str(photo_dir), "--split", "dev", "--stories", "2",
                   "--out", str(out), "--run-dir", str(run_dir), *fast])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["settings"]["split"] == "dev" and report["settings"]["model"] == str(model_dir)
    assert report["counts"]["images_evaluated"] == 4 and report["counts"]["reference_captions"] == 8
    captioning = report["captioning"]
    for name in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D"):
        assert 0.0 <= captioning[name] <= 10.0
    assert "METEOR" not in captioning and any("METEOR" in note for note in captioning["notes"])
    generated = [e["caption"] for e in captioning["examples"]]
    assert len(generated) == 4 and captioning["distinct_caption_fraction"] == distinct_caption_fraction(generated)
    for direction in ("image_to_text", "text_to_image"):
        assert set(report["retrieval"][direction]) == {"R@1", "R@5", "R@10", "median_rank", "mean_rank"}
        assert report["retrieval"][direction]["R@10"] == 100.0  # 4 images, 8 captions: K = 10 covers them all
    stories = report["stories"]
    assert stories["count"] == 2 and stories["length"]["requested_words"] == 20
    assert len(stories["examples"]) == 2 and all(isinstance(e["story"], str) for e in stories["examples"])
    assert stories["grounding"]["agreement"] == pytest.approx(np.mean([e["agreement"] for e in stories["examples"]]))
    assert stories["grounding"]["agreement_other_images"] is not None
    assert math.isfinite(stories["perplexity"]) and stories["perplexity"] > 1.0
    assert {"images_s", "stories_s", "total_s"} <= set(report["timings"])
    assert sorted(p.rsplit("/", 1)[-1] for p in report["plots"]) == ["recall_at_k.png", "training_metrics.png"]
    for plot in report["plots"]:
        assert (out.parent / plot.rsplit("/", 1)[-1]).read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "image_to_text: R@1" in printed and str(out) in printed


def test_mmstory_eval_reports_bad_arguments(photo_dir, capsys):
    assert cli.main(["eval", "--model", "tiny", "--data", str(photo_dir), "--split", "test"]) == 2
    assert "--split all" in capsys.readouterr().err
    assert cli.main(["eval", "--data", str(photo_dir), "--split", "all", "--run-dir", str(photo_dir)]) == 2
    assert "no training log" in capsys.readouterr().err


def test_caption_log_likelihood_is_the_caption_decoder_loss_summed(tiny_model):
    tiny_model.eval()
    tokens = torch.randn(2, tiny_model.vision.num_tokens, tiny_model.vision.token_dim)
    captions = ["a dog runs", "two birds sit on a long fence"]
    ll = tiny_model.caption_log_likelihood(tokens, captions)
    for i, caption in enumerate(captions):
        with torch.no_grad():
            out = tiny_model(captions=[caption], image_tokens=tokens[i:i + 1], image_pooled=tokens[i:i + 1].mean(1))
        n = len(tiny_model.caption_decoder.to_compact(tiny_model.tokenize_captions([caption]))[0]) + 1  # + EOS
        assert math.isclose(float(ll[i]), -float(out.caption_decoder_loss) * n, rel_tol=1e-4)


def test_rerank_keeps_the_top_k_above_the_rest_and_orders_it_by_contrastive_plus_pmi(tiny_model):
    tiny_model.eval()
    torch.manual_seed(0)
    tokens = torch.randn(3, tiny_model.vision.num_tokens, tiny_model.vision.token_dim)
    texts = ["a dog", "a cat on a mat", "two people", "a red car", "the sea", "a boy jumps"]
    sim = torch.rand(3, len(texts)).numpy()
    weight = 0.5
    pooled = tokens.mean(1)
    rescored = rerank_image_to_text(tiny_model, tokens, pooled, sim, texts, top_k=3, weight=weight, batch_size=4)
    scale = float(tiny_model.logit_scale.exp())
    prior = tiny_model.caption_log_likelihood(tokens.mean(0, keepdim=True).expand(len(texts), -1, -1), texts)
    for i in range(3):
        top = np.argsort(-sim[i])[:3]
        rest = np.argsort(-sim[i])[3:]
        assert rescored[i, top].min() > rescored[i, rest].max()
        np.testing.assert_array_equal(np.argsort(-rescored[i, rest]), np.argsort(-sim[i, rest]))
        pmi = tiny_model.caption_log_likelihood(tokens[i].expand(3, -1, -1), [texts[j] for j in top]) - prior[top]
        expected = scale * torch.as_tensor(sim[i, top]) + weight * pmi
        assert list(np.argsort(-rescored[i, top])) == list(np.argsort(-expected.numpy()))
    unchanged = rerank_image_to_text(tiny_model, tokens, pooled, sim, texts, top_k=3, weight=0.0)
    owner = [0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(retrieval_ranks(unchanged, owner)[0], retrieval_ranks(sim, owner)[0])
