"""`mmstory bench`: story-decoding speed on the machine at hand, measured in one run, against its bounds and peers.

Everything is measured here, in this process (or in child processes it starts), so the ratios compare like with
like: memory read bandwidth (the bound for decoding, which reads every weight once per step), decode tokens/s at
batch 1 and at the candidate batch size for `transformers.generate` (KV cache, and without one, the reference),
`FastDecoder` with exact / int8 / int4 weights, open_clip's CoCa `generate` at the same non-embedding size, and
llama.cpp on the same GGUF when `llama_cpp` is installed; time to first token; whole stories from 1 and 3 images;
and process start to first token with a cold and a warm compile cache.

Timings on a shared machine are noisy: runs are interleaved and the best of `--repeats` is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from mmstory.generation import Decoding

_STORY = Decoding()  # StoryTeller's own defaults, so the benchmark samples as the product does
STORY_SAMPLING = dict(do_sample=_STORY.do_sample, temperature=_STORY.temperature, top_k=_STORY.top_k,
                      top_p=_STORY.top_p, repetition_penalty=_STORY.repetition_penalty,
                      no_repeat_ngram_size=_STORY.no_repeat_ngram_size)
PROMPT = "Write a short story (about 200 words) about this scene: a tabby cat sitting on a wooden boat at sunset."
QUANTIZE_NAMES = {"exact": None, "int8": "int8", "int4": "int4"}
LLAMA_CPP_HINT = "pip install llama-cpp-python==0.3.36  (builds from source, about 5 minutes on 2 cores)"
TARGETS = {"bound_ratio": 0.6, "llama_cpp_ratio": 0.8, "coca_ratio": 5.0, "first_token_s": 1.0, "start_to_first_s": 8.0}


# --- small helpers -------------------------------------------------------------------------------------------------
class _Clock:
    """A transformers streamer that only notes when each step's tokens arrive."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if value.numel():  # generate first puts the (empty) prompt
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _rates(start: float, times: list[float], batch: int, steps: int | None = None) -> dict:
    """Time to first token, decode rate after it (steps/s and tokens/s), and the whole run's tokens/s; `times` are
    when each step's tokens arrived (or, with `steps`, when pieces of the `steps` tokens did)."""
    steps = steps or len(times)
    decode = (steps - 1) / (times[-1] - times[0]) if steps > 1 else float("nan")
    return {"first_token_s": times[0] - start, "steps": steps, "steps_per_s": decode, "tokens_per_s": decode * batch,
            "overall_tokens_per_s": steps * batch / (times[-1] - start)}


def _best(runs: list[dict]) -> dict:
    """The fastest of repeated runs (on a busy machine the best is the least disturbed), with the spread."""
    best = max(runs, key=lambda r: r["steps_per_s"])
    return {**best, "runs": len(runs), "steps_per_s_all": [round(r["steps_per_s"], 2) for r in runs]}


def measure_bandwidth(threads: int, megabytes: int = 256, repeats: int = 10) -> dict:
    """Memory read bandwidth: the best sum over a tensor far larger than the caches, with all threads."""
    data = torch.ones(megabytes * 2**20 // 4)
    copy = torch.empty_like(data)
    best_sum = best_copy = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        data.sum()
        best_sum = min(best_sum, time.perf_counter() - t)
        t = time.perf_counter()
        copy.copy_(data)
        best_copy = min(best_copy, time.perf_counter() - t)
    return {"read_gb_s": data.nbytes / best_sum / 1e9, "copy_gb_s": 2 * data.nbytes / best_copy / 1e9,
            "megabytes": megabytes, "threads": threads}


def load_story_model():
    """mmstory-small as shipped (or its parts with an untrained bridge: the same speed)."""
    from mmstory import StoryModel, create_model
    from mmstory.registry import packaged_models

    if "mmstory-small" in packaged_models():
        return StoryModel.from_pretrained("mmstory-small"), "shipped"
    return create_model("mmstory-small").eval(), "untrained bridge"


@torch.no_grad()
def story_prompt(model, image) -> torch.Tensor:
    """The story writer's prompt: chat template with one image's visual prefix spliced in -> [1, L, D]."""
    from mmstory.images import ImageProcessor
    from mmstory.model import IMAGE_PLACEHOLDER

    pixels = ImageProcessor(model.vision.image_size, model.vision.mean, model.vision.std).batch([image])
    tokens, pooled = model.encode_image(pixels)
    prefix = model.visual_prefix(tokens, pooled)
    text = model.format_prompt(f"{IMAGE_PLACEHOLDER}\n{PROMPT}")
    return model.prompt_embeddings(text, [prefix[0]])[None]


# --- decoders ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def run_transformers(decoder, embeds: torch.Tensor, tokens: int, static: bool = False) -> dict:
    """`generate` with its default dynamic KV cache, or (`static`) its own static cache + torch.compile path."""
    extra = {}
    if static:
        from transformers import CompileConfig

        config = CompileConfig(mode="default")  # "reduce-overhead" means CUDA graphs
        config._compile_all_devices = True  # transformers compiles only on GPUs unless told so
        extra = {"cache_implementation": "static", "compile_config": config}
    clock = _Clock()
    torch.manual_seed(0)
    start = time.perf_counter()
    decoder.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                     max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0, streamer=clock, **STORY_SAMPLING,
                     **extra)
    return _rates(start, clock.times, embeds.shape[0])


