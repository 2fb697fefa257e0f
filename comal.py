"""The algorithms on language models: COMAL (Alg. 3) and its relatives on one loop.

One iteration k (run_iteration), the same for every algorithm:
  1. reference schedule: COMAL sets pi_ref <- pi^k at the start of each round
     (every `ref_update_every` iterations, Alg. 3); INPO/GRPO/NashMP keep
     pi_ref = the base policy; the iterative baselines step from mu = pi^k.
  2. mu <- current policy; sample n responses per prompt of this iteration's
     subset (paper: n = 5, temperature 0.8).
  3. ask the oracle for the n x n win-rate matrix of each group.
  4. build the training examples (pairs, or responses with win rates).
  5. precompute log-probs of mu and pi_ref (and of other frozen policies).
  6. minimise the algorithm's loss (losses.py) for `epochs` passes.
The distributed details (gradient all-reduce, optimizer, checkpoints) are
the trainer's (train_ddp.py); this file only calls trainer.step().

Which loss and which reference each `algo` uses is the ALGOS table.
"""
import math
import sys
import time

import torch
from tqdm import tqdm

import losses
from sample import generate, sequence_logprobs

# algo: (loss, reference)
#   reference "mu":     no pi_ref; the prox step is centred at mu = pi^k (iterative baselines, tau = 0)
#   reference "base":   pi_ref = the initial policy, fixed (INPO, Alg. 4; GRPO; NashMP)
#   reference "rounds": pi_ref <- pi^k every ref_update_every iterations (COMAL, Alg. 1/3)
#   reference "offline": samples always come from the base policy, centred at it (one-round DPO / IPO)
#   reference "prev":   OMWU keeps pi^{k-1} (state["extra"]) to form its optimistic gain
# Mirror-Prox is "rounds" with rounds of two iterations: both half-steps are centred at the round's pi^k.
ALGOS = {
    "dpo": ("dpo", "offline"),
    "ipo": ("ipo", "offline"),
    "iter_dpo": ("dpo", "mu"),
    "iter_ipo": ("ipo", "mu"),
    "inpo": ("inpo", "base"),
    "comal": ("inpo", "rounds"),
    "sppo": ("sppo", "mu"),
    "comal_sppo": ("sppo", "rounds"),
    "rebel": ("rebel", "mu"),
    "dro": ("dro", "mu"),
    "grpo": ("grpo", "base"),
    "comal_grpo": ("grpo", "rounds"),
    "mirror_prox": ("ipo", "rounds"),  # ref_update_every forced to 2: extrapolate from pi^k, then step from pi^k again
    "omwu": ("omwu", "prev"),
    "nashmp": ("nashmp", "base"),
}
PAIR_LOSSES = ("dpo", "ipo", "inpo")


def round_params(cfg, rnd):
    """(eta, tau) of round `rnd`: lists in the config are per-round schedules whose last entry repeats
    (paper: eta^-1 = 0.002 in round 0, then 0.1 -> eta: [500, 10]); eta_tau fixes eta * tau."""
    pick = lambda v: v[min(rnd, len(v) - 1)] if isinstance(v, list) else v  # noqa: E731
    eta = float(pick(cfg["eta"]))
    tau = cfg["eta_tau"] / eta if cfg.get("eta_tau") is not None else float(pick(cfg["tau"]))
    return eta, tau


def ref_update_every(cfg):
    return 2 if cfg["algo"] == "mirror_prox" else cfg["ref_update_every"]


def round_of(cfg, k):
    return k // ref_update_every(cfg) if ALGOS[cfg["algo"]][1] == "rounds" else 0


# ---------------------------------------------------------------------------
# Steps 4-5: examples and precomputed log-probs
# ---------------------------------------------------------------------------


