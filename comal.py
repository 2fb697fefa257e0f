"""The algorithms on language models: one table of specs (ALGOS) and Algorithm 3 as a loop (run).

run() is Algorithm 3 of the paper, for every algorithm of the table:
    for each round t:                               (one round if the algorithm has no reference updates)
        pi_ref <- pi^t                              (only for ref = "rounds": COMAL, Mirror-Prox)
        eta, tau <- the round's values              (per-round schedules: round_params)
        for each iteration k of the round:          iteration():
            1. sample n responses per prompt from mu (the spec's sampler), and from the opponent if it has one
            2. ask the oracle for the n x n win rates of each group (and against the opponent's group)
            3. build the examples (make_examples, by the spec's example kind)
            4. precompute the frozen log-probs (mu, pi_ref, opponent)
            5. minimise the spec's loss for `epochs` passes (trainer.step does the collectives and AdamW)
            the opponent moves (opponents.py): OMWU's pi^{k-1} <- pi^k before 5; NashMP's EMA after each step
The trainer (train_ddp.py) owns processes, optimizer, checkpoints and logging;
everything that makes an algorithm itself is its Algorithm entry in ALGOS.
Adding one = a loss in losses.py + an entry here (README, "Adding an algorithm").
"""
import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch
from tqdm import tqdm

import examples
import losses
from examples import SpecError, batch_loss, frozen_fields, make_examples
from keys import Key, integer, number, one_of, optional, positive, schedule
from opponents import OPPONENTS, models_of
from sample import cat_samples, generate, sequence_logprobs


# ---------------------------------------------------------------------------
# Config keys an algorithm may read (keys.Key: default, meaning, check). Each spec lists the ones it reads; a
# key set in a config for an algorithm that does not read it is an error (config.check_algorithm_keys).
# ---------------------------------------------------------------------------

KEYS = {
    "eta": Key(2.0, "mirror-descent step size eta in (0, 1e6] (paper: eta^-1 = 0.002 -> 500); a list is a "
               "per-round schedule", schedule(lo_ok=False, hi=1e6)),
    "tau": Key(0.1, "KL strength tau of J_tau (eq. 2) towards pi_ref, in [0, 1e3]; a list is a per-round schedule",
               schedule(lo_ok=True, hi=1e3)),
    "eta_tau": Key(None, "if set, tau = eta_tau / eta in every round (paper: 1/3); replaces tau",
                   optional(number(0, 1, lo_open=True, hi_open=True,
                                   why=": Alg. 2's step mixes mu^(1 - eta tau) pi_ref^(eta tau)"))),
    "ref_update_every": Key(10, "iterations per round: pi_ref <- pi^k at the start of each round (Alg. 3)", integer(1)),
    "pair_selection": Key("all", "best_worst (the paper's pair per group) or all (every pair with soft labels: "
                          "unbiased for eq. 13/14, minimiser = the prox step)", one_of("all", "best_worst")),
    "clip_eps": Key(0.2, "GRPO's ratio clipping (eq. 15)", positive),
    "kappa": Key(0.1, "NashMP: EMA rate of the target after each optimizer step", number(0, 1, lo_open=True)),
    "beta": Key(0.125, "Nash-MD: the opponent is the geometric mixture pi^(1 - beta) pi_ref^beta (Munos et al.: "
                "beta = eta tau)", number(0, 1)),
}


