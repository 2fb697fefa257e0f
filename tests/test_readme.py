"""The README's "Adding an algorithm" example runs as written: its loss and its table entry (defined here, not in
the repo's table) train the tiny base through train_ddp.main, play the tabular game, and the expected loss of
its language-model examples equals its tabular step."""
import json
import os
import re
import shlex
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import config
import comal
import tiny
import toy_game as tg
import train_ddp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_blocks():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("### Adding an algorithm", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```(python|bash)\n(.*?)```", section, re.S)


@pytest.fixture
def simpo(monkeypatch):
    (_, loss_src), (_, entry_src), (_, cmd) = readme_blocks()
    ns = {"F": F, "torch": torch}
    exec(loss_src, ns)  # the block for losses.py
    fake_losses = SimpleNamespace(simpo_loss=ns["simpo_loss"])
    entry = eval("{" + entry_src + "}", dict(vars(comal), losses=fake_losses))  # the block for comal.ALGOS
    monkeypatch.setitem(comal.ALGOS, "simpo", entry["simpo"])
    return entry["simpo"], shlex.split(cmd.strip())


def test_readme_example_trains_the_tiny_base(simpo, tmp_path):
    spec, cmd = simpo
    assert cmd[:2] == ["python", "train_ddp.py"]
    base = str(tmp_path / "base")
    tiny.build_base(base, sft_steps=150, log=lambda m: None)
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
