"""Training log-probs with each prompt run once for its n samples (sequence_logprobs(share_prompts=True)) vs one
forward of every row, and with --distinct D (a prompt's n samples repeat D distinct answers, as short answers
do) also with identical rows run once (unique_rows=True): seconds of forward + backward, in one run, values and
gradients compared with one forward of every row.

python bench/shared_prompt_bench.py [--model runs/cache/smollm2-135m-instruct] [--prompts 1 --n 8 --prompt-len 62 --response-len 3]
python bench/shared_prompt_bench.py --model runs/cache/smollm2-135m-instruct --n 64 --distinct 12

Defaults: one SmolLM2 micro-batch of the rock-paper-scissors configs (8 samples of 3 tokens after a 62-token
chat prompt). Without --model a randomly initialised 4-layer Llama of SmolLM2's width is used (no download).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import sample  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a transformers causal LM directory (default: a random 4-layer Llama)")
    p.add_argument("--prompts", type=int, default=1)
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, default=62)
    p.add_argument("--response-len", type=int, default=3)
    p.add_argument("--distinct", type=int, default=0, help="distinct answers per prompt (0: every row its own)")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    if a.model:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM
        model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                             num_hidden_layers=4, num_attention_heads=9, num_key_value_heads=3,
                                             tie_word_embeddings=True))
    V = model.get_output_embeddings().weight.shape[0]
    prompts = torch.randint(10, V, (a.prompts, a.prompt_len)).repeat_interleave(a.n, 0)
    answers = torch.randint(10, V, (len(prompts), a.response_len))
    if a.distinct:  # each prompt's samples drawn from its own `distinct` answers
        pick = torch.randint(0, a.distinct, (a.prompts, a.n)) + torch.arange(a.prompts)[:, None] * a.n
        answers = answers[pick.flatten()]
    ids = torch.cat([prompts, answers], 1)
    att = torch.ones_like(ids)
    att[:, :a.prompt_len // 4] = 0  # some left padding, as in a batch of prompts of different lengths
    resp = torch.zeros_like(ids)
    resp[:, a.prompt_len:] = 1
    w = torch.randn(ids.shape)
    modes = {"one forward per row": {}, "shared prompts": dict(share_prompts=True)}
    if a.distinct:
        modes["shared prompts, identical rows once"] = dict(share_prompts=True, unique_rows=True)
    seconds, out = {m: [] for m in modes}, {}
    for r in range(a.repeats + 1):  # the first round warms up
        for m, kw in modes.items():
            model.zero_grad()
            t0 = time.perf_counter()
            tok = sample.sequence_logprobs(model, ids, att, resp, **kw)[0]
            (tok * w).sum().backward()
            if r:
                seconds[m].append(time.perf_counter() - t0)
            out[m] = (tok.detach(), torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None]))
    med = {m: sorted(v)[len(v) // 2] for m, v in seconds.items()}
    base = "one forward per row"
    distinct = len(sample.distinct_rows(ids, att, resp)[0])
    print(f"{len(ids)} rows ({a.prompts} prompt(s) x {a.n} samples, {distinct} distinct), prompt {a.prompt_len} + "
          f"response {a.response_len} tokens, {torch.get_num_threads()} threads; forward + backward, median of {a.repeats}")
    for m in modes:
        dv = float((out[m][0] - out[base][0]).abs().max())
        dg = float((out[m][1] - out[base][1]).abs().max() / out[base][1].abs().max())
        print(f"{m:>36}: {med[m]:.3f} s  ratio {med[m] / med[base]:.2f}x  max |log-prob difference| {dv:.2e}  "
              f"max gradient difference / max gradient {dg:.2e}")


if __name__ == "__main__":
    main()
