"""losses.py against hand-written references and the exact expectations they estimate."""
import math

import pytest
import torch

import losses

torch.manual_seed(0)
D = torch.float64


def rand(*shape):
    return torch.randn(*shape, dtype=D)


def test_pairwise_losses_match_hand_formulas():
    B, eta, tau = 7, 0.7, 0.2
    pw, pl, rw, rl, mw, ml = (rand(B) for _ in range(6))
    sig = lambda x: 1 / (1 + torch.exp(-x))  # noqa: E731
    ref_dpo = -torch.log(sig((pw - rw) / eta - (pl - rl) / eta))
    torch.testing.assert_close(losses.dpo_loss(pw, pl, rw, rl, eta), ref_dpo)
    ref_ipo = (torch.log(pw.exp() / pl.exp()) - torch.log(rw.exp() / rl.exp()) - eta / 2) ** 2
    torch.testing.assert_close(losses.ipo_loss(pw, pl, rw, rl, eta), ref_ipo)
    ref_inpo = ((pw - pl) - eta * tau * (rw - rl) - (1 - eta * tau) * (mw - ml) - eta / 2) ** 2
    torch.testing.assert_close(losses.inpo_loss(pw, pl, rw, rl, mw, ml, eta, tau), ref_inpo)
    # tau = 0: INPO is IPO with mu as the prox center (App. F)
    torch.testing.assert_close(losses.inpo_loss(pw, pl, rw, rl, mw, ml, eta, 0.0), losses.ipo_loss(pw, pl, mw, ml, eta))
    for fn in (losses.dpo_loss, losses.ipo_loss):
        assert fn(pw, pl, rw, rl, eta).shape == (B,)


def test_regression_losses_match_algorithm_boxes():
    B, eta, tau = 9, 0.4, 0.3
    pi, mu, ref, pia, pib, mua, mub, refa, refb = (rand(B) for _ in range(9))
    g, ga, gb, V = torch.rand(B, dtype=D), torch.rand(B, dtype=D), torch.rand(B, dtype=D), rand(B)
    # Alg. 6 (Reg-SPPO), Alg. 8 (Reg-DRO), Alg. 10 (Reg-REBEL), written out
    torch.testing.assert_close(losses.sppo_loss(pi, mu, g, eta, ref, tau),
                               ((pi - mu) - eta * (g - tau * (mu - ref) - 0.5)) ** 2)
    torch.testing.assert_close(losses.dro_loss(pi, mu, g, V, eta, ref, tau),
                               ((pi - mu) - eta * (g - tau * (mu - ref)) - eta * V) ** 2)
    torch.testing.assert_close(
        losses.rebel_loss(pia, pib, mua, mub, ga, gb, eta, refa, refb, tau),
        ((1 / eta) * ((pia - mua) - (pib - mub)) - (ga - tau * (mua - refa) - gb + tau * (mub - refb))) ** 2)
    # unregularised forms (App. F) are tau = 0 / no reference
    torch.testing.assert_close(losses.sppo_loss(pi, mu, g, eta), losses.sppo_loss(pi, mu, g, eta, ref, 0.0))
    torch.testing.assert_close(losses.sppo_loss(pi, mu, g, eta), ((pi - mu) - eta * (g - 0.5)) ** 2)


def exact_expectation_grad(per_sample, probs_detached):
    """sum_y pi(y) * grad loss(y): the exact expected gradient of an on-policy sample loss."""
    return (probs_detached * per_sample).sum()


def test_kl_estimators_values_and_gradients():
    k = 6
    theta = rand(k).requires_grad_(True)
    log_ref = torch.log_softmax(rand(k), -1)
    log_pi = torch.log_softmax(theta, -1)
    p = log_pi.exp().detach()
    kl_fwd = (log_pi.exp() * (log_pi - log_ref)).sum()
    kl_value = kl_fwd.item()
    kl_rev = (log_ref.exp() * (log_ref - log_pi)).sum()
    # unbiased values: E_pi[k1] = E_pi[k3] = KL(pi || ref)
    for kind in ("k1", "k3"):
        assert (p * losses.kl_estimator(log_pi, log_ref, kind)).sum().item() == pytest.approx(kl_value, abs=1e-12)
    assert (losses.kl_estimator(log_pi, log_ref, "k3") >= 0).all()
    # gradients on on-policy samples: k2 -> grad KL(pi||ref), k3 -> grad KL(ref||pi), k1 -> 0
    (g_fwd,) = torch.autograd.grad(kl_fwd, theta, retain_graph=True)
    (g_rev,) = torch.autograd.grad(kl_rev, theta, retain_graph=True)
    for kind, want in (("k2", g_fwd), ("k3", g_rev), ("k1", torch.zeros(k, dtype=D))):
        (g,) = torch.autograd.grad(exact_expectation_grad(losses.kl_estimator(log_pi, log_ref, kind), p), theta,
                                   retain_graph=True)
        torch.testing.assert_close(g, want, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="k4"):
        losses.kl_estimator(log_pi, log_ref, "k4")


def naive_grpo(pi, old, ref, adv, mask, tau, eps, dr, max_len):
    """Eq. (15) with explicit loops over sequences and tokens."""
    out = []
    for i in range(len(pi)):
        total, n = 0.0, 0
        for t in range(len(pi[i])):
            if mask[i][t]:
                r = math.exp(pi[i][t] - old[i][t])
                clipped = min(max(r, 1 - eps), 1 + eps)
                kl = math.exp(ref[i][t] - pi[i][t]) - (ref[i][t] - pi[i][t]) - 1
                total += min(r * adv[i], clipped * adv[i]) - tau * kl
                n += 1
        out.append(-total / (max_len if dr else max(n, 1)))
    return torch.tensor(out, dtype=D)


