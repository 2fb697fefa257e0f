"""Step 3 of an iteration: the examples built from the groups' win rates, and what a loss reads of them.

make_examples turns the (P, n, n) win rates of P groups of n responses into examples of the spec's kind
(pairs, responses, response_pairs, groups): row ids, weights and per-response values. Batch is everything
a loss form (comal.py) reads for a micro-batch; batch_loss builds it and calls the loss; check_loss runs a
spec's loss once on a synthetic group before any model loads.
"""
from dataclasses import dataclass

import torch

import losses
from opponents import OPPONENTS


class SpecError(ValueError):
    """A bad config value for the chosen algorithm (or a bad table entry): one line naming the key."""


# ---------------------------------------------------------------------------
# Step 3: examples from the groups' win rates. Each kind gives row fields (indices of responses,
# row p * n + i is response i of prompt p), weights that sum to 1 per group (in expectation:
# best_worst drops ties), and per-response values whose estimates make its losses unbiased.
# ---------------------------------------------------------------------------


def loo_winrates(M):
    """(P, n) leave-one-out mean_{j != i} M[i, j]: unbiased for g_mu(y_i) = P(y_i > mu), given y_i."""
    n = M.shape[-1]
    return (M.sum(-1) - 0.5) / (n - 1)


def _group_index(P, n):
    return torch.arange(P)[:, None] * n  # (P, 1) first row of each group


def pair_examples(M, cfg):
    """Preference pairs (w, l). all: every pair i < j twice, (i wins, weight M[i, j] / (n(n-1)/2)) and
    (j wins, weight M[j, i] / ...): the expected loss is eq. 13/14's over (y, y') ~ mu x mu, labels
    ~ lambda_P. best_worst (the paper): the highest and lowest mean win rate of the group, weight 1
    (0 when all tie; among tied responses the first); this selects which pairs are seen, so its minimiser is
    not the prox step. Mean win rates equal to 1e-6 are ties: equal rates that an oracle returns in float32
    (errors ~1e-8), summed in another order, differ in the last bits, and that must not pick a winner."""
    P, n = M.shape[0], M.shape[-1]
    base = _group_index(P, n)
    if cfg["pair_selection"] == "best_worst":  # scores equal to 1e-6 tie: float rounding decides no winner
        score = (M.double().mean(-1) * 1e6).round()  # (P, n)
        tie = score.max(-1).values <= score.min(-1).values
        return {"w": base[:, 0] + score.argmax(-1), "l": base[:, 0] + score.argmin(-1)}, (~tie).double(), {}
    i, j = torch.triu_indices(n, n, 1)
    w = torch.cat([base + i, base + j], 1).flatten()
    l = torch.cat([base + j, base + i], 1).flatten()
    weight = torch.cat([M[:, i, j], M[:, j, i]], 1).flatten().double() / len(i)
    return {"w": w, "l": l}, weight, {}


def response_examples(M, cfg, M_opp=None):
    """Each response y, weight 1/n. g: leave-one-out win rate (unbiased for g_mu(y): each loss term involves
    one response only). adv = g - group mean (= g - 1/2: M + M^T = 1), Dr.GRPO's; adv_scaled: divided by the
    group's std of g, GRPO's (invariant to g's affine form, so Alg. 5's diagonal-inclusive mean gives the same).
    With an opponent: gopp = mean_j P(y > y'_j) over its n samples, gopp_base = the mean of gopp over the
    other responses of the group (a REINFORCE baseline independent of y)."""
    P, n = M.shape[0], M.shape[-1]
    g = loo_winrates(M).double()
    values = {"g": g, "adv": losses.group_advantages(g, scale_by_std=False), "adv_scaled": losses.group_advantages(g)}
    if M_opp is not None:
        gopp = M_opp.double().mean(-1)
        values.update(gopp=gopp, gopp_base=(gopp.sum(-1, keepdim=True) - gopp) / (n - 1))
    return {"y": torch.arange(P * n)}, torch.full((P * n,), 1.0 / n, dtype=torch.float64), _flat(values)


