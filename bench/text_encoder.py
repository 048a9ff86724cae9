"""Prompt encoding cost: T5Gemma over the whole padded prompt (what the official conditioner runs) against
`PromptConditioner.encode_tokens`, which runs each prompt's real tokens alone.

    python bench/text_encoder.py                          # real t5gemma-b-b-ul2 size, random weights, fp32
    python bench/text_encoder.py --tokens 8 30 120 --batch 4

Per real-token count: the best-of-N seconds for a batch of prompts of that many tokens, left-padded to max_length as
SA3's tokenizer pads them, both ways, and the largest difference of the real tokens' outputs (rounding only).
"""

from __future__ import annotations

import argparse

import torch
from adapter_layers import best_ms  # this folder's timing helper
from sa3_lora_studio.sa3.conditioners import PromptConditioner
from sa3_lora_studio.sa3.text import T5GemmaConfig, T5GemmaEncoder


def compare(encoder, conditioner, n: int, args) -> None:
    """Time a batch of n-token prompts both ways and print the line."""
    ids = torch.zeros(args.batch, args.max_length, dtype=torch.long)
    ids[:, args.max_length - n:] = torch.randint(3, encoder.config.vocab_size, (args.batch, n))
    mask = ids != 0
    with torch.inference_mode():
        whole = best_ms(lambda: encoder(ids, mask), args.repeats) / 1e3
        own = best_ms(lambda: conditioner.encode_tokens(ids, mask), args.repeats) / 1e3
        diff = (encoder(ids, mask)[mask] - conditioner.encode_tokens(ids, mask)[mask]).abs().max()
    print(f"  {n:4d} tokens: padded {whole:6.3f} s   real tokens only {own:6.3f} s   ({whole / own:4.1f}x)   "
          f"max |diff| {float(diff):.1e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8, 30, 120, 256])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoder = T5GemmaEncoder(T5GemmaConfig()).eval().requires_grad_(False)  # the real size, random weights
    conditioner = PromptConditioner(output_dim=encoder.config.hidden_size, max_length=args.max_length)
    conditioner.set_text_encoder(encoder, tokenizer="unused")  # token ids come ready-made: no tokenizer runs
    print(f"t5gemma-b-b-ul2 size, random weights, fp32, threads={torch.get_num_threads()}, batch={args.batch}, "
          f"max_length={args.max_length}", flush=True)
    for n in args.tokens:
        compare(encoder, conditioner, min(n, args.max_length), args)


if __name__ == "__main__":
    main()
