"""Novel-object swaps (mmstory.train.novel_objects) and the caption vocabulary's room for the words they write."""

import pytest
import torch

from mmstory.caption_decoder import CaptionDecoder
from mmstory.imagenet_words import imagenet_words
from mmstory.train.novel_objects import NovelObjectSwap, replace_word

GOLDEN_RETRIEVER, TABBY, ZEBRA, JERSEY, BANANA = 207, 281, 340, 610, 954


@pytest.mark.parametrize("caption, expected", [
    ("A black dog runs through the grass .", "A black zebra runs through the grass ."),
    ("A dog and two dogs play .", "An elephant and two elephants play ."),
    ("a dog .", "an elephant ."),
    ("The hotdog stand .", "The hotdog stand ."),  # a word inside another is not the word
])
def test_a_word_and_its_plural_are_replaced_with_the_article_mended(caption, expected):
    new = "zebra" if "zebra" in expected else "elephant"
    assert replace_word(caption, "dog", "dogs", new, new + "s") == expected


def test_a_noun_that_agrees_with_a_tag_is_swapped_with_the_tag():
    swap = NovelObjectSwap(imagenet_words(), probability=1.0)
    classes = torch.tensor([[GOLDEN_RETRIEVER, JERSEY, TABBY, 1, 2], [JERSEY, 1, 2, 3, 4]])
    captions = ["A golden dog runs with a ball .", "A man in a red shirt ."]
    swapped, new_classes = swap(captions, classes, seed=0)
    table = imagenet_words()
    assert swapped[1] == captions[1] and torch.equal(new_classes[1], classes[1])  # clothes are never swapped
    new_word = table.class_word[int(new_classes[0, 0])]
    assert new_word != "dog" and new_word in swapped[0].lower() and "dog" not in swapped[0]
    assert new_classes[0, 1:].tolist() == [JERSEY, TABBY, 1, 2]  # tags that do not name the noun stay
    assert captions[0] == "A golden dog runs with a ball ." and classes[0, 0] == GOLDEN_RETRIEVER  # inputs kept


def test_no_swap_at_probability_zero_and_every_target_is_writable():
    table = imagenet_words()
    swap = NovelObjectSwap(table, probability=0.0)
    classes = torch.tensor([[GOLDEN_RETRIEVER, 1, 2, 3, 4]])
    captions, same = swap(["A dog ."], classes)
    assert captions == ["A dog ."] and torch.equal(same, classes)
    words = swap.target_words()
    assert "zebra" in words and "zebras" in words and "banana" in words and "dog" not in words
    assert "lumbermill" not in words  # places are never a subject
    with pytest.raises(ValueError):
        NovelObjectSwap(table, probability=1.5)


def test_the_vocabulary_keeps_required_tokens_the_captions_never_use():
    decoder = CaptionDecoder(tokenizer_size=100, vocab_size=6, token_dim=8, width=16, depth=1, heads=2,
                             max_length=8, dropout=0.0)
    captions = [[10, 11, 12], [10, 11, 13], [10, 14, 15, 16]]
    decoder.fit_vocabulary(captions)
    assert 50 not in decoder.token_ids.tolist()
    decoder.fit_vocabulary(captions, required=[50, 51])
    kept = decoder.token_ids[CaptionDecoder.SPECIALS:].tolist()
    assert {50, 51, 10, 11} <= set(kept) and len(kept) == 6
    with pytest.raises(ValueError):
        decoder.fit_vocabulary(captions, required=list(range(50, 60)))


def test_the_copy_path_decodes_step_by_step_as_forward_does():
    torch.manual_seed(0)
    decoder = CaptionDecoder(tokenizer_size=60, vocab_size=None, token_dim=8, width=16, depth=2, heads=2,
                             max_length=8, dropout=0.0, tag_slots=3, copy_tags=True).eval()
    with torch.no_grad():
        decoder.copy_query.weight.mul_(50)  # a strong pointer, so that copies change the scores
    image = torch.randn(2, 5, 8)
    tags = torch.tensor([[30, 31, CaptionDecoder.PAD], [40, CaptionDecoder.PAD, CaptionDecoder.PAD]])
    ids = torch.tensor([[CaptionDecoder.BOS, 7, 9], [CaptionDecoder.BOS, 8, 8]])
    with torch.no_grad():
        full = decoder(ids, image, tag_ids=tags)
        plain = CaptionDecoder(tokenizer_size=60, vocab_size=None, token_dim=8, width=16, depth=2, heads=2,
                               max_length=8, dropout=0.0, tag_slots=3)
        plain.load_state_dict({k: v for k, v in decoder.state_dict().items() if not k.startswith("copy_")})
        without = plain.eval()(ids, image, tag_ids=tags)
        state = decoder.start(image, tags)
        steps = [decoder.step(state, ids[:, t]) for t in range(ids.shape[1])]
    usable = ~decoder._unusable  # step() marks PAD, BOS and UNK unwritable
    assert torch.allclose(torch.stack(steps, 1)[..., usable], full[..., usable], atol=1e-5)
    assert (full[0, :, [30, 31]] > without[0, :, [30, 31]]).all()  # tag tokens gain; others do not
    assert torch.allclose(full[0, :, :30], without[0, :, :30]) and torch.allclose(full[1, :, 30], without[1, :, 30])
    with pytest.raises(ValueError):
        CaptionDecoder(tokenizer_size=60, vocab_size=None, token_dim=8, width=16, depth=1, heads=2, max_length=8,
                       dropout=0.0, copy_tags=True)
