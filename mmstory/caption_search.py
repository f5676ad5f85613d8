"""How a caption is searched for in the caption decoder: greedy, sampled (for self-critical training) and beam search,
constrained to a required word or started from a forced prefix when the caption policy asks (`candidates`)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from transformers import RepetitionPenaltyLogitsProcessor

from mmstory.caption_decoder import CaptionDecoder


def _steps(decoder: CaptionDecoder, max_new_tokens: int | None) -> int:
    return min(max_new_tokens or decoder.max_length, decoder.max_length)


@torch.no_grad()
def greedy(decoder: CaptionDecoder, image_tokens: torch.Tensor, max_new_tokens: int | None = None,
           repetition_penalty: float = 1.0, tag_ids: torch.Tensor | None = None) -> list[list[int]]:
    """The argmax caption per image: compact ids without BOS/EOS."""
    return _decode_batch(decoder, image_tokens, _steps(decoder, max_new_tokens), repetition_penalty, tag_ids)


@torch.no_grad()
def sample(decoder: CaptionDecoder, image_tokens: torch.Tensor, num_samples: int = 1, temperature: float = 1.0,
           max_new_tokens: int | None = None, tag_ids: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> list[list[int]]:
    """`num_samples` captions per image drawn from the decoder's own distribution (row i * num_samples + j is
    sample j of image i): the exploration self-critical training learns from."""
    if temperature <= 0:
        raise ValueError("sampling needs temperature > 0; use greedy() for greedy decoding")
    tokens = image_tokens.repeat_interleave(num_samples, dim=0)
    tags = None if tag_ids is None else tag_ids.repeat_interleave(num_samples, dim=0)
    return _decode_batch(decoder, tokens, _steps(decoder, max_new_tokens), 1.0, tags, temperature, generator)


@torch.no_grad()
def candidates(decoder: CaptionDecoder, image_tokens: torch.Tensor, max_new_tokens: int | None = None,
               num_beams: int = 3, length_penalty: float = 1.0, repetition_penalty: float = 1.0,
               tag_ids: torch.Tensor | None = None, required: Sequence[Sequence[int] | None] | None = None,
               logit_bias: torch.Tensor | None = None,
               prefixes: Sequence[Sequence[int]] | None = None) -> list[list[tuple[float, list[int]]]]:
    """Beam search's finished captions per image, best first, as (length-normalised log-probability, ids);
    `required`: per image, compact ids of which every caption must contain one (constrained search), or None;
    `logit_bias`: [images, size] added to every step's logits (what lets added words be written);
    `prefixes`: per image, compact ids its captions start with (`beam_search`)."""
    steps = _steps(decoder, max_new_tokens)
    count = image_tokens.shape[0]
    required = [None] * count if required is None else list(required)
    if len(required) != count:
        raise ValueError(f"required has {len(required)} entries for {count} images")
    prefixes = [tuple(p) for p in prefixes] if prefixes else [()] * count
    found: list[list[tuple[float, list[int]]]] = [[] for _ in range(count)]
    for length in sorted({len(p) for p in prefixes}):  # one batched search per prefix length
        rows = [i for i in range(count) if len(prefixes[i]) == length]
        index = torch.tensor(rows, device=image_tokens.device)
        results = beam_search(decoder, image_tokens[index], steps, num_beams, length_penalty, repetition_penalty,
                              None if tag_ids is None else tag_ids[index], [required[i] for i in rows],
                              None if logit_bias is None else logit_bias[index], [prefixes[i] for i in rows])
        for i, result in zip(rows, results):
            found[i] = result
    return found


def _decode_batch(decoder: CaptionDecoder, image_tokens: torch.Tensor, steps: int, repetition_penalty: float,
                 tag_ids: torch.Tensor | None = None, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> list[list[int]]:
    """Token by token for the whole batch: the argmax, or a draw at `temperature` > 0."""
    batch = image_tokens.shape[0]
    ids = torch.full((batch, 1), decoder.BOS, dtype=torch.long, device=image_tokens.device)
    state = decoder.start(image_tokens, tag_ids)
    active = torch.arange(batch, device=ids.device)  # rows still writing: finished ones leave the batch
    for _ in range(steps):
        rows = ids[active]
        logits = penalise_repeats(decoder.step(state, rows[:, -1]), rows[:, 1:], repetition_penalty)
        if temperature > 0:
            probs = (logits / temperature).softmax(-1)
            next_ids = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            next_ids = logits.argmax(-1)
        column = torch.full((batch,), decoder.PAD, dtype=torch.long, device=ids.device)
        column[active] = next_ids
        ids = torch.cat([ids, column[:, None]], dim=1)
        writing = next_ids != decoder.EOS
        active = active[writing]
        if active.numel() == 0:
            break
        state.select(writing.nonzero()[:, 0])
    return [_strip(row.tolist(), decoder.EOS, decoder.PAD) for row in ids[:, 1:]]


def beam_search(decoder: CaptionDecoder, image_tokens: torch.Tensor, steps: int, beams: int, length_penalty: float,
                repetition_penalty: float, tag_ids: torch.Tensor | None = None,
                required: Sequence[Sequence[int] | None] | None = None, logit_bias: torch.Tensor | None = None,
                prefixes: Sequence[Sequence[int]] | None = None) -> list[list[tuple[float, list[int]]]]:
    """Beam search for a batch of images: every step is one decoder step over all their open beams (a small decoder's
    step costs about the same for 5 rows as for 40), while each image keeps its own beams, banks and stopping rule,
    so an image gets the captions it gets alone. With `required[i]` (compact ids of one word's forms), constrained
    beam search (Anderson et al., 2017): a second bank of `beams` hypotheses that have not written one of them yet,
    and only captions that contain one finish; if none does within `steps`, the open hypotheses are returned.
    `prefixes[i]`: compact ids image i's captions start with (Neural Baby Talk's slot, filled before the caption is
    written: "A zebra" and the decoder goes on), all of one length; they count towards `steps` and the captions
    include them. `logit_bias`: [images, size]."""
    count, device = image_tokens.shape[0], image_tokens.device
    prefixes = [list(p) for p in prefixes] if prefixes else [[] for _ in range(count)]
    required = [list(r) if r else None for r in required] if required is not None else [None] * count
    start = len(prefixes[0])
    if any(len(p) != start for p in prefixes) or len(prefixes) != count or len(required) != count:
        raise ValueError("beam_search needs one prefix (all of one length) and one required entry per image")
    ids = torch.tensor([[decoder.BOS, *p] for p in prefixes], dtype=torch.long, device=device)
    scores = torch.zeros(count, device=device)
    has_word = torch.tensor([r is None or any(t in r for t in p) for r, p in zip(required, prefixes)], device=device)
    owner = list(range(count))  # the image each row of the batch belongs to; an image's rows are contiguous
    bias = logit_bias
    state = decoder.start(image_tokens, tag_ids)
    for token in ids[:, :-1].T:  # the prefixes' keys and values; their log-probability is not scored
        decoder.step(state, token, bias)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(count)]
    last_open: dict[int, tuple] = {}  # per image whose search is over: its open rows then (for the fallback)
    for step in range(start, steps):
        logits = penalise_repeats(decoder.step(state, ids[:, -1], bias), ids[:, 1:], repetition_penalty)
        if start and step == start:  # the prefix's last word is whole: a new word, not a suffix, follows it
            logits = logits.masked_fill(~decoder.word_starts.to(logits.device), float("-inf"))
        logprobs = scores[:, None] + logits.log_softmax(-1)
        vocab = logprobs.shape[-1]
        next_rows, next_scores, sources, next_has, next_owner = [], [], [], [], []
        for image, first, last in _blocks(owner):
            block, block_has = logprobs[first:last], has_word[first:last]
            # bank 1: hypotheses that contain the word (all of them when none is required); an open hypothesis
            # without it joins bank 1 by writing it, and stays in bank 2 (where it cannot end) otherwise
            with_word = block.masked_fill(~block_has[:, None], float("-inf"))
            banks = [(with_word, True)]
            if required[image] is not None:
                with_word[:, required[image]] = block[:, required[image]]
                without = block.masked_fill(block_has[:, None], float("-inf"))
                without[:, required[image] + [decoder.EOS]] = float("-inf")
                banks.append((without, False))
            rows, row_scores, row_sources, row_has = [], [], [], []
            for bank, contains in banks:
                top_scores, top_index = bank.view(-1).topk(min(2 * beams, bank.numel()))
                kept = 0
                for score, index in zip(top_scores.tolist(), top_index.tolist()):
                    if score == float("-inf") or kept == beams:
                        break
                    row, token = divmod(index, vocab)
                    sequence = ids[first + row, 1:].tolist() + [token]
                    if token == decoder.EOS:
                        finished[image].append((score / (len(sequence) ** length_penalty), sequence[:-1]))
                    else:
                        rows.append(sequence)
                        row_scores.append(score)
                        row_sources.append(first + row)
                        row_has.append(contains)
                        kept += 1
            best_finished = max((f[0] for f in finished[image]), default=float("-inf"))
            best_open = max(row_scores, default=float("-inf")) / ((step + 2) ** length_penalty)
            if not rows or (len(finished[image]) >= beams and best_finished > best_open):
                last_open[image] = (scores[first:last], ids[first:last], has_word[first:last])
                continue
            next_rows += rows
            next_scores += row_scores
            sources += row_sources
            next_has += row_has
            next_owner += [image] * len(rows)
        if not next_rows:
            break
        ids = torch.tensor([[decoder.BOS] + row for row in next_rows], device=device)
        scores = torch.tensor(next_scores, device=device)
        has_word = torch.tensor(next_has, device=device)
        owner = next_owner
        bias = None if logit_bias is None else logit_bias[torch.tensor(owner, device=device)]
        state.select(torch.tensor(sources, device=device))
    else:
        for image, first, last in _blocks(owner):  # out of steps: these images' searches end with the loop
            last_open[image] = (scores[first:last], ids[first:last], has_word[first:last])
    results = []
    for image in range(count):
        if not finished[image]:  # out of steps: the open hypotheses, those with the required word if any has it
            open_scores, open_ids, open_has = last_open[image]
            open_rows = [(s / (len(r) ** length_penalty), r, has) for s, r, has
                         in zip(open_scores.tolist(), open_ids[:, 1:].tolist(), open_has.tolist())]
            finished[image] = [(s, r) for s, r, has in open_rows if has] or [(s, r) for s, r, _ in open_rows]
        results.append(sorted(finished[image], key=lambda item: -item[0])[:beams])
    return results


def _blocks(owner: list[int]) -> list[tuple[int, int, int]]:
    """(image, first row, end row) for each run of rows that belong to one image."""
    blocks, first = [], 0
    for image, run in itertools.groupby(owner):
        end = first + sum(1 for _ in run)
        blocks.append((image, first, end))
        first = end
    return blocks


def penalise_repeats(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty: `transformers`' own processor, on the compact vocabulary's logits."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    return RepetitionPenaltyLogitsProcessor(float(penalty))(previous, logits)


def _strip(ids: list[int], eos_id: int, pad_id: int) -> list[int]:
    out = []
    for token in ids:
        if token in (eos_id, pad_id):
            break
        out.append(token)
    return out