@torch.no_grad()
def run_transformers_without_cache(decoder, embeds: torch.Tensor, tokens: int) -> dict:
    """The reference: every step runs the whole sequence through the model, with generate's own processors.

    (`generate` itself always keeps a cache when it is given `inputs_embeds`, so it cannot be the reference here.)
    """
    from transformers import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(STORY_SAMPLING["repetition_penalty"]),
        NoRepeatNGramLogitsProcessor(STORY_SAMPLING["no_repeat_ngram_size"]),
        MinNewTokensLengthLogitsProcessor(0, tokens, decoder.generation_config.eos_token_id),
        TemperatureLogitsWarper(STORY_SAMPLING["temperature"]), TopKLogitsWarper(STORY_SAMPLING["top_k"]),
        TopPLogitsWarper(STORY_SAMPLING["top_p"])])
    embed = decoder.get_input_embeddings()
    torch.manual_seed(0)
    generated = torch.empty(embeds.shape[0], 0, dtype=torch.long)
    times = []
    start = time.perf_counter()
    for _ in range(tokens):
        sequence = torch.cat([embeds, embed(generated)], dim=1)
        logits = decoder(inputs_embeds=sequence, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        probs = processors(generated, logits).softmax(dim=-1)
        generated = torch.cat([generated, torch.multinomial(probs, 1)], dim=1)
        times.append(time.perf_counter())
    return _rates(start, times, embeds.shape[0])


def run_fast(fast, embeds: torch.Tensor, tokens: int) -> dict:
    times = []
    start = time.perf_counter()
    for _ in fast.stream(embeds, max_new_tokens=tokens, min_new_tokens=tokens, seed=0, **STORY_SAMPLING):
        times.append(time.perf_counter())
    return _rates(start, times, embeds.shape[0])


def decode_table(decoder, embeds: torch.Tensor, args, bandwidth: float) -> tuple[list[dict], dict]:
    """Every implementation at batch 1 and at the candidate batch, interleaved, best of `repeats`."""
    from mmstory.decoding import FastDecoder

    fast, compile_s = {}, {}
    for name in args.formats:  # (also compiles, from the on-disk cache after the first time)
        t = time.perf_counter()
        fast[name] = FastDecoder(decoder, quantize=QUANTIZE_NAMES[name])
        fast[name].warmup(batch_sizes=(1, args.batch))
        compile_s[name] = time.perf_counter() - t
    runners: dict[str, Callable[[torch.Tensor, int], dict]] = {"transformers": lambda e, n: run_transformers(
        decoder, e, n)}
    if args.hf_static:
        for batch in (1, args.batch):  # compile outside the timed runs
            t = time.perf_counter()
            run_transformers(decoder, embeds.expand(batch, -1, -1), 3, static=True)
            compile_s[f"transformers-static-b{batch}"] = time.perf_counter() - t
        runners["transformers-static"] = lambda e, n: run_transformers(decoder, e, n, static=True)
    for name, fd in fast.items():
        runners[f"fast-{name}"] = lambda e, n, fd=fd: run_fast(fd, e, n)
    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.repeats):
        for name, run in runners.items():
            for batch in (1, args.batch):
                runs.setdefault((name, batch), []).append(run(embeds.expand(batch, -1, -1), args.tokens))
    if args.nocache_tokens:
        for batch in (1, args.batch):
            runs[("transformers-nocache", batch)] = [run_transformers_without_cache(
                decoder, embeds.expand(batch, -1, -1), args.nocache_tokens)]
    dense_bytes = (fast["exact"] if "exact" in fast else FastDecoder(decoder, compile=False)).weight_bytes
    rows = []
    for (name, batch), results in runs.items():
        best = _best(results)
        quant = name.removeprefix("fast-") if name.startswith("fast-") else "exact"
        weight_bytes = fast[quant].weight_bytes if name.startswith("fast-") else dense_bytes
        bound = bandwidth * 1e9 / weight_bytes  # steps/s if reading the weights were all a step did
        rows.append({"name": name, "batch": batch, **best, "weight_bytes": weight_bytes, "bound_steps_per_s": bound,
                     "bound_ratio": best["steps_per_s"] / bound, "dense_bound_ratio":
                         best["steps_per_s"] / (bandwidth * 1e9 / dense_bytes),
                     "tokens": args.nocache_tokens if "nocache" in name else args.tokens})
    for row in rows:
        base = next(r for r in rows if r["name"] == "transformers" and r["batch"] == row["batch"])
        row["x_transformers"] = row["tokens_per_s"] / base["tokens_per_s"]
    return rows, {"compile_and_warmup_s": compile_s, "fast": fast}


