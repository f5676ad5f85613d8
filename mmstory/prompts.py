"""The story request as text: styles, tones, audiences and lengths, the checks on each, and the writer's user message.

Kept apart from `generation` so that the answerer and the writer's training data build the same message without
importing StoryTeller.
"""

from __future__ import annotations

from collections.abc import Sequence

from mmstory.caption_text import is_fragment, plural_subject
from mmstory.imagenet_words import imagenet_words, plural
from mmstory.text import OBJECT_FORMS, object_mentions, words

IMAGE_PLACEHOLDER = "<image>"  # where a picture's visual prefix goes in a prompt
STYLES = {
    "adventure": "an adventure story, with a journey, a challenge and a brave choice",
    "fairy tale": "a fairy tale, beginning with 'Once upon a time'",
    "humor": "a funny story with a light, playful voice",
    "sci-fi": "a science-fiction story",
    "mystery": "a mystery story with a puzzle and a reveal",
    "suspense": "a suspenseful story",
    "bedtime": "a calm, gentle bedtime story",
    "slice of life": "a warm, realistic slice-of-life story",
    "poem": "a short story told as a poem",
}
TONES = {"positive": "hopeful and warm", "neutral": "even and observant", "negative": "dark and melancholy"}
AUDIENCES = {"children": "young children, with simple words", "adults": "adult readers"}
LENGTHS = {"short": 80, "medium": 200, "long": 350}
DEFAULT_LENGTH = "short"  # what one photo can fill without the writer making things up
MAX_PROMPT_CHARS = 2000
MAX_WORDS = 1000


class StoryInputError(ValueError):
    """A request that cannot be served as given; the message names the problem."""


def word_budget(length: str | int) -> int:
    if isinstance(length, bool):
        raise StoryInputError("length must be 'short', 'medium', 'long' or a number of words")
    if isinstance(length, int):
        if not 20 <= length <= MAX_WORDS:
            raise StoryInputError(f"a word budget must be between 20 and {MAX_WORDS}, got {length}")
        return length
    if isinstance(length, str) and length.strip().lstrip("+-").isdigit():  # "-5" is a number out of range
        return word_budget(int(length.strip()))
    if not isinstance(length, str) or length not in LENGTHS:
        raise StoryInputError(f"unknown length {length!r}; use one of {sorted(LENGTHS)} or a number of words "
                              f"between 20 and {MAX_WORDS}")
    return LENGTHS[length]


def build_instruction(captions: list[str], prompt: str | None, style: str | None, tone: str | None,
                      audience: str | None, budget: int, previous: str | None, with_images: bool = True,
                      hints: Sequence[Sequence[str]] | None = None) -> str:
    """The user message: the pictures in order, each with what it shows, then one short, direct request.

    The same message is built for the writer's training examples (`mmstory.train.writer`), so a trained writer
    sees at inference exactly the form it learnt from. `hints`: per picture, words the image classifier is sure of.
    """
    kind = style or "a short story"
    request = f"Write {kind} (about {budget} words)"
    if audience:
        request += f" for {audience}"
    if tone:
        request += f", {tone} in tone,"
    noun = "photo" if len(captions) == 1 else f"{len(captions)} photos, in order"
    request += f" about this {noun}. Tell only what the photos show, as one story with the same people throughout."
    lines = [IMAGE_PLACEHOLDER * len(captions)] if with_images else []
    lines.append(request)
    for i, caption in enumerate(captions):
        seen = [w for w in (hints[i] if hints and i < len(hints) else []) if w and not _named_by(caption, w)]
        lines.append(f"Photo {i + 1}: {_sentence(caption)}" + (f" Also seen: {', '.join(seen)}." if seen else ""))
    if prompt:
        lines.append(f"The story should be about: {prompt}")
    if previous:
        lines.append(f"Here is the story so far:\n{previous}\nContinue it from where it stops, without repeating it.")
    return "\n".join(lines)


# styles with an opening or a form of their own, which a caption as the first sentence would break
OWN_OPENING_STYLES = ("fairy tale", "poem")


def story_opening(caption: str, style: str | None, previous: str | None) -> str:
    """The sentence a story starts with when the generation config says `open_with_caption`: the caption as written,
    or nothing for a continuation, a custom style or a style that sets its own opening."""
    key = (style or "").strip().lower()
    if previous or not caption.strip() or (key and (key not in STYLES or key in OWN_OPENING_STYLES)):
        return ""
    sentence = _sentence(caption)
    if is_fragment(sentence) and not sentence.startswith("the "):  # "There was the grass."
        sentence = f"there {'were' if plural_subject(sentence) else 'was'} {sentence}"
    return sentence[:1].upper() + sentence[1:]


def _named_by(caption: str, hint: str) -> bool:
    """The caption already names the kind of thing the class is ("egyptian cat" beside "A black and white cat ...",
    "granny smith" beside "An apple on the grass."): then the hint would only give the writer a second cat to write
    about, or make a character of an apple's variety ("The granny smith was very happy.")."""
    head = hint.lower().split()[-1]
    if head in OBJECT_FORMS and OBJECT_FORMS[head] in object_mentions(caption):
        return True
    word = imagenet_words().word_of_class.get(hint.lower())
    said = f" {' '.join(words(caption))} "
    return word is not None and (f" {word} " in said or f" {plural(word)} " in said)


def _sentence(caption: str) -> str:
    caption = caption.strip().rstrip(".")
    if not caption:
        return "something the model could not describe."
    return caption[0].lower() + caption[1:] + "."


def _check_text(text: str | None, what: str, limit: int = MAX_PROMPT_CHARS) -> str | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise StoryInputError(f"{what} must be text, got {type(text).__name__}")
    text = text.strip()
    if len(text) > limit:
        raise StoryInputError(f"{what} is too long ({len(text):,} characters; the limit is {limit:,})")
    return text or None


def _choose(value: str | None, options: dict[str, str], what: str, free_prefix: str | None = None) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise StoryInputError(f"{what} must be text, got {type(value).__name__}")
    key = value.strip().lower()
    if key in options:
        return options[key]
    if free_prefix and key.startswith(free_prefix):
        custom = value.strip()[len(free_prefix):].strip()
        if not custom or len(custom) > 100:
            raise StoryInputError(f"a custom {what} needs 1-100 characters after '{free_prefix}'")
        return custom
    hint = f", or describe your own as '{free_prefix} ...'" if free_prefix else ""
    raise StoryInputError(f"unknown {what} {value!r}; choose one of: {', '.join(options)}{hint}")
