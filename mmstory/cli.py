"""`mmstory` command line: a thin layer over StoryTeller and the training, evaluation and serving entry points."""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import sys
import warnings
from pathlib import Path

SUBMODULE_COMMANDS = {
    # command -> (module, help); each module exposes main(argv) with its own argument parser
    "train": ("mmstory.train.trainer", "train or fine-tune a model from a YAML config"),
    "eval": ("mmstory.eval.evaluate", "evaluate captioning, retrieval and stories; write a JSON report"),
    "demo": ("mmstory.serve.app", "launch the Gradio demo"),
    "serve": ("mmstory.serve.app", "launch the demo plus the JSON API (POST /api/story, /api/answer)"),
    "bench": ("mmstory.eval.benchmark", "measure decode speed, latency and training throughput"),
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
    _add_decoding_args(p)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--quantize", default="int4", choices=["none", "int8", "int4"],
                       help="story-writer weights in decode steps: int4 is the packaged SmolLM2's own Q4_1 "
                            "precision and the fastest; none keeps the loaded bf16/float32 weights")
    _add_device_arg(p)
    p.add_argument("--stream", action="store_true", help="print the story as it is written")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")


def _add_decoding_args(p: argparse.ArgumentParser) -> None:
    """One flag per `Decoding` field, with its default: the one source of the decoding knobs (serving's schema and
    the demo's controls read it too). A bool field gets --name/--no-name."""
    import dataclasses
    from typing import get_type_hints

    from mmstory.generation import Decoding
    from mmstory.limits import DECODING_LIMITS

    hints = get_type_hints(Decoding)
    for field in dataclasses.fields(Decoding):
        flag, hint = "--" + field.name.replace("_", "-"), hints[field.name]
        kind = next((t for t in (bool, int, float) if hint is t or t in getattr(hint, "__args__", ())), str)
        default = "from the length" if field.name == "max_new_tokens" else field.default
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default,
                           help=f"default: {field.default}")
        else:
            limit = DECODING_LIMITS.get(field.name)
            allowed = f"{limit.describe()}; " if limit else ""
            p.add_argument(flag, type=kind, default=field.default, help=f"{allowed}default: {default}")


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    from mmstory.devices import DEVICE_HELP

    p.add_argument("--device", default="auto", help=DEVICE_HELP + " (default: auto); checked before the model loads")


class CLIInputError(ValueError):
    """A command-line input that is wrong as given; reported as one line on stderr with exit code 2."""


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")  # what `mmstory caption DIR` picks up


def _load_teller(args: argparse.Namespace, device):
    from mmstory.generation import StoryTeller

    return StoryTeller.from_pretrained(args.model, device=device, dtype=args.dtype,
                                       quantize=None if args.quantize == "none" else args.quantize)


def _fail(err: Exception | str) -> int:
    print(f"mmstory: {err}", file=sys.stderr)
    return 2


def _check_file(path: str | os.PathLike) -> Path:
    """The path as a Path when it is an existing regular file; else ImageError saying what it is instead."""
    from mmstory.images import ImageError

    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image file (give the image files inside it; "
                         "`mmstory caption` takes a directory)")
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise ImageError(f"{path}: cannot read the file (permission denied)")
    return path