@pytest.mark.parametrize("dr", [False, True])
def test_grpo_loss_matches_loops(dr):
    B, T = 5, 7
    old = -torch.rand(B, T, dtype=D) * 3
    pi = old + 0.4 * rand(B, T)  # some ratios outside the clip range
    ref = old + 0.3 * rand(B, T)
    adv = rand(B)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    got = losses.grpo_loss(pi, old, ref, adv, mask, tau=0.05, clip_eps=0.2, dr_grpo=dr, max_len=T)
    want = naive_grpo(pi.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.05, 0.2, dr, T)
    torch.testing.assert_close(got, want)


def test_grpo_clip_stops_the_gradient_beyond_the_trust_region():
    old = torch.zeros(2, 1, dtype=D)
    pi = torch.tensor([[0.5], [-0.5]], dtype=D, requires_grad=True)  # ratios e^0.5 > 1.2 and e^-0.5 < 0.8
    adv = torch.tensor([1.0, -1.0], dtype=D)  # pushing further out of the region
    loss = losses.grpo_loss(pi, old, old.clone(), adv, torch.ones(2, 1), tau=0.0, clip_eps=0.2).sum()
    (g,) = torch.autograd.grad(loss, pi)
    assert torch.equal(g, torch.zeros_like(g))


def test_winrate_rewards_and_group_advantages():
    prefs = torch.tensor([[[0.5, 1.0, 0.0], [0.0, 0.5, 1.0], [1.0, 0.0, 0.5]],
                          [[0.5, 1.0, 1.0], [0.0, 0.5, 1.0], [0.0, 0.0, 0.5]]], dtype=D)
    r = losses.winrate_rewards(prefs)
    torch.testing.assert_close(r, torch.tensor([[0.5, 0.5, 0.5], [2.5 / 3, 1.5 / 3, 0.5 / 3]], dtype=D))
    dr = losses.group_advantages(r, scale_by_std=False)
    torch.testing.assert_close(dr, torch.tensor([[0.0, 0.0, 0.0], [1 / 3, 0.0, -1 / 3]], dtype=D))
    std = losses.group_advantages(r)
    torch.testing.assert_close(std[1], torch.tensor([1.0, 0.0, -1.0], dtype=D), atol=1e-5, rtol=0)
    assert torch.equal(std[0], torch.zeros(3, dtype=D))  # a tied group gives no signal, not NaN


def test_grpo_expected_gradient_is_the_win_rate_objective_with_reverse_kl():
    """At pi_theta = pi_old, E_{y~pi_old}[grad grpo_loss] = -grad(sum pi A - tau KL(ref||pi))."""
    k, tau = 5, 0.3
    theta = rand(k).requires_grad_(True)
    log_pi = torch.log_softmax(theta, -1)
    log_old = log_pi.detach()
    log_ref = torch.log_softmax(rand(k), -1)
    adv = rand(k)
    per = losses.grpo_loss(log_pi[:, None], log_old[:, None], log_ref[:, None], adv, torch.ones(k, 1), tau, clip_eps=0.2)
    (g,) = torch.autograd.grad((log_old.exp() * per).sum(), theta, retain_graph=True)
    objective = (log_pi.exp() * adv).sum() - tau * (log_ref.exp() * (log_ref - log_pi)).sum()
    (want,) = torch.autograd.grad(-objective, theta)
    torch.testing.assert_close(g, want, atol=1e-12, rtol=0)


def test_nashmp_loss_expected_gradient_is_the_exact_objective_gradient():
    """sum_y pi(y) grad nashmp_loss(y) = grad[-P(pi > pi_k) + beta KL(pi||ref) + beta/eta KL(pi||pi_k)]."""
    k, beta, eta = 4, 0.2, 0.5
    A = torch.rand(k, k, dtype=D)
    A = torch.triu(A, 1) + torch.tril(1 - A.T, -1) + 0.5 * torch.eye(k, dtype=D)
    theta = rand(k).requires_grad_(True)
    log_pi = torch.log_softmax(theta, -1)
    log_ref, log_k = torch.log_softmax(rand(k), -1), torch.log_softmax(rand(k), -1)
    g_k = A @ log_k.exp()  # P(y > pi_k)
    baseline = torch.full((k,), 0.37, dtype=D)  # any baseline leaves the expected gradient unchanged
    per = losses.nashmp_loss(log_pi, g_k, baseline, log_ref, log_k, beta, eta)
    (g,) = torch.autograd.grad((log_pi.exp().detach() * per).sum(), theta, retain_graph=True)
    p = log_pi.exp()
    exact = -(p * g_k).sum() + beta * (p * (log_pi - log_ref)).sum() + beta / eta * (p * (log_pi - log_k)).sum()
    (want,) = torch.autograd.grad(exact, theta)
    torch.testing.assert_close(g, want, atol=1e-12, rtol=0)


def test_losses_are_differentiable_and_batched_for_every_sample():
    """No loss mixes examples: the gradient of loss[i] touches only input i."""
    B, eta = 4, 0.5
    x = [rand(B).requires_grad_(True) for _ in range(4)]
    for loss in (losses.dpo_loss(*x, eta), losses.ipo_loss(*x, eta)):
        (g,) = torch.autograd.grad(loss[2], x[0])
        assert g[2] != 0 and torch.count_nonzero(g) == 1
