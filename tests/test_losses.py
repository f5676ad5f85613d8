import math

import torch

from mmstory.losses import IGNORE_INDEX, caption_loss, contrastive_loss


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