# ---------------------------------------------------------------------------
# The spec of an algorithm
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Algorithm:
    """Everything that makes an algorithm itself. The loop, the trainer and toy_game.py read only this.

    loss      (x, h) -> (b,) per-example loss to minimise, a named function of the section above: x is the
              micro-batch (Batch: example rows, per-response log-probs and values), h the round's eta, tau
              and the spec's keys (Hyper).
    examples  the example kind (EXAMPLES): pairs, responses, response_pairs or groups.
    ref       pi_ref: "none"; "base" (pi_0, fixed: INPO, GRPO, NashMP, offline DPO/IPO);
              "rounds" (pi_ref <- pi^k at the start of each round: Alg. 3).
    sampler   who samples mu: "policy" (pi^k, online) or "ref" (pi_ref's samples: offline).
    center    where the step starts: "mu" or "ref" (Mirror-Prox's second half-step, offline DPO/IPO).
    opponent  a second policy the samples also play against (M_opp, values gopp): "none" or a kind of
              opponents.OPPONENTS: "prev" (pi^{k-1}: OMWU), "ema" (an EMA target: NashMP), "mixture"
              (pi^(1 - beta) pi_ref^beta: Nash-MD).
    keys      the config keys it reads (KEYS, or its own in own_keys).
    round_len iterations per round fixed by the algorithm (Mirror-Prox: 2); 0 = the ref_update_every key.
    token_level  pi/mu/ref also per token (GRPO's ratio and k3 KL are per token).
    on_policy the loss needs y ~ pi_theta itself (REINFORCE): one optimizer step per iteration.
    surrogate the loss is a policy-gradient surrogate (only its gradient at pi = mu is meaningful; the
              tabular version takes gradient steps): GRPO, NashMP.
    prox_gain (q, h) -> gain, when the minimiser of the expected loss is exactly
              Prox(center, eta * gain) (tests/test_exactness.py checks it); q: tabular g (= P(. > mu)),
              gopp (= P(. > opponent)), mu, ref (log-probs). None: inexact or a surrogate.
    """

    loss: Callable
    examples: str
    keys: tuple
    ref: str = "none"
    sampler: str = "policy"
    center: str = "mu"
    opponent: str = "none"
    round_len: int = 0
    token_level: bool = False
    on_policy: bool = False
    surrogate: bool = False
    prox_gain: Callable = None
    own_keys: dict = field(default_factory=dict)
    doc: str = ""

    @property
    def tau(self):
        return "tau" in self.keys

    def key_defs(self):
        """{key: Key} of every key this algorithm reads."""
        return {k: self.own_keys[k] if k in self.own_keys else KEYS[k] for k in self.keys}


# ---------------------------------------------------------------------------
# What each loss reads. x: the micro-batch (Batch), h: the round's eta, tau and the spec's keys (Hyper).
# Returns (b,) per-example losses. One function per loss form; the table names the one each algorithm uses.
# ---------------------------------------------------------------------------


def dpo(x, h):  # DPO (App. F): pairs w > l, from the step's centre
    w, l = x.rows["w"], x.rows["l"]
    return losses.dpo_loss(x.pi[w], x.pi[l], x.center[w], x.center[l], h.eta)


def ipo(x, h):  # IPO (eq. 13): pairs w > l, from the step's centre
    w, l = x.rows["w"], x.rows["l"]
    return losses.ipo_loss(x.pi[w], x.pi[l], x.center[w], x.center[l], h.eta)


def inpo(x, h):  # INPO (eq. 14): pairs w > l sampled from mu, KL towards pi_ref
    w, l = x.rows["w"], x.rows["l"]
    return losses.inpo_loss(x.pi[w], x.pi[l], x.ref[w], x.ref[l], x.mu[w], x.mu[l], h.eta, h.tau)


def sppo(x, h):  # SPPO (App. F): each response y regressed on its win rate
    y = x.rows["y"]
    return losses.sppo_loss(x.pi[y], x.mu[y], x.values["g"][y], h.eta)


def reg_sppo(x, h):  # Reg-SPPO (Alg. 6/7): SPPO with tau's KL towards pi_ref
    y = x.rows["y"]
    return losses.sppo_loss(x.pi[y], x.mu[y], x.values["g"][y], h.eta, x.ref[y], h.tau)


def dro(x, h):  # DRO (App. F): a prompt's group y (b, n)
    y = x.rows["y"]
    return losses.dro_group_loss(x.pi[y], x.mu[y], x.values["g"][y], x.values["gw"][y], h.eta)


def reg_dro(x, h):  # Reg-DRO (Alg. 8/9)
    y = x.rows["y"]
    return losses.dro_group_loss(x.pi[y], x.mu[y], x.values["g"][y], x.values["gw"][y], h.eta, x.ref[y], h.tau)


def rebel(x, h):  # REBEL (App. F): pairs (a, b) of a group
    a, b, g = x.rows["a"], x.rows["b"], x.values["g"]
    return losses.rebel_loss(x.pi[a], x.pi[b], x.mu[a], x.mu[b], g[a], g[b], h.eta)


