"""StoryModel on tiny random parts: losses, masking, freezing, LoRA, save/load."""

import pytest
import torch

from mmstory import StoryModel, caption_search, create_model, get_model_config
from mmstory.losses import IGNORE_INDEX, StoryLoss


def _pixels(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = model.vision.image_size
    return torch.randn(n, 3, size, size, generator=g)


CAPTIONS = ["A dog runs on the grass .", "two children play", "a red car parked in a quiet street at night"]


def test_forward_returns_weighted_sum_of_losses(tiny_model):
    out = tiny_model(_pixels(tiny_model), CAPTIONS)
    cfg = tiny_model.loss_fn
    expected = (cfg.contrastive_weight * out.contrastive_loss + cfg.caption_weight * out.caption_loss
                + cfg.caption_decoder_weight * out.caption_decoder_loss)
    assert torch.allclose(out.loss, expected)
    out.loss.backward()
    assert tiny_model.bridge.queries.grad is not None
    assert tiny_model.image_projection.weight.grad is not None


def test_zero_weights_skip_their_losses():
    model = create_model(get_model_config("tiny"), caption_weight=0.0, contrastive_weight=0.0)
    assert model.loss_fn == StoryLoss(contrastive_weight=0.0, caption_weight=0.0)
    out = model(_pixels(model), CAPTIONS)
    assert out.caption_loss is None and out.contrastive_loss is None
    assert torch.allclose(out.loss, out.caption_decoder_loss)


def test_text_head_mlp_trains_and_round_trips(tmp_path):
    config = get_model_config("tiny")
    config.text_head_hidden = 32
    model = create_model(config)
    assert create_model(get_model_config("tiny")).text_projection.mlp is None  # off unless asked for
    out = model(_pixels(model), CAPTIONS)
    out.contrastive_loss.backward()
    assert model.text_projection.mlp[1].weight.grad.abs().sum() > 0
    assert model.text_projection.linear.weight.grad.abs().sum() > 0
    model.eval()  # the MLP's dropout is off: embeddings are deterministic
    before = model.text_embedding(CAPTIONS)
    assert torch.equal(before, model.text_embedding(CAPTIONS))
    model.save_pretrained(tmp_path / "m")
    assert torch.equal(StoryModel.from_pretrained(tmp_path / "m").text_embedding(CAPTIONS), before)


def test_weights_saved_with_a_plain_linear_text_projection_still_load(tiny_model):
    tensors = tiny_model.trained_state_dict()
    tensors["text_projection.weight"] = tensors.pop("text_projection.linear.weight")  # the name before the MLP head
    fresh = create_model(get_model_config("tiny"))
    fresh.load_trained_state(tensors)
    assert torch.equal(fresh.text_projection.linear.weight, tiny_model.text_projection.linear.weight)


def test_grouped_linear_is_nn_linear_for_one_group_and_independent_maps_for_several():
    from mmstory.components import GroupedLinear

    torch.manual_seed(0)
    reference = torch.nn.Linear(6, 4)
    torch.manual_seed(0)
    single = GroupedLinear(6, 4)  # same layout and initialisation draws: old checkpoints and runs are unchanged
    assert torch.equal(single.weight, reference.weight) and torch.equal(single.bias, reference.bias)
    x = torch.randn(2, 12)
    grouped = GroupedLinear(6, 4, groups=2)
    halves = [torch.nn.functional.linear(x[:, 6 * g: 6 * g + 6], grouped.weight[4 * g: 4 * g + 4],
                                         grouped.bias[4 * g: 4 * g + 4]) for g in range(2)]
    assert torch.allclose(grouped(x), torch.cat(halves, dim=-1), atol=1e-6)


def test_contrastive_heads_score_with_the_mean_of_their_cosines_and_round_trip(tmp_path):
    config = get_model_config("tiny")
    config.contrastive_heads, config.text_head_hidden = 3, 16
    model = create_model(config).eval()
    d = config.embed_dim
    pooled = model.encode_image(_pixels(model))[1]
    images, texts = model.image_embedding(pooled), model.text_embedding(CAPTIONS)
    assert images.shape == (3, 3 * d) and torch.allclose(images.norm(dim=-1), torch.ones(3))
    raw_images = model.image_projection(pooled).unflatten(-1, (3, d))
    raw_texts = model.text_projection(model.encode_text(CAPTIONS)).unflatten(-1, (3, d))
    cosines = torch.stack([torch.nn.functional.cosine_similarity(raw_images[:, None, h], raw_texts[None, :, h], dim=-1)
                           for h in range(3)])
    assert torch.allclose(images @ texts.T, cosines.mean(0), atol=1e-6)
    model.train()
    model(_pixels(model), CAPTIONS).contrastive_loss.backward()
    grads = model.text_projection.mlp[4].weight.grad.view(3, d, 16)
    assert all(g.abs().sum() > 0 for g in grads)  # every head learns
    model.eval()
    model.save_pretrained(tmp_path / "m")
    assert torch.equal(StoryModel.from_pretrained(tmp_path / "m").text_embedding(CAPTIONS), texts)
    config.contrastive_heads = 1
    with pytest.raises(ValueError, match="shape mismatch"):  # a one-head model cannot take three heads' weights
        create_model(config).load_trained_state(model.trained_state_dict())


def test_distractors_turn_caption_agreement_into_log_p_image_given_caption(tmp_path):
    config = get_model_config("tiny")
    config.caption_distractors = 3
    model = create_model(config).eval()
    pooled = model.encode_image(_pixels(model, n=5))[1]
    assert not model.has_distractors()  # zeros until filled: the bare cosine
    assert torch.allclose(model.caption_agreement(CAPTIONS, pooled[:2]),
                          model.text_embedding(CAPTIONS) @ model.image_embedding(pooled[:2]).T)
    model.set_distractors(pooled)  # keeps the first 3
    assert model.has_distractors() and torch.equal(model.distractor_pooled, pooled[:3])
    scale = model.contrastive_scale()
    texts = model.text_embedding(CAPTIONS)
    logits = scale * texts @ model.image_embedding(pooled[:3]).T
    expected = texts @ model.image_embedding(pooled[3:]).T - torch.logsumexp(logits, dim=1, keepdim=True) / scale
    assert torch.allclose(model.caption_agreement(CAPTIONS, pooled[3:]), expected, atol=1e-6)
    model.save_pretrained(tmp_path / "m")
    assert torch.equal(StoryModel.from_pretrained(tmp_path / "m").distractor_pooled, model.distractor_pooled)
    model.set_distractors(pooled[:2])  # fewer images than asked for: the setting follows, so the saved model loads
    assert model.config.caption_distractors == 2
    with pytest.raises(ValueError, match="no distractor images"):
        model.set_distractors(pooled[:0])
    with pytest.raises(ValueError, match="keeps no distractors"):
        create_model(get_model_config("tiny")).set_distractors(pooled)


def test_caption_batch_labels_only_caption_and_eos(tiny_model):
    prefix = torch.zeros(3, tiny_model.config.bridge.num_queries, tiny_model.writer.config.hidden_size)
    embeds, mask, labels = tiny_model._caption_batch(prefix, CAPTIONS)
    tok = tiny_model.tokenizer
    for i, caption in enumerate(CAPTIONS):
        labelled = labels[i][labels[i] != IGNORE_INDEX].tolist()
        assert labelled[-1] == tok.eos_token_id
        assert tok.decode(labelled[:-1]) == caption.replace(" .", ".")
        # everything after the caption's EOS is padding: masked out of attention and of the loss
        end = (labels[i] != IGNORE_INDEX).nonzero().max().item()
        assert mask[i, end + 1:].sum() == 0 and mask[i, : end + 1].all()


def test_caption_loss_does_not_depend_on_padding(tiny_model):
    tiny_model.eval()
    pixels = _pixels(tiny_model, n=2)
    tokens, pooled = tiny_model.encode_image(pixels)
    short = "a cat"
    alone = tiny_model(captions=[short], image_tokens=tokens[:1], image_pooled=pooled[:1])
    # the same sample padded next to a much longer caption: its own token losses are unchanged
    prefix = tiny_model.visual_prefix(tokens, pooled)
    embeds, mask, labels = tiny_model._caption_batch(prefix, [short, "a much longer caption " * 5])
    logits = tiny_model.writer(inputs_embeds=embeds, attention_mask=mask).logits
    from mmstory.losses import caption_loss

    padded_first = caption_loss(logits[:1], labels[:1])
    assert torch.allclose(alone.caption_loss, padded_first, atol=1e-5)


def test_frozen_parts_stay_in_eval_mode_and_get_no_grad(tiny_model):
    config = get_model_config("tiny")
    config.vision.train = "frozen"
    model = create_model(config).train()
    assert not model.vision.model.training
    assert model.bridge.training
    assert not any(p.requires_grad for p in model.vision.model.parameters())
    assert all(p.requires_grad for p in model.bridge.parameters())


def test_lora_trains_only_adapters():
    config = get_model_config("tiny")
    config.writer.train = "lora"
    model = create_model(config)
    trainable = [n for n, p in model.writer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    saved = [k for k in model.trained_state_dict() if k.startswith("writer.")]
    # tiny parts are random, so they are saved whole; LoRA tensors are among them
    assert any("lora_" in k for k in saved)


def test_save_load_round_trip_gives_identical_outputs(tmp_path, tiny_model):
    torch.manual_seed(1)
    for p in tiny_model.bridge.parameters():  # make the trained part non-trivial
        p.data.add_(0.1 * torch.randn_like(p))
    tiny_model.eval()
    pixels = _pixels(tiny_model)
    before = tiny_model(pixels, CAPTIONS)
    captions_before = tiny_model.generate_captions(pixels, max_new_tokens=6, captioner="caption_decoder")
    tiny_model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "generation_config.json",
                                                                 "model.safetensors"]
    loaded = StoryModel.from_pretrained(tmp_path / "m")
    after = loaded(pixels, CAPTIONS)
    for name in ("loss", "contrastive_loss", "caption_loss", "caption_decoder_loss"):
        assert torch.equal(getattr(before, name), getattr(after, name)), name
    assert loaded.generate_captions(pixels, max_new_tokens=6, captioner="caption_decoder") == captions_before


def test_saved_weights_hold_only_trained_tensors_for_pretrained_frozen_parts(tiny_model):
    # pretend the tiny vision encoder were a reproducible pretrained part: it must then not be saved
    tiny_model.config.vision.pretrained = True
    keys = tiny_model.trained_state_dict()
    assert not any(k.startswith("vision.") for k in keys)
    assert any(k.startswith("bridge.") for k in keys)
    assert "logit_scale" in keys


def test_loading_mismatched_weights_fails_clearly(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "m")
    config = get_model_config("tiny")
    config.bridge.num_queries = 7
    other = create_model(config)
    from safetensors.torch import load_file

    with pytest.raises(ValueError, match="shape mismatch"):
        other.load_trained_state(load_file(str(tmp_path / "m" / "model.safetensors")))


def test_from_pretrained_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        StoryModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a packaged model"):
        StoryModel.from_pretrained("definitely-not-a-model")
    with pytest.raises(FileNotFoundError, match="hub"):
        StoryModel.from_pretrained("someone/not-downloadable-offline")


def test_caption_decoder_beam_search_returns_one_caption_per_image(tiny_model):
    tiny_model.eval()
    pixels = _pixels(tiny_model, n=2)
    greedy = tiny_model.generate_captions(pixels, max_new_tokens=5, captioner="caption_decoder")
    beams = tiny_model.generate_captions(pixels, max_new_tokens=5, captioner="caption_decoder", num_beams=3)
    lm = tiny_model.generate_captions(pixels, max_new_tokens=5, captioner="writer")
    assert len(greedy) == len(beams) == len(lm) == 2


def test_caption_decoder_samples_are_reproducible_and_scored_by_self_critical_forward(tiny_model):
    tiny_model.eval()
    with torch.no_grad():
        tokens, pooled = tiny_model.encode_image(_pixels(tiny_model, n=2))
    def draw(seed):
        return tiny_model.sample_captions(tokens, pooled, 3, generator=torch.Generator().manual_seed(seed))
    (ids, texts), (again, _), (other, _) = draw(0), draw(0), draw(1)
    assert len(ids) == len(texts) == 6 and ids == again and ids != other  # image-major: 3 samples per image
    with pytest.raises(ValueError, match="temperature"):
        caption_search.sample(tiny_model.caption_decoder, tokens, 2, temperature=0.0)
    # the policy-gradient loss: -mean over real tokens of advantage x log p(token), as the caption log-likelihood sees
    cfg = tiny_model.loss_fn
    cfg.contrastive_weight = cfg.caption_weight = 0.0
    advantages = torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0, -0.5])
    rows = {k: v.repeat_interleave(3, dim=0) for k, v in (("image_tokens", tokens), ("image_pooled", pooled))}
    out = tiny_model(**rows, caption_samples=ids, sample_advantages=advantages)
    ids_batch, padding = tiny_model._compact_batch(ids, tokens.device)
    logits = tiny_model.caption_decoder(ids_batch, rows["image_tokens"], padding)
    logprobs = logits[:, :-1].log_softmax(-1).gather(2, ids_batch[:, 1:, None])[..., 0] * ~padding[:, 1:]
    expected = -(logprobs.sum(1) * advantages).sum() / (~padding[:, 1:]).sum()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    cfg.contrastive_weight = 1.0
    with pytest.raises(ValueError, match="caption decoder alone"):
        tiny_model(**rows, caption_samples=ids, sample_advantages=advantages)


