"""Sharded mode at scale: streamed loading (each rank reads only its slices of the checkpoint), rollout from
gathered weights (no collectives per token, the same samples as the per-block path), and a two-node launch."""
import contextlib
import functools
import json
import os
import subprocess

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import checkpoint
import comal
import config
import fsdp
import train_ddp
from conftest import spawn

pytestmark = pytest.mark.slow  # every test here launches processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_worker(rank, world, init_file, base, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    read = {}
    real = checkpoint.SafetensorsReader.__exit__

    def record(self, *exc):  # the bytes this rank read from the checkpoint
        read["bytes"] = self.bytes_read
        return real(self, *exc)

    checkpoint.SafetensorsReader.__exit__ = record
    policy = fsdp.load_sharded(base, rank, world, torch.device("cpu"), torch.float32)
    policy_read = read["bytes"]
    ref = fsdp.load_sharded(base, rank, world, torch.device("cpu"), torch.bfloat16, torch.bfloat16, frozen=True)
    got = {"policy": {}, "ref": {}, "read": policy_read, "shard_dtypes": {str(u.shard.dtype) for u in ref.flat_units},
           "ref_requires_grad": any(p.requires_grad for p in ref.parameters())}
    for key, m in (("policy", policy), ("ref", ref)):
        for u in m.flat_units:
            got[key].update(u.split(u.gathered_fp32()))
    # rollout: the same tokens from gathered weights and from per-block gathers; count the collectives
    cfg = config.load_config(None, [])
    prompts = [[1, 5, 9, 4], [3, 3, 8], [7, 2, 2, 6, 1]][rank::world] or [[2, 4]]
    calls, real_gather = [], dist.all_gather_single
    dist.all_gather_single = lambda *a, **kw: (calls.append(1), real_gather(*a, **kw))[1]
    for rollout in ("gathered", "sharded"):
        trainer = train_ddp.ShardedTrainer(policy, dict(cfg, parallel="fsdp", rollout=rollout, n_samples=3, max_new_tokens=10),
                                    rank, world)
        calls.clear()
        gen = torch.Generator().manual_seed(rank)
        with trainer.gathered(policy):
            samples, _ = comal.sample_groups(policy, Tok(), prompts, trainer.cfg, gen, trainer.all_done)
        got[rollout] = samples.response_ids
        got[rollout + "_gathers"] = len(calls)
        with trainer.gathered(ref):  # a frozen model: only its root is gathered under rollout: sharded
            got[rollout + "_lockstep"] = trainer.lockstep
    dist.all_gather_single = real_gather
    got["units"] = len(policy.flat_units)
    torch.save(got, f"{out}.{rank}")
    dist.destroy_process_group()


class Tok:
    """The two things sample_groups asks of a tokenizer."""
    eos_token_id = 2
    pad_token_id = 0

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(map(str, row)) for row in ids.tolist()]


def test_streamed_loading_reads_each_ranks_slices_and_rollouts_agree(base, tmp_path):
    out = str(tmp_path / "r")
    spawn(load_worker, args=(2, str(tmp_path / "init"), base, out), nprocs=2)
    want = load_file(os.path.join(base, "model.safetensors"))
    total = sum(t.numel() * t.element_size() for t in want.values())
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        for name, t in want.items():  # every unit, gathered from the two ranks' slices, is the checkpoint
            assert torch.equal(got["policy"][name], t.float()), name
            assert torch.equal(got["ref"][name], t.to(torch.bfloat16).float()), name
        # each rank read about half of the file (whole rows around its slice's ends)
        assert got["read"] <= total / 2 * 1.1 and got["read"] >= total / 2 * 0.9, (got["read"], total)
        assert got["shard_dtypes"] == {"torch.bfloat16"} and not got["ref_requires_grad"]
        assert torch.equal(got["gathered"], got["sharded"])  # the same samples either way
        blocks = got["units"] - 1  # the root stays gathered
        assert got["sharded_gathers"] >= 2 * blocks  # per block at the prefill and again at every decoded token
        assert got["gathered_gathers"] == blocks  # once per block for the whole rollout
        # per-block gathers are collectives: decoding must stay in lockstep unless every unit is gathered
        assert got["sharded_lockstep"] and not got["gathered_lockstep"]


