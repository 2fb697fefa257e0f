"""Per-rank memory of parameters + gradients + optimizer state: DDP vs sharded (parallel: fsdp), N = 1, 2.

python bench/memory.py [--hidden 512 --layers 8 --vocab 8192] [--device cpu|cuda]

Spawns N gloo (CPU) or nccl (CUDA, needs N GPUs) ranks, takes two AdamW steps
with each trainer of train_ddp.py, and just before the second optimizer step
(when gradients and Adam moments all exist) adds up the bytes of every
distinct storage each rank holds for parameters (module weights, gathered
buffers, fp32 master shards), gradients and optimizer state. On CUDA it also
reports torch.cuda.max_memory_allocated. Prints both modes and the ratio.
"""
import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import config  # noqa: E402
import fsdp  # noqa: E402
import train_ddp  # noqa: E402
from sample import sequence_logprobs  # noqa: E402


def held_bytes(model, trainer):
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if t is None:
            return
        s = t.untyped_storage()
        if s.data_ptr() not in seen and s.nbytes():
            seen.add(s.data_ptr())
            total += s.nbytes()

    for p in model.parameters():
        add(p)
        add(p.grad)
    for p in trainer.params:
        add(p)
        add(p.grad)
    for st in trainer.optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                add(v)
    return total


def worker(rank, world, mode, args, init_file, out):
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if args.device == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(device)
    if mode == "fsdp":
        fsdp.shard_model(model, rank, world)
    trainer = train_ddp.trainer_for(model, dict(config.load_config(None, []), lr=1e-4), rank, world, device)
    measured = {}
    step = trainer.optimizer.step

    def measuring_step(*a, **kw):
        if trainer.optimizer.state:  # second step: Adam moments exist
            measured["bytes"] = held_bytes(model, trainer)
        return step(*a, **kw)

    trainer.optimizer.step = measuring_step
    ids = torch.randint(0, args.vocab, (4, 64), device=device)
    mask = torch.ones_like(ids)
    for s in range(2):
        def losses():
            yield -sequence_logprobs(model, ids, mask, mask)[1].mean()
        trainer.step(losses(), 0, s, 2)
    if args.device == "cuda":
        measured["cuda_peak"] = torch.cuda.max_memory_allocated(device)
    t = torch.tensor([measured["bytes"], measured.get("cuda_peak", 0)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        torch.save(t.cpu(), out)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--worlds", default="1,2")
    args = p.parse_args()
    mib = lambda b: b / 2**20  # noqa: E731
    rows = {}
    for world in [int(w) for w in args.worlds.split(",")]:
        for mode in ("ddp", "fsdp"):
            d = tempfile.mkdtemp()
            mp.spawn(worker, args=(world, mode, args, os.path.join(d, "init"), os.path.join(d, "out.pt")), nprocs=world)
            rows[(world, mode)] = torch.load(os.path.join(d, "out.pt")).tolist()
    n = sum(x.numel() for x in LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)).parameters())
    print(f"Llama {n / 1e6:.1f}M parameters ({args.layers} blocks, hidden {args.hidden}, vocab {args.vocab}), "
          f"fp32 + AdamW, {args.device}; max over ranks of params + grads + optimizer state held before the 2nd step")
    for world in sorted({w for w, _ in rows}):
        ddp, fsdp = rows[(world, "ddp")], rows[(world, "fsdp")]
        line = f"N={world}: ddp {mib(ddp[0]):8.1f} MiB   fsdp {mib(fsdp[0]):8.1f} MiB   fsdp/ddp = {fsdp[0] / ddp[0]:.3f}"
        if args.device == "cuda":
            line += f"   (cuda peak: ddp {mib(ddp[1]):.0f} MiB, fsdp {mib(fsdp[1]):.0f} MiB, {fsdp[1] / ddp[1]:.3f})"
        print(line)


if __name__ == "__main__":
    main()