def reg_rebel(x, h):  # Reg-REBEL (Alg. 10/11)
    a, b, g = x.rows["a"], x.rows["b"], x.values["g"]
    return losses.rebel_loss(x.pi[a], x.pi[b], x.mu[a], x.mu[b], g[a], g[b], h.eta, x.ref[a], x.ref[b], h.tau)


def optimistic_rebel(x, h):  # OMWU (App. H): REBEL with the optimistic gain 2 g_{pi^k} - g_{pi^{k-1}}
    a, b, g, gopp = x.rows["a"], x.rows["b"], x.values["g"], x.values["gopp"]
    return losses.rebel_loss(x.pi[a], x.pi[b], x.mu[a], x.mu[b], 2 * g[a] - gopp[a], 2 * g[b] - gopp[b], h.eta)


def grpo(x, h):  # GRPO (eq. 15) with Alg. 5's win-rate rewards, advantages normalised by the group's std
    y = x.rows["y"]
    return losses.grpo_loss(x.pi_tok[y], x.mu_tok[y], x.ref_tok[y], x.values["adv_scaled"][y], x.mask[y], h.tau,
                            h.clip_eps)


def dr_grpo(x, h):  # Dr.GRPO: no std normalisation, tokens summed over a constant max length
    y = x.rows["y"]
    return losses.grpo_loss(x.pi_tok[y], x.mu_tok[y], x.ref_tok[y], x.values["adv"][y], x.mask[y], h.tau,
                            h.clip_eps, dr_grpo=True, max_len=h.max_new_tokens)


def nashmp(x, h):  # -P(pi > target) + tau KL(pi || pi_ref) + (tau / eta) KL(pi || target), on-policy
    y, v = x.rows["y"], x.values
    return losses.nashmp_loss(x.pi[y], v["gopp"][y], v["gopp_base"][y], x.ref[y], x.opp[y], h.tau, h.eta)


def nash_md(x, h):  # -P(pi > pi^(1 - beta) pi_ref^beta) + tau KL(pi || pi_ref), on-policy
    y, v = x.rows["y"], x.values
    return losses.nash_md_loss(x.pi[y], v["gopp"][y], v["gopp_base"][y], x.ref[y], h.tau)


G = lambda q, h: q.g  # noqa: E731  Prox(center, eta g_mu)
G_TAU = lambda q, h: q.g - h.tau * (q.mu - q.ref)  # noqa: E731  g^tau_mu of Alg. 2
PAIRS = ("eta", "pair_selection")
TAU = ("tau", "eta_tau")
ROUNDS = ("ref_update_every",)

