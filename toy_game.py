"""Tabular preference games: every algorithm of the COMAL paper on a payoff matrix.

A policy is a distribution over n actions (responses) y; the oracle is a
payoff matrix A with A[i, j] = P(y_i > y_j) and A + A^T = 1. The alignment
game (eq. 1) is J(pi1, pi2) = pi1^T A pi2 - 1/2; its symmetric Nash
equilibrium pi* has exploitability max_i (A pi*)_i - 1/2 = 0. The default A
is the intransitive 3x3 game of App. I, whose unique NE is [4/11, 3/11, 4/11].

Two modes (`--mode`):
- noiseless: every update sees the exact population quantities. Updates the
  paper writes as an exact prox step (MWU, Alg. 2, Mirror-Prox, OMWU) and the
  losses whose minimiser is proven to be that prox step (IPO, INPO, REBEL,
  DRO; App. F) use the closed form; the others (DPO on a non-BT oracle, SPPO)
  minimise their exact expected loss on a table of logits. `--solver loss`
  fits the exact expected loss for every loss-based algorithm instead.
- sampled: each iteration draws pairs/responses from mu with a seeded
  torch.Generator, Bernoulli labels from A, and minimises the empirical loss
  of losses.py on the logits table (Figure 4). Closed-form updates use win
  rates estimated from the same kind of Bernoulli queries.

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

import losses

DTYPE = torch.float64
PAPER_PAYOFF = [[0.5, 0.1, 0.8], [0.9, 0.5, 0.1], [0.2, 0.9, 0.5]]  # App. I
PAPER_INIT = [0.2, 0.5, 0.3]
PAPER_NE = [4 / 11, 3 / 11, 4 / 11]


class BadInput(ValueError):
    """A user error: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------
# The game
# ---------------------------------------------------------------------------


def validate_payoff(A):
    """Return A as a float64 tensor or raise BadInput naming the problem."""
    if not isinstance(A, list) or not A or not all(isinstance(row, list) for row in A):
        raise BadInput("payoff must be a JSON list of lists (a square matrix)")
    n = len(A)
    if n < 2:
        raise BadInput("payoff must be at least 2x2")
    for i, row in enumerate(A):
        if len(row) != n:
            raise BadInput(f"payoff is not square: row {i} has {len(row)} entries, expected {n}")
        for j, a in enumerate(row):
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
                raise BadInput(f"payoff[{i}][{j}] = {a!r} is not a finite number")
            if not 0.0 <= a <= 1.0:
                raise BadInput(f"payoff[{i}][{j}] = {a} is outside [0, 1]")
    for i in range(n):
        for j in range(i, n):
            if abs(A[i][j] + A[j][i] - 1.0) > 1e-6:
                raise BadInput(f"payoff[{i}][{j}] + payoff[{j}][{i}] = {A[i][j] + A[j][i]:.8g}, must be 1 (P(a>b) + P(b>a) = 1)")
    return torch.tensor(A, dtype=DTYPE)


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


def kl(log_p, log_q):
    """KL(p || q) from log-probabilities."""
    p = log_p.exp()
    return float((p * (log_p - log_q)).sum())


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
# Data: what one iteration sees of the oracle, exact or sampled
# ---------------------------------------------------------------------------


def pair_data(A, log_mu, n, gen):
    """(winner, loser, weight) of pairs (y, y') ~ mu x mu labelled by lambda_P (eq. 12).

    n=None: the population, every ordered pair weighted by mu(y)mu(y')P(y>y').
    Otherwise n sampled pairs with Bernoulli labels, aggregated by (winner,
    loser) with their frequencies: the same empirical loss, computed once per
    distinct pair.
    """
    k = A.shape[0]
    if n is None:
        w, l = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
        w, l = w.flatten(), l.flatten()
        mu = log_mu.exp()
        weight = mu[w] * mu[l] * A[w, l]
        return w, l, weight / weight.sum()
    mu = log_mu.exp()
    y1 = torch.multinomial(mu, n, replacement=True, generator=gen)
    y2 = torch.multinomial(mu, n, replacement=True, generator=gen)
    first_wins = torch.rand(n, generator=gen, dtype=DTYPE) < A[y1, y2]
    w, l = torch.where(first_wins, y1, y2), torch.where(first_wins, y2, y1)
    counts = torch.bincount(w * k + l, minlength=k * k).to(DTYPE)
    idx = counts.nonzero().squeeze(1)
    return idx // k, idx % k, counts[idx] / n


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


