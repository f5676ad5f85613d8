import math

import pytest
import torch

from mmstory.losses import IGNORE_INDEX, caption_loss, contrastive_loss, leave_one_out_baseline, self_critical_loss


def test_infonce_matches_hand_computed_value():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = math.sqrt(0.5)
    text = torch.tensor([[s, s], [0.0, 1.0]])
    scale = torch.tensor(2.0)
    # logits = 2 * image @ text.T = [[2s, 0], [2s, 2]]
    a, b = 2 * s, 2.0
    row0 = -math.log(math.exp(a) / (math.exp(a) + 1))  # image 0 -> text 0
    row1 = -math.log(math.exp(b) / (math.exp(a) + math.exp(b)))  # image 1 -> text 1
    col0 = -math.log(math.exp(a) / (math.exp(a) + math.exp(a)))  # text 0 -> image 0
    col1 = -math.log(math.exp(b) / (1 + math.exp(b)))  # text 1 -> image 1
    expected = 0.5 * ((row0 + row1) / 2 + (col0 + col1) / 2)
    assert abs(contrastive_loss(image, text, scale).item() - expected) < 1e-6


def test_infonce_prefers_matched_pairs():
    emb = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    matched = contrastive_loss(emb, emb, torch.tensor(10.0))
    shuffled = contrastive_loss(emb, emb.roll(1, 0), torch.tensor(10.0))
    assert matched < shuffled


def test_caption_loss_ignores_masked_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX],
                           [IGNORE_INDEX, IGNORE_INDEX, 5, 6, 7, 8]])
    base = caption_loss(logits, labels)
    # logits[:, t] predict labels[:, t+1]: positions predicting ignored labels may change freely
    noisy = logits.clone()
    noisy[0, 0] += 100 * torch.randn(11)  # predicts an ignored label
    noisy[0, 4:] += 100 * torch.randn(2, 11)  # predict padding / nothing
    assert torch.allclose(caption_loss(noisy, labels), base)
    # but a position predicting a real label does count
    noisy[1, 3] += 100 * torch.randn(11)
    assert not torch.allclose(caption_loss(noisy, labels), base)
    # and the value is the mean CE over the 6 labelled targets
    picks = [(0, 1, 3), (0, 2, 4), (1, 1, 5), (1, 2, 6), (1, 3, 7), (1, 4, 8)]
    manual = sum(-torch.log_softmax(logits[b, t], -1)[y] for b, t, y in picks) / len(picks)
    assert torch.allclose(base, manual)


def test_leave_one_out_baseline_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 0.0, 5.0])  # two images, three samples each
    expected = torch.tensor([2.5, 2.0, 1.5, 2.5, 7.5, 5.0])
    assert torch.allclose(leave_one_out_baseline(rewards, 3), expected)
    with pytest.raises(ValueError, match="groups of 4"):
        leave_one_out_baseline(rewards, 4)
    with pytest.raises(ValueError, match=">= 2"):
        leave_one_out_baseline(rewards, 1)


def test_self_critical_loss_value_and_direction():
    logits = torch.zeros(2, 3, 5, requires_grad=True)
    sampled = torch.tensor([[1, 2, 0], [3, 3, 3]])
    mask = torch.tensor([[True, True, False], [True, True, True]])  # the first sample has 2 real tokens
    logprobs = logits.log_softmax(-1).gather(2, sampled[..., None])[..., 0]
    advantages = torch.tensor([1.0, -0.5])
    loss = self_critical_loss(logprobs, mask, advantages)
    by_hand = -(2 * math.log(0.2) * 1.0 + 3 * math.log(0.2) * -0.5) / 5
    assert loss.item() == pytest.approx(by_hand)
    loss.backward()
    # a gradient step raises the tokens of the sample with a positive advantage and lowers the other's
    assert logits.grad[0, 0, 1] < 0 and logits.grad[1, 0, 3] > 0
    assert torch.all(logits.grad[0, 2] == 0)  # padding gets no gradient
    with pytest.raises(ValueError, match="shapes differ"):
        self_critical_loss(logprobs, mask, torch.ones(3))


