"""`mmstory` command line: a thin layer over StoryTeller and the training, evaluation and serving entry points."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

SUBMODULE_COMMANDS = {
    # command -> (module, help); each module exposes main(argv) with its own argument parser
    "train": ("mmstory.train", "train or fine-tune a model from a YAML config"),
    "eval": ("mmstory.evaluation", "evaluate captioning, retrieval and stories; write a JSON report"),
    "demo": ("mmstory.serving", "launch the Gradio demo"),
    "serve": ("mmstory.serving", "launch the demo plus the JSON API (POST /api/story, /api/answer)"),
    "bench": ("mmstory.benchmark", "measure decode speed, latency and training throughput"),
    "fetch-weights": ("mmstory.weights", "install the packaged pretrained weights (pip --no-deps), unless installed"),
}


def _add_story_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", help="image files, in story order")
    p.add_argument("--example", action="append", default=[],
                   help="use a bundled example photo (chelsea, coffee, astronaut, rocket, motorcycle)")
    p.add_argument("--model", default="mmstory-small", help="packaged name, directory or hub id")
    p.add_argument("--prompt", default=None,
                   help="what the story should be about; a question about the pictures (ending with '?' or starting "
                        "with what/who/where/how/is/does/can/...) is answered in a sentence or two instead")
    p.add_argument("--style", default=None, help="adventure, fairy tale, humor, sci-fi, mystery, bedtime, ... "
                                                  "or 'custom: <your own>'")
    p.add_argument("--tone", default=None, choices=["positive", "neutral", "negative"])
    p.add_argument("--audience", default=None, choices=["children", "adults"])
    p.add_argument("--length", default=None, help="short (the default), medium, long, or a number of words")
    p.add_argument("--continue-from", dest="previous", default=None, help="a file with the story so far")
    from mmstory.generation import Decoding  # the one source of decoding defaults (serving's schema uses it too)

    defaults = Decoding()
    for name in ("temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size", "num_beams",
                 "num_candidates", "seed"):
        value = getattr(defaults, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--quantize", default="int4", choices=["none", "int8", "int4"],
                       help="story-writer weights in decode steps: int4 is the packaged SmolLM2's own Q4_1 "
                            "precision and the fastest; none keeps the loaded bf16/float32 weights")
    p.add_argument("--stream", action="store_true", help="print the story as it is written")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")


def _images(args: argparse.Namespace) -> list:
    from mmstory.examples import example_image

    images = list(args.images) + [example_image(name) for name in args.example]
    if not images:
        raise SystemExit("mmstory: give at least one image file or --example NAME")
    return images


def _print_answer(result, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for i, caption in enumerate(result.captions):
            print(f"[picture {i + 1}] {caption}", file=sys.stderr)
        print(result.answer)
    if result.notice:
        print(f"mmstory: {result.notice}", file=sys.stderr)


def _answer(args: argparse.Namespace, question: str, max_new_tokens: int) -> int:
    """Check the question and images, then load the model and answer: bad input fails before the model loads."""
    from mmstory.answering import MAX_ANSWER_TOKENS, check_question
    from mmstory.generation import MAX_IMAGES, StoryInputError, StoryTeller
    from mmstory.images import ImageError, load_image

    try:
        question = check_question(question)
        if not 1 <= max_new_tokens <= MAX_ANSWER_TOKENS:
            raise StoryInputError(f"--max-new-tokens for an answer must be between 1 and {MAX_ANSWER_TOKENS}")
        images = _images(args)
        if len(images) > MAX_IMAGES:
            raise StoryInputError(f"too many images ({len(images)}); at most {MAX_IMAGES}")
        images = [load_image(image) for image in images]
    except (StoryInputError, ImageError) as err:
        print(f"mmstory: {err}", file=sys.stderr)
        return 2
    teller = StoryTeller.from_pretrained(args.model, dtype=args.dtype,
                                         quantize=None if args.quantize == "none" else args.quantize)
    try:
        result = teller.answer(images, question, max_new_tokens=max_new_tokens, seed=args.seed)
    except StoryInputError as err:
        print(f"mmstory: {err}", file=sys.stderr)
        return 2
    _print_answer(result, args.json)
    return 0


def cmd_answer(args: argparse.Namespace) -> int:
    return _answer(args, args.question, args.max_new_tokens)


def _length(text: str | None) -> str | int:
    from mmstory.generation import DEFAULT_LENGTH

    if text is None:
        return DEFAULT_LENGTH
    return int(text) if text.isdigit() else text


def cmd_story(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mmstory.answering import is_question
    from mmstory.generation import StoryInputError, StoryTeller

    if is_question(args.prompt):  # "what is the dog doing?" asks for an answer, not a story
        return _answer(args, args.prompt, args.max_new_tokens or 48)
    teller = StoryTeller.from_pretrained(args.model, dtype=args.dtype,
                                         quantize=None if args.quantize == "none" else args.quantize)
    previous = Path(args.previous).read_text() if args.previous else None
    kwargs = dict(prompt=args.prompt, style=args.style, tone=args.tone, audience=args.audience,
                  length=_length(args.length), previous=previous,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                  num_beams=args.num_beams, seed=args.seed, max_new_tokens=args.max_new_tokens)
    try:
        if args.stream:
            for event in teller.stream_result(_images(args), num_candidates=1, **kwargs):
                if isinstance(event, str):
                    print(event, end="", flush=True)
                else:
                    result = event
            print()
        else:
            result = teller.generate_story(_images(args), num_candidates=args.num_candidates, **kwargs)
    except StoryInputError as err:
        print(f"mmstory: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif not args.stream:
        for i, caption in enumerate(result.captions):
            print(f"[picture {i + 1}] {caption}", file=sys.stderr)
        print(result.story)
    if result.notice:
        print(f"mmstory: {result.notice}", file=sys.stderr)
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from mmstory.generation import StoryInputError, StoryTeller

    teller = StoryTeller.from_pretrained(args.model)
    try:
        captions = teller.caption(_images(args), num_beams=args.num_beams)
    except StoryInputError as err:
        print(f"mmstory: {err}", file=sys.stderr)
        return 2
    for caption in captions:
        print(caption)
    return 0


def cmd_examples(args: argparse.Namespace) -> int:
    from mmstory.examples import write_examples

    for path in write_examples(args.out):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBMODULE_COMMANDS:
        module = importlib.import_module(SUBMODULE_COMMANDS[argv[0]][0])
        return int(module.main(argv[1:] if argv[0] != "serve" and argv[0] != "demo" else argv) or 0)

    parser = argparse.ArgumentParser(prog="mmstory", description="Image-to-story models: generate, train, serve.")
    sub = parser.add_subparsers(dest="command", required=True)
    story = sub.add_parser("story", help="write a story about one or more images (a question prompt is answered)")
    _add_story_args(story)
    story.set_defaults(func=cmd_story)
    answer = sub.add_parser(
        "answer", help="answer a question about one or more images",
        description="Answer a question about the pictures in a sentence or two, from their captions and visual "
                    "prefixes (greedy decoding: the same question gets the same answer). "
                    "Example: mmstory answer dog.jpg -q 'what is the dog doing?'. "
                    "`mmstory story IMAGE --prompt 'what is the dog doing?'` answers the same way.")
    answer.add_argument("images", nargs="*", help="image files")
    answer.add_argument("-q", "--question", required=True, help="the question, e.g. 'what is the dog doing?'")
    answer.add_argument("--example", action="append", default=[],
                        help="use a bundled example photo (chelsea, coffee, astronaut, rocket, motorcycle)")
    answer.add_argument("--model", default="mmstory-small", help="packaged name, directory or hub id")
    answer.add_argument("--max-new-tokens", type=int, default=48, help="longest answer, in tokens (1-256)")
    answer.add_argument("--seed", type=int, default=0)
    answer.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    answer.add_argument("--quantize", default="int4", choices=["none", "int8", "int4"],
                        help="story-writer weights in decode steps (as for `mmstory story`)")
    answer.add_argument("--json", action="store_true", help="print the full AnswerResult as JSON")
    answer.set_defaults(func=cmd_answer)
    caption = sub.add_parser("caption", help="caption images")
    caption.add_argument("images", nargs="*")
    caption.add_argument("--example", action="append", default=[])
    caption.add_argument("--model", default="mmstory-small")
    caption.add_argument("--num-beams", type=int, default=None, help="default: the model config's caption_beams")
    caption.set_defaults(func=cmd_caption)
    examples = sub.add_parser("examples", help="write the bundled example photos to a folder")
    examples.add_argument("--out", default="examples")
    examples.set_defaults(func=cmd_examples)
    for name, (_, help_text) in SUBMODULE_COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