def test_caption_rerank_picks_the_beam_with_the_best_combined_score(tiny_model):
    tiny_model.eval()
    pixels = _pixels(tiny_model, n=2)
    with torch.no_grad():
        tokens, pooled = tiny_model.encode_image(pixels)
        found = caption_search.candidates(tiny_model.caption_decoder, tokens, 5, num_beams=4)
        assert all(len(rows) >= 2 and rows == sorted(rows, key=lambda r: -r[0]) for rows in found)
        weight = 50.0  # large enough that agreement, not log-probability, decides on a random model
        expected = []
        for image, rows in enumerate(found):
            texts = [t.strip() for t in tiny_model.tokenizer.batch_decode(
                tiny_model.caption_decoder.to_tokenizer([ids for _, ids in rows]), skip_special_tokens=True)]
            cosine = (tiny_model.text_embedding(texts) @ tiny_model.image_embedding(pooled[image:image + 1]).T)[:, 0]
            scores = [lp + weight * float(c) for (lp, _), c in zip(rows, cosine)]
            expected.append(texts[max(range(len(rows)), key=scores.__getitem__)])
        reranked = tiny_model.generate_captions(image_tokens=tokens, image_pooled=pooled, max_new_tokens=5,
                                                num_beams=4, captioner="caption_decoder", rerank=weight)
        plain = tiny_model.generate_captions(image_tokens=tokens, image_pooled=pooled, max_new_tokens=5,
                                             num_beams=4, captioner="caption_decoder", rerank=0.0)
    assert reranked == expected
    assert plain == [tiny_model.tokenizer.decode(tiny_model.caption_decoder.to_tokenizer([rows[0][1]])[0],
                                                 skip_special_tokens=True).strip() for rows in found]


