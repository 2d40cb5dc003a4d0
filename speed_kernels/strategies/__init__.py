"""Time-step strategies as tables.

Every strategy is, for a :class:`~speed_kernels.schedules.NoiseSchedule` of T steps, two float64
tables on the host:

- ``probs(schedule, step=0)``: the distribution each drawn t follows (before any mirroring);
- ``weights(schedule, prediction="eps")``: the loss weight of a sample at t, on the MSE of the
  prediction target ("eps", "v" or "x0").

Conventions for the prediction target. A weight of 1 (uniform, the re-sampling strategies,
importance sampling) means the plain MSE of whatever target is trained. Weightings published as a
formula on the ε MSE (P2, SpeeD v1's P2 weights) give for "v" and "x0" the *same objective*
expressed on the target's MSE: for a fixed x_t, ‖x0̂ - x0‖² = ‖ε̂ - ε‖²/SNR_t and
‖v̂ - v‖² = ‖ε̂ - ε‖²/ᾱ_t, so w_x0 = w_ε·SNR_t and w_v = w_ε·ᾱ_t (= w_ε·SNR_t/(1 + SNR_t)).
Min-SNR's three published forms follow this rule; EDM's λ(σ) is converted from the x0 error the
same way. SpeeD (both variants) keeps the same table for every target, as its official code does
for x0 (its CAW multiplies whatever MSE the model is trained on).

Registry: :func:`get` (unknown name → ``ValueError`` listing the known names), :func:`names`,
:func:`combine` (sampling table of one strategy, weighting table of another). ``get("a+b")`` is
``combine(get("a"), get("b"))``.

Families, a module each: ``base`` (the contract, checks, mirroring, :class:`Combined`, the
registry), ``fixed`` (tables of the schedule alone), ``loss_aware`` (importance, adaptive: learn
from the losses on the host), ``learned`` (gradvar, uncertainty: state on the loss's device, updated
in place, no host sync per step).
"""

from __future__ import annotations

from speed_kernels.strategies.base import (PREDICTIONS, Combined, Strategy, Uniform, combine, effective_probs, factory,
                                           get, mirror_probs, names, register)
from speed_kernels.strategies.fixed import CLTS, P2, LogitNormal, LogNormal, MinSNR, SpeeD, SpeeDV1, speed_caw
from speed_kernels.strategies.learned import GradVar, Uncertainty
from speed_kernels.strategies.loss_aware import Adaptive, Importance

for _cls in (Uniform, SpeeD, P2, MinSNR, LogNormal, CLTS, LogitNormal, Importance, SpeeDV1, Adaptive, GradVar,
             Uncertainty):
    register(_cls.name, _cls)

__all__ = ["Strategy", "get", "factory", "names", "combine", "register", "mirror_probs", "effective_probs", "PREDICTIONS",
           "Combined", "Uniform", "SpeeD", "SpeeDV1", "P2", "MinSNR", "LogNormal", "CLTS", "LogitNormal", "Importance",
           "Adaptive", "GradVar", "Uncertainty", "speed_caw"]