def build_pairs(M, n, selection):
    """Preference pairs from (P, n, n) win-rate matrices; rows index p * n + i.

    best_worst (the paper): per group, the responses with the highest and the
    lowest mean win rate in the group, weight 1 (weight 0 when all tie).
    all: every pair i < j twice, as (i wins, weight M[i, j]) and (j wins,
    weight M[j, i]), an unbiased estimate of the population loss of eq. (13)/(14)
    over pairs from mu (best/worst selection changes which pairs are seen, and
    with it the minimiser). Returns (w, l, weight), weights summing to 1 per group.
    """
    P = M.shape[0]
    base = torch.arange(P)[:, None] * n
    if selection == "best_worst":
        score = M.mean(-1)  # (P, n)
        best, worst = score.argmax(-1), score.argmin(-1)
        weight = (score.max(-1).values > score.min(-1).values).float()
        return base[:, 0] + best, base[:, 0] + worst, weight
    i, j = torch.triu_indices(n, n, 1)
    w = torch.cat([base + i, base + j], 1).flatten()
    l = torch.cat([base + j, base + i], 1).flatten()
    weight = torch.cat([M[:, i, j], M[:, j, i]], 1).flatten() / len(i)
    return w, l, weight


def loo_winrates(M):
    """g_mu(y_i) ≈ mean_{j != i} M[i, j]: the unbiased leave-one-out estimate of P(y_i > mu), (P, n)."""
    n = M.shape[-1]
    return (M.sum(-1) - 0.5) / (n - 1)


@torch.no_grad()
def precompute_logps(model, seqs, micro):
    """(N, T) token and (N,) sequence log-probs of a frozen policy on all rows, `micro` rows at a time."""
    ids, att, resp = seqs
    tok = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    for s in range(0, ids.shape[0], micro):
        tok[s:s + micro] = sequence_logprobs(model, ids[s:s + micro], att[s:s + micro], resp[s:s + micro])[0]
    return tok, tok.sum(-1)


# ---------------------------------------------------------------------------
# Step 6: the loss of one micro-batch of examples
# ---------------------------------------------------------------------------


def example_loss(loss, ex, idx, pi, rows, pre, eta, tau, cfg):
    """Per-example loss (b,) for examples `idx`; pi: (r,) or (r, T) log-probs of `rows` under pi_theta."""
    pick = lambda r: torch.searchsorted(rows, r)  # noqa: E731  (rows is sorted and unique: position of each row)
    mu, ref = pre["mu"], pre.get("ref")
    if loss in PAIR_LOSSES:
        w, l = ex["w"][idx], ex["l"][idx]
        pw, pl = pi[pick(w)], pi[pick(l)]  # (b,)
        if loss == "dpo":
            return losses.dpo_loss(pw, pl, ref[w], ref[l], eta)
        if loss == "ipo":
            return losses.ipo_loss(pw, pl, ref[w], ref[l], eta)
        return losses.inpo_loss(pw, pl, ref[w], ref[l], mu[w], mu[l], eta, tau)  # eq. (14)
    y = ex["y"][idx]
    py = pi[pick(y)]
    if loss == "sppo":
        return losses.sppo_loss(py, mu[y], ex["g"][y], eta, ref[y] if ref is not None else None, tau)
    if loss == "dro":
        return losses.dro_loss(py, mu[y], ex["g"][y], pre["value"][ex["prompt"][y]], eta)
    if loss in ("rebel", "omwu"):  # pairs (y, y') of the same group; omwu's gain is 2 g_k - g_{k-1}
        y2 = ex["y2"][idx]
        return losses.rebel_loss(py, pi[pick(y2)], mu[y], mu[y2], ex["g"][y], ex["g"][y2], eta)
    if loss == "grpo":  # token level: pi is (r, T)
        return losses.grpo_loss(py, pre["mu_tok"][y], pre["ref_tok"][y], ex["adv"][y], pre["mask"][y], tau,
                                cfg["clip_eps"], dr_grpo=cfg["dr_grpo"], max_len=cfg["max_new_tokens"])
    if loss == "nashmp":
        return losses.nashmp_loss(py, ex["pref"][y], ex["baseline"][y], ref[y], pre["target"][y],
                                  cfg["beta"] if cfg["beta"] is not None else tau, eta)
    raise ValueError(f"unknown loss {loss}")


