"""Model configuration: plain dataclasses that round-trip through JSON and YAML.

A config names every pretrained part by its spec string (see `mmstory.specs`), so a saved model is its config plus the
few tensors that were trained.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

TRAIN_MODES = ("frozen", "lora", "full")
BRIDGE_KINDS = ("resampler", "mlp")
CAPTIONERS = ("writer", "caption_decoder")


@dataclass
class PartConfig:
    """A pretrained part: where its weights come from and how it is trained."""

    spec: str
    train: str = "frozen"  # frozen | lora | full
    pretrained: bool = True  # False: the architecture only, randomly initialised (tests, from-scratch runs)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None  # None: peft's default for the architecture

    def __post_init__(self) -> None:
        if self.train not in TRAIN_MODES:
            raise ValueError(f"train must be one of {TRAIN_MODES}, got {self.train!r}")


@dataclass
class BridgeConfig:
    """Turns image features into the decoder's visual prefix."""

    kind: str = "resampler"  # learned-query attention resampler, or "mlp" (ClipCap-style) on the pooled vector
    num_queries: int = 16
    width: int = 384
    depth: int = 2
    heads: int = 6
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in BRIDGE_KINDS:
            raise ValueError(f"bridge kind must be one of {BRIDGE_KINDS}, got {self.kind!r}")


@dataclass
class CaptionDecoderConfig:
    """CoCa's own small multimodal decoder: cross-attends to image tokens, trained from scratch."""

    enabled: bool = False
    vocab_size: int | None = None  # compact vocabulary fitted to the training captions; None: the whole tokenizer
    width: int = 256
    depth: int = 3
    heads: int = 4
    max_length: int = 40
    dropout: float = 0.1
    image_tags: int = 0  # the vision backbone's top-k ImageNet classes, as words, join its memory (OSCAR-style tags)
    tag_tokens: int = 4  # tokens kept of each class name
    # a copy path from the tags into the output (CopyNet's scores beside the generated ones), the tags then being
    # each class's caption word ("Egyptian cat" -> cat, "airliner" -> airplane): a tag word is written by pointing at it
    copy_tags: bool = False


