"""Continuous batching for the story server: one decode loop owns the story writer, and every request's rows share
its decode steps.

Several requests decoded together cost less than one after another: a step over 48 rows costs 0.65x of eight steps
over 6 with int4 weights (whose kernel is compute-bound) and 0.34x with dense bf16 weights. `mmstory serve` therefore
decodes a request of several rows (a story's candidates) with bf16 weights multiplied in blocks of MAX_ROWS rows
(`FastDecoder`'s `row_block`, so that a row's numbers never depend on the rows beside it), and a one-row request (a
stream) with int4 weights, ~3x faster at one row. A request's rows join the running batch between steps (its
prompt prefilled, then decoded with the rest) and leave when the request is done; a stream gets its tokens as they are
chosen. Each request keeps its own sampling state (random generator, logits processors, stopping rules), chosen
exactly as `FastDecoder.stream` chooses, so a request decoded alone gives the same tokens as the plain decoder.
Requests are admitted in arrival order (FIFO) while the batch has room for their rows.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from mmstory.decoding import FastDecoder, _as_list, choose_tokens, token_processors

MAX_ROWS = 64  # rows decoded together; a request that does not fit waits for the next free rows (alone, it runs)
MIN_WINDOW = 1024  # K/V slots allocated at least (then powers of two), as FastDecoder does: few sizes, few recompiles


class DecodeJob:
    """One request's rows: its prompt, its sampling state, and the tokens chosen so far (what `stream` keeps)."""

    def __init__(self, fast: FastDecoder, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 generator: torch.Generator | None = None, streamer=None, max_new_tokens: int = 256,
                 min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0, top_k: int = 50,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                 seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, stopping_criteria=None, suppress_tokens: Sequence[int] | None = None,
                 logits_processor: Sequence | None = None):
        """Checks as `FastDecoder.stream` does (ValueError), in the caller's thread, before the job is queued."""
        self.rows, self.prompt_len, _ = inputs_embeds.shape
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.prompt_len + max_new_tokens > fast.max_length:
            raise ValueError(f"prompt ({self.prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds this "
                             f"decoder's max_length ({fast.max_length})")
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1 or top_k < 0):
            raise ValueError("sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0")
        self.embeds = inputs_embeds
        mask = torch.ones(self.rows, self.prompt_len) if attention_mask is None else attention_mask
        self.mask = mask.to(torch.long)
        self.eos = _as_list(eos_token_id) if eos_token_id is not None else fast.eos_token_id
        self.pad = pad_token_id if pad_token_id is not None else (
            fast.pad_token_id if fast.pad_token_id is not None else (self.eos[0] if self.eos else 0))
        self.max_new, self.do_sample, self.top_k = max_new_tokens, do_sample, top_k
        self.fast = fast  # the decoder whose weights this job's rows are multiplied by, from prefill to the end
        self.processors = token_processors(self.eos, min_new_tokens, repetition_penalty, no_repeat_ngram_size,
                                           suppress_tokens, logits_processor)
        self.warpers = LogitsProcessorList()
        if do_sample and temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if do_sample and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else generator
        self.criteria = list(stopping_criteria) if isinstance(stopping_criteria, Sequence) else (
            [stopping_criteria] if stopping_criteria is not None else [])
        self.eos_ids = torch.tensor(self.eos, dtype=torch.long)
        self.streamer = streamer
        self.generated = torch.empty(self.rows, 0, dtype=torch.long)
        self.unfinished = torch.ones(self.rows, dtype=torch.bool)
        self.positions = self.mask.sum(dim=1)  # RoPE position of each row's next token
        self.logits: torch.Tensor | None = None  # the next token's logits [rows, V], from the prefill or a step
        self.row0 = self.start = 0  # where the rows and their first K/V slot sit in the shared window
        self.error: BaseException | None = None
        self.cancelled = False
        self.done = threading.Event()

    def advance(self) -> torch.Tensor | None:
        """Choose every row's next token from `logits`, as `FastDecoder.stream` does; None once the job is over (the
        loop then calls `finish`, after its rows have left)."""
        scores = self.processors(self.generated, self.logits)
        tokens = choose_tokens(self.generated, scores, self.do_sample, self.top_k, self.warpers, self.generator)
        tokens = torch.where(self.unfinished, tokens, self.pad)
        self.generated = torch.cat([self.generated, tokens[:, None]], dim=1)
        if self.eos:
            self.unfinished &= (tokens[:, None] != self.eos_ids).all(dim=1)
        for criterion in self.criteria:
            self.unfinished &= ~torch.as_tensor(criterion(self.generated, scores), dtype=torch.bool).expand(self.rows)
        if self.streamer is not None:
            self.streamer.put(tokens)
        if self.cancelled or not self.unfinished.any() or self.generated.shape[1] == self.max_new:
            return None
        return tokens

    def finish(self, error: BaseException | None = None) -> None:
        """The job leaves the batch: its waiter wakes (with the error, if any) and its stream ends."""
        if self.done.is_set():
            return
        self.error = error
        try:
            if self.streamer is not None:
                self.streamer.end()
        finally:
            self.done.set()

    def result(self) -> torch.LongTensor:
        """The new tokens [rows, T] once done (rows that stopped early padded), as `FastDecoder.generate` returns."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.generated


class SharedWindow:
    """The running rows' K/V caches [rows, kv_heads, S, hd] per layer, one window for all: every row writes its next
    token at the same slot; a job's prompt sits right before the slot it joined at, the slots before it masked out.
    Laid out afresh whenever jobs join or leave (right-aligned, so the window is as short as its longest job)."""

    def __init__(self, fast: FastDecoder):
        self.fast = fast
        self.jobs: list[DecodeJob] = []  # the jobs laid out now, in row order
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.valid = torch.zeros(0, 0, dtype=torch.bool)  # [rows, S]: which slots each row attends to
        self.length = 0  # slots in use; the next token goes to slot `length`

    def layout(self, jobs: list[DecodeJob], prefilled: dict[DecodeJob, object]) -> None:
        """Copy each job's K/V (a new job's from its prefill) into a new window holding exactly `jobs`."""
        self.jobs = list(jobs)
        if not jobs:
            self.keys, self.values, self.valid, self.length = [], [], torch.zeros(0, 0, dtype=torch.bool), 0
            return
        fast = self.fast
        spans = [job.prompt_len if job in prefilled else self.length - job.start for job in jobs]
        length = max(spans)
        size = min(max(MIN_WINDOW, 1 << length.bit_length()), fast.max_length)  # room for the next slot at least
        rows = sum(job.rows for job in jobs)
        shape = (rows, fast.kv_heads, size, fast.head_dim)
        keys = [torch.empty(shape, dtype=fast.dtype) for _ in fast._layers]
        values = [torch.empty(shape, dtype=fast.dtype) for _ in fast._layers]
        valid = torch.ones(rows, size, dtype=torch.bool)
        row = 0
        for job, span in zip(jobs, spans):
            rs, start = slice(row, row + job.rows), length - span
            valid[rs, :start] = False
            if job in prefilled:
                valid[rs, start:length] = job.mask.bool()
                sources = [(layer.keys, layer.values) for layer in prefilled[job].layers]
            else:
                old = slice(job.row0, job.row0 + job.rows)
                valid[rs, start:length] = self.valid[old, job.start:self.length]
                sources = [(k[old, :, job.start:self.length], v[old, :, job.start:self.length])
                           for k, v in zip(self.keys, self.values)]
            for (k_src, v_src), k, v in zip(sources, keys, values):
                k[rs, :, :start] = 0  # masked slots must hold finite numbers: 0 * NaN is NaN in attention
                v[rs, :, :start] = 0
                k[rs, :, start:length] = k_src
                v[rs, :, start:length] = v_src
            job.row0, job.start = row, start
            row += job.rows
        self.keys, self.values, self.valid, self.length = keys, values, valid, length

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step of every row (their tokens written at slot `length`): the next logits [rows, V]."""
        slot = self.length
        mask = None if bool(self.valid[:, :slot].all()) else self.valid[:, None, None, : slot + 1]
        logits = self.fast._step(tokens, slot, positions, mask, (self.keys, self.values))
        self.length += 1
        return logits