def response_data(A, log_mu, n, group, gen):
    """(actions, win-rate estimate, weight) for responses y ~ mu (Alg. 6/8/10 datasets).

    n=None: every action with its exact g_mu and weight mu. Otherwise n
    responses in groups of `group` (the paper's 5 samples per prompt); each
    response's win rate is its mean label against the others of its group
    (unbiased for g_mu), then averaged per action: the squared losses depend
    on the estimates only through these means, up to a constant.
    """
    if n is None:
        return torch.arange(A.shape[0]), win_rates(A, log_mu), log_mu.exp()
    N = max(n // group, 1)
    y = torch.multinomial(log_mu.exp(), N * group, replacement=True, generator=gen).view(N, group)
    b = bernoulli_prefs(A, y, gen)
    loo = (b.sum(-1) - 0.5) / (group - 1)  # (N, G) leave-one-out win rate
    y, loo = y.flatten(), loo.flatten()
    k = A.shape[0]
    counts = torch.bincount(y, minlength=k).to(DTYPE)
    sums = torch.bincount(y, weights=loo, minlength=k)
    idx = counts.nonzero().squeeze(1)
    return idx, sums[idx] / counts[idx], counts[idx] / counts.sum()


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
# One approximate prox step, by closed form or by a loss of losses.py
# ---------------------------------------------------------------------------

CLOSED_FORM_LOSSES = {"ipo", "inpo", "rebel", "dro"}  # minimiser proven = exact prox step (App. F)
SOLVERS = ("closed", "dpo", "ipo", "inpo", "sppo", "dro", "rebel")


def prox_step(solver, game, cfg, gen, log_mu, log_ref=None, tau=0.0, log_center=None):
    """log mu' ≈ log Prox(center, eta * g^tau_mu), g^tau_mu = P(. > mu) - tau log(mu/pi_ref).

    center = mu (Alg. 2) unless given (IPO's eq. 13 and Mirror-Prox's second
    step sample from mu but step from another center). `solver` names how the
    step is computed: the closed form or one of the losses.
    """
    A, eta = game.A, cfg.eta
    center = log_mu if log_center is None else log_center
    n = None if cfg.mode == "noiseless" else cfg.samples
    if log_ref is None:
        log_ref, tau = log_mu, 0.0
    if solver == "closed" or (n is None and cfg.solver == "auto" and solver in CLOSED_FORM_LOSSES):
        g = estimated_win_rates(A, log_mu, n, gen) - tau * (log_mu - log_ref)
        return log_prox(center, g, eta)
    if solver != "ipo" and log_center is not None:
        raise ValueError(f"solver {solver} steps from mu only; a separate center needs ipo or closed")
    if solver in ("dpo", "ipo", "inpo"):
        if solver != "inpo" and tau != 0:
            raise ValueError(f"{solver} solves the unregularised prox step only (tau = 0)")
        w, l, weight = pair_data(A, log_mu, n, gen)

        def objective(theta):
            pi = torch.log_softmax(theta, -1)
            if solver == "dpo":
                loss = losses.dpo_loss(pi[w], pi[l], center[w], center[l], eta)
            elif solver == "ipo":
                loss = losses.ipo_loss(pi[w], pi[l], center[w], center[l], eta)
            else:
                loss = losses.inpo_loss(pi[w], pi[l], log_ref[w], log_ref[l], log_mu[w], log_mu[l], eta, tau)
            return (weight * loss).sum()

        return torch.log_softmax(fit_logits(objective, center), -1)
    y, ghat, weight = response_data(A, log_mu, n, cfg.group, gen)
    if solver == "sppo":
        def objective(theta):
            pi = torch.log_softmax(theta, -1)
            return (weight * losses.sppo_loss(pi[y], log_mu[y], ghat, eta, log_ref[y], tau)).sum()

        return torch.log_softmax(fit_logits(objective, center), -1)
    if solver == "dro":
        def objective(params):  # logits table and the scalar value V_phi
            pi = torch.log_softmax(params[:-1], -1)
            return (weight * losses.dro_loss(pi[y], log_mu[y], ghat, params[-1], eta, log_ref[y], tau)).sum()

        x0 = torch.cat([center, torch.full((1,), -0.5, dtype=DTYPE)])  # eta V ≈ -log Z ≈ -eta/2
        return torch.log_softmax(fit_logits(objective, x0)[:-1], -1)
    if solver == "rebel":
        a, b = torch.meshgrid(torch.arange(len(y)), torch.arange(len(y)), indexing="ij")
        a, b = a.flatten(), b.flatten()
        ya, yb, pair_w = y[a], y[b], weight[a] * weight[b]

        def objective(theta):
            pi = torch.log_softmax(theta, -1)
            loss = losses.rebel_loss(pi[ya], pi[yb], log_mu[ya], log_mu[yb], ghat[a], ghat[b], eta,
                                     log_ref[ya], log_ref[yb], tau)
            return (pair_w * loss).sum()

        return torch.log_softmax(fit_logits(objective, center), -1)
    raise ValueError(f"unknown solver {solver!r}")


# ---------------------------------------------------------------------------
# The algorithms. Each returns the list of log-policies, iterate 0 = init.
# ---------------------------------------------------------------------------


def md_rounds(solver, game, cfg, gen, rounds, steps, tau):
    """The COMAL skeleton (Alg. 1 / 3): `rounds` rounds; each sets pi_ref to the
    latest iterate and runs `steps` Alg.-2 steps mu <- Prox(mu, eta g^tau_mu)
    by `solver`. rounds=1 is INPO (Alg. 4, pi_ref fixed); tau=0 is plain
    mirror descent / MWU, i.e. the iterative baselines."""
    log_pi = game.log_init
    traj = [log_pi]
    for _ in range(rounds):
        log_ref = log_pi  # pi_ref <- pi^t
        for _ in range(steps):
            log_pi = prox_step(solver, game, cfg, gen, log_pi, log_ref, tau)
            traj.append(log_pi)
    return traj


def mwu(game, cfg, gen):
    """Mirror descent / MWU (eq. 3): pi^{t+1} = Prox(pi^t, eta g(pi^t)); cycles."""
    return md_rounds("closed", game, cfg, gen, 1, cfg.iters, 0.0)


def iter_dpo(game, cfg, gen):
    """Iterative DPO: each iteration fits DPO on pairs from pi^t with reference pi^t."""
    return md_rounds("dpo", game, cfg, gen, 1, cfg.iters, 0.0)


def iter_ipo(game, cfg, gen):
    """Iterative IPO: eq. (13) with pi = mu = pi^t each iteration, i.e. MWU (App. F)."""
    return md_rounds("ipo", game, cfg, gen, 1, cfg.iters, 0.0)


def sppo(game, cfg, gen):
    """Iterative SPPO (App. F): regress log(pi/pi^t) on eta(g - 1/2)."""
    return md_rounds("sppo", game, cfg, gen, 1, cfg.iters, 0.0)


def rebel(game, cfg, gen):
    """Iterative REBEL (App. F): pairwise regression on win-rate differences."""
    return md_rounds("rebel", game, cfg, gen, 1, cfg.iters, 0.0)


def dro(game, cfg, gen):
    """Iterative DRO (App. F): pointwise regression with a learned value V."""
    return md_rounds("dro", game, cfg, gen, 1, cfg.iters, 0.0)


def inpo(game, cfg, gen):
    """INPO (Alg. 4): eq. (14) with pi_ref = pi_init fixed; converges to pi_tau*, not pi*."""
    return md_rounds("inpo", game, cfg, gen, 1, cfg.iters, cfg.tau)


def comal(game, cfg, gen):
    """COMAL with INPO as the regularised-game solver (Alg. 3): `outer` rounds of
    `inner` INPO iterations, pi_ref <- latest iterate at every round."""
    return md_rounds("inpo", game, cfg, gen, cfg.outer, cfg.inner, cfg.tau)


def comal_md(game, cfg, gen):
    """COMAL (Alg. 1) with exact mirror-descent steps (Alg. 2) as inner solver."""
    return md_rounds("closed", game, cfg, gen, cfg.outer, cfg.inner, cfg.tau)


def comal_sppo(game, cfg, gen):
    """COMAL with Reg-SPPO (Alg. 7 / 6)."""
    return md_rounds("sppo", game, cfg, gen, cfg.outer, cfg.inner, cfg.tau)


def comal_rebel(game, cfg, gen):
    """COMAL with Reg-REBEL (Alg. 11 / 10)."""
    return md_rounds("rebel", game, cfg, gen, cfg.outer, cfg.inner, cfg.tau)


def comal_dro(game, cfg, gen):
    """COMAL with Reg-DRO (Alg. 9 / 8)."""
    return md_rounds("dro", game, cfg, gen, cfg.outer, cfg.inner, cfg.tau)


def mirror_prox(game, cfg, gen):
    """Mirror-Prox (App. H): an extrapolation step, then a step from pi^t with
    the gradient at the extrapolated point; two oracle rounds per iteration."""
    log_pi = game.log_init
    traj = [log_pi]
    for _ in range(cfg.iters):
        log_half = prox_step("closed", game, cfg, gen, log_pi)
        log_pi = prox_step("closed", game, cfg, gen, log_half, log_center=log_pi)
        traj.append(log_pi)
    return traj


def omwu(game, cfg, gen):
    """Optimistic MWU (App. H), one-prox form: pi^{t+1} = Prox(pi^t, eta(2 g(pi^t) - g(pi^{t-1})))."""
    n = None if cfg.mode == "noiseless" else cfg.samples
    log_pi = game.log_init
    g_prev = estimated_win_rates(game.A, log_pi, n, gen)  # pi^0 = pi^1 = pi_init
    traj = [log_pi]
    for _ in range(cfg.iters):
        g = estimated_win_rates(game.A, log_pi, n, gen)
        log_pi = log_prox(log_pi, 2 * g - g_prev, cfg.eta)
        g_prev = g
        traj.append(log_pi)
    return traj


def grpo_rounds(game, cfg, gen, rounds, steps, dr_grpo):
    """Iterative GRPO with win-rate rewards (Alg. 5): each iteration samples
    from pi_old = pi_theta, rewards r_i = win rate in the group, group-relative
    advantages, then `grad_steps` gradient steps on the clipped objective (15)
    with KL to pi_ref. rounds > 1 resets pi_ref to the latest iterate per round
    (COMAL); rounds = 1 keeps pi_ref = pi_init. noiseless: the exact
    expectation over y ~ pi_old with the population advantages."""
    theta = game.log_init.clone()
    traj = [game.log_init]
    for _ in range(rounds):
        log_ref = torch.log_softmax(theta, -1)  # pi_ref <- pi^t
        for _ in range(steps):
            log_old = torch.log_softmax(theta, -1)
            if cfg.mode == "noiseless":
                y = torch.arange(game.A.shape[0])
                g = win_rates(game.A, log_old)
                mean = (log_old.exp() * g).sum()
                adv = g - mean
                if not dr_grpo:
                    adv = adv / ((log_old.exp() * adv**2).sum().sqrt() + 1e-6)
                weight = log_old.exp()
            else:
                N = max(cfg.samples // cfg.group, 1)
                yg = torch.multinomial(log_old.exp(), N * cfg.group, replacement=True, generator=gen).view(N, cfg.group)
                rewards = losses.winrate_rewards(bernoulli_prefs(game.A, yg, gen))
                adv = losses.group_advantages(rewards, scale_by_std=not dr_grpo).flatten()
                y = yg.flatten()
                weight = torch.full((len(y),), 1.0 / len(y), dtype=DTYPE)
            mask = torch.ones(len(y), 1, dtype=DTYPE)
            for _ in range(cfg.grad_steps):
                theta.requires_grad_(True)
                pi = torch.log_softmax(theta, -1)
                per_seq = losses.grpo_loss(pi[y].unsqueeze(1), log_old[y].unsqueeze(1), log_ref[y].unsqueeze(1),
                                           adv, mask, cfg.tau, cfg.clip_eps, dr_grpo=dr_grpo)
                (grad,) = torch.autograd.grad((weight * per_seq).sum(), theta)
                theta = (theta - cfg.lr * grad).detach()
            traj.append(torch.log_softmax(theta, -1))
    return traj


def grpo(game, cfg, gen):
    """GRPO with win-rate rewards and a fixed pi_ref = pi_init."""
    return grpo_rounds(game, cfg, gen, 1, cfg.iters, dr_grpo=False)


def dr_grpo(game, cfg, gen):
    """Dr.GRPO (no std / length normalisation) with a fixed pi_ref."""
    return grpo_rounds(game, cfg, gen, 1, cfg.iters, dr_grpo=True)


def comal_grpo(game, cfg, gen):
    """COMAL by iterative GRPO (Alg. 5): pi_ref <- pi^t every `inner` iterations."""
    return grpo_rounds(game, cfg, gen, cfg.outer, cfg.inner, dr_grpo=False)


def comal_dr_grpo(game, cfg, gen):
    """Alg. 5 with the Dr.GRPO objective."""
    return grpo_rounds(game, cfg, gen, cfg.outer, cfg.inner, dr_grpo=True)


def nashmp(game, cfg, gen):
    """Nash Mirror Prox, practical form (arXiv 2505.19731): the online policy takes
    `grad_steps` gradient steps on -P(pi > pi_k) + beta KL(pi||pi_ref) +
    (beta/eta) KL(pi||pi_k) against the target pi_k, then the target logits
    follow an EMA: target <- kappa theta + (1 - kappa) target. noiseless: the
    exact objective; sampled: the REINFORCE loss of losses.nashmp_loss."""
    beta = cfg.beta if cfg.beta is not None else cfg.tau
    log_ref = game.log_init
    theta, target = game.log_init.clone(), game.log_init.clone()
    traj = [game.log_init]
    for _ in range(cfg.iters):
        log_k = torch.log_softmax(target, -1)
        for _ in range(cfg.grad_steps):
            theta.requires_grad_(True)
            pi = torch.log_softmax(theta, -1)
            if cfg.mode == "noiseless":
                p = pi.exp()
                loss = -(p * win_rates(game.A, log_k)).sum() + beta * (p * (pi - log_ref)).sum() \
                    + (beta / cfg.eta) * (p * (pi - log_k)).sum()
            else:
                n = cfg.samples
                y = torch.multinomial(pi.detach().exp(), n, replacement=True, generator=gen)
                y_opp = torch.multinomial(log_k.exp(), n, replacement=True, generator=gen)
                pref = (torch.rand(n, generator=gen, dtype=DTYPE) < game.A[y, y_opp]).to(DTYPE)
                baseline = (pref.sum() - pref) / (n - 1)  # leave-one-out mean
                loss = losses.nashmp_loss(pi[y], pref, baseline, log_ref[y], log_k[y], beta, cfg.eta).mean()
            (grad,) = torch.autograd.grad(loss, theta)
            theta = (theta - cfg.lr * grad).detach()
        target = cfg.kappa * theta + (1 - cfg.kappa) * target
        traj.append(torch.log_softmax(theta, -1))
    return traj


ALGORITHMS = {f.__name__: f for f in (
    mwu, iter_dpo, iter_ipo, sppo, rebel, dro, inpo, comal, comal_md, comal_sppo, comal_rebel, comal_dro,
    grpo, dr_grpo, comal_grpo, comal_dr_grpo, mirror_prox, omwu, nashmp)}


# ---------------------------------------------------------------------------
# Running, results, plots
# ---------------------------------------------------------------------------

DEFAULTS = dict(mode="noiseless", eta=0.3, tau=0.1, outer=200, inner=25, iters=5000, samples=1000, group=8,
                seed=0, solver="auto", beta=None, kappa=0.1, lr=1.0, grad_steps=10, clip_eps=0.2)


def make_config(**overrides):
    """A validated run configuration (the CLI's flags as a namespace)."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise BadInput(f"unknown option(s): {', '.join(sorted(unknown))}")
    cfg = SimpleNamespace(**{**DEFAULTS, **overrides})
    if cfg.mode not in ("noiseless", "sampled"):
        raise BadInput(f"--mode must be noiseless or sampled, got {cfg.mode!r}")
    if cfg.solver not in ("auto", "loss"):
        raise BadInput(f"--solver must be auto or loss, got {cfg.solver!r}")
    for name in ("eta", "tau", "lr"):
        if not getattr(cfg, name) > 0:
            raise BadInput(f"--{name} must be > 0, got {getattr(cfg, name)}")
    if cfg.beta is not None and not cfg.beta > 0:
        raise BadInput(f"--beta must be > 0, got {cfg.beta}")
    if not 0 < cfg.kappa <= 1:
        raise BadInput(f"--kappa must be in (0, 1], got {cfg.kappa}")
    if not cfg.clip_eps > 0:
        raise BadInput(f"--clip-eps must be > 0, got {cfg.clip_eps}")
    for name in ("outer", "inner", "iters", "grad_steps"):
        if getattr(cfg, name) < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("samples", "group"):
        if getattr(cfg, name) < 2:
            raise BadInput(f"--{name} must be >= 2, got {getattr(cfg, name)}")
    return cfg


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
    p.add_argument("--mode", default="noiseless", help="noiseless | sampled")
    p.add_argument("--json", help="write results here")
    p.add_argument("--payoff", help="JSON file (or literal) with the payoff matrix; default: App. I's 3x3")
    p.add_argument("--init", help="JSON file (or literal) with the initial policy; default [0.2,0.5,0.3] / uniform")
    p.add_argument("--eta", type=float, default=DEFAULTS["eta"], help="mirror-descent step size")
    p.add_argument("--tau", type=float, default=DEFAULTS["tau"], help="KL strength of the regularised game (eq. 2)")
    p.add_argument("--outer", type=int, default=DEFAULTS["outer"], help="COMAL rounds T (reference updates)")
    p.add_argument("--inner", type=int, default=DEFAULTS["inner"], help="iterations K per COMAL round")
    p.add_argument("--iters", type=int, default=DEFAULTS["iters"], help="iterations of the non-COMAL algorithms")
    p.add_argument("--samples", type=int, default=DEFAULTS["samples"], help="pairs / responses per iteration (sampled mode)")
    p.add_argument("--group", type=int, default=DEFAULTS["group"], help="responses per group for win-rate estimates")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--solver", default=DEFAULTS["solver"], help="auto: closed forms where proven (noiseless); loss: always fit the loss")
    p.add_argument("--beta", type=float, default=None, help="NashMP KL strength to pi_ref (default: tau)")
    p.add_argument("--kappa", type=float, default=DEFAULTS["kappa"], help="NashMP target EMA rate")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="gradient step of GRPO / NashMP on the logits")
    p.add_argument("--grad-steps", type=int, default=DEFAULTS["grad_steps"], help="gradient steps per GRPO / NashMP iteration")
    p.add_argument("--clip-eps", type=float, default=DEFAULTS["clip_eps"], help="GRPO ratio clip")
    p.add_argument("--plot", help="write a PNG: simplex trajectories and exploitability")
    p.add_argument("--figures", help="reproduce Figures 1/3/4 (+ relatives) into this folder instead")
    args = p.parse_args(argv)
    names = parse_algos(args.algos)
    payoff = load_json_arg(args.payoff, "payoff") if args.payoff else None
    init = load_json_arg(args.init, "init") if args.init else None
    game = make_game(payoff, init)
    options = {k: getattr(args, k) for k in DEFAULTS}
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
