"""Tabular preference games: every algorithm of comal's table (comal.ALGOS) on a payoff matrix.

A policy is a distribution over n actions (responses) y; the oracle is a
payoff matrix A with A[i, j] = P(y_i > y_j) and A + A^T = 1. The alignment
game (eq. 1) is J(pi1, pi2) = pi1^T A pi2 - 1/2; its symmetric Nash
equilibrium pi* has exploitability max_i (A pi*)_i - 1/2 = 0. The default A
is the intransitive 3x3 game of App. I, whose unique NE is [4/11, 3/11, 4/11].

The algorithms, their loop (rounds, pi_ref, opponent) and their losses come
from comal.ALGOS, the same specs the language-model trainer runs; exact
mirror descent (mwu, comal_md) is the reference. Two modes (`--mode`):
- noiseless: every update sees the exact population quantities. A spec whose
  minimiser is exactly a prox step (its prox_gain: IPO, INPO, REBEL, DRO,
  Mirror-Prox, OMWU) uses that closed form; the others (DPO on a non-BT
  oracle, SPPO) minimise their exact expected loss on a table of logits, and
  the surrogates (GRPO, NashMP) take gradient steps on it. `--solver loss`
  fits the exact expected loss for every loss-based algorithm instead.
- sampled: each iteration draws groups of --group responses from mu with a
  seeded torch.Generator, Bernoulli labels from A, and builds the examples
  with examples.make_examples, exactly as on a language model (Figure 4).

Policies are kept as log-probabilities (float64) so that nearly deterministic
iterates (iterative DPO) neither underflow nor lose their tail.

CLI (see DESIGN.md):
  python toy_game.py --algos comal,mwu,iter_ipo --mode noiseless --json out.json --plot out.png
  python toy_game.py --figures runs/toy      # Figures 1, 3, 4 and the relatives, PNG + JSON
"""
import argparse
import json
import math
import os
import sys
from types import SimpleNamespace

import torch

import comal
import examples
import oracle
from opponents import OPPONENTS
from keys import Key, integer, number, one_of, positive, problem

DTYPE = torch.float64
PAPER_PAYOFF = oracle.PAPER_PAYOFF  # App. I
PAPER_INIT = [0.2, 0.5, 0.3]
PAPER_NE = [4 / 11, 3 / 11, 4 / 11]


class BadInput(ValueError):
    """A user error: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------
# The game
# ---------------------------------------------------------------------------


def validate_payoff(A):
    """Return A as a float64 tensor or raise BadInput naming the problem (oracle.validate_payoff's rules)."""
    try:
        return oracle.validate_payoff(A)
    except oracle.OracleError as e:
        raise BadInput(str(e)) from None


def validate_init(p, n):
    """Return log(p) for a strictly positive distribution p over n actions, or raise BadInput."""
    if not isinstance(p, list) or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in p):
        raise BadInput("init must be a JSON list of finite numbers")
    if len(p) != n:
        raise BadInput(f"init has {len(p)} entries but the payoff matrix has {n} actions")
    if any(x <= 0 for x in p):
        raise BadInput("init must give every action positive probability (the game is played on supp(init); drop the action from the payoff instead)")
    if abs(sum(p) - 1.0) > 1e-6:
        raise BadInput(f"init sums to {sum(p):.8g}, not 1: it is not a distribution")
    p = torch.tensor(p, dtype=DTYPE)
    return torch.log(p / p.sum())


def win_rates(A, log_mu):
    """g_mu(y) = P(y > mu) = (A mu)_y, the gradient of J at mu (eq. 1)."""
    return A @ log_mu.exp()


def exploitability(A, p):
    """max_i (A p)_i - 1/2: how much a best response beats p; 0 iff p is a NE."""
    p = torch.as_tensor(p, dtype=DTYPE)
    return float((A @ p).max() - 0.5)


def log_prox(log_center, g, eta):
    """log Prox(center, eta*g) = log(center * exp(eta g) / Z) (eq. 3, App. C), in log space."""
    return torch.log_softmax(log_center + eta * g, dim=-1)