# --- peers ---------------------------------------------------------------------------------------------------------
def comparable_coca(context: int, layers: int = 9, width: int = 576):
    """A randomly initialised CoCa whose text tower + multimodal decoder have SmolLM2-135M's non-embedding size."""
    from open_clip.coca_model import CoCa

    heads = width // 64
    text = dict(context_length=context, vocab_size=49152, width=width, heads=heads, layers=layers, embed_cls=True,
                output_tokens=True)
    return CoCa(embed_dim=width, text_cfg=text, multimodal_cfg={**text, "embed_cls": False},
                vision_cfg=dict(image_size=224, layers=4, width=384, patch_size=32, attentional_pool=True,
                                attn_pooler_heads=8, output_tokens=True)).eval()


def coca_can_generate() -> bool:
    """open_clip (3.3) turns CoCa's `generate` off when its transformers imports fail, BeamSearchScorer among them."""
    try:
        from transformers.generation import BeamSearchScorer  # noqa: F401
    except ImportError:
        return False
    return True


@torch.no_grad()
def run_coca(tokens: int, generation_type: str) -> dict:
    if not coca_can_generate():
        return {"name": "open_clip CoCa", "skipped": "open_clip's CoCa.generate needs transformers' BeamSearchScorer, "
                "which this transformers (5+) no longer has"}
    torch.manual_seed(0)
    model = comparable_coca(tokens + 2).to(torch.bfloat16)  # bf16: faster than its fp32 default here
    params = sum(p.numel() for p in model.text.parameters()) + sum(p.numel() for p in model.text_decoder.parameters())
    image = torch.randn(1, 3, 224, 224, dtype=torch.bfloat16)
    start = time.perf_counter()
    out = model.generate(image, seq_len=tokens + 1, max_seq_len=tokens + 1, generation_type=generation_type,
                         top_k=STORY_SAMPLING["top_k"], top_p=STORY_SAMPLING["top_p"], sot_token_id=1, eos_token_id=2,
                         pad_token_id=0, fixed_output_length=True)
    elapsed = time.perf_counter() - start
    new = out.shape[1] - 1
    return {"name": f"open_clip CoCa generate ({generation_type})", "tokens": new, "seconds": elapsed,
            "overall_tokens_per_s": new / elapsed, "text_params_m": params / 1e6, "dtype": "bfloat16"}


