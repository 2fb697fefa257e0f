"""eval.py: win-rate matrices against exact category distributions, caching, outputs, bad input, run mode."""
import csv
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import config
import diagnostics
import eval as ev
import oracle as oracle_lib
import tiny
import train_ddp

SKEWS = {"a": (0.2, 0.5, 0.3), "b": (0.6, 0.2, 0.2), "c": (0.1, 0.2, 0.7)}


def read_winrate_csv(path):
    """(names, M as a list of rows, Avg) parsed back from eval.py's winrate.csv."""
    with open(path) as f:
        rows = list(csv.reader(f))
    return rows[0][1:-1], [[float(x) for x in r[1:-1]] for r in rows[1:]], [float(r[-1]) for r in rows[1:]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    for name, probs in SKEWS.items():
        tiny.build_base(str(d / name), probs=probs, sft_steps=150, seed=len(name), log=lambda m: None)
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": x}) + "\n" for x in tiny.synthetic_prompts(20, 5)))
    (d / "oracle.yaml").write_text("oracle: {kind: category}\n")
    return d


def args(d, names, out="out", *extra):
    return ["--models", *[f"{n}={d / n}" for n in names], "--prompts", str(d / "prompts.jsonl"),
            "--oracle", str(d / "oracle.yaml"), "--out", str(d / out), "--samples", "8", "--temperature", "1",
            "--max-new-tokens", "8", *extra]


def exact_matrix(d, names, prompts, max_new_tokens=8):
    """100 * mean over prompts of p_i(x)^T E p_j(x), from each policy's exact category distribution of responses
    capped at max_new_tokens (the sampler's cap in args), and the largest mass each model leaves unsettled."""
    game = oracle_lib.CategoryGame()
    E = game.extended_payoff()
    dists, unsettled = {}, {}
    for n in names:
        model = AutoModelForCausalLM.from_pretrained(str(d / n)).eval()
        tok = AutoTokenizer.from_pretrained(str(d / n))
        ids = config.encode_prompts(tok, prompts, 1024)
        dists[n], pruned = game.policy_distribution(model, tok, ids, [tok.eos_token_id], max_new_tokens,
                                                    min_mass=1e-4)  # (P, C+1)
        unsettled[n] = float(pruned.max())
    M = torch.tensor([[100 * float(((dists[i] @ E) * dists[j]).sum(-1).mean()) for j in names] for i in names])
    return M, unsettled


@pytest.mark.slow
def test_matrix_matches_exact_distributions_and_outputs_parse_back(setup):
    d = setup
    ev.GENERATED.clear()
    r = ev.main(args(d, ["a", "b", "c"]))
    M, SE = r["M"], r["SE"]
    K = len(r["names"])
    off = ~torch.eye(K, dtype=torch.bool)
    assert torch.allclose((M + M.T)[off], torch.full((K * K - K,), 100.0, dtype=torch.float64), atol=1e-9, rtol=0)
    # Sampling error: 8 samples x 20 prompts per model; SE is the standard error of the per-prompt win rates.
    # The estimate must lie within 4 SE of the exact value, plus the mass the enumeration left unsettled (< 0.5%
    # per model, counted as none: it can move a win rate by at most the two models' unsettled mass).
    exact, unsettled = exact_matrix(d, r["names"], ev.load_prompt_file(str(d / "prompts.jsonl"), "prompt"))
    slack = torch.tensor([[100 * (unsettled[i] + unsettled[j]) for j in r["names"]] for i in r["names"]])
    assert max(unsettled.values()) < 5e-3, unsettled
    assert ((M - exact.double()).abs()[off] <= 4 * SE[off] + slack.double()[off]).all(), (M, exact, SE)
    assert (SE[off] > 0).all() and (SE[off] < 3).all()
    # the three policies form a preference cycle: a > b > c > a
    assert M[0, 1] > 50 and M[1, 2] > 50 and M[2, 0] > 50
    names, rows, avg = read_winrate_csv(str(d / "out" / "winrate.csv"))
    assert names == ["a", "b", "c"]
    assert torch.allclose(torch.tensor(rows, dtype=torch.float64), M, atol=1e-4)
    assert avg == pytest.approx(r["avg"], abs=1e-4)
    md = (d / "out" / "winrate.md").read_text().splitlines()
    cells = [line.split("|")[2:5] for line in md[2:5]]
    for i in range(3):
        for j in range(3):
            if i != j:
                value, se = cells[i][j].split("±")
                assert float(value) == pytest.approx(round(float(M[i, j]), 1), abs=0.051)
                assert float(se) == pytest.approx(round(float(SE[i, j]), 1), abs=0.051)
    with open(d / "out" / "winrate_se.csv") as f:
        se_rows = [[float(x) for x in row[1:]] for row in list(csv.reader(f))[1:]]
    assert torch.allclose(torch.tensor(se_rows, dtype=torch.float64), SE, atol=1e-4)
    png = (d / "out" / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(d / "out" / "heatmap.png").size[0] > 100


@pytest.mark.slow
def test_cached_generations_and_judgments_are_reused(setup, monkeypatch):
    d = setup
    ev.GENERATED.clear()
    ev.main(args(d, ["a", "b"], "cache"))
    assert ev.GENERATED == ["a", "b"]
    calls = []
    real = oracle_lib.CategoryGame.prob
    monkeypatch.setattr(oracle_lib.CategoryGame, "prob", lambda self, x, a, b: calls.append(len(x)) or real(self, x, a, b))
    ev.GENERATED.clear()
    r = ev.main(args(d, ["a", "b", "c"], "cache"))
    assert ev.GENERATED == ["c"]  # a and b come from the cache
    assert sum(calls) == 2 * 20 * 8 * 8  # only the new pairs (a, c) and (b, c) are judged
    first = read_winrate_csv(str(d / "cache" / "winrate.csv"))[1]
    assert first[0][1] == pytest.approx(float(r["M"][0, 1]), abs=1e-4)
    # a changed checkpoint is generated again
    ev.GENERATED.clear()
    cfg = d / "a" / "config.json"
    os.utime(cfg, ns=(os.stat(cfg).st_atime_ns, os.stat(cfg).st_mtime_ns + 10**9))
    ev.main(args(d, ["a", "b"], "cache"))
    assert ev.GENERATED == ["a"]


def test_bad_input_fails_before_any_generation(base, tmp_path, capsys):
    d = tmp_path / "models"  # two good models, the prompts and the oracle around the bad argument
    d.mkdir()
    for name in ("a", "b"):
        (d / name).symlink_to(base)
    (d / "prompts.jsonl").write_text(json.dumps({"prompt": "Pick one."}) + "\n")
    (d / "oracle.yaml").write_text("oracle: {kind: category}\n")
    ev.GENERATED.clear()
    (tmp_path / "notackpt").mkdir()
    (tmp_path / "nofield.jsonl").write_text('{"instruction": "hi"}\n')
    cases = [
        (["--models", f"a={d / 'a'}", f"b={tmp_path / 'notackpt'}"], "no config.json"),
        (["--models", f"a={d / 'a'}", f"b={tmp_path / 'missing'}"], "does not exist"),
        (["--models", f"a={d / 'a'}"], "at least two models"),
        (["--models", f"a={d / 'a'}", f"a={d / 'b'}"], "given twice"),
        (["--models", f"a={d / 'a'}", f"b={d / 'b'}", "--prompts", str(tmp_path / "nofield.jsonl")],
         "no string field 'prompt'"),
        (["--models", f"a={d / 'a'}", f"b={d / 'b'}", "--samples", "4", "--temperature", "0"], "needs --temperature > 0"),
        (["--models", f"a={d / 'a'}", f"b={d / 'b'}", "--samples", "4", "--greedy"], "--greedy is one response"),
    ]
    for argv, needle in cases:
        full = argv + (["--prompts", str(d / "prompts.jsonl")] if "--prompts" not in argv else []) + \
            ["--oracle", str(d / "oracle.yaml"), "--out", str(tmp_path / "o")]
        assert ev.cli(full) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert ev.GENERATED == []
    assert ev.cli(["--run", str(tmp_path)]) == 2 and "no config.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_run_mode_follows_the_checkpoints(setup, tmp_path, monkeypatch):
    d = setup
    cfg = config.load_config(None, [])
    cfg.update(model=str(d / "a"), out_dir=str(tmp_path / "run"), iterations=2, prompts_per_iteration=8, n_samples=4,
               max_new_tokens=6, lr=1e-3, batch_size=16, micro_batch_size=8, eval_prompts=4, num_subsets=3,
               eta=2.0, tau=0.1, ref_update_every=2)
    train_ddp.train(config.check_config(cfg, 1), 0, 1, torch.device("cpu"))
    import sample

    asked, generate = set(), sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, **kw: asked.add((kw["max_new_tokens"], kw["temperature"], kw["n"]))
                        or generate(*a, **kw))
    rows = ev.main(["--run", str(tmp_path / "run"), "--num-prompts", "16"])
    assert asked == {(6, 1.0, 4)}  # the run's max_new_tokens and temperature, 4 samples: not greedy, not 512 tokens
    assert [r["iteration"] for r in rows] == [0, 1]
    for r in rows:
        assert 0 <= r["winrate_vs_base"] <= 100 and 0 <= r["exploitability"] <= 0.5 and r["mean_length"] > 0
        for vs in ("base", "prev"):  # the sampled win rate estimates the exact one (enumerated distributions)
            gap = abs(r[f"winrate_vs_{vs}"] - r[f"winrate_vs_{vs}_exact"])
            assert gap <= 2 * r[f"se_vs_{vs}"] and r[f"se_vs_{vs}"] > 0, (r, vs)
    assert rows[0]["winrate_vs_prev"] == rows[0]["winrate_vs_base"]  # the first iterate's previous is the base
    out = tmp_path / "run" / "eval"
    for png in ("winrate.png", "length.png", "exploitability.png", "simplex.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "dynamics.csv") as f:
        back = list(csv.DictReader(f))
    assert float(back[1]["winrate_vs_base"]) == pytest.approx(rows[1]["winrate_vs_base"])


@pytest.mark.slow
def test_two_ranks_split_prompts_and_give_the_single_process_matrix(setup):
    """Greedy generations do not depend on how prompts are split, so 2 ranks (`torchrun --nproc_per_node 2
    eval.py`, its ranks forked: conftest.launch) must reproduce 1 process exactly."""
    from conftest import launch

    d = setup
    common = ["--models", f"a={d / 'a'}", f"c={d / 'c'}", "--prompts", str(d / "prompts.jsonl"), "--oracle",
              str(d / "oracle.yaml"), "--max-new-tokens", "8", "--greedy"]
    single = ev.main(common + ["--out", str(d / "greedy1")])
    status, said, printed = launch("eval", common + ["--out", str(d / "greedy2")], d / "logs")
    assert status == [0, 0], said
    names, rows, _ = read_winrate_csv(str(d / "greedy2" / "winrate.csv"))
    assert torch.allclose(torch.tensor(rows, dtype=torch.float64), single["M"], atol=1e-4)
    g1 = json.load(open(d / "greedy1" / "generations" / "a.json"))["responses"]
    g2 = json.load(open(d / "greedy2" / "generations" / "a.json"))["responses"]
    assert g1 == g2 and len(g1) == 20
    assert [x.count("row beats column") for x in printed] == [1, 0]  # rank 0 prints


def test_figure1_draws_the_runs_from_their_metrics(base, tmp_path, capsys):
    """--figure1: each run's exact category distributions on the simplex and its exploitability, read from
    metrics.jsonl; the table's numbers are the logged ones; runs of different games are refused."""
    runs = []
    for algo, extra in (("comal", dict(eta=2.0, tau=0.1, ref_update_every=2)), ("iter_ipo", dict(eta=2.0))):
        cfg = config.load_config(None, [])
        cfg.update(model=base, out_dir=str(tmp_path / algo), algo=algo, iterations=2, prompts_per_iteration=8,
                   n_samples=4, max_new_tokens=6, lr=1e-3, batch_size=16, micro_batch_size=8, eval_prompts=2,
                   num_subsets=3, eval_winrate=False, **extra)
        train_ddp.train(config.check_config(cfg, 1), 0, 1, torch.device("cpu"))
        runs.append(str(tmp_path / algo))
    res = ev.main(["--figure1", *runs, "--out", str(tmp_path / "fig")])
    assert (tmp_path / "fig" / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "fig" / "figure1.md").read_text()
    for algo, run in zip(("comal", "iter_ipo"), runs):
        logged = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl")) if "category_dist" in x]
        assert res[algo]["exploitability"] == [r["exploitability"] for r in logged]  # start, then each iteration
        p = torch.tensor(logged[-1]["category_dist"][:3], dtype=torch.float64)
        assert res[algo]["policies"][-1] == pytest.approx((p / p.sum()).tolist())
        assert f"| {algo} | 2 | {logged[0]['exploitability']:.4f} | {logged[-1]['exploitability']:.4f} |" in table
        for r in logged:  # per eval prompt too (diagnostics.py --steps): their mean, and the mean of their exploitabilities
            per = torch.tensor(r["category_dist_per_prompt"], dtype=torch.float64)
            assert per.shape == (2, 4) and per.mean(0).tolist() == pytest.approx(r["category_dist"], abs=2e-5)
            assert r["exploitability"] == pytest.approx(float(oracle_lib.CategoryGame().exploitability(per).mean()),
                                                        abs=1e-4)
    import yaml

    other = tmp_path / "comal" / "config.yaml"
    cfg = yaml.safe_load(other.read_text())
    cfg["oracle"]["payoff"] = [[0.5, 0.9, 0.2], [0.1, 0.5, 0.8], [0.8, 0.2, 0.5]]  # the transposed game
    other.write_text(yaml.safe_dump(cfg))
    assert ev.cli(["--figure1", runs[1], runs[0], "--out", str(tmp_path / "fig2")]) == 2
    assert "payoff differs" in capsys.readouterr().err


def test_figure1_distance_of_a_regularised_run_to_its_regularised_equilibrium():
    """An INPO run (pi_ref = pi_0) is measured against the NE of J_tau with pi_ref = its start distribution: the
    tabular INPO step (Alg. 4) iterated from that start converges there, so its TV tends to 0; a COMAL run
    (pi_ref moves every round) gets no such column."""
    import toy_game

    game = oracle_lib.CategoryGame()
    E = game.extended_payoff()
    start = torch.tensor([0.04, 0.10, 0.03, 0.83], dtype=torch.float64)
    eta, tau = 2.0, 0.1
    mu, recs = start.clone(), [{"iteration": -1, "category_dist": start.tolist()}]
    for k in range(200):  # Alg. 4: mu^(1 - eta tau) pi_ref^(eta tau) exp(eta P(. > mu))
        mu = torch.softmax((1 - eta * tau) * mu.log() + eta * tau * start.log() + eta * (E @ mu), 0)
        recs.append({"iteration": k, "category_dist": mu.tolist(), "tau": tau})
    star, tv = ev.regularized_distance(game, {"algo": "inpo"}, recs)
    assert tv < 1e-9
    assert ev.regularized_distance(game, {"algo": "inpo"}, recs[:6])[1] > 1e-3  # not there after 5 steps
    planted = toy_game.regularized_nash(E, start.log(), 2 * tau).exp()  # the wrong tau gives another point
    assert float((planted - torch.tensor(star)).abs().sum()) > 1e-2
    assert ev.regularized_distance(game, {"algo": "comal"}, recs) is None


def synthetic_run(path, algo, cfg_extra, scale=1.0, iterations=8, starts=([0.04, 0.10, 0.03, 0.83],)):
    """A run directory whose logged category distributions follow Alg. 2's closed form (written out here:
    log pi' = log pi + eta (E pi - tau (log pi - log ref)), normalised), each step scaled by `scale`; one
    trajectory per eval prompt's start (logged per prompt, with their mean, when there are several)."""
    import yaml

    E = oracle_lib.CategoryGame().extended_payoff()
    cfg = dict(algo=algo, iterations=iterations, **cfg_extra)
    rounds = cfg.get("ref_update_every", iterations) if algo == "comal" else iterations
    trajectories = []
    for start in starts:
        p = ref = torch.tensor(start, dtype=torch.float64)
        traj = [p]
        for k in range(iterations):
            t = k // rounds
            eta = cfg["eta"][min(t, len(cfg["eta"]) - 1)] if isinstance(cfg["eta"], list) else cfg["eta"]
            tau = cfg["eta_tau"] / eta if "eta_tau" in cfg else cfg.get("tau", 0.0)
            if algo == "comal" and k % rounds == 0:
                ref = p
            d = eta * (E @ p - tau * (p.log() - ref.log()))
            p = torch.softmax(p.log() + scale * d, 0)
            traj.append(p)
        trajectories.append(traj)
    recs = []
    for k in range(iterations + 1):
        ps = [traj[k] for traj in trajectories]
        rec = {"iteration": k - 1, "category_dist": (sum(ps) / len(ps)).tolist()}
        if len(ps) > 1:
            rec["category_dist_per_prompt"] = [p.tolist() for p in ps]
        recs.append(rec)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    return recs


@pytest.mark.parametrize("algo,extra", [("comal", dict(eta=[2.0, 1.0], eta_tau=0.5, ref_update_every=3)),
                                        ("inpo", dict(eta=2.0, tau=0.1)), ("iter_ipo", dict(eta=1.5))])
def test_steps_compares_each_logged_step_with_the_algorithms_exact_step(tmp_path, algo, extra, capsys):
    """--steps: a run whose model takes Alg. 2's exact steps (per-round eta, pi_ref per round or the start)
    gets cosine 1 and length 1 at every iteration, and the exact algorithm from its start is the run itself;
    one taking half steps gets length 0.5 (cosine 1) and ends elsewhere than the exact algorithm."""
    recs = synthetic_run(str(tmp_path / "exact"), algo, extra)
    rows = diagnostics.main(["--steps", str(tmp_path / "exact"), "--out", str(tmp_path / "o")])
    assert [r["iteration"] for r in rows] == list(range(8))
    for r, logged in zip(rows, recs[1:]):
        assert r["cos"] == pytest.approx(1.0, abs=1e-9) and r["length_ratio"] == pytest.approx(1.0, abs=1e-9)
        assert r["exact_algorithm"] == pytest.approx(logged["category_dist"], abs=1e-9)
    synthetic_run(str(tmp_path / "half"), algo, extra, scale=0.5)
    rows = diagnostics.main(["--steps", str(tmp_path / "half"), "--out", str(tmp_path / "o2")])
    assert all(r["cos"] == pytest.approx(1.0, abs=1e-9) for r in rows)
    assert all(r["length_ratio"] == pytest.approx(0.5, abs=1e-9) for r in rows)
    assert rows[-1]["exact_algorithm"] == pytest.approx(recs[-1]["category_dist"], abs=1e-9)  # from the same start
    assert abs(rows[-1]["exploitability"] - rows[-1]["exact_algorithm_exploitability"]) > 1e-3
    assert "length ratio median 0.50" in (tmp_path / "o2" / "steps.md").read_text()
    fit = diagnostics.step_fit(rows)
    assert fit["fraction"] == pytest.approx(0.5, abs=1e-9) and fit["r2"] == pytest.approx(1.0, abs=1e-9)
    capsys.readouterr()


def test_step_fit_splits_a_change_into_the_exact_step_and_a_rest():
    """step_fit: d_m = 0.5 d_x + y with y orthogonal to d_x gives fraction 0.5 and r2 = |0.5 d_x|^2 / |d_m|^2;
    two prompts moved alike have cosine 1, moved oppositely -1."""
    x1, y1 = torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 0.0, 1.0, -1.0], dtype=torch.float64)
    x2, y2 = torch.tensor([2.0, 0.0, -1.0, -1.0], dtype=torch.float64), torch.tensor([0.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    assert float(x2 @ y2) == 0
    rows = [{"d_model": [0.5 * x1 + y1, 0.5 * x1 + y1], "d_exact": [x1, x1]},
            {"d_model": [0.5 * x2 + y2, 0.5 * x2 + y2], "d_exact": [x2, x2]}]
    fit = diagnostics.step_fit(rows)
    explained = 2 * float((0.5 * x1) @ (0.5 * x1) + (0.5 * x2) @ (0.5 * x2))
    total = 2 * float((0.5 * x1 + y1) @ (0.5 * x1 + y1) + (0.5 * x2 + y2) @ (0.5 * x2 + y2))
    assert fit["fraction"] == pytest.approx(0.5, abs=1e-12)
    assert fit["r2"] == pytest.approx(explained / total, abs=1e-12) and fit["r2"] < 0.9
    assert fit["prompts_together"] == pytest.approx(1.0, abs=1e-12)
    rows[0]["d_model"][1], rows[1]["d_model"][1] = -rows[0]["d_model"][0], -rows[1]["d_model"][0]
    assert diagnostics.step_fit(rows)["prompts_together"] == pytest.approx(-1.0, abs=1e-12)
    assert diagnostics.step_fit([{"d_model": [x1], "d_exact": [x1]}])["prompts_together"] is None


def test_steps_refuses_an_algorithm_without_a_closed_form_step(tmp_path, capsys):
    synthetic_run(str(tmp_path / "r"), "comal", dict(eta=2.0, eta_tau=0.5, ref_update_every=3))
    import yaml

    cfg = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    cfg["algo"] = "grpo"
    (tmp_path / "r" / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert diagnostics.cli(["--steps", str(tmp_path / "r")]) == 2
    assert "no closed-form step" in capsys.readouterr().err


def test_steps_per_prompt_when_the_run_logged_them(tmp_path):
    """Two eval prompts, each on its own exact trajectory: compared per prompt, every step is exact (cosine 1)
    and the exploitability is the mean over prompts, the metric the trainer logs; the mean distribution of
    two exact trajectories is not one (compared on it, the cosine would not be 1)."""
    game = oracle_lib.CategoryGame()
    starts = ([0.04, 0.10, 0.03, 0.83], [0.50, 0.05, 0.05, 0.40])
    recs = synthetic_run(str(tmp_path / "r"), "comal", dict(eta=[2.0, 1.0], eta_tau=0.5, ref_update_every=3),
                         starts=starts)
    rows = diagnostics.main(["--steps", str(tmp_path / "r"), "--out", str(tmp_path / "o")])
    assert all(r["prompts"] == 2 for r in rows)
    assert all(r["cos"] == pytest.approx(1.0, abs=1e-9) and r["length_ratio"] == pytest.approx(1.0, abs=1e-9)
               for r in rows)
    for r, logged in zip(rows, recs[1:]):
        per = [float(game.exploitability(torch.tensor(p, dtype=torch.float64))) for p in logged["category_dist_per_prompt"]]
        assert r["exploitability"] == pytest.approx(sum(per) / 2, abs=1e-12)
        assert r["exact_algorithm_exploitability"] == pytest.approx(sum(per) / 2, abs=1e-9)
    assert any(abs(r["exploitability"] - float(game.exploitability(torch.tensor(r["model"])))) > 1e-3 for r in rows)
    for rec in recs:  # the same run without the per-prompt records: compared on the mean, not exact
        del rec["category_dist_per_prompt"]
    with open(tmp_path / "r" / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    rows = diagnostics.main(["--steps", str(tmp_path / "r"), "--out", str(tmp_path / "o2")])
    assert min(r["cos"] for r in rows) < 0.999


@pytest.mark.slow
def test_sample_category_counts_are_the_samplers_distribution_on_the_training_prompts(base, tmp_path):
    """Each iteration logs the categories of the responses it trained on (sample_category_counts, all samples
    of all prompts; "none" last). At iteration 0 they are samples of the start model on the iteration's prompts,
    so they must agree, within 4 binomial standard errors, with the exact distribution of the start model
    on those prompts (policy_distribution, computed here independently); counting only each prompt's first
    sample, or the wrong category as "none", would not."""
    cfg = config.load_config(None, [])
    cfg.update(model=base, out_dir=str(tmp_path / "run"), algo="comal", eta=2.0, tau=0.1, ref_update_every=2,
               iterations=1, prompts_per_iteration=8, n_samples=48, max_new_tokens=6, lr=1e-3, batch_size=96,
               micro_batch_size=96, eval_prompts=1, num_subsets=3, eval_winrate=False)
    cfg = config.check_config(cfg, 1)
    train_ddp.train(cfg, 0, 1, torch.device("cpu"))
    rec = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl") if '"sample_category_counts"' in x]
    assert [r["iteration"] for r in rec] == [0]
    counts = rec[0]["sample_category_counts"]
    assert len(counts) == 4 and sum(counts) == 8 * 48  # every sample of every prompt, once
    freq = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    model, tok = AutoModelForCausalLM.from_pretrained(base).eval(), AutoTokenizer.from_pretrained(base)
    prompts = config.iteration_prompts(config.load_prompts(cfg), cfg, 0, 0, 1)
    ids = config.encode_prompts(tok, prompts, cfg["max_prompt_tokens"])
    game = oracle_lib.CategoryGame()
    with torch.no_grad():
        exact, _ = game.policy_distribution(model, tok, ids, [tok.eos_token_id], cfg["max_new_tokens"])
    p = exact.mean(0)
    n = 8 * 48
    se = (p * (1 - p) / n).sqrt().clamp(min=1 / n)
    assert ((freq - p).abs() / se).max() < 4, (freq.tolist(), p.tolist())
    assert (p > 0.05).sum() >= 2  # a spread distribution: the comparison can tell categories apart


def test_sampling_check_agrees_with_the_enumeration_and_catches_a_wrong_one(base, tmp_path, monkeypatch):
    """diagnostics.py --sampling-check: model.generate samples of the newest checkpoint against the exact
    category distribution; a distribution with two categories swapped is refused."""
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(base, run / "checkpoints" / "iter-00000")
    (run / "checkpoints" / "iter-00000" / "manifest.json").write_text("{}")
    cfg = dict(config.load_config(None, []), model=base, eval_prompts=2)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    got = diagnostics.main(["--sampling-check", str(run), "--samples", "400", "--out", str(tmp_path / "o")])
    assert (tmp_path / "o" / "sampling_check.md").is_file() and got["sampled"][1] > 0.3  # the base's paper skew
    real = oracle_lib.CategoryGame.policy_distribution

    def swapped(self, *a, **kw):  # rock and paper exchanged
        dist, unsettled = real(self, *a, **kw)
        return dist[:, [1, 0, 2, 3]], unsettled

    monkeypatch.setattr(oracle_lib.CategoryGame, "policy_distribution", swapped)
    with pytest.raises(ev.EvalError, match="outside 4 standard errors"):
        diagnostics.main(["--sampling-check", str(run), "--samples", "400", "--out", str(tmp_path / "o")])
