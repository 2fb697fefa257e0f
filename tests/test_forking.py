"""What a newcomer's fork meets beyond a new loss: a new opponent kind with its algorithm, defined here in three
places (an Opponent, a loss form, an ALGOS entry) and trained with 2 ranks; and the traps such a fork fell
into, each now an error before any model loads."""
import json
import os

import pytest
import torch
import torch.distributed as dist

import comal
import config
import examples
import keys
import losses
import opponents
import oracle as oracle_lib
import sample
import toy_game as tg
import train_ddp
from conftest import spawn
from test_train import small_cfg


def register_geo():
    """A Nash-MD-like algorithm with its own geometric-mixture opponent, in three places."""
    # 1. the opponent kind: no model of its own, sampled from pi^(1 - lam) pi_ref^lam
    opponents.OPPONENTS["geo"] = opponents.Opponent(
        start=lambda log_pi, log_ref, h: (opponents.geometric_mixture(log_pi, log_ref, h.lam), None),
        tabular=lambda old, new, log_ref, memory, h: (opponents.geometric_mixture(new, log_ref, h.lam), None),
        sampler=lambda state, h: sample.Mixture([state["policy"], state["ref"]], [1 - h.lam, h.lam]),
        keys=("lam",), needs_ref=True)

    # 2. the loss form: REINFORCE against the mixture's samples, KL to pi_ref
    def geo_md(x, h):
        y, v = x.rows["y"], x.values
        return losses.nash_md_loss(x.pi[y], v["gopp"][y], v["gopp_base"][y], x.ref[y], h.tau)

    # 3. the table entry, with its own key
    comal.ALGOS["geo_md"] = comal.Algorithm(
        geo_md, "responses", ("tau", "lam"), ref="base", opponent="geo", on_policy=True, surrogate=True,
        own_keys={"lam": keys.Key(0.5, "weight of pi_ref in the opponent's mixture", keys.number(0, 1))})


def geo_worker(rank, world, init_file, base, out, parallel, lam):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    register_geo()
    seen, loads = [], []
    plain_sample_groups = comal.sample_groups

    def spy(model, *a, **kw):  # the opponent's responses: what generate sampled from a Mixture
        s, groups = plain_sample_groups(model, *a, **kw)
        if isinstance(model, sample.Mixture):
            seen.append(groups)
        return s, groups

    comal.sample_groups = spy
    cls = train_ddp.ShardedTrainer if parallel == "fsdp" else train_ddp.Trainer
    load_frozen = cls.load_frozen
    cls.load_frozen = staticmethod(lambda path, *a, **kw: (loads.append(path), load_frozen(path, *a, **kw))[1])
    cfg = small_cfg(base, out, algo="geo_md", lam=lam, parallel=parallel, iterations=2, epochs=1, batch_size=32,
                    micro_batch_size=8, eval_prompts=0)
    train_ddp.train(cfg, rank, world, torch.device("cpu"))
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump({"opponent_groups": seen, "frozen_loads": loads}, f)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_new_opponent_kind_and_its_algorithm_train_with_two_ranks(base, tmp_path, parallel):
    runs = {}
    for lam in (0.0, 0.9):
        out = tmp_path / f"{parallel}_{lam}"
        spawn(geo_worker, args=(2, str(tmp_path / f"init{lam}"), base, str(out), parallel, lam), nprocs=2)
        runs[lam] = [json.load(open(f"{out}.{rank}.json")) for rank in range(2)]
        for r in runs[lam]:
            assert r["frozen_loads"] == [base]  # pi_ref only: the opponent has no copy to load
        ckpts = sorted(os.listdir(out / "checkpoints"))
        assert ckpts == ["iter-00000", "iter-00001"]
        for c in ckpts:  # nothing saved for an opponent without a copy (pi_ref = pi_0 is the base's)
            assert not {"opponent", "ref"} & set(os.listdir(out / "checkpoints" / c))
        steps = [json.loads(x) for x in open(out / "metrics.jsonl") if '"step"' in x]
        assert len(steps) == 2 and all(s["loss"] == s["loss"] for s in steps)
    for rank in range(2):
        a, b = (runs[lam][rank]["opponent_groups"] for lam in (0.0, 0.9))
        assert len(a) == len(b) == 2
        assert a[0] == b[0]  # iteration 0: the policy is pi_ref, so every mixture of the two is the same model
        assert a[1] != b[1]  # iteration 1 on: lam moves the opponent's samples


# ---------------------------------------------------------------------------
# The traps, each an error now
# ---------------------------------------------------------------------------


def entry(monkeypatch, loss, examples_kind="responses", keys_=("eta",), **kw):
    spec = comal.Algorithm(loss, examples_kind, keys_, **kw)
    monkeypatch.setitem(comal.ALGOS, "fork", spec)
    return spec


