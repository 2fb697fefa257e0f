"""Every loss of comal as a pure function of log-probabilities.

No model, no I/O, no state: each function maps tensors to tensors and is
differentiated by the caller. Equation and algorithm numbers refer to the
COMAL paper (arXiv 2410.23223) unless said otherwise.

Conventions shared by every function
- Sequence-level losses take per-sequence *summed* log-probs of shape (B,):
  `pi_*` is the policy being trained (pi_theta, gradients flow), `mu_*` the
  policy that produced the samples (the current iterate mu^k, frozen),
  `ref_*` the reference pi_ref (frozen). For pairs, `_w` / `_l` are the
  preferred / dispreferred response (y^+, y^- of eq. 12).
- Token-level losses (GRPO, the KL estimators) take (B, T) per-token log-probs
  and a (B, T) response mask (1 on response tokens, 0 on prompt and padding).
- Every function returns a per-example loss of shape (B,) that is to be
  *minimised*; objectives to maximise (GRPO, NashMP) are negated. The caller
  reduces (a mean over the batch, or a weighted sum); nothing here averages
  over the batch, so weighted and distributed reductions stay exact.
- `eta` is the paper's mirror-descent step size (Section 3.2): a DPO
  "beta" is 1/eta, the IPO/INPO margin is eta/2. `tau` is the KL strength of
  the regularised game J_tau (eq. 2).
- Win rates `winrate` are estimates of g_mu(y) = P(y > mu) in [0, 1].
"""
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------
# Pairwise losses on preference pairs (y_w, y_l) ~ lambda_P (eq. 12)
# --------------------------------------------------------------------------


def dpo_loss(pi_w, pi_l, ref_w, ref_l, eta):
    """DPO (App. F, 'sampled loss based on the BT model'), beta = 1/eta.

    Minimiser under a Bradley-Terry oracle with reward r: pi = Prox(ref, eta*r).
    """
    logits = ((pi_w - ref_w) - (pi_l - ref_l)) / eta  # (B,)
    return -F.logsigmoid(logits)  # (B,)


def ipo_loss(pi_w, pi_l, ref_w, ref_l, eta):
    """IPO, eq. (13): pairs sampled from mu, labels from lambda_P.

    Population minimiser: pi = Prox(ref, eta * g_mu), g_mu = P(. > mu).
    """
    h = (pi_w - pi_l) - (ref_w - ref_l)  # (B,)
    return (h - eta / 2) ** 2  # (B,)


def inpo_loss(pi_w, pi_l, ref_w, ref_l, mu_w, mu_l, eta, tau):
    """INPO, eq. (14): pairs sampled from mu.

    Population minimiser: pi = Prox(mu, eta * g^tau_mu) with
    g^tau_mu = P(. > mu) - tau * log(mu / pi_ref) (Alg. 2's gradient step).
    """
    target = eta * tau * (ref_w - ref_l) + (1 - eta * tau) * (mu_w - mu_l) + eta / 2  # (B,)
    return ((pi_w - pi_l) - target) ** 2  # (B,)


# --------------------------------------------------------------------------
# Regression losses on responses y ~ mu with estimated win rates (App. F, G)
# --------------------------------------------------------------------------


def _regularized_gain(winrate, mu, ref, tau):
    """g^tau_mu(y) = P(y > mu) - tau * log(mu(y) / pi_ref(y)) (Alg. 2); tau = 0 drops ref."""
    if tau == 0 or ref is None:
        return winrate
    return winrate - tau * (mu - ref)


