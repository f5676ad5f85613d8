"""Continuous batching (mmstory.serve.batcher): a request gives the same tokens in the shared decode loop as alone,
however other requests join and leave around it, and a request that is given up frees its rows."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import make_photo
from transformers import StoppingCriteriaList

from mmstory.decoding import FastDecoder
from mmstory.generation import Cancelled
from mmstory.serve.batcher import Batcher
from mmstory.tiny import tiny_decoder


@pytest.fixture(scope="module", params=["float32", "bf16-blocks"])
def fast(request):
    """The tiny writer as the server decodes it: its own weights, or bf16 weights multiplied in blocks of rows."""
    model, _ = tiny_decoder()
    model.generation_config.eos_token_id = None  # fixed lengths unless a test asks for an end token
    if request.param == "float32":
        return FastDecoder(model.eval(), compile=False)
    return FastDecoder(model.to(torch.bfloat16).eval(), compile=False, row_block=4)  # 5 rows: two blocks


@pytest.fixture
def batcher(fast):
    running = Batcher(fast)
    yield running
    running.close()


def prompt(model, rows: int, length: int, seed: int) -> torch.Tensor:
    """Prompt embeddings like the story writer's: 'visual prefix' vectors then token embeddings, each row its own."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.config.vocab_size, (rows, length - 4), generator=gen)
    prefix = torch.randn(rows, 4, model.config.hidden_size, generator=gen) * 0.05
    with torch.no_grad():
        return torch.cat([prefix, model.get_input_embeddings()(ids)], dim=1)


class Gate:
    """A streamer for the first request that, at its `at`-th token, sends the second request in and waits until it
    is queued: the second then joins the running batch at the next step, whatever the machine's speed."""

    def __init__(self, batcher: Batcher, at: int, start_second):
        self.batcher, self.at, self.start_second, self.puts, self.rows_seen = batcher, at, start_second, 0, []
        self.second: threading.Thread | None = None

    def put(self, tokens: torch.Tensor) -> None:
        self.puts += 1
        self.rows_seen.append(self.batcher.load()["rows"])
        if self.puts == self.at + 1:  # (the first put is the empty prompt)
            self.second = threading.Thread(target=self.start_second)
            self.second.start()
            while not self.batcher.load()["waiting"]:
                self.second.join(timeout=0.01)
                assert self.second.is_alive(), "the second request ended before it was queued"

    def end(self) -> None:
        pass


SETTINGS = [
    pytest.param(dict(do_sample=False), dict(do_sample=False), id="greedy"),
    pytest.param(dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=5),
                 dict(do_sample=True, temperature=1.1, top_k=0, top_p=0.95, no_repeat_ngram_size=3, seed=9),
                 id="seeded-sampling"),
]


@pytest.mark.parametrize("first_settings, second_settings", SETTINGS)
def test_overlapping_requests_get_what_they_get_alone(fast, batcher, first_settings, second_settings):
    """Two requests with different prompt lengths and row counts, the second joining mid-way and leaving first:
    each gets exactly its tokens decoded alone by FastDecoder."""
    model = fast.model
    first, second = prompt(model, 2, 15, seed=1), prompt(model, 3, 9, seed=2)
    first_args = dict(max_new_tokens=40, pad_token_id=0, **first_settings)
    second_args = dict(max_new_tokens=12, pad_token_id=0, **second_settings)
    alone = fast.generate(first, **first_args), fast.generate(second, **second_args)
    got = {}

    def run_second():
        got["second"] = batcher.generate(second, **second_args)

    gate = Gate(batcher, 5, run_second)
    got["first"] = batcher.generate(first, streamer=gate, **first_args)
    gate.second.join()
    assert max(gate.rows_seen) == 5 and gate.rows_seen[-1] == 2  # they did share steps, and the second left first
    assert torch.equal(got["first"], alone[0])
    assert torch.equal(got["second"], alone[1])
    assert batcher.load() == {"jobs": 0, "rows": 0, "waiting": 0, "steps": batcher.steps}


def test_one_row_and_many_row_requests_keep_their_own_weights():
    """The server's batcher decodes a stream (one row) with int4 weights and a story's candidates with bf16 blocks:
    two decoders of one model, each request with its own from start to end, both in the same steps."""
    model, _ = tiny_decoder()
    model.generation_config.eos_token_id = None
    plain, blocked = FastDecoder(model.eval(), compile=False), FastDecoder(model, compile=False, row_block=4)
    both = Batcher(plain, wide=blocked)
    try:
        first, second = prompt(model, 1, 15, seed=1), prompt(model, 3, 9, seed=2)
        args = dict(max_new_tokens=30, pad_token_id=0, do_sample=True, temperature=0.9, seed=3)
        alone = plain.generate(first, **args), blocked.generate(second, **args)
        got = {}
        gate = Gate(both, 5, lambda: got.update(second=both.generate(second, **args)))
        got["first"] = both.generate(first, streamer=gate, **args)
        gate.second.join()
        assert max(gate.rows_seen) == 4  # they shared steps
        assert torch.equal(got["first"], alone[0]) and torch.equal(got["second"], alone[1])
        assert both.decoder_for(1) is plain and both.decoder_for(6) is blocked
    finally:
        both.close()