ALGOS = {
    # --- pairwise preference losses (eq. 12-14) ---
    "dpo": Algorithm(dpo, "pairs", PAIRS, ref="base", sampler="ref", center="ref",
                     doc="DPO (App. F), offline: pairs from pi_ref = pi_0, one fixed target"),
    "ipo": Algorithm(ipo, "pairs", PAIRS, ref="base", sampler="ref", center="ref", prox_gain=G,
                     doc="IPO (eq. 13), offline"),
    "iter_dpo": Algorithm(dpo, "pairs", PAIRS, doc="iterative DPO: DPO from mu = pi^k each iteration"),
    "iter_ipo": Algorithm(ipo, "pairs", PAIRS, prox_gain=G, doc="iterative IPO = mirror descent (App. F); cycles"),
    "inpo": Algorithm(inpo, "pairs", PAIRS + TAU, ref="base", prox_gain=G_TAU, doc="INPO (Alg. 4, eq. 14), pi_ref = pi_0"),
    "comal": Algorithm(inpo, "pairs", PAIRS + TAU + ROUNDS, ref="rounds", prox_gain=G_TAU,
                       doc="COMAL (Alg. 3) with INPO steps"),
    # a round = 2 iterations: pi^{k+1/2} = Prox(pi^k, eta g(pi^k)), pi^{k+1} = Prox(pi^k, eta g(pi^{k+1/2}))
    "mirror_prox": Algorithm(ipo, "pairs", PAIRS, ref="rounds", center="ref", round_len=2, prox_gain=G,
                             doc="Mirror-Prox (App. H) by IPO"),
    # --- regression on responses with estimated win rates (App. F, G) ---
    "sppo": Algorithm(sppo, "responses", ("eta",), doc="SPPO (App. F): log Z replaced by eta/2, O(eta^3) from the prox step"),
    "comal_sppo": Algorithm(reg_sppo, "responses", ("eta",) + TAU + ROUNDS, ref="rounds",
                            doc="COMAL with Reg-SPPO (Alg. 6/7), O(eta^2 tau) from the prox step"),
    "dro": Algorithm(dro, "groups", ("eta",), prox_gain=G, doc="DRO (App. F), per-prompt value at its optimum"),
    "comal_dro": Algorithm(reg_dro, "groups", ("eta",) + TAU + ROUNDS, ref="rounds", prox_gain=G_TAU,
                           doc="COMAL with Reg-DRO (Alg. 8/9)"),
    "rebel": Algorithm(rebel, "response_pairs", ("eta",), prox_gain=G, doc="REBEL (App. F)"),
    "comal_rebel": Algorithm(reg_rebel, "response_pairs", ("eta",) + TAU + ROUNDS, ref="rounds", prox_gain=G_TAU,
                             doc="COMAL with Reg-REBEL (Alg. 10/11)"),
    "omwu": Algorithm(optimistic_rebel, "response_pairs", ("eta",), opponent="prev",
                      prox_gain=lambda q, h: 2 * q.g - q.gopp, doc="Optimistic MWU (App. H)"),
    # --- policy-gradient surrogates; tau is the KL coefficient to pi_ref ---
    "grpo": Algorithm(grpo, "responses", ("tau", "clip_eps"), ref="base", token_level=True, surrogate=True,
                      doc="GRPO (eq. 15, Alg. 5), pi_ref = pi_0"),
    "dr_grpo": Algorithm(dr_grpo, "responses", ("tau", "clip_eps"), ref="base", token_level=True, surrogate=True,
                         doc="Dr.GRPO: no std or length normalisation; leave-one-out rewards "
                         "(Alg. 5's diagonal-inclusive advantage is (n-1)/n of this one)"),
    "comal_grpo": Algorithm(grpo, "responses", ("tau", "clip_eps") + ROUNDS, ref="rounds", token_level=True,
                            surrogate=True, doc="COMAL by iterative GRPO (Alg. 5)"),
    "comal_dr_grpo": Algorithm(dr_grpo, "responses", ("tau", "clip_eps") + ROUNDS, ref="rounds", token_level=True,
                               surrogate=True, doc="Alg. 5 with the Dr.GRPO objective, leave-one-out rewards"),
    "nashmp": Algorithm(nashmp, "responses", ("eta", "tau", "kappa"), ref="base", opponent="ema", on_policy=True,
                        surrogate=True, doc="Nash Mirror Prox (arXiv 2505.19731), practical form with an EMA target"),
    "nash_md": Algorithm(nash_md, "responses", ("tau", "beta"), ref="base", opponent="mixture", on_policy=True,
                         surrogate=True, doc="Nash-MD (Munos et al. 2023): against the mixture pi^(1-beta) pi_ref^beta"),
}


def check_spec(name, spec):
    """The table's own consistency, checked at import: a malformed entry fails loudly, not at iteration 30."""
    bad = lambda msg: SpecError(f"ALGOS[{name!r}]: {msg}")  # noqa: E731
    if spec.examples not in examples.EXAMPLES:
        raise bad(f"examples {spec.examples!r} is not one of {', '.join(examples.EXAMPLES)}")
    for attr, choices in (("ref", ("none", "base", "rounds")), ("sampler", ("policy", "ref")),
                          ("center", ("mu", "ref")), ("opponent", tuple(OPPONENTS))):
        if getattr(spec, attr) not in choices:
            raise bad(f"{attr} {getattr(spec, attr)!r} is not one of {', '.join(choices)}")
    unknown = [k for k in spec.keys if k not in KEYS and k not in spec.own_keys]
    if unknown:
        raise bad(f"key {unknown[0]!r} is neither in comal.KEYS nor in own_keys")
    needs_ref = spec.sampler == "ref" or spec.center == "ref" or spec.tau
    if needs_ref and spec.ref == "none":
        raise bad("it samples from, steps from or regularises towards pi_ref, but ref is 'none'")
    if spec.ref == "rounds" and not spec.round_len and "ref_update_every" not in spec.keys:
        raise bad("ref 'rounds' needs round_len or the ref_update_every key")
    if spec.ref != "rounds" and (spec.round_len or "ref_update_every" in spec.keys):
        raise bad("round_len / ref_update_every need ref 'rounds'")
    if (spec.examples == "pairs") != ("pair_selection" in spec.keys):
        raise bad("pairs examples read the pair_selection key (and only they do)")
    opp = OPPONENTS[spec.opponent]
    if opp and any(k not in spec.keys for k in opp.keys):
        raise bad(f"its opponent {spec.opponent!r} reads the keys {', '.join(opp.keys)}: declare them")
    if opp and opp.needs_ref and spec.ref == "none":
        raise bad(f"its opponent {spec.opponent!r} mixes in pi_ref, but ref is 'none'")


