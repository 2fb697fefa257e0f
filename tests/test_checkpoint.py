"""Checkpoints that can be trusted: no pickle is ever loaded, no non-finite state is saved or stepped into,
a bad newest checkpoint is named and skipped, one run per out_dir, predictable resume, preemption by
SIGTERM resumes bitwise, and bad input gives one line."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import config
import checkpoint
import comal
import fsdp
import train_ddp
from conftest import spawn
from test_train import TRAIN_CFG, ddp_model, global_batches, micro_losses, small_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


def train(cfg):
    """In process, with the threads the command line uses (one process: all cores), so runs compare bitwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        return train_ddp.train(cfg, 0, 1, CPU)
    finally:
        torch.set_num_threads(threads)


def cfg3(base, out, **kw):
    """Three COMAL iterations, rounds of 2: iteration 1 is mid-round (pi_ref = pi^0 differs from the policy)."""
    return small_cfg(base, out, **dict(dict(iterations=3, algo="comal"), **kw))


@pytest.fixture(scope="module")
def run3(base, tmp_path_factory):
    """An uninterrupted 3-iteration run: the reference every resumed run must equal bitwise."""
    out = tmp_path_factory.mktemp("run3") / "out"
    train(cfg3(base, out))
    return out


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def log_lines(out):
    drop = ("seconds", "sample_s", "judge_s", "train_s", "tokens_per_s", "checkpoint")
    return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in open(out / "metrics.jsonl")]