@dataclass
class ModelConfig:
    vision: PartConfig
    text: PartConfig
    writer: PartConfig  # the story writer: a causal LM (a decoder spec, e.g. packaged:smollm2-135m-instruct)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    caption_decoder: CaptionDecoderConfig = field(default_factory=CaptionDecoderConfig)
    name: str = "custom"
    embed_dim: int = 256  # shared image-text embedding space
    text_head_hidden: int = 0  # > 0: a residual MLP of this width joins the text side's linear projection
    # independent contrastive heads, each trained with its own InfoNCE; retrieval scores with the mean of their
    # cosines (a deep ensemble in one dot product: embeddings are contrastive_heads x embed_dim wide)
    contrastive_heads: int = 1
    init_temperature: float = 0.07
    caption_prompt: str = "Describe the picture in one sentence."
    max_caption_tokens: int = 40  # the caption targets' length in training, and the longest caption written
    # > 0: the model keeps the pooled image features of this many training images (`mmstory train` fills them), and
    # caption reranking scores log p(image | caption) against them instead of the bare cosine: a caption that fits many
    # training images as well as this one loses (a pragmatic listener, as in discriminative captioning)
    caption_distractors: int = 0

    def __post_init__(self) -> None:
        if self.caption_distractors < 0:
            raise ValueError(f"caption_distractors must be >= 0, got {self.caption_distractors}")
        if self.contrastive_heads < 1:
            raise ValueError(f"contrastive_heads must be >= 1, got {self.contrastive_heads}")

    # --- I/O -----------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Loss weights that older config.json files carry (now `TrainConfig.loss`) are dropped: they never changed
        the weights, only how a run trained them. Their `decoder` part is the `writer`."""
        data = {k: v for k, v in data.items() if k not in LEGACY_LOSS_FIELDS}
        if "decoder" in data and "writer" not in data:
            data["writer"] = data.pop("decoder")
        return from_dict(cls, data)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class GenerationConfig:
    """Inference settings, saved beside the weights as generation_config.json (as Hugging Face keeps them): how
    captions are decoded and what the story writer reads. They change what a trained model writes, not its weights."""

    captioner: str = "writer"  # which path writes captions: "writer" (the LM through the bridge) or "caption_decoder"
    caption_beams: int = 3  # the beams captions are decoded with unless a caller says otherwise
    caption_rerank: float = 0.0  # beam-search captions reranked by log-prob + this x image-text cosine (CoCa head)
    # > 0: the final rerank also adds this x the story writer's log-probability of each beam (over the square root of
    # its tokens), among beams that name the same kind of subject and no other objects: of two wordings the picture
    # agrees with alike, the one English would say wins ("A sink is sitting on a wall." over "A sink in the air on a
    # wall.")
    caption_fluency: float = 0.0
    # > 0: when the vision backbone's ImageNet classifier is at least this sure of a class whose name ends in a
    # common caption word ('Egyptian cat' -> cat), beam search must write that word (constrained beam search)
    caption_concepts: float = 0.0
    # > 0: a caption that an ImageNet class at least this sure contradicts is told about that class instead
    # (mmstory.captioning.agree_with_classifier): the caption data's people and dogs are not in every photo
    caption_class_check: float = 0.0
    # the caption's agreement with the picture (contrastive heads) at which the check leaves it alone (None: never):
    # on Flickr8k's own photos a caption the heads agree with was right more often than the class that contradicts it
    caption_check_agreement: float | None = None
    # > 0: an animal word at least this sure, surer than the caption's own animal, becomes the caption's subject
    # (three zebras are not "a black and white dog" when zebra is 0.24 sure and dog 0.08)
    caption_animal_rival: float = 0.0
    # ImageNet words the training captions never used join the caption decoder's vocabulary, each borrowing a known
    # word's embedding (mmstory.open_vocabulary): "zebra" can be written, not only "dog"
    caption_open_vocabulary: bool = False
    # > 0: when no word is this sure and the caption's agreement is under caption_hedge_agreement, the caption names
    # only what is sure (mmstory.caption_policy's hedge): a subject nothing supports is not stated as fact
    caption_hedge: float = 0.0
    caption_hedge_agreement: float = 0.0
    # the classifier's mass on classes that show a person (clothes, sports kit) at which a captioned person is
    # supported; below it, a person the caption data's habit put there gives way to what the classifier sees
    caption_person_evidence: float = 0.02
    # the classifier's pooled confidence in a captioned animal's own word ("dog": its 118 breeds) at which the animal
    # is supported; below it, the hedge may say only "an animal" (Flickr8k's dog turns up where no dog is)
    caption_animal_support: float = 0.05
    # a caption written again because the classifier ruled its person or animal subject out (check, rival, hedge)
    # may not write that subject's words (off in mmstory-small: the decoder writes another creature in its place,
    # docs/captions.md)
    caption_ban_rejected: bool = False
    # > 0: a caption written again from the classifier's word loses the phrases that name a thing the picture does not
    # show (a thing word under this pooled confidence; an animal without the support above; people are not judged):
    # the decoder finishes "A hot dog" with Flickr8k's things ("... in front of a white boat"; mmstory.caption_text)
    caption_trim: float = 0.0
    # an unsure caption (no sure word, agreement under caption_hedge_agreement) whose animal subject lacks the support
    # above names only its place ("A brown dog is sitting in a room." -> "A room."): Flickr8k's dog, where nothing
    # vouches for it, was never in the picture
    caption_place_when_unsure: bool = False
    story_prefix: bool = True  # the story writer reads the images' visual prefixes (False: captions only)
    # the story's first sentence is the first picture's caption and the writer goes on from it: the story starts on
    # what the picture shows instead of on whatever the writer's habits suggest
    open_with_caption: bool = False
    # words the story writer may not write (each as a word on its own, in lower and sentence case): a writer trained
    # on photo albums narrates the photo ("This photo shows ...") instead of what it shows
    story_avoid_words: list[str] = field(default_factory=list)
    # a story names people only where a picture shows one (its caption names a person, or the classifier's person
    # evidence reaches caption_person_evidence) or the request does: else the writer may not write a person word,
    # since a writer trained on photo albums brings a man or a family into a photo of a zebra
    story_people_from_pictures: bool = False
    # where the pictures' captions name people of one sex only ("A man ...", "Two girls ..."), the story may not write
    # the other's words (she, her, mother, lady, ...; mmstory.text.FEMALE_WORDS / MALE_WORDS) unless the request does:
    # a small writer brings "his mother" or "an old man" into every scene and swaps "the young girl ... He"
    story_cast_from_pictures: bool = False
    # the story is told in the third person unless the request speaks in the first ("my dog", "we went"): the
    # writer may not start a word "I", "my", "we", ... after a space (a quoted "I" in dialogue stays), since a
    # writer trained on photo albums narrates as the photographer ("I took a good shot of the sand")
    story_third_person: bool = False
    # the story has a plot: a want, a turn and an ending, each opened by a few forced words once the story reaches
    # its share of the word budget (mmstory.story_beats), since a small writer left alone describes and drifts
    story_beats: bool = False
    # words a story may not write unless the request asks for a dark tone or a suspense or mystery story: a writer
    # that learnt from Grimm puts blood and killing into a family's photo of a child on a slide
    story_grim_words: list[str] = field(default_factory=list)
    # > 0: the story picker adds this x each sampled candidate's mean token log-probability under the writer (with
    # its penalties, before temperature and top-p): among samples, the ones the writer itself finds unlikely are the
    # garbled ones
    story_pick_likelihood: float = 0.0

    def __post_init__(self) -> None:
        if self.captioner == "decoder":  # the writer's captioning path, by its old name
            self.captioner = "writer"
        if self.captioner not in CAPTIONERS:
            raise ValueError(f"captioner must be one of {CAPTIONERS}, got {self.captioner!r}")
        for name in ("caption_concepts", "caption_class_check", "caption_animal_rival", "caption_hedge",
                     "caption_person_evidence", "caption_animal_support", "caption_trim"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a classifier confidence in [0, 1], got {getattr(self, name)}")

    def check(self, model: ModelConfig) -> None:
        """The settings this architecture can run."""
        if self.captioner == "caption_decoder" and not model.caption_decoder.enabled:
            raise ValueError("captioner='caption_decoder' needs caption_decoder.enabled=True")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        return from_dict(cls, data)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# once ModelConfig fields, now the training config's `loss` section (mmstory.losses.StoryLoss)
LEGACY_LOSS_FIELDS = ("contrastive_weight", "caption_weight", "caption_decoder_weight")
GENERATION_FIELDS = frozenset(f.name for f in dataclasses.fields(GenerationConfig))


def split_generation(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A model mapping that may hold inference settings too (config.json before generation_config.json, or training
    overrides) as (ModelConfig part, GenerationConfig part)."""
    return ({k: v for k, v in data.items() if k not in GENERATION_FIELDS},
            {k: v for k, v in data.items() if k in GENERATION_FIELDS})


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a (nested) dataclass from a plain dict, rejecting unknown keys so typos in YAML fail loudly."""
    if not isinstance(data, dict):
        raise TypeError(f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _convert(hints[key], value)
    return cls(**kwargs)


def _convert(hint: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return from_dict(arg, value)
        if str in typing.get_args(hint):
            return _word(value)
        return _number(value) if float in typing.get_args(hint) else value
    if hint is float:
        return _number(value)
    if hint is str:
        return _word(value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


def _word(value: Any) -> Any:
    """YAML 1.1 reads `mixed_precision: no` as False: a text field takes a boolean back as the word no / yes."""
    return ("yes" if value else "no") if isinstance(value, bool) else value


def _number(value: Any) -> Any:
    """YAML 1.1 reads `1e-8` (no dot) as a string: take it as the number it spells, or say what is wrong."""
    if not isinstance(value, str):
        return value
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(obj), sort_keys=False)


def load_yaml(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    return from_dict(cls, read_yaml(path))


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping; a top-level `base: FILE` (relative to this file) is read first and this file deep-merged over
    it, so configs that share a block (the Flickr8k stages' data) keep it in one place."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ValueError(f"{path}: its base configs include it again ({' -> '.join(map(str, _seen))})")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or "base" not in data:
        return data
    base = path.parent / data.pop("base")
    if not base.is_file():
        raise FileNotFoundError(f"{path}: base config not found: {base}")
    return deep_merge(read_yaml(base, (*_seen, path.resolve())), data)


def deep_merge(base: dict, update: dict) -> dict:
    """`update` over `base`; mappings under the same key merge, anything else replaces."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


def save_yaml(obj: Any, path: str | Path) -> None:
    Path(path).write_text(to_yaml(obj))