def _probe_image(path: str | os.PathLike) -> None:
    """A cheap check that `path` is a readable image: file checks, then PIL's header parse and verify() (no pixel
    decoding). Raises ImageError with the reason; a file this passes can still turn out truncated when decoded."""
    from PIL import Image, UnidentifiedImageError

    from mmstory.images import MAX_PIXELS, ImageError, check_size, too_large

    path = _check_file(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: the file is empty")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                check_size(image, MAX_PIXELS, str(path))
                image.verify()
    except ImageError:
        raise
    except UnidentifiedImageError as err:
        raise ImageError(f"{path}: not a readable image (unknown or unsupported format)") from err
    except PermissionError as err:
        raise ImageError(f"{path}: cannot read the file (permission denied)") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise too_large(err, str(path), MAX_PIXELS) from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(f"{path}: not a readable image ({err})") from err


def _images(args: argparse.Namespace) -> list:
    """The story's/answer's images, decoded now: a missing, unreadable or surplus image fails before the model loads
    (StoryInputError or ImageError)."""
    from mmstory.examples import example_image
    from mmstory.generation import MAX_IMAGES, StoryInputError
    from mmstory.images import load_image

    count = len(args.images) + len(args.example)
    if not count:
        raise StoryInputError("no image given: give at least one image file or --example NAME")
    if count > MAX_IMAGES:
        raise StoryInputError(f"too many images ({count}); at most {MAX_IMAGES} per story or answer")
    images = [load_image(_check_file(path)) for path in args.images]
    for name in args.example:
        try:
            images.append(example_image(name))
        except KeyError as err:
            raise StoryInputError(err.args[0]) from err
    return images


def _device(args: argparse.Namespace):
    """--device resolved and checked against this machine (DeviceError before anything loads)."""
    from mmstory.devices import resolve_device

    return resolve_device(args.device)


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
    from mmstory.devices import DeviceError
    from mmstory.generation import StoryInputError
    from mmstory.images import ImageError

    try:
        question = check_question(question)
        if not 1 <= max_new_tokens <= MAX_ANSWER_TOKENS:
            raise StoryInputError(f"--max-new-tokens for an answer must be between 1 and {MAX_ANSWER_TOKENS}")
        images = _images(args)
        device = _device(args)
    except (StoryInputError, ImageError, DeviceError) as err:
        return _fail(err)
    teller = _load_teller(args, device)
    try:
        result = teller.answer(images, question, max_new_tokens=max_new_tokens, seed=args.seed)
    except StoryInputError as err:
        print(f"mmstory: {err}", file=sys.stderr)
        return 2
    _print_answer(result, args.json)
    return 0


def cmd_answer(args: argparse.Namespace) -> int:
    """`mmstory answer IMAGE... QUESTION` or `mmstory answer IMAGE... -q QUESTION`."""
    question = args.question
    if question is None:
        if not args.images:
            return _fail("give a question: mmstory answer IMAGE [IMAGE ...] 'QUESTION' (or -q 'QUESTION')")
        question = args.images.pop()
        if Path(question).suffix.lower() in IMAGE_SUFFIXES or Path(question).is_file():
            return _fail(f"{question!r} looks like an image, not a question: give the question after the images "
                         "(mmstory answer IMAGE 'QUESTION') or with -q")
    return _answer(args, question, args.max_new_tokens)


def _length(text: str | None) -> str | int:
    from mmstory.generation import DEFAULT_LENGTH

    if text is None:
        return DEFAULT_LENGTH
    return int(text) if text.isdigit() else text


def _check_story_args(args: argparse.Namespace) -> dict:
    """Every story setting checked by `StoryRequest.parse`, as StoryTeller checks it, but without a model:
    StoryInputError or ValueError."""
    import dataclasses

    from mmstory.generation import Decoding, StoryInputError, StoryRequest
    from mmstory.safety import ContentFilter

    previous = None
    if args.previous:
        path = Path(args.previous)
        if path.is_dir():
            raise StoryInputError(f"--continue-from {path}: is a directory, not a text file")
        try:
            previous = path.read_text(encoding="utf-8")
        except FileNotFoundError as err:
            raise StoryInputError(f"--continue-from {path}: no such file") from err
        except (OSError, UnicodeDecodeError) as err:
            raise StoryInputError(f"--continue-from {path}: cannot read it as text ({err})") from err
    length = _length(args.length)
    decoding = {field.name: getattr(args, field.name) for field in dataclasses.fields(Decoding)
                if field.name != "num_candidates"}
    StoryRequest.parse(args.prompt, args.style, args.tone, args.audience, length, previous,
                       {**decoding, "num_candidates": 1 if args.stream else args.num_candidates}, args.stream,
                       ContentFilter())
    return dict(prompt=args.prompt, style=args.style, tone=args.tone, audience=args.audience, length=length,
                previous=previous, **decoding)


def cmd_story(args: argparse.Namespace) -> int:
    from mmstory.answering import is_question
    from mmstory.devices import DeviceError
    from mmstory.generation import StoryInputError
    from mmstory.images import ImageError

    if is_question(args.prompt):  # "what is the dog doing?" asks for an answer, not a story
        return _answer(args, args.prompt, args.max_new_tokens or 48)
    try:  # everything that can be wrong with the request fails here, before the model loads
        images = _images(args)
        kwargs = _check_story_args(args)
        device = _device(args)
    except (StoryInputError, ImageError, DeviceError) as err:
        return _fail(err)
    teller = _load_teller(args, device)
    try:
        if args.stream:
            for event in teller.stream_result(images, num_candidates=1, **kwargs):
                if isinstance(event, str):
                    print(event, end="", flush=True)
                else:
                    result = event
            print()
        else:
            result = teller.generate_story(images, num_candidates=args.num_candidates, **kwargs)
    except StoryInputError as err:
        return _fail(err)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif not args.stream:
        for i, caption in enumerate(result.captions):
            print(f"[picture {i + 1}] {caption}", file=sys.stderr)
        print(result.story)
    if result.notice:
        print(f"mmstory: {result.notice}", file=sys.stderr)
    return 0


def _expand_caption_inputs(inputs: list[str], recursive: bool) -> tuple[list[str], list[tuple[str, str]]]:
    """Files, directories (their image files by extension, sorted; subfolders with `recursive`) and globs, in the
    order given and without repeats; returns (candidate files, [(input, why it gave nothing)])."""
    files: list[str] = []
    problems: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in (path.rglob("*") if recursive else path.iterdir())
                           if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                problems.append((item, f"no image files ({', '.join(s[1:] for s in IMAGE_SUFFIXES)}) in this "
                                       f"directory{' or below it' if recursive else ' (--recursive looks below it)'}"))
            files += [str(p) for p in found]
        elif path.exists() or not glob.has_magic(item):
            files.append(str(path))  # a missing or odd path is reported by the probe, with the others
        else:
            matches = sorted(str(Path(m)) for m in glob.glob(item, recursive=recursive) if not Path(m).is_dir())
            if not matches:
                problems.append((item, "no file matches this pattern"))
            files += matches
    return list(dict.fromkeys(files)), problems


def _skip(label: str, reason: str, bar=None) -> None:
    line = f"mmstory: skipped {label}: {reason}"
    if bar is not None:
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr)