def response_pair_examples(M, cfg, M_opp=None):
    """Pairs (a, b), a < b, of one group, weight 1 / (n(n-1)/2). g: the group mean of M[i, :] *with* the
    diagonal (Alg. 5's r_i): g_a - g_b then has expectation (n-2)/n (g(a) - g(b)) + (2 A(a,b) - 1)/n, whose
    least-squares fit over mu x mu is g(a) - g(b) exactly; the leave-one-out estimate would count the pair's
    own comparison twice and give a step n/(n-1) too large. gopp: mean win rate against the opponent."""
    P, n = M.shape[0], M.shape[-1]
    i, j = torch.triu_indices(n, n, 1)
    base = _group_index(P, n)
    values = {"g": losses.winrate_rewards(M.double())}
    if M_opp is not None:
        values["gopp"] = M_opp.double().mean(-1)
    rows = {"a": (base + i).flatten(), "b": (base + j).flatten()}
    return rows, torch.full((P * len(i),), 1.0 / len(i), dtype=torch.float64), _flat(values)


def group_examples(M, cfg):
    """One example per prompt: its n responses y (P, n), weight 1; g as in response_pair_examples (a loss
    that centres within the group sees the same pair differences); gw = 1/n, the within-group weights."""
    P, n = M.shape[0], M.shape[-1]
    values = {"g": losses.winrate_rewards(M.double()), "gw": torch.full((P, n), 1.0 / n, dtype=torch.float64)}
    return {"y": _group_index(P, n) + torch.arange(n)}, torch.ones(P, dtype=torch.float64), _flat(values)


def _flat(values):
    return {k: v.reshape(-1) for k, v in values.items()}


EXAMPLES = {"pairs": pair_examples, "responses": response_examples, "response_pairs": response_pair_examples,
            "groups": group_examples}


def make_examples(spec, M, cfg, M_opp=None, device=None):
    """{"rows": {field: (E,) or (E, n) row ids}, "weight": (E,) float64, "values": {name: (P*n,) per response}}
    from the (P, n, n) win rates of the groups (and the (P, n, n) win rates against the opponent's samples),
    on `device` (default: M's)."""
    build = EXAMPLES[spec.examples]
    rows, weight, values = build(M, cfg, M_opp) if spec.opponent != "none" else build(M, cfg)
    to = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return {"rows": to(rows), "weight": weight.to(device), "values": to(values)}


class Absent:
    """A Batch field the spec does not provide: reading it is an error naming the field and why."""

    def __init__(self, name, why):
        self.name, self.why = name, why

    def __getitem__(self, idx):
        raise SpecError(f"x.{self.name}: {self.why}")


class Fields(dict):
    """Batch.rows and Batch.values: a name the examples do not have is an error listing the ones they have."""

    def __init__(self, what, items):
        super().__init__(items)
        self.what = what

    def __missing__(self, key):
        raise SpecError(f"x.{self.what}[{key!r}]: these examples have no {key!r} (they have: {', '.join(self)})")


TOKENS = "per-token log-probs need token_level=True in the spec"


@dataclass
class Batch:
    """What a loss reads for a micro-batch of examples. `rows`: the examples' fields as response ids, (b,) or
    (b, n): w, l (pairs), y (responses; (b, n) for groups), a, b (response_pairs). Everything else is per
    response, (N,) or (N, T) indexed by those ids (row p * n + i is response i of prompt p): x.pi[x.rows["w"]]
    is the trained policy's log-prob of each pair's winner. A field the spec does not provide is Absent.
    A loss is per example: the loss of an example may not depend on the others of its micro-batch."""

    rows: dict
    pi: torch.Tensor  # (N,) log pi_theta(y|x), gradients flow; NaN outside the micro-batch's responses
    mu: torch.Tensor  # (N,) log mu(y|x), the sampler's
    center: torch.Tensor  # (N,) the step's centre: mu's or pi_ref's (spec.center)
    length: torch.Tensor  # (N,) response length in tokens, EOS included
    values: dict  # (N,) per-response values of the example kind (make_examples): g, adv, adv_scaled, gw, gopp, ...
    ref: torch.Tensor = Absent("ref", "the spec has no pi_ref (ref 'none')")  # (N,) log pi_ref(y|x)
    opp: torch.Tensor = Absent("opp", "the spec's opponent has no log-probs of its own (opponents.py)")  # (N,)
    pi_tok: torch.Tensor = Absent("pi_tok", TOKENS)  # (N, T) per-token log-probs of pi, mu, pi_ref, the centre,
    mu_tok: torch.Tensor = Absent("mu_tok", TOKENS)  # and the response mask (N, T)
    ref_tok: torch.Tensor = Absent("ref_tok", TOKENS)
    center_tok: torch.Tensor = Absent("center_tok", TOKENS)
    mask: torch.Tensor = Absent("mask", TOKENS)


