"""toy_game.py: the paper's synthetic claims, its theorems, the loss minimisers and the CLI."""
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import toy_game as tg

D = torch.float64
NE = torch.tensor(tg.PAPER_NE, dtype=D)


def kl(log_p, log_q):
    """KL(p || q) from log-probabilities."""
    return float((log_p.exp() * (log_p - log_q)).sum())


def exploits(game, traj):
    return [tg.exploitability(game.A, lp.exp()) for lp in traj]


def tv(log_p, log_q):
    return 0.5 * float((log_p.exp() - log_q.exp()).abs().sum())


def random_log_policy(n, gen, spread=1.0):
    return torch.log_softmax(spread * torch.randn(n, generator=gen, dtype=D), -1)


def game_with_interior_ne(n, gen):
    """A + A^T = 1 with a known full-support NE p*: A = 1/2 + c Q^T M Q with Q p* = 0."""
    p = torch.softmax(0.5 * torch.randn(n, generator=gen, dtype=D), -1)
    M = torch.randn(n, n, generator=gen, dtype=D)
    M = M - M.T
    Q = torch.eye(n, dtype=D) - p.unsqueeze(1) @ torch.ones(1, n, dtype=D)  # (I - p 1^T) p = 0
    S = Q.T @ M @ Q
    A = 0.5 + 0.5 * S / S.abs().max()
    return A, p


def game_with_condorcet_winner(n, gen):
    """Random A + A^T = 1 in which action 0 beats every other action: a pure NE."""
    S = torch.rand(n, n, generator=gen, dtype=D) - 0.5
    S = torch.triu(S, 1)
    S[0, 1:] = S[0, 1:].abs() + 0.05
    S = S - S.T
    return 0.5 + S.clamp(-0.5, 0.5)


# ---------------------------------------------------------------------------
# Acceptance 1: the paper's setting (App. I, Figs. 3/4)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper_runs():
    game = tg.make_game()
    cfg = tg.make_config()  # eta 0.3, tau 0.1, T 200, K 25, 5000 iterations
    res = tg.run(["comal", "comal_md", "mwu", "iter_ipo", "inpo"], game, cfg)
    # SPPO fits its loss by Newton at every step (2 ms each): its cycle shows within 1500 iterations
    res.update(tg.run(["sppo"], game, tg.make_config(iters=1500)))
    return game, cfg, res


def test_comal_converges_to_the_nash_equilibrium_in_the_paper_setting(paper_runs):
    game, cfg, res = paper_runs
    for name in ("comal", "comal_md"):
        assert len(res[name]["policies"]) == cfg.outer * cfg.inner + 1
        assert res[name]["exploitability"][-1] < 1e-3
        assert max(abs(a - b) for a, b in zip(res[name]["final"], tg.PAPER_NE)) < 1e-3


def test_md_baselines_cycle_and_inpo_has_a_constant_gap(paper_runs):
    game, cfg, res = paper_runs
    for name in ("mwu", "iter_ipo", "sppo"):
        assert min(res[name]["exploitability"][-1000:]) > 0.05, name
    inpo_last = torch.tensor(res["inpo"]["policies"][-1000:], dtype=D)
    assert float((inpo_last - inpo_last[-1]).abs().max()) < 1e-6  # it converges ...
    assert float((inpo_last[-1] - NE).norm()) > 0.01  # ... but not to the NE
    # ... and its limit is the NE of the regularised game J_tau(., ., pi_init) (Theorem 2)
    pi_tau = tg.regularized_nash(game.A, game.log_init, cfg.tau).exp()
    assert float((inpo_last[-1] - pi_tau).abs().max()) < 1e-6


