"""The caption's check against the image classifier (mmstory.captioning.agree_with_classifier)."""

import pytest
import torch

from mmstory.captioning import agree_with_classifier
from mmstory.config import GenerationConfig


@pytest.fixture(scope="module")
def synonyms():
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [[n.strip() for n in info.index_to_description(i).split(",")] for i in range(1000)]


def sure_of(synonyms, name: str, p: float) -> torch.Tensor:
    probs = torch.full((1000,), (1 - p) / 999)
    probs[[s[0] for s in synonyms].index(name)] = p
    return probs


@pytest.mark.parametrize("caption, sure, p, expected", [
    # a sure animal the caption does not name takes the subject's place
    ("A little boy is standing in the water.", "cheetah", 0.6, "A cheetah is standing in the water."),
    ("A black and white dog is running through the water.", "cheetah", 0.77, "A cheetah is running through the water."),
    ("Two dogs are playing in the snow.", "tiger", 0.6, "A tiger is playing in the snow."),
    # a sure object replaces an animal the classifier gives no weight to
    ("A brown dog is sitting on the floor.", "espresso", 0.89, "An espresso."),
    # kept: the caption names the class's kind, a person beside a dog or cat, a person with an object, unsure classes
    ("A person is sitting on the top of a green and white cat.", "Egyptian cat", 0.79, None),
    ("A dog is running on the grass.", "golden retriever", 0.9, None),
    ("A man in a red shirt is throwing a ball.", "golden retriever", 0.7, None),
    ("A woman in a black jacket is looking at the camera.", "tripod", 0.71, None),
    ("A little boy is standing in the water.", "cheetah", 0.3, None),
    ("The water is blue and calm.", "cheetah", 0.9, None),
])
def test_agree_with_classifier(synonyms, caption, sure, p, expected):
    assert agree_with_classifier(caption, sure_of(synonyms, sure, p), synonyms, 0.5) == (expected or caption)


def test_the_check_is_off_at_zero_and_validated(synonyms):
    caption = "A little boy is standing in the water."
    assert agree_with_classifier(caption, sure_of(synonyms, "cheetah", 0.99), synonyms, 0.0) == caption
    with pytest.raises(ValueError, match="caption_class_check"):
        GenerationConfig(caption_class_check=1.5)
