"""The README's "Adding an algorithm" example runs as written: its loss and its table entry (defined here, not in
the repo's table) train the tiny base through train_ddp.main, play the tabular game, and the expected loss of
its language-model examples equals its tabular step."""
import json
import os
import re
import shlex
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import config
import comal
import toy_game as tg
import train_ddp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_blocks():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("### Adding an algorithm", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```(python|bash)\n(.*?)```", section, re.S)


@pytest.fixture
def simpo(monkeypatch):
    (_, loss_src), (_, inputs_src), (_, entry_src), (_, cmd) = readme_blocks()[:4]
    ns = {"F": F, "torch": torch}
    exec(loss_src, ns)  # the block for losses.py
    in_comal = dict(vars(comal), losses=SimpleNamespace(simpo_loss=ns["simpo_loss"]))
    exec(inputs_src, in_comal)  # the loss form, in comal.py
    entry = eval("{" + entry_src + "}", in_comal)  # the block for comal.ALGOS
    monkeypatch.setitem(comal.ALGOS, "simpo", entry["simpo"])
    return entry["simpo"], shlex.split(cmd.strip())


def test_readme_example_trains_the_tiny_base(simpo, base, tmp_path):
    spec, cmd = simpo
    assert cmd[:2] == ["python", "train_ddp.py"]
    argv = [os.path.join(ROOT, cmd[2])] + cmd[3:] + [  # as written, then small and fast for CI
        f"out_dir={tmp_path / 'run'}", f"model={base}", "iterations=2", "prompts_per_iteration=8", "n_samples=4",
        "batch_size=16", "micro_batch_size=8", "eval_prompts=2", "lr=1e-3"]
    train_ddp.main(argv)
    records = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    steps = [r for r in records if "step" in r]
    assert steps and all(r["loss"] == r["loss"] for r in steps)
    assert [r["iteration"] for r in records if "exploitability" in r] == [-1, 0, 1]
    import yaml

    cfg = yaml.safe_load(open(tmp_path / "run" / "config.yaml"))
    assert cfg["algo"] == "simpo" and cfg["simpo_gamma"] == 0.3 and cfg["simpo_beta"] == 2.0 and "eta" not in cfg
    # a key it does not read is refused, naming it
    with pytest.raises(config.ConfigError, match="eta: algo simpo does not read"):
        train_ddp.main(argv[:1] + ["algo=simpo", "eta=1.0", f"model={base}"])


def test_readme_example_plays_the_tabular_game_and_equals_its_tabular_step(simpo):
    spec, _ = simpo
    game = tg.make_game()
    traj = tg.play(spec, game, tg.make_config(iters=20, eta=1.0), None)
    assert len(traj) == 21 and not torch.allclose(traj[-1], traj[0])
    import test_exactness as ex

    got = ex.lm_step(None, 5, spec=spec)  # the LM examples and loss, every group of 5 enumerated
    want = tg.tabular_step(spec, SimpleNamespace(A=ex.A), tg.make_config(), None, ex.LOG_MU)
    assert float((got - want).abs().max()) < 1e-6


def test_readme_opponent_entry_is_the_tables():
    """The README's new-opponent block is opponents.OPPONENTS["mixture"] as the code defines it."""
    import opponents
    import sample
    from types import SimpleNamespace as NS

    ((_, src),) = [b for b in readme_blocks() if b[0] == "python" and "Opponent(" in b[1]]
    readme = eval("{" + src + "}", vars(opponents))["mixture"]
    ours = opponents.OPPONENTS["mixture"]
    h, a, b = NS(beta=0.3), torch.log_softmax(torch.randn(4), -1), torch.log_softmax(torch.randn(4), -1)
    assert torch.equal(readme.start(a, b, h)[0], ours.start(a, b, h)[0])
    assert torch.equal(readme.tabular(b, a, b, None, h)[0], ours.tabular(b, a, b, None, h)[0])
    pi, ref = NS(config="pi"), NS(config="ref")
    mix = readme.sampler({"policy": pi, "ref": ref}, h)
    assert isinstance(mix, sample.Mixture) and mix.weights == [0.7, 0.3] and mix.models == [pi, ref]
    assert (readme.copy, readme.keys, readme.needs_ref) == (ours.copy, ours.keys, ours.needs_ref)


# ---------------------------------------------------------------------------
# The README's quick start and "Your own model, prompts and oracle", run as written (short versions)
# ---------------------------------------------------------------------------


def section_blocks(title, lang="bash"):
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split(title, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return [b for kind, b in re.findall(r"```(\w*)\n(.*?)```", section, re.S) if kind == lang]


def runnable(line, cwd):
    """A README command line as argv: python/torchrun scripts and configs/ resolved in the repo."""
    import sys

    argv = shlex.split(line.split("#")[0])
    if argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone"] + argv[1:]  # a free port
    elif argv[0] == "python":
        argv = [sys.executable] + argv[1:]
    return [os.path.join(ROOT, a) if a.endswith(".py") or a.startswith("configs/") else a for a in argv]


def run_ok(argv, cwd):
    import subprocess

    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (argv, r.stderr[-3000:])
    return r


@pytest.mark.slow
def test_readme_quick_start_runs(torchrun_run, tmp_path, capsys):
    from conftest import QUICK_START

    (block,) = section_blocks("## Quick start")
    train, evaluate = block.strip().splitlines()
    first = section_blocks("# comal")[0]  # the first command at the top: install, then the quick start
    assert shlex.split(train) == QUICK_START and first.strip().endswith(train)
    out, stderr, records, cache = torchrun_run  # conftest: this command, 3 iterations, on a fresh cache_dir
    assert "building the tiny embedded base policy" in stderr and (cache / "tiny-base-v1").is_dir()
    assert [r["iteration"] for r in records if "exploitability" in r] == [-1, 0, 1, 2]
    assert "runs/tiny" in evaluate
    shutil.copytree(out, tmp_path / "tiny")  # eval.py writes into the run; the shared one stays as it was
    import eval as ev  # the evaluation command's arguments, in this process

    argv = [a.replace("runs/tiny", str(tmp_path / "tiny")) for a in runnable(evaluate, ROOT)]
    assert argv[1].endswith("eval.py") and ev.cli(argv[2:] + ["--num-prompts", "4"]) == 0
    assert "exploitability" in capsys.readouterr().out and (tmp_path / "tiny" / "eval" / "dynamics.csv").is_file()


@pytest.mark.slow
def test_readme_own_model_and_prompts_run_as_written(base, tmp_path, monkeypatch, capsys):
    (block,) = section_blocks("### Your own model, prompts and oracle")
    train, evaluate = block.strip().splitlines()
    (oracle_yaml,) = section_blocks("### Your own model, prompts and oracle", "yaml")
    (tmp_path / "my_oracle.yaml").write_text(oracle_yaml)
    (tmp_path / "my_prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Pick a move for round {i}."}) + "\n"
                                                       for i in range(10)))
    shutil.copytree(base, tmp_path / "my_model")  # stands in for your model
    fast = ["n_samples=4", "max_new_tokens=6", "batch_size=16", "micro_batch_size=8", "eval_prompts=2"]
    run_ok(runnable(train, tmp_path) + fast, tmp_path)  # the command as a user types it
    iters = [json.loads(x) for x in open(tmp_path / "runs" / "mine" / "metrics.jsonl") if '"train_s"' in x]
    assert [r["iteration"] for r in iters] == [0, 1]
    # the evaluation, and the training without the README's subset overrides, in this process (same argv)
    import eval as ev

    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert ev.cli(runnable(evaluate, tmp_path)[2:] + ["--max-new-tokens", "8"]) == 0
    table = (tmp_path / "runs" / "mine_eval" / "winrate.md").read_text()
    assert "| mine |" in table and "| base |" in table and "row beats column" in capsys.readouterr().out
    # the tiny config's subsets are too small for 10 prompts: the message is the one docs/troubleshooting.md
    # lists (its P, S, N, K as numbers)
    argv = [a for a in runnable(train, tmp_path) if not a.startswith(("num_subsets", "prompts_per_iteration"))]
    assert train_ddp.cli(argv[2:] + ["out_dir=runs/subsets"]) == 2
    listed = re.search(r"\| `(prompts_per_iteration P > [^`]*)`", open(os.path.join(ROOT, "docs", "troubleshooting.md")).read())
    pattern = re.escape(listed.group(1))
    for letter in "PSNK":
        pattern = re.sub(rf"\b{letter}\b", r"\\d+", pattern)
    err = capsys.readouterr().err
    assert re.search(pattern, err), (pattern, err)