def cmd_caption(args: argparse.Namespace) -> int:
    """Caption files, directories and globs in batches; unreadable images are skipped and counted, not fatal."""
    from tqdm import tqdm

    from mmstory.data import skip_reason
    from mmstory.devices import DeviceError
    from mmstory.examples import example_image
    from mmstory.generation import StoryInputError, StoryTeller
    from mmstory.images import ImageError, load_image
    from mmstory.limits import CAPTION_BATCH_SIZE, CAPTION_BEAMS

    if not args.images and not args.example:
        return _fail("no image given: give at least one image file, directory, glob or --example NAME")
    try:
        CAPTION_BATCH_SIZE.check("--batch-size", args.batch_size)
        if args.num_beams is not None:
            CAPTION_BEAMS.check("--num-beams", args.num_beams)
        if args.out is not None and Path(args.out).is_dir():
            raise StoryInputError(f"--out {args.out}: is a directory; give a file name such as captions.jsonl")
        examples = []
        for name in args.example:
            try:
                examples.append((f"example:{name}", example_image(name)))
            except KeyError as err:
                raise StoryInputError(err.args[0]) from err
        device = _device(args)
    except (StoryInputError, DeviceError) as err:
        return _fail(err)

    # check every input before the model loads: missing and unreadable files are skipped, one line each
    files, problems = _expand_caption_inputs(args.images, args.recursive)
    skipped = 0
    for item, reason in problems:
        _skip(item, reason)
        skipped += 1
    todo: list[tuple[str, object]] = []
    for path in files:
        try:
            _probe_image(path)
            todo.append((path, path))
        except ImageError as err:
            _skip(path, skip_reason(err, Path(path)))
            skipped += 1
    todo += examples
    if not todo:
        print(f"mmstory: captioned 0 images, skipped {skipped} unreadable", file=sys.stderr)
        return 2

    teller = StoryTeller.from_pretrained(args.model, device=device)
    out = Path(args.out) if args.out else None
    tmp = out.with_name(out.name + ".tmp") if out else None
    sink = tmp.open("w", encoding="utf-8") if tmp else sys.stdout
    captioned = 0
    bar = tqdm(total=len(todo), desc="captioning", unit="img", file=sys.stderr, dynamic_ncols=True)
    try:
        for start in range(0, len(todo), args.batch_size):
            labels, images = [], []
            for label, source in todo[start: start + args.batch_size]:
                try:
                    images.append(load_image(source))  # the full decode: truncated files show up here
                    labels.append(label)
                except ImageError as err:
                    _skip(label, skip_reason(err, Path(label)), bar)
                    skipped += 1
            if images:
                try:
                    captions = teller.caption(images, num_beams=args.num_beams, batch_size=len(images))
                except StoryInputError:  # not expected for decoded images; then find the culprit one by one
                    captions, kept = [], []
                    for label, image in zip(labels, images):
                        try:
                            captions += teller.caption([image], num_beams=args.num_beams, batch_size=1)
                            kept.append(label)
                        except StoryInputError as err:
                            _skip(label, str(err), bar)
                            skipped += 1
                    labels = kept
                for label, caption in zip(labels, captions):
                    if out:
                        sink.write(json.dumps({"image": label, "caption": caption}, ensure_ascii=False) + "\n")
                    else:
                        sink.write(f"{label}\t{caption}\n")
                captioned += len(captions)
                sink.flush()
            bar.update(min(args.batch_size, len(todo) - start))
    except BaseException:
        bar.close()
        if tmp:
            sink.close()
            print(f"mmstory: stopped after {captioned} captions; they are in {tmp}", file=sys.stderr)
        raise
    bar.close()
    if tmp:
        sink.close()
        if captioned:
            os.replace(tmp, out)
        else:
            tmp.unlink()
    wrote = f"; wrote {out}" if out and captioned else ""
    print(f"mmstory: captioned {captioned} images, skipped {skipped} unreadable{wrote}", file=sys.stderr)
    return 0 if captioned else 2