def test_comal_with_fitted_inpo_loss_matches_the_closed_form():
    """--solver loss: Alg. 3 minimising the exact expected INPO loss (14) each iteration."""
    game = tg.make_game()
    fitted = tg.ALGORITHMS["comal"](game, tg.make_config(solver="loss", outer=8, inner=25), None)
    closed = tg.ALGORITHMS["comal"](game, tg.make_config(outer=8, inner=25), None)
    assert max(tv(a, b) for a, b in zip(fitted, closed)) < 1e-8


# ---------------------------------------------------------------------------
# Acceptance 2: Theorems 1 and 2
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("solver", ["closed", "inpo"])
def test_theorem2_linear_rate_of_the_inner_solver(tau, solver):
    gen = torch.Generator().manual_seed(int(tau * 100))
    game = SimpleNamespace(A=game_with_interior_ne(4, gen)[0], log_init=None)
    log_ref = random_log_policy(4, gen)
    eta = tau / (tau**2 + 0.5)  # the largest step Theorem 2 allows
    cfg = tg.make_config(eta=eta, tau=tau, solver="loss")
    star = tg.regularized_nash(game.A, log_ref, tau)
    kl0 = kl(star, log_ref)
    mu = log_ref
    for k in range(1, 61):
        mu = tg.prox_step(solver, game, cfg, None, mu, log_ref, tau)  # mu^{k+1}
        bound = (1 - eta * tau / 2) ** k * kl0
        assert kl(star, mu) <= bound + 1e-13, (k, kl(star, mu), bound)


def test_regularized_nash_is_the_fixed_point():
    gen = torch.Generator().manual_seed(3)
    A, _ = game_with_interior_ne(5, gen)
    log_ref = random_log_policy(5, gen)
    star = tg.regularized_nash(A, log_ref, 0.2)
    # pi_tau* = Prox(pi_tau*, eta g^tau): it does not move under Alg. 2
    g = A @ star.exp() - 0.2 * (star - log_ref)
    assert float((tg.log_prox(star, g, 0.7) - star).abs().max()) < 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_theorem1_kl_to_the_nash_equilibrium_never_increases(seed):
    gen = torch.Generator().manual_seed(seed)
    if seed == 0:
        A, p_star, log_pi = tg.make_game().A, NE, tg.make_game().log_init
    else:
        A, p_star = game_with_interior_ne(3 + 2 * seed, gen)
        log_pi = random_log_policy(len(p_star), gen, spread=2.0)
    log_star = p_star.log()
    kls = [kl(log_star, log_pi)]
    for _ in range(100):
        log_pi = tg.regularized_nash(A, log_pi, 0.03)  # exact solution of J_tau(., ., pi^t)
        kls.append(kl(log_star, log_pi))
    assert all(b <= a + 1e-12 for a, b in zip(kls, kls[1:]))
    assert kls[-1] < 1e-3 * kls[0]  # and last-iterate convergence


# ---------------------------------------------------------------------------
# Acceptance 3: minimisers of the exact expected losses = the closed forms
# ---------------------------------------------------------------------------


@pytest.fixture
def setup3():
    gen = torch.Generator().manual_seed(7)
    A, _ = game_with_interior_ne(5, gen)
    game = SimpleNamespace(A=A, log_init=None)
    mu, ref, center = (random_log_policy(5, gen) for _ in range(3))
    return game, mu, ref, center, tg.make_config(eta=0.8, tau=0.3, solver="loss")


def test_ipo_minimiser_is_prox_of_center_with_win_rate_against_mu(setup3):
    game, mu, _, center, cfg = setup3
    got = tg.prox_step("ipo", game, cfg, None, mu, log_ref=center)  # IPO steps from its centre pi_ref
    want = tg.log_prox(center, game.A @ mu.exp(), cfg.eta)  # Prox(pi, eta g_mu), eq. (13)
    assert tv(got, want) < 1e-4 and tv(got, want) < 1e-10