# ---------------------------------------------------------------------------
# Rounds and per-round values
# ---------------------------------------------------------------------------


def round_length(spec, cfg):
    """Iterations per round: the spec's own, ref_update_every, or all of them (no reference updates)."""
    if spec.ref != "rounds":
        return cfg["iterations"]
    return spec.round_len or cfg["ref_update_every"]


def round_params(cfg, t):
    """(eta, tau) of round t: a list is a per-round schedule whose last entry repeats (paper: eta^-1 = 0.002 in
    round 0, then 0.1 -> eta: [500, 10]); eta_tau fixes eta * tau. None for a key the algorithm does not read."""
    pick = lambda v: float(v[min(t, len(v) - 1)] if isinstance(v, list) else v)  # noqa: E731
    eta = pick(cfg["eta"]) if "eta" in cfg else None
    if cfg.get("eta_tau") is not None:
        return eta, cfg["eta_tau"] / eta
    return eta, pick(cfg["tau"]) if "tau" in cfg else None


def hyper(spec, cfg, eta, tau):
    """The loss's h: eta and tau of the round (only if the algorithm reads them), its own keys, max_new_tokens."""
    h = {k: cfg[k] for k in spec.keys if k not in ("eta", "tau", "eta_tau")}
    if "eta" in spec.keys:
        h["eta"] = eta
    if spec.tau:
        h["tau"] = tau
    return Hyper(max_new_tokens=cfg["max_new_tokens"], **h)


class Hyper(SimpleNamespace):
    """h.eta, h.tau, h.<key>: only the keys the spec declares. A namespace, not a dict: a loss cannot fall back
    to a default with h.get; reading an undeclared key is an error naming it."""

    def __getattr__(self, name):  # only called for an attribute that is not set
        keys = ", ".join(k for k in vars(self) if k != "max_new_tokens")
        raise AttributeError(f"h.{name}: the algorithm's loss reads a key it does not declare (its keys: {keys})")


# ---------------------------------------------------------------------------
# Steps 1, 2, 4: sampling, judging, frozen log-probs
# ---------------------------------------------------------------------------


def seed_for(seed, purpose, k=0, rank=0):
    """Every RNG stream of a run from (seed, purpose, iteration, rank): runs repeat; streams do not collide."""
    return ((seed * 1_000_003 + PURPOSES.index(purpose)) * 100_003 + k) * 1009 + rank


PURPOSES = ("sample", "shuffle", "eval_winrate")


