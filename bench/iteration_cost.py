"""Wall time of a COMAL iteration vs an INPO iteration on the same config, in one run.

python bench/iteration_cost.py [--model DIR] [--iters 8] [key=value ...]

Both use the INPO loss (eq. 14) and precompute pi_ref's log-probs every
iteration; COMAL additionally copies the policy into pi_ref at the start of a
round. The bench runs the worst case, ref_update_every=1 (a copy every
iteration), alternating COMAL and INPO iterations from the same starting
weights so that machine drift hits both alike, and prints median times and
their ratio (target <= 1.05). Without --model it uses the tiny embedded base
(built in runs/cache once).
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import comal  # noqa: E402
import oracle as oracle_lib  # noqa: E402
import tiny  # noqa: E402
import config  # noqa: E402
import train_ddp  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = args.model or os.path.join("runs", "cache", "tiny-base-v1")
    if not os.path.isdir(path):
        tiny.build_base(path)
    base_cfg = config.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml"),
                                     ["ref_update_every=1", "eval_prompts=0", "eval_winrate=false"] + args.overrides)
    tok = AutoTokenizer.from_pretrained(path)
    policy0 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs = {}
    for algo in ("comal", "inpo"):
        # INPO reads neither the round length nor per-round schedules: the first round's eta, the same eta * tau
        own = {} if algo == "comal" else {"ref_update_every": None, "eta": base_cfg["eta"][0] if isinstance(
            base_cfg["eta"], list) else base_cfg["eta"]}
        cfg = dict(base_cfg, algo=algo, model=path, **own)
        cfg = config.check_config({k: v for k, v in cfg.items() if v is not None or k in config.RUN_KEYS}, 1)
        policy = copy.deepcopy(policy0).to(device)
        ref = copy.deepcopy(policy).eval().requires_grad_(False)
        state = {"policy": policy, "tokenizer": tok, "ref": ref, "opponent": None}
        runs[algo] = (cfg, state, train_ddp.Trainer(policy, cfg, 0, 1, device))
    prompts = tiny.synthetic_prompts(base_cfg["prompts_per_iteration"] * 4, 0)
    oracle = oracle_lib.CategoryGame()
    times = {"comal": [], "inpo": []}
    for k in range(args.iters + 1):  # iteration 0 is a warm-up for both
        x = prompts[(k % 4) * base_cfg["prompts_per_iteration"]:(k % 4 + 1) * base_cfg["prompts_per_iteration"]]
        ids = config.encode_prompts(tok, x, 256)
        for algo in (("comal", "inpo") if k % 2 == 0 else ("inpo", "comal")):
            cfg, state, trainer = runs[algo]
            t0 = time.perf_counter()
            # Algorithm 3 for iteration k alone: COMAL's pi_ref <- pi^k copy (a round per iteration) is timed too
            comal.run(state, trainer, dict(cfg, iterations=k + 1), oracle, lambda k: (x, ids), k, lambda k, m: None)
            if k:
                times[algo].append(time.perf_counter() - t0)
    c, i = statistics.median(times["comal"]), statistics.median(times["inpo"])
    n = sum(p.numel() for p in policy0.parameters())
    print(f"policy {n / 1e6:.2f}M params, {base_cfg['prompts_per_iteration']} prompts x {base_cfg['n_samples']} samples, "
          f"ref_update_every=1, {args.iters} timed iterations each ({device})")
    print(f"COMAL iteration: median {c:.3f} s   INPO iteration: median {i:.3f} s   ratio COMAL/INPO = {c / i:.3f}")


if __name__ == "__main__":
    main()
