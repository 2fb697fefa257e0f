"""The opponents an algorithm's samples also play against (comal.Algorithm.opponent), each kind in one place.

An Opponent says everything the loop, the trainer, checkpoints, bench/plan.py and toy_game.py need:
    copy       the frozen copy of the policy the run keeps for it: None, "compute" (the compute dtype) or
               "float32"; it is loaded from the base, saved as opponent/ in every checkpoint, counted by the
               memory plan. None: nothing is loaded or saved.
    sampler    (state, h) -> what generate() samples the opponent's n responses from: its copy, or a
               sample.Mixture of the run's models (state: policy, ref, opponent).
    logps      whether its copy's log-probs are computed for the loss (Batch.opp).
    rollout_models  how many models its sampler runs at once: their weights are gathered together under
               parallel: fsdp, and each holds a KV cache (bench/plan.py counts both).
    keys       the config keys it reads (the spec must declare them); needs_ref: it mixes in pi_ref.
    before_training(trainer, state, h)  after the iteration's rollout, before its optimizer steps.
    after_step(trainer, state, h)       after every optimizer step.
    start(log_pi, log_ref, h) -> (log_opp, memory)            the same opponent on the logits table
    tabular(log_old, log_new, log_ref, memory, h) -> (log_opp, memory)   (toy_game.py): at the first
               iteration, and after each step from log_old to log_new.
"""
from dataclasses import dataclass
from typing import Callable

import torch

from sample import Mixture


@dataclass(frozen=True)
class Opponent:
    start: Callable
    tabular: Callable
    sampler: Callable
    copy: str = None
    logps: bool = False
    keys: tuple = ()
    needs_ref: bool = False
    rollout_models: int = 1
    before_training: Callable = None
    after_step: Callable = None
    doc: str = ""


def geometric_mixture(log_pi, log_ref, beta):
    """log of pi^(1 - beta) pi_ref^beta, normalised (Nash-MD's opponent)."""
    return torch.log_softmax((1 - beta) * log_pi + beta * log_ref, -1)


def ema_tabular(log_old, log_new, log_ref, target, h):
    target = h.kappa * log_new + (1 - h.kappa) * target  # the EMA of the logits, as of the weights
    return torch.log_softmax(target, -1), target


OPPONENTS = {
    "none": None,
    "prev": Opponent(  # OMWU: pi^{k-1}, copied from pi^k after the rollout, before pi^k is updated
        start=lambda log_pi, log_ref, h: (log_pi, None),
        tabular=lambda log_old, log_new, log_ref, memory, h: (log_old, None),
        sampler=lambda state, h: state["opponent"], copy="compute", logps=True,
        before_training=lambda trainer, state, h: trainer.copy_weights(state["opponent"], state["policy"]),
        doc="the previous iterate pi^{k-1}"),
    "ema": Opponent(  # NashMP's target network: target <- kappa pi + (1 - kappa) target after every step
        start=lambda log_pi, log_ref, h: (log_pi, log_pi.clone()),
        tabular=ema_tabular,
        sampler=lambda state, h: state["opponent"], copy="float32", logps=True, keys=("kappa",),  # fp32: small steps add up
        after_step=lambda trainer, state, h: trainer.ema_weights(state["opponent"], state["policy"], h.kappa),
        doc="an EMA of the policy's weights"),
    "mixture": Opponent(  # Nash-MD: no model of its own; sampled token by token from the mixed logits
        start=lambda log_pi, log_ref, h: (geometric_mixture(log_pi, log_ref, h.beta), None),
        tabular=lambda log_old, log_new, log_ref, memory, h: (geometric_mixture(log_new, log_ref, h.beta), None),
        sampler=lambda state, h: Mixture([state["policy"], state["ref"]], [1 - h.beta, h.beta]), keys=("beta",),
        needs_ref=True, rollout_models=2,
        doc="the geometric mixture pi^(1 - beta) pi_ref^beta"),
}


def models_of(sampler):
    """The models a sampler runs (to gather them under sharding)."""
    return sampler.models if isinstance(sampler, Mixture) else [sampler]