def regularized_nash(A, log_ref, tau, tol=1e-14, max_steps=200):
    """The NE pi_tau* of J_tau(., ., pi_ref) (eq. 2) to machine precision.

    pi_tau* is the fixed point pi ∝ pi_ref * exp(A pi / tau); solved here by
    damped Newton on the logits, independently of the iterative algorithms.
    """
    def residual(z):
        r = z - log_ref - (A @ torch.softmax(z, -1)) / tau
        return r - r.mean()

    z = log_ref.clone()
    r = residual(z)
    for _ in range(max_steps):
        if r.abs().max() < tol:
            break
        J = torch.autograd.functional.jacobian(residual, z)
        step = torch.linalg.pinv(J) @ r
        t = 1.0
        while True:
            z_new = z - t * step
            r_new = residual(z_new)
            if r_new.norm() < r.norm() or t < 1e-8:
                break
            t /= 2
        z, r = z_new, r_new
    return torch.log_softmax(z, -1)


# ---------------------------------------------------------------------------
# Data: what one iteration sees of the oracle, exact (population) or sampled, as comal's examples
# ---------------------------------------------------------------------------


def bernoulli_prefs(A, y, gen):
    """(N, G, G) Bernoulli preference labels among the G responses of each group.

    One oracle query per unordered pair: b[j, i] = 1 - b[i, j], diagonal 1/2.
    """
    N, G = y.shape
    p = A[y.unsqueeze(-1), y.unsqueeze(-2)]  # (N, G, G)
    b = (torch.rand(N, G, G, generator=gen, dtype=DTYPE) < p).to(DTYPE)
    upper = torch.triu(torch.ones(G, G, dtype=torch.bool), diagonal=1)
    b = torch.where(upper, b, 1 - b.transpose(-1, -2))
    return torch.where(torch.eye(G, dtype=torch.bool), torch.full_like(b, 0.5), b)


def lm_config(spec, cfg):
    """The language-model config keys the spec's examples and loss read, from the toy's flags (one-token
    responses in groups of cfg.group, all pairs) and the keys' defaults."""
    keys = {k: d.default for k, d in spec.key_defs().items()}
    return dict(keys, pair_selection="all", n_samples=cfg.group, max_new_tokens=1, clip_eps=cfg.clip_eps,
                kappa=cfg.kappa)


def population_examples(spec, A, log_mu, log_opp=None):
    """The population that comal's examples of the spec's kind estimate, with rows = actions: every pair
    (or action) with its probability under mu as weight and the exact win rates as values."""
    K = A.shape[0]
    mu = log_mu.exp()
    g = A @ mu  # g_mu = P(. > mu)
    adv = g - 0.5  # the population's GRPO advantages: centred, and scaled by the population std
    values = {"g": g, "adv": adv, "adv_scaled": adv / ((mu * adv**2).sum().sqrt() + 1e-6)}
    if log_opp is not None:
        gopp = A @ log_opp.exp()
        values.update(gopp=gopp, gopp_base=(mu * gopp).sum().expand(K))
    a, b = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")
    a, b = a.flatten(), b.flatten()
    if spec.examples == "pairs":  # (y, y') ~ mu x mu, the winner first: weight mu(y) mu(y') P(y > y')
        return {"rows": {"w": a, "l": b}, "weight": mu[a] * mu[b] * A[a, b], "values": values}
    if spec.examples == "response_pairs":
        return {"rows": {"a": a, "b": b}, "weight": mu[a] * mu[b], "values": values}
    if spec.examples == "groups":  # one group holding every action, weighted by mu
        return {"rows": {"y": torch.arange(K)[None]}, "weight": torch.ones(1, dtype=DTYPE), "values": dict(values, gw=mu)}
    return {"rows": {"y": torch.arange(K)}, "weight": mu, "values": values}


