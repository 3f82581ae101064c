"""Make a sentence bank for one word with a local text-generation model.

pix2pix-zero's edit direction is the difference of the mean CLIP embeddings of two banks, so a bank
should be large (the authors used ~1000 GPT-3 sentences) and varied in everything but its word.
A few-shot prompt asks a causal language model for image captions, one per list item; the captions
that name the word, have a sensible length and are new are kept until `n` are collected.

    python -m datagen.make_bank --model PATH_OR_ID --word cat --n 1000 --out datagen/sentences/cat.txt
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from transformers import Pipeline, pipeline, set_seed

MIN_WORDS, MAX_WORDS = 4, 30

# The examples name another word so that no bank inherits their settings; the model continues the list.
FEW_SHOT_PROMPT = """Image captions, one per line, each mentioning "bicycle":
- a red bicycle leaning against a brick wall in the afternoon sun
- a close-up photo of a bicycle wheel on a wet cobblestone street
- an old bicycle with a wicker basket parked outside a bakery
- a black and white photograph of a bicycle on a foggy bridge at dawn
- a watercolor painting of a bicycle in a field of sunflowers

Image captions, one per line, each mentioning "{word}":
-"""

LIST_ITEM = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*(?P<caption>.+?)\s*$")


class MakeBankError(RuntimeError):
    """A problem the user can fix (model missing, model unable to write captions)."""


def captions_in(text: str, word: str) -> list[str]:
    """The list items of a generated `text` that name `word` and have MIN_WORDS..MAX_WORDS words.

    Only list items count: a continuation often runs past the list into a new heading, which names the
    word too but is no caption. The word must stand alone ("cat", not "category"), in any case.
    """
    names_word = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)
    captions = []
    for line in text.splitlines():
        item = LIST_ITEM.match(line)
        if item is None:
            continue
        caption = " ".join(item["caption"].split())
        if names_word.search(caption) and MIN_WORDS <= len(caption.split()) <= MAX_WORDS:
            captions.append(caption)
    return captions


def dedupe_key(caption: str) -> str:
    """Captions equal up to case and final punctuation give the same text embedding, nearly."""
    return caption.lower().rstrip(".!?")


def load_generator(model: str, device: str = "auto") -> Pipeline:
    """A sampling text-generation pipeline for a causal LM given by hub id or local folder."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return pipeline("text-generation", model=model, device=device)
    except OSError:
        raise MakeBankError(
            f"cannot find the model '{model}'. Without network access (HF_HUB_OFFLINE=1) pass --model a local "
            "folder holding a causal language model saved with save_pretrained (config.json, weights, tokenizer)."
        ) from None


def sample_continuations(generator: Pipeline, prompt: str, num: int, seed: int, max_new_tokens: int = 192) -> list[str]:
    """`num` sampled continuations of `prompt`, the same for the same seed."""
    set_seed(seed)
    outputs = generator(
        prompt,
        num_return_sequences=num,
        do_sample=True,
        temperature=0.9,
        top_p=0.95,
        max_new_tokens=max_new_tokens,
        return_full_text=False,
    )
    # The prompt ends inside a list item ("-"): put the marker back so the first caption is an item too.
    return ["-" + output["generated_text"] for output in outputs]


def make_bank(generator: Pipeline, word: str, n: int, seed: int = 0, batch_size: int = 16, max_batches: int = 1000) -> list[str]:
    """`n` distinct captions naming `word`, in the order sampled; batch `b` samples with seed `seed + b`."""
    prompt = FEW_SHOT_PROMPT.format(word=word)
    bank: dict[str, str] = {}
    for batch in range(max_batches):
        for text in sample_continuations(generator, prompt, batch_size, seed + batch):
            for caption in captions_in(text, word):
                bank.setdefault(dedupe_key(caption), caption)
                if len(bank) == n:
                    return list(bank.values())
    raise MakeBankError(
        f"only {len(bank)} of {n} usable captions for '{word}' after {max_batches} batches: "
        "the model rarely writes list items naming the word; try a larger or instruction-tuned model."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="hub id or local folder of a causal language model")
    parser.add_argument("--word", required=True, help='the word or phrase every caption names, e.g. "cat"')
    parser.add_argument("--n", type=int, default=1000, help="captions to collect")
    parser.add_argument("--out", type=Path, required=True, help="bank file to write, one caption per line")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="continuations sampled at once")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    args = parser.parse_args(argv)
    try:
        bank = make_bank(load_generator(args.model, args.device), args.word, args.n, args.seed, args.batch_size)
    except MakeBankError as err:
        raise SystemExit(f"make_bank: {err}") from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(bank) + "\n", encoding="utf-8")
    print(f"wrote {len(bank)} captions for '{args.word}' to {args.out}")


if __name__ == "__main__":
    main()
