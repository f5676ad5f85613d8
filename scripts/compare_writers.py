"""Story writers side by side: the same captions and request, one story each, scored by the story benchmark.

    python scripts/compare_writers.py --images 48 --trained runs/writer_vist/best --out docs/writer-comparison.json

Every writer gets, per Flickr8k dev image, the message `StoryTeller` sends (`build_instruction`: the caption of
mmstory-small's caption decoder and the classifier's sure classes) and decodes one candidate with the default sampling
settings, so the table compares writers, not rerankers. Writers: SmolLM2-135M-Instruct as shipped (prompted), the
same with the LoRA adapters of --trained, and Gemma-3-270M-it prompted (`packaged:gemma3-270m`, when installed).
Decode speed is measured on the same stories: FastDecoder int4 where the writer is Llama-style, else transformers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import StoppingCriteriaList

from mmstory.captioning import CAPTION_REPETITION_PENALTY
from mmstory.data import open_image
from mmstory.decoding import FastDecoder
from mmstory.eval.evaluate import load_eval_records, try_load_judge
from mmstory.eval.story_benchmark import DEFAULT_DATA, markdown_table, score_variant
from mmstory.generation import TOKENS_PER_WORD, Decoding, StoryTeller, WordBudget, build_instruction
from mmstory.model import StoryModel
from mmstory.specs import PACKAGED, load_decoder
from mmstory.story_text import finish_story


def file_mb(path: Path) -> float:
    """Megabytes on disk: the writer's GGUF as its package ships it (bf16 adapters on top, where trained)."""
    return Path(path).stat().st_size / 1e6


# Gemma's turn format, as its Hugging Face tokenizer_config.json has it: the GGUF's tokenizer arrives without a template
GEMMA_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
                       "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
                       "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                       "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


class Writer:
    """A causal LM with its tokenizer, decoding the way StoryTeller does (FastDecoder int4 where it can)."""

    def __init__(self, name: str, decoder, tokenizer, size_mb: float):
        self.name, self.decoder, self.tokenizer, self.size_mb = name, decoder.eval(), tokenizer, size_mb
        self.decoder.to(torch.bfloat16)
        if getattr(tokenizer, "chat_template", None) is None and "gemma" in name.lower():
            tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
        turn_end = tokenizer.get_vocab().get("<end_of_turn>")
        self.stop_ids = [i for i in (tokenizer.eos_token_id, turn_end) if i is not None]
        try:
            self.fast, self.engine = FastDecoder(self.decoder, quantize="int4"), "FastDecoder int4"
        except ValueError:
            self.fast, self.engine = None, "transformers bf16"

    @torch.no_grad()
    def write(self, instruction: str, budget: int, seed: int) -> tuple[str, int, float]:
        """(story, new tokens, decode seconds) for one request."""
        tok, settings = self.tokenizer, Decoding()
        prompt = tok.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                         add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        embeds = self.decoder.get_input_embeddings()(ids)
        max_new = int(budget * TOKENS_PER_WORD * 1.4) + 24
        torch.manual_seed(seed)
        start = time.perf_counter()
        out = (self.fast or self.decoder).generate(
            inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
            min_new_tokens=int(budget * 0.8 * TOKENS_PER_WORD), do_sample=True, temperature=settings.temperature,
            top_k=settings.top_k, top_p=settings.top_p, repetition_penalty=settings.repetition_penalty,
            no_repeat_ngram_size=settings.no_repeat_ngram_size, pad_token_id=tok.pad_token_id or tok.eos_token_id,
            eos_token_id=self.stop_ids,
            stopping_criteria=StoppingCriteriaList([WordBudget(tok, budget)]))
        seconds = time.perf_counter() - start
        return finish_story(tok.decode(out[0], skip_special_tokens=True), budget), out.shape[1], seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--base", default="mmstory-small", help="the model whose captions every writer reads")
    parser.add_argument("--trained", default=None, help="a model directory whose writer has LoRA adapters")
    parser.add_argument("--gemma", default="packaged:gemma3-270m")
    parser.add_argument("--length", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    records = load_eval_records(args.data, split="dev", limit=args.images)

    teller = StoryTeller.from_pretrained(args.base)
    requests = []
    for record in records:
        tokens, pooled = teller._encode([open_image(record.image)])
        captions = teller.model.generate_captions(image_tokens=tokens, image_pooled=pooled,
                                                       repetition_penalty=CAPTION_REPETITION_PENALTY)
        hints = teller.model.sure_classes(pooled, teller.model.generation_config.caption_concepts)
        requests.append((captions, build_instruction(captions, None, None, None, None, args.length, None,
                                                     with_images=False, hints=hints)))
    print(f"captions for {len(records)} images", file=sys.stderr, flush=True)

    smol_mb = file_mb(PACKAGED["smollm2-135m-instruct"].path())
    writers = [lambda: Writer("SmolLM2-135M-Instruct, prompted", teller.model.writer, teller.model.tokenizer,
                              smol_mb)]
    if args.trained:
        def trained() -> Writer:
            model = StoryModel.from_pretrained(args.trained)
            adapters = sum(t.numel() * 2 for k, t in model.trained_state_dict().items() if "lora_" in k) / 1e6
            return Writer("SmolLM2-135M-Instruct + VIST LoRA", model.writer, model.tokenizer, smol_mb + adapters)
        writers.append(trained)

    def gemma() -> Writer:
        decoder, tokenizer = load_decoder(args.gemma)
        return Writer("Gemma-3-270M-it, prompted", decoder, tokenizer, file_mb(PACKAGED["gemma3-270m"].path()))
    writers.append(gemma)

    judge, note = try_load_judge()
    variants = []
    for build in writers:
        try:
            writer = build()
        except Exception as err:  # noqa: BLE001 - a writer that cannot load is reported, not fatal
            print(f"skipped a writer: {err}", file=sys.stderr)
            continue
        writer.write(requests[0][1], args.length, args.seed)  # warm-up (compilation) outside the timing
        stories, seconds, tokens, decode_s = [], [], 0, 0.0
        for i, (_captions, instruction) in enumerate(requests):
            story, new, took = writer.write(instruction, args.length, args.seed)
            stories.append(story)
            seconds.append(took)
            tokens, decode_s = tokens + new, decode_s + took
            print(f"[{writer.name}] {i + 1}/{len(requests)} {took:.1f} s", file=sys.stderr, flush=True)
        variants.append(score_variant(writer.name, records, stories, seconds, length=args.length, judge=judge,
                                      judge_note=note, seed=args.seed, captions=[c for c, _ in requests],
                                      extra={"engine": writer.engine, "tokens_per_s": tokens / decode_s,
                                             "size_mb": writer.size_mb}))
        print(f"[{writer.name}] {tokens / decode_s:.1f} tokens/s ({writer.engine})", file=sys.stderr, flush=True)
        if args.out:  # after each writer: a later one that fails loses nothing
            Path(args.out).write_text(json.dumps({"settings": vars(args), "variants": variants}, indent=1))
    print(markdown_table(variants))
    for v in variants:
        print(f"{v['name']}: {v['tokens_per_s']:.1f} tokens/s, {v['engine']}, {v['size_mb']:.0f} MB")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "variants": variants}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
