"""StoryTeller: the one inference entry point behind the Python API, the CLI, the demo and the HTTP API.

Describe first, then narrate: each image is captioned from its own features, then the decoder writes the story from
the images' visual prefixes plus those captions. Several candidates are sampled in one batch and reranked by how well
they agree with the images under the model's own contrastive head.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from mmstory.answering import AnswerResult, answer_question, check_answer_request
from mmstory.avoided_words import avoided_words
from mmstory.caption_policy import CaptionChoice
from mmstory.captioning import CAPTION_REPETITION_PENALTY
from mmstory.components import similarity
from mmstory.decoding import QUANTIZE, FastDecoder
from mmstory.devices import DeviceLike, resolve_device
from mmstory.images import ImageInput, ImageProcessor, load_image, picture_seed
from mmstory.limits import DECODING_LIMITS
from mmstory.locks import FairLock
from mmstory.model import StoryModel
from mmstory.prompts import (  # noqa: F401 - re-exported: the prompt and its checks were defined here
    AUDIENCES,
    DEFAULT_LENGTH,
    LENGTHS,
    MAX_PROMPT_CHARS,
    MAX_WORDS,
    STYLES,
    TONES,
    StoryInputError,
    _check_text,
    _choose,
    build_instruction,
    story_opening,
    word_budget,
)
from mmstory.safety import ContentFilter
from mmstory.seeing import Seen, see, writer_prompt
from mmstory.story_beats import story_shape
from mmstory.story_picking import WriterLikelihood, pick_candidate, text_agreements
from mmstory.story_text import ENDS_SENTENCE, finish_story, settled_text
from mmstory.text import (
    split_sentences,
)

MAX_IMAGES = 8  # per story (and per answer); captioning takes any number, CAPTION_BATCH at a time
CAPTION_BATCH = 32
DARK_STYLES = ("suspense", "mystery")  # styles that may speak of death (as may a negative tone)
MIN_STORY_SHARE = 0.8  # of the word budget, written before the writer may end the story
TOKENS_PER_WORD = 1.45  # SmolLM2's tokenizer on English prose, measured on its own stories


@dataclass
class Decoding:
    """Decoding settings; `transformers.generate` names where one exists."""

    temperature: float = 0.3  # blind readers kept 0.3 over 0.5 (33 to 11) and 0.5 over 0.7 (docs/stories.md)
    top_k: int = 50
    top_p: float = 0.92
    repetition_penalty: float = 1.15
    no_repeat_ngram_size: int = 4
    num_beams: int = 1
    num_candidates: int = 6  # more to choose from: fewer unseen objects in the one kept
    seed: int | None = 0  # mixed with the pictures' pixels: the same photos and seed give the same story
    max_new_tokens: int | None = None  # default: from the word budget
    do_sample: bool = True

    def validate(self) -> None:
        """Every number finite and inside `DECODING_LIMITS` (StoryInputError naming the range), before any work."""
        for name, limit in DECODING_LIMITS.items():
            value = getattr(self, name)
            if value is not None or name not in ("seed", "max_new_tokens"):
                limit.check(name, value)
        if not isinstance(self.do_sample, bool):
            raise StoryInputError(f"do_sample must be true or false, got {self.do_sample!r}")
        if self.num_beams > 1 and self.num_candidates > self.num_beams:
            raise StoryInputError(f"num_candidates ({self.num_candidates}) cannot exceed num_beams "
                                  f"({self.num_beams}) in beam search")


@dataclass
class SentenceScore:
    text: str
    grounding: float  # cosine agreement of this sentence with its best-matching image, in [-1, 1]
    image: int  # index of that image


@dataclass
class StoryResult:
    story: str
    captions: list[str]
    sentences: list[SentenceScore]
    score: float  # the reranking score of the chosen candidate
    settings: dict
    timings: dict = field(default_factory=dict)
    candidates: list[str] = field(default_factory=list)
    filtered: bool = False
    notice: str | None = None
    # per picture: how sure its caption is and what the caption policy did (mmstory.caption_policy.CaptionChoice)
    caption_details: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return self.story


@dataclass
class StoryRequest:
    """A story request checked and resolved before the model runs; the texts are what the instruction says."""

    settings: Decoding
    prompt: str | None
    previous: str | None
    budget: int
    style_text: str | None
    tone_text: str | None
    audience_text: str | None

    @classmethod
    def parse(cls, prompt, style, tone, audience, length, previous, decoding: dict, stream: bool,
              content_filter: ContentFilter) -> StoryRequest:
        """Every setting checked, in this order, before any image is read; StoryInputError names the first wrong one."""
        unknown = set(decoding) - set(Decoding.__dataclass_fields__)
        if unknown:
            raise StoryInputError(f"unknown decoding setting(s): {sorted(unknown)}; "
                                  f"known: {sorted(Decoding.__dataclass_fields__)}")
        settings = Decoding(**decoding)
        settings.validate()
        if stream and settings.num_candidates != 1:
            raise StoryInputError("streaming writes one candidate; set num_candidates=1")
        prompt = _check_text(prompt, "prompt")
        previous = _check_text(previous, "previous story", limit=20000)
        budget = word_budget(length)
        style_text = _choose(style, STYLES, "style", free_prefix="custom:")
        tone_text = _choose(tone, TONES, "tone")
        audience_text = _choose(audience, AUDIENCES, "audience")
        if prompt:
            verdict = content_filter.check(prompt)
            if verdict.blocked:
                raise StoryInputError(verdict.message)
        return cls(settings, prompt, previous, budget, style_text, tone_text, audience_text)


class StoryTeller:
    """Load once per process, then caption images and write stories about them."""

    def __init__(self, model: StoryModel, dtype: str = "bfloat16", quantize: str | None = None,
                 content_filter: ContentFilter | None = None, compile: bool = True, device: DeviceLike = None,
                 row_block: int = 0):
        """`quantize`: None (exact weights), "int8" or "int4" weights for the story writer's decode steps (the
        packaged SmolLM2 ships as Q4_1, which "int4" reproduces). `compile`: torch.compile the decode step.

        `device`: where the model, the image tensors and the decode loop run: None or "auto" (CUDA when
        `torch.cuda.is_available()`, else the CPU), "cpu", "cuda", "cuda:N" or a torch.device; a device this machine
        lacks raises `DeviceError` (a ValueError). The model is moved there in place. On CUDA the FastDecoder keeps
        bf16 weights and a static KV cache and compiles its step; int8/int4 there go through torchao's weight-only
        quantisation when torchao is importable, and are exact bf16 otherwise (`self.fast.weight_format` says
        which). On the CPU nothing changes: the packed int8/int4 kernels and the same tokens as before.

        `row_block` > 0: decode steps multiply their rows in blocks of this many (`FastDecoder`), so that a row's
        tokens do not depend on the rows beside it: the story server sets it when it batches dense weights."""
        if dtype not in ("bfloat16", "float32"):
            raise ValueError("dtype must be 'bfloat16' or 'float32'")
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.dtype, self.quantize = dtype, quantize
        self.model.writer.to(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        try:  # static KV cache + compiled step for Llama-family decoders; others decode with transformers
            self.fast: FastDecoder | None = FastDecoder(self.model.writer, quantize=quantize, compile=compile,
                                                         row_block=row_block)
        except ValueError as err:
            if quantize is not None:
                raise ValueError(f"quantize={quantize!r} is not available for this decoder: {err}") from err
            self.fast = None
        self.processor = ImageProcessor(model.vision.image_size, model.vision.mean, model.vision.std)
        self.filter = content_filter if content_filter is not None else ContentFilter()
        self._lock = FairLock()  # one generation at a time per model, in arrival order: torch threads are shared
        self.batcher = None  # a server's shared decode loop (mmstory.serve.batcher.Batcher); None: decode here

    def _decode(self, **kwargs) -> torch.Tensor:
        """The story writer's `generate`: FastDecoder where it applies (beam search goes to transformers inside)."""
        return self._decoder()(**kwargs)

    def _decoder(self):
        """The writer's `generate` for one request; with a batcher, its shared decode loop, carrying torch's RNG as
        seeded now (so the request keeps its own random state while the lock is let go)."""
        writer = (self.fast or self.model.writer).generate
        return writer if self.batcher is None else self.batcher.decoder(writer)

    @contextlib.contextmanager
    def _writing(self):
        """Around a story's decode, inside the lock: with a batcher the lock is let go meanwhile (the decode loop owns
        the writer), so other requests are captioned and join the running batch; without one it stays held."""
        if self.batcher is None:
            yield
            return
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()

    def warmup(self) -> None:
        """Compile the decode step now for one row and the default candidate batch (servers: before requests)."""
        if self.fast is not None:
            with self._lock:
                self.fast.warmup((1, Decoding.num_candidates))

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "mmstory-small", **kwargs) -> StoryTeller:
        """Load a packaged name, directory or hub id; keywords as for the constructor (`device=`, `dtype=`, ...).
        The device is checked before the weights load."""
        kwargs["device"] = resolve_device(kwargs.get("device"))
        return cls(StoryModel.from_pretrained(name_or_path), **kwargs)

    # --- images and captions ---------------------------------------------------------------------------------------
    def _load_images(self, images: ImageInput | Sequence[ImageInput], limit: int | None = MAX_IMAGES) -> list:
        if images is None:
            raise StoryInputError("no image given: pass one image or a list of images")
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise StoryInputError("no image given: pass one image or a list of images")
        if limit is not None and len(items) > limit:
            raise StoryInputError(f"too many images ({len(items)}); at most {MAX_IMAGES} per story")
        try:
            return [load_image(item) for item in items]
        except ValueError as err:
            raise StoryInputError(str(err)) from err

    @torch.no_grad()
    def _encode(self, pil_images: list) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_image(self.processor.batch(pil_images).to(self.device))

    def _see(self, pil_images: list) -> Seen:
        """The pictures captioned (the step a story and an answer share); call it holding the lock."""
        return see(self.model, self.processor.batch(pil_images).to(self.device))

    @torch.no_grad()
    def caption(self, images: ImageInput | Sequence[ImageInput], num_beams: int | None = None,
                max_new_tokens: int | None = None,
                repetition_penalty: float = CAPTION_REPETITION_PENALTY, captioner: str | None = None,
                concepts: float | None = None, batch_size: int = CAPTION_BATCH) -> list[str]:
        """One caption per image, in order, for any number of images: they are loaded and captioned `batch_size`
        at a time (the MAX_IMAGES limit is for one story, not for captioning). `concepts`: the pooled classifier
        confidence at which a word must be written (default: the generation config's `caption_concepts`; 0 turns
        it off). Any unreadable image raises StoryInputError (`mmstory caption` skips and counts them instead)."""
        return [choice.caption for choice in self.caption_choices(
            images, num_beams=num_beams, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
            captioner=captioner, concepts=concepts, batch_size=batch_size)]

    @torch.no_grad()
    def caption_choices(self, images: ImageInput | Sequence[ImageInput], *, batch_size: int = CAPTION_BATCH,
                        repetition_penalty: float = CAPTION_REPETITION_PENALTY, **kwargs) -> list[CaptionChoice]:
        """Like `caption`, with how sure each caption is and the caption policy's trace (`CaptionChoice`)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise StoryInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise StoryInputError("no image given: pass one image or a list of images")
        choices: list[CaptionChoice] = []
        for start in range(0, len(items), batch_size):
            tokens, pooled = self._encode(self._load_images(items[start: start + batch_size], limit=None))
            choices += self.model.caption_choices(image_tokens=tokens, image_pooled=pooled,
                                                  repetition_penalty=repetition_penalty, **kwargs)
        return choices

    # --- stories ---------------------------------------------------------------------------------------------------
    def generate_story(self, images: ImageInput | Sequence[ImageInput], prompt: str | None = None, *,
                       style: str | None = None, tone: str | None = None, audience: str | None = None,
                       length: str | int = DEFAULT_LENGTH, previous: str | None = None, **decoding) -> StoryResult:
        """Write a story about one image or an ordered album; see `Decoding` for the decoding keywords."""
        result = None
        for event in self._run(images, prompt, style, tone, audience, length, previous, decoding, stream=False):
            result = event
        return result

    def stream_story(self, images: ImageInput | Sequence[ImageInput], prompt: str | None = None, *,
                     style: str | None = None, tone: str | None = None, audience: str | None = None,
                     length: str | int = DEFAULT_LENGTH, previous: str | None = None, **decoding) -> Iterator[str]:
        """Yield the story in chunks as it is written (one candidate); the chunks join to the final story."""
        events = self.stream_result(images, prompt, style=style, tone=tone, audience=audience, length=length,
                                    previous=previous, **decoding)
        yield from (event for event in events if isinstance(event, str))

    def stream_result(self, images, prompt=None, **kwargs) -> Iterator[str | StoryResult]:
        """Like stream_story, but ends with the StoryResult (captions, grounding): for the demo."""
        kwargs.setdefault("num_candidates", 1)
        keys = ("style", "tone", "audience", "length", "previous")
        named = {k: kwargs.pop(k) for k in keys if k in kwargs}
        yield from self._run(images, prompt, named.get("style"), named.get("tone"), named.get("audience"),
                             named.get("length", DEFAULT_LENGTH), named.get("previous"), kwargs, stream=True)

    def _run(self, images, prompt, style, tone, audience, length, previous, decoding: dict, stream: bool):
        start = time.perf_counter()
        request = StoryRequest.parse(prompt, style, tone, audience, length, previous, decoding, stream, self.filter)
        settings, prompt, previous, budget = request.settings, request.prompt, request.previous, request.budget
        style_text, tone_text, audience_text = request.style_text, request.tone_text, request.audience_text
        pil_images = self._load_images(images)
        timings = {}
        with self._lock:
            seen = self._see(pil_images)
            captions, hints, timings["caption_s"] = seen.captions, seen.hints, seen.seconds
            instruction = build_instruction(captions, prompt, style_text, tone_text, audience_text, budget, previous,
                                            with_images=self.model.generation_config.story_prefix, hints=hints)
            opening = (story_opening(captions[0], style, previous)
                       if self.model.generation_config.open_with_caption else "")
            embeds = writer_prompt(self.model, seen, instruction, opening)
            context = getattr(self.model.writer.config, "max_position_embeddings", None) or 1 << 30
            max_new, min_new, to_write = token_limits(settings.max_new_tokens, budget, opening, embeds.shape[1],
                                                      context)
            stopper = WordBudget(self.model.tokenizer, to_write)  # generate() passes only new tokens
            cancel = threading.Event()  # set when a streaming consumer goes away mid-story
            rows = settings.num_candidates if settings.num_beams == 1 else 1  # beam search returns its candidates
            gen_kwargs = sampling_kwargs(settings, embeds, rows, max_new, min_new, self.model.tokenizer.pad_token_id,
                                         StoppingCriteriaList([stopper, Cancelled(cancel)]))
            kind = (style or "").strip().lower()
            avoided = avoided_words(self.model.tokenizer, self.model.generation_config, seen.choices, prompt, previous,
                                    dark=tone_text == TONES["negative"] or kind in DARK_STYLES)
            if avoided.tokens:
                gen_kwargs["suppress_tokens"] = avoided.tokens
            seed = None if settings.seed is None else picture_seed(settings.seed, pil_images)
            shaped = self.model.generation_config.story_beats and not previous and (not kind or kind in STYLES)
            lines = shaped and kind == "poem"
            weight = self.model.generation_config.story_pick_likelihood
            likelihood = WriterLikelihood(self.model.tokenizer.eos_token_id) if weight > 0 and rows > 1 else None
            banned = avoided.processor(self.model.tokenizer.eos_token_id)  # with suppress_tokens, before the rest
            # then the likelihood: it scores the writer's choices, not the beats'
            processors = [p for p in (banned, likelihood) if p is not None]
            if shaped:
                processors += story_shape(self.model.tokenizer, captions[0], style, tone, audience, budget, opening,
                                          rows, seed or 0)
            if processors:
                gen_kwargs["logits_processor"] = LogitsProcessorList(processors)
            if seed is not None:
                torch.manual_seed(seed)
            decode = self._decoder()
            t = time.perf_counter()
            with self._writing():
                if stream:
                    texts, emitted = yield from _streamed(decode, gen_kwargs, self.model.tokenizer, budget, cancel,
                                                          timings, start, opening, lines)
                else:
                    with torch.no_grad():
                        out = decode(**gen_kwargs)
                    texts = [opening + text for text in self.model.tokenizer.batch_decode(out,
                                                                                          skip_special_tokens=True)]
            timings["generate_s"] = time.perf_counter() - t
            candidates = [finish_story(text, budget, keep_lines=lines) for text in texts]
            t = time.perf_counter()
            image_embeds = self.model.image_embedding(seen.pooled)
            scores = text_agreements(self.model, candidates, image_embeds)
            timings["rerank_s"] = time.perf_counter() - t
        verdicts = [self.filter.check(c) for c in candidates]
        fluency = likelihood.mean() if likelihood is not None else None
        best = pick_candidate(candidates, captions, hints, scores, [v.blocked for v in verdicts], budget,
                              fluency, weight)
        story = candidates[best]
        if stream and story.startswith(emitted) and len(story) > len(emitted):
            yield story[len(emitted):]
        verdict = verdicts[best]
        notice = None
        if verdict.blocked:
            story, notice = self.filter.redact(story), verdict.message
        sentences = sentence_scores(self.model, story, image_embeds)
        timings["total_s"] = time.perf_counter() - start
        yield StoryResult(
            story=story, captions=captions, caption_details=[c.to_dict() for c in seen.choices], sentences=sentences,
            score=scores[best],
            settings={**asdict(settings), "style": style, "tone": tone, "audience": audience, "length": length,
                      "word_budget": budget, "prompt": prompt, "dtype": self.dtype, "quantize": self.quantize},
            timings=timings, candidates=candidates, filtered=verdict.blocked, notice=notice,
        )

    def _agreement(self, text: str, image_embeds: torch.Tensor) -> float:
        """Mean cosine agreement of the text with the images (the reranking score)."""
        return text_agreements(self.model, [text], image_embeds)[0]

    def grounding(self, text: str, images: ImageInput | Sequence[ImageInput]) -> float:
        """Image-text agreement of any text with the given images under the contrastive head."""
        _, pooled = self._encode(self._load_images(images))
        return self._agreement(text, self.model.image_embedding(pooled))

    def answer(self, images: ImageInput | Sequence[ImageInput], question: str, *, max_new_tokens: int = 48,
               seed: int | None = 0) -> AnswerResult:
        """Answer a question about the pictures in a sentence or two (an AnswerResult), not a story; see
        `mmstory.answering`."""
        start = time.perf_counter()
        question = check_answer_request(question, max_new_tokens, seed, self.filter)  # before any model work
        pil_images = self._load_images(images)
        with self._lock:
            seen = self._see(pil_images)
            return answer_question(self.model, seen, question, self._decode, self.filter,
                                   max_new_tokens=max_new_tokens, seed=seed, start=start)


@torch.no_grad()
def sentence_scores(model: StoryModel, story: str, image_embeds: torch.Tensor) -> list[SentenceScore]:
    """Each sentence with the picture it agrees with best (the demo shows which sentence tells which picture)."""
    sentences = split_sentences(story, keep_closers=True)
    if not sentences:
        return []
    sims = similarity(model.text_embedding(sentences), image_embeds)  # [S, I]
    best, index = sims.max(dim=1)
    return [SentenceScore(s, round(float(b), 4), int(i)) for s, b, i in zip(sentences, best, index)]


def sampling_kwargs(settings: Decoding, embeds: torch.Tensor, rows: int, max_new: int, min_new: int,
                    pad_token_id: int | None, stopping: StoppingCriteriaList) -> dict:
    """`generate` keywords for `rows` candidates from one prompt (beam search returns its candidates itself)."""
    return dict(
        inputs_embeds=embeds.expand(rows, -1, -1),
        attention_mask=torch.ones(rows, embeds.shape[1], dtype=torch.long, device=embeds.device),
        max_new_tokens=max_new, min_new_tokens=max(0, min_new),
        do_sample=settings.do_sample and settings.num_beams == 1,
        temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
        repetition_penalty=settings.repetition_penalty, no_repeat_ngram_size=settings.no_repeat_ngram_size,
        num_beams=settings.num_beams,
        num_return_sequences=settings.num_candidates if settings.num_beams > 1 else 1,
        pad_token_id=pad_token_id, stopping_criteria=stopping,
    )


def token_limits(max_new_tokens: int | None, budget: int, opening: str, prompt_len: int, context: int
                 ) -> tuple[int, int, int]:
    """(max_new_tokens, min_new_tokens, the words the writer adds after `opening`) for a story of `budget` words;
    StoryInputError when the prompt leaves the writer's context no room."""
    if prompt_len >= context - 16:
        raise StoryInputError(f"the request is too long for the story writer's context ({prompt_len} of {context} "
                              "tokens before the story starts); shorten the prompt or the previous story")
    max_new = min(max_new_tokens or int(budget * TOKENS_PER_WORD * 1.4) + 24, context - prompt_len)
    to_write = max(budget - len(opening.split()), 1)
    return max_new, min(int(to_write * MIN_STORY_SHARE * TOKENS_PER_WORD), max_new - 1), to_write


