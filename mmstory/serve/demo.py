"""The Gradio demo page: pictures, story settings and the story with each sentence's best-matching picture."""

from __future__ import annotations

import random
from collections.abc import Iterator

try:  # the [serve] extra; only `mmstory demo` / `mmstory serve` import this module
    import gradio as gr
except ImportError as err:
    raise ImportError(f"the demo and the JSON API need the serve extra: pip install 'mmstory[serve]' ({err})") from err

from mmstory.answering import AnswerResult, is_question
from mmstory.examples import EXAMPLES, example_image
from mmstory.generation import Decoding, StoryRequest, StoryResult, StoryTeller
from mmstory.images import MAX_PIXELS, ImageError, load_images
from mmstory.limits import DECODING_LIMITS
from mmstory.prompts import AUDIENCES, DEFAULT_LENGTH, LENGTHS, MAX_PROMPT_CHARS, STYLES, TONES, StoryInputError

ANY = "any"  # the demo's "no preference" choice for style, tone and audience
DELETE_CACHE_S = 3600  # Gradio's uploads older than this are deleted, checked this often (0: never)


def _choice(value: str | None) -> str | None:
    return None if value in (None, "", ANY) else value


def _whole(value: float) -> int | float:
    """A control's whole number (Gradio sends 3.0) as an int; anything else as it came, for the checks to name."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _story_views(result: StoryResult, shown: str) -> tuple:
    """The demo's outputs for a finished story: text, grounding highlights, captions table, status, full JSON."""
    grounding = [(s.text + " ", s.grounding) for s in result.sentences]
    captions = [[i + 1, caption] for i, caption in enumerate(result.captions)]
    timing = result.timings
    status = (f"Done in {timing.get('total_s', 0):.1f} s (first words after {timing['first_token_s']:.1f} s)"
              if "first_token_s" in timing else f"Done in {timing.get('total_s', 0):.1f} s")
    status += f" · seed {result.settings.get('seed')} · image-text agreement {result.score:+.3f}"
    if result.notice:
        status = f"**{result.notice}**  \n{status}"
    return shown, grounding, captions, status, result.to_dict()


def _answer_views(result: AnswerResult) -> tuple:
    """The demo's outputs for an answer: the answer in the story box, no grounding, the captions, status, JSON."""
    captions = [[i + 1, caption] for i, caption in enumerate(result.captions)]
    status = f"Answered in {result.timings.get('total_s', 0):.1f} s (a question gets an answer, not a story)"
    if result.notice:
        status = f"**{result.notice}**  \n{status}"
    return result.answer, [], captions, status, result.to_dict()