def sample_groups(model, tokenizer, prompt_ids, cfg, generator, all_done=None):
    """n samples for each prompt, generated `rollout_batch_size` prompts at a time (0 = all at once: the KV
    cache holds prompts x n x (prompt + max_new_tokens) tokens); (Samples, [n texts per prompt])."""
    B = cfg.get("rollout_batch_size") or len(prompt_ids)
    s = cat_samples([generate(model, prompt_ids[i:i + B], n=cfg["n_samples"], max_new_tokens=cfg["max_new_tokens"],
                              temperature=cfg["temperature"], top_p=cfg["top_p"], generator=generator,
                              all_done=all_done, pad_token_id=tokenizer.pad_token_id)
                     for i in range(0, len(prompt_ids), B)], tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(s.response_ids, skip_special_tokens=True)  # after EOS: the tokenizer's pad
    n = cfg["n_samples"]
    return s, [texts[i * n:(i + 1) * n] for i in range(len(prompt_ids))]


@torch.no_grad()
def precompute_logps(model, seqs, micro, rows=None, share_prompts=False):
    """(N, T) token and (N,) sequence log-probs of a frozen policy, `micro` rows at a time: on every row, or only
    on `rows` (sorted unique ids) with NaN elsewhere, so that a loss reading a row no example uses fails loudly.
    share_prompts: sequence_logprobs runs each distinct prompt of a micro-batch once; identical rows (repeated
    answers) run once."""
    ids, att, resp = seqs
    rows = torch.arange(ids.shape[0], device=ids.device) if rows is None else rows
    tok = torch.full(ids.shape, float("nan"), dtype=torch.float32, device=ids.device)
    for s in range(0, len(rows), micro):
        r = rows[s:s + micro]
        tok[r] = sequence_logprobs(model, ids[r], att[r], resp[r], share_prompts=share_prompts, unique_rows=True)[0]
    return tok, tok.sum(-1)


def frozen_logps(spec, models, seqs, micro, gathered=lambda model: contextlib.nullcontext(), rows=None,
                 share_prompts=False):
    """The frozen fields of the iteration's responses (frozen_fields) from the spec's frozen policies
    (each one's forwards inside gathered(model): the trainer's rollout weights, one model at a time), on every
    row or only on `rows` (those the examples use: best_worst pairs read 2 of each group's n)."""
    seq, tok, cache = {}, {}, {}
    for name, model in models.items():
        if id(model) not in cache:  # offline: mu is pi_ref itself, computed once
            with gathered(model):
                cache[id(model)] = precompute_logps(model, seqs, micro, rows, share_prompts)
        tok[name], seq[name] = cache[id(model)]
    return frozen_fields(spec, seq, seqs[2].sum(-1).to(seq["mu"].dtype), tok, seqs[2])


# ---------------------------------------------------------------------------
# One iteration (steps 1-6) and Algorithm 3
# ---------------------------------------------------------------------------


def iteration(k, eta, tau, state, prompts, prompt_ids, oracle, trainer, cfg):
    """Iteration k of cfg['algo'] on this rank's prompts, with the round's eta and tau; returns its metrics.

    state: policy (trained), tokenizer, and the spec's frozen copies: ref (pi_ref), opponent (its copy, if any).
    """
    spec, h = ALGOS[cfg["algo"]], hyper(ALGOS[cfg["algo"]], cfg, eta, tau)
    opp = OPPONENTS[spec.opponent]  # None: no opponent
    policy, tok, n, micro = state["policy"], state["tokenizer"], cfg["n_samples"], cfg["micro_batch_size"]
    mu_model = state["ref"] if spec.sampler == "ref" else policy
    gen = torch.Generator(device=trainer.device).manual_seed(seed_for(cfg["seed"], "sample", k, trainer.rank))

    peaks = {}  # CUDA: max GiB allocated in the rollout (1-4) and in training (5), for bench/plan.py --measured

    # 1. mu <- the sampler; n responses per prompt (and n from the opponent)
    record_peak(peaks, None, trainer.device)
    t0 = time.time()
    policy.eval()
    with trainer.autocast(), trainer.gathered(mu_model):
        samples, groups = sample_groups(mu_model, tok, prompt_ids, cfg, gen, trainer.all_done)
    if opp:
        source = opp.sampler(state, h)
        with trainer.autocast(), trainer.gathered(*models_of(source)):
            _, opp_groups = sample_groups(source, tok, prompt_ids, cfg, gen, trainer.all_done)
    sample_s = time.time() - t0

    # 2. the oracle: (P, n, n) win rates within each group, and (P, n, n) P(y_i > y'_j) against the opponent
    t0 = time.time()
    M = oracle.winrate_matrix(prompts, groups)  # fsdp: each of its models gathered whole while it scores, in turn
    M_opp = None
    if opp:
        M_opp = oracle.winrate_matrix(prompts, [g + o for g, o in zip(groups, opp_groups)])[:, :n, n:]
    judge_s = time.time() - t0

    # 3. examples; 4. frozen log-probs
    ex = make_examples(spec, M, cfg, M_opp, trainer.device)
    seqs = samples.sequences()
    models = {"mu": mu_model, "ref": state.get("ref"), "opp": state.get("opponent") if opp and opp.logps else None}
    with trainer.autocast():
        used = torch.unique(torch.cat([r.flatten() for r in ex["rows"].values()])) if trainer.local_forwards else None
        frozen = frozen_logps(spec, {name: m for name, m in models.items() if m is not None}, seqs, micro,
                              trainer.gathered, used, trainer.share_prompts)
    if opp and opp.before_training:  # OMWU: pi^{k-1} <- pi^k, before pi^k is updated
        opp.before_training(trainer, state, h)

    # 5. minimise the loss
    record_peak(peaks, "rollout_peak_gib", trainer.device)
    fit, before = {}, frozen["mu"]  # fit_gap: the policy's log-probs before training, mu itself when it sampled
    if cfg["fit_gap"] and spec.sampler != "policy":
        before = policy_logps(policy, trainer, seqs, micro, used)
    t0 = time.time()
    after_step = (lambda: opp.after_step(trainer, state, h)) if opp and opp.after_step else None  # NashMP's EMA
    step_losses = minimise(spec, ex, frozen, seqs, h, trainer, cfg, k, after_step,
                           desc=f"iteration {k} train", postfix=dict(sample=f"{sample_s:.1f}s", judge=f"{judge_s:.1f}s"))
    train_s = time.time() - t0
    record_peak(peaks, "train_peak_gib", trainer.device)
    if cfg["fit_gap"]:
        policy.eval()
        fit = fit_gap(spec, ex, frozen, h, before, policy_logps(policy, trainer, seqs, micro, used),
                      trainer.all_reduce_sum)
    lengths = samples.response_mask.sum(-1).float()
    return {"iteration": k, "loss": sum(step_losses) / len(step_losses), "response_length": float(lengths.mean()),
            "tokens_per_s": int(samples.response_mask.sum()) / max(sample_s, 1e-9), "sample_s": sample_s,
            "judge_s": judge_s, "train_s": train_s, **peaks, **fit, "groups": groups,
            "preference_signal": trainer.all_reduce_sum(float(not bool((M == 0.5).all()))) > 0}


def record_peak(peaks, name, device):
    """CUDA: peaks[name] = the max GiB allocated since the last call (none for name None); then a new count."""
    if device.type == "cuda":
        if name:
            peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)


