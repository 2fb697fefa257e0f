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
RECIPES = [f for f in CONFIGS if os.path.basename(f).startswith(("llama3_8b_", "qwen25_7b_", "qwen2_1p5b_"))]


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


def stated_plan(path, overrides, arch, gib):
    """The header's phrase for cfg + overrides on 8 ranks of `gib` GiB, from memory_plan.report (meta device)."""
    import memory_plan

    cfg = config.load_config(path, overrides)
    config.check_algorithm_keys(cfg)
    _, rollout, train, scoring = memory_plan.report(cfg, arch, 8, gib)
    assert scoring is not None, "every oracle model of a recipe names its arch"
    peak = max(rollout, train[bool(cfg["activation_checkpointing"])], scoring) / memory_plan.GIB
    return (f"rollout peak {rollout / memory_plan.GIB:.1f} GiB, training peak "
            f"{train[bool(cfg['activation_checkpointing'])] / memory_plan.GIB:.1f} GiB, scoring peak "
            f"{scoring / memory_plan.GIB:.1f} GiB: {gib - peak:.1f} GiB left"), peak


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_paper_recipes_fit_their_stated_hardware(path):
    """The header's plan is bench/plan.py's for the paper's 8 x 48 GiB, with the oracle's models counted from
    their arch entries, and leaves a margin; an 80 GiB line's settings fit 80 GiB by the same plan; the disk
    line is the checkpoint arithmetic."""
    import memory_plan

    text = open(path).read()
    rel = os.path.relpath(path, ROOT)
    m = re.search(r"# Hardware: the paper's, one node of 8 GPUs with 48 GiB each.*\n# Plan per rank \(python bench/plan.py "
                  + re.escape(rel) + r" --world 8 --arch (\w+) --gpu-gib 48\):\n# (.*)\.\n", text)
    assert m, "the recipe states the paper's hardware and its plan command"
    arch = m[1]
    said, peak = stated_plan(path, [], arch, 48)
    assert m[2] == said and peak <= 48 - 2, (m[2], said)  # the header is the plan's, with 2 GiB to spare at least
    cfg = config.load_config(path, [])
    assert cfg["parallel"] == "fsdp" and cfg["rollout_batch_size"] > 0
    wide = re.search(r"^# On 80 GiB GPUs: ((?:\w+=\S+ )+)\(faster\) -> (.*)\.$", text, re.M)
    if wide:
        said, peak = stated_plan(path, wide[1].split(), arch, 80)
        assert wide[2] == said and peak <= 80 - 2, (wide[2], said)
    one, kept, _ = memory_plan.disk(dict(cfg, **{k: v.default for k, v in comal.ALGOS[cfg["algo"]].key_defs().items()
                                                 if k not in cfg}), arch)
    disk = re.search(r"# Disk .*?: (\d+) GB per checkpoint .*? x (\d+) kept = ([\d.]+) TB", text)
    assert disk and (int(disk[1]), int(disk[2]), float(disk[3])) == (round(one / 1e9), kept, round(one * kept / 1e12, 2))


def test_plan_reads_oracle_arch_entries_and_checks_them_against_the_directory(tmp_path, capsys):
    """Without its directory an oracle model counts by its arch entry; with no arch the plan says it is NOT
    counted; a wrong arch name, or one that disagrees with a present config.json, is one error line."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import plan
    from tiny import save_reward_model

    recipe = os.path.join(ROOT, "configs", "llama3_8b_comal.yaml")
    plan.main([recipe, "--world", "8", "--arch", "llama3_8b", "--gpu-gib", "48"])
    out = capsys.readouterr().out
    assert "oracle models (shards under fsdp)                      3.49" in out and "-> fits in 48 GiB  <- this config" in out, out
    bare = "oracle.models=[{path: /nowhere/a}, {path: /nowhere/b}]"
    plan.main([recipe, bare, "--world", "8", "--arch", "llama3_8b"])
    assert "NOT counted: the oracle's models" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="oracle.models.0..arch 'llama9' is not one of llama3_8b"):
        plan.main([recipe, "oracle.models=[{path: /nowhere, arch: llama9}]", "--world", "8", "--arch", "llama3_8b"])
    rm = save_reward_model(tmp_path / "rm", 1, 300, chat=True)
    with pytest.raises(SystemExit, match=r"oracle.models.0..arch llama3_8b disagrees with .*config.json"):
        plan.main([recipe, f"oracle.models=[{{path: {rm}, arch: llama3_8b}}]", "--world", "8", "--arch", "llama3_8b"])


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
    assert train_ddp.cli(["configs/qwen2_1p5b_comal.yaml", "--check", "--world", "8"]) == 2  # App. K: the judge
    out = capsys.readouterr().out
    assert out.startswith("check: 3 problem(s) with configs/qwen2_1p5b_comal.yaml:\n"), out
    assert "\n  - oracle.path: model directory /models/Llama-3-OffsetBias-8B does not exist" in out, out


def test_check_on_a_ready_config_prints_the_plans(base, capsys):
    import train_ddp

    assert train_ddp.cli(["configs/tiny.yaml", f"model={base}", "--check", "--world", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("check: configs/tiny.yaml is ready to run on 2 rank(s)\nmemory on 2 rank(s), parallel ddp")
    assert "peak, activation_checkpointing=false" in out and "\ndisk: " in out and "x 30 kept" in out
    assert train_ddp.cli(["configs/tiny.yaml", f"model={base}", "lr=-1", "n_samples=1", "--check"]) == 2
    out = capsys.readouterr().out  # every bad value at once
    assert "check: 2 problem(s)" in out and "  - n_samples must be an int >= 2" in out and "  - lr must be" in out
