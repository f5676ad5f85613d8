"""Fast CPU decoding for the prefix-conditioned story writer (a Llama-family Hugging Face causal LM).

`transformers.generate` spends a CPU decode step mostly outside useful work: ~40 small kernels and their Python per
layer, a cache that grows by concatenation, and (in bf16) oneDNN GEMV calls that are slow at batch 1. `FastDecoder`
keeps the parts that are exact and cheap and replaces the hot loop:

- the prompt (chat tokens with visual prefix embeddings spliced in) is prefilled by the Hugging Face model itself,
  so the first token's logits are exactly `generate`'s; rows that are copies (the candidates) are prefilled once;
- every later token runs one `torch.compile`d layer function 30 times over a preallocated KV cache (one small graph
  that compiles in seconds and is reused by every layer, instead of a whole-model graph that takes minutes);
- weights stay as loaded (exact), or are packed once into int8 or group-32 int4 (`quantize=`); int4 reproduces the
  Q4_1 weights the packaged SmolLM2 GGUF ships as, at a quarter of the bf16 bytes;
- PEFT LoRA adapters stay apart from the packed base weights, as QLoRA keeps them: a trained adapter's delta is
  smaller than an int4 (or bf16) rounding step of W, so W + B @ A packed would round back to W and lose it;
- token choice reuses transformers' own logits processors; with top-k, top-p and the draw run on the k survivors.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from mmstory.packed_cache import cached_tensors, fingerprint

LLAMA_STYLE = ("llama", "mistral")
QUANTIZE = (None, "int8", "int4")
INT4_GROUP = 32
HEAD_REFINE = 256  # tokens rescored with the exact output head when weights are quantized
StoppingCallable = Callable[[torch.LongTensor, torch.FloatTensor], "torch.BoolTensor | bool"]


# --- the decode step (pure functions of tensors: what torch.compile traces) ---------------------------------------
class Packed(NamedTuple):
    """A linear layer as `_linear` multiplies by it: `weight` [N, K] dense, or int8 / packed int4 with `scales`; and
    LoRA factors kept apart in float32, `lora_a` [R, K] and `lora_b` [N, R] with peft's scaling folded in (at batch 1
    a float32 GEMV is twice as fast as a bf16 one on CPUs, and the factors are small)."""

    weight: torch.Tensor
    scales: torch.Tensor | None = None
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in self if t is not None]


def pack_linear(weight: torch.Tensor, quantize: str | None, dtype: torch.dtype) -> Packed:
    """A linear layer's weight [N, K] in the form `_linear` multiplies by."""
    if quantize is None:
        return Packed(weight.detach().to(dtype).contiguous())
    w = weight.detach().float()
    if quantize == "int8":  # symmetric, one scale per output channel
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        return Packed(torch.round(w / scale[:, None]).to(torch.int8), scale.to(torch.bfloat16))
    if quantize == "int4":  # asymmetric, per group of 32 inputs: min and step recover Q4_1 blocks exactly
        n, k = w.shape
        if k % INT4_GROUP or n % 64:
            raise ValueError(f"int4 needs in_features % {INT4_GROUP} == 0 and out_features % 64 == 0, got [{n}, {k}]")
        groups = w.reshape(n, k // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        step = ((high - low) / 15).clamp(min=1e-12)
        q = torch.round((groups - low[..., None]) / step[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        # the kernel computes (q - 8) * scale + zero, so zero is the value of q = 8
        scale_zero = torch.stack([step, low + 8 * step], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return Packed(packed, scale_zero)
    raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")


def _active_lora(linear: torch.nn.Module) -> list[str]:
    """The names of the LoRA adapters a peft layer's forward adds (none for a plain, merged or disabled layer)."""
    if not hasattr(linear, "base_layer") or linear.disable_adapters or linear.merged:
        return []  # (merged by peft: forward then uses the base layer alone)
    if not hasattr(linear, "lora_A"):
        raise ValueError(f"FastDecoder merges LoRA adapters only, got {type(linear).__name__}")
    adapters = [name for name in linear.active_adapters if name in linear.lora_A]
    if any(name in linear.lora_variant or linear.lora_bias.get(name, False) for name in adapters):
        raise ValueError("FastDecoder merges plain LoRA adapters only (no DoRA or other variants, no lora_bias)")
    return adapters


def pack_projections(linears: Sequence[torch.nn.Module], quantize: str | None, dtype: torch.dtype,
                     merge_lora: bool = False) -> Packed:
    """Linear layers side by side (q, k, v: one matmul) as one `Packed`: their base weights stacked and packed,
    their LoRA adapters unmerged (see the module docstring): A factors stacked, B factors block-diagonal.
    `merge_lora` (dense weights only): W + B @ A rounded once to `dtype` instead, for many-row steps, where the
    adapters' eight small float32 products per layer cost as much as the layer's bf16 ones (the SmolLM2 writer's
    delta is 0.8% of W, and bf16 rounding of the sum moves it by a fifth of the delta's size, unbiased)."""
    if any(getattr(linear, "fan_in_fan_out", False) for linear in linears):
        raise ValueError("FastDecoder packs [out, in] linear layers only (no fan_in_fan_out)")
    if merge_lora:
        if quantize is not None:
            raise ValueError("merge_lora is for dense weights: an int4 or int8 step would round the adapter away")
        weights = [effective_weight(linear) for linear in linears]  # a layer without adapters: its own tensor
        return pack_linear(weights[0] if len(weights) == 1 else torch.cat([w.float() for w in weights]), None, dtype)
    bases = [linear.get_base_layer() if hasattr(linear, "base_layer") else linear for linear in linears]
    packed = pack_linear(torch.cat([base.weight.detach() for base in bases]), quantize, dtype)
    a_factors, b_blocks = [], []
    for linear, base in zip(linears, bases):
        names = _active_lora(linear)
        if len({linear.scaling[name] for name in names}) > 1:
            raise ValueError("FastDecoder adds one LoRA scaling per layer (active adapters differ in scaling)")
        a_factors += [linear.lora_A[name].weight.detach() for name in names]
        out_features = base.weight.shape[0]
        b_blocks.append(torch.cat([torch.zeros(out_features, 0)] + [
            linear.lora_B[name].weight.detach().float() * linear.scaling[name] for name in names], dim=1))
    if not a_factors:
        return packed
    return packed._replace(lora_a=torch.cat(a_factors).float().contiguous(),
                           lora_b=torch.block_diag(*b_blocks).contiguous())


def effective_weight(linear: torch.nn.Module) -> torch.Tensor:
    """The weight [N, K] a linear layer multiplies by, PEFT LoRA adapters included, as a detached tensor.

    A `peft` LoRA layer keeps its adapters apart from `.weight` (which is the base layer's): the decode step must
    use W + scaling * B @ A of every active adapter, or each token after the prompt is decoded without them. The
    sum is a new float32 tensor (rounded once, by `pack_linear`); the layer itself is not touched, so it can keep
    training and save its adapters separately. Dropout is no part of the weight (it is inactive at inference).
    """
    if not hasattr(linear, "base_layer"):  # a plain layer
        return linear.weight.detach()
    weight = linear.get_base_layer().weight.detach()
    adapters = _active_lora(linear)
    if adapters:
        with torch.no_grad():  # peft's own delta: scaling * B @ A, transposed for fan_in_fan_out layouts
            weight = weight.float() + sum(linear.get_delta_weight(name).detach().float() for name in adapters)
    # F.linear's [out, in]: fan_in_fan_out layers (GPT-2's Conv1D) store the transpose
    return weight.t() if getattr(linear, "fan_in_fan_out", False) else weight


def _linear(x: torch.Tensor, weight: Packed, row_block: int = 0) -> torch.Tensor:
    """x @ W.T (+ LoRA). `row_block` > 0: the rows go through in zero-padded blocks of exactly that many, since a
    GEMM library picks its kernel (and so its summation order) by shape: a row's result then never depends on how
    many rows share its step (the story server's batch), only on the row itself."""
    rows = x.reshape(-1, x.shape[-1])
    if row_block:
        count = rows.shape[0]
        padded = F.pad(rows, (0, 0, 0, -count % row_block))
        out = torch.cat([_linear(block, weight) for block in padded.split(row_block)])[:count]
        return out.reshape(*x.shape[:-1], out.shape[-1])
    if weight.scales is None:
        out = F.linear(rows, weight.weight)
    elif weight.weight.dtype == torch.int8:
        out = torch.ops.aten._weight_int8pack_mm(rows, weight.weight, weight.scales)
    else:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, weight.weight, INT4_GROUP, weight.scales)
    if weight.lora_a is not None:  # base(x) + scaling * lora_B(lora_A(x)), as peft adds it
        out = out + F.linear(F.linear(rows.float(), weight.lora_a), weight.lora_b).to(out.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm, rounding where it rounds (so bf16 results match transformers bit for bit)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def decode_layer(x: torch.Tensor, slot: torch.Tensor, length: int, cos: torch.Tensor, sin: torch.Tensor,
                 mask: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, norm1: torch.Tensor,
                 norm2: torch.Tensor, qkv: Packed, out: Packed, gate_up: Packed, down: Packed, heads: int,
                 kv_heads: int, eps: float, fold_heads: bool, row_block: int = 0) -> torch.Tensor:
    """One Llama decoder layer for one new token per row: x [B, 1, D]; writes its K/V at `slot` of the caches
    [B, kv_heads, S, hd] and attends to the first `length` cached positions (`mask` [B, 1, 1, length] for padding)."""
    batch = x.shape[0]
    head_dim = k_cache.shape[-1]
    h = _rms_norm(x, norm1, eps)
    q, k, v = _linear(h, qkv, row_block).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = _rope(q.view(batch, heads, 1, head_dim), cos, sin)
    k = _rope(k.view(batch, kv_heads, 1, head_dim), cos, sin)
    k_cache[:, :, slot] = k
    v_cache[:, :, slot] = v.view(batch, kv_heads, 1, head_dim)
    keys, values = k_cache[:, :, :length], v_cache[:, :, :length]
    if fold_heads:  # the query heads that share a K/V head become that head's query rows: one small matmul each
        attn = F.scaled_dot_product_attention(q.reshape(batch, kv_heads, heads // kv_heads, head_dim), keys, values,
                                              attn_mask=mask)
    else:
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
    x = x + _linear(attn.reshape(batch, 1, heads * head_dim), out, row_block)
    gate, up = _linear(_rms_norm(x, norm2, eps), gate_up, row_block).chunk(2, dim=-1)
    return x + _linear(F.silu(gate) * up, down, row_block)


def decode_head(x: torch.Tensor, norm: torch.Tensor, weight: Packed, exact: torch.Tensor | None, eps: float,
                refine: int, row_block: int = 0) -> torch.Tensor:
    """Next-token logits [B, V] (float). With a quantized head, the `refine` most likely tokens are rescored with the
    exact weights `exact` [V, D]: those are the only ones greedy and top-k/top-p choose from, and int4 rounding of
    the output head alone costs ~1.5% perplexity on SmolLM2, while rescoring costs a few hundred rows."""
    h = _rms_norm(x, norm, eps)[:, -1]
    logits = _linear(h, weight, row_block)
    if exact is None:
        return logits.float()
    top = logits.topk(refine, dim=-1).indices
    rescored = torch.bmm(exact[top], h[:, :, None]).squeeze(-1)  # [B, refine], the same products a dense head does
    return logits.scatter(1, top, rescored).float()


# --- token choice (the story server's decode loop chooses the same way) --------------------------------------------
def token_processors(eos: list[int], min_new_tokens: int, repetition_penalty: float, no_repeat_ngram_size: int,
                     suppress_tokens: Sequence[int] | None = None,
                     extra: Sequence | None = None) -> LogitsProcessorList:
    """transformers' processors, in generate's order; they see only the new tokens, as with inputs_embeds."""
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(no_repeat_ngram_size))
    if min_new_tokens > 0 and eos:
        processors.append(MinNewTokensLengthLogitsProcessor(0, min_new_tokens, eos))
    if suppress_tokens:
        processors.append(SuppressTokensLogitsProcessor(list(suppress_tokens)))
    processors.extend(extra or ())  # a caller's own, last, as generate appends a custom logits_processor
    return processors


def choose_tokens(generated: torch.Tensor, scores: torch.Tensor, do_sample: bool, top_k: int,
                  warpers: LogitsProcessorList, generator: torch.Generator | None) -> torch.Tensor:
    """Each row's next token: the argmax, or a draw from the processed scores."""
    if not do_sample:
        return scores.argmax(dim=-1)
    # Top-k first (temperature keeps the order), then temperature and top-p on the k survivors: the same
    # distribution as generate's temperature -> top-k -> top-p over the whole vocabulary, without sorting it.
    if 0 < top_k < scores.shape[-1]:
        scores, index = scores.topk(top_k, dim=-1)
    else:
        index = None
    probs = warpers(generated, scores).softmax(dim=-1)
    choice = torch.multinomial(probs, num_samples=1, generator=generator)
    return (index.gather(1, choice) if index is not None else choice).squeeze(1)


# --- the decoder ---------------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    norm1: torch.Tensor
    norm2: torch.Tensor
    qkv: Packed
    out: Packed
    gate_up: Packed
    down: Packed


_PARTS = ("qkv", "out", "gate_up", "down")


def _pack_writer(layers, head: torch.nn.Module, quantize: str | None, dtype: torch.dtype,
                 merge_lora: bool = False) -> dict[str, torch.Tensor]:
    """Every layer's projections and the output head packed, as flat named tensors ("layers.3.qkv.scales")."""
    packs = {"head": pack_projections([head], quantize, dtype, merge_lora)}
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        parts = ([attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj], [mlp.gate_proj, mlp.up_proj], [mlp.down_proj])
        for part, linears in zip(_PARTS, parts):
            packs[f"layers.{i}.{part}"] = pack_projections(linears, quantize, dtype, merge_lora)
    return {f"{name}.{field}": tensor for name, packed in packs.items()
            for field, tensor in packed._asdict().items() if tensor is not None}


def _unflatten(tensors: dict[str, torch.Tensor], name: str) -> Packed:
    return Packed(**{field: tensors.get(f"{name}.{field}") for field in Packed._fields})


class FastDecoder:
    """Static-KV-cache, compiled-step decoding for a Llama-family causal LM driven by `inputs_embeds`.

    `generate` takes the arguments of `transformers.generate` that story writing uses and returns the new tokens
    [B, T] the same way (rows that stop early are padded); `stream` yields each step's tokens as they are chosen.
    Greedy decoding with `quantize=None` equals `transformers` greedy `generate` token for token (a bf16 near-tie
    between the top two tokens may break the other way on some CPUs).

    PEFT LoRA adapters on the projections (or the output head) are copied beside the packed base weights and added as
    peft adds them (the model's own modules are left as they are), so the packed weights are a snapshot: rebuild the
    decoder after training on.
    """

    def __init__(self, model, quantize: str | None = None, compile: bool = True, max_length: int | None = None,
                 row_block: int = 0):
        """`row_block` > 0: every decode step multiplies its rows in blocks of this many (see `_linear`), so that a
        row decodes the same alone as beside others; what the story server sets when it batches dense weights (a
        dense bf16 GEMM over 64 rows costs about what it costs over 6; int4 costs ~6x more)."""
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
        config = model.config
        base = getattr(model, "model", None)
        layers = getattr(base, "layers", None)
        # the model types whose layers are exactly what the step computes (Gemma, say, also scales its embeddings,
        # norms queries and keys, and uses GELU: it decodes with transformers)
        if (getattr(config, "model_type", None) not in LLAMA_STYLE or layers is None
                or not hasattr(base, "rotary_emb") or getattr(config, "hidden_act", "silu") != "silu"
                or getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
            raise ValueError(f"FastDecoder supports Llama-style decoders (RMSNorm, RoPE, SiLU MLP, no biases); "
                             f"got {type(model).__name__}")
        self.model = model.eval()
        self.quantize, self.row_block = quantize, row_block
        self.dtype = torch.bfloat16 if quantize else model.dtype
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = float(config.rms_norm_eps)
        self.max_length = max_length or config.max_position_embeddings  # prompt + new tokens
        self.eos_token_id = _as_list(model.generation_config.eos_token_id)
        self.pad_token_id = model.generation_config.pad_token_id
        head = model.get_output_embeddings()

        def pack() -> dict[str, torch.Tensor]:
            return _pack_writer(layers, head, quantize, self.dtype, merge_lora=bool(row_block) and quantize is None)

        # packing int4/int8 costs seconds at every start; the packed tensors are kept in the user cache
        packs = cached_tensors(fingerprint(model, quantize, self.dtype), pack) if quantize else pack()
        self._layers = [_Layer(norm1=layer.input_layernorm.weight.detach().to(self.dtype),
                               norm2=layer.post_attention_layernorm.weight.detach().to(self.dtype),
                               **{part: _unflatten(packs, f"layers.{i}.{part}") for part in _PARTS})
                        for i, layer in enumerate(layers)]
        self._norm = base.norm.weight.detach().to(self.dtype)
        self._head = _unflatten(packs, "head")
        self._head_exact = effective_weight(head).detach().to(self.dtype) if quantize else None
        self._embed = model.get_input_embeddings()
        with torch.no_grad():  # the same cos/sin values transformers computes, for every position at once
            positions = torch.arange(self.max_length)[None]
            cos, sin = base.rotary_emb(torch.zeros(1, dtype=model.dtype), positions)
        self._cos, self._sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
        self._caches: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        options = {"emulate_precision_casts": True}  # round bf16 where eager rounds: same tokens as eager
        self._compiled_once = False
        self._layer_fn = torch.compile(_own_copy(decode_layer), options=options) if compile else decode_layer
        self._head_fn = torch.compile(_own_copy(decode_head), options=options) if compile else decode_head

    # --- public API ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, *, streamer=None,
                 num_beams: int = 1, num_return_sequences: int = 1, length_penalty: float | None = None,
                 **kwargs) -> torch.LongTensor:
        """A drop-in for `model.generate(inputs_embeds=..., ...)`: new tokens [B, T], rows that stop early padded.

        Keywords as in `stream`; `streamer` takes `put(tokens)` / `end()` like transformers' streamers
        (TextIteratorStreamer works unchanged). Beam search (`num_beams > 1`) is passed on to transformers.
        """
        if num_beams > 1 or num_return_sequences > 1:
            seed = kwargs.pop("seed", None)
            if seed is not None:
                torch.manual_seed(seed)
            extra = {} if length_penalty is None else {"length_penalty": length_penalty}
            # the class's method, not the instance attribute: callers may route model.generate here
            return type(self.model).generate(self.model, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                             streamer=streamer, num_beams=num_beams,
                                             num_return_sequences=num_return_sequences, **extra, **kwargs)
        if streamer is not None:
            streamer.put(torch.empty(inputs_embeds.shape[0], 0, dtype=torch.long))  # the (empty) prompt, as HF does
        steps = []
        try:
            for tokens in self.stream(inputs_embeds, attention_mask, **kwargs):
                steps.append(tokens)
                if streamer is not None:
                    streamer.put(tokens)
        finally:
            if streamer is not None:
                streamer.end()
        return torch.stack(steps, dim=1)

    @torch.no_grad()
    def stream(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               max_new_tokens: int = 256, min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0,
               top_k: int = 50, top_p: float = 1.0, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
               seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
               pad_token_id: int | None = None,
               stopping_criteria: StoppingCallable | Sequence[StoppingCallable] | None = None,
               suppress_tokens: Sequence[int] | None = None, logits_processor: Sequence | None = None,
               ) -> Iterator[torch.LongTensor]:
        """Yield the next token of every row [B] per step, as `generate` would append it.

        A row stops at EOS (once `min_new_tokens` are out) or when a stopping criterion says so for it; afterwards
        it yields `pad_token_id`. Stopping criteria are called like transformers' (`(new_ids [B, t], scores)`,
        returning a bool per row). `seed` makes sampling independent of the global RNG; without it the global RNG
        is used, as in `generate`. `logits_processor`: more transformers processors, run after the built-in ones.
        """
        batch, prompt_len, _ = inputs_embeds.shape
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if prompt_len + max_new_tokens > self.max_length:
            raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds this decoder's "
                             f"max_length ({self.max_length})")
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1 or top_k < 0):
            raise ValueError("sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0")
        eos = _as_list(eos_token_id) if eos_token_id is not None else self.eos_token_id
        pad = pad_token_id if pad_token_id is not None else (self.pad_token_id if self.pad_token_id is not None
                                                             else (eos[0] if eos else 0))
        if attention_mask is None:
            attention_mask = torch.ones(batch, prompt_len, dtype=torch.long)
        attention_mask = attention_mask.to(torch.long)
        processors = token_processors(eos, min_new_tokens, repetition_penalty, no_repeat_ngram_size, suppress_tokens,
                                      logits_processor)
        warpers = LogitsProcessorList()
        if do_sample and temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if do_sample and top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        criteria = list(stopping_criteria) if isinstance(stopping_criteria, Sequence) else (
            [stopping_criteria] if stopping_criteria is not None else [])
        eos_ids = torch.tensor(eos, dtype=torch.long)

        logits = self._prefill(inputs_embeds, attention_mask, prompt_len + max_new_tokens)
        positions = attention_mask.sum(dim=1)  # RoPE position of the next token in each row
        padded = not bool(attention_mask.all())
        key_mask = torch.zeros(batch, 1, 1, prompt_len + max_new_tokens, dtype=torch.bool)
        key_mask[:, 0, 0, :prompt_len] = attention_mask.bool()
        key_mask[:, 0, 0, prompt_len:] = True
        generated = torch.empty(batch, 0, dtype=torch.long)
        unfinished = torch.ones(batch, dtype=torch.bool)
        for step in range(max_new_tokens):
            scores = processors(generated, logits)
            tokens = choose_tokens(generated, scores, do_sample, top_k, warpers, generator)
            tokens = torch.where(unfinished, tokens, pad)
            generated = torch.cat([generated, tokens[:, None]], dim=1)
            if eos:
                unfinished &= (tokens[:, None] != eos_ids).all(dim=1)  # (torch.isin costs ~0.2 ms a call here)
            for criterion in criteria:
                unfinished &= ~torch.as_tensor(criterion(generated, scores), dtype=torch.bool).expand(batch)
            yield tokens
            if not unfinished.any() or step + 1 == max_new_tokens:
                return
            slot = prompt_len + step
            logits = self._step(tokens, slot, positions + step, key_mask[..., : slot + 1] if padded else None)

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Compile the decode step for these batch sizes now (servers: before the first request)."""
        embeds = self._embed.weight[:4][None].to(self.dtype)
        for batch in batch_sizes:
            for _ in self.stream(embeds.expand(batch, -1, -1), max_new_tokens=3, min_new_tokens=3):
                pass

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads (all layers and the output head; not the embedding lookup)."""
        tensors = [self._norm, *self._head.tensors()]  # (+ HEAD_REFINE rows of the exact head when quantized)
        for layer in self._layers:
            tensors += [layer.norm1, layer.norm2, *(p for part in (layer.qkv, layer.out, layer.gate_up, layer.down)
                                                    for p in part.tensors())]
        return sum(t.numel() * t.element_size() for t in tensors)

    # --- internals -----------------------------------------------------------------------------------------------
    def prefill(self, embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, DynamicCache]:
        """Run the prompt through the transformers model (rows that repeat row 0 once): the first logits [B, V]
        (float) and the prompt's K/V (one row, or B). The story server's decode loop joins new rows with this."""
        batch = embeds.shape[0]
        shared = batch > 1 and bool((mask == mask[:1]).all()) and torch.equal(embeds, embeds[:1].expand_as(embeds))
        rows = 1 if shared else batch
        position_ids = (mask[:rows].cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model(inputs_embeds=embeds[:rows].to(self.model.dtype), attention_mask=mask[:rows],
                         position_ids=position_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float().expand(batch, -1).contiguous(), cache

    def _prefill(self, embeds: torch.Tensor, mask: torch.Tensor, total: int) -> torch.Tensor:
        """Prefill the prompt and copy its K/V into this decoder's own cache."""
        logits, cache = self.prefill(embeds, mask)
        k_caches, v_caches = self._cache(embeds.shape[0], total)
        for i, layer in enumerate(cache.layers):
            k_caches[i][:, :, :embeds.shape[1]] = layer.keys
            v_caches[i][:, :, :embeds.shape[1]] = layer.values
        return logits

    def _cache(self, batch: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The preallocated K/V caches [B, kv_heads, S, hd] per layer, S a power of two >= 1024 that fits `length`
        (few distinct sizes: each new one costs one recompile of the step)."""
        size = min(max(1024, 1 << (length - 1).bit_length()), self.max_length)
        if self._caches is None or self._caches[0][0].shape[0] != batch or self._caches[0][0].shape[2] < length:
            shape = (batch, self.kv_heads, size, self.head_dim)
            self._caches = ([torch.zeros(shape, dtype=self.dtype) for _ in self._layers],
                            [torch.zeros(shape, dtype=self.dtype) for _ in self._layers])
        return self._caches

    def _step(self, tokens: torch.Tensor, slot: int, positions: torch.Tensor, mask: torch.Tensor | None,
              caches: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> torch.Tensor:
        """One decode step over `caches` (default: this decoder's own; the story server's decode loop passes its
        shared batch's)."""
        caches = caches or self._caches
        if self._compiled_once or self._layer_fn is decode_layer:
            return self._run_step(tokens, slot, positions, mask, caches)
        try:  # the first compiled step: a machine without a working C++ toolchain falls back to eager decoding
            logits = self._run_step(tokens, slot, positions, mask, caches)
        except Exception as err:  # noqa: BLE001 - inductor raises many kinds; the step is simply redone eagerly
            warnings.warn(f"torch.compile of the decode step failed ({type(err).__name__}: {str(err)[:200]}); "
                          "decoding without it (slower)", RuntimeWarning, stacklevel=2)
            self._layer_fn, self._head_fn = decode_layer, decode_head
            return self._run_step(tokens, slot, positions, mask, caches)  # rewrites the same slot: idempotent
        self._compiled_once = True
        return logits

    def _run_step(self, tokens: torch.Tensor, slot: int, positions: torch.Tensor, mask: torch.Tensor | None,
                  caches: tuple[list[torch.Tensor], list[torch.Tensor]]) -> torch.Tensor:
        x = self._embed(tokens[:, None]).to(self.dtype)
        cos, sin = self._cos[positions][:, None, None], self._sin[positions][:, None, None]
        slot_index = torch.tensor([slot])
        # transformers folds the heads only when there is a padding mask; the exact path must do as it does
        fold_heads = self.quantize is not None or mask is not None or self.row_block > 0
        for layer, k_cache, v_cache in zip(self._layers, *caches):
            x = self._layer_fn(x, slot_index, slot + 1, cos, sin, mask, k_cache, v_cache, layer.norm1, layer.norm2,
                               layer.qkv, layer.out, layer.gate_up, layer.down, self.heads, self.kv_heads, self.eps,
                               fold_heads, self.row_block)
        return self._head_fn(x, self._norm, self._head, self._head_exact, self.eps, HEAD_REFINE, self.row_block)


def _own_copy(fn: Callable) -> Callable:
    """`fn` with its own code object: torch.compile keeps compiled variants (batch sizes, weight formats) per code
    object, up to a limit of 8, so each decoder gets its own budget instead of sharing one process-wide."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _as_list(ids: int | Sequence[int] | torch.Tensor | None) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, torch.Tensor):
        return ids.flatten().tolist()
    return [ids] if isinstance(ids, int) else list(ids)