@pytest.mark.parametrize("solver", ["inpo", "comal_rebel", "comal_dro", "closed"])
def test_regularized_minimisers_are_the_alg2_step(setup3, solver):
    game, mu, ref, _, cfg = setup3
    got = tg.prox_step(solver, game, cfg, None, mu, ref, cfg.tau)
    g_tau = game.A @ mu.exp() - cfg.tau * (mu - ref)  # g^tau_mu
    assert tv(got, tg.log_prox(mu, g_tau, cfg.eta)) < 1e-10


@pytest.mark.parametrize("solver", ["rebel", "dro", "sppo"])
def test_unregularized_forms(setup3, solver):
    game, mu, _, _, cfg = setup3
    got = tg.prox_step(solver, game, cfg, None, mu)
    want = tg.log_prox(mu, game.A @ mu.exp(), cfg.eta)
    # SPPO replaces log Z by eta/2: exact up to O(eta^2), checked separately below
    assert tv(got, want) < (3e-2 if solver == "sppo" else 1e-10)


def test_dpo_minimiser_under_a_bradley_terry_oracle():
    gen = torch.Generator().manual_seed(11)
    r = torch.randn(5, generator=gen, dtype=D)
    A = torch.sigmoid(r[:, None] - r[None, :])
    game = SimpleNamespace(A=A, log_init=None)
    mu = random_log_policy(5, gen)
    got = tg.prox_step("iter_dpo", game, tg.make_config(eta=0.6), None, mu)
    assert tv(got, tg.log_prox(mu, r, 0.6)) < 1e-8  # DPO: Prox(pi, eta r)


def test_sppo_minimiser_approaches_the_prox_step_as_eta_cubed():
    """SPPO's log Z = eta/2 is off by eta^2 Var(g)/2 (E_mu g_mu = 1/2); that near-constant
    shift is absorbed by normalisation up to O(eta), so the policy error is O(eta^3):
    halving eta divides the gap by ~8."""
    game = tg.make_game()
    mu = game.log_init
    gaps = []
    for eta in (0.4, 0.2, 0.1, 0.05):
        got = tg.prox_step("sppo", game, tg.make_config(eta=eta), None, mu)
        gaps.append(tv(got, tg.log_prox(mu, tg.win_rates(game.A, mu), eta)))
    ratios = [a / b for a, b in zip(gaps, gaps[1:])]
    assert all(7.5 < q < 8.5 for q in ratios), (gaps, ratios)
    assert gaps[0] < 0.4**3 * 0.25  # and small: Var(g) <= 1/4


def test_sppo_is_exact_when_its_partition_assumption_holds():
    """At the NE every win rate is 1/2, so log Z = eta/2 exactly and SPPO's fit is the prox step (= NE)."""
    game = tg.make_game()
    got = tg.prox_step("sppo", game, tg.make_config(eta=0.5), None, NE.log())
    assert tv(got, NE.log()) < 1e-12


def test_nashmp_noiseless_objective_minimiser():
    """Many on-policy gradient steps on the exact NashMP objective, the target nearly frozen (kappa ~ 0),
    reach its closed-form minimiser; NashMP's KL strength to pi_ref (the paper's beta) is tau."""
    game = tg.make_game()
    beta, eta = 0.2, 0.5
    cfg = tg.make_config(iters=4000, kappa=1e-13, tau=beta, eta=eta, lr=1.0)
    traj = tg.ALGORITHMS["nashmp"](game, cfg, None)
    g = tg.win_rates(game.A, game.log_init)  # target = ref = init in the first iteration
    want = torch.log_softmax((g / beta + game.log_init + game.log_init / eta) / (1 + 1 / eta), -1)
    assert tv(traj[-1], want) < 1e-8


# ---------------------------------------------------------------------------
# Acceptance 4: sampled mode tracks noiseless; seeds repeat exactly
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["comal", pytest.param("iter_ipo", marks=pytest.mark.slow),
                                  pytest.param("sppo", marks=pytest.mark.slow)])