def sppo_loss(pi, mu, winrate, eta, ref=None, tau=0.0):
    """SPPO (App. F) and Reg-SPPO (Alg. 6).

    Regresses log(pi/mu) on eta*(g^tau - 1/2): log Z of the exact prox step is
    replaced by eta/2. Without tau, E_mu[g_mu] = 1/2 in a symmetric game, so
    log Z - eta/2 = O(eta^2) and the fitted policy is O(eta^3) from Prox(mu, eta g).
    With tau, E_mu[g^tau] = 1/2 - tau KL(mu || pi_ref): the gap is O(eta^2 tau)
    (tests/test_exactness.py measures both). App. F prints '- eta g - eta/2';
    Alg. 6 has the sign that makes the minimiser approach Prox(mu, eta g^tau),
    used here.
    """
    target = eta * (_regularized_gain(winrate, mu, ref, tau) - 0.5)  # (B,)
    return ((pi - mu) - target) ** 2  # (B,)


def dro_loss(pi, mu, winrate, value, eta, ref=None, tau=0.0):
    """DRO (App. F) and Reg-DRO (Alg. 8).

    `value` (B,) is the learned V_phi (one per prompt); at the joint minimum
    eta * V = -log Z and pi = Prox(mu, eta g^tau) exactly.
    """
    target = eta * _regularized_gain(winrate, mu, ref, tau) + eta * value  # (B,)
    return ((pi - mu) - target) ** 2  # (B,)


def dro_group_loss(pi, mu, winrate, weights, eta, ref=None, tau=0.0):
    """DRO / Reg-DRO with the per-prompt value V at its optimum, on (B, n) groups of one prompt's responses.

    V minimises the group's DRO loss in closed form, eta V = sum_i w_i [(pi_i - mu_i) - eta g^tau_i] (weights
    w: (B, n), summing to 1), so the loss is the weighted variance of the residual; its gradient in pi is the
    joint minimum's (the V-gradient vanishes there). Returns (B,).
    """
    residual = (pi - mu) - eta * _regularized_gain(winrate, mu, ref, tau)  # (B, n)
    value = (weights * residual).sum(-1, keepdim=True) / eta  # (B, 1): V at its optimum
    return (weights * dro_loss(pi, mu, winrate, value, eta, ref, tau)).sum(-1)  # (B,)


def rebel_loss(pi_a, pi_b, mu_a, mu_b, winrate_a, winrate_b, eta, ref_a=None, ref_b=None, tau=0.0):
    """REBEL (App. F) and Reg-REBEL (Alg. 10) on response pairs (y, y') ~ mu.

    Differences of rewards cancel log Z, so the minimiser is Prox(mu, eta g^tau).
    """
    lhs = ((pi_a - mu_a) - (pi_b - mu_b)) / eta  # (B,)
    rhs = _regularized_gain(winrate_a, mu_a, ref_a, tau) - _regularized_gain(winrate_b, mu_b, ref_b, tau)  # (B,)
    return (lhs - rhs) ** 2  # (B,)


# --------------------------------------------------------------------------
# KL estimators (Schulman's k1/k2/k3), per token or per sequence
# --------------------------------------------------------------------------


def kl_estimator(pi, ref, kind="k3"):
    """Estimates of KL(pi || ref) from log-probs of samples y ~ pi (elementwise).

    Values: all three are unbiased (k1, k3) or low-bias (k2) for KL(pi||ref).
    Gradients, when used as a loss on on-policy samples:
      k1 = log(pi/ref)            -> E[grad] = 0 (useless as a loss);
      k2 = 0.5 * log(pi/ref)^2    -> E[grad] = grad KL(pi || ref) (the REINFORCE gradient);
      k3 = ref/pi - 1 - log(ref/pi) -> E[grad] = grad KL(ref || pi) (what GRPO's loss term
                                     actually follows; >= 0 always, low variance).
    """
    log_ratio = pi - ref
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r} (expected k1, k2 or k3)")


# --------------------------------------------------------------------------
# GRPO / Dr.GRPO with win-rate rewards (eq. 15, Alg. 5)
# --------------------------------------------------------------------------


def winrate_rewards(prefs):
    """Alg. 5 reward r_i = 1/G sum_j P[y_i > y_j] from a (N, G, G) matrix of P.

    The diagonal (P[y_i > y_i] = 1/2) is included, as in Alg. 5.
    """
    return prefs.mean(dim=-1)  # (N, G)