def test_constrained_beam_search_writes_a_required_word(tiny_model):
    tiny_model.eval()
    decoder = tiny_model.caption_decoder
    with torch.no_grad():
        tokens, _ = tiny_model.encode_image(_pixels(tiny_model, n=2))
        free = caption_search.candidates(decoder, tokens, 6, num_beams=3)
        written = {t for rows in free for _, ids in rows for t in ids}
        usable = (~decoder._unusable).nonzero()[:, 0].tolist()
        word, plural = [t for t in usable if t not in written and t != decoder.EOS][:2]  # words no free beam writes
        found = caption_search.candidates(decoder, tokens, 6, num_beams=3, required=[(word,), None])
        either = caption_search.candidates(decoder, tokens, 6, num_beams=3, required=[(word, plural), (plural,)])
        with pytest.raises(ValueError, match="entries"):
            caption_search.candidates(decoder, tokens, 6, num_beams=3, required=[(word,)])
    assert found[1] == free[1]  # no constraint for this image: plain beam search
    no_forms = caption_search.candidates(decoder, tokens, 6, num_beams=3, required=[(), ()])
    assert no_forms == free  # no forms: no constraint
    assert found[0] and all(word in ids for _, ids in found[0])
    assert found[0] == sorted(found[0], key=lambda r: -r[0])
    assert all(word in ids or plural in ids for _, ids in either[0]) and all(plural in ids for _, ids in either[1])