def build_demo(teller: StoryTeller, max_pixels: int = MAX_PIXELS,
               delete_cache: tuple[int, int] | None = (DELETE_CACHE_S, DELETE_CACHE_S)) -> gr.Blocks:
    """The Gradio Blocks page; its main event is exposed to `gradio_client` as `/story`.

    `delete_cache`: Gradio's (frequency, age) in seconds: every `frequency` seconds the files this page's users
    uploaded that are older than `age` are deleted from Gradio's temp folder (the examples are kept); None: never.
    """

    def write(pictures: list | None, prompt: str, style: str, tone: str, audience: str, length: str,
              temperature: float, top_k: int, top_p: float, repetition_penalty: float, no_repeat_ngram_size: int,
              num_candidates: int, num_beams: int, seed: int | None, max_new_tokens: int, do_sample: bool,
              previous: str = "") -> Iterator[tuple]:
        """Stream the story (one candidate, no beams) or, with several candidates or beams, show the reranked best;
        a question in the prompt box gets its answer in the story box instead."""
        try:
            settings = dict(prompt=prompt or None, style=_choice(style), tone=_choice(tone),
                            audience=_choice(audience), length=length or DEFAULT_LENGTH, previous=previous or None,
                            temperature=temperature, top_k=_whole(top_k), top_p=top_p,
                            repetition_penalty=repetition_penalty, no_repeat_ngram_size=_whole(no_repeat_ngram_size),
                            num_candidates=_whole(num_candidates), num_beams=_whole(num_beams),
                            seed=None if seed is None else _whole(seed),
                            max_new_tokens=_whole(max_new_tokens) if max_new_tokens else None, do_sample=do_sample)
            if not is_question(prompt):  # every setting checked before any picture is decoded
                decoding = {key: settings[key] for key in Decoding.__dataclass_fields__}
                StoryRequest.parse(prompt or None, settings["style"], settings["tone"], settings["audience"],
                                   settings["length"], settings["previous"], decoding, False, teller.filter)
            paths = [path for path, _caption in pictures or []]
            images = load_images(paths, max_pixels, [f"picture {i + 1}" for i in range(len(paths))])
            if is_question(prompt):  # "what is the dog doing?": the answer replaces the story box, no streaming
                yield gr.skip(), None, None, "Reading the pictures…", gr.skip()
                yield _answer_views(teller.answer(images or None, prompt, seed=settings["seed"],
                                                  max_new_tokens=settings["max_new_tokens"] or 48))
                return
            head = previous.rstrip() + "\n\n" if previous and previous.strip() else ""
            yield head, None, None, "Reading the pictures…", gr.skip()
            if settings["num_candidates"] == 1 and settings["num_beams"] == 1:
                events = teller.stream_result(images or None, **settings)
            else:
                events = iter([teller.generate_story(images or None, **settings)])
            text = head
            for event in events:
                if isinstance(event, str):
                    text += event
                    yield text, gr.skip(), gr.skip(), "Writing…", gr.skip()
                else:
                    yield _story_views(event, head + event.story)
        except (StoryInputError, ImageError) as err:
            what = "answer this question" if is_question(prompt) else "write this story"
            yield gr.skip(), gr.skip(), gr.skip(), f"**Cannot {what}:** {err}", gr.skip()
            raise gr.Error(str(err)) from err

    with gr.Blocks(title="mmstory: stories from pictures", delete_cache=delete_cache) as demo:
        gr.Markdown("# mmstory\nUpload one picture or several (in story order), or pick an example, then press "
                    "**Write the story**. The captions and how well each sentence agrees with the pictures appear "
                    "under the story.")
        with gr.Row():
            with gr.Column(scale=1):
                pictures = gr.Gallery(label="Pictures, in story order", type="filepath", file_types=["image"],
                                      interactive=True, columns=4, height=260, elem_id="pictures")
                gr.Examples(examples=[[[example_image(name)]] for name in EXAMPLES], inputs=[pictures],
                            label="Examples (click one)", elem_id="examples")
                prompt = gr.Textbox("", label="Prompt (optional)", lines=2, max_length=MAX_PROMPT_CHARS,
                                    placeholder="what the story should be about, or a question about the pictures",
                                    info="a question (\"what is the dog doing?\") is answered instead of a story")
                with gr.Row():
                    style = gr.Dropdown([ANY, *STYLES], value=ANY, label="Style", allow_custom_value=True,
                                        info="or type 'custom: your own'")
                    tone = gr.Dropdown([ANY, *TONES], value=ANY, label="Tone")
                    audience = gr.Dropdown([ANY, *AUDIENCES], value=ANY, label="Audience")
                    length = gr.Dropdown(list(LENGTHS), value=DEFAULT_LENGTH, label="Length", allow_custom_value=True,
                                         info="or a number of words")
                defaults, limits = Decoding(), DECODING_LIMITS

                def slider(name: str, step: float, label: str, **kwargs) -> gr.Slider:
                    """A control spanning exactly the range `Decoding.validate` allows."""
                    value = kwargs.pop("value", getattr(defaults, name))
                    return gr.Slider(limits[name].low, limits[name].high, value=value, step=step, label=label,
                                     **kwargs)

                with gr.Accordion("Advanced decoding", open=False):
                    temperature = slider("temperature", 0.05, "Temperature")
                    top_k = slider("top_k", 1, "Top-k (0 = off)")
                    top_p = slider("top_p", 0.01, "Top-p")
                    repetition_penalty = slider("repetition_penalty", 0.05, "Repetition penalty")
                    no_repeat = slider("no_repeat_ngram_size", 1, "No-repeat n-gram size (0 = off)")
                    num_candidates = slider("num_candidates", 1, "Candidates", value=1,
                                            info="more than 1: rerank by image-text agreement (no streaming)")
                    num_beams = slider("num_beams", 1, "Beams", info="more than 1: no streaming")
                    # below the allowed 2**63 - 1: a browser's numbers are exact only up to 2**53
                    seed = gr.Number(value=defaults.seed, precision=0, minimum=0, maximum=2**32 - 1, label="Seed")
                    max_new_tokens = gr.Number(value=0, precision=0, minimum=0, maximum=limits["max_new_tokens"].high,
                                               label="Max new tokens (0: from the length)")
                    do_sample = gr.Checkbox(value=defaults.do_sample, label="Sample (off: greedy)")
                with gr.Row():
                    generate = gr.Button("Write the story", variant="primary", elem_id="generate")
                    new_version = gr.Button("New version", elem_id="new-version")
                    continue_button = gr.Button("Continue the story", elem_id="continue")
            with gr.Column(scale=1):
                story = gr.Textbox("", label="Story", lines=14, interactive=True, buttons=["copy"], elem_id="story")
                status = gr.Markdown(label="Status", elem_id="status")
                grounding = gr.HighlightedText(label="Grounding: agreement of each sentence with its best picture",
                                               show_legend=True, elem_id="grounding")
                captions = gr.Dataframe(headers=["picture", "caption"], datatype=["number", "str"],
                                        column_widths=["15%", "85%"], interactive=False, wrap=True,
                                        label="Captions", elem_id="captions")
                with gr.Accordion("Full result (JSON)", open=False):
                    details = gr.JSON(label="StoryResult")

        inputs = [pictures, prompt, style, tone, audience, length, temperature, top_k, top_p, repetition_penalty,
                  no_repeat, num_candidates, num_beams, seed, max_new_tokens, do_sample]
        outputs = [story, grounding, captions, status, details]
        shown = dict(show_progress_on=story)  # progress and errors on the story box, not over every output
        generate.click(write, inputs, outputs, api_name="story", **shown)
        continue_button.click(write, [*inputs, story], outputs, api_name="continue_story", **shown)
        new_version.click(lambda: random.randrange(2**32), None, seed, queue=False, api_visibility="private").then(
            write, inputs, outputs, api_visibility="private", **shown)
    return demo