def lines_of(stderr):
    """The lines a user reads on stderr: progress bars (carriage-return redraws) left out."""
    return [x for x in stderr.replace("\r", "\n").splitlines() if x.strip() and "it/s]" not in x and "?it/s" not in x]


@pytest.mark.slow
def test_readme_own_model_command_on_an_untrained_model_never_hangs(tmp_path, monkeypatch, capsys):
    """An untrained tiny model (random weights, its own tokenizer) never ends its first word, so the exact
    category enumeration of the README's own-model command would grow ~V^d: the command stops within its
    budget with one line; a SIGTERM during the enumeration stops it with one line and exit 0; without the
    exploitability (eval_prompts=0) it trains, warns that no iteration had a preference signal, and ends with
    its summary line."""
    import signal
    import time

    import tiny

    (block,) = section_blocks("### Your own model, prompts and oracle")
    train = runnable(block.strip().splitlines()[0], tmp_path)
    tiny.build_base(str(tmp_path / "my_model"), vocab=300, sft_steps=0, log=lambda m: None)
    (tmp_path / "my_prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Pick a move for round {i}."}) + "\n"
                                                       for i in range(10)))
    monkeypatch.chdir(tmp_path)  # the same command in this process (no interpreter start-up)
    def hung(signum, frame):
        raise TimeoutError("the README's own-model command ran past 120 s on an untrained model")

    signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)  # a hang fails the test instead of stalling the suite
    try:
        assert train_ddp.cli(train[2:]) == 2
    finally:
        signal.alarm(0)
    said = lines_of(capsys.readouterr().err)
    assert said[-1].startswith("error: eval prompt 0: the exact category enumeration passed 20000 prefixes"), said
    assert "set eval_prompts=0" in said[-1]
    from conftest import start

    err = tmp_path / "err.txt"  # no budget: the enumeration would run for hours; SIGTERM stops it
    p = start("train_ddp", train[2:] + ["eval_max_prefixes=1000000000", "out_dir=runs/term"], err, tmp_path)
    while "exact category distribution" not in (err.read_text() if err.exists() else "") and p.is_alive():
        time.sleep(0.2)
    time.sleep(1.0)
    os.kill(p.pid, signal.SIGTERM)
    p.join(timeout=60)
    assert p.exitcode == 0
    said = lines_of(err.read_text())
    assert said[-1] == ("stopped by SIGTERM at the exploitability evaluation of the start (nothing to save yet: rerun "
                        "the same command)"), said
    assert train_ddp.cli(train[2:] + ["eval_prompts=0", "out_dir=runs/silent"]) == 0
    said = lines_of(capsys.readouterr().err)
    assert said[-3].startswith("warning: iteration 1 had no preference signal")
    assert said[-2].startswith("done: 2 iteration(s) in ") and said[-2].endswith("in runs/silent"), said
    assert said[-1].startswith("warning: no iteration had a preference signal"), said
    recs = [json.loads(x) for x in open(tmp_path / "runs" / "silent" / "metrics.jsonl") if '"train_s"' in x]
    assert [x["preference_signal"] for x in recs] == [False, False]