def policy_logps(policy, trainer, seqs, micro, rows):
    """(N,) the trained policy's sequence log-probs (NaN off `rows`), outside training: fit_gap's before / after."""
    with trainer.autocast(), trainer.gathered(policy):
        return precompute_logps(policy, seqs, micro, rows, trainer.share_prompts)[1]


def fit_gap(spec, ex, frozen, h, before, after, all_reduce_sum=float):
    """Did the optimizer minimise the iteration's loss? Alg. 2's step is the *minimiser* of the iteration's loss
    (eq. 14's minimiser is the prox step only when it is reached). The loss L(z) = sum w loss(z) / sum w of the
    examples as a function of the responses' sequence log-probs z (N,): before (the policy before training),
    after (after training) and its minimum over free z (L-BFGS in float64; the responses of a group are then
    only tied by the loss, which is the tabular policy of the samples). fit_realised = (before - after) /
    (before - minimum): 1 when training reached the minimiser on these samples, 0 when it did not move the loss.
    Each rank's examples are its own groups, so the sums are all-reduced."""
    rows = torch.unique(torch.cat([r.flatten() for r in ex["rows"].values()]))  # (U,) the responses used
    idx = torch.arange(len(ex["weight"]), device=rows.device)

    def total(z):  # z (U,) -> sum_e w_e loss_e
        return (ex["weight"] * batch_loss(spec, ex, idx, z, rows, frozen, h)).sum()

    z = before[rows].detach().double().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = total(z)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        sums = [float(total(before[rows].double())), float(total(after[rows].double())), float(total(z)),
                float(ex["weight"].sum())]
    b, a, m, w = (all_reduce_sum(v) for v in sums)
    b, a, m = b / w, a / w, min(m / w, b)
    return {"fit_loss_before": b, "fit_loss_after": a, "fit_loss_min": m,
            "fit_realised": (b - a) / (b - m) if b - m > 1e-12 else None}


def grouped_order(group_of, generator):
    """A random permutation of the examples that keeps each prompt's together: the prompts in a random order,
    each one's examples in a random order. group_of: (E,) prompt of each example. A micro-batch of all-pairs
    examples then reads a few groups' n responses instead of two per example."""
    E = len(group_of)
    key = torch.randperm(E, generator=generator)  # order within a prompt
    rank_of = torch.randperm(int(group_of.max()) + 1 if E else 1, generator=generator)  # order of the prompts
    return torch.argsort(rank_of[group_of] * E + key)


