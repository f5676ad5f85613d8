"""Questions about the pictures: an answer of a sentence or two instead of a story.

The answer is written by the same story writer from the same inputs a story uses (each picture's visual prefix and
caption), so what it can say is bounded by what the captioner saw; the prompt asks it to say so when the pictures do
not show what was asked.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from mmstory.model import StoryModel
from mmstory.prompts import IMAGE_PLACEHOLDER, MAX_PROMPT_CHARS, StoryInputError, _check_text
from mmstory.safety import ContentFilter
from mmstory.seeing import Seen, writer_prompt

MAX_ANSWER_SENTENCES = 2
MAX_ANSWER_TOKENS = 256
ANSWER_REPETITION_PENALTY = 1.1  # light: an answer often has to repeat the question's words

# a question starts with one of these (or ends with '?'): "what is the dog doing", "is it raining", "can you see".
# Not "will", "may", "have", "had": as first words of a story prompt they are as often a name, a month or an order.
QUESTION_WORDS = frozenset({
    "what", "whats", "who", "whom", "whose", "where", "when", "why", "how", "which",
    "is", "are", "was", "were", "isnt", "arent", "wasnt", "werent",
    "do", "does", "did", "dont", "doesnt", "didnt", "can", "could", "would", "should", "cant", "couldnt",
})
_FIRST_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_SENTENCE = re.compile(r".*?[.!?]+[\"'”’)\]]*(?=\s|$)", re.DOTALL)
_CLOSED = re.compile(r"[.!?]+[\"'”’)\]]*\s")  # a sentence end the writer has moved past
_LEAD_IN = re.compile(r"^(answer|a)\s*:\s*", re.IGNORECASE)


@dataclass
class AnswerResult:
    answer: str
    question: str
    captions: list[str]
    timings: dict = field(default_factory=dict)
    filtered: bool = False  # the content filter removed sentences from the answer
    notice: str | None = None

    def to_dict(self) -> dict:
        """The fields plus `"kind": "answer"`, so a client of the story endpoint can tell answers from stories."""
        return {"kind": "answer", **asdict(self)}

    def __str__(self) -> str:
        return self.answer


def is_question(text: str | None) -> bool:
    """Whether a free-form prompt asks about the pictures (so it gets an answer, not a story): it ends with '?' or
    starts with a question word or an auxiliary verb ("what ...", "is there ...", "does it ...")."""
    if not isinstance(text, str) or not text.strip():
        return False
    text = text.strip().lower().replace("’", "'")
    if text.endswith("?"):
        return True
    first = _FIRST_WORD.match(text)
    if not first:
        return False
    word = first.group()
    return word.replace("'", "") in QUESTION_WORDS or word.split("'")[0] in QUESTION_WORDS  # "what's", "don't"


def build_question_prompt(captions: Sequence[str], question: str, hints: Sequence[Sequence[str]] | None = None,
                          with_images: bool = True) -> str:
    """The user message: the pictures (visual prefixes), each with what it shows, then the question and how to answer.

    `hints`: per picture, the classifier's sure classes, which correct a caption that misses the main object. "It
    shows: espresso." is the form the packaged writer uses in its answers; the story prompt's "Also seen: espresso."
    it ignored on the example photos. It has to be told that "the photo does not show it" is an acceptable answer,
    or it invents one (a small writer still often does).
    """
    if not captions:
        raise ValueError("a question needs at least one picture's caption")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty")
    if hints is not None and len(hints) != len(captions):
        raise ValueError(f"{len(hints)} lists of hints for {len(captions)} captions")
    single = len(captions) == 1
    lines = [IMAGE_PLACEHOLDER * len(captions)] if with_images else []
    for i, caption in enumerate(captions):
        seen = [w for w in (hints[i] if hints else []) if w]
        name = "The photo" if single else f"Photo {i + 1}"
        lines.append(f"{name} shows: {_clause(caption)}." + (f" It shows: {', '.join(seen)}." if seen else ""))
    subject, shows, show = ("the photo", "shows", "does not") if single else ("the photos", "show", "do not")
    question = question.strip()
    lines += ["", f"Question: {question[0].upper() + question[1:]}",
              f"Answer in one or two short sentences, only from what {subject} {shows}. "
              f"If {subject} {show} show it, say so."]
    return "\n".join(lines)


def finish_answer(text: str, max_sentences: int = MAX_ANSWER_SENTENCES) -> str:
    """The first paragraph's first `max_sentences` whole sentences, without an "Answer:" lead-in.

    A reply cut off mid-sentence (token limit) keeps its whole sentences; with none, it is closed with a period so
    that the caller still gets what the writer said.
    """
    text = text.replace("\r", "").strip()
    text = _LEAD_IN.sub("", text).strip()
    text = text.split("\n\n")[0].split("\n")[0].strip() if text else ""
    if not text:
        return ""
    sentences = [m.group().strip() for m in _SENTENCE.finditer(text)]
    if sentences:
        return " ".join(sentences[:max_sentences])
    return text.rstrip(" \"'“”‘’,;:-") + "."


class AnswerStop(StoppingCriteria):
    """Stop a row once its new text holds `max_sentences` finished sentences or starts a new line after some text."""

    def __init__(self, tokenizer, max_sentences: int = MAX_ANSWER_SENTENCES):
        self.tokenizer, self.max_sentences = tokenizer, max_sentences

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = []
        for text in self.tokenizer.batch_decode(input_ids, skip_special_tokens=True):
            body = _LEAD_IN.sub("", text.lstrip())
            done.append(len(_CLOSED.findall(body)) >= self.max_sentences or "\n" in body.strip())
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _clause(caption: str) -> str:
    caption = caption.strip().rstrip(".")
    return caption or "something the captioner could not describe"


def check_question(question: object) -> str:
    """The question, stripped; StoryInputError when it is missing, empty, not text or over MAX_PROMPT_CHARS (so
    callers can refuse it before loading a model)."""
    if question is None or (isinstance(question, str) and not question.strip()):
        raise StoryInputError("the question is empty: ask something about the pictures")
    return _check_text(question, "question", limit=MAX_PROMPT_CHARS)


def check_answer_request(question: object, max_new_tokens: object, seed: object, content_filter: ContentFilter) -> str:
    """The question, stripped, once it and the settings pass every check (StoryInputError otherwise): callers run it
    before the model does anything."""
    question = check_question(question)
    verdict = content_filter.check(question)
    if verdict.blocked:
        raise StoryInputError(verdict.message)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
            not 1 <= max_new_tokens <= MAX_ANSWER_TOKENS:
        raise StoryInputError(f"max_new_tokens must be a whole number between 1 and {MAX_ANSWER_TOKENS}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise StoryInputError("seed must be between 0 and 2**63 - 1")
    return question


def answer_question(model: StoryModel, seen: Seen, question: str, decode: Callable[..., torch.Tensor],
                    content_filter: ContentFilter, *, max_new_tokens: int = 48, seed: int | None = 0,
                    start: float | None = None) -> AnswerResult:
    """`StoryTeller.answer` once the question is checked (`check_answer_request`) and the pictures seen: the story
    writer (`decode`, its `generate`) answers greedily (an answer should not change from one asking to the next).
    `seed` seeds torch's RNG first, as for stories; greedy decoding itself draws nothing from it."""
    start = time.perf_counter() if start is None else start
    timings = {"caption_s": seen.seconds}
    use_prefix = model.generation_config.story_prefix
    embeds = writer_prompt(model, seen, build_question_prompt(seen.captions, question, seen.hints,
                                                              with_images=use_prefix))
    context = getattr(model.writer.config, "max_position_embeddings", None) or 1 << 30
    if embeds.shape[1] >= context - 16:
        raise StoryInputError(f"the question is too long for the writer's context ({embeds.shape[1]} of "
                              f"{context} tokens before the answer starts); shorten it")
    if seed is not None:
        torch.manual_seed(seed)
    t = time.perf_counter()
    with torch.no_grad():
        out = decode(inputs_embeds=embeds, attention_mask=torch.ones(1, embeds.shape[1], dtype=torch.long),
                     max_new_tokens=min(max_new_tokens, context - embeds.shape[1]), do_sample=False,
                     repetition_penalty=ANSWER_REPETITION_PENALTY, pad_token_id=model.tokenizer.pad_token_id,
                     stopping_criteria=StoppingCriteriaList([AnswerStop(model.tokenizer)]))
    timings["generate_s"] = time.perf_counter() - t
    answer = finish_answer(model.tokenizer.batch_decode(out, skip_special_tokens=True)[0])
    verdict = content_filter.check(answer)  # the answer passes the same filter as a story
    if verdict.blocked:
        answer = content_filter.redact(answer)
    timings["total_s"] = time.perf_counter() - start
    return AnswerResult(answer=answer, question=question, captions=seen.captions, timings=timings,
                        filtered=verdict.blocked, notice=verdict.message or None)
