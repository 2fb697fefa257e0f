"""Tokens/s of sample.generate vs model.generate on the same model, prompts, n and settings, in one run.

python bench/sample_bench.py [--prompts 32 --n 5 --new 128 --min-prompt 96 --max-prompt 256 --dtype fp32]
                             [--compile default,reduce-overhead]

A Llama-architecture model of ~58M parameters (hidden 512, 8 layers, vocab 32000),
random weights; EOS is disabled so both generate exactly prompts x n x new tokens.
Prompt lengths are drawn uniformly in [min-prompt, max-prompt] (chat prompts of
UltraFeedback with a template are ~100-300 tokens). Greedy outputs are checked equal first.
--compile also times sample.generate with its decode step torch.compile'd in each
mode named (static cache, no compaction) and says whether its greedy tokens are
bitwise those of the eager step.
"""
import argparse
import os
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import sample  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=5)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--min-prompt", type=int, default=96)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--model", default=None, help="a local HF checkpoint (e.g. runs/cache/smollm2-135m-instruct) "
                                                 "instead of the random 58M Llama")
    p.add_argument("--compile", default="", help="comma-separated torch.compile modes for the decode step")
    args = p.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.model:
        model = LlamaForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                          pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg).to(args.device, dtype).eval()
    V = model.config.vocab_size
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    bos = model.config.bos_token_id if model.config.bos_token_id is not None else 1
    nparams = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(args.min_prompt, args.max_prompt + 1, (args.prompts,), generator=g).tolist()
    prompts = [[bos] + torch.randint(3, V, (L - 1,), generator=g).tolist() for L in lens]
    ids, mask = sample.left_pad(prompts, pad, args.device)
    print(f"model {nparams / 1e6:.1f}M params, {args.device} {args.dtype}, {args.prompts} prompts "
          f"(len {min(lens)}-{max(lens)}) x {args.n} samples x {args.new} new tokens, threads {torch.get_num_threads()}")

    # correctness first: greedy tokens identical on a few prompts
    ours = sample.generate(model, prompts[:4], n=1, max_new_tokens=16, temperature=0, eos_token_ids=[])
    with torch.no_grad():
        hf = model.generate(input_ids=ids[:4], attention_mask=mask[:4], do_sample=False, max_new_tokens=16,
                            pad_token_id=pad, eos_token_id=None)[:, ids.shape[1]:]
    assert torch.equal(ours.response_ids, hf.to(ours.response_ids.device)), "greedy outputs differ"
    print("greedy outputs identical to model.generate: yes")

    def ours_run():
        return sample.generate(model, prompts, n=args.n, max_new_tokens=args.new, temperature=args.temperature,
                               top_p=args.top_p, eos_token_ids=[], pad_token_id=pad,
                               generator=torch.Generator(args.device).manual_seed(0))

    def hf_run():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                                  top_p=args.top_p, top_k=0, num_return_sequences=args.n, max_new_tokens=args.new,
                                  min_new_tokens=args.new, pad_token_id=pad, eos_token_id=None)

    def timed(fn):
        """(fn's output, seconds), the device synchronised on both sides."""
        if args.device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if args.device != "cpu":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    tokens = args.prompts * args.n * args.new
    results = {}
    for name, fn in (("sample.generate", ours_run), ("model.generate", hf_run)):
        fn() if args.device != "cpu" else None  # warm-up on GPU only (CPU runs are long enough)
        out, dt = timed(fn)
        results[name] = tokens / dt
        shape = tuple(out.response_ids.shape) if name == "sample.generate" else tuple(out[:, ids.shape[1]:].shape)
        print(f"{name:>16}: {dt:7.2f} s  {tokens / dt:8.1f} tokens/s  output {shape}")
    print(f"ratio sample.generate / model.generate: {results['sample.generate'] / results['model.generate']:.2f}x (target >= 2x)")

    for mode in filter(None, args.compile.split(",")):
        step = torch.compile(model, mode=mode, dynamic=False)
        greedy = dict(n=1, max_new_tokens=32, temperature=0, eos_token_ids=[], pad_token_id=pad)
        same, first = timed(lambda: torch.equal(sample.generate(model, prompts, **greedy).response_ids,
                                                sample.generate(model, prompts, decode_step=step, **greedy).response_ids))

        def compiled_run():
            return sample.generate(model, prompts, n=args.n, max_new_tokens=args.new, temperature=args.temperature,
                                   top_p=args.top_p, eos_token_ids=[], pad_token_id=pad, decode_step=step,
                                   generator=torch.Generator(args.device).manual_seed(0))
        compiled_run()  # compiles for this batch size
        _, dt = timed(compiled_run)
        print(f"compiled decode ({mode}): {dt:7.2f} s  {tokens / dt:8.1f} tokens/s  "
              f"{tokens / dt / results['sample.generate']:.2f}x eager sample.generate  "
              f"greedy tokens bitwise equal to eager: {'yes' if same else 'NO'}  (first call incl. compile {first:.0f} s)")


if __name__ == "__main__":
    main()