class Payload:
    """A pickle that runs a shell command when it is unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------------
# 1. No pickles
# ---------------------------------------------------------------------------


def test_checkpoints_hold_no_pickles_and_planted_ones_never_run(base, run3, tmp_path):
    files = [os.path.join(r, n) for r, _, ns in os.walk(run3 / "checkpoints") for n in ns]
    assert files and not [f for f in files if f.endswith((".pt", ".bin", ".pkl", ".pickle"))]
    for f in files:  # every file is safetensors, JSON or a tokenizer's text
        if f.endswith(".safetensors"):
            with safe_open(f, "pt") as g:
                assert list(g.keys())
        elif f.endswith(".json"):
            json.load(open(f))
    ck = checkpoint.checkpoint_dir(str(run3), 1)
    assert {"manifest.json", "trainer_state.json", "optimizer.safetensors", "ref"} <= set(os.listdir(ck))
    # the planted payload is dangerous: unpickling it runs the command
    marker = tmp_path / "pwned"
    torch.save(Payload(marker), tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    # plant it under every name an older format or HF would unpickle, then resume from that checkpoint
    out = tmp_path / "out"
    shutil.copytree(run3, out)
    shutil.rmtree(checkpoint.checkpoint_dir(str(out), 2))
    ck = checkpoint.checkpoint_dir(str(out), 1)
    for rel in ("trainer_state.pt", "pytorch_model.bin", "optimizer.pt", "optimizer/unit-00000.pt",
                "ref/pytorch_model.bin", "training_args.bin"):
        os.makedirs(os.path.dirname(os.path.join(ck, rel)), exist_ok=True)
        torch.save(Payload(marker), os.path.join(ck, rel))
    train(cfg3(base, out))
    assert not marker.exists()
    assert_same_weights(checkpoint.checkpoint_dir(str(out), 2), checkpoint.checkpoint_dir(str(run3), 2))
    # a checkpoint of the older pickle format (no manifest) is named and refused, never unpickled
    old = tmp_path / "old"
    shutil.copytree(ck, checkpoint.checkpoint_dir(str(old), 1))
    os.remove(checkpoint.checkpoint_dir(str(old), 1) + "/manifest.json")
    with pytest.raises(checkpoint.CheckpointError, match=r"no usable checkpoint.*no manifest.json \(an older comal's"):
        train(cfg3(base, old))
    assert not marker.exists()


# ---------------------------------------------------------------------------
# 2. Non-finite gradients and weights
# ---------------------------------------------------------------------------


def snapshot(model):
    if getattr(model, "flat_units", None):
        return [u.shard.detach().clone() for u in model.flat_units]
    return [p.detach().clone() for p in model.parameters()]


def nan_worker(rank, world, init_file, parallel, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = ddp_model(torch.float32)
    if parallel == "fsdp":
        fsdp.shard_model(model, rank, world)
    trainer = train_ddp.trainer_for(model, dict(config.load_config(None, []), **TRAIN_CFG), rank, world)
    trainer.last_checkpoint = "runs/x/checkpoints/iter-00002"
    ids = global_batches(1)[0].chunk(world)[rank]
    first = next(model.parameters())

    def losses(extra):  # the extra term on the first micro-batch only
        for i, loss in enumerate(micro_losses(model, ids)):
            yield loss + extra() if i == 0 else loss

    results = {}
    before = snapshot(model)
    # rank 1: a finite loss (sqrt(0) = 0) whose gradient is NaN (0.5 / sqrt(0) * 0)
    nan_grad = lambda: torch.sqrt(0.0 * first.sum()) if rank == 1 else 0.0  # noqa: E731
    # both ranks: finite gradients whose all-reduced sum overflows float32 (3e38 + 3e38)
    overflow = lambda: 3e38 * (first.flatten()[0] - first.flatten()[0].detach())  # noqa: E731
    for name, extra in (("nan", nan_grad), ("overflow", overflow)):
        try:
            trainer.step(losses(extra), 3, 1, 10)
            results[name] = None
        except train_ddp.TrainingError as e:
            results[name] = str(e)
        results[name + "_unchanged"] = all(torch.equal(a, b) for a, b in zip(before, snapshot(model)))
    results["optimizer_state"] = len(trainer.optimizer.state)
    trainer.step(losses(lambda: 0.0), 3, 1, 10)  # a good step afterwards does move the weights
    results["good_moves"] = not all(torch.equal(a, b) for a, b in zip(before, snapshot(model)))
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_non_finite_gradient_with_finite_loss_stops_every_rank_before_the_update(tmp_path, parallel):
    out = str(tmp_path / "r")
    spawn(nan_worker, args=(2, str(tmp_path / "init"), parallel, out), nprocs=2)
    for rank in range(2):
        r = torch.load(f"{out}.{rank}")
        assert r["nan"] == ("non-finite gradient (finite loss) at iteration 3 step 1 on rank(s) [1]; the weights were "
                            "not updated; last good checkpoint: runs/x/checkpoints/iter-00002"), r["nan"]
        if parallel == "ddp":  # each rank's own gradient is finite; their reduced sum is not
            assert r["overflow"].startswith("non-finite gradient norm (inf) at iteration 3 step 1 on every rank"), r
        else:  # sharded: reduce-scatter happens during backward, where the overflow is seen as a local gradient
            assert r["overflow"] is not None and "at iteration 3 step 1" in r["overflow"], r
        assert r["nan_unchanged"] and r["overflow_unchanged"] and r["optimizer_state"] == 0
        assert r["good_moves"]


def test_a_nan_gradient_mid_run_leaves_the_last_good_checkpoint_and_the_run_resumes(base, run3, tmp_path,
                                                                                    monkeypatch):
    out = tmp_path / "out"
    flag = {"on": False}
    real_iteration, real_load = comal.iteration, train_ddp.load_models

    def iteration(k, *a, **kw):
        flag["on"] = k == 1
        return real_iteration(k, *a, **kw)

    def load_models(*a, **kw):
        state, trainer = real_load(*a, **kw)
        w = state["policy"].model.embed_tokens.weight
        w.register_hook(lambda g: g * float("nan") if flag["on"] else g)
        return state, trainer

    monkeypatch.setattr(comal, "iteration", iteration)
    monkeypatch.setattr(train_ddp, "load_models", load_models)
    with pytest.raises(train_ddp.TrainingError, match=r"non-finite gradient \(finite loss\) at iteration 1 step 0 on "
                                                      r"rank\(s\) \[0\].*last good checkpoint: .*iter-00000"):
        train(cfg3(base, out))
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(out))] == ["iter-00000"]
    monkeypatch.undo()
    train(cfg3(base, out))  # no crash loop: it resumes from iteration 1 and ends as the uninterrupted run
    assert_same_weights(checkpoint.checkpoint_dir(str(out), 2), checkpoint.checkpoint_dir(str(run3), 2))
    assert log_lines(out) == log_lines(run3)


def test_an_optimizer_overflow_stops_like_a_non_finite_gradient(base, tmp_path, monkeypatch):
    """A learning rate past what AdamW can apply (1e300, set behind the config's back): one TrainingError naming
    the iteration, the step and the last good checkpoint; nothing of the iteration is saved."""
    lr_at = train_ddp.Trainer.lr_at
    monkeypatch.setattr(train_ddp.Trainer, "lr_at", lambda self, step, steps: 1e300 if self.last_checkpoint else
                        lr_at(self, step, steps))
    out = tmp_path / "out"
    with pytest.raises(train_ddp.TrainingError, match=r"the optimizer step overflowed at iteration 1 step 0 \(.*overflow"
                       r".*\); the weights are damaged and nothing more is saved; last good checkpoint: .*iter-00000"):
        train(cfg3(base, out))
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(out))] == ["iter-00000"]


def test_non_finite_weights_are_never_saved(base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = AutoModelForCausalLM.from_pretrained(base)
    trainer = train_ddp.Trainer(policy, small_cfg(base, tmp_path))
    trainer.last_checkpoint = "somewhere/iter-00003"
    state = {"policy": policy, "tokenizer": AutoTokenizer.from_pretrained(base)}
    cfg = small_cfg(base, tmp_path)
    assert os.path.isdir(checkpoint.save_checkpoint(str(tmp_path), 3, state, trainer, cfg, []))
    with torch.no_grad():
        policy.model.norm.weight[0] = float("inf")
    with pytest.raises(checkpoint.CheckpointError, match="iteration 4: the weights are not finite; nothing was saved "
                                                         r"\(last good checkpoint: .*iter-00003\)"):
        checkpoint.save_checkpoint(str(tmp_path), 4, state, trainer, cfg, [])
    assert not os.path.exists(checkpoint.checkpoint_dir(str(tmp_path), 4) + ".tmp")
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(tmp_path))] == ["iter-00003"]


# ---------------------------------------------------------------------------
# 3. The manifest: a bad newest checkpoint is named, skipped, and its iteration redone in place
# ---------------------------------------------------------------------------


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def garble(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("damage", ["delete trainer_state.json", "truncate model.safetensors",
                                    "garble optimizer.safetensors", "garble ref/model.safetensors"])
def test_a_bad_newest_checkpoint_is_named_and_the_previous_one_resumes(base, run3, tmp_path, capsys, damage):
    out = tmp_path / "out"
    shutil.copytree(run3, out)
    verb, rel = damage.split(" ")
    target = os.path.join(checkpoint.checkpoint_dir(str(out), 2), rel)
    {"delete": os.remove, "truncate": truncate, "garble": garble}[verb](target)
    assert checkpoint.verify(checkpoint.checkpoint_dir(str(out), 2)) is not None
    capsys.readouterr()
    train(cfg3(base, out))
    err = capsys.readouterr().err
    assert f"warning: skipped {checkpoint.checkpoint_dir(str(out), 2)}: {rel}" in err
    assert f"resuming from {checkpoint.checkpoint_dir(str(out), 1)}" in err
    # iteration 2 redone and saved over the bad directory: the same bytes as the uninterrupted run
    assert checkpoint.verify(checkpoint.checkpoint_dir(str(out), 2)) is None
    assert_same_weights(checkpoint.checkpoint_dir(str(out), 2), checkpoint.checkpoint_dir(str(run3), 2))
    assert log_lines(out) == log_lines(run3)
    assert sorted(os.listdir(out / "checkpoints")) == ["iter-00000", "iter-00001", "iter-00002"]


def test_keep_checkpoints_keeps_the_newest_and_never_the_one_just_written(base, run3, tmp_path, monkeypatch):
    """keep_checkpoints: 1 on a run whose iterations 1 and 2 were damaged: it resumes from iteration 0; after
    iteration 1 only iter-00001 of the checkpoints up to it remains (the damaged iter-00002 waits to be
    overwritten: it is not newer than what was just written), after iteration 2 only iter-00002."""
    out = tmp_path / "out"
    shutil.copytree(run3, out)
    for k in (1, 2):
        truncate(os.path.join(checkpoint.checkpoint_dir(str(out), k), "model.safetensors"))
    after, prune = [], checkpoint.prune
    names = lambda: [os.path.basename(p) for p in checkpoint.list_checkpoints(str(out))]  # noqa: E731
    monkeypatch.setattr(checkpoint, "prune", lambda *a: (prune(*a), after.append(names())))
    train(cfg3(base, out, keep_checkpoints=1))
    assert after == [["iter-00001", "iter-00002"], ["iter-00002"]], after
    assert_same_weights(checkpoint.checkpoint_dir(str(out), 2), checkpoint.checkpoint_dir(str(run3), 2))


@pytest.mark.parametrize("keep", [1, 2, 3, 7])
def test_prune_keeps_exactly_the_newest_checkpoints(tmp_path, keep):
    for k in (0, 1, 2, 3, 5, 9):  # 9: a later, damaged one the run will overwrite
        os.makedirs(tmp_path / "checkpoints" / f"iter-{k:05d}")
        (tmp_path / "checkpoints" / f"iter-{k:05d}" / "manifest.json").write_text("{}")
    os.makedirs(tmp_path / "checkpoints" / "iter-00004")  # unfinished (no manifest): not a checkpoint to count
    checkpoint.prune(str(tmp_path), 5, keep)
    left = sorted(d for d in os.listdir(tmp_path / "checkpoints") if d.startswith("iter-"))
    assert left == sorted(["iter-00004", "iter-00009"] + [f"iter-{k:05d}" for k in (0, 1, 2, 3, 5)][-keep:]), left


def test_a_torn_last_metrics_line_is_dropped_and_an_earlier_bad_line_is_named(base, run3, tmp_path, capsys):
    """A full disk while a step row is appended leaves a torn last line: the rerun drops it with one warning
    and resumes bitwise; a bad line that is not the last is an error naming the file and line."""
    out = tmp_path / "out"
    shutil.copytree(run3, out)
    shutil.rmtree(checkpoint.checkpoint_dir(str(out), 2))  # killed in iteration 2, after two step rows
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    logged = [x for x in lines if json.loads(x)["iteration"] < 2] + [x for x in lines if '"iteration": 2, "step"' in x][:2]
    torn = '{"iteration": 2, "step": 2, "loss": 0.69'
    (out / "metrics.jsonl").write_text("".join(logged) + torn)
    capsys.readouterr()
    train(cfg3(base, out))
    err = capsys.readouterr().err
    assert f"warning: dropped the torn last line {len(logged) + 1} of {out / 'metrics.jsonl'}" in err, err
    assert_same_weights(checkpoint.checkpoint_dir(str(out), 2), checkpoint.checkpoint_dir(str(run3), 2))
    assert log_lines(out) == log_lines(run3)
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:3] + [torn + "\n"] + lines[3:]))
    shutil.rmtree(checkpoint.checkpoint_dir(str(out), 2))
    with pytest.raises(checkpoint.CheckpointError, match=r"metrics.jsonl line 4 is not a JSON record .*fix or delete"):
        train(cfg3(base, out))


def rehash(ckpt, rel):
    """Update the manifest entry of `rel` after an edit (what a doctored checkpoint would do)."""
    m = json.loads((ckpt / "manifest.json").read_text())
    f = ckpt / rel
    m["files"][rel] = {"bytes": os.path.getsize(f), "sha256": checkpoint.sha256_file(str(f))}
    (ckpt / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("said", [99, 1])
def test_a_checkpoint_whose_iteration_disagrees_is_skipped(base, run3, tmp_path, capsys, said):
    """trainer_state.json of iter-00002 edited to iteration 99 (would end the run) or 1 (would redo iteration 2
    from iteration 3's weights), its manifest hash updated: the three iterations disagree, the checkpoint is
    skipped with the usual warning and the run redoes iteration 2 from iter-00001, as the uninterrupted run."""
    out = tmp_path / "out"
    shutil.copytree(run3, out)
    ckpt = out / "checkpoints" / "iter-00002"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps(dict(state, iteration=said)))
    rehash(ckpt, "trainer_state.json")
    capsys.readouterr()
    train(cfg3(base, out))
    err = capsys.readouterr().err
    assert (f"warning: skipped {ckpt}: its iteration disagrees: manifest.json says 2, trainer_state.json says "
            f"{said}, the directory name says 2; resuming from {out / 'checkpoints' / 'iter-00001'}") in err, err
    assert_same_weights(str(ckpt), checkpoint.checkpoint_dir(str(run3), 2))
    assert log_lines(out) == log_lines(run3)


@pytest.mark.parametrize("entry", ["../../../../../../etc/hostname", "/etc/hostname", "link"])
def test_manifest_entries_outside_the_checkpoint_are_refused(run3, tmp_path, entry):
    ckpt = tmp_path / "iter-00002"
    shutil.copytree(checkpoint.checkpoint_dir(str(run3), 2), ckpt)
    os.symlink("/etc/hostname", ckpt / "link")
    m = json.loads((ckpt / "manifest.json").read_text())
    m["files"][entry] = {"bytes": os.path.getsize("/etc/hostname"), "sha256": checkpoint.sha256_file("/etc/hostname")}
    (ckpt / "manifest.json").write_text(json.dumps(m))
    assert checkpoint.verify(str(ckpt)) == f"manifest entry {entry!r} is outside the checkpoint"


@pytest.mark.slow
def test_eval_run_holds_off_pruning_while_it_reads_the_checkpoints(base, run3, tmp_path, monkeypatch):
    """keep_checkpoints prunes while eval.py --run reads the run (here: as eval starts sampling each model):
    nothing is deleted while eval holds its readers' lock, eval reads every checkpoint it listed, and the
    next prune after it ends deletes them."""
    import eval as ev

    out = tmp_path / "out"
    shutil.copytree(run3, out)
    generate = ev.generate_for

    def trainer_prunes_meanwhile(name, *a, **kw):
        checkpoint.prune(str(out), 2, 1)
        return generate(name, *a, **kw)

    monkeypatch.setattr(ev, "generate_for", trainer_prunes_meanwhile)
    rows = ev.main(["--run", str(out), "--num-prompts", "2", "--samples", "1"])
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert len(checkpoint.list_checkpoints(str(out))) == 3
    checkpoint.prune(str(out), 2, 1)
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(out))] == ["iter-00002"]


def test_no_good_checkpoint_stops_with_one_line(base, run3, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run3, out)
    for p in checkpoint.list_checkpoints(str(out)):
        os.remove(os.path.join(p, "trainer_state.json"))
    with pytest.raises(checkpoint.CheckpointError, match="no usable checkpoint in .*iter-00002: trainer_state.json is "
                                                         "missing.*iter-00000: trainer_state.json is missing"):
        train(cfg3(base, out))


def test_replace_dir_swaps_a_directory_of_the_same_iteration(tmp_path):
    path, tmp = tmp_path / "iter-00001", tmp_path / "iter-00001.tmp"
    os.makedirs(path / "sub")
    (path / "old.txt").write_text("old")
    os.makedirs(tmp)
    (tmp / "new.txt").write_text("new")
    checkpoint.replace_dir(str(tmp), str(path))
    assert sorted(os.listdir(tmp_path)) == ["iter-00001"] and os.listdir(path) == ["new.txt"]


# ---------------------------------------------------------------------------
# 4. Resume semantics and the config
# ---------------------------------------------------------------------------


def test_resume_never_refuses_a_run_and_an_explicit_checkpoint_continues_bitwise(base, run3, tmp_path):
    with pytest.raises(config.ConfigError, match=r"resume=never: out_dir .* already holds a run \(metrics.jsonl, "
                                                    "config.yaml, checkpoints\\)"):
        cfg3(base, run3, resume="never")
    assert len(checkpoint.list_checkpoints(str(run3))) == 3  # untouched
    # continue from iteration 0's checkpoint (mid-round: its pi_ref is pi^0, not the policy) in a new out_dir
    ck0 = checkpoint.checkpoint_dir(str(run3), 0)
    train(cfg3(base, tmp_path / "branch", resume=ck0))
    assert_same_weights(checkpoint.checkpoint_dir(str(tmp_path / "branch"), 2), checkpoint.checkpoint_dir(str(run3), 2))
    # ... but not into the run it came from, over its later checkpoints
    with pytest.raises(checkpoint.CheckpointError, match="already has checkpoints after iteration 0 .newest iter-00002."):
        train(cfg3(base, run3, resume=ck0))
    with pytest.raises(config.ConfigError, match="is not a finished checkpoint directory"):
        cfg3(base, tmp_path, resume=str(tmp_path))


@pytest.mark.slow
def test_checkpoint_every_skips_iterations_and_a_resume_redoes_them_bitwise(base, run3, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train(cfg3(base, out, checkpoint_every=2))  # saves after iteration 1 (the 2nd) and 2 (the last), not 0
    names = lambda d: [os.path.basename(p) for p in checkpoint.list_checkpoints(str(d))]
    assert names(out) == ["iter-00001", "iter-00002"]
    lines = [(x, json.loads(x)) for x in (out / "metrics.jsonl").read_text().splitlines(keepends=True)]
    assert [m["checkpoint"] for _, m in lines if "step" not in m and m["iteration"] >= 0] == \
        [None, checkpoint.checkpoint_dir(str(out), 1), checkpoint.checkpoint_dir(str(out), 2)]
    assert_same_weights(checkpoint.checkpoint_dir(str(out), 2), checkpoint.checkpoint_dir(str(run3), 2))
    assert log_lines(out) == log_lines(run3)
    upto = lambda k: "".join(x for x, m in lines if m["iteration"] < k or
                             m["iteration"] == k and "step" in m)  # what a kill in iteration k leaves
    for kill, keep in ((2, 1), (1, None)):  # killed in iteration 2: resume at 2; in 1: iteration 0 was never saved
        run = tmp_path / f"kill{kill}"
        shutil.copytree(out, run)
        for k in range(3):
            if keep is None or k > keep:
                shutil.rmtree(checkpoint.checkpoint_dir(str(run), k), ignore_errors=True)
        (run / "metrics.jsonl").write_text(upto(kill))
        train(cfg3(base, run, checkpoint_every=2))
        assert_same_weights(checkpoint.checkpoint_dir(str(run), 2), checkpoint.checkpoint_dir(str(run3), 2))
        assert log_lines(run) == log_lines(run3)  # the redone iterations' lines once, as in one run
    # a stop signal at the end of iteration 0 saves it although it is not due, and the rerun continues from it
    step = train_ddp.Trainer.step

    def step_then_signal(self, micro_losses, k, i, steps):
        loss = step(self, micro_losses, k, i, steps)
        if k == 0 and i == steps - 1:
            train_ddp.STOP["signal"] = "SIGTERM"
        return loss

    stopped = tmp_path / "stopped"
    monkeypatch.setattr(train_ddp.Trainer, "step", step_then_signal)
    try:
        with pytest.raises(train_ddp.Preempted, match="the end of iteration 0; .* continue from .*iter-00000"):
            train(cfg3(base, stopped, checkpoint_every=2))
    finally:
        train_ddp.STOP["signal"] = None
    assert names(stopped) == ["iter-00000"]
    monkeypatch.setattr(train_ddp.Trainer, "step", step)
    train(cfg3(base, stopped, checkpoint_every=2))
    assert names(stopped) == ["iter-00000", "iter-00001", "iter-00002"]
    assert_same_weights(checkpoint.checkpoint_dir(str(stopped), 2), checkpoint.checkpoint_dir(str(run3), 2))
    assert log_lines(stopped) == log_lines(run3)


def test_a_changed_config_is_refused_on_resume_unless_named(base, run3, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run3, out)
    shutil.rmtree(checkpoint.checkpoint_dir(str(out), 2))
    first = (out / "config.yaml").read_text()
    for change, needle in ((dict(lr=2e-3), r"lr \(0.001 -> 0.002\)"), (dict(algo="inpo"), "algo .'comal' -> 'inpo'."),
                           (dict(eta=1.0), r"eta \(2.0 -> 1.0\)"), (dict(seed=1), "seed"),
                           (dict(batch_size=8), "batch_size")):
        with pytest.raises(config.ConfigError, match=r"resume: the config differs from .*iter-00001's in " + needle):
            train(cfg3(base, out, **change))
    with pytest.raises(config.ConfigError, match="resume_changes: \\['lrr'\\] are not config keys"):
        cfg3(base, out, resume_changes=["lrr"])
    assert (out / "config.yaml").read_text() == first
    train(cfg3(base, out, lr=2e-3, resume_changes=["lr"], iterations=3))  # named: it continues
    assert (out / "config.yaml").read_text() == first  # the first segment's config is kept
    seg = yaml.safe_load((out / "config-resumed-at-00002.yaml").read_text())
    assert seg["lr"] == 2e-3 and seg["resume_changes"] == ["lr"]
    state = checkpoint.read_state(checkpoint.checkpoint_dir(str(out), 2))
    assert state["config"]["lr"] == 2e-3 and state["iteration"] == 2


# ---------------------------------------------------------------------------
# 5. One run per out_dir; bad input through the real command line
# ---------------------------------------------------------------------------


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_ddp.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_a_second_run_on_a_locked_out_dir_gets_one_line(base, tmp_path, capsys):
    out = tmp_path / "out"
    held = checkpoint.lock_out_dir(str(out))  # this process is "the other run" (flock: per open file)
    assert train_ddp.cli([os.path.join(ROOT, "configs", "tiny.yaml"), f"model={base}", f"out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"error: out_dir {out} is in use by another run (pid {os.getpid()} on host {os.uname().nodename} since "
        f"{err.split(' since ')[1].split(')')[0]}); wait for it to end or choose another out_dir"]
    assert not (out / "metrics.jsonl").exists()
    held.close()  # the holder ends (kill -9 releases it the same way): its file stays, the lock does not
    again = checkpoint.lock_out_dir(str(out))
    assert f"pid {os.getpid()}" in (out / "run.lock").read_text()
    again.close()


def test_input_errors_name_the_line(base, tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("lr: 1e-3\nalgo: comal\n  eta: [1, 2\n")
    with pytest.raises(config.ConfigError, match=r"bad.yaml is not valid YAML at line 3"):
        config.load_config(str(bad_yaml), [])
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "c",}\n')
    with pytest.raises(config.ConfigError, match=r"prompts: line 4 of .*p.jsonl is not valid JSON"):
        config.load_prompts(dict(config.load_config(None, []), prompts=str(rows)))
    rows.write_text('{"prompt": "a"}\n\n{"prompt": "  "}\n')
    with pytest.raises(config.ConfigError, match=r"prompts: line 3 of .*p.jsonl has an empty 'prompt'"):
        config.load_prompts(dict(config.load_config(None, []), prompts=str(rows)))


def test_long_prompts_keep_the_chat_template(base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)  # template: <|bos|><|user|>{instruction}<|assistant|>
    short = "which do you pick?"
    long = " ".join(["rock paper scissors"] * 40) + " " + short
    full, = config.encode_prompts(tok, [long], 10_000)
    cut = []
    ids, ok = config.encode_prompts(tok, [long, short], 24, cut)
    assert len(full) > 24 and len(ids) == 24 and cut == [0]
    text = tok.decode(ids).replace(" ", "")
    assert text.startswith("<|bos|><|user|>") and text.endswith("whichdoyoupick?<|assistant|>"), text
    assert not tok.decode(full[-24:]).startswith("<|bos|>")  # a plain left cut would have lost the head
    assert ok == config.encode_prompts(tok, [short], 10_000)[0]  # a prompt that fits is unchanged
    with pytest.raises(config.ConfigError, match="shorter than the chat template alone"):
        config.encode_prompts(tok, [long], 3)


def test_metrics_hold_strict_json():
    rec = {"loss": float("nan"), "x": [1.0, float("inf")], "y": {"z": float("-inf")}, "k": 3}
    assert checkpoint.json_safe(rec) == {"loss": None, "x": [1.0, None], "y": {"z": None}, "k": 3}
    json.dumps(checkpoint.json_safe(rec), allow_nan=False)


# ---------------------------------------------------------------------------
# 6. Preemption: SIGTERM stops every rank at the next step, exit 0, the rerun ends bitwise equal
# ---------------------------------------------------------------------------


def wait_for_step(out, k, proc, timeout=240):
    """Block until metrics.jsonl has an optimizer step of iteration k."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert (proc.is_alive() if hasattr(proc, "is_alive") else proc.poll() is None), "the run ended first"
        if (out / "metrics.jsonl").exists():
            for line in open(out / "metrics.jsonl"):
                if line.strip() and json.loads(line).get("iteration") == k and "step" in json.loads(line):
                    return
        time.sleep(0.05)
    raise AssertionError("no step logged")


def write_cfg(cfg, path):
    with open(path, "w") as f:
        yaml.safe_dump({k: v for k, v in cfg.items() if k != "out_dir"}, f)
    return path


def stopped_where(line, out):
    """The checkpoints a stop during iteration 1 leaves: the next optimizer step abandons the iteration; a signal
    that lands after its last step stops the run once iteration 1 is saved."""
    if line.startswith("stopped by SIGTERM at iteration 1 step "):
        assert "the iteration is abandoned" in line and f"redo it from {checkpoint.checkpoint_dir(str(out), 0)}" in line
        return ["iter-00000"]
    assert line.startswith("stopped by SIGTERM at the end of iteration 1; rerun the same command"), line
    return ["iter-00000", "iter-00001"]


@pytest.mark.slow
def test_sigterm_stops_at_the_next_step_and_the_rerun_is_bitwise(base, run3, tmp_path):
    out = tmp_path / "out"
    cfg_file = write_cfg(cfg3(base, out), tmp_path / "c.yaml")
    from conftest import start

    proc = start("train_ddp", [str(cfg_file), f"out_dir={out}"], tmp_path / "err.txt")  # `python train_ddp.py ...`
    wait_for_step(out, 1, proc)
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(timeout=120)
    err = (tmp_path / "err.txt").read_text()
    assert proc.exitcode == 0, err
    assert "Traceback" not in err
    expect = stopped_where(err.strip().splitlines()[-1], out)
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(out))] == expect
    assert not (out / "checkpoints" / "iter-00001.tmp").exists()
    train(config.check_config(config.load_config(str(cfg_file), [f"out_dir={out}"]), 1))  # the same command, rerun
    assert_same_weights(checkpoint.checkpoint_dir(str(out), 2), checkpoint.checkpoint_dir(str(run3), 2))
    assert log_lines(out) == log_lines(run3)


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_both_ranks_and_resumes_bitwise(torchrun_run, tmp_path):
    from conftest import launch, torchrun_cmd

    def torchrun(out):
        return subprocess.Popen(torchrun_cmd(torchrun_run[3], out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT)

    full, part = torchrun_run[0], tmp_path / "part"  # full: the shared uninterrupted run of the same command
    p = torchrun(part)
    wait_for_step(part, 1, p)
    workers = subprocess.run(["pgrep", "-f", f"train_ddp.py .*out_dir={part}"], capture_output=True, text=True)
    pids = [int(x) for x in workers.stdout.split() if int(x) != p.pid]
    assert len(pids) == 2, workers.stdout
    for pid in pids:  # what a scheduler's notice to the training processes does
        os.kill(pid, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert err.count("stopped by SIGTERM at") == 1, err  # rank 0 prints, once
    assert "Traceback" not in err
    stop = [x for x in err.splitlines() if x.startswith("stopped by")][0]
    assert [os.path.basename(c) for c in checkpoint.list_checkpoints(str(part))] == stopped_where(stop, part)
    cmd = torchrun_cmd(torchrun_run[3], part)  # the same command again, its ranks forked (conftest.launch)
    status, said, _ = launch("train_ddp", cmd[next(i for i, a in enumerate(cmd) if a.endswith("train_ddp.py")) + 1:],
                             tmp_path / "logs")
    assert status == [0, 0], said
    assert_same_weights(checkpoint.checkpoint_dir(str(part), 2), checkpoint.checkpoint_dir(str(full), 2))
    assert log_lines(part) == log_lines(full)


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_stops_with_one_line(base, run3, tmp_path, monkeypatch):
    """In one process: the write of iteration 1's checkpoint fails (a file size limit: EFBIG from the kernel,
    through Python's and safetensors' writes alike); one CheckpointError names the cause and the last good
    checkpoint; the .tmp is left, ignored by the rerun, which then ends as the uninterrupted run."""
    import resource

    out, limit, save = tmp_path / "out", resource.getrlimit(resource.RLIMIT_FSIZE), checkpoint.save_checkpoint

    def full_disk_at_1(out_dir, k, *a):
        if k == 1:
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))
        try:
            return save(out_dir, k, *a)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)

    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    monkeypatch.setattr(checkpoint, "save_checkpoint", full_disk_at_1)
    try:
        with pytest.raises(checkpoint.CheckpointError, match=r"iteration 1: its checkpoint could not be written to .*"
                           r"iter-00001.tmp \(.*File too large.*\); nothing of it is saved; last good checkpoint: "
                           r".*iter-00000$"):
            train(cfg3(base, out))
    finally:
        signal.signal(signal.SIGXFSZ, handler)
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(out))] == ["iter-00000"]
    assert os.path.isdir(checkpoint.checkpoint_dir(str(out), 1) + ".tmp")
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    train(cfg3(base, out))
    assert_same_weights(checkpoint.checkpoint_dir(str(out), 2), checkpoint.checkpoint_dir(str(run3), 2))
    assert log_lines(out) == log_lines(run3)