class Batcher:
    """The one decode loop (a daemon thread) that owns the writer's `FastDecoder`; requests come in as `generate`
    calls from any thread and wait for their tokens."""

    def __init__(self, fast: FastDecoder, max_rows: int = MAX_ROWS, wide: FastDecoder | None = None):
        """`wide`: the decoder (of the same model) for requests of several rows, a story's candidates: dense bf16
        weights in row blocks multiply many rows ~6x faster than int4 and one row ~3x slower, so one-row requests
        (streams) stay with `fast`. Each request keeps one decoder from start to end, chosen by its own rows, so its
        tokens never depend on the others; a step runs each decoder's rows through its own window."""
        self.fast, self.wide, self.max_rows = fast, wide or fast, max_rows
        self._waiting: deque[DecodeJob] = deque()
        self._running: list[DecodeJob] = []
        self._windows = {decoder: SharedWindow(decoder) for decoder in (self.fast, self.wide)}
        self._cond = threading.Condition()
        self._closed = False
        self.steps = 0  # decode steps run (each over every running row)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="mmstory-batcher")
        self._thread.start()

    # --- requests (any thread) ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, *, streamer=None,
                 generator: torch.Generator | None = None, **kwargs) -> torch.LongTensor:
        """`FastDecoder.generate` through the shared loop (no beam search): the new tokens [B, T]. `generator`: the
        request's random state (default: a copy of torch's global RNG as it is now)."""
        if generator is None:
            generator = torch.Generator()
            generator.set_state(torch.get_rng_state())
        job = DecodeJob(self.decoder_for(inputs_embeds.shape[0]), inputs_embeds, attention_mask, generator=generator,
                        streamer=streamer, **kwargs)
        if streamer is not None:
            streamer.put(torch.empty(job.rows, 0, dtype=torch.long))  # the (empty) prompt, as generate does
        with self._cond:
            if self._closed:
                raise RuntimeError("the story server's decode loop is closed")
            self._waiting.append(job)
            self._cond.notify()
        try:
            return job.result()
        except BaseException:
            job.cancelled = True  # the caller gave up (interrupted): its rows leave at the next step
            raise

    @torch.no_grad()
    def warmup(self) -> None:
        """Decode a few short requests of different prompt lengths together (so that each decoder's padded steps of
        two batch sizes or more run and are compiled now, before the first requests come in)."""
        embeds = self.fast._embed.weight[:8][None].to(self.fast.dtype)
        jobs = [DecodeJob(self.decoder_for(rows), embeds[:, :length].expand(rows, -1, -1), max_new_tokens=new,
                          min_new_tokens=new)
                for rows, length, new in ((1, 4, 3), (1, 5, 5), (1, 6, 7), (2, 6, 6), (3, 8, 9))]
        with self._cond:
            self._waiting.extend(jobs)
            self._cond.notify()
        for job in jobs:
            job.result()

    def decoder_for(self, rows: int) -> FastDecoder:
        """The decoder a request of this many rows is decoded with."""
        return self.wide if rows > 1 else self.fast

    def decoder(self, fallback: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """A `generate`-like callable for one request, carrying a copy of torch's RNG as it is now (call it right after
        seeding): the request samples from its own random state whichever thread decodes and whoever else is in
        the batch. Beam search goes to `fallback`."""
        generator = torch.Generator()
        generator.set_state(torch.get_rng_state())

        def decode(**kwargs) -> torch.Tensor:
            if kwargs.get("num_beams", 1) > 1 or kwargs.get("num_return_sequences", 1) > 1:
                return fallback(**kwargs)
            kwargs.pop("num_beams", None), kwargs.pop("num_return_sequences", None), kwargs.pop("length_penalty", None)
            return self.generate(generator=generator, **kwargs)

        return decode

    def load(self) -> dict[str, int]:
        """What the loop holds now: requests decoding, their rows, requests waiting for rows."""
        with self._cond:
            return {"jobs": len(self._running), "rows": sum(job.rows for job in self._running),
                    "waiting": len(self._waiting), "steps": self.steps}

    def close(self) -> None:
        """Stop the loop; requests still waiting or running fail with RuntimeError."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    # --- the loop (its own thread) -----------------------------------------------------------------------------
    def _admit(self) -> list[DecodeJob] | None:
        """Wait for work; then the waiting jobs that fit, in arrival order (None once closed)."""
        with self._cond:
            while not self._closed and not self._waiting and not self._running:
                self._cond.wait()
            if self._closed:
                return None
            rows = sum(job.rows for job in self._running)
            joining = []
            while self._waiting and (rows + self._waiting[0].rows <= self.max_rows or not (rows or joining)):
                job = self._waiting.popleft()
                joining.append(job)
                rows += job.rows
            return joining

    @torch.no_grad()
    def _loop(self) -> None:
        while (joining := self._admit()) is not None:
            prefilled = {}
            for job in joining:
                try:
                    job.logits, prefilled[job] = job.fast.prefill(job.embeds, job.mask)
                except Exception as err:  # noqa: BLE001 - this request fails; the batch goes on
                    job.finish(err)
            chosen_by: dict[DecodeJob, torch.Tensor] = {}  # each running job's tokens for the next step
            kept, ended = [], []
            for job in self._running + [job for job in joining if job in prefilled]:
                try:
                    chosen = job.advance()
                except Exception as err:  # noqa: BLE001 - a failing stopping rule or stream ends its request only
                    job.error, chosen = err, None
                if chosen is None:
                    ended.append(job)
                else:
                    kept.append(job)
                    chosen_by[job] = chosen
            try:
                groups = {decoder: [job for job in kept if job.fast is decoder] for decoder in self._windows}
                for decoder, window in self._windows.items():
                    if groups[decoder] != window.jobs or any(job in prefilled for job in groups[decoder]):
                        window.layout(groups[decoder], prefilled)
                with self._cond:
                    self._running = kept
                for job in ended:  # woken once their rows are out of the batch
                    job.finish(job.error)
                for decoder, window in self._windows.items():
                    group = groups[decoder]
                    if not group:
                        continue
                    logits = window.step(torch.cat([chosen_by[job] for job in group]),
                                         torch.cat([job.positions for job in group]))
                    for job, part in zip(group, logits.split([job.rows for job in group])):
                        job.logits, job.positions = part, job.positions + 1
                self.steps += bool(kept)
            except Exception as err:  # noqa: BLE001 - the whole batch fails, the loop goes on
                for job in kept + ended:
                    job.finish(job.error or err)
                with self._cond:
                    self._running = []
                for window in self._windows.values():
                    window.layout([], {})
        with self._cond:
            stranded, self._running = [*self._running, *self._waiting], []
            self._waiting.clear()
        for job in stranded:
            job.finish(RuntimeError("the story server's decode loop was closed"))