def sampled_examples(spec, A, log_mu, log_opp, cfg, gen):
    """examples.make_examples on sampled groups: cfg.samples // cfg.group groups of cfg.group responses from mu
    (and as many from the opponent), Bernoulli labels. Returns (examples, action of each row), aggregated
    over examples that are identical for the loss (same actions and values), weights summed."""
    N, G = max(cfg.samples // cfg.group, 1), cfg.group
    y = torch.multinomial(log_mu.exp(), N * G, replacement=True, generator=gen).view(N, G)
    M = bernoulli_prefs(A, y, gen)
    M_opp = None
    if log_opp is not None:
        y_opp = torch.multinomial(log_opp.exp(), N * G, replacement=True, generator=gen).view(N, G)
        M_opp = (torch.rand(N, G, G, generator=gen, dtype=DTYPE) < A[y[:, :, None], y_opp[:, None, :]]).to(DTYPE)
    ex = examples.make_examples(spec, M, lm_config(spec, cfg), M_opp)
    actions = y.flatten()
    # aggregate: the loss sees an example only through its rows' actions and values
    feats = [actions[r].reshape(len(ex["weight"]), -1).to(DTYPE) for r in ex["rows"].values()]
    feats += [v[r].reshape(len(ex["weight"]), -1) for r in ex["rows"].values() for v in ex["values"].values()]
    feats = torch.cat(feats, 1)  # (E, D), hashed to one key by a random projection (collisions: measure zero)
    key = feats @ torch.rand(feats.shape[1], generator=torch.Generator().manual_seed(0), dtype=DTYPE).add_(1)
    _, inverse = torch.unique(key, return_inverse=True)
    U = int(inverse.max()) + 1
    first = torch.full((U,), len(inverse), dtype=torch.long).scatter_reduce(0, inverse, torch.arange(len(inverse)), "amin")
    weight = torch.zeros(U, dtype=DTYPE).index_add_(0, inverse, ex["weight"].to(DTYPE))
    ex = {"rows": {f: r[first] for f, r in ex["rows"].items()}, "weight": weight / N, "values": ex["values"]}
    return ex, actions


# ---------------------------------------------------------------------------
# Fitting a logits table to a loss
# ---------------------------------------------------------------------------


def fit_logits(objective, x0, max_steps=100, tol=1e-12):
    """argmin_x objective(x) by damped Newton with the exact Hessian.

    The pseudo-inverse ignores the directions the loss cannot see (a constant
    shift of the logits, actions absent from the data), which therefore stay
    at x0; a non-descent Newton step falls back to the gradient, and the step
    is halved until the loss decreases.
    """
    x = x0.detach().clone()
    for _ in range(max_steps):
        x.requires_grad_(True)
        f = objective(x)
        (g,) = torch.autograd.grad(f, x, create_graph=True)
        if g.detach().abs().max() < tol:
            break
        rows = [torch.autograd.grad(g[i], x, retain_graph=True, allow_unused=True)[0] for i in range(len(x))]
        H = torch.stack([r if r is not None else torch.zeros_like(x) for r in rows]).detach()
        g, f, x = g.detach(), f.detach(), x.detach()
        lam, V = torch.linalg.eigh((H + H.T) / 2)
        keep = lam.abs() > 1e-10 * lam.abs().max()
        inv = torch.where(keep, 1.0 / lam.abs().clamp(min=1e-300), torch.zeros_like(lam))
        d = -V @ (inv * (V.T @ g))  # |H|^-1 g: a descent direction even where H is indefinite
        slope = float(torch.dot(d, g))  # minus the squared Newton decrement
        if not slope < -(1e-20 + 1e-12 * abs(float(f))):
            break  # the predicted decrease is below float64 resolution: converged
        t = 1.0
        with torch.no_grad():
            while (f_new := objective(x + t * d)) > f + 1e-4 * t * slope and t > 1e-10:
                t /= 2
        if not f_new < f:
            break  # no further decrease representable in float64
        x = x + t * d
    return x.detach()


# ---------------------------------------------------------------------------
# One tabular step of an algorithm of comal's table
# ---------------------------------------------------------------------------


def tabular_step(spec, game, cfg, gen, log_mu, log_ref=None, tau=None, log_opp=None, eta=None):
    """The step of comal.ALGOS's `spec` from the sampler mu, on the logits table.

    noiseless with --solver auto and an exact spec: the closed form Prox(center, eta * spec.prox_gain).
    Otherwise the spec's own loss (examples.batch_loss) on the population (noiseless) or on sampled groups
    (examples.make_examples), minimised exactly (fit_logits), or for a surrogate (GRPO, NashMP) followed by
    gradient steps of size cfg.lr: cfg.grad_steps of them, one for an on-policy spec.
    """
    A, eta = game.A, cfg.eta if eta is None else eta
    log_center = {"mu": log_mu, "ref": log_ref}[spec.center]
    if tau and not spec.tau:
        raise ValueError(f"this algorithm has no KL term: tau = {tau} would be ignored")
    h = comal.hyper(spec, lm_config(spec, cfg), eta, (cfg.tau if tau is None else tau) if spec.tau else None)
    noiseless = cfg.mode == "noiseless"
    if noiseless and cfg.solver == "auto" and spec.prox_gain is not None:
        q = SimpleNamespace(g=win_rates(A, log_mu), mu=log_mu, ref=log_ref,
                            gopp=win_rates(A, log_opp) if log_opp is not None else None)
        return log_prox(log_center, spec.prox_gain(q, h), eta)
    if noiseless:
        ex, actions = population_examples(spec, A, log_mu, log_opp), torch.arange(A.shape[0])
    else:
        ex, actions = sampled_examples(spec, A, log_mu, log_opp, cfg, gen)
    opp_logps = log_opp if OPPONENTS[spec.opponent] and OPPONENTS[spec.opponent].logps else None  # as on LMs
    seq = {name: lp[actions] for name, lp in (("mu", log_mu), ("ref", log_ref), ("opp", opp_logps)) if lp is not None}
    ones = torch.ones(len(actions), 1, dtype=DTYPE)  # one-token responses: per-token log-probs are the sequence's
    frozen = examples.frozen_fields(spec, seq, ones[:, 0], {name: v[:, None] for name, v in seq.items()}, ones)
    rows, idx = torch.arange(len(actions)), torch.arange(len(ex["weight"]))

    def objective(theta):
        pi = torch.log_softmax(theta, -1)[actions]
        pi = pi[:, None] if spec.token_level else pi
        return (ex["weight"] * examples.batch_loss(spec, ex, idx, pi, rows, frozen, h)).sum()

    if not spec.surrogate:
        return torch.log_softmax(fit_logits(objective, log_center), -1)
    theta = log_center.clone()
    for _ in range(1 if spec.on_policy else cfg.grad_steps):
        theta.requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(theta), theta)
        theta = (theta - cfg.lr * grad).detach()
    return torch.log_softmax(theta, -1)