def make_examples(loss, M, n, cfg, M_prev=None):
    """The training examples of one iteration from the groups' win-rate matrices (P, n, n)."""
    P = M.shape[0]
    if loss in PAIR_LOSSES:
        w, l, weight = build_pairs(M, n, cfg["pair_selection"])
        return {"w": w, "l": l, "weight": weight / P}
    y = torch.arange(P * n)
    uniform = torch.full((P * n,), 1.0 / (P * n))
    if loss in ("sppo", "dro"):
        return {"y": y, "g": loo_winrates(M).flatten(), "prompt": y // n, "weight": uniform}
    if loss == "grpo":  # Alg. 5: r_i = 1/G sum_j P[y_i > y_j], group-relative advantages
        adv = losses.group_advantages(losses.winrate_rewards(M), scale_by_std=not cfg["dr_grpo"]).flatten()
        return {"y": y, "adv": adv, "weight": uniform}
    if loss in ("rebel", "omwu"):
        g = loo_winrates(M).flatten()
        if loss == "omwu":  # optimistic gain 2 g_{pi^k}(y) - g_{pi^{k-1}}(y) (App. H)
            g = 2 * g - M_prev.mean(-1).flatten()
        i, j = torch.triu_indices(n, n, 1)
        base = torch.arange(P)[:, None] * n
        return {"y": (base + i).flatten(), "y2": (base + j).flatten(), "g": g,
                "weight": torch.full((P * len(i),), 1.0 / (P * len(i)))}
    if loss == "nashmp":  # y ~ pi against y' ~ target: M_prev holds P(y_i > y'_j) (P, n, n)
        pref = M_prev.mean(-1).flatten()
        per_prompt = pref.view(P, n)
        baseline = ((per_prompt.sum(-1, keepdim=True) - per_prompt) / max(n - 1, 1)).flatten()
        return {"y": y, "pref": pref, "baseline": baseline, "weight": uniform}
    raise ValueError(f"unknown loss {loss}")


# ---------------------------------------------------------------------------
# One iteration
# ---------------------------------------------------------------------------


def sample_groups(model, tokenizer, prompt_ids, cfg, generator, all_done=None):
    s = generate(model, prompt_ids, n=cfg["n_samples"], max_new_tokens=cfg["max_new_tokens"],
                 temperature=cfg["temperature"], top_p=cfg["top_p"], generator=generator, all_done=all_done,
                 pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(s.response_ids, skip_special_tokens=True)  # after EOS: the tokenizer's pad
    n = cfg["n_samples"]
    return s, [texts[i * n:(i + 1) * n] for i in range(len(prompt_ids))]


def run_iteration(k, state, prompts, prompt_ids, oracle, trainer, cfg):
    """Iteration k of the algorithm `cfg['algo']` on this rank's prompts; returns its metrics.

    state: policy (trained), base (frozen initial policy), ref (frozen pi_ref or
    None), extra (pi^{k-1} for OMWU, the EMA target for NashMP), tokenizer.
    """
    algo = cfg["algo"]
    loss, reference = ALGOS[algo]
    policy, tok = state["policy"], state["tokenizer"]
    rnd = round_of(cfg, k)
    eta, tau = round_params(cfg, rnd)
    if reference in ("mu", "offline") or loss in ("ipo", "dpo", "rebel", "dro", "omwu"):
        tau = 0.0  # these losses step from their centre without the KL term of J_tau
    # 1. Alg. 3: at the start of a round pi_ref <- pi^k (the policy before this iteration's update)
    if reference == "rounds" and k % ref_update_every(cfg) == 0:
        trainer.copy_weights(state["ref"], policy)
    gen = torch.Generator(device=trainer.device).manual_seed(cfg["seed"] * 1_000_003 + k * 1009 + trainer.rank)
    n = cfg["n_samples"]

    # 2. mu <- pi^k (the base for the offline baselines); sample n responses per prompt
    t0 = time.time()
    sampler = state["base"] if reference == "offline" else policy
    policy.eval()
    with trainer.autocast():
        samples, groups = sample_groups(sampler, tok, prompt_ids, cfg, gen, trainer.all_done)
        if loss in ("omwu", "nashmp"):  # the opponent's responses: pi^{k-1} (OMWU) or the target (NashMP)
            _, opp = sample_groups(state["extra"], tok, prompt_ids, cfg, gen, trainer.all_done)
    sample_s = time.time() - t0
    n_tokens = int(samples.response_mask.sum())

    # 3. the oracle: n x n win rates per group (and against the opponent's group)
    t0 = time.time()
    M = oracle.winrate_matrix(prompts, groups)  # (P, n, n)
    M_prev = None
    if loss in ("omwu", "nashmp"):
        M_prev = oracle.winrate_matrix(prompts, [g + o for g, o in zip(groups, opp)])[:, :n, n:]
    judge_s = time.time() - t0

    # 4. examples; 5. frozen log-probs
    ex = make_examples(loss, M, n, cfg, M_prev)
    seqs = samples.sequences()
    micro = cfg["micro_batch_size"]
    with trainer.autocast():
        mu_tok, mu = precompute_logps(sampler, seqs, micro)
        pre = {"mu": mu, "mu_tok": mu_tok, "mask": seqs[2]}
        center = {"base": state["base"], "rounds": state["ref"]}.get(reference)
        if center is not None:
            pre["ref_tok"], pre["ref"] = precompute_logps(center, seqs, micro)
        elif loss in PAIR_LOSSES or loss == "sppo":
            pre["ref_tok"], pre["ref"] = mu_tok, mu  # centred at mu (for "offline", mu is the base itself)
        if loss == "nashmp":
            pre["target"] = precompute_logps(state["extra"], seqs, micro)[1]
    for key in ex:
        ex[key] = ex[key].to(trainer.device)
    value_opt = None
    if loss == "dro":  # V_phi: one free value per prompt, learned jointly by its own Adam (eta V -> -log Z)
        pre["value"] = torch.full((len(prompts),), -0.5, device=trainer.device, requires_grad=True)
        value_opt = torch.optim.Adam([pre["value"]], lr=cfg["value_lr"])
    if algo == "omwu":  # pi^{k-1} <- pi^k before the update
        trainer.copy_weights(state["extra"], policy)

    # 6. minimise the loss: `epochs` passes over the examples in shuffled batches
    policy.train()
    token_level = loss == "grpo"
    E = len(ex["weight"])
    per_step = max(1, cfg["batch_size"] // trainer.world)
    shuffle = torch.Generator().manual_seed(cfg["seed"] * 7919 + k * 31 + trainer.rank)
    steps = cfg["epochs"] * math.ceil(E / per_step)
    step_losses = []
    t0 = time.time()
    bar = tqdm(total=steps, desc=f"iteration {k} train", leave=False, disable=trainer.rank != 0, file=sys.stderr)
    bar.set_postfix(sample=f"{sample_s:.1f}s", judge=f"{judge_s:.1f}s")
    for epoch in range(cfg["epochs"]):
        order = torch.randperm(E, generator=shuffle)
        for s in range(0, E, per_step):
            batch = order[s:s + per_step].to(trainer.device)
            # gradients are averaged over ranks, so dividing by the mean weight per rank gives the
            # weighted mean over the global batch, exactly what one process would compute
            scale = trainer.all_reduce_sum(float(ex["weight"][batch].sum())) / trainer.world or 1.0

            def micro_losses():
                for m in range(0, len(batch), micro):
                    idx = batch[m:m + micro]
                    rows = torch.unique(torch.cat([ex[key][idx] for key in ("w", "l", "y", "y2") if key in ex]))
                    with trainer.autocast():
                        tok_lp, seq_lp = sequence_logprobs(policy, seqs[0][rows], seqs[1][rows], seqs[2][rows])
                    pi = tok_lp if token_level else seq_lp
                    per_example = example_loss(loss, ex, idx, pi, rows, pre, eta, tau, cfg)  # (b,)
                    yield (ex["weight"][idx] * per_example).sum() / scale

            step_losses.append(trainer.step(micro_losses(), k, len(step_losses), steps, extra_optimizer=value_opt))
            bar.update(1)
    bar.close()
    train_s = time.time() - t0
    if loss == "nashmp":  # target <- kappa theta + (1 - kappa) target (EMA in parameter space)
        trainer.ema_weights(state["extra"], policy, cfg["kappa"])
    lengths = samples.response_mask.sum(-1).float()
    return {"iteration": k, "round": rnd, "eta": eta, "tau": tau, "loss": sum(step_losses) / len(step_losses),
            "response_length": float(lengths.mean()), "tokens_per_s": n_tokens / max(sample_s, 1e-9),
            "sample_s": sample_s, "judge_s": judge_s, "train_s": train_s, "responses": [g[0] for g in groups]}
