"""Named model configurations and where pretrained models are found, in the manner of open_clip and timm.

Configs only: building a model from one is `mmstory.factory.create_model`, which is why this module imports no model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mmstory.config import BridgeConfig, CaptionDecoderConfig, GenerationConfig, ModelConfig, PartConfig

PRETRAINED_ROOT = Path(__file__).parent / "pretrained"
_REGISTRY: dict[str, Callable[[], ModelConfig]] = {}
_GENERATION: dict[str, Callable[[], GenerationConfig]] = {}


def register(name: str, generation: Callable[[], GenerationConfig] | None = None
             ) -> Callable[[Callable[[], ModelConfig]], Callable[[], ModelConfig]]:
    """Register a ModelConfig factory under `name`, with its GenerationConfig's (default: GenerationConfig())."""
    def wrap(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
        _REGISTRY[name] = fn
        _GENERATION[name] = generation or GenerationConfig
        return fn

    return wrap


AVOIDED_PHOTO_WORDS = ("photo", "photos", "picture", "pictures", "pic", "pics", "image", "images", "photograph",
                       "photographs", "snapshot")
GRIM_WORDS = ("blood", "bled", "bleed", "bleeding", "bloody", "kill", "killed", "kills", "killing", "die", "died",
              "dies", "dying", "dead", "death", "murder", "murdered", "corpse", "knife", "spear", "gun", "stab",
              "stabbed", "drown", "drowned", "drowning", "drowns", "torture", "tortured", "hang", "hanged", "devour",
              "devoured", "corpses", "coffin", "funeral", "cancer", "injured", "wounded",
              "alive")  # "didn't get out of the water alive": in these stories the word is only ever death


def mmstory_small_generation() -> GenerationConfig:
    """The settings shipped as pretrained/mmstory-small/generation_config.json (scripts/export_default.py writes that
    file from here; tests/test_config.py holds the two equal)."""
    return GenerationConfig(
        captioner="caption_decoder",  # it captions better than the LM through the bridge (the model card)
        # 10 beams, the one chosen by log-prob + 120 x the image-caption agreement under the contrastive heads: beam
        # search alone gives look-alike photos the same common caption; the agreement picks the specific one
        caption_rerank=120.0,
        caption_beams=10,
        # the caption policy (mmstory.caption_policy), thresholds chosen on coco_dev's tuning half (docs/captions.md):
        # a word the classifier is >= 30% sure of (pooled over the classes that share it: "fruit") is written, and
        # replaces a person or animal subject it does not support; off Flickr8k the caption decoder sees people and
        # dogs where the classifier sees a zebra, an airliner or a plate of food
        caption_concepts=0.3,
        caption_class_check=0.3,
        caption_check_agreement=0.0,
        # an animal word >= 15% sure and surer than the caption's own animal takes its place ("A zebra", not "A black
        # and white dog"; 0.1-0.2 scored alike on the tuning half)
        caption_animal_rival=0.15,
        # ImageNet words the training captions never used are written through borrowed embeddings
        caption_open_vocabulary=True,
        # with nothing that sure and a subject nothing supports, the caption starts from a word >= 20% sure
        caption_hedge=0.2,
        caption_hedge_agreement=0.0,
        # a captioned person needs 5% of the classifier's mass on clothes or sports kit when it sees something else
        caption_person_evidence=0.05,
        # a captioned animal needs 15% of the classifier behind its own word ("dog": the breeds pooled), else the hedge
        # may call it "an animal" (0.1-0.2 scored alike on the tuning half)
        caption_animal_support=0.15,
        # after a forced word, phrases naming a thing the classifier puts under 5% are dropped ("A hot dog in front of
        # a white boat." -> "A hot dog."; 0.02-0.1 scored alike on the tuning half)
        caption_trim=0.05,
        # an unsure caption whose animal nothing supports names only its place ("A brown dog is sitting in a room." ->
        # "A room."): every such dog on the tuning half, the check half and Flickr8k dev was wrong
        caption_place_when_unsure=True,
        # the writer reads the captions only: the VIST LoRA writer was trained without visual prefixes
        story_prefix=False,
        # the story starts with the first caption, so it starts on the picture (docs/stories.md)
        open_with_caption=True,
        # the writer learnt from photo albums and narrates the photo ("This photo shows ...") instead of its scene
        story_avoid_words=list(AVOIDED_PHOTO_WORDS),
        # no person in the story unless a picture or the request shows one
        story_people_from_pictures=True,
        # and where the pictures show one sex only, no "his mother" or "an old man" for the girl on the swing
        story_cast_from_pictures=True,
        # a narrator, not the photographer: no "I" or "we" unless the request speaks so
        story_third_person=True,
        # a want, a turn and an ending, each opened by forced words: a plot, not a description (docs/stories.md)
        story_beats=True,
        # no blood or killing in a story unless the request asks for a dark tone, suspense or a mystery
        story_grim_words=list(GRIM_WORDS),
        # among the 6 samples, the one the writer itself finds likelier reads better (blind reading, docs/stories.md)
        story_pick_likelihood=1.0,
    )


@register("mmstory-small", generation=mmstory_small_generation)
def mmstory_small() -> ModelConfig:
    """The offline default: EfficientNet-Lite2 + all-MiniLM-L6-v2 + SmolLM2-135M-Instruct, all from PyPI packages."""
    return ModelConfig(
        name="mmstory-small",
        # Lite2 (260 px, 9x9 tokens) over Lite0 (224 px, 7x7): the finer grid retrieves better (numbers in docs/)
        vision=PartConfig("packaged:efficientnet-lite2"),
        text=PartConfig("packaged:all-minilm-l6-v2"),
        writer=PartConfig("packaged:smollm2-135m-instruct"),
        # sized so that the trained tensors ship in 18.9 MiB (bf16) and train in minutes per epoch on two cores
        bridge=BridgeConfig(kind="resampler", num_queries=16, width=256, depth=2, heads=4),
        # image_tags: EfficientNet's own top-5 ImageNet classes, as words, join the caption decoder's memory: they name
        # things Flickr8k rarely shows (a cat, an espresso) that the caption data alone cannot teach
        caption_decoder=CaptionDecoderConfig(enabled=True, vocab_size=6144, width=256, depth=3, heads=4, max_length=40,
                                             image_tags=5, tag_tokens=4),
        embed_dim=256,
        # an ensemble of heads trained side by side in their own stage (configs/flickr8k_heads.yaml) retrieves better
        # than one head; a 256-wide text MLP per head retrieves as well as a 1,024-wide one from a quarter of the
        # weights, which keeps the file small (docs/mmstory-small-development.md has the measurements)
        text_head_hidden=256,
        contrastive_heads=4,
        # rerank by log p(image | caption) against 512 training images rather than the bare cosine: a caption as
        # true of many training images does not win, so look-alike photos keep distinct captions; 512 is the
        # fewest that rerank as well as more do (measurements in docs/mmstory-small-development.md)
        caption_distractors=512,
    )


@register("tiny")
def tiny() -> ModelConfig:
    """Random parts built from code in seconds: for tests and for trying the training loop."""
    return ModelConfig(
        name="tiny",
        vision=PartConfig("timm:test_efficientnet", pretrained=False),
        text=PartConfig("tiny:bert"),
        writer=PartConfig("tiny:llama"),
        bridge=BridgeConfig(kind="resampler", num_queries=4, width=32, depth=1, heads=2),
        caption_decoder=CaptionDecoderConfig(enabled=True, width=32, depth=1, heads=2, max_length=64, dropout=0.0),
        embed_dim=32,
        max_caption_tokens=64,  # byte-level tokens: one per character
    )


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_config(name: str) -> ModelConfig:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model config {name!r}; known: {', '.join(list_models())}")
    return _REGISTRY[name]()


def get_generation_config(name: str) -> GenerationConfig:
    """The inference settings registered with `name` (the defaults for a name not registered)."""
    return _GENERATION.get(name, GenerationConfig)()


def resolve_pretrained(name_or_path: str | Path) -> Path:
    """A packaged name, a local directory, or a Hugging Face hub id (downloaded; needs network)."""
    if isinstance(name_or_path, str) and (PRETRAINED_ROOT / name_or_path / "config.json").is_file():
        return PRETRAINED_ROOT / name_or_path
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json; is it a directory written by save_pretrained()?")
        return path
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; from_pretrained expects a directory written by save_pretrained()")
    name = str(name_or_path)
    if name in _REGISTRY:
        raise FileNotFoundError(f"no trained weights are shipped for {name!r} in {PRETRAINED_ROOT}; train one with "
                                "`mmstory train` or use create_model() for an untrained model")
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise FileNotFoundError(f"{name!r} is neither a packaged model ({', '.join(packaged_models())}), "
                                "a local directory, nor a hub id of the form 'owner/name'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, allow_patterns=["config.json", "generation_config.json",
                                                                        "model.safetensors"]))
    except Exception as err:  # noqa: BLE001 - offline, missing repo, auth: all end in the same advice
        raise FileNotFoundError(f"could not download {name!r} from the Hugging Face hub ({type(err).__name__}). "
                                "Offline, pass a local directory written by save_pretrained().") from err


def packaged_models() -> list[str]:
    if not PRETRAINED_ROOT.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_ROOT.iterdir() if (p / "config.json").is_file())