def prox_step(name, game, cfg, gen, log_mu, log_ref=None, tau=None, log_opp=None):
    """One step of algorithm `name` (comal.ALGOS) from mu, or "closed": exact mirror descent (Alg. 2),
    log Prox(mu, eta g^tau_mu), the reference every exact algorithm is tested against."""
    if name == "closed":
        g = estimated_win_rates(game.A, log_mu, None if cfg.mode == "noiseless" else cfg.samples, gen)
        if log_ref is not None and tau:
            g = g - tau * (log_mu - log_ref)
        return log_prox(log_mu, g, cfg.eta)
    return tabular_step(comal.ALGOS[name], game, cfg, gen, log_mu, log_ref, tau, log_opp)


def estimated_win_rates(A, log_mu, n, gen):
    """g_mu for every action: exact (n=None) or from n // n_actions Bernoulli
    comparisons of each action against fresh samples of mu."""
    if n is None:
        return win_rates(A, log_mu)
    k = A.shape[0]
    m = max(n // k, 1)
    opp = torch.multinomial(log_mu.exp(), k * m, replacement=True, generator=gen).view(k, m)
    wins = torch.rand(k, m, generator=gen, dtype=DTYPE) < A[torch.arange(k).unsqueeze(1), opp]
    return wins.to(DTYPE).mean(-1)


# ---------------------------------------------------------------------------
# The algorithms: comal.run's loop (Algorithm 3) on the table, for every spec of comal.ALGOS,
# plus exact mirror descent (mwu, comal_md), the references. Each returns the log-policies, 0 = init.
# ---------------------------------------------------------------------------


def play(spec, game, cfg, gen):
    """comal.run's loop (comal.rounds) on the table: pi_ref <- pi at each round start (ref "rounds": cfg.outer
    rounds of cfg.inner, or cfg.iters rounds of the spec's round_len, one iterate per round); otherwise
    cfg.iters iterations with pi_ref = pi_init (ref "base"). The opponent moves as its kind says
    (opponents.py: start and tabular), as on language models."""
    if spec.ref == "rounds" and not spec.round_len:
        K, iterations = cfg.inner, cfg.outer * cfg.inner
    else:  # Mirror-Prox's rounds of its round_len; no rounds: one of cfg.iters iterations
        K = spec.round_len or cfg.iters
        iterations = cfg.iters * (spec.round_len or 1)
    name = next((n for n, s in comal.ALGOS.items() if s is spec), "(not in the table)")
    comal.check_spec(name, spec)  # e.g. an opponent kind opponents.py does not define
    opp, h = OPPONENTS[spec.opponent], comal.hyper(spec, lm_config(spec, cfg), cfg.eta, cfg.tau)
    log_pi = game.log_init
    log_ref = game.log_init if spec.ref == "base" else None
    log_opp = memory = None
    traj = [log_pi]
    for k, _, round_start in comal.rounds(iterations, K):
        if spec.ref == "rounds" and round_start:
            log_ref = log_pi  # pi_ref <- pi^t
        if opp and k == 0:
            log_opp, memory = opp.start(log_pi, log_ref, h)
        log_mu = log_ref if spec.sampler == "ref" else log_pi
        new = realised(log_pi, tabular_step(spec, game, cfg, gen, log_mu, log_ref, None, log_opp), cfg)
        if opp:
            log_opp, memory = opp.tabular(log_pi, new, log_ref, memory, h)
        log_pi = new
        if not spec.round_len or (k + 1) % K == 0:
            traj.append(log_pi)
    return traj


def realised(log_pi, log_step, cfg):
    """The iterate a learner reaches that realises the fraction cfg.step_scale of its step from pi^k in log space
    (renormalised): 1 is the algorithm; a language model that fits its step only in part is < 1 (0.29-0.45 on
    SmolLM2's held-out prompts, docs/figure1_smollm2.md), one that overshoots > 1."""
    s = cfg.step_scale
    return log_step if s == 1 else torch.log_softmax(log_pi + s * (log_step - log_pi), -1)


def md_rounds(game, cfg, gen, rounds, steps, tau):
    """Exact mirror descent in COMAL's rounds (Alg. 1 with Alg. 2 steps), comal.rounds' loop: rounds=1, tau=0 is
    MWU."""
    log_pi, log_ref = game.log_init, game.log_init
    traj = [log_pi]
    for _, _, round_start in comal.rounds(rounds * steps, steps):
        if round_start:
            log_ref = log_pi  # pi_ref <- pi^t
        log_pi = realised(log_pi, prox_step("closed", game, cfg, gen, log_pi, log_ref, tau), cfg)
        traj.append(log_pi)
    return traj


REFERENCES = {
    "mwu": lambda game, cfg, gen: md_rounds(game, cfg, gen, 1, cfg.iters, 0.0),  # eq. 3: cycles
    "comal_md": lambda game, cfg, gen: md_rounds(game, cfg, gen, cfg.outer, cfg.inner, cfg.tau),  # Alg. 1
}
ALGORITHMS = {**REFERENCES, **{name: (lambda game, cfg, gen, spec=spec: play(spec, game, cfg, gen))
                               for name, spec in comal.ALGOS.items()}}


# ---------------------------------------------------------------------------
# Running, results, plots
# ---------------------------------------------------------------------------

OPTIONS = {  # the toy game's options (keys.Key): the CLI's flags (--grad-steps for grad_steps) and make_config's
    "mode": Key("noiseless", "noiseless (exact win rates) or sampled (groups from mu, Bernoulli labels)",
                one_of("noiseless", "sampled")),
    "eta": Key(0.3, "mirror-descent step size", positive),
    "tau": Key(0.1, "KL strength of the regularised game (eq. 2)", positive),
    "outer": Key(200, "COMAL rounds T (reference updates)", integer(1)),
    "inner": Key(25, "iterations K per COMAL round", integer(1)),
    "iters": Key(5000, "iterations of the algorithms without reference rounds", integer(1)),
    "samples": Key(1000, "responses per iteration (sampled mode)", integer(2)),
    "group": Key(8, "responses per group for win-rate estimates", integer(2)),
    "seed": Key(0, "the sampled mode's random seed", integer()),
    "solver": Key("auto", "auto: closed forms where proven (noiseless); loss: always fit the loss", one_of("auto", "loss")),
    "kappa": Key(0.1, "NashMP target EMA rate", number(0, 1, lo_open=True)),
    "lr": Key(1.0, "gradient step of GRPO / NashMP on the logits", positive),
    "grad_steps": Key(10, "gradient steps per GRPO / NashMP iteration", integer(1)),
    "clip_eps": Key(0.2, "GRPO ratio clip", positive),
    "step_scale": Key(1.0, "fraction of each step the learner realises (1: exact; < 1: a model's partial fit)", positive),
}


def make_config(**overrides):
    """A validated run configuration (the CLI's flags as a namespace)."""
    unknown = set(overrides) - set(OPTIONS)
    if unknown:
        raise BadInput(f"unknown option(s): {', '.join(sorted(unknown))}")
    cfg = {name: overrides.get(name, k.default) for name, k in OPTIONS.items()}
    for name, k in OPTIONS.items():
        if msg := problem("--" + name.replace("_", "-"), k, cfg[name]):
            raise BadInput(msg)
    return SimpleNamespace(**cfg)


def make_game(payoff=None, init=None):
    """A game namespace (A, log_init) from Python lists, validated."""
    A = validate_payoff(PAPER_PAYOFF if payoff is None else payoff)
    if init is None:
        init = PAPER_INIT if A.shape[0] == 3 and payoff is None else [1.0 / A.shape[0]] * A.shape[0]
    return SimpleNamespace(A=A, log_init=validate_init(init, A.shape[0]))


def parse_algos(text):
    names = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in names if a not in ALGORITHMS]
    if unknown or not names:
        raise BadInput(f"unknown algorithm(s): {', '.join(unknown) or '(none given)'}; choose from {', '.join(ALGORITHMS)}")
    return names