def test_beam_search_over_a_batch_gives_each_image_its_own_captions(tiny_model):
    """One decoder step serves every image's beams; each image's captions are those it gets searched alone, with
    its own constraint, prefix (of any length) and logit bias."""
    tiny_model.eval()
    decoder = tiny_model.caption_decoder
    with torch.no_grad():
        tokens, _ = tiny_model.encode_image(_pixels(tiny_model, n=4))
        usable = [t for t in (~decoder._unusable).nonzero()[:, 0].tolist() if t != decoder.EOS]
        required = [(usable[3],), None, (usable[5], usable[6]), None]
        prefixes = [(), (usable[1],), (usable[2],), (usable[1], usable[4])]
        bias = torch.randn(4, decoder.size, generator=torch.Generator().manual_seed(0))
        together = caption_search.candidates(decoder, tokens, 6, num_beams=3, required=required, logit_bias=bias,
                                             prefixes=prefixes)
        alone = [caption_search.candidates(decoder, tokens[i:i + 1], 6, num_beams=3, required=[required[i]],
                                           logit_bias=bias[i:i + 1], prefixes=[prefixes[i]])[0] for i in range(4)]
    assert together == alone
    assert all(ids[:len(prefixes[i])] == list(prefixes[i]) for i in range(4) for _, ids in together[i])
    assert all(usable[3] in ids for _, ids in together[0])


