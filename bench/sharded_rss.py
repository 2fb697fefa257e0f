"""The whole process, per rank: peak RSS, rollout and training seconds, parallel ddp vs fsdp at N ranks.

python bench/sharded_rss.py [--model runs/cache/smollm2-135m-instruct] [--nproc 2] [--rollout gathered] [--repeats 3] [key=value ...]

For each mode, one short COMAL iteration with the category oracle runs under
torchrun (gloo on CPU, nccl on GPUs); every rank reports its peak RSS
(getrusage ru_maxrss: imports, loading, rollout, training and the checkpoint
write all included) through bench/rss_worker.py; rollout = the iteration's
sample_s, training = its train_s from metrics.jsonl. Prints both modes and
the fsdp / ddp ratios, measured in the same run: --repeats R runs the pair R
times (ddp, fsdp, ddp, fsdp, ...: drift on the machine hits both alike) and
compares medians, since one decode on a shared 2-core CPU varies by 20%.
Extra key=value overrides apply to both modes (e.g. activation_checkpointing=true).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def run(mode, args, tmp, rep):
    out = os.path.join(tmp, f"{mode}{rep}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           os.path.join(ROOT, "bench", "rss_worker.py"), os.path.join(ROOT, "configs", "tiny.yaml"),
           f"model={args.model}", f"out_dir={out}", f"parallel={mode}", "iterations=1", "prompts_per_iteration=8",
           "n_samples=4", "max_new_tokens=32", "batch_size=16", "micro_batch_size=4", "epochs=1", "eval_prompts=0",
           "eval_winrate=false", "lr=1e-5"] + ([f"rollout={args.rollout}"] if mode == "fsdp" else []) + args.overrides
    r = subprocess.run(cmd, env=dict(os.environ, RSS_OUT=out + ".rss"), capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        sys.exit(f"{mode} failed:\n{r.stderr[-3000:]}")
    peaks = [json.load(open(f"{out}.rss.{k}"))["peak_rss"] for k in range(args.nproc)]
    it = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if '"sample_s"' in x][-1]
    return {"peak_rss_gib": max(peaks) / 2**30, "sample_s": it["sample_s"], "train_s": it["train_s"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.join("runs", "cache", "smollm2-135m-instruct"))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rollout", default="gathered", choices=["gathered", "sharded"])
    p.add_argument("--repeats", type=int, default=3, help="runs of each mode; the ratios compare medians")
    p.add_argument("overrides", nargs="*", help="key=value for both modes")
    args = p.parse_args()
    res = {"ddp": [], "fsdp": []}
    for rep in range(args.repeats):
        for mode in ("ddp", "fsdp"):
            with tempfile.TemporaryDirectory() as tmp:  # 2.7 GB of checkpoint per run: gone before the next
                res[mode].append(run(mode, args, tmp, rep))
    print(f"model {args.model}, N = {args.nproc}, fsdp rollout {args.rollout}, {args.repeats} run(s) of each mode "
          f"{' '.join(args.overrides)}")
    for key, label in (("peak_rss_gib", "peak RSS per rank (GiB)"), ("sample_s", "rollout (s)"), ("train_s", "training (s)")):
        d, f = (statistics.median(r[key] for r in res[m]) for m in ("ddp", "fsdp"))
        runs = "  ".join(f"{a[key]:.2f}/{b[key]:.2f}" for a, b in zip(res["ddp"], res["fsdp"]))
        print(f"{label:26s} ddp {d:8.2f}   fsdp {f:8.2f}   fsdp/ddp {f / d:.2f}   (each run ddp/fsdp: {runs})")


if __name__ == "__main__":
    main()
