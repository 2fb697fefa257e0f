"""python bench/plan.py CONFIG [key=value ...] --world N [--gpu-gib 80] [--arch NAME|DIR] [--measured OUT_DIR/metrics.jsonl]

The per-rank memory plan of memory_plan.py (read its docstring) and the checkpoints' disk plan, printed;
--measured compares the plan's two peaks with a CUDA run's logged ones.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import config  # noqa: E402
from keys import ConfigError  # noqa: E402
from memory_plan import ARCHS, GIB, disk, report  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--gpu-gib", type=float, default=80.0)
    p.add_argument("--arch", default=None, help="the policy's architecture: a model directory or one of "
                   f"{', '.join(ARCHS)} (default: the config's model); the oracle's: its models' arch entries")
    p.add_argument("--measured", default=None, help="metrics.jsonl of a CUDA run of this config to compare with")
    args = p.parse_args(argv)
    cfg = config.load_config(args.config, args.overrides)
    config.check_algorithm_keys(cfg)
    try:
        lines, rollout, train, scoring = report(cfg, args.arch or cfg["model"], args.world, args.gpu_gib)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    print(f"{args.config}: " + lines[0])
    print("\n".join(lines[1:] + ["  " + disk(cfg, args.arch or cfg["model"])[2]]))
    if args.measured:
        logged = [json.loads(x) for x in open(args.measured) if '"train_peak_gib"' in x]
        if not logged:
            sys.exit(f"error: --measured {args.measured}: no iteration with train_peak_gib (not a CUDA run?)")
        for name, key, planned in (("rollout and scoring", "rollout_peak_gib", max(rollout, scoring or 0)),
                                   ("training", "train_peak_gib", train[bool(cfg["activation_checkpointing"])])):
            got = max(r[key] for r in logged)
            print(f"  measured {name} peak (CUDA max allocated) {got:.3f} GiB, plan {planned / GIB:.3f} GiB: "
                  f"plan / measured {planned / GIB / got:.2f}")


if __name__ == "__main__":
    main()