def full_disk_at_iteration_1(rank):
    """From iteration 1's checkpoint on, every write past 4 KiB fails (EFBIG from the kernel, as a full disk)."""
    import resource

    save = checkpoint.save_checkpoint

    def full_disk(out_dir, k, *a):
        if k == 1:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return save(out_dir, k, *a)

    checkpoint.save_checkpoint = full_disk


@pytest.mark.slow
def test_a_full_disk_with_two_sharded_ranks_prints_one_line_from_rank_0(base, tmp_path):
    """Two fsdp ranks (every rank gathers, rank 0 writes): the disk fills at iteration 1's checkpoint; the ranks
    stay in step through the gathers and stop together with exit status 2; rank 0 prints one line, rank 1
    nothing."""
    from conftest import launch

    out = tmp_path / "out"
    argv = [os.path.join(ROOT, "configs", "tiny.yaml"), f"model={base}", f"out_dir={out}", "iterations=2",
            "prompts_per_iteration=8", "n_samples=4", "batch_size=16", "micro_batch_size=8", "eval_prompts=0",
            "parallel=fsdp"]
    status, said, _ = launch("train_ddp", argv, tmp_path / "logs", patch=full_disk_at_iteration_1)
    assert status == [2, 2]
    last = said[0].strip().splitlines()[-1]
    assert last.startswith("error: iteration 1: its checkpoint could not be written to ") and "File too large" in last
    assert last.endswith("last good checkpoint: " + checkpoint.checkpoint_dir(str(out), 0)), last
    assert "Traceback" not in said[0] and said[1].strip() == "", said
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(out))] == ["iter-00000"]


