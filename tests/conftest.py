import json
import os
import subprocess
import sys

import pytest

import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """The tiny embedded base, built once per session (the real builder, fewer SFT steps)."""
    path = str(tmp_path_factory.mktemp("cache") / "tiny-base-v1")
    tiny.build_base(path, sft_steps=150, log=lambda m: None)
    return path


# The one uninterrupted 2-rank torchrun run several tests compare against (end to end, two nodes, SIGTERM).
TORCHRUN_ARGS = ["iterations=3", "prompts_per_iteration=8", "n_samples=4", "batch_size=16", "micro_batch_size=4",
                 "eval_prompts=2", "eval_winrate=false"]


def torchrun_cmd(base, out, launcher=("--standalone", "--nproc_per_node", "2"), extra=()):
    return [sys.executable, "-m", "torch.distributed.run", *launcher, os.path.join(ROOT, "train_ddp.py"),
            os.path.join(ROOT, "configs", "tiny.yaml"), f"model={base}", f"out_dir={out}", *TORCHRUN_ARGS, *extra]


@pytest.fixture(scope="session")
def torchrun_run(base, tmp_path_factory):
    """torchrun --nproc_per_node 2 on the tiny base, 3 COMAL iterations: (out_dir, stderr, metrics records)."""
    out = tmp_path_factory.mktemp("torchrun") / "out"
    r = subprocess.run(torchrun_cmd(base, out), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r.stderr, [json.loads(x) for x in open(out / "metrics.jsonl")]
