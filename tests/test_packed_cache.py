"""The writer's packed int4/int8 weights are kept in the user cache: the same tokens from a cached start, and changed
weights never load a stale pack."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmstory.decoding import FastDecoder
from mmstory.packed_cache import fingerprint


def small_writer(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_a_cached_pack_decodes_the_same_tokens(tmp_path, monkeypatch, quantize):
    monkeypatch.setenv("MMSTORY_CACHE", str(tmp_path))
    model = small_writer()
    embeds = model.get_input_embeddings().weight[10:22][None].detach()
    first = FastDecoder(model, quantize=quantize, compile=False)
    stored = list((tmp_path / "packed").glob("*.safetensors"))
    assert [path.stem for path in stored] == [fingerprint(model, quantize, torch.bfloat16)]
    again = FastDecoder(model, quantize=quantize, compile=False)  # from the file this time
    for old, new in zip(first._layers + [first._head], again._layers + [again._head]):
        assert all(torch.equal(a, b) for a, b in zip(_tensors(old), _tensors(new)))
    settings = dict(max_new_tokens=12, pad_token_id=0)
    assert torch.equal(first.generate(embeds, **settings), again.generate(embeds, **settings))


def test_changed_weights_get_their_own_pack(tmp_path, monkeypatch):
    monkeypatch.setenv("MMSTORY_CACHE", str(tmp_path))
    model = small_writer()
    before = fingerprint(model, "int4", torch.bfloat16)
    original = FastDecoder(model, quantize="int4", compile=False)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1
    assert fingerprint(model, "int4", torch.bfloat16) != before
    assert fingerprint(model, "int8", torch.bfloat16) != before
    changed = FastDecoder(model, quantize="int4", compile=False)
    assert not torch.equal(changed._layers[1].down.scales, original._layers[1].down.scales)
    assert torch.equal(changed._layers[0].down.scales, original._layers[0].down.scales)
    assert len(list((tmp_path / "packed").glob("*.safetensors"))) == 2


def test_a_broken_file_is_packed_again(tmp_path, monkeypatch):
    monkeypatch.setenv("MMSTORY_CACHE", str(tmp_path))
    model = small_writer()
    path = tmp_path / "packed" / f"{fingerprint(model, 'int4', torch.bfloat16)}.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"not a safetensors file")
    decoder = FastDecoder(model, quantize="int4", compile=False)
    assert decoder._head.scales is not None and path.stat().st_size > 1000


def _tensors(part) -> list[torch.Tensor]:
    packs = [part] if hasattr(part, "_fields") else [getattr(part, name) for name in ("qkv", "out", "gate_up", "down")]
    return [t for packed in packs for t in packed if t is not None]