@pytest.mark.slow
def test_a_full_disk_while_a_step_row_is_appended_stops_at_the_iteration_end(base, run3, tmp_path, monkeypatch):
    """The write of a step row of iteration 1 is cut short (half the line reaches the file, then ENOSPC): the
    run finishes nothing of iteration 1, stops with one line naming metrics.jsonl and the last good
    checkpoint; the rerun drops the torn line and ends as the uninterrupted run."""
    out, append = tmp_path / "out", checkpoint.append_metrics

    def disk_fills(path, record):
        if record.get("iteration") == 1 and record.get("step") == 2:
            line = json.dumps(record)
            with open(path, "a") as f:
                f.write(line[:len(line) // 2])
            raise OSError(28, "No space left on device", path)
        append(path, record)

    monkeypatch.setattr(checkpoint, "append_metrics", disk_fills)
    with pytest.raises(checkpoint.CheckpointError, match=r"iteration 1: metrics.jsonl could not be written \(.*"
                       r"metrics.jsonl: No space left on device\); nothing of iteration 1 is saved; last good "
                       r"checkpoint: .*iter-00000$"):
        train(cfg3(base, out))
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(out))] == ["iter-00000"]
    monkeypatch.setattr(checkpoint, "append_metrics", append)
    train(cfg3(base, out))
    assert_same_weights(checkpoint.checkpoint_dir(str(out), 2), checkpoint.checkpoint_dir(str(run3), 2))
    assert log_lines(out) == log_lines(run3)