def cmd_examples(args: argparse.Namespace) -> int:
    from mmstory.examples import write_examples

    for path in write_examples(args.out):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of `story`, `answer`, `caption` and `examples`; the other commands parse their own arguments."""
    parser = argparse.ArgumentParser(prog="mmstory", description="Image-to-story models: generate, train, serve.")
    sub = parser.add_subparsers(dest="command", required=True)
    story = sub.add_parser("story", help="write a story about one or more images (a question prompt is answered)")
    _add_story_args(story)
    story.set_defaults(func=cmd_story)
    answer = sub.add_parser(
        "answer", help="answer a question about one or more images",
        description="Answer a question about the pictures in a sentence or two, from their captions and visual "
                    "prefixes (greedy decoding: the same question gets the same answer). "
                    "Example: mmstory answer dog.jpg 'what is the dog doing?' (or -q 'what is the dog doing?'). "
                    "`mmstory story IMAGE --prompt 'what is the dog doing?'` answers the same way.")
    answer.add_argument("images", nargs="*", help="image files, then the question (unless -q gives it)")
    answer.add_argument("-q", "--question", default=None, help="the question, e.g. 'what is the dog doing?'")
    answer.add_argument("--example", action="append", default=[],
                        help="use a bundled example photo (chelsea, coffee, astronaut, rocket, motorcycle)")
    answer.add_argument("--model", default="mmstory-small", help="packaged name, directory or hub id")
    answer.add_argument("--max-new-tokens", type=int, default=48, help="longest answer, in tokens (1-256)")
    answer.add_argument("--seed", type=int, default=0)
    answer.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    answer.add_argument("--quantize", default="int4", choices=["none", "int8", "int4"],
                        help="story-writer weights in decode steps (as for `mmstory story`)")
    _add_device_arg(answer)
    answer.add_argument("--json", action="store_true", help="print the full AnswerResult as JSON")
    answer.set_defaults(func=cmd_answer)
    caption = sub.add_parser(
        "caption", help="caption images, directories or globs (one JSON line per image with --out)",
        description="Caption image files, the images in directories (jpg jpeg png webp bmp gif, sorted) and globs, "
                    "--batch-size at a time. Unreadable files are skipped, one stderr line each, and counted. "
                    "Example: mmstory caption photos/ --out captions.jsonl")
    caption.add_argument("images", nargs="*", help="image files, directories or glob patterns")
    caption.add_argument("--example", action="append", default=[])
    caption.add_argument("--model", default="mmstory-small")
    from mmstory.generation import CAPTION_BATCH
    from mmstory.limits import CAPTION_BATCH_SIZE, CAPTION_BEAMS

    caption.add_argument("--num-beams", type=int, default=None,
                         help=f"{CAPTION_BEAMS.describe()}; default: the generation config's caption_beams")
    caption.add_argument("--batch-size", type=int, default=CAPTION_BATCH,
                         help=f"images captioned at a time ({CAPTION_BATCH_SIZE.describe()})")
    caption.add_argument("--recursive", action="store_true", help="also take images in subdirectories (and ** globs)")
    caption.add_argument("--out", default=None,
                         help="write {\"image\", \"caption\"} JSON lines here (via OUT.tmp, renamed at the end); "
                              "default: print 'path<TAB>caption' lines")
    _add_device_arg(caption)
    caption.set_defaults(func=cmd_caption)
    examples = sub.add_parser("examples", help="write the bundled example photos to a folder")
    examples.add_argument("--out", default="examples")
    examples.set_defaults(func=cmd_examples)
    for name, (_, help_text) in SUBMODULE_COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBMODULE_COMMANDS:
        module = importlib.import_module(SUBMODULE_COMMANDS[argv[0]][0])
        return int(module.main(argv[1:] if argv[0] != "serve" and argv[0] != "demo" else argv) or 0)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