@pytest.mark.parametrize("arch", ["gemma", "llama_rm"])
def test_streamed_loading_rebuilds_the_buffers_a_modules_init_computes(tmp_path, arch):
    """A buffer the checkpoint does not hold is computed by the model's own _init_weights with the module's
    parameters stood in for by meta tensors: Gemma's embedding scale (a module with a weight of its own) and
    the rotary frequencies; the sharded model's outputs equal the whole one's (world 1, in process)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GemmaConfig, GemmaForCausalLM

    import tiny

    if arch == "gemma":
        tok = tiny.train_tokenizer(tiny.synthetic_text(seed=3), 300)
        torch.manual_seed(0)
        GemmaForCausalLM(GemmaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0)
                         ).save_pretrained(tmp_path / arch)
        auto = AutoModelForCausalLM
    else:
        tiny.save_reward_model(tmp_path / arch, 1, 300, chat=True)
        auto = AutoModelForSequenceClassification
    whole = auto.from_pretrained(tmp_path / arch).eval()
    sharded = fsdp.load_sharded(str(tmp_path / arch), 0, 1, torch.device("cpu"), torch.float32, frozen=True,
                                model_class=auto)
    ids = torch.randint(1, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), fsdp.units_gathered(sharded.flat_units):
        got = sharded(input_ids=ids).logits
    assert torch.allclose(got, whole(input_ids=ids).logits, atol=1e-5, rtol=0)
    if arch == "gemma":
        assert float(sharded.model.embed_tokens.embed_scale) == pytest.approx(32 ** 0.5)


def test_two_nodes_equal_one_node(torchrun_run, tmp_path):
    """torchrun --nnodes 2 (one process each, c10d rendezvous on localhost) gives the numbers of
    --nproc_per_node 2 (the shared 3-iteration run, the same command) bitwise. Each "node" is pinned to its own
    core, as a real node would have its own: its one rank then runs on one thread, as each of the one-node ranks."""
    import socket

    from conftest import torchrun_cmd

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    cores = sorted(os.sched_getaffinity(0))
    two_nodes = ("--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                 f"localhost:{port}", "--rdzv_id", "two-nodes")
    nodes = [subprocess.Popen(torchrun_cmd(torchrun_run[3], tmp_path / "two", two_nodes),
                              preexec_fn=lambda core=cores[r % len(cores)]: os.sched_setaffinity(0, {core}),
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"node{r}.log", "w"))
             for r in (0, 1)]  # a file, not a pipe: a full pipe would block the node
    for r, p in enumerate(nodes):
        assert p.wait(timeout=300) == 0, open(tmp_path / f"node{r}.log").read()[-2000:]

    def numbers(records):
        return [(r["iteration"], r["exploitability"], r["category_dist"]) for r in records if "exploitability" in r]

    one = numbers(torchrun_run[2])
    two = numbers(map(json.loads, open(tmp_path / "two" / "metrics.jsonl")))
    assert [r[0] for r in one] == [-1, 0, 1, 2] and one == two


def bench_module(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def held_bytes(rank, world, base, parallel):
    """The bytes a trainer holds before its second step (gradients and Adam moments all exist)."""
    from transformers import AutoModelForCausalLM

    from sample import sequence_logprobs

    if parallel == "fsdp":
        model = fsdp.load_sharded(base, rank, world, torch.device("cpu"), torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    trainer = train_ddp.trainer_for(model, dict(config.load_config(None, []), parallel=parallel), rank, world)
    held, real = {}, trainer.optimizer.step

    def step(*a, **kw):
        if trainer.optimizer.state:
            held["bytes"] = bench_module("memory").held_bytes(model, trainer)
        return real(*a, **kw)

    trainer.optimizer.step = step
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(rank))
    mask = torch.ones_like(ids)
    for s in range(2):
        trainer.step(iter([-sequence_logprobs(model, ids, mask, mask)[1].mean()]), 0, s, 2)
    return held["bytes"]


def held_worker(rank, world, init_file, base, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.save({parallel: held_bytes(rank, world, base, parallel) for parallel in ("ddp", "fsdp")}, f"{out}.{rank}")
    dist.barrier()  # no rank tears gloo down while the other still talks to it
    dist.destroy_process_group()


def test_the_memory_plan_matches_the_bytes_the_trainers_hold(base, tmp_path):
    import memory_plan as plan

    hf, blocks, root = plan.architecture(base)
    cfg = config.load_config(None, [])
    for world in (1, 2):
        out = str(tmp_path / f"held{world}")
        spawn(held_worker, args=(world, str(tmp_path / f"init{world}"), base, out), nprocs=world)
        for parallel in ("ddp", "fsdp"):
            measured = max(torch.load(f"{out}.{r}")[parallel] for r in range(world))
            rows, _ = plan.plan(dict(cfg, algo="iter_ipo", parallel=parallel), hf, blocks, root, world, "cpu")
            predicted = sum(rows.values())  # iter_ipo: no frozen copy in the trainer's state
            print(f"plan {parallel} N={world}: predicted {predicted} measured {measured} ({predicted / measured:.3f})")
            assert abs(predicted - measured) <= 0.02 * measured, (parallel, world, predicted, measured)  # issue: 15%


def scatter_worker(rank, world, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    size = 1000
    flat = torch.randn(size * world, generator=torch.Generator().manual_seed(rank)) * 10 ** (rank - 1)
    ref = torch.empty(size)
    dist.reduce_scatter_single(ref, flat)  # gloo's own
    torch.save({"ours": fsdp.reduce_scatter_sum(flat, size, world), "gloo": ref, "flat": flat}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_reduce_scatter_by_all_to_all_equals_reduce_scatter(tmp_path, world):
    """The gradient shards of sharded training on CPU (all_to_all + local sum) are gloo's reduce_scatter's:
    the sum over ranks of each rank's slice (bitwise with 2 ranks; 3 ranks may add in another order)."""
    out = str(tmp_path / "rs")
    spawn(scatter_worker, args=(world, str(tmp_path / "init"), out), nprocs=world)
    got = [torch.load(f"{out}.{r}") for r in range(world)]
    total = sum(g["flat"].double() for g in got)
    for r, g in enumerate(got):
        exact = total[r * 1000:(r + 1) * 1000].float()
        torch.testing.assert_close(g["ours"], exact, rtol=1e-6, atol=1e-6)
        if world == 2:
            assert torch.equal(g["ours"], g["gloo"])
        else:
            torch.testing.assert_close(g["ours"], g["gloo"], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# The oracle's models under fsdp: sharded like the frozen copies, gathered whole only while they score
# ---------------------------------------------------------------------------


def oracle_worker(rank, world, init_file, blocks, pairs, out):
    """Each rank builds the mixture and the judge through fsdp.OracleShards, records what it holds outside
    scoring and the most it holds gathered at once while scoring, and scores its own share of the pairs (every
    world-th: the ranks score different numbers of batches, so their forwards must need no collective)."""
    import oracle as oracle_lib

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result, units = {}, []
    allocated = lambda: sum(u.full.untyped_storage().size() for u in units)  # noqa: E731

    class Watched(fsdp.OracleShards):
        @contextlib.contextmanager
        def scoring(self, model):
            with super().scoring(model):
                result[name]["at_once"] = max(result[name]["at_once"], allocated())
                yield

    for name, block in blocks.items():
        result[name] = {"at_once": 0}
        o = oracle_lib.build_oracle(block, "cpu", shards=Watched(rank, world, torch.device("cpu")))
        units = [u for m in o.models() for u in m.flat_units]
        result[name].update(held=sum(u.shard.numel() * u.shard.element_size() for u in units),
                            total=sum(u.total * u.shard.element_size() for u in units), allocated=allocated(),
                            largest=max(sum(u.total * u.shard.element_size() for u in m.flat_units) for m in o.models()))
        xs, a, b = (v[rank::world] for v in pairs)
        result[name]["prob"] = o.prob(xs, a, b)
        result[name]["empty"] = o.prob([], [], [])  # a rank without pairs still enters scoring (a collective)
        result[name]["allocated_after"] = allocated()
    torch.save(result, f"{out}{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")  # the remote code's keywords
def test_sharded_oracle_scores_as_the_whole_one_and_holds_a_shard(tmp_path):
    """A Bradley-Terry mixture of three tiny reward models (one of them its own code, loaded with
    trust_remote_code as ArmoRM is) and a tiny pairwise judge under fsdp on 2 gloo ranks: each rank holds 1/2 of
    their parameters outside scoring (no gathered buffer), one model whole at a time while scoring, and its
    scores of its own pairs equal the unsharded oracle's to 1e-5 (fp32); the memory plan's bytes are these
    (N = 2, and N = 1 in this process)."""
    import memory_plan
    import oracle as oracle_lib
    from test_oracle import PROMPTS, RESPONSES, all_pairs, save_remote_code_reward_model
    from tiny import save_judge, save_reward_model

    rm1, rm2 = save_reward_model(tmp_path / "rm1", 1, 300, chat=True), save_reward_model(tmp_path / "rm2", 2, 420, chat=False)
    rm3 = save_remote_code_reward_model(tmp_path / "rm3", 3, 360)
    blocks = {"mixture": {"kind": "bt_mixture", "dtype": "float32", "models": [
                  {"path": rm1, "weight": 0.5}, {"path": rm2, "weight": 0.2}, {"path": rm3, "weight": 0.3,
                                                                               "trust_remote_code": True}]},
              "judge": {"kind": "pairwise_judge", "path": save_judge(tmp_path / "judge"), "dtype": "float32"}}
    blocks["mixture_bf16"] = dict(blocks["mixture"], dtype="bfloat16")  # the GPU's oracle dtype, on CPU
    pairs = all_pairs(PROMPTS, RESPONSES)
    spawn(oracle_worker, args=(2, str(tmp_path / "init"), blocks, pairs, str(tmp_path / "rank")), nprocs=2)
    wholes = {}
    for name, block in blocks.items():
        whole = wholes[name] = oracle_lib.build_oracle(block, "cpu").prob(*pairs)
        held, gathered = memory_plan.oracle_plan(block, 2, "fsdp", device="cpu")  # the plan: exact arithmetic
        for r in (0, 1):
            got = torch.load(tmp_path / f"rank{r}")[name]
            assert got["held"] == held, (got, held)
            assert got["at_once"] == gathered and got["largest"] <= gathered < got["largest"] + 64 * 4 * 8, (got, gathered)
            assert got["allocated"] == 0 and got["allocated_after"] == 0, got  # nothing gathered outside scoring
            assert got["total"] / 2 <= got["held"] <= got["total"] / 2 + 64 * len(block.get("models", [0])) * 8, got
            assert torch.allclose(got["prob"].double(), whole[r::2].double(), atol=1e-5, rtol=0), (name, r)
            assert got["empty"].shape == (0,)
        assert float((whole - 0.5).abs().max()) > 1e-3  # the scores say something
    fp32, bf16 = wholes["mixture"], wholes["mixture_bf16"]
    assert 0 < float((bf16 - fp32).abs().max()) < 0.05  # bf16: near fp32 (measured 0.020 here), and not it
    for name in ("mixture", "judge"):  # N = 1, in this process: the plan's bytes and the same scores
        o = oracle_lib.build_oracle(blocks[name], "cpu", shards=fsdp.OracleShards(0, 1, torch.device("cpu")))
        held = sum(u.shard.numel() * u.shard.element_size() for m in o.models() for u in m.flat_units)
        assert held == memory_plan.oracle_plan(blocks[name], 1, "fsdp", device="cpu")[0], name
        assert torch.allclose(o.prob(*pairs).double(), wholes[name].double(), atol=1e-5, rtol=0), name
    rm3_alone = oracle_lib.build_oracle(dict(blocks["mixture"], models=[dict(blocks["mixture"]["models"][2], weight=1)]))
    assert float((rm3_alone.prob(*pairs) - 0.5).abs().max()) > 1e-3  # the remote-code model's scores count


def watch_phases(path, rank):
    """launch's patch: whenever an oracle model starts scoring, this rank appends to path.RANK the bytes then
    gathered by sharded units other than that model's and those kept gathered (the rollout's policy, the frozen
    copies, the other oracle models): the phases must not overlap, so every line reads 0."""
    units, init, scoring = [], fsdp.FlatUnit.__init__, fsdp.OracleShards.scoring

    def register(self, *a, **kw):
        init(self, *a, **kw)
        units.append(self)

    def watched(self, model):
        mine = {id(u) for u in model.flat_units}
        stray = sum(u.full.untyped_storage().size() for u in units if id(u) not in mine and not u.keep_gathered)
        with open(f"{path}.{rank}", "a") as f:
            f.write(f"{stray}\n")
        return scoring(self, model)

    fsdp.FlatUnit.__init__, fsdp.OracleShards.scoring = register, watched


@pytest.mark.slow
def test_training_with_a_sharded_reward_model_oracle_equals_ddp(base, tmp_path):
    """One COMAL iteration on 2 ranks with a Bradley-Terry mixture of two tiny reward models: under fsdp the
    oracle's models are sharded and gathered only while they score (comal.iteration, winrate_vs_mu); the logged
    loss and win rate equal the DDP run's, whose ranks hold the reward models whole. Then the bf16 path with
    the oracle sharded in bf16: a resume from iteration 0 is bitwise, and its loss is near fp32's."""
    import yaml

    from conftest import launch
    from tiny import save_reward_model

    rms = [save_reward_model(tmp_path / f"rm{i}", i, 300, chat=True) for i in (1, 2)]
    cfg = {"oracle": {"kind": "bt_mixture", "models": [{"path": p} for p in rms], "dtype": "float32"},
           "model": base, "iterations": 1, "prompts_per_iteration": 4, "n_samples": 4, "batch_size": 16,
           "micro_batch_size": 8, "eval_prompts": 0, "algo": "comal", "eta": 2.0, "tau": 0.1, "ref_update_every": 2}
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump(cfg))
    rows = {}
    for parallel in ("ddp", "fsdp"):
        out = tmp_path / parallel
        status, said, _ = launch("train_ddp", [str(tmp_path / "rm.yaml"), f"out_dir={out}", f"parallel={parallel}"],
                                 tmp_path / f"logs_{parallel}",
                                 patch=functools.partial(watch_phases, str(tmp_path / "phases")) if parallel == "fsdp" else None)
        assert status == [0, 0], said
        rows[parallel] = [json.loads(x) for x in open(out / "metrics.jsonl") if '"train_s"' in x]
    (d,), (f,) = rows["ddp"], rows["fsdp"]
    assert d["loss"] == pytest.approx(f["loss"], rel=1e-4) and d["winrate_vs_mu"] == pytest.approx(f["winrate_vs_mu"], abs=1e-4)
    assert d["preference_signal"] and 0 < d["winrate_vs_mu"] < 1
    for r in (0, 1):  # 2 reward models scoring the groups, then the win rate vs mu: nothing else gathered then
        assert (tmp_path / f"phases.{r}").read_text().split() == ["0"] * 4, r

    # bf16, the GPU's path on CPU: fsdp with the reward models sharded in bf16 for 2 iterations, and the same run
    # resumed from its iteration 0 in another out_dir: iteration 1's checkpoint (policy, pi_ref) and its logged
    # row are bitwise the uninterrupted run's
    argv = [str(tmp_path / "rm.yaml"), "parallel=fsdp", "dtype=bfloat16", "oracle.dtype=bfloat16", "iterations=2"]
    bf, again = tmp_path / "bf16", tmp_path / "bf16_resumed"
    for out, extra in ((bf, []), (again, [f"resume={checkpoint.checkpoint_dir(str(bf), 0)}"])):
        status, said, _ = launch("train_ddp", argv + [f"out_dir={out}"] + extra, tmp_path / f"logs_{out.name}")
        assert status == [0, 0], said
    assert "resumed from" in said[0]
    tensors = [{name: f["sha256"] for name, f in json.load(open(os.path.join(checkpoint.checkpoint_dir(str(out), 1),
                                                                         "manifest.json")))["files"].items()
                if name.endswith(".safetensors")} for out in (bf, again)]  # policy, pi_ref, AdamW: every shard
    assert tensors[0] == tensors[1] and any(n.startswith("ref/") for n in tensors[0]), tensors
    last = [[json.loads(x) for x in open(out / "metrics.jsonl") if '"train_s"' in x][-1] for out in (bf, again)]
    assert {k: last[0][k] for k in ("loss", "winrate_vs_mu")} == {k: last[1][k] for k in ("loss", "winrate_vs_mu")}
    first = [json.loads(x) for x in open(bf / "metrics.jsonl") if '"train_s"' in x][0]
    assert first["loss"] != f["loss"] and first["loss"] == pytest.approx(f["loss"], rel=0.1)  # bf16, near fp32