def test_write_errors_of_the_rust_libraries_count_as_os_errors():
    """What the checkpoint writes can raise on a full disk: an OSError, safetensors' SafetensorError, tokenizers'
    plain Exception with "(os error N)"; anything else is a bug and propagates."""
    from safetensors import SafetensorError

    assert checkpoint.is_os_error(OSError(28, "No space left on device"))
    assert checkpoint.is_os_error(SafetensorError("Error while serializing: I/O error: No space left on device"))
    assert checkpoint.is_os_error(Exception("File too large (os error 27)"))
    assert not checkpoint.is_os_error(ValueError("tensor is not contiguous"))


def test_an_unusable_out_dir_is_one_line(base, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(checkpoint.CheckpointError, match=r"out_dir .*/file is a file, not a directory; choose another"):
        train(cfg3(base, tmp_path / "file"))
    real = open

    def read_only(path, *a, **kw):  # a read-only mount: creating the lock file fails
        if str(path).endswith("run.lock"):
            raise OSError(30, "Read-only file system", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr("builtins.open", read_only)
    with pytest.raises(checkpoint.CheckpointError, match=r"out_dir .*/ro cannot be written \(.*run.lock: Read-only file "
                                                          r"system\); choose another out_dir"):
        train(cfg3(base, tmp_path / "ro"))


@pytest.mark.slow
def test_config_errors_under_torchrun_print_one_line_from_rank_0(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train_ddp.py"), os.path.join(ROOT, "configs", "tiny.yaml"), "lr=-1",
           f"out_dir={tmp_path}"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    ours = [x for x in r.stderr.splitlines() if x.startswith("error")]
    assert ours == ["error: lr must be a finite number in (0, 1], got -1"], r.stderr
    assert "exitcode  : 2" in r.stderr  # torchrun reports rank 0's exit status 2 as the root cause
