"""CoCa's small caption decoder: a causal Transformer over a compact vocabulary that cross-attends to image tokens,
decoded a token at a time with cached keys and values (`start`, `step`); the searches over it are in
`mmstory.caption_search`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CaptionDecoder(nn.Module):
    """CoCa's multimodal text decoder: a small causal Transformer that cross-attends to image tokens.

    Trained from scratch; far cheaper than running the pretrained LM, so it can learn to caption on a CPU. It works
    in a compact vocabulary (PAD, BOS, EOS, UNK, then the decoder tokenizer's ids that the training captions use), so
    its output layer is a few thousand rows instead of the LM's full vocabulary.
    """

    PAD, BOS, EOS, UNK = 0, 1, 2, 3
    SPECIALS = 4

    def __init__(self, tokenizer_size: int, vocab_size: int | None, token_dim: int, width: int, depth: int,
                 heads: int, max_length: int, dropout: float, tag_slots: int = 0, copy_tags: bool = False):
        super().__init__()
        self.max_length = max_length
        size = self.SPECIALS + (vocab_size or tokenizer_size)
        # compact id -> tokenizer id; the identity over the whole tokenizer until fit_vocabulary() picks a subset
        token_ids = torch.full((size,), -1, dtype=torch.long)
        token_ids[self.SPECIALS:] = torch.arange(size - self.SPECIALS) if vocab_size is None else -1
        self.register_buffer("token_ids", token_ids)
        self.tokenizer_size = tokenizer_size
        self.embed = nn.Embedding(size, width)
        self.position = nn.Parameter(torch.zeros(1, max_length + 1, width))
        self.image_proj = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, width))
        # tag words (the image classifier's top classes, OSCAR-style) join the memory as embedded tokens: the same
        # embedding as the output head, so a tag word is easy to copy into the caption; slots carry rank position
        self.tag_slots = tag_slots
        self.tag_position = nn.Parameter(torch.zeros(1, tag_slots, width)) if tag_slots else None
        # the copy path (CopyNet, Gu et al., 2016): a pointer score per tag slot joins the generated score of the
        # slot's token, so a word only ever seen as a tag can be written; tied embeddings alone did not learn to copy
        # (docs/captions.md)
        if copy_tags and not tag_slots:
            raise ValueError("copy_tags needs tag slots (image_tags > 0)")
        self.copy_query = nn.Linear(width, width) if copy_tags else None
        self.copy_key = nn.Linear(width, width) if copy_tags else None
        layer = nn.TransformerDecoderLayer(width, heads, 4 * width, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerDecoder(layer, depth)
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.set_added_words([], [])

    # --- words beyond the fitted vocabulary ------------------------------------------------------------------------
    def set_added_words(self, pieces: list[list[int]], donors: list[int],
                        word_starts: torch.Tensor | None = None) -> None:
        """Words the training captions never used, each one compact id after the fitted vocabulary: `pieces` are its
        tokenizer ids, `donors` the compact id of a known word whose embedding (input and tied output) it borrows.

        Deep Compositional Captioning's transfer (Hendricks et al., 2016): "zebra" is written where the decoder
        would write "horse", and the caption goes on as it would after "horse". Its logit is the donor's, so an
        added word is written only with a bias (`logit_bias` of beam search: the image classifier's support) or when
        a constraint requires it. `word_starts` ([base_size] bool): the fitted ids that begin a word, the only ones
        beam search lets follow a prefix. Nothing here is a parameter: saved weights are unchanged."""
        if len(pieces) != len(donors):
            raise ValueError(f"{len(pieces)} added words but {len(donors)} donors")
        if any(not p for p in pieces) or any(not 0 <= d < self.embed.num_embeddings for d in donors):
            raise ValueError("every added word needs tokenizer ids and a donor inside the fitted vocabulary")
        self.added_pieces = [list(p) for p in pieces]
        self.register_buffer("added_donors", torch.tensor(donors, dtype=torch.long), persistent=False)
        starts = torch.ones(self.base_size, dtype=torch.bool) if word_starts is None else word_starts.bool().cpu()
        self.word_starts = torch.cat([starts, torch.ones(len(pieces), dtype=torch.bool)])  # added words: whole

    @property
    def base_size(self) -> int:
        return self.embed.num_embeddings

    @property
    def size(self) -> int:
        """The compact vocabulary with the added words."""
        return self.base_size + len(self.added_pieces)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.added_pieces:
            added = ids >= self.base_size
            ids = torch.where(added, self.added_donors[(ids - self.base_size).clamp(min=0)], ids)
        return self.embed(ids)

    @property
    def needs_vocabulary(self) -> bool:
        return bool((self.token_ids[self.SPECIALS:] < 0).all())

    def fit_vocabulary(self, token_id_lists: list[list[int]], required: list[int] = ()) -> None:
        """Keep the most frequent tokenizer ids of the training captions (ties broken by id, so it is deterministic),
        and every `required` id (training writes them too: novel-object swaps). A required id the captions use less
        often than the median kept id counts as that often, so it ranks among the words training writes as often."""
        counts = torch.bincount(torch.tensor([t for ids in token_id_lists for t in ids] or [0], dtype=torch.long),
                                minlength=self.tokenizer_size)
        room = self.token_ids.numel() - self.SPECIALS
        if len(required) > room:
            raise ValueError(f"{len(required)} required tokens do not fit a vocabulary of {room}")
        if len(required):
            used = counts[counts > 0]
            typical = int(used.median()) if used.numel() else 1
            counts[list(required)] = counts[list(required)].clamp(min=typical)
        order = sorted(range(counts.numel()), key=lambda i: (-int(counts[i]), i))
        needed = set(required)
        kept = needed | set([i for i in order if counts[i] > 0 and i not in needed][: room - len(needed)])
        chosen = [i for i in order if i in kept]
        self.token_ids[self.SPECIALS:] = -1
        self.token_ids[self.SPECIALS: self.SPECIALS + len(chosen)] = torch.tensor(chosen, dtype=torch.long)

    def compact_table(self) -> torch.Tensor:
        """Tokenizer id -> compact id ([tokenizer_size + 1]; UNK for ids outside the vocabulary, PAD at index -1 so
        that -1 padding maps to PAD). Derived from `token_ids` and rebuilt only when that buffer changes."""
        key = (self.token_ids.data_ptr(), self.token_ids._version)
        if getattr(self, "_table_key", None) != key:
            table = torch.full((self.tokenizer_size + 1,), self.UNK, dtype=torch.long)
            table[-1] = self.PAD
            known = self.token_ids.cpu()
            valid = known >= 0
            table[known[valid]] = torch.arange(known.numel())[valid]
            self._table, self._table_key = table, key
        return self._table

    def to_compact(self, token_id_lists: list[list[int]]) -> list[list[int]]:
        table = self.compact_table().tolist()
        return [[table[t] for t in ids] for ids in token_id_lists]

    def to_tokenizer(self, compact_lists: list[list[int]]) -> list[list[int]]:
        table, base = self.token_ids.tolist(), self.base_size
        out = []
        for ids in compact_lists:
            row: list[int] = []
            for c in ids:
                if c >= base:
                    row += self.added_pieces[c - base]
                elif c >= self.SPECIALS and table[c] >= 0:
                    row.append(table[c])
            out.append(row)
        return out

    def forward(self, input_ids: torch.Tensor, image_tokens: torch.Tensor, padding_mask: torch.Tensor | None = None,
                tag_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] for `input_ids` [B, T] that start with BOS; `padding_mask` is True at padding;
        `tag_ids` [B, tag_slots] are compact ids of tag words (PAD where empty), required when tag_slots > 0.
        Training reads the fitted vocabulary only (V = base_size)."""
        length = input_ids.shape[1]
        if length > self.position.shape[1]:
            raise ValueError(f"caption of {length} tokens exceeds the caption decoder's {self.position.shape[1]}")
        x = self._embed(input_ids) + self.position[:, :length]
        memory, memory_mask = self._memory(image_tokens, tag_ids)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        x = self.layers(x, memory, tgt_mask=causal, tgt_is_causal=True, tgt_key_padding_mask=padding_mask,
                        memory_key_padding_mask=memory_mask)
        hidden = self.norm(x)
        logits = F.linear(hidden, self.embed.weight)  # output head tied to the input embedding
        return logits if self.copy_query is None else self._with_copies(logits, hidden, *self._copy_keys(tag_ids))

    def _copy_keys(self, tag_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tag slots' pointer keys [B, S, W] and their compact ids [B, S]."""
        return self.copy_key(self._embed(tag_ids) + self.tag_position), tag_ids

    def _with_copies(self, logits: torch.Tensor, hidden: torch.Tensor, keys: torch.Tensor, tag_ids: torch.Tensor
                     ) -> torch.Tensor:
        """`logits` [B, T, V] with each tag slot's pointer score joined (log-sum-exp) to its token's score."""
        scores = self.copy_query(hidden) @ keys.transpose(1, 2) / keys.shape[-1] ** 0.5  # [B, T, S]
        scores = scores.masked_fill((tag_ids == self.PAD)[:, None, :], float("-inf")).to(logits.dtype)
        same = tag_ids[:, :, None] == tag_ids[:, None, :]  # [B, S, S]: slots holding the same token share its best
        scores = scores[:, :, None, :].masked_fill(~same[:, None], float("-inf")).amax(-1)
        columns = tag_ids[:, None, :].expand(-1, logits.shape[1], -1)  # only the tags' columns change
        return logits.scatter(2, columns, torch.logaddexp(logits.gather(2, columns), scores))

    def _memory(self, image_tokens: torch.Tensor, tag_ids: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the decoder cross-attends to: projected image tokens, then the tag words; and its padding mask."""
        memory, memory_mask = self.image_proj(image_tokens), None
        if self.tag_slots:
            if tag_ids is None or tag_ids.shape[1] != self.tag_slots:
                raise ValueError(f"this caption decoder reads {self.tag_slots} tag ids per image")
            memory = torch.cat([memory, self._embed(tag_ids) + self.tag_position], dim=1)
            empty = torch.zeros(image_tokens.shape[:2], dtype=torch.bool, device=memory.device)
            memory_mask = torch.cat([empty, tag_ids == self.PAD], dim=1)
        return memory, memory_mask

    # --- incremental decoding: the same layers, one new token at a time, keys and values cached ------------------
    def start(self, image_tokens: torch.Tensor, tag_ids: torch.Tensor | None = None) -> DecodeState:
        """Begin decoding (inference only: no dropout): the memory's cross-attention keys and values, once."""
        memory, memory_mask = self._memory(image_tokens, tag_ids)
        cross = []
        for layer in self.layers.layers:
            attn = layer.multihead_attn
            _, k_weight, v_weight = attn.in_proj_weight.chunk(3)
            _, k_bias, v_bias = attn.in_proj_bias.chunk(3)
            cross.append((self._heads(F.linear(memory, k_weight, k_bias), attn.num_heads),
                          self._heads(F.linear(memory, v_weight, v_bias), attn.num_heads)))
        visible = None if memory_mask is None else ~memory_mask[:, None, None, :]
        copy = None if self.copy_query is None else self._copy_keys(tag_ids)
        return DecodeState(cross, visible, [None] * len(cross), copy)

    def step(self, state: DecodeState, token_ids: torch.Tensor, logit_bias: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Feed one token per row ([B]) and return the next-token logits [B, size] (unusable ids at -inf); `state`
        grows by that token. `logit_bias` ([size] or [B, size]) is added; without it added words are unusable.
        Equal to `forward` on the whole prefix, without recomputing it; it follows the pre-norm (`norm_first=True`)
        GELU layers that `__init__` builds, reading their weights directly."""
        position = state.length
        if position >= self.position.shape[1]:
            raise ValueError(f"the caption decoder's {self.position.shape[1]} positions are used up")
        x = self._embed(token_ids)[:, None] + self.position[:, position: position + 1]
        for i, layer in enumerate(self.layers.layers):
            attn = layer.self_attn
            q, k, v = (self._heads(t, attn.num_heads) for t in
                       F.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1))
            if state.keys[i] is not None:
                k, v = torch.cat([state.keys[i][0], k], dim=2), torch.cat([state.keys[i][1], v], dim=2)
            state.keys[i] = (k, v)
            x = x + attn.out_proj(self._merge(F.scaled_dot_product_attention(q, k, v)))
            cross = layer.multihead_attn
            q_weight, q_bias = cross.in_proj_weight.chunk(3)[0], cross.in_proj_bias.chunk(3)[0]
            q = self._heads(F.linear(layer.norm2(x), q_weight, q_bias), cross.num_heads)
            out = F.scaled_dot_product_attention(q, *state.memory[i], attn_mask=state.memory_visible)
            x = x + cross.out_proj(self._merge(out))
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm3(x))))
        state.length += 1
        hidden = self.norm(x)
        logits = F.linear(hidden, self.embed.weight)
        if state.copy is not None:
            logits = self._with_copies(logits, hidden, *state.copy)
        logits = logits[:, 0].float().masked_fill(self._unusable, float("-inf"))
        if self.added_pieces:
            added = logits[:, self.added_donors]
            logits = torch.cat([logits, added if logit_bias is not None else torch.full_like(added, float("-inf"))], 1)
        return logits if logit_bias is None else logits + logit_bias

    @staticmethod
    def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # [B, T, W] -> [B, H, T, W/H]

    @staticmethod
    def _merge(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).flatten(2)

    @property
    def _unusable(self) -> torch.Tensor:
        """Ids never to generate: PAD, BOS, UNK and unused slots of the compact vocabulary."""
        mask = self.token_ids < 0
        mask[self.EOS] = False
        return mask


class DecodeState:
    """The caption decoder's incremental-decoding cache: per layer, the memory's cross-attention keys/values and the
    self-attention keys/values of the tokens fed so far, for each row of the batch."""

    def __init__(self, memory: list[tuple[torch.Tensor, torch.Tensor]], memory_visible: torch.Tensor | None,
                 keys: list[tuple[torch.Tensor, torch.Tensor] | None],
                 copy: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.memory, self.memory_visible, self.keys, self.length = memory, memory_visible, keys, 0
        self.copy = copy  # the copy path's tag keys and ids, when the decoder has one

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder, or repeat) these rows: finished rows leave, beams follow their parents."""
        self.memory = [(k[rows], v[rows]) for k, v in self.memory]
        if self.memory_visible is not None:
            self.memory_visible = self.memory_visible[rows]
        self.keys = [None if kv is None else (kv[0][rows], kv[1][rows]) for kv in self.keys]
        if self.copy is not None:
            self.copy = (self.copy[0][rows], self.copy[1][rows])