def test_caption_decoder_compact_vocabulary():
    config = get_model_config("tiny")
    config.caption_decoder.vocab_size = 12
    model = create_model(config)
    with pytest.raises(RuntimeError, match="fit_caption_vocabulary"):
        model(_pixels(model), CAPTIONS)
    model.fit_caption_vocabulary(["aaa bbb", "aab"])  # byte tokens: a x5, b x4, space x1
    dec = model.caption_decoder
    ids = model.tokenize_captions(["ab z"])
    compact = dec.to_compact(ids)[0]
    assert compact[-1] == dec.UNK  # 'z' never occurred in training
    assert dec.to_tokenizer([compact])[0] == ids[0][:-1]
    out = model(_pixels(model), CAPTIONS)
    assert torch.isfinite(out.caption_decoder_loss)
    model.eval()
    with torch.no_grad():  # dev captions with unseen tokens (UNK) still give a finite loss in eval mode
        assert torch.isfinite(model(_pixels(model, n=1), ["zzz qqq"]).caption_decoder_loss)
    captions = model.generate_captions(_pixels(model), max_new_tokens=4, captioner="caption_decoder")
    assert all(set(c) <= set("ab ") for c in captions)  # only fitted tokens are ever generated


def test_caption_decoder_reads_the_backbone_s_imagenet_classes_as_tag_words(tmp_path):
    config = get_model_config("tiny")
    config.caption_decoder.image_tags, config.caption_decoder.tag_tokens = 3, 4
    torch.manual_seed(0)
    model = create_model(config)
    names = model.vision.class_names()
    assert len(names) == 1000 and names[285] == "Egyptian cat"
    model.fit_caption_vocabulary(CAPTIONS + names)  # byte-level tiny tokenizer: every byte of the names is known
    model.eval()
    pixels = _pixels(model, n=2)
    with torch.no_grad():
        tokens, pooled = model.encode_image(pixels)
        tags = model.image_tags(pooled)
        top = model.vision.class_logits(pooled).topk(3).indices
    assert tags.shape == (2, 12)
    decoder = model.caption_decoder
    for row, classes in zip(tags.tolist(), top.tolist()):
        for rank, cls in enumerate(classes):  # each slot holds the first 4 tokens of that class's name
            expected = decoder.to_compact(model.tokenizer([" " + names[cls]], add_special_tokens=False).input_ids)[0]
            assert row[4 * rank: 4 * rank + 4] == (expected + [decoder.PAD] * 4)[:4]

    ids, padding = model._caption_decoder_batch(CAPTIONS[:2], torch.device("cpu"))
    with torch.no_grad():
        a = decoder(ids, tokens, padding, tags)
        b = decoder(ids, tokens, padding, tags.flip(0))  # the other image's tags
    assert not torch.allclose(a, b)  # the decoder does read them
    # incremental decoding (keys and values cached, one token at a time) equals the full pass, padded tags included
    with torch.no_grad():
        state = decoder.start(tokens, tags)
        steps = torch.stack([decoder.step(state, ids[:, t]) for t in range(ids.shape[1])], dim=1)
    full = a.float().masked_fill(decoder._unusable, float("-inf"))
    assert torch.allclose(steps[~padding], full[~padding], atol=1e-4)
    # a batch decodes as its images do one by one (finished rows leave the batch mid-way)
    batch = model.generate_captions(pixels, max_new_tokens=8, captioner="caption_decoder")
    assert batch == [model.generate_captions(pixels[i: i + 1], max_new_tokens=8, captioner="caption_decoder")[0]
                     for i in range(2)]
    with pytest.raises(ValueError, match="tag ids"):
        decoder(ids, tokens, padding)

    out = model(captions=CAPTIONS[:2], image_tokens=tokens, image_pooled=pooled)
    assert torch.isfinite(out.caption_decoder_loss)
    captions = model.generate_captions(pixels, max_new_tokens=5, captioner="caption_decoder", num_beams=2)
    model.save_pretrained(tmp_path / "m")
    loaded = StoryModel.from_pretrained(tmp_path / "m")
    assert loaded.generate_captions(pixels, max_new_tokens=5, captioner="caption_decoder", num_beams=2) == captions


def test_caption_fluency_is_the_writers_length_normalised_log_probability(tiny_model):
    tiny_model.eval()
    texts = ["a dog runs", "two people sit on a very long bench by the sea"]
    with torch.no_grad():
        batched = tiny_model.caption_fluency(texts)
        alone = [tiny_model.caption_fluency([text])[0] for text in texts]
        tok = tiny_model.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        ids = torch.tensor([[start, *tok(texts[0], add_special_tokens=False).input_ids]])
        logprobs = tiny_model.writer(input_ids=ids).logits[0, :-1].log_softmax(-1)
        manual = logprobs.gather(1, ids[0, 1:, None]).sum().item() / (ids.shape[1] - 1) ** 0.5
    assert batched == pytest.approx(alone, abs=1e-4)  # the padding of the shorter caption changes nothing
    assert batched[0] == pytest.approx(manual, abs=1e-4) and all(f < 0 for f in batched)
    assert tiny_model.caption_fluency([]) == []