def test_a_request_given_up_frees_its_rows(fast, batcher):
    """What the server does when a streaming client goes away: the story's cancel event is set, and the request's
    rows leave the batch at the next step (its tokens so far returned), not at max_new_tokens."""
    cancel, started = threading.Event(), threading.Event()

    class FirstTokens:
        def put(self, tokens):
            if tokens.numel():
                started.set()

        def end(self):
            pass

    got = {}
    worker = threading.Thread(target=lambda: got.update(tokens=batcher.generate(
        prompt(fast.model, 2, 10, seed=3), streamer=FirstTokens(), max_new_tokens=4000, pad_token_id=0,
        stopping_criteria=StoppingCriteriaList([Cancelled(cancel)]))))
    worker.start()
    started.wait()
    cancel.set()
    worker.join()
    assert got["tokens"].shape[0] == 2 and got["tokens"].shape[1] < 4000
    assert batcher.load()["rows"] == 0 and batcher.load()["jobs"] == 0


def test_bad_settings_fail_in_the_caller_and_the_loop_goes_on(fast, batcher):
    embeds = prompt(fast.model, 1, 8, seed=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        batcher.generate(embeds, max_new_tokens=0)
    assert torch.equal(batcher.generate(embeds, max_new_tokens=5, pad_token_id=0),
                       fast.generate(embeds, max_new_tokens=5, pad_token_id=0))


def test_close_fails_waiting_requests(fast):
    closed = Batcher(fast)
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        closed.generate(prompt(fast.model, 1, 8, seed=5), max_new_tokens=3)


@pytest.mark.parametrize("stream", [False, True])
def test_seeded_story_is_the_same_through_the_batcher(tiny_model, stream):
    """A lone seeded story (sampled candidates, the default settings) is exactly today's, streamed or not."""
    from mmstory.generation import StoryTeller

    teller = StoryTeller(tiny_model, dtype="float32", compile=False)
    photo = make_photo(4)
    settings = dict(length=20, max_new_tokens=30, seed=7, style="adventure", num_candidates=1 if stream else 3)

    def story():
        if stream:
            return list(teller.stream_result(photo, **settings))[-1]
        return teller.generate_story(photo, **settings)

    before = story()
    teller.batcher = Batcher(teller.fast)
    try:
        after = story()
        assert teller.batcher.steps > 0  # it did go through the shared loop
    finally:
        teller.batcher.close()
    assert after.candidates == before.candidates and after.story == before.story


def test_row_blocks_give_each_row_the_same_numbers_at_any_batch_size():
    """A GEMM library picks its kernel by shape: a bf16 row multiplied beside 2 others may round differently than
    beside 40 (it does on this project's machine: every batch of 3-32 rows differs from the same rows among 64). In
    whole blocks, a row's numbers depend on itself only, with dense and int4 weights, LoRA factors included."""
    from mmstory.decoding import Packed, _linear, pack_linear

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(1536, 576, generator=gen) * 0.02
    lora = dict(lora_a=torch.randn(8, 576, generator=gen) * 0.02, lora_b=torch.randn(1536, 8, generator=gen) * 0.02)
    x = torch.randn(64, 576, generator=gen).to(torch.bfloat16)
    for packed in (pack_linear(weight, None, torch.bfloat16), Packed(weight.to(torch.bfloat16), **lora),
                   pack_linear(weight, "int4", torch.bfloat16)):
        together = _linear(x, packed, row_block=64)
        for rows in (1, 3, 6, 17, 40, 64):
            assert torch.equal(_linear(x[:rows], packed, row_block=64), together[:rows]), rows
        assert torch.equal(_linear(torch.cat([x, x[:6]]), packed, row_block=64)[:64], together)  # two blocks


def test_the_model_lock_serves_waiters_in_arrival_order():
    from mmstory.locks import FairLock

    lock, order = FairLock(), []
    lock.acquire()

    def wait_then_record(i: int) -> None:
        with lock:
            order.append(i)

    threads = []
    for i in range(6):
        threads.append(threading.Thread(target=wait_then_record, args=(i,)))
        threads[-1].start()
        while len(lock._queue) < i + 1:  # each one queued before the next asks
            threads[-1].join(timeout=0.005)
    lock.release()
    for thread in threads:
        thread.join()
    assert order == list(range(6)) and not lock.locked()
    with pytest.raises(RuntimeError):
        lock.release()
    assert lock.acquire(blocking=False) and not lock.acquire(blocking=False)  # like threading.Lock
    lock.release()