def test_sampled_mode_tracks_the_noiseless_trajectory(algo):
    """With n = 50k samples per iteration the win rates are estimated to ~2e-3
    (std <= 0.5/sqrt(n)), so each logit step is off by ~eta*2e-3; over 50
    iterations (one reference update for COMAL) of dynamics that are at best
    neutrally stable (MD cycles) the deviation stays near 1e-3-2e-3 (seeds 0-2).
    The tolerance 0.01 is ~5 of those."""
    game = tg.make_game()
    kw = dict(outer=2, inner=25, iters=50, samples=50_000)
    exact = tg.ALGORITHMS[algo](game, tg.make_config(**kw), None)
    sampled = tg.ALGORITHMS[algo](game, tg.make_config(mode="sampled", **kw), torch.Generator().manual_seed(0))
    assert len(exact) == len(sampled) == 51
    dev = max(float((a.exp() - b.exp()).abs().max()) for a, b in zip(exact, sampled))
    assert 0 < dev < 0.01, dev


@pytest.mark.parametrize("algo", ["comal", "comal_md"])
def test_step_scale_realises_that_fraction_of_every_step(algo):
    """--step-scale s: each iterate is pi^k moved the fraction s of Alg. 2's step in log space, renormalised
    (the exact iteration written out here: the round's pi_ref, the regularised win rates, the prox step)."""
    payoff = [[0.5, 0.1, 0.8, 1], [0.9, 0.5, 0.1, 1], [0.2, 0.9, 0.5, 1], [0, 0, 0, 0.5]]  # + a dominated action
    game = tg.make_game(payoff, [0.038, 0.102, 0.025, 0.835])
    eta, tau, s = 5.0, 0.18, 0.4
    cfg = tg.make_config(eta=eta, tau=tau, outer=3, inner=4, step_scale=s)
    got = [torch.tensor(p, dtype=D).log() for p in tg.run([algo], game, cfg)[algo]["policies"]]
    lp, want = game.log_init, [game.log_init]
    for _ in range(3):
        ref = lp
        for _ in range(4):
            step = torch.log_softmax(lp + eta * (game.A @ lp.exp() - tau * (lp - ref)), -1)
            lp = torch.log_softmax(lp + s * (step - lp), -1)
            want.append(lp)
    assert len(got) == len(want) == 13
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-10)
    full = tg.run([algo], game, tg.make_config(eta=eta, tau=tau, outer=3, inner=4))[algo]["policies"]
    assert tv(torch.tensor(full[-1], dtype=D).log(), got[-1]) > 0.05  # the scale changes the trajectory


def test_same_seed_same_json_different_seed_different_json(tmp_path):
    args = ["--algos", "comal,iter_dpo,sppo,nashmp,comal_dr_grpo,dro,rebel,mwu,omwu,mirror_prox", "--mode", "sampled",
            "--outer", "3", "--inner", "4", "--iters", "12", "--samples", "300"]
    outs = []
    for i, seed in enumerate(("5", "5", "6")):
        path = tmp_path / f"{i}.json"
        assert tg.cli(args + ["--seed", seed, "--json", str(path)]) == 0
        outs.append(path.read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]
    res = json.loads(outs[0])
    for name, r in res.items():
        assert len(r["exploitability"]) == len(r["policies"]) == 13  # 3 x 4 COMAL rounds = 12 iterations
        assert r["final"] == r["policies"][-1]
        assert abs(sum(r["final"]) - 1) < 1e-9