def test_infonce_with_heads_is_the_mean_of_each_heads_infonce():
    torch.manual_seed(0)
    image, text = torch.randn(5, 3, 4), torch.randn(5, 3, 4)  # 5 pairs, 3 heads of width 4
    unit = torch.nn.functional.normalize
    scale = torch.tensor(7.0)
    per_head = [contrastive_loss(unit(image[:, h], dim=-1), unit(text[:, h], dim=-1), scale) for h in range(3)]
    # the model's layout: each head's slice normalised, side by side, scaled by 1/sqrt(heads)
    side_by_side = [unit(x, dim=-1).flatten(1) / math.sqrt(3) for x in (image, text)]
    assert torch.allclose(contrastive_loss(*side_by_side, scale, heads=3), torch.stack(per_head).mean())
    with pytest.raises(ValueError, match="does not split into 5 heads"):
        contrastive_loss(*side_by_side, scale, heads=5)


def test_story_loss_weights_are_validated():
    from mmstory.losses import StoryLoss

    assert StoryLoss().to_dict() == {"contrastive_weight": 1.0, "caption_weight": 1.0, "caption_decoder_weight": 1.0}
    with pytest.raises(ValueError, match="caption_weight must be >= 0"):
        StoryLoss(caption_weight=-1.0)
    with pytest.raises(ValueError, match="at least one loss weight"):
        StoryLoss(contrastive_weight=0.0, caption_weight=0.0, caption_decoder_weight=0.0)
    with pytest.raises(TypeError, match="must be a number"):
        StoryLoss(contrastive_weight="1")


def test_story_loss_gives_the_numbers_of_the_old_weighted_sum(tiny_model):
    """The loss object on forward's features and logits equals the old path: the model-side weighted sum of each
    head's loss, each recomputed here from the outputs with the plain loss functions."""
    from mmstory.losses import StoryLoss

    tiny_model.eval()  # no dropout: the same features on each call
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, tiny_model.vision.image_size, tiny_model.vision.image_size)
    captions = ["A dog runs on the grass .", "two children play", "a red car parked in a quiet street at night"]
    with torch.no_grad():
        tokens, pooled = tiny_model.encode_image(pixels)
        for weights in ({}, {"contrastive_weight": 0.5, "caption_weight": 2.0, "caption_decoder_weight": 0.25},
                        {"caption_weight": 0.0}, {"contrastive_weight": 0.0, "caption_weight": 0.0}):
            loss = StoryLoss(**weights)
            out = tiny_model(image_tokens=tokens, image_pooled=pooled, captions=captions, loss=loss)
            # the old total, from the parts: zero + w_con * con + w_cap * cap + w_dec * dec (heads weighed 0 left out)
            old = tiny_model.logit_scale.new_zeros(())
            if loss.contrastive_weight > 0:
                con = contrastive_loss(out.image_embeds, out.text_embeds, out.logit_scale, heads=out.contrastive_heads)
                assert torch.equal(out.contrastive_loss, con)
                old = old + loss.contrastive_weight * con
            else:
                assert out.contrastive_loss is None and out.image_embeds is None
            if loss.caption_weight > 0:
                cap = caption_loss(out.caption_logits, out.caption_labels)
                assert torch.equal(out.caption_loss, cap)
                old = old + loss.caption_weight * cap
            else:
                assert out.caption_loss is None and out.caption_logits is None
            dec = caption_loss(out.caption_decoder_logits, out.caption_decoder_labels)
            old = old + loss.caption_decoder_weight * dec
            assert torch.equal(out.loss, old)
            # the loss object applied again to the same features and logits: the same numbers
            total = out.loss
            assert torch.equal(StoryLoss(**weights)(out).loss, total)
            fresh = tiny_model.outputs(captions, tokens, pooled, heads=loss)  # features and logits alone
            assert fresh.loss is None and fresh.contrastive_loss is None and fresh.caption_decoder_logits is not None
        # the model's own loss_fn (default weights 1.0, as ModelConfig's were) is what forward uses without `loss`
        assert torch.equal(tiny_model(image_tokens=tokens, image_pooled=pooled, captions=captions).loss,
                           tiny_model(image_tokens=tokens, image_pooled=pooled, captions=captions,
                                      loss=StoryLoss()).loss)
