"""Peak memory of the fused, chunked sequence_logprobs vs the naive log_softmax(logits).gather,
forward + backward, Llama-3 vocabulary (128,256), in one run; values and gradients compared.

python bench/logprob_bench.py [--tokens 4096 --hidden 256 --vocab 128256]

A one-layer Llama with the given hidden size keeps the transformer small, so
the output layer dominates, as it does for the log-prob step of an 8B model.
Peak memory: CUDA max_memory_allocated on GPU; on CPU the peak of live tensor
bytes recorded by torch's memory profiler hooks (allocator-independent).
"""
import argparse
import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import sample  # noqa: E402


class CpuPeak:
    """Tracks the peak of live CPU tensor bytes through the dispatcher (no allocator stats on CPU)."""

    def __init__(self):
        self.live = {}
        self.cur = self.peak = 0

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        import weakref
        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in (out if isinstance(out, (tuple, list)) else (out,)):
                    if isinstance(t, torch.Tensor):
                        st = t.untyped_storage()
                        key = st.data_ptr()
                        if key and key not in tracker.live:
                            nbytes = st.nbytes()
                            tracker.live[key] = nbytes
                            tracker.cur += nbytes
                            tracker.peak = max(tracker.peak, tracker.cur)
                            weakref.finalize(st, tracker._free, key)
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def _free(self, key):
        self.cur -= self.live.pop(key, 0)

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def naive(model, ids, am, rm):
    logits = model(input_ids=ids, attention_mask=am, position_ids=sample.positions(am)).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * rm[:, 1:]
    return lp.sum(-1)


def fused(model, ids, am, rm):
    return sample.sequence_logprobs(model, ids, am, rm)[1]


def measure(fn, model, ids, am, rm, device):
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seq = fn(model, ids, am, rm)
        seq.sum().backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with CpuPeak() as tracker:
            seq = fn(model, ids, am, rm)
            seq.sum().backward()
        peak = tracker.peak
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return peak, seq.detach(), grads


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096, help="batch x sequence length")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=args.seq, tie_word_embeddings=False, initializer_range=0.02)
    model = LlamaForCausalLM(cfg).to(args.device)
    B = args.tokens // args.seq
    ids = torch.randint(0, args.vocab, (B, args.seq), device=args.device)
    am = torch.ones_like(ids)
    rm = torch.zeros_like(ids)
    rm[:, args.seq // 4:] = 1  # a prompt quarter, three quarters response
    print(f"{B} x {args.seq} tokens, vocab {args.vocab}, hidden {args.hidden}, {args.device}; forward + backward")
    peak_f, seq_f, g_f = measure(fused, model, ids, am, rm, args.device)
    peak_n, seq_n, g_n = measure(naive, model, ids, am, rm, args.device)
    dv = float((seq_f - seq_n).abs().max())
    dg = max(float((g_f[k] - g_n[k]).abs().max()) for k in g_n)
    print(f"  fused sequence_logprobs: peak {peak_f / 2**20:9.1f} MiB")
    print(f"  naive log_softmax.gather: peak {peak_n / 2**20:9.1f} MiB")
    print(f"  max |value diff| {dv:.2e}, max |grad diff| {dg:.2e}")
    print(f"ratio fused / naive peak memory: {peak_f / peak_n:.3f} (target <= 0.25)")


if __name__ == "__main__":
    main()