@pytest.mark.slow
def test_ultrafeedback_prompts_script_feeds_the_recipes(tmp_path):
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "uf" / "data").mkdir(parents=True)
    rows = ["Say hi", "Name a fruit", "Say hi", "  ", "Count to 3"] + [f"Question {i}" for i in range(7)]
    pq.write_table(pa.table({"source": ["x"] * len(rows), "instruction": rows}),
                   tmp_path / "uf" / "data" / "train-00000-of-00001.parquet")
    out = tmp_path / "prompts.jsonl"
    run_ok([sys.executable, os.path.join(ROOT, "data", "ultrafeedback_prompts.py"), str(tmp_path / "uf"),
            "--out", str(out)], tmp_path)
    got = [json.loads(x)["prompt"] for x in out.read_text().splitlines()]
    assert sorted(got) == sorted(set(rows) - {"  "})  # empty and repeated dropped, field renamed to the recipes'
    cfg = config.load_config(os.path.join(ROOT, "configs", "llama3_8b_comal.yaml"), [f"prompts={out}"])
    assert cfg["prompt_field"] == "prompt" and len(config.load_prompts(cfg)) == 10
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data", "ultrafeedback_prompts.py"), str(tmp_path / "none"),
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error:") and len(r.stderr.splitlines()) == 1
    # held-out prompts from a test split, then training prompts without them
    pq.write_table(pa.table({"prompt": ["Name a fruit", "Question 3", "Unseen one"]}),
                   tmp_path / "uf" / "data" / "test_prefs-00000-of-00001.parquet")
    held = tmp_path / "test_prompts.jsonl"
    script = [sys.executable, os.path.join(ROOT, "data", "ultrafeedback_prompts.py"), str(tmp_path / "uf")]
    run_ok(script + ["--split", "test_prefs", "--out", str(held)], tmp_path)
    assert sorted(json.loads(x)["prompt"] for x in held.read_text().splitlines()) == ["Name a fruit", "Question 3",
                                                                                   "Unseen one"]
    run_ok(script + ["--split", "train", "--exclude", str(held), "--out", str(out)], tmp_path)
    got = [json.loads(x)["prompt"] for x in out.read_text().splitlines()]
    assert sorted(got) == sorted(set(rows) - {"  ", "Name a fruit", "Question 3"})