def batch_loss(spec, ex, idx, pi, rows, frozen, h):
    """Per-example loss (b,) of examples idx: the spec's loss on their Batch. pi: the trained policy's log-probs
    (r,) or per token (r, T) of the responses `rows` (sorted unique ids); frozen: frozen_fields' (N,) tensors.
    Training, fit_gap, toy_game and the exactness tests all call this function."""
    full = pi.new_full((len(frozen["mu"]),) + pi.shape[1:], float("nan")).index_copy(0, rows, pi)  # (N,) / (N, T)
    tokens = {"pi_tok": full} if pi.dim() == 2 else {}
    x = Batch(rows=Fields("rows", {f: r[idx] for f, r in ex["rows"].items()}),
              pi=full.sum(-1) if pi.dim() == 2 else full, values=Fields("values", ex["values"]), **tokens, **frozen)
    return spec.loss(x, h)


def check_loss(name, spec, cfg, h):
    """The spec's loss once on one synthetic group of its example kind, before any model loads: a key it does
    not declare, a field its examples lack, a loss that is not one finite value per example, or one whose value
    for an example depends on the rest of its micro-batch is a SpecError naming the algorithm."""
    n, T = cfg["n_samples"], 3
    g = torch.Generator().manual_seed(0)
    U = torch.rand(1, n, n, generator=g, dtype=torch.float64)
    M = (torch.triu(U, 1) + torch.tril(1 - U.transpose(1, 2), -1)).float() + 0.5 * torch.eye(n)
    opp = OPPONENTS[spec.opponent]
    ex = make_examples(spec, M, cfg, torch.rand(1, n, n, generator=g) if opp else None)
    seq = {"mu": -3 * torch.rand(n, generator=g, dtype=torch.float64)}
    seq.update({k: -3 * torch.rand(n, generator=g, dtype=torch.float64) for k, has in
                (("ref", spec.ref != "none"), ("opp", bool(opp and opp.logps))) if has})
    frozen = frozen_fields(spec, seq, torch.full((n,), float(T)), {k: v[:, None].expand(n, T) / T for k, v in seq.items()},
                           torch.ones(n, T))
    pi = (seq["mu"] + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_(True)
    pi_in = pi[:, None].expand(n, T) / T if spec.token_level else pi
    E = len(ex["weight"])
    try:
        out = batch_loss(spec, ex, torch.arange(E), pi_in, torch.arange(n), frozen, h)
        (ex["weight"] * out).sum().backward()
        alone = torch.cat([batch_loss(spec, ex, torch.arange(e, e + 1), pi_in, torch.arange(n), frozen, h)
                           for e in range(E)]) if out.shape == (E,) else None
    except (SpecError, AttributeError, KeyError, TypeError, IndexError, RuntimeError, ValueError) as e:
        raise SpecError(f"algo {name}: its loss {getattr(spec.loss, '__name__', spec.loss)} fails on one synthetic "
                        f"group of {spec.examples} examples: {type(e).__name__}: {e}") from None
    if out.shape != (E,):
        raise SpecError(f"algo {name}: its loss gives shape {tuple(out.shape)} for {E} examples, not one loss each")
    if not torch.isfinite(out).all() or not torch.isfinite(pi.grad).all():
        raise SpecError(f"algo {name}: its loss is not finite on a synthetic group of {spec.examples} examples")
    if not torch.allclose(out, alone, rtol=1e-9, atol=1e-12):
        raise SpecError(f"algo {name}: its loss of an example changes with the other examples of its micro-batch "
                        "(a batch statistic): it would depend on micro_batch_size and the number of ranks")


def frozen_fields(spec, seq, lengths, tok=None, mask=None):
    """Batch's per-response fields besides pi: the log-probs `seq` (N,) of mu, ref, opp (those the spec has);
    center (mu's or ref's, by the spec); length (N,) of the responses (EOS included); for token-level specs the
    per-token log-probs `tok` (N, T) of mu, ref and the centre, and the response mask (N, T)."""
    out = {"mu": seq["mu"], "center": seq[spec.center], "length": lengths}
    out.update({k: seq[k] for k in ("ref", "opp") if seq.get(k) is not None})
    if spec.token_level:
        out.update(mu_tok=tok["mu"], center_tok=tok[spec.center], mask=mask)
        if tok.get("ref") is not None:
            out["ref_tok"] = tok["ref"]
    return out


def examples_per_group(spec, cfg):
    """How many examples one group of n responses gives (for the on-policy check, before anything loads)."""
    n = cfg["n_samples"]
    M = torch.full((1, n, n), 0.5)
    return len(make_examples(spec, M, cfg, M if spec.opponent != "none" else None)["weight"])


