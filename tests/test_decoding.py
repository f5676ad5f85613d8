"""FastDecoder: the same tokens as transformers.generate, and the controls story writing needs (no timings here)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteria, StoppingCriteriaList

from mmstory.decoding import FastDecoder, _linear, decode_head, pack_linear, pack_projections
from mmstory.tiny import tiny_decoder
from tests.conftest import requires_packaged


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = tiny_decoder()
    model.generation_config.eos_token_id = None  # fixed lengths unless a test asks for an end token
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def compiled(tiny):
    """One compiled decoder for the module: compiling is the slow part."""
    return FastDecoder(tiny[0], compile=True)


def prompt(model, rows: int = 1, length: int = 12, seed: int = 0) -> torch.Tensor:
    """Prompt embeddings like the story writer's: random 'visual prefix' vectors followed by token embeddings."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.config.vocab_size, (rows, length - 4), generator=gen)
    prefix = torch.randn(rows, 4, model.config.hidden_size, generator=gen) * 0.05
    with torch.no_grad():
        return torch.cat([prefix, model.get_input_embeddings()(ids)], dim=1).to(model.dtype)


def hf_generate(model, embeds, mask=None, **kwargs) -> torch.Tensor:
    mask = torch.ones(embeds.shape[:2], dtype=torch.long) if mask is None else mask
    with torch.no_grad():
        return model.generate(inputs_embeds=embeds, attention_mask=mask, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("rows", [1, 3])
def test_greedy_equals_transformers(tiny, compiled, rows):
    model, _ = tiny
    embeds = prompt(model, rows, seed=rows)
    expected = hf_generate(model, embeds, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    got = compiled.generate(embeds, max_new_tokens=40, min_new_tokens=40, pad_token_id=0)
    assert torch.equal(got, expected)


def test_greedy_equals_transformers_with_penalties(tiny, compiled):
    model, _ = tiny
    embeds = prompt(model, 2, length=14, seed=3)
    settings = dict(max_new_tokens=30, do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=2)
    assert torch.equal(compiled.generate(embeds, pad_token_id=0, **settings), hf_generate(model, embeds, **settings))


def test_suppressed_tokens_never_appear_and_match_transformers(tiny, compiled):
    model, _ = tiny
    embeds = prompt(model, 2, length=14, seed=5)
    settings = dict(max_new_tokens=30, do_sample=False)
    free = compiled.generate(embeds, pad_token_id=0, **settings)
    banned = sorted(set(free[:, :10].flatten().tolist()))[:6]  # tokens greedy decoding does choose
    got = compiled.generate(embeds, pad_token_id=0, suppress_tokens=banned, **settings)
    assert not set(got.flatten().tolist()) & set(banned)
    assert torch.equal(got, hf_generate(model, embeds, suppress_tokens=banned, **settings))


def test_greedy_equals_transformers_with_left_padding(tiny, compiled):
    model, _ = tiny
    embeds = prompt(model, 2, length=14, seed=4)
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :5] = 0  # row 1 is a shorter prompt, left-padded
    expected = hf_generate(model, embeds, mask, max_new_tokens=30, do_sample=False)
    assert torch.equal(compiled.generate(embeds, mask, max_new_tokens=30), expected)


def test_eager_step_equals_compiled(tiny, compiled):
    model, _ = tiny
    embeds = prompt(model, 2, seed=5)
    eager = FastDecoder(model, compile=False)
    assert torch.equal(eager.generate(embeds, max_new_tokens=25), compiled.generate(embeds, max_new_tokens=25))


def test_candidates_share_one_prefill(tiny, compiled):
    """Copies of one prompt (the candidates) are prefilled once; greedy rows then agree with a single row."""
    model, _ = tiny
    embeds = prompt(model, 1, seed=7)
    single = compiled.generate(embeds, max_new_tokens=20)
    batch = compiled.generate(embeds.expand(3, -1, -1), max_new_tokens=20)
    assert torch.equal(batch, single.expand(3, -1))


def test_same_seed_same_sample(tiny, compiled):
    model, _ = tiny
    embeds = prompt(model, 3, seed=11)
    settings = dict(max_new_tokens=30, do_sample=True, temperature=1.3, top_k=40, top_p=0.9)
    first = compiled.generate(embeds, seed=123, **settings)
    torch.manual_seed(999)  # the global RNG must not matter when a seed is given
    again = compiled.generate(embeds, seed=123, **settings)
    other = compiled.generate(embeds, seed=124, **settings)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_global_rng_like_generate(tiny, compiled):
    """Without `seed`, sampling draws from the global RNG, so torch.manual_seed makes it reproducible."""
    model, _ = tiny
    embeds = prompt(model, 2, seed=12)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(compiled.generate(embeds, max_new_tokens=20, do_sample=True, top_k=0, temperature=2.0))
    assert torch.equal(runs[0], runs[1])


def test_top_k_one_sampling_is_greedy(tiny, compiled):
    model, _ = tiny
    embeds = prompt(model, 2, seed=13)
    greedy = compiled.generate(embeds, max_new_tokens=25)
    sampled = compiled.generate(embeds, max_new_tokens=25, do_sample=True, top_k=1, temperature=0.7, seed=1)
    assert torch.equal(sampled, greedy)


def test_eos_stops_a_row_and_min_new_tokens_delays_it(tiny, compiled):
    model, _ = tiny
    embeds = prompt(model, 1, seed=17)
    free = compiled.generate(embeds, max_new_tokens=30)[0]
    eos = int(free[4])  # make the 5th greedy token the end-of-sequence token
    first = int((free == eos).nonzero()[0])
    stopped = compiled.generate(embeds, max_new_tokens=30, eos_token_id=eos, pad_token_id=0)[0]
    assert stopped.tolist() == free[: first + 1].tolist()
    delayed = compiled.generate(embeds, max_new_tokens=30, min_new_tokens=first + 3, eos_token_id=eos)[0]
    assert eos not in delayed[: first + 3].tolist()
    assert len(delayed) > first + 1


class StopAfter(StoppingCriteria):
    """Stops row r once it has `lengths[r]` new tokens: a per-row criterion like the story word budget."""

    def __init__(self, lengths: list[int]):
        self.lengths = torch.tensor(lengths)
        self.calls = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return input_ids.shape[1] >= self.lengths


def test_per_row_stopping_criteria(tiny, compiled):
    model, _ = tiny
    embeds = prompt(model, 3, seed=19)
    free = compiled.generate(embeds, max_new_tokens=12)
    out = compiled.generate(embeds, max_new_tokens=50, pad_token_id=0,
                            stopping_criteria=StoppingCriteriaList([StopAfter([3, 12, 7])]))
    assert out.shape == (3, 12)  # ends when the last row stops
    assert torch.equal(out[1], free[1])
    assert torch.equal(out[0, :3], free[0, :3]) and out[0, 3:].eq(0).all()
    assert torch.equal(out[2, :7], free[2, :7]) and out[2, 7:].eq(0).all()
    # the same from transformers, which pads stopped rows only when an end token is set
    expected = hf_generate(model, embeds, max_new_tokens=50, do_sample=False, eos_token_id=3,
                           stopping_criteria=StoppingCriteriaList([StopAfter([3, 12, 7])]))
    assert torch.equal(compiled.generate(embeds, max_new_tokens=50, pad_token_id=0, eos_token_id=3,
                                         stopping_criteria=StoppingCriteriaList([StopAfter([3, 12, 7])])), expected)


def test_stream_yields_the_generated_tokens(tiny, compiled):
    model, _ = tiny
    embeds = prompt(model, 2, seed=23)
    settings = dict(max_new_tokens=24, do_sample=True, top_p=0.8, seed=4)
    steps = list(compiled.stream(embeds, **settings))
    assert len(steps) == 24 and all(s.shape == (2,) for s in steps)
    assert torch.equal(torch.stack(steps, dim=1), compiled.generate(embeds, **settings))


class Collect:
    """A transformers-style streamer (put/end)."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value)

    def end(self):
        self.ended = True


def test_streamer_protocol_like_generate(tiny, compiled):
    model, _ = tiny
    embeds = prompt(model, 1, seed=29)
    ours, theirs = Collect(), Collect()
    out = compiled.generate(embeds, max_new_tokens=15, streamer=ours)
    hf_generate(model, embeds, max_new_tokens=15, do_sample=False, streamer=theirs)
    assert ours.ended and theirs.ended
    assert [p.tolist() for p in ours.puts] == [p.tolist() for p in theirs.puts]
    assert torch.cat(ours.puts[1:]).tolist() == out[0].tolist()


def test_text_iterator_streamer_in_a_thread(tiny, compiled):
    """How StoryTeller streams: generate in a worker thread, text pieces read from a TextIteratorStreamer."""
    import threading

    from transformers import TextIteratorStreamer

    model, tokenizer = tiny
    embeds = prompt(model, 1, seed=30)
    expected = compiled.generate(embeds, max_new_tokens=20, do_sample=True, seed=3)
    streamer = TextIteratorStreamer(tokenizer, skip_special_tokens=True)
    worker = threading.Thread(target=compiled.generate, args=(embeds,),
                              kwargs=dict(max_new_tokens=20, do_sample=True, seed=3, streamer=streamer))
    worker.start()
    pieces = list(streamer)
    worker.join()
    assert len(pieces) > 1
    assert "".join(pieces) == tokenizer.decode(expected[0], skip_special_tokens=True)


def test_beam_search_is_passed_to_transformers(tiny, compiled):
    model, _ = tiny
    embeds = prompt(model, 1, seed=31)
    settings = dict(max_new_tokens=12, num_beams=3, do_sample=False, length_penalty=1.0)
    assert torch.equal(compiled.generate(embeds, pad_token_id=0, **settings), hf_generate(model, embeds, **settings))


def test_int8_weights_close_to_dense(tiny):
    model, _ = tiny
    embeds = prompt(model, 1, seed=37)
    dense = FastDecoder(model, compile=False)
    int8 = FastDecoder(model, quantize="int8", compile=False)
    assert int8.weight_bytes < dense.weight_bytes / 2
    # the first token comes from the exact prefill; later ones from int8 weights, close to the dense ones
    a = dense.generate(embeds, max_new_tokens=8)[0]
    b = int8.generate(embeds, max_new_tokens=8)[0]
    assert a[0] == b[0] and (a == b).float().mean() >= 0.5


def test_int4_reproduces_q4_1_blocks():
    """Weights that are Q4_1 blocks (value = step * q + low per 32 inputs, as in the packaged GGUF) pack losslessly
    up to bf16 rounding of the block's step and offset."""
    gen = torch.Generator().manual_seed(0)
    n, k = 128, 96
    q = torch.randint(0, 16, (n, k // 32, 32), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15  # Q4_1 blocks span their full range
    step = torch.rand(n, k // 32, 1, generator=gen) * 0.01 + 0.001
    low = -8 * step + torch.randn(n, k // 32, 1, generator=gen) * 0.001
    weight = (q * step + low).reshape(n, k).to(torch.bfloat16)
    x = torch.randn(4, k, generator=gen).to(torch.bfloat16)
    packed = pack_linear(weight, "int4", torch.bfloat16)
    identity = torch.eye(k, dtype=torch.bfloat16)
    restored = _linear(identity, packed).t()
    assert (restored.float() - weight.float()).abs().max() <= 0.01 * weight.float().abs().max()
    expected = x.float() @ weight.float().t()
    assert torch.allclose(_linear(x, packed).float(), expected, rtol=0.02, atol=0.02 * expected.abs().max())


def test_int4_head_rescores_the_top_tokens_exactly():
    gen = torch.Generator().manual_seed(1)
    weight = (torch.randn(512, 128, generator=gen) * 0.05).to(torch.bfloat16)
    norm = torch.ones(128, dtype=torch.bfloat16)
    x = torch.randn(2, 1, 128, generator=gen).to(torch.bfloat16)
    dense = decode_head(x, norm, pack_linear(weight, None, torch.bfloat16), None, 1e-5, 0)
    int4 = decode_head(x, norm, pack_linear(weight, "int4", torch.bfloat16), weight, 1e-5, 16)
    top = int4.topk(16, dim=-1).indices
    assert torch.allclose(int4.gather(1, top), dense.gather(1, top), rtol=0.01, atol=0.01)
    assert torch.equal(top[:, :4], dense.topk(4, dim=-1).indices)
    rest = torch.ones_like(int4, dtype=torch.bool).scatter(1, top, False)
    assert not torch.allclose(int4[rest], dense[rest], rtol=0.01, atol=0.01)  # elsewhere: int4 scores


def test_int4_decoder_generates():
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    embeds = prompt(model, 2, seed=41)
    dense, int4 = FastDecoder(model, compile=False), FastDecoder(model, quantize="int4", compile=False)
    assert int4.weight_bytes < dense.weight_bytes / 3
    a, b = dense.generate(embeds, max_new_tokens=6), int4.generate(embeds, max_new_tokens=6)
    assert b.shape == (2, 6) and b.max() < 512
    assert torch.equal(a[:, 0], b[:, 0])  # the first token comes from the exact prefill


def test_rejects_what_it_cannot_do(tiny, compiled):
    model, _ = tiny
    with pytest.raises(ValueError, match="quantize"):
        FastDecoder(model, quantize="int2")
    with pytest.raises(ValueError, match="int4"):
        FastDecoder(model, quantize="int4", compile=False)  # hidden size 48 is not a multiple of 32
    with pytest.raises(ValueError, match="max_length"):
        compiled.generate(prompt(model), max_new_tokens=4096)
    with pytest.raises(ValueError, match="Llama-style"):
        from transformers import GPT2Config, GPT2LMHeadModel

        FastDecoder(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))


@pytest.mark.slow
@requires_packaged
def test_smollm2_greedy_equals_transformers():
    from mmstory.specs import load_decoder

    model, tokenizer = load_decoder("packaged:smollm2-135m-instruct", dtype=torch.bfloat16)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Write a short story about a cat on a boat."}],
                                         add_generation_prompt=True, tokenize=False)
    ids = tokenizer(chat, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    expected = hf_generate(model, embeds, max_new_tokens=64, do_sample=False)
    fast = FastDecoder(model)
    got = fast.generate(embeds, max_new_tokens=64, pad_token_id=0)
    if not torch.equal(got, expected):
        # bf16 kernels differ by CPU (AVX-512 BF16 or not; other reduction orders): a near-tie between the top two
        # tokens may then flip, after which the two texts go their own ways. Anything else is a real difference.
        first = int((got[0] != expected[0]).nonzero()[0])
        assert first >= 32, f"FastDecoder left transformers' greedy path at token {first}"
        with torch.no_grad():
            prefix = torch.cat([embeds, model.get_input_embeddings()(expected[:, :first])], dim=1)
            logits = model(inputs_embeds=prefix).logits[0, -1].float()
        margin = abs(float(logits[expected[0, first]] - logits[got[0, first]]))
        assert margin < 0.5, f"token {first}: not a near-tie (logit margin {margin:.3f})"
    int4 = FastDecoder(model, quantize="int4")
    story = tokenizer.decode(int4.generate(embeds, max_new_tokens=64)[0], skip_special_tokens=True)
    assert len(story.split()) > 20 and "\ufffd" not in story


def test_a_failed_compile_falls_back_to_eager_decoding(tiny):
    model, _ = tiny
    embeds = model.get_input_embeddings().weight[:5][None].detach()
    eager = FastDecoder(model, compile=False).generate(embeds, max_new_tokens=6)
    fast = FastDecoder(model, compile=True)

    def broken(*args, **kwargs):  # what a machine without a C++ compiler gets from inductor
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    fast._layer_fn = broken
    with pytest.warns(RuntimeWarning, match="decoding without it"):
        tokens = fast.generate(embeds, max_new_tokens=6)
    assert torch.equal(tokens, eager)


# --- PEFT LoRA adapters (as StoryModel's `train: lora` injects them) ----------------------------------------------
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def with_lora(model, seed: int = 0, adapters: Sequence[str] = ("default",), active: Sequence[str] | None = None):
    """`model` with random LoRA adapters on every projection. peft starts B at zero (a no-op adapter that would hide
    a decoder ignoring it), so B is drawn at random too; dropout is on, as in training, and must not matter."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # a second adapter: meant
        torch.manual_seed(seed)
        for name in adapters:
            inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=PROJECTIONS),
                                    model, adapter_name=name)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(list(active or adapters))
    return model.eval()


def lora_layers(model) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def merged_by_hand(linear) -> torch.Tensor:
    """W + scaling * B @ A summed over the active adapters, written out (not peft's merge) to check against."""
    weight = linear.base_layer.weight.detach().clone()
    for name in linear.active_adapters:
        weight += linear.scaling[name] * linear.lora_B[name].weight.detach() @ linear.lora_A[name].weight.detach()
    return weight


@pytest.mark.parametrize("adapters, active", [(("default",), None), (("default", "other"), None),
                                              (("default", "other"), ("other",))],
                         ids=["one", "two-active", "one-of-two-active"])
def test_lora_greedy_equals_transformers(adapters, active):
    """The decode step multiplies by the merged weights: the tokens of transformers' (unmerged) LoRA forward."""
    model = with_lora(tiny_decoder()[0], adapters=adapters, active=active)
    model.generation_config.eos_token_id = None
    embeds = prompt(model, 2, seed=43)
    expected = hf_generate(model, embeds, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    got = FastDecoder(model, compile=False).generate(embeds, max_new_tokens=40, pad_token_id=0)
    assert torch.equal(got, expected)
    for layer in lora_layers(model):  # the adapters must matter, or this test proves nothing
        layer.enable_adapters(False)
    without = hf_generate(model, embeds, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    assert not torch.equal(without, expected)
    # ... and a decoder built while they are off decodes without them, as transformers then does
    assert torch.equal(FastDecoder(model, compile=False).generate(embeds, max_new_tokens=40), without)


def test_row_blocks_merge_lora_into_dense_weights_and_keep_the_tokens():
    """The server's many-row decoder sums W + scaling * B @ A once (no float32 side products per step): in float32
    that is the adapters' own arithmetic to rounding, so greedy tokens stay transformers'."""
    model = with_lora(tiny_decoder()[0], seed=3)
    model.generation_config.eos_token_id = None
    embeds = prompt(model, 3, seed=44)
    expected = hf_generate(model, embeds, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    blocked = FastDecoder(model, compile=False, row_block=4)
    assert all(part.lora_a is None for layer in blocked._layers for part in (layer.qkv, layer.down))
    assert torch.equal(blocked.generate(embeds, max_new_tokens=30, pad_token_id=0), expected)
    with pytest.raises(ValueError, match="dense"):
        pack_projections([model.model.layers[0].mlp.down_proj], "int4", torch.bfloat16, merge_lora=True)


def test_lora_decoder_leaves_the_model_as_it_was():
    """Merging happens in copies: the model keeps its separate adapters (training, save_pretrained) unmerged."""
    model = with_lora(tiny_decoder()[0])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    FastDecoder(model, quantize="int8", compile=False)
    FastDecoder(model, compile=False)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert not any(layer.merged for layer in lora_layers(model))


def test_lora_int8_decoder_close_to_transformers():
    model = with_lora(tiny_decoder()[0], seed=1)
    model.generation_config.eos_token_id = None
    embeds = prompt(model, 1, seed=47)
    int8 = FastDecoder(model, quantize="int8", compile=False)
    a = hf_generate(model, embeds, max_new_tokens=8, do_sample=False)[0]
    b = int8.generate(embeds, max_new_tokens=8)[0]
    assert a[0] == b[0] and (a == b).float().mean() >= 0.5  # as test_int8_weights_close_to_dense


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_lora_quantized_weights_are_the_merged_weights(quantize):
    """int8/int4 quantize W + scaling * B @ A: the packed weights restore the merged ones, not the base ones."""
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = with_lora(LlamaForCausalLM(config), seed=2)
    decoder = FastDecoder(model, quantize=quantize, compile=False)
    for layer, packed in zip(model.model.layers, decoder._layers):
        attn, mlp = layer.self_attn, layer.mlp
        for linears, weight in (([attn.q_proj, attn.k_proj, attn.v_proj], packed.qkv), ([attn.o_proj], packed.out),
                                ([mlp.gate_proj, mlp.up_proj], packed.gate_up), ([mlp.down_proj], packed.down)):
            merged = torch.cat([merged_by_hand(linear) for linear in linears])
            base = torch.cat([linear.base_layer.weight.detach() for linear in linears])
            restored = _linear(torch.eye(merged.shape[1], dtype=torch.bfloat16), weight).t().float()
            error, adapters = (restored - merged).abs().mean(), (merged - base).abs().mean()
            assert error < adapters / 2, f"{quantize}: off the merged weight by {error:.4f} (adapters: {adapters:.4f})"


def test_decoders_that_are_not_llama_style_are_refused():
    """Gemma 3 has RoPE and RMSNorm too, but also scaled embeddings, query/key norms and GELU."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    with pytest.raises(ValueError, match="Llama-style"):
        FastDecoder(Gemma3ForCausalLM(config), compile=False)


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_small_trained_adapters_survive_quantized_base_weights(quantize):
    """A trained adapter moves W by well under one int4 (or bf16) rounding step, and the packaged writer's W lies on
    the int4 grid already (a Q4_1 GGUF): packing W + B @ A rounds back to W and decodes without the adapters. Kept
    apart (QLoRA's way), the decode step adds all of the adapters' delta."""
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        with torch.no_grad():  # base weights on the int4 grid, as dequantized from a Q4_1 file
            for linear in (model.model.layers[0].self_attn.q_proj, model.model.layers[0].mlp.down_proj):
                grid = pack_linear(linear.weight, "int4", torch.bfloat16)
                linear.weight.copy_(_linear(torch.eye(linear.weight.shape[1], dtype=torch.bfloat16), grid).t())
        model = with_lora(model, seed=3)
        with torch.no_grad():  # trained-size adapters: |scaling * B @ A| about 0.5% of |W|, as measured on the writer
            for linear in lora_layers(model):
                delta = merged_by_hand(linear) - linear.base_layer.weight
                linear.lora_B["default"].weight.mul_(0.005 * linear.base_layer.weight.norm() / delta.norm())
    decoder = FastDecoder(model, quantize=quantize, compile=False)
    layer, packed = model.model.layers[0], decoder._layers[0]
    for linear, weight, rows in ((layer.self_attn.q_proj, packed.qkv, slice(0, 128)), (layer.mlp.down_proj,
                                                                                         packed.down, slice(None))):
        identity = torch.eye(linear.in_features, dtype=decoder.dtype)
        restored = _linear(identity, weight).t().float()[rows]
        base = linear.base_layer.weight.detach().float()
        delta = merged_by_hand(linear).float() - base
        kept = float(((restored - base) * delta).sum() / (delta * delta).sum())
        assert kept > 0.9, f"{quantize}: the decode step keeps {kept:.0%} of the adapters' delta"
