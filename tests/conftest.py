import json
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch.multiprocessing as mp

import tiny

# Multi-process tests fork their ranks from one server process that imported torch, transformers and the trainer
# once, instead of spawning fresh interpreters that import them again (about 2 s per launch).
multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "transformers", "train_ddp"])


def spawn(fn, args, nprocs):
    """torch.multiprocessing.spawn(fn, args, nprocs) with its ranks forked from the preloaded server."""
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")


def cli_rank(rank, world, port, module, argv, logs, patch):
    """One rank of `python MODULE.py ARGV` as torchrun starts it (its environment variables, MODULE.cli), its
    stderr to logs/rank<r>.txt, stdout to logs/rank<r>.out, exit status to logs/rank<r>.status; patch(rank),
    if given, first."""
    import importlib

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if patch is not None:
        patch(rank)
    with open(os.path.join(logs, f"rank{rank}.txt"), "w") as err, open(os.path.join(logs, f"rank{rank}.out"), "w") as out:
        sys.stderr, sys.stdout = err, out
        status = importlib.import_module(module).cli(argv)
    with open(os.path.join(logs, f"rank{rank}.status"), "w") as f:
        f.write(str(status))


def run_cli(module, argv, log, cwd):
    os.chdir(cwd)
    with open(log, "w") as err:
        sys.stderr = err
        status = __import__(module).cli(argv)
    sys.exit(status)


def start(module, argv, log, cwd=None):
    """`python MODULE.py ARGV` (in cwd, default the repository) as one process forked from the preloaded server: no interpreter start-up.
    Its stderr goes to `log`; the returned multiprocessing Process has its pid (for signals) and, once joined,
    exitcode = MODULE.cli's status."""
    p = multiprocessing.get_context("forkserver").Process(target=run_cli, args=(module, argv, str(log), str(cwd or ROOT)))
    p.start()
    return p


def launch(module, argv, logs, nprocs=2, patch=None):
    """What `torchrun --nproc_per_node N MODULE.py ARGV` runs, with the ranks forked from the preloaded server
    (no interpreter start-up): ([exit status], [stderr], [stdout]) of each rank. The launcher itself is tested
    by the shared torchrun run."""
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    os.makedirs(logs, exist_ok=True)
    spawn(cli_rank, (nprocs, port, module, argv, str(logs), patch), nprocs)
    read = lambda name: [open(os.path.join(logs, name.format(r))).read() for r in range(nprocs)]  # noqa: E731
    return [int(x) for x in read("rank{}.status")], read("rank{}.txt"), read("rank{}.out")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """The tiny embedded base, built once per session (the real builder, fewer SFT steps)."""
    path = str(tmp_path_factory.mktemp("cache") / "tiny-base-v1")
    tiny.build_base(path, sft_steps=150, log=lambda m: None)
    return path


# The README's quick-start command; the one uninterrupted 2-rank run of it, shortened, is shared by several tests
# (the quick start itself, end to end, two nodes, SIGTERM).
QUICK_START = ["torchrun", "--nproc_per_node", "2", "train_ddp.py", "configs/tiny.yaml"]
TORCHRUN_ARGS = ["iterations=3", "prompts_per_iteration=8", "n_samples=4", "batch_size=16", "micro_batch_size=4",
                 "eval_prompts=2", "eval_winrate=false"]


def torchrun_cmd(cache, out, launcher=("--standalone", "--nproc_per_node", "2"), extra=()):
    """QUICK_START shortened by TORCHRUN_ARGS, its tiny base built in (or found in) cache."""
    return [sys.executable, "-m", "torch.distributed.run", *launcher, os.path.join(ROOT, "train_ddp.py"),
            os.path.join(ROOT, "configs", "tiny.yaml"), f"cache_dir={cache}", f"out_dir={out}", *TORCHRUN_ARGS, *extra]


@pytest.fixture(scope="session")
def torchrun_run(tmp_path_factory):
    """The quick start under torchrun, 3 COMAL iterations, building its base as on a fresh clone:
    (out_dir, stderr, metrics records, cache_dir)."""
    cache, out = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("torchrun") / "out"
    r = subprocess.run(torchrun_cmd(cache, out), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r.stderr, [json.loads(x) for x in open(out / "metrics.jsonl")], cache