def minimise(spec, ex, frozen, seqs, h, trainer, cfg, k, after_step=None, desc="", postfix=None):
    """`epochs` shuffled passes (prompts in a random order, each prompt's examples together in a random order) of
    optimizer steps over the examples. Each step's loss is
    sum_{global batch} weight * loss / (batch_size * mean weight of the iteration's examples): an unbiased
    estimate of the iteration's weighted mean loss, with the same step size whatever a batch's realised
    weight (a ratio to the realised weight would shrink steps and over-weight a short last batch)."""
    policy, micro = trainer.model, cfg["micro_batch_size"]
    E = len(ex["weight"])
    per_step = max(1, cfg["batch_size"] // trainer.world)
    mean_weight = trainer.all_reduce_sum(float(ex["weight"].sum())) / trainer.all_reduce_sum(float(E))
    norm = per_step * mean_weight or 1.0  # per rank: the gradient all-reduce averages over ranks
    shuffle = torch.Generator().manual_seed(seed_for(cfg["seed"], "shuffle", k, trainer.rank))
    steps = cfg["epochs"] * math.ceil(E / per_step)
    group_of = next(iter(ex["rows"].values())).reshape(E, -1)[:, 0].cpu() // cfg["n_samples"]  # (E,) prompt of each
    step_losses = []
    policy.train()
    with tqdm(total=steps, desc=desc, leave=False, disable=trainer.rank != 0, file=sys.stderr) as bar:  # closed on a stop too
        bar.set_postfix(**(postfix or {}))
        for _ in range(cfg["epochs"]):
            order = grouped_order(group_of, shuffle)
            for s in range(0, E, per_step):
                batch = order[s:s + per_step].to(trainer.device)

                def micro_losses():
                    for m in range(0, len(batch), micro):
                        idx = batch[m:m + micro]
                        rows = torch.unique(torch.cat([r[idx].flatten() for r in ex["rows"].values()]))
                        with trainer.autocast():
                            tok_lp, seq_lp = sequence_logprobs(policy, seqs[0][rows], seqs[1][rows], seqs[2][rows],
                                                               share_prompts=trainer.share_prompts, unique_rows=True)
                        pi = tok_lp if spec.token_level else seq_lp
                        per_example = batch_loss(spec, ex, idx, pi, rows, frozen, h)  # (b,)
                        yield (ex["weight"][idx] * per_example).sum() / norm

                step_losses.append(trainer.step(micro_losses(), k, len(step_losses), steps))
                if after_step is not None:  # the opponent's move after each step (NashMP's EMA target)
                    after_step()
                bar.update(1)
    return step_losses


def rounds(iterations, K, start=0):
    """Algorithm 3's schedule, the one loop of run(), toy_game.py and diagnostics.py: (k, t, round_start) for
    each iteration k from `start`: its round t = k // K, and whether it opens the round (pi_ref <- pi^k then,
    for an algorithm with reference rounds)."""
    for k in range(start, iterations):
        yield k, k // K, k % K == 0


def run(state, trainer, cfg, oracle, prompts_for, start, after_iteration):
    """Algorithm 3: rounds of iterations; pi_ref <- pi at each round's start (ref = "rounds").

    prompts_for(k) -> (prompts, token ids) of this rank for iteration k; after_iteration(k, metrics)
    evaluates, checkpoints and logs. start > 0 resumes (pi_ref and the opponent come from the checkpoint).
    """
    spec = ALGOS[cfg["algo"]]
    for k, t, round_start in rounds(cfg["iterations"], round_length(spec, cfg), start):
        eta, tau = round_params(cfg, t)
        if spec.ref == "rounds" and round_start:
            trainer.copy_weights(state["ref"], state["policy"])  # pi_ref <- pi^t (Alg. 3)
        prompts, ids = prompts_for(k)
        m = iteration(k, eta, tau, state, prompts, ids, oracle, trainer, cfg)
        m.update(round=t, **{name: v for name, v in (("eta", eta), ("tau", tau)) if v is not None})
        after_iteration(k, m)


for _name, _spec in ALGOS.items():
    check_spec(_name, _spec)