# ---------------------------------------------------------------------------
# Acceptance 5: any valid payoff
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 5] + [pytest.param(n, marks=pytest.mark.slow) for n in (4, 8)])
def test_random_games_comal_converges_mwu_does_not_on_mixed(n):
    gen = torch.Generator().manual_seed(100 + n)
    cfg = tg.make_config(eta=2.0, tau=0.1, inner=10, outer=3000, iters=10_000)
    uniform = torch.full((n,), -math.log(n), dtype=D)
    for kind in ("mixed", "pure"):
        if kind == "mixed":
            A, p_star = game_with_interior_ne(n, gen)
        else:
            A = game_with_condorcet_winner(n, gen)
        game = SimpleNamespace(A=A, log_init=uniform)
        tg.validate_payoff(A.tolist())  # a valid --payoff
        e_comal = exploits(game, tg.ALGORITHMS["comal_md"](game, cfg, None))
        assert e_comal[-1] < 1e-3, (n, kind, e_comal[-1])
        if kind == "mixed":
            assert min(exploits(game, tg.ALGORITHMS["mwu"](game, cfg, None))[-1000:]) > 1e-3, n
            assert tg.exploitability(A, p_star) < 1e-12  # the construction's NE is one


def test_comal_via_the_cli_on_a_payoff_file(tmp_path):
    gen = torch.Generator().manual_seed(8)
    A, _ = game_with_interior_ne(8, gen)
    (tmp_path / "A.json").write_text(json.dumps(A.tolist()))
    out = tmp_path / "r.json"
    assert tg.cli(["--algos", "comal", "--payoff", str(tmp_path / "A.json"), "--eta", "2", "--tau", "0.1",
                   "--inner", "10", "--outer", "1000", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["comal"]["exploitability"][-1] < 1e-3


# ---------------------------------------------------------------------------
# Acceptance 6: bad input
# ---------------------------------------------------------------------------

BAD = [
    (["--payoff", "[[0.5, 0.5, 0.5], [0.5, 0.5]]"], "not square"),
    (["--payoff", '[[0.5, "x"], [0.5, 0.5]]'], "not a finite number"),
    (["--payoff", "[[0.5, 1.5], [-0.5, 0.5]]"], "outside [0, 1]"),
    (["--payoff", "[[0.5, 0.7], [0.7, 0.5]]"], "must be 1"),
    (["--payoff", "[[0.5, 0.5], [0.5, 0.5]"], "not valid JSON"),
    (["--payoff", "/nonexistent/A.json"], "does not exist"),
    (["--init", "[0.2, 0.5, 0.4]"], "not a distribution"),
    (["--init", "[0.6, 0.5, -0.1]"], "positive probability"),
    (["--init", "[0.5, 0.5]"], "has 2 entries"),
    (["--algos", "comal,nash_everything"], "unknown algorithm"),
    (["--eta", "0"], "--eta must be a finite number > 0"),
    (["--eta", "-1"], "--eta must be a finite number > 0"),
    (["--tau", "0"], "--tau must be a finite number > 0"),
    (["--step-scale", "0"], "--step-scale must be a finite number > 0"),
    (["--mode", "noisy"], "--mode"),
    (["--eta", "abc"], "invalid float"),
]


@pytest.mark.parametrize("argv,needle", BAD)
def test_bad_input_is_one_line_and_status_2(argv, needle, capsys, tmp_path):
    assert tg.cli(argv + ["--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_bad_input_exit_status_from_the_shell():
    p = subprocess.run([sys.executable, "toy_game.py", "--payoff", "[[0.5, 0.9], [0.9, 0.5]]"],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "must be 1" in p.stderr and "Traceback" not in p.stderr


# ---------------------------------------------------------------------------
# The figures and plots
# ---------------------------------------------------------------------------


def test_figures_and_plot_are_written(tmp_path):
    assert tg.cli(["--figures", str(tmp_path), "--outer", "2", "--inner", "5", "--iters", "10", "--samples", "200"]) == 0
    for fig in tg.FIGURES:
        png = (tmp_path / f"{fig}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
        res = json.loads((tmp_path / f"{fig}.json").read_text())
        assert set(res) == set(tg.FIGURES[fig][1])
    assert tg.cli(["--algos", "comal,mwu", "--iters", "20", "--outer", "2", "--inner", "10",
                   "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