def group_advantages(rewards, scale_by_std=True, eps=1e-6):
    """Group-relative advantages from (N, G) rewards: GRPO divides by the group
    std; Dr.GRPO (scale_by_std=False) only subtracts the group mean."""
    adv = rewards - rewards.mean(dim=-1, keepdim=True)  # (N, G)
    if scale_by_std:
        adv = adv / (rewards.std(dim=-1, keepdim=True) + eps)
    return adv  # (N, G)


def grpo_loss(pi, old, ref, advantages, mask, tau, clip_eps=0.2, dr_grpo=False, max_len=None):
    """Negated GRPO objective (eq. 15) per sequence, token-level.

    pi, old, ref: (B, T) log-probs of the sampled tokens under pi_theta,
    pi_old (the sampler) and pi_ref; advantages (B,) are broadcast to every
    token; mask (B, T). Per token: min(r A, clip(r, 1-eps, 1+eps) A) - tau * k3,
    r = pi/old. GRPO averages tokens within a sequence (1/|y|); Dr.GRPO sums
    them and divides by the constant `max_len` (default T), removing the length
    bias. The batch mean (the 1/G of eq. 15) is left to the caller.
    """
    mask = mask.to(pi.dtype)
    ratio = torch.exp(pi - old)  # (B, T)
    adv = advantages.unsqueeze(-1)  # (B, 1)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)  # (B, T)
    per_token = surrogate - tau * kl_estimator(pi, ref, "k3")  # (B, T)
    if dr_grpo:
        denom = float(max_len if max_len is not None else pi.shape[-1])
        return -(per_token * mask).sum(-1) / denom  # (B,)
    return -(per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)


# --------------------------------------------------------------------------
# Nash Mirror Prox (arXiv 2505.19731), practical form with a target network
# --------------------------------------------------------------------------


def nashmp_loss(pi, pref, baseline, ref, target, beta, eta):
    """NashMP step on samples y ~ pi_theta played against y' ~ pi_target.

    Minimises  -P(pi > pi_k) + beta KL(pi||pi_ref) + (beta/eta) KL(pi||pi_k)
    with pi_k = the EMA target network. pref (B,) = P(y > y'), baseline (B,)
    a variance-reducing baseline (e.g. the mean preference of the other
    samples of the prompt); the two KLs use the k2 estimator, whose gradient
    on on-policy samples is the exact KL gradient. Minimiser over the simplex:
    pi ∝ exp((g/beta + log ref + log(pi_k)/eta) / (1 + 1/eta)).
    """
    pg = -(pref - baseline).detach() * pi  # (B,) REINFORCE surrogate
    return pg + beta * kl_estimator(pi, ref, "k2") + (beta / eta) * kl_estimator(pi, target, "k2")  # (B,)


# --------------------------------------------------------------------------
# Nash-MD (Munos et al. 2023, "Nash Learning from Human Feedback")
# --------------------------------------------------------------------------


def nash_md_loss(pi, pref, baseline, ref, tau):
    """Nash-MD step on samples y ~ pi_theta played against y' ~ pi_mix = pi_t^(1-beta) pi_ref^beta.

    Nash-MD's step is argmax_pi eta P(pi > pi_mix) - KL(pi || pi_mix) with beta = eta tau. At pi = pi_t the
    gradient of KL(pi || pi_mix) is beta times that of KL(pi || pi_ref), so one gradient step from pi_t
    follows -P(pi > pi_mix) + tau KL(pi || pi_ref) (scaled by eta, the learning rate's business): pref (B,)
    = P(y > y'), baseline (B,) the mean preference of the other samples of the prompt, the KL by the k2
    estimator (exact gradient on on-policy samples).
    """
    pg = -(pref - baseline).detach() * pi  # (B,) REINFORCE surrogate
    return pg + tau * kl_estimator(pi, ref, "k2")  # (B,)
