"""The shipped configs: each validates, comments every value that differs from the default, and the paper
recipes fit the hardware their header states (bench/plan.py on the meta device: no weights)."""
import glob
import os
import re
import sys

import pytest
import yaml

import comal
import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
RECIPES = [f for f in CONFIGS if os.path.basename(f).startswith(("llama3_8b_", "qwen25_7b_"))]


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_value_that_differs_from_the_default_is_commented(path):
    defaults = {k: v.default for k, v in config.RUN_KEYS.items()}
    defaults.update({k: v.default for k, v in config.algo_keys().items()})
    text = open(path).read()
    data = yaml.safe_load(text)
    cfg = config.load_config(path, [])  # unknown keys, wrong types: refused here
    config.check_algorithm_keys(cfg)  # keys the algorithm does not read: refused here
    lines = {m.group(1): m.group(0) for m in re.finditer(r"^(\w+):.*$", text, re.M)}
    bare = [k for k, v in data.items() if v != defaults.get(k) and "#" not in lines[k]]
    assert not bare, f"{os.path.basename(path)}: no comment on {bare}"


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_paper_recipes_fit_their_stated_hardware(path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import plan

    text = open(path).read()
    m = re.search(r"# Hardware: one node of (\d+) GPUs with (\d+) GiB each.*?--oracle-gib ([\d.]+)\): rollout peak "
                  r"([\d.]+) GiB, training peak ([\d.]+) GiB", text, re.S)
    assert m, "the recipe states its hardware and its plan"
    world, gib, oracle_gib, rollout_said, train_said = int(m[1]), int(m[2]), float(m[3]), float(m[4]), float(m[5])
    cfg = config.load_config(path, [])
    assert cfg["parallel"] == "fsdp" and cfg["activation_checkpointing"] and cfg["rollout_batch_size"] > 0
    arch = "llama3_8b" if "llama3" in path else "qwen25_7b"
    rows, peaks = plan.plan(cfg, *plan.architecture(arch), world)
    state = sum(rows.values()) + oracle_gib * plan.GIB
    rollout = (state + peaks["rollout: gathered weights"] + peaks["rollout: KV cache"]) / plan.GIB
    train = (state + peaks["training: activations, activation_checkpointing"]
             + peaks["training: gathered unit / gradient buckets"]) / plan.GIB
    assert (round(rollout, 1), round(train, 1)) == (rollout_said, train_said)  # the header is the plan's
    assert max(rollout, train) <= gib
    one, kept, _ = plan.disk(dict(cfg, **{k: v.default for k, v in comal.ALGOS[cfg["algo"]].key_defs().items()
                                          if k not in cfg}), arch)
    disk = re.search(r"# Disk .*?: (\d+) GB per checkpoint .*? x (\d+) kept = ([\d.]+) TB", text)
    assert disk and (int(disk[1]), int(disk[2]), float(disk[3])) == (round(one / 1e9), kept, round(one * kept / 1e12, 2))


def test_check_lists_every_missing_path_of_a_recipe_at_once(capsys):
    import train_ddp

    assert train_ddp.cli(["configs/llama3_8b_comal.yaml", "--check", "--world", "8"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("check: 4 problem(s) with configs/llama3_8b_comal.yaml:\n"), out
    for needle in ("model: model directory /models/Meta-Llama-3-8B-Instruct does not exist",
                   "prompts: /data/ultrafeedback/prompts.jsonl does not exist",
                   "oracle.models[0]: model directory /models/Skywork-Reward-Llama-3.1-8B-v0.2 does not exist",
                   "oracle.models[1]: model directory /models/ArmoRM-Llama3-8B-v0.1 does not exist"):
        assert f"\n  - {needle}" in out, needle


def test_check_on_a_ready_config_prints_the_plans(base, capsys):
    import train_ddp

    assert train_ddp.cli(["configs/tiny.yaml", f"model={base}", "--check", "--world", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("check: configs/tiny.yaml is ready to run on 2 rank(s)\nmemory on 2 rank(s), parallel ddp")
    assert "peak, activation_checkpointing=false" in out and "\ndisk: " in out and "x 30 kept" in out
    assert train_ddp.cli(["configs/tiny.yaml", f"model={base}", "lr=-1", "n_samples=1", "--check"]) == 2
    out = capsys.readouterr().out  # every bad value at once
    assert "check: 2 problem(s)" in out and "  - n_samples must be an int >= 2" in out and "  - lr must be" in out