def run(names, game, cfg):
    """Run each algorithm with its own generator seeded by (seed, algorithm index)."""
    results = {}
    for i, name in enumerate(names):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + i)
        traj = ALGORITHMS[name](game, cfg, gen)
        policies = [lp.exp().tolist() for lp in traj]
        results[name] = {
            "final": policies[-1],
            "exploitability": [exploitability(game.A, p) for p in policies],
            "policies": policies,
        }
    return results


def plot(results, game, path, title=""):
    """Trajectories on the simplex (n = 3; NE red star, init blue dot) and exploitability (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    simplex = game.A.shape[0] == 3
    ncols = len(names) + 1 if simplex else 1
    fig, axes = plt.subplots(1, ncols, figsize=(3.2 * ncols, 3.3), squeeze=False)
    axes = axes[0]
    corners = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=DTYPE)
    ne = nash_equilibrium(game.A) if simplex else None
    if simplex:
        for ax, name in zip(axes, names):
            xy = torch.tensor(results[name]["policies"], dtype=DTYPE) @ corners
            ax.plot(*torch.cat([corners, corners[:1]]).T.tolist(), color="0.6", lw=0.8)
            ax.plot(xy[:, 0].tolist(), xy[:, 1].tolist(), lw=0.7, color="tab:green")
            ax.plot(*xy[0].tolist(), "o", color="tab:blue", ms=6)
            if ne is not None:
                ax.plot(*(ne @ corners).tolist(), "*", color="red", ms=12)
            for c, lab in zip(corners.tolist(), ("$y_a$", "$y_b$", "$y_c$")):
                ax.annotate(lab, c, textcoords="offset points", xytext=(0, -12 if c[1] == 0 else 4), ha="center", fontsize=8)
            ax.set_title(name, fontsize=9)
            ax.set_aspect("equal")
            ax.axis("off")
    ax = axes[-1]
    for name in names:
        e = [max(v, 1e-16) for v in results[name]["exploitability"]]
        ax.semilogy(e, label=name, lw=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("exploitability")
    ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def nash_equilibrium(A):
    """The interior NE of a 3x3 game if it has one (solve (A - 1/2) p = 0, sum p = 1), else None."""
    n = A.shape[0]
    M = torch.cat([A - 0.5, torch.ones(1, n, dtype=DTYPE)])
    rhs = torch.cat([torch.zeros(n, dtype=DTYPE), torch.ones(1, dtype=DTYPE)])
    p = torch.linalg.lstsq(M, rhs.unsqueeze(1)).solution.squeeze(1)
    if (p > 0).all() and (M @ p - rhs).abs().max() < 1e-9:
        return p
    return None


FIGURES = {
    # name: (title, algorithms, mode, extra config)
    "fig1": ("Fig. 1/4: preference optimisation on the 3x3 game (noiseless)",
             ["iter_dpo", "iter_ipo", "sppo", "inpo", "comal"], "noiseless", {}),
    "fig3": ("Fig. 3: mirror descent (MWU) vs COMAL, noiseless gradients",
             ["mwu", "comal_md"], "noiseless", {}),
    "fig4": ("Fig. 4: from preference samples (sampled mode)",
             ["iter_dpo", "iter_ipo", "sppo", "inpo", "comal"], "sampled", {"samples": 2000}),
    "relatives": ("Relatives (noiseless): mirror-prox, OMWU, NashMP, COMAL with GRPO / Dr.GRPO / REBEL / DRO",
                  ["mirror_prox", "omwu", "nashmp", "comal_grpo", "comal_dr_grpo", "comal_rebel", "comal_dro"], "noiseless", {}),
}


def reproduce_figures(out_dir, game=None, **overrides):
    """The paper's synthetic figures with its settings (App. I) unless overridden: one PNG and one JSON each."""
    os.makedirs(out_dir, exist_ok=True)
    game = make_game() if game is None else game
    for fig, (title, names, mode, extra) in FIGURES.items():
        cfg = make_config(**{**overrides, **extra, "mode": mode})
        results = run(names, game, cfg)
        with open(os.path.join(out_dir, f"{fig}.json"), "w") as f:
            json.dump(results, f)
        plot(results, game, os.path.join(out_dir, f"{fig}.png"), title)
        summary = ", ".join(f"{n} {r['exploitability'][-1]:.2e}" for n, r in results.items())
        print(f"{fig}: final exploitability: {summary}", flush=True)


