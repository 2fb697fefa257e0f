"""train_ddp.py and comal.py: hand-written DDP vs one process and torch DDP, exact resume,
every algorithm on a tiny model, config validation, non-finite losses."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import config
import checkpoint
import comal
import examples
import fsdp
import opponents
import oracle as oracle_lib
import tiny
import train_ddp
from conftest import spawn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_cfg(base, out_dir, **kw):
    """A small config; eta, tau and ref_update_every only where the algorithm reads them."""
    cfg = config.load_config(None, [])
    cfg.update(model=base, out_dir=str(out_dir), iterations=2, prompts_per_iteration=8, n_samples=4, max_new_tokens=6,
               lr=1e-3, batch_size=16, micro_batch_size=8, eval_prompts=2, num_subsets=3)
    reads = comal.ALGOS[kw.get("algo", cfg["algo"])].keys
    cfg.update({k: v for k, v in dict(eta=2.0, tau=0.1, ref_update_every=2).items() if k in reads})
    cfg.update(kw)
    return config.check_config(cfg, 1)


# ---------------------------------------------------------------------------
# Hand-written DDP == one process == torch DDP
# ---------------------------------------------------------------------------

# grad_clip far above the gradient norms (about 8): clipping would rescale a wrong gradient to the right one
TRAIN_CFG = dict(lr=1e-2, weight_decay=0.01, warmup_ratio=0.25, grad_clip=50.0, bucket_mb=1, dtype="float32")


def ddp_model(dtype=torch.float64):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(cfg).to(dtype)  # fp64: summation order (2 ranks vs 1) must not show at 1e-6 after Adam


def global_batches(steps=3, rows=8, T=10):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 50, (rows, T), generator=g) for _ in range(steps)]


def micro_losses(model, ids, micro=2):
    """Mean negative log-likelihood of the rows `ids`, in micro-batches (accumulated, no sync)."""
    from sample import sequence_logprobs

    mask = torch.ones_like(ids)
    resp = mask.clone()
    resp[:, :3] = 0
    for s in range(0, len(ids), micro):
        yield -sequence_logprobs(model, ids[s:s + micro], mask[s:s + micro], resp[s:s + micro])[1].sum() / len(ids)


def run_trainer(rank, world, batches):
    model = ddp_model()
    if rank == 1:  # rank 1 starts from other weights: the broadcast from rank 0 must fix that
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    trainer = train_ddp.Trainer(model, dict(config.load_config(None, []), **TRAIN_CFG), rank, world)
    for step, ids in enumerate(batches):
        local = ids.chunk(world)[rank]
        trainer.step(micro_losses(model, local), 0, step, len(batches))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_torch_ddp(rank, world, batches):
    from torch.nn.parallel import DistributedDataParallel as DDP  # the reference only

    model = ddp_model()
    ddp = DDP(model)
    t = train_ddp.Trainer(model, dict(config.load_config(None, []), **TRAIN_CFG), 0, 1)  # for its lr schedule
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.01},
                             {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}], lr=1e-2)
    for step, ids in enumerate(batches):
        local = ids.chunk(world)[rank]
        opt.zero_grad()
        parts = list(range(0, len(local), 2))
        for i, s in enumerate(parts):
            ctx = ddp.no_sync() if i < len(parts) - 1 else torch.enable_grad()
            with ctx:
                loss = next(micro_losses(ddp.module, local[s:s + 2], micro=2)) * 2 / len(local)
                # DDP's hooks need the wrapper's forward: run it once for the graph
                out = ddp(input_ids=local[s:s + 2]).logits.sum() * 0
                (loss + out).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN_CFG["grad_clip"])
        for group in opt.param_groups:
            group["lr"] = t.lr_at(step, len(batches))
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def ddp_worker(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    batches = global_batches()
    mine = run_trainer(rank, world, batches)
    dist.barrier()
    ref = run_torch_ddp(rank, world, batches)
    if rank == 0:
        torch.save({"mine": mine, "torch_ddp": ref}, out_file)
    dist.destroy_process_group()


@pytest.mark.slow
def test_hand_written_ddp_equals_one_process_and_torch_ddp(tmp_path):
    out = tmp_path / "params.pt"
    spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2)
    got = torch.load(out)
    single = run_trainer(0, 1, global_batches())
    start = ddp_model().state_dict()
    moved = max(float((single[k] - start[k]).abs().max()) for k in single)
    assert moved > 1e-3  # the steps did something
    for k in single:
        assert torch.allclose(got["mine"][k], single[k], atol=1e-6, rtol=0), k
        assert torch.allclose(got["mine"][k], got["torch_ddp"][k], atol=1e-6, rtol=0), k


def test_buckets_cover_every_parameter_once():
    params = list(ddp_model().parameters())
    buckets = train_ddp.make_buckets(params, 20_000)
    assert len(buckets) > 1 and [p for b in buckets for p in b] == params
    assert all(sum(p.numel() * 4 for p in b) <= 20_000 or len(b) == 1 for b in buckets)


# ---------------------------------------------------------------------------
# End to end: metrics, checkpoints, exact resume, the real torchrun path
# ---------------------------------------------------------------------------


def final_weights(out_dir, k):
    m = AutoModelForCausalLM.from_pretrained(checkpoint.checkpoint_dir(str(out_dir), k))
    return m.state_dict()


def test_resume_is_bitwise_and_checkpoints_load(base, tmp_path):
    # rounds of 3: the resume at iteration 2 is mid-round, where pi_ref (pi^0) must come from the checkpoint
    full = small_cfg(base, tmp_path / "full", iterations=3, algo="comal", ref_update_every=3)
    train_ddp.train(full, 0, 1, torch.device("cpu"))
    part = small_cfg(base, tmp_path / "part", iterations=2, algo="comal", ref_update_every=3)
    train_ddp.train(part, 0, 1, torch.device("cpu"))
    # the interrupted run left a half-written temp checkpoint and a partial log line behind
    os.makedirs(checkpoint.checkpoint_dir(str(tmp_path / "part"), 2) + ".tmp")
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 2, "step": 0, "loss": 9.9}) + "\n")
    train_ddp.train(small_cfg(base, tmp_path / "part", iterations=3, algo="comal", ref_update_every=3), 0, 1,
                    torch.device("cpu"))
    a, b = final_weights(tmp_path / "full", 2), final_weights(tmp_path / "part", 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], AutoModelForCausalLM.from_pretrained(base).state_dict()[k]) for k in a)
    # the resumed log equals the uninterrupted one, line for line, except timings
    def lines(d):
        drop = ("seconds", "sample_s", "judge_s", "train_s", "tokens_per_s", "checkpoint")
        return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in open(d / "metrics.jsonl")]
    assert lines(tmp_path / "full") == lines(tmp_path / "part")
    rec = [x for x in lines(tmp_path / "full") if "exploitability" in x and x["iteration"] >= 0]
    assert len(rec) == 3 and all(0 <= x["exploitability"] <= 1 for x in rec)
    assert AutoTokenizer.from_pretrained(checkpoint.checkpoint_dir(str(tmp_path / "full"), 2)).pad_token_id == 0
    assert os.path.isfile(tmp_path / "full" / "config.yaml")


def check_torchrun_output(out, stderr, iterations):
    its = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [x["iteration"] for x in its if "exploitability" in x and x["iteration"] >= 0] == list(range(iterations))
    last = f"iteration {iterations - 1:3d}  exploitability"
    assert stderr.count(last) == 1, stderr[-2000:]  # rank 0 prints; rank 1 does not duplicate
    AutoModelForCausalLM.from_pretrained(checkpoint.checkpoint_dir(str(out), iterations - 1))


@pytest.mark.slow
def test_torchrun_two_ranks_end_to_end_ddp(torchrun_run):
    out, stderr, _, _ = torchrun_run  # the shared run: conftest.TORCHRUN_ARGS, parallel ddp
    check_torchrun_output(out, stderr, 3)


@pytest.mark.slow
def test_two_ranks_end_to_end_fsdp_with_winrates(base, tmp_path):
    """`torchrun --nproc_per_node 2 train_ddp.py ...` with parallel fsdp, its ranks forked (conftest.launch)."""
    from conftest import launch

    out = tmp_path / "fsdp"
    argv = [os.path.join(ROOT, "configs", "tiny.yaml"), f"model={base}", f"out_dir={out}", "iterations=2",
            "prompts_per_iteration=8", "n_samples=4", "batch_size=16", "micro_batch_size=8", "eval_prompts=2",
            "parallel=fsdp", "activation_checkpointing=true"]
    status, said, _ = launch("train_ddp", argv, tmp_path / "logs")
    assert status == [0, 0], said
    check_torchrun_output(out, said[0] + said[1], 2)
    assert all(0 <= x["winrate_vs_mu"] <= 1 for x in map(json.loads, open(out / "metrics.jsonl")) if "train_s" in x)


# ---------------------------------------------------------------------------
# Every algorithm: one iteration on a tiny model; the loss decreases on a fixed batch
# ---------------------------------------------------------------------------


def frozen_copy(model):
    import copy

    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


@pytest.mark.parametrize("algo", list(comal.ALGOS))
def test_each_algorithm_runs_and_lowers_its_loss(base, algo, tmp_path):
    spec = comal.ALGOS[algo]
    E = 6 * examples.examples_per_group(spec, {"n_samples": 4, "pair_selection": "all"})  # all in one step
    kw = dict(algo=algo, epochs=6, batch_size=E, micro_batch_size=E, warmup_ratio=0.0, lr=3e-4,
              prompts_per_iteration=6, n_samples=4)
    kw.update({k: v for k, v in dict(eta=1.0, tau=0.2).items() if k in spec.keys})
    if spec.on_policy:  # one step per iteration: the loss is then checked over 6 iterations on fixed prompts
        kw.update(epochs=1, **({"kappa": 1.0} if "kappa" in spec.keys else {}))
    cfg = small_cfg(base, tmp_path, **kw)
    policy = AutoModelForCausalLM.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    state = {"policy": policy, "tokenizer": tok, "ref": frozen_copy(policy) if spec.ref != "none" else None,
             "opponent": frozen_copy(policy) if opponents.OPPONENTS[spec.opponent] and
             opponents.OPPONENTS[spec.opponent].copy else None}
    steps = []
    trainer = train_ddp.Trainer(policy, cfg, 0, 1, log=steps.append)
    prompts = tiny.synthetic_prompts(6, 3)
    ids = config.encode_prompts(tok, prompts, 64)
    before = [p.detach().clone() for p in policy.parameters()]
    for k in range(6 if spec.on_policy else 1):
        m = comal.iteration(k, 1.0 if "eta" in spec.keys else None, 0.2 if spec.tau else None, state, prompts, ids,
                            oracle_lib.CategoryGame(), trainer, cfg)
    assert len(steps) == 6  # one full-batch step per epoch (or per on-policy iteration)
    losses = [s["loss"] for s in steps]
    assert all(map(lambda x: x == x, losses))
    if not spec.on_policy:  # the same fixed batch each time: the loss goes down
        assert losses[-1] < losses[0] - 1e-4, losses
    else:  # fresh samples each iteration, so no fixed loss: the trained policy beats the one it played against
        game = oracle_lib.CategoryGame()
        new, _ = game.policy_distribution(policy.eval(), tok, ids, [tok.eos_token_id], cfg["max_new_tokens"])
        old, _ = game.policy_distribution(state["ref"], tok, ids, [tok.eos_token_id], cfg["max_new_tokens"])
        win = float(((new @ game.extended_payoff()) * old).sum(-1).mean())  # exact P(pi > pi^0), mean over prompts
        assert win > 0.51, win  # 0.518; with the policy-gradient sign flipped 0.482
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert m["response_length"] > 0


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_bfloat16_on_cpu_takes_the_gpu_path(base, tmp_path, parallel):
    """dtype bfloat16 makes on CPU the choices it makes on CUDA (config.compute_dtype): pi_ref in bf16 (fsdp:
    its shards too), the policy's master weights fp32 (fsdp: its gathered weights bf16), forwards under bf16
    autocast; dtype float32 keeps everything fp32."""
    for dtype, want in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        cfg = small_cfg(base, tmp_path / dtype, algo="comal", dtype=dtype, parallel=parallel)
        state, trainer = train_ddp.load_models(cfg, comal.ALGOS["comal"], base, None, 0, 1, torch.device("cpu"))
        if parallel == "fsdp":
            assert {u.shard.dtype for u in state["policy"].flat_units} == {torch.float32}
            assert {u.full.dtype for u in state["policy"].flat_units} == {want}
            assert {u.shard.dtype for u in state["ref"].flat_units} == {want}
        else:
            assert {p.dtype for p in state["policy"].parameters()} == {torch.float32}
            assert {p.dtype for p in state["ref"].parameters()} == {want}
        with trainer.autocast():
            assert torch.is_autocast_enabled("cpu") == (want == torch.bfloat16)
            if want == torch.bfloat16:
                assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def reduce_worker(rank, world, init_file, out):
    """Each rank's bf16 gradient of every weight: 1 on rank 0, 2^-8 on rank 1. Reduced in fp32 their mean is
    (1 + 2^-8) / 2; summed in bf16 first, 1 + 2^-8 rounds to 1 (bf16 keeps 8 significant bits)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = ddp_model(torch.float32)
    fsdp.shard_model(model, rank, world, torch.bfloat16)
    unit = model.flat_units[0]
    unit.gather()
    for p in unit.params:
        p.grad = torch.full_like(p, 1.0 if rank == 0 else 2.0**-8)
    unit.reduce_scatter_grads()
    torch.save({"dtype": str(unit.shard.grad.dtype), "values": unit.shard.grad[:unit.total // world].unique()}, out + str(rank))
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_reduces_bf16_gradients_in_fp32(tmp_path):
    out = str(tmp_path / "grads")
    spawn(reduce_worker, args=(2, str(tmp_path / "init"), out), nprocs=2)
    for r in (0, 1):
        got = torch.load(out + str(r))
        assert got["dtype"] == "torch.float32" and got["values"].tolist() == [(1 + 2.0**-8) / 2], got


def test_pairs_and_winrates_are_what_the_paper_says():
    M = torch.tensor([[[0.5, 0.1, 0.8], [0.9, 0.5, 0.1], [0.2, 0.9, 0.5]],
                      [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]])
    pairs = lambda M, sel: (lambda r, w, v: (r["w"], r["l"], w))(*examples.pair_examples(M, {"pair_selection": sel}))  # noqa: E731
    w, l, weight = pairs(M, "best_worst")
    # group 0: mean win rates [.467, .5, .533] -> best 2, worst 0; group 1 ties -> weight 0
    assert w.tolist()[0] == 2 and l.tolist()[0] == 0 and weight.tolist() == [1.0, 0.0]
    w, l, weight = pairs(M, "all")
    assert len(w) == 12 and torch.allclose(weight.view(2, -1).sum(-1), torch.ones(2, dtype=weight.dtype))
    assert torch.allclose(examples.loo_winrates(M)[0], torch.tensor([0.45, 0.5, 0.55]))
    # the soft-labelled IPO loss over all pairs is minimised at h(i, j) = eta (M[i, j] - 1/2) (eq. 13 in expectation)
    eta = 2.0
    h = torch.zeros(3, 3, requires_grad=True)
    w, l, weight = pairs(M[:1], "all")
    opt = torch.optim.LBFGS([h], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        hs = h - h.T  # antisymmetric log-ratio differences
        loss = (weight * (hs[w, l] - eta / 2) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    hs = (h - h.T).detach()
    i, j = torch.triu_indices(3, 3, 1)
    assert torch.allclose(hs[i, j], eta * (M[0][i, j] - 0.5), atol=1e-5)


def test_eta_tau_schedule_and_rounds():
    cfg = {"eta": [500, 10], "tau": 0.1, "eta_tau": 1 / 3, "algo": "comal", "ref_update_every": 6, "iterations": 18}
    assert comal.round_params(cfg, 0) == (500.0, 1 / 1500) and comal.round_params(cfg, 5)[0] == 10.0
    assert comal.round_length(comal.ALGOS["comal"], cfg) == 6
    assert comal.round_length(comal.ALGOS["mirror_prox"], cfg) == 2  # Mirror-Prox: a round is two half-steps
    assert comal.round_length(comal.ALGOS["inpo"], cfg) == 18  # no reference updates: one round


# ---------------------------------------------------------------------------
# Bad config values and non-finite losses
# ---------------------------------------------------------------------------


def config_error(base, tmp_path, world=1, **kw):
    cfg = config.load_config(None, [])
    cfg.update(model=base, out_dir=str(tmp_path))
    cfg.update(kw)
    with pytest.raises(config.ConfigError) as e:
        config.check_config(cfg, world)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_optimizer_reset_iteration_starts_every_minimisation_without_moments(base, tmp_path, monkeypatch):
    """optimizer_reset: iteration -- AdamW holds no state at the first step of every iteration (each iteration's
    loss minimised from scratch), and keeps it within the iteration; never -- iteration 1 starts from iteration
    0's moments."""
    seen, now = [], {}
    step, adam_step = train_ddp.Trainer.step, torch.optim.AdamW.step

    def spy(self, micro_losses, k, i, steps):
        now.update(k=k, i=i)
        return step(self, micro_losses, k, i, steps)

    def adam_spy(self, *a, **kw):  # the state the first two updates of each iteration start from
        if now["i"] < 2:
            seen.append((now["k"], now["i"], len(self.state)))
        return adam_step(self, *a, **kw)

    monkeypatch.setattr(train_ddp.Trainer, "step", spy)
    monkeypatch.setattr(torch.optim.AdamW, "step", adam_spy)
    runs = {}
    for reset in ("iteration", "never"):
        seen.clear()
        train_ddp.train(small_cfg(base, tmp_path / reset, algo="comal", optimizer_reset=reset), 0, 1, torch.device("cpu"))
        runs[reset] = list(seen)
    n_params = len([p for p in AutoModelForCausalLM.from_pretrained(base).parameters()])
    assert runs["iteration"] == [(0, 0, 0), (0, 1, n_params), (1, 0, 0), (1, 1, n_params)]  # only at the start
    assert runs["never"] == [(0, 0, 0), (0, 1, n_params), (1, 0, n_params), (1, 1, n_params)]
    a, b = final_weights(tmp_path / "iteration", 1), final_weights(tmp_path / "never", 1)
    assert not all(torch.equal(a[k], b[k]) for k in a)  # the moments of iteration 0 change iteration 1's step
    # moments that the next iteration zeroes are not saved; a run resumed without them is bitwise the same
    has = lambda d, k: os.path.isfile(os.path.join(checkpoint.checkpoint_dir(str(d), k), "optimizer.safetensors"))  # noqa: E731
    assert has(tmp_path / "never", 0) and has(tmp_path / "never", 1)
    assert not has(tmp_path / "iteration", 0) and not has(tmp_path / "iteration", 1)
    part = lambda **kw: small_cfg(base, tmp_path / "part", algo="comal", optimizer_reset="iteration", **kw)  # noqa: E731
    train_ddp.train(part(iterations=1), 0, 1, torch.device("cpu"))
    with pytest.raises(config.ConfigError, match="holds no AdamW moments to continue with optimizer_reset=never"):
        train_ddp.train(dict(part(), optimizer_reset="never", resume_changes=["optimizer_reset"]), 0, 1,
                        torch.device("cpu"))
    train_ddp.train(part(), 0, 1, torch.device("cpu"))
    c = final_weights(tmp_path / "part", 1)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_fit_gap_is_the_weighted_least_squares_minimum_and_the_trainers_own_loss(base, tmp_path):
    """comal.fit_gap on COMAL's loss (INPO's eq. 14, all pairs): its minimum over free log-probs equals the
    weighted least-squares solution of the pairs' normal equations (an independent solve); a policy at that
    solution has fit_realised 1, the policy before training 0. In a run (one optimizer step over all examples),
    fit_loss_before is the loss the trainer logged at that step, and the minimum is below the trained loss."""
    spec, cfg = comal.ALGOS["comal"], {"pair_selection": "all"}
    g = torch.Generator().manual_seed(0)
    P, n = 3, 5
    M = torch.rand(P, n, n, generator=g)
    M = torch.where(torch.eye(n, dtype=torch.bool), 0.5, torch.triu(M, 1) + torch.tril(1 - M.transpose(1, 2), -1))
    ex = examples.make_examples(spec, M, cfg)
    mu, ref = -3 * torch.rand(P * n, generator=g, dtype=torch.float64), -3 * torch.rand(P * n, generator=g, dtype=torch.float64)
    frozen = {"mu": mu, "ref": ref, "center": mu, "length": torch.ones(P * n)}
    h = comal.hyper(spec, {"max_new_tokens": 8, **{k: v.default for k, v in comal.KEYS.items()}}, 2.0, 0.2)
    w, lo = ex["rows"]["w"], ex["rows"]["l"]
    target = 0.4 * (ref[w] - ref[lo]) + 0.6 * (mu[w] - mu[lo]) + 1.0  # eq. 14: eta tau, 1 - eta tau, eta / 2
    D = torch.zeros(len(w), P * n, dtype=torch.float64)
    D[torch.arange(len(w)), w] += 1
    D[torch.arange(len(w)), lo] -= 1
    sw = ex["weight"].sqrt()[:, None]
    z = torch.linalg.pinv(sw * D) @ (sw[:, 0] * target)  # (P n,) the normal equations' (minimum-norm) solution
    lsq = float((ex["weight"] * (D @ z - target) ** 2).sum() / ex["weight"].sum())
    at_min = comal.fit_gap(spec, ex, frozen, h, mu, z)
    assert abs(at_min["fit_loss_min"] - lsq) < 1e-9 and abs(at_min["fit_loss_after"] - lsq) < 1e-9
    assert abs(at_min["fit_realised"] - 1) < 1e-6
    assert at_min["fit_loss_before"] > lsq + 0.05  # the samples' minimum is not where mu already is
    assert abs(comal.fit_gap(spec, ex, frozen, h, mu, mu)["fit_realised"]) < 1e-12
    half = comal.fit_gap(spec, ex, frozen, h, mu, (mu + z) / 2)["fit_realised"]  # a quadratic: 3/4 of the decrease
    assert abs(half - 0.75) < 1e-6
    # in a run: one step over all 2 x 4 x 3 = 24 pairs of the iteration
    out = tmp_path / "fit"
    train_ddp.train(small_cfg(base, out, algo="comal", fit_gap=True, prompts_per_iteration=2, batch_size=24,
                              micro_batch_size=12, iterations=1, eval_prompts=0), 0, 1, torch.device("cpu"))
    recs = [json.loads(x) for x in open(out / "metrics.jsonl")]
    step0 = next(r for r in recs if r.get("step") == 0)
    it = next(r for r in recs if "fit_loss_before" in r)
    assert abs(step0["loss"] - it["fit_loss_before"]) < 1e-5 * abs(step0["loss"])
    assert it["fit_loss_min"] < it["fit_loss_after"] and it["fit_loss_min"] < it["fit_loss_before"]
    assert it["fit_realised"] == (it["fit_loss_before"] - it["fit_loss_after"]) / (it["fit_loss_before"] - it["fit_loss_min"])
    # offline (samples from pi_ref): from iteration 1 on the policy is not the sampler; its loss before training
    # comes from its own forward and is again the trainer's first logged loss of the iteration
    out = tmp_path / "fit_offline"
    train_ddp.train(small_cfg(base, out, algo="ipo", fit_gap=True, prompts_per_iteration=2, batch_size=24,
                              micro_batch_size=12, iterations=2, eval_prompts=0), 0, 1, torch.device("cpu"))
    recs = [json.loads(x) for x in open(out / "metrics.jsonl")]
    step0 = next(r for r in recs if r.get("step") == 0 and r["iteration"] == 1)
    it = next(r for r in recs if "fit_loss_before" in r and r["iteration"] == 1)
    assert abs(step0["loss"] - it["fit_loss_before"]) < 1e-5 * abs(step0["loss"])


def test_invalid_config_values_name_the_key(base, tmp_path):
    assert "lr must be a finite number in (0, 1]" in config_error(base, tmp_path, lr=0.0)
    assert "lr must be a finite number in (0, 1]" in config_error(base, tmp_path, lr=-1e-6)
    assert "eta * tau" in config_error(base, tmp_path, eta=10.0, tau=0.1)
    assert "eta * tau" in config_error(base, tmp_path, eta=[1.0, 20.0], tau=0.1)
    assert "eta_tau" in config_error(base, tmp_path, eta_tau=1.0)
    assert "eta must be in (0, 1e+06]" in config_error(base, tmp_path, eta=0.0)
    assert "eta must be in (0, 1e+06]" in config_error(base, tmp_path, eta=1e7)
    assert "tau must be in [0, 1000]" in config_error(base, tmp_path, tau=[0.1, 1e4])
    assert "lr must be a finite number in (0, 1], got 1e+300" in config_error(base, tmp_path, lr=1e300)
    # a batch larger than the iteration: each step would be divided by the batch size, not the examples
    import re

    msg = config_error(base, tmp_path, batch_size=2**20, micro_batch_size=8)
    m = re.search(r"batch_size 1048576 is larger than an iteration's (\d+) examples \((\d+) prompts x (\d+) per group "
                  r"of n_samples (\d+)\); set batch_size <= (\d+)$", msg)
    assert m and int(m[1]) == int(m[2]) * int(m[3]) == int(m[5]), msg
    assert "batch_size 32 is not divisible by world size 2 x micro_batch_size 12" in config_error(
        base, tmp_path, world=2, batch_size=32, micro_batch_size=12)
    assert "lr must be a finite number in (0, 1], got 'fast'" in config_error(base, tmp_path, lr="fast")
    assert "iterations must be an int >= 1, got 2.5" in config_error(base, tmp_path, iterations=2.5)
    assert "eval_winrate must be true or false" in config_error(base, tmp_path, eval_winrate="yes")
    assert "algo: unknown algorithm 'ppo'" in config_error(base, tmp_path, algo="ppo")
    assert "n_samples must be an int >= 2" in config_error(base, tmp_path, n_samples=1)
    assert "temperature" in config_error(base, tmp_path, temperature=0.0)
    assert "optimizer_reset must be one of never, iteration" in config_error(base, tmp_path, optimizer_reset="epoch")
    assert "fit_gap: algo grpo's loss is a policy-gradient surrogate" in config_error(
        base, tmp_path, algo="grpo", fit_gap=True, batch_size=160, micro_batch_size=8)
    assert "top_p" in config_error(base, tmp_path, top_p=1.5)
    assert "pair_selection" in config_error(base, tmp_path, pair_selection="random")
    assert "parallel must be one of ddp, fsdp" in config_error(base, tmp_path, parallel="zero2")
    assert "model: model directory" in config_error(base, tmp_path, model=str(tmp_path / "missing"))
    assert "hub name" in config_error(base, tmp_path, model="meta-llama/Meta-Llama-3-8B-Instruct")
    assert "resume" in config_error(base, tmp_path, resume=str(tmp_path))
    assert "oracle.kind" in config_error(base, tmp_path, oracle={"kind": "elo"})
    assert "prompts_per_iteration 7 is not divisible" in config_error(base, tmp_path, world=2, prompts_per_iteration=7)
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"instruction": "hi"}\n')
    assert "no string field 'prompt'" in config_error(base, tmp_path, prompts=str(rows))
    assert "does not exist" in config_error(base, tmp_path, prompts=str(tmp_path / "none.jsonl"))
    rows.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(10)))  # 10 prompts, 6 subsets
    assert ("prompts_per_iteration 32 > 1 prompts per subset (10 prompts / num_subsets 6); lower num_subsets"
            in config_error(base, tmp_path, prompts=str(rows), prompts_per_iteration=32))
    assert "cannot load" in config_error(base, tmp_path, prompts="HuggingFaceH4/ultrafeedback_binarized")
    # a key the chosen algorithm does not read is an error naming it, never a silent 0
    assert "tau: algo iter_ipo does not read this key" in config_error(base, tmp_path, algo="iter_ipo", tau=0.1)
    assert "ref_update_every: algo inpo does not read" in config_error(base, tmp_path, algo="inpo", ref_update_every=3)
    assert "eta: algo grpo does not read" in config_error(base, tmp_path, algo="grpo", eta=1.0)
    assert "pair_selection: algo sppo" in config_error(base, tmp_path, algo="sppo", pair_selection="all")
    assert "per-round list needs an algorithm with reference rounds" in config_error(base, tmp_path, algo="inpo",
                                                                                    eta=[2.0, 1.0])
    assert "on-policy" in config_error(base, tmp_path, algo="nashmp", batch_size=32, prompts_per_iteration=32)
    cfg = config.load_config(None, ["algo=iter_ipo", "tau=0.1", "tau=null"])  # null unsets
    assert "tau" not in config.check_config(dict(cfg, model=base, out_dir=str(tmp_path)), 1)
    with pytest.raises(config.ConfigError, match="etaa: unknown config key.*did you mean eta"):
        config.load_config(None, ["etaa=3"])
    with pytest.raises(config.ConfigError, match="learning_rate: unknown config key"):
        config.load_config(None, ["learning_rate=1e-6"])
    with pytest.raises(config.ConfigError, match="key=value"):
        config.load_config(None, ["lr"])
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load_config(str(tmp_path / "nope.yaml"), [])
    assert config.load_config(None, ["lr=1e-6", "eta=[500, 10]"])["lr"] == 1e-6  # YAML reads 1e-6 as a string


@pytest.mark.slow
def test_prompt_files_load_and_cli_prints_one_line(base, tmp_path):
    rows = tmp_path / "p.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"question {i}"}) + "\n" for i in range(12)))
    cfg = config.load_config(None, [])
    cfg.update(model=base, prompts=str(rows), prompt_field="instruction", num_subsets=3, prompts_per_iteration=2)
    prompts = config.load_prompts(config.check_config(cfg, 2))
    assert config.iteration_prompts(prompts, cfg, 1, 1, 2) == ["question 5"]  # subset 1 = 4..7; rank 1 of 2
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": ["a", "b"]}), tmp_path / "p.parquet")
    assert config.load_prompts(dict(cfg, prompts=str(tmp_path / "p.parquet"))) == ["a", "b"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: -1\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_ddp.py"), str(bad)], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip() == "error: lr must be a finite number in (0, 1], got -1"


def test_rps_prompt_set_is_deterministic_and_names_every_option(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "data"))
    import make_rps_prompts

    make_rps_prompts.main(out_dir=str(tmp_path))
    for name, n in (("rps_train.jsonl", 100), ("rps_eval.jsonl", 20)):
        made = (tmp_path / name).read_text()
        assert made == open(os.path.join(ROOT, "data", name)).read()  # the committed files are what it writes
        rows = [json.loads(x)["instruction"] for x in made.splitlines()]
        assert len(rows) == len(set(rows)) == n
        assert all(all(c in r.lower() for c in ("rock", "paper", "scissors")) for r in rows)
    train = set((tmp_path / "rps_train.jsonl").read_text().splitlines())
    assert not train & set((tmp_path / "rps_eval.jsonl").read_text().splitlines())  # held-out prompts are held out


def test_eval_prompt_file_is_what_exploitability_is_measured_on(base, tmp_path):
    rows = tmp_path / "eval.jsonl"
    texts = ["Pick one: rock, paper or scissors.", "Your move?", "Say a word.", "Play!"]
    rows.write_text("".join(json.dumps({"q": t}) + "\n" for t in texts))
    cfg = small_cfg(base, tmp_path / "run", eval_prompt_file=str(rows), eval_prompts=3, prompt_field="q",
                    iterations=1)
    assert config.eval_prompt_texts(cfg) == texts[:3]
    for bad, msg in ((dict(eval_prompts=5), "eval_prompts 5 > the 4 rows of eval_prompt_file"),
                     (dict(eval_prompts=0), "eval_prompt_file is read only for the category game")):
        with pytest.raises(config.ConfigError, match=msg):
            small_cfg(base, tmp_path / "x", eval_prompt_file=str(rows), prompt_field="q", **bad)
    train_ddp.train(cfg, 0, 1, torch.device("cpu"))
    start = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    tok, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base).eval()
    game = oracle_lib.CategoryGame()
    dist_, _ = game.policy_distribution(model, tok, config.encode_prompts(tok, texts[:3], cfg["max_prompt_tokens"]),
                                        [tok.eos_token_id], cfg["max_new_tokens"])
    assert start["iteration"] == -1 and start["exploitability"] == pytest.approx(float(game.exploitability(dist_).mean()),
                                                                                abs=1e-9)


def test_non_finite_loss_stops_with_step_rank_and_checkpoint():
    model = ddp_model()
    trainer = train_ddp.Trainer(model, dict(config.load_config(None, []), **TRAIN_CFG))
    trainer.last_checkpoint = "runs/x/checkpoints/iter-00004"
    ids = global_batches(1)[0]
    bad = (x * float("nan") for x in micro_losses(model, ids))
    with pytest.raises(train_ddp.TrainingError, match=r"iteration 5 step 3 on rank\(s\) \[0\].*iter-00004"):
        trainer.step(bad, 5, 3, 10)


# ---------------------------------------------------------------------------
# Sharded data parallelism (parallel: fsdp)
# ---------------------------------------------------------------------------

FSDP_CFG = dict(TRAIN_CFG, lr=1e-3)  # fp32: Adam turns rounding of near-zero gradients into ~lr-sized steps


def plain_run(batches, dtype=torch.float32, world=1):
    """The reference: one process, unsharded, the same global batches."""
    model = ddp_model(dtype)
    trainer = train_ddp.Trainer(model, dict(config.load_config(None, []), **FSDP_CFG))
    for step, ids in enumerate(batches):
        trainer.step(micro_losses(model, ids), 0, step, len(batches))
    return model


def sample_prompts(rank):
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own prompts and lengths
    return [torch.randint(1, 50, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist() for _ in range(3)]


def fsdp_worker(rank, world, init_file, ckpt):
    from sample import generate

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = ddp_model(torch.float32)
    if rank == 1:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(3.0)  # shard_model must broadcast rank 0's weights first
    fsdp.shard_model(model, rank, world)
    assert all(p.untyped_storage().size() == 0 for p in model.model.layers[0].parameters())  # blocks stay freed
    trainer = train_ddp.ShardedTrainer(model, dict(config.load_config(None, []), **FSDP_CFG), rank, world)
    batches = global_batches()
    for step, ids in enumerate(batches[:2]):
        trainer.step(micro_losses(model, ids.chunk(world)[rank]), 0, step, len(batches))
    checkpoint.save_sharded(model, ckpt, checkpoint.Writes(rank == 0), trainer.optimizer)  # streamed, one unit at a time
    out = generate(model, sample_prompts(rank), n=3, max_new_tokens=12, temperature=1.0,
                   generator=torch.Generator().manual_seed(rank), eos_token_ids=[7], all_done=trainer.all_done)
    if rank == 0:
        torch.save(out.response_ids, os.path.join(ckpt, "sampled.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_equals_one_process_samples_alike_and_resumes_on_other_world(tmp_path):
    from sample import generate

    ckpt = str(tmp_path / "ckpt")
    spawn(fsdp_worker, args=(2, str(tmp_path / "init"), ckpt), nprocs=2)
    batches = global_batches()
    # 1. after 2 steps the sharded run's full parameters (an ordinary HF checkpoint) equal one process
    ref = plain_run(batches[:2])
    loaded = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    start = ddp_model(torch.float32).state_dict()
    sd, ref_sd = loaded.state_dict(), ref.state_dict()
    assert max(float((ref_sd[k] - start[k]).abs().max()) for k in ref_sd) > 1e-3
    for k in ref_sd:
        assert torch.allclose(sd[k], ref_sd[k], atol=1e-5, rtol=0), k
    # 2. sampling with sharded weights (per-block gathers, ranks in lockstep) equals the plain sampler
    plain = generate(ref.eval(), sample_prompts(0), n=3, max_new_tokens=12, temperature=1.0,
                     generator=torch.Generator().manual_seed(0), eos_token_ids=[7])
    assert torch.equal(torch.load(os.path.join(ckpt, "sampled.pt")), plain.response_ids)
    # 3. resume the 2-rank checkpoint on 1 rank (streamed sharded loading, world 1): step 3 equals an
    # uninterrupted run
    model = fsdp.load_sharded(ckpt, 0, 1, torch.device("cpu"), torch.float32)
    trainer = train_ddp.ShardedTrainer(model, dict(config.load_config(None, []), **FSDP_CFG))
    checkpoint.load_optimizer(trainer.optimizer, ckpt, units=trainer.units)
    trainer.step(micro_losses(model, batches[2]), 0, 2, 3)
    full = plain_run(batches).state_dict()
    named = dict(model.named_parameters())
    for unit in trainer.units:
        for name, t in unit.split(unit.gathered_fp32()).items():
            assert torch.allclose(t, full[name], atol=1e-5, rtol=0), name
    assert set(named) <= set(full)


@pytest.mark.parametrize("sharded", [False, True])
def test_activation_checkpointing_gives_equal_gradients(sharded):
    ids = global_batches(1)[0]
    grads = []
    for ckpt in (False, True):
        model = ddp_model(torch.float64)
        if sharded:
            fsdp.shard_model(model, 0, 1, torch.float64, activation_checkpointing=ckpt)
        elif ckpt:
            fsdp.checkpoint_blocks(model)
        model.train()
        calls = []
        model.model.layers[1].mlp.register_forward_pre_hook(lambda *a: calls.append(1))  # pre: recompute stops early
        for loss in micro_losses(model, ids):
            loss.backward()
        assert len(calls) == (8 if ckpt else 4)  # 4 micro-batches; recomputed in backward when checkpointing
        if sharded:
            grads.append(torch.cat([u.shard.grad for u in model.flat_units]))
        else:
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 1e-3
    assert torch.allclose(grads[0], grads[1], atol=1e-10, rtol=0)


def test_no_framework_sharding_in_the_training_path():
    for f in ("train_ddp.py", "comal.py", "sample.py"):
        src = open(os.path.join(ROOT, f)).read()
        for banned in ("FullyShardedDataParallel", "fully_shard", "deepspeed", "DistributedDataParallel(", "accelerate"):
            assert banned not in src, (f, banned)


def test_help_lists_every_key_with_its_default_and_meaning(capsys):
    import oracle

    assert train_ddp.cli(["--help"]) == 0
    out = capsys.readouterr().out
    for key, k in config.RUN_KEYS.items():
        assert f"\n  {key} = " in out and k.meaning in out, key
    for key, k in config.algo_keys().items():
        assert f"\n  {key} = " in out and k.meaning in out, key
    assert "read by: comal, comal_sppo" in out  # ref_update_every
    for kind, cls in oracle.KINDS.items():  # every oracle kind's keys, with their meanings
        block = out.split(f"\n  kind: {kind}\n", 1)[1].split("\n  kind: ", 1)[0]
        for key, k in {**cls.KEYS, **cls.ITEM_KEYS}.items():
            assert f"{key} = " in block and k.meaning in block, (kind, key)
