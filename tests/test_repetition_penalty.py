"""The caption decoder's repetition penalty is transformers' RepetitionPenaltyLogitsProcessor: the same numbers as the
hand-written CTRL penalty it replaced, on positive and negative logits and repeated tokens."""

import pytest
import torch

from mmstory.caption_search import penalise_repeats


def ctrl_penalty(logits, previous, penalty):  # the implementation it replaced, kept as the reference
    chosen = logits.gather(1, previous)
    chosen = torch.where(chosen < 0, chosen * penalty, chosen / penalty)
    return logits.scatter(1, previous, chosen)


@pytest.mark.parametrize("penalty", [1.2, 1.5, 0.8])
def test_the_library_penalty_gives_the_same_numbers(penalty):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=generator) * 4
    previous = torch.randint(0, 300, (5, 12), generator=generator)
    previous[:, -1] = previous[:, 0]  # a token seen twice is penalised once
    before = logits.clone()
    assert torch.equal(penalise_repeats(logits, previous, penalty), ctrl_penalty(before, previous, penalty))
    assert torch.equal(logits, before)  # not in place: the caller's logits stay as they were


def test_no_penalty_and_no_history_leave_the_logits_alone():
    logits = torch.randn(2, 10)
    assert penalise_repeats(logits, torch.zeros(2, 3, dtype=torch.long), 1.0) is logits
    assert penalise_repeats(logits, torch.zeros(2, 0, dtype=torch.long), 1.2) is logits