def _streamed(decode, gen_kwargs: dict, tokenizer, budget: int, cancel: threading.Event, timings: dict,
              start: float, opening: str = "", lines: bool = False) -> Generator[str, None, tuple[list[str], str]]:
    """Decode one candidate in a worker thread, yielding the story's settled part as it grows (from `opening`, the
    text the prompt already ends with); returns (the raw texts, the text yielded so far). The decode is cancelled
    and joined however the consumer stops."""
    streamer = TextIteratorStreamer(tokenizer, skip_special_tokens=True)
    errors: list[BaseException] = []

    def work():
        try:
            with torch.no_grad():
                decode(**gen_kwargs, streamer=streamer)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)
            streamer.end()

    worker = threading.Thread(target=work, daemon=True, name="mmstory-decode")
    worker.start()
    pieces: list[str] = [opening]
    emitted = ""
    try:
        for piece in streamer:
            if "first_token_s" not in timings and piece:
                timings["first_token_s"] = time.perf_counter() - start
            pieces.append(piece)
            safe = settled_text("".join(pieces), budget, lines)
            if len(safe) > len(emitted):
                chunk, emitted = safe[len(emitted):], safe
                yield chunk
    finally:  # also when the consumer stops early: stop decoding before the lock is released
        cancel.set()
        worker.join()
    if errors:
        raise errors[0]
    return ["".join(pieces)], emitted


class WordBudget(StoppingCriteria):
    """Stop a sequence once it has met its word budget at a sentence end, or run past 130% of it (then trimmed)."""

    def __init__(self, tokenizer, budget: int):
        self.tokenizer, self.budget = tokenizer, budget

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        done = []
        for text in texts:
            words = len(text.split())
            stripped = text.rstrip()
            at_end = bool(ENDS_SENTENCE.search(stripped)) and text.endswith(stripped)
            done.append(words >= self.budget * 1.3 or (words >= self.budget * 0.95 and at_end))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Cancelled(StoppingCriteria):
    """Stop every sequence once the event is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