def load_json_arg(value, what):
    """A JSON literal (e.g. '[0.2,0.5,0.3]') or a path to a JSON file."""
    text = value
    if not value.lstrip().startswith("["):
        if not os.path.isfile(value):
            raise BadInput(f"{what} file {value!r} does not exist")
        with open(value) as f:
            text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{what} {value!r} is not valid JSON: {e.msg} (line {e.lineno})")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise BadInput(message)


def main(argv=None):
    p = OneLineParser(description="COMAL and its relatives on a tabular preference game.")
    p.add_argument("--algos", default="comal,mwu,iter_ipo,iter_dpo,sppo,inpo", help="comma-separated: " + ",".join(ALGORITHMS))
    p.add_argument("--json", help="write results here")
    p.add_argument("--payoff", help="JSON file (or literal) with the payoff matrix; default: App. I's 3x3")
    p.add_argument("--init", help="JSON file (or literal) with the initial policy; default [0.2,0.5,0.3] / uniform")
    for name, k in OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(k.default), default=k.default,
                       help=f"{k.meaning} (default {k.default})")
    p.add_argument("--plot", help="write a PNG: simplex trajectories and exploitability")
    p.add_argument("--figures", help="reproduce Figures 1/3/4 (+ relatives) into this folder instead")
    args = p.parse_args(argv)
    names = parse_algos(args.algos)
    payoff = load_json_arg(args.payoff, "payoff") if args.payoff else None
    init = load_json_arg(args.init, "init") if args.init else None
    game = make_game(payoff, init)
    options = {k: getattr(args, k) for k in OPTIONS}
    cfg = make_config(**options)  # validates every flag before any work
    if args.figures:
        options.pop("mode")
        reproduce_figures(args.figures, game, **options)
        return
    results = run(names, game, cfg)
    for name, r in results.items():
        print(f"{name:>14}: final {[round(x, 4) for x in r['final']]}  exploitability {r['exploitability'][-1]:.3e}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f)
    if args.plot:
        plot(results, game, args.plot)


def cli(argv=None):
    """Entry point: bad input is one line on stderr and exit status 2."""
    try:
        main(argv)
    except BadInput as e:
        print(f"toy_game.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