def check(overrides=()):
    cfg = config.load_config(None, ["algo=fork", *overrides])
    return config.check_algorithm_keys(cfg)


def test_an_opponent_kind_outside_the_table_is_refused(monkeypatch):
    spec = comal.Algorithm(comal.nash_md, "responses", ("tau", "beta"), ref="base", opponent="mix2")
    with pytest.raises(comal.SpecError, match="opponent 'mix2' is not one of none, prev, ema, mixture"):
        comal.check_spec("fork", spec)
    with pytest.raises(comal.SpecError, match="opponent 'mix2'"):  # toy_game too: no opponent frozen at the start
        tg.play(spec, tg.make_game(), tg.make_config(iters=3), None)
    with pytest.raises(TypeError):  # an opponent kind without its tabular version cannot be written
        opponents.Opponent(start=None, sampler=None)


def test_a_loss_reading_what_its_spec_lacks_is_named_before_any_model_loads(monkeypatch):
    def reads_opp(x, h):  # the mixture has no log-probs of its own
        y = x.rows["y"]
        return (x.pi[y] - x.opp[y]) ** 2

    entry(monkeypatch, reads_opp, keys_=("tau", "beta"), ref="base", opponent="mixture", on_policy=True)
    with pytest.raises(config.ConfigError, match=r"algo fork: its loss reads_opp fails .*x\.opp: the spec's opponent"):
        check()

    def pairs_on_responses(x, h):
        return x.pi[x.rows["w"]]

    entry(monkeypatch, pairs_on_responses)
    with pytest.raises(config.ConfigError, match=r"x\.rows\['w'\]: these examples have no 'w' \(they have: y\)"):
        check()


def test_a_key_fallback_and_a_batch_statistic_are_errors(monkeypatch):
    def fallback(x, h):
        y = x.rows["y"]
        return h.get("lambda_d", 1.0) * (x.pi[y] - x.mu[y]) ** 2

    entry(monkeypatch, fallback)
    with pytest.raises(config.ConfigError, match=r"algo fork: .*h\.get: the algorithm's loss reads a key it does not"):
        check()

    def centred(x, h):  # KTO-style z_ref: a mean over the micro-batch
        y = x.rows["y"]
        r = x.pi[y] - x.mu[y]
        return (r - r.mean()) ** 2

    entry(monkeypatch, centred)
    with pytest.raises(config.ConfigError, match="changes with the other examples of its micro-batch"):
        check()

    def per_example(x, h):
        y = x.rows["y"]
        return (x.pi[y] - x.mu[y] - h.eta * x.values["g"][y]) ** 2

    entry(monkeypatch, per_example)
    assert check().loss is per_example


def test_every_key_an_algorithm_does_not_read_is_named_at_once():
    cfg = config.load_config("configs/tiny.yaml", ["algo=nash_md"])
    with pytest.raises(config.ConfigError) as e:
        config.check_algorithm_keys(cfg)
    assert str(e.value).startswith("eta, pair_selection, eta_tau, ref_update_every: algo nash_md does not read these")
    assert "eta=null pair_selection=null eta_tau=null ref_update_every=null" in str(e.value)


def test_help_shows_each_declaration_of_a_shared_key(monkeypatch, capsys):
    kto_beta = keys.Key(0.1, "KTO's beta", keys.positive)
    entry(monkeypatch, comal.sppo, keys_=("eta", "beta"), own_keys={"beta": kto_beta})
    assert train_ddp.cli(["--help"]) == 0
    out = capsys.readouterr().out
    assert "  beta = 0.125\n" in out and "read by: nash_md\n" in out
    assert "  beta = 0.1\n      KTO's beta\n      read by: fork\n" in out


def test_best_worst_ties_are_not_decided_by_float_rounding():
    """Every response of this group has mean win rate exactly 1/2; in the oracle's float32 one reads 0.49999997,
    which used to make a best / worst pair of weight 1 out of a full tie."""
    game = oracle_lib.CategoryGame(payoff=[[0.5, 0.6, 0.4], [0.4, 0.5, 0.7], [0.6, 0.3, 0.5]])
    M = game.winrate_matrix(["x"], [["rock", "paper", "scissors", "rock"]])
    assert float(M.mean(-1).max() - M.mean(-1).min()) > 0  # the float32 means differ
    _, weight, _ = examples.pair_examples(M, {"pair_selection": "best_worst"})
    assert weight.tolist() == [0.0]


def test_the_exactness_harness_refuses_a_surrogate_it_has_no_gradient_for():
    import test_exactness

    with pytest.raises(KeyError, match="no hand-written gradient"):
        test_exactness.hand_gradient("kto")