def run_llama_cpp(tokens: int, threads: int, chat_prompt: str) -> dict:
    """llama.cpp on the same SmolLM2 GGUF (text prompt only: it cannot take the visual prefix)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"skipped": f"llama_cpp is not installed; to include it: {LLAMA_CPP_HINT}"}
    from mmstory.specs import PACKAGED

    llm = Llama(model_path=str(PACKAGED["smollm2-135m-instruct"].path()), n_threads=threads, n_ctx=1024,
                verbose=False, seed=0)
    times = []
    start = time.perf_counter()
    for _ in llm.create_completion(chat_prompt, max_tokens=tokens, stream=True,
                                   temperature=STORY_SAMPLING["temperature"], top_k=STORY_SAMPLING["top_k"],
                                   top_p=STORY_SAMPLING["top_p"], repeat_penalty=STORY_SAMPLING["repetition_penalty"],
                                   logit_bias={llm.token_eos(): -1e9}):
        times.append(time.perf_counter())  # a chunk per token, except where a character spans tokens
    # the end token is banned, so exactly `tokens` come out
    return {"name": f"llama.cpp (Q4_1 GGUF, {threads} threads)", **_rates(start, times, 1, steps=tokens)}


# --- whole stories and process start -------------------------------------------------------------------------------
def run_stories(teller, fast, images: list, words: int, repeats: int) -> list[dict]:
    """StoryTeller.generate_story end to end from 1 and from 3 images: decoding with plain `transformers.generate`,
    and with the FastDecoder StoryTeller uses (the benchmark's fastest weights)."""
    rows = []
    own = teller.fast
    try:
        for label, route in (("StoryTeller, transformers.generate", None),
                             (f"StoryTeller, FastDecoder {fast.quantize or 'exact'}", fast)):
            teller.fast = route
            for count in (1, len(images)):
                best = None
                for _ in range(repeats):
                    result = teller.generate_story(images[:count], length=words, seed=0)
                    if best is None or result.timings["total_s"] < best.timings["total_s"]:
                        best = result
                rows.append({"name": label, "images": count, "words": len(best.story.split()),
                             **{k: round(v, 3) for k, v in best.timings.items()}})
    finally:
        teller.fast = own
    return rows


CHILD_FLAG = "--child-first-token"


def child_first_token(quantize: str) -> int:
    """Run in a fresh process: import, load, build a story prompt from a photo, print when tokens come out."""
    marks = {"start": float(os.environ["MMSTORY_BENCH_T0"])}
    from mmstory.examples import example_image
    from mmstory.generation import StoryTeller

    marks["imported"] = time.time()
    teller = StoryTeller(load_story_model()[0], quantize=QUANTIZE_NAMES[quantize])  # as `mmstory story` loads it
    fast = teller.fast
    marks["loaded"] = time.time()
    embeds = story_prompt(teller.model, example_image("chelsea"))
    for i, _ in enumerate(fast.stream(embeds, max_new_tokens=20, min_new_tokens=20, seed=0, **STORY_SAMPLING)):
        if i == 0:
            marks["first_token"] = time.time()
        elif i == 1:
            marks["second_token"] = time.time()
    marks["twentieth_token"] = time.time()
    print(json.dumps(marks))
    return 0


def run_startup(quantize: str, threads: int) -> list[dict]:
    """Process start to first token, first with an empty compile cache, then again with the one it left."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmstory-bench-inductor-") as cache:
        for label in ("cold compile cache", "warm compile cache"):
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": str(threads),
                   "MMSTORY_BENCH_T0": repr(time.time())}
            done = subprocess.run([sys.executable, "-m", "mmstory.eval.benchmark", CHILD_FLAG, quantize], env=env,
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                rows.append({"name": label, "error": done.stderr.strip().splitlines()[-1:]})
                continue
            marks = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"name": label, **{k: v - marks["start"] for k, v in marks.items() if k != "start"}})
    return rows


# --- report --------------------------------------------------------------------------------------------------------
def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None or value != value else format(value, spec)


def print_report(report: dict) -> None:
    m = report["machine"]
    bw = report["bandwidth"]
    print(f"machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, transformers {m['transformers']}")
    print(f"memory read bandwidth: {bw['read_gb_s']:.1f} GB/s (sum over {bw['megabytes']} MB, {bw['threads']} "
          f"threads); copy {bw['copy_gb_s']:.1f} GB/s")
    print(f"\ndecode: {report['tokens']} new tokens, story sampling settings, best of {report['repeats']} "
          "interleaved runs; bound = bandwidth / weight bytes read per step")
    header = (f"{'implementation':<24}{'batch':>6}{'MB/step':>9}{'TTFT s':>8}{'step/s':>8}{'tok/s':>8}"
              f"{'bound':>7}{'%bound':>8}{'%bf16b':>8}{'x HF':>7}")
    print(header)
    print("-" * len(header))
    for r in report["decode"]:
        name = r["name"] + (f" ({r['tokens']} tok)" if "nocache" in r["name"] else "")
        print(f"{name:<24}{r['batch']:>6}{r['weight_bytes'] / 1e6:>9.0f}{_fmt(r['first_token_s'], '.2f'):>8}"
              f"{_fmt(r['steps_per_s']):>8}{_fmt(r['tokens_per_s']):>8}{_fmt(r['bound_steps_per_s'], '.0f'):>7}"
              f"{_fmt(100 * r['bound_ratio'], '.0f'):>7}%{_fmt(100 * r['dense_bound_ratio'], '.0f'):>7}%"
              f"{_fmt(r['x_transformers'], '.2f'):>7}")
    print("(%bound: against the bytes that row reads; %bf16b: against the bf16 weights' bytes)")
    compile_s = report.get("compile_and_warmup_s", {})
    if compile_s:
        print("construction + compile/warm-up: " + ", ".join(f"{k} {v:.1f}s" for k, v in compile_s.items()))
    peers = report.get("peers", [])
    if peers:
        print(f"\npeers ({report['peer_tokens']} new tokens from one prompt; whole-run tokens/s incl. first token)")
        for p in peers:
            if "skipped" in p:
                print(f"  {p['name']}: skipped ({p['skipped']})")
                continue
            extra = f", {p['text_params_m']:.0f}M text params, {p['dtype']}" if "text_params_m" in p else ""
            decode = f", decode {p['tokens_per_s']:.1f} tok/s" if "tokens_per_s" in p else ""
            print(f"  {p['name']}: {p['overall_tokens_per_s']:.1f} tok/s overall{decode}{extra}; "
                  f"FastDecoder {report['best_fast']} is {p['fast_ratio']:.1f}x")
    if report.get("stories"):
        print(f"\nstories ({report['story_words']} words, {report['batch']} candidates, best of "
              f"{report['story_repeats']})")
        for s in report["stories"]:
            parts = ", ".join(f"{k} {v:.2f}s" for k, v in s.items() if k.endswith("_s"))
            print(f"  {s['name']}, {s['images']} image(s): {s['words']} words; {parts}")
    if report.get("startup"):
        print(f"\nprocess start -> tokens (FastDecoder {report['best_fast']}, fresh processes)")
        for s in report["startup"]:
            if "error" in s:
                print(f"  {s['name']}: failed: {s['error']}")
                continue
            print(f"  {s['name']}: imported {s['imported']:.1f}s, loaded {s['loaded']:.1f}s, first token "
                  f"{s['first_token']:.1f}s, second {s['second_token']:.1f}s, 20th {s['twentieth_token']:.1f}s")
    print("\nspeed targets")
    for line in report["targets"]:
        print(f"  {line}")


def targets(report: dict) -> list[str]:
    """The speed targets (TARGETS) against this run's numbers, stated plainly."""
    lines = []
    fast = [r for r in report["decode"] if r["name"] == f"fast-{report['best_fast']}" and r["batch"] == 1]
    for r in report["decode"]:
        if r["name"] == "transformers-nocache":
            mine = next(f for f in report["decode"] if f["name"] == f"fast-{report['best_fast']}"
                        and f["batch"] == r["batch"])
            lines.append(f"vs transformers without a KV cache (the reference; {r['tokens']} tokens, batch "
                         f"{r['batch']}): {mine['tokens_per_s'] / r['tokens_per_s']:.1f}x tokens/s")
    if fast:
        r = fast[0]
        lines.append(f"decode >= {TARGETS['bound_ratio']:.0%} of bandwidth bound (fast-{report['best_fast']}): "
                     f"{r['bound_ratio']:.0%} of its own bytes' bound, {r['dense_bound_ratio']:.0%} of bf16's")
        lines.append(f"first token <= {TARGETS['first_token_s']} s after load: {r['first_token_s']:.2f} s "
                     f"(prompt of {report['prompt_tokens']} positions)")
    for p in report.get("peers", []):
        if "fast_ratio" in p and "llama" in p["name"]:
            lines.append(f">= {TARGETS['llama_cpp_ratio']}x llama.cpp tokens/s: {p['fast_ratio']:.2f}x")
        elif "fast_ratio" in p:
            lines.append(f">= {TARGETS['coca_ratio']}x CoCa generate tokens/s ({p['name']}): {p['fast_ratio']:.1f}x")
        elif "skipped" in p:
            lines.append(f"{p['name']} comparison: skipped ({p['skipped']})")
    for s in report.get("startup", []):
        if "first_token" in s:
            lines.append(f"process start to first token <= {TARGETS['start_to_first_s']} s ({s['name']}): "
                         f"{s['first_token']:.1f} s (second token {s['second_token']:.1f} s)")
    return lines


# --- main ----------------------------------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmstory bench", description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads (default: torch's)")
    p.add_argument("--tokens", type=int, default=200, help="new tokens per decode run")
    p.add_argument("--batch", type=int, default=3, help="the candidate batch size")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs per implementation; the best is kept")
    p.add_argument("--formats", default="exact,int8,int4", help="FastDecoder weights to measure: exact,int8,int4")
    p.add_argument("--nocache-tokens", type=int, default=200,
                   help="new tokens for transformers without a KV cache, the reference (minutes: its cost grows with "
                        "the square of the length; 0 skips)")
    p.add_argument("--hf-static", action="store_true",
                   help="also time transformers' own static cache + torch.compile generate (compiles ~1 minute)")
    p.add_argument("--peer-tokens", type=int, default=200, help="new tokens for CoCa and llama.cpp (0 skips them)")
    p.add_argument("--story-words", type=int, default=200, help="word budget of the end-to-end stories (0 skips)")
    p.add_argument("--no-startup", action="store_true", help="skip the process-start measurements")
    p.add_argument("--quick", action="store_true", help="a smoke run: 48 tokens, 1 repeat, short peers and stories")
    p.add_argument("--json", dest="json_path", default=None, help="also write every number to this JSON file")
    args = p.parse_args(list(argv) if argv is not None else None)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = set(args.formats) - set(QUANTIZE_NAMES)
    if unknown or not args.formats:
        p.error(f"--formats takes {', '.join(QUANTIZE_NAMES)}; got {sorted(unknown) or 'nothing'}")
    if args.quick:
        args.tokens, args.repeats = min(args.tokens, 48), 1
        args.nocache_tokens, args.peer_tokens = min(args.nocache_tokens, 8), min(args.peer_tokens, 48)
        args.story_words = min(args.story_words, 40) if args.story_words else 0  # (0 still skips)
    return args


def main(argv: Iterable[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [CHILD_FLAG]:
        return child_first_token(argv[1])
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)  # transformers' notes about inputs_embeds generation
    import transformers

    from mmstory.examples import example_image
    from mmstory.generation import StoryTeller

    report: dict = {"machine": {"cpu": _cpu_name(), "threads": args.threads, "torch": torch.__version__,
                                "transformers": transformers.__version__, "python": platform.python_version()},
                    "tokens": args.tokens, "repeats": args.repeats, "batch": args.batch}
    report["bandwidth"] = measure_bandwidth(args.threads)
    print(f"bandwidth {report['bandwidth']['read_gb_s']:.1f} GB/s; loading mmstory-small ...", flush=True)
    model, weights = load_story_model()
    teller = StoryTeller(model)  # bf16 decoder, as served
    report["story_model"] = weights
    images = [example_image(name) for name in ("chelsea", "coffee", "rocket")]
    embeds = story_prompt(model, images[0])
    report["prompt_tokens"] = embeds.shape[1]
    print(f"decoding ({args.tokens} tokens, batches 1 and {args.batch}) ...", flush=True)
    rows, extra = decode_table(model.writer, embeds, args, report["bandwidth"]["read_gb_s"])
    report["decode"] = rows
    report["compile_and_warmup_s"] = extra["compile_and_warmup_s"]
    fast_rows = [r for r in rows if r["name"].startswith("fast-") and r["batch"] == 1]
    best = max(fast_rows, key=lambda r: r["tokens_per_s"])
    report["best_fast"] = best["name"].removeprefix("fast-")
    fast = extra["fast"][report["best_fast"]]
    if args.peer_tokens:
        print(f"peers ({args.peer_tokens} tokens) ...", flush=True)
        mine = run_fast(fast, embeds, args.peer_tokens)
        chat = model.format_prompt(PROMPT)
        peers = [run_coca(args.peer_tokens, "top_p"), run_llama_cpp(args.peer_tokens, args.threads, chat)]
        for p in peers:
            if "skipped" in p:
                p.setdefault("name", "llama.cpp")
            elif "llama" in p["name"]:
                p["fast_ratio"] = mine["tokens_per_s"] / p["tokens_per_s"]  # decode rate against decode rate
            else:
                p["fast_ratio"] = mine["overall_tokens_per_s"] / p["overall_tokens_per_s"]
        report["peers"], report["peer_tokens"], report["fast_peer_run"] = peers, args.peer_tokens, mine
    if args.story_words:
        print(f"stories ({args.story_words} words) ...", flush=True)
        report["story_words"], report["story_repeats"] = args.story_words, 1 if args.quick else args.repeats
        report["stories"] = run_stories(teller, fast, images, args.story_words, report["story_repeats"])
    if not args.no_startup:
        print("process start to first token ...", flush=True)
        report["startup"] = run_startup(report["best_fast"], args.threads)
    report["targets"] = targets(report)
    print()
    print_report(report)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2, default=str))
        print(f"\nwrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
