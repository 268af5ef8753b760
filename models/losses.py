"""Preference losses. Each is a small callable selected from conf/loss/*.yaml by ``_target_``.

Every loss is called as ``loss_fn(policy, reference, batch)``:

- ``policy`` / ``reference``: ``PairLogps`` (summed log-probs of the chosen and rejected
  responses, each [B]; see its docstring for the optional extra negatives),
- ``batch``: the batch's extra columns: ``index`` (pair indices), ``score_chosen`` and
  ``score_rejected`` ([B] tensors),

and returns ``(per_pair_loss [B], metrics)``; metrics are detached scalar tensors. The trainer
averages the per-pair loss over pairs.

Reported rewards follow TRL's convention for every loss, so runs stay comparable: the implicit
reward r = beta * (log pi(y|x) - log ref(y|x)) with *summed* log-probs, also for losses that
compute their objective on length-normalised log-probs (``rewards/chosen``, ``rewards/rejected``,
``rewards/margin``, ``rewards/accuracy``).

A loss with state (BCO's running reward shift, or a mix containing it) has ``state_dict()`` and
``load_state_dict()``; stateless losses have neither. The trainer saves the state with its
checkpoint when ``hasattr(loss_fn, "state_dict")``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    """Log-probs of a batch of B pairs under one model (the policy or the reference).

    chosen, rejected:        [B] log pi(y | x) summed over the response tokens.
    chosen_tokens,
    rejected_tokens:         [B] number of response tokens (for length-normalised losses).
    rejected_extra:          optional [B, N] summed log-probs of up to N further rejected
                             responses of the same prompt (multi-negative losses; SeVa eq. 18).
                             None when the batch has no extra negatives. Rows with fewer than N
                             extras are padded; padded entries may hold any finite value.
    rejected_extra_mask:     optional [B, N] bool, True where ``rejected_extra`` holds a real
                             response, False for padding. None means every entry is real.

    Contract for the extras (what the trainer must fill): the policy's and the reference's
    ``rejected_extra`` have the same [B, N] shape and the same order of negatives; the mask
    is read from the policy's ``PairLogps`` (the reference's may be None). The primary
    ``rejected`` is always a real negative, so each pair has 1 + mask.sum(1) negatives.
    Losses that do not use extras ignore these fields.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    rejected_extra: torch.Tensor | None = None
    rejected_extra_mask: torch.Tensor | None = None


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
    }


def log_ratios(policy: PairLogps, reference: PairLogps, length_normalise: bool = False):
    """(log pi(y_w) - log ref(y_w), log pi(y_l) - log ref(y_l)), each [B].

    With ``length_normalise`` each ratio is divided by its response's token count (the mean
    per-token log-ratio, as TRL's ``ipo`` and ``sigmoid_norm``; counts clamped to >= 1)."""
    chosen = policy.chosen - reference.chosen
    rejected = policy.rejected - reference.rejected
    if length_normalise:
        chosen = chosen / policy.chosen_tokens.clamp(min=1)
        rejected = rejected / policy.rejected_tokens.clamp(min=1)
    return chosen, rejected


def pair_rewards(beta: float, policy: PairLogps, reference: PairLogps) -> dict:
    """The reward metrics (summed log-probs, see the module docstring)."""
    chosen, rejected = log_ratios(policy, reference)
    return reward_metrics(beta * chosen, beta * rejected)


@dataclass
class DPOLoss:
    """Sigmoid DPO (Rafailov et al. 2023, eq. 7); TRL ``loss_type="sigmoid"``. Shapes [B] -> [B].

        L = -log sigmoid(beta * z),  z = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))

    ``length_normalise`` uses mean per-token log-ratios (TRL's ``sigmoid_norm``)."""

    beta: float = 0.1
    length_normalise: bool = False

    def __call__(self, policy: PairLogps, reference: PairLogps, batch: dict | None = None):
        chosen, rejected = log_ratios(policy, reference, self.length_normalise)
        loss = -F.logsigmoid(self.beta * (chosen - rejected))
        return loss, pair_rewards(self.beta, policy, reference)


@dataclass
class IPOLoss:
    """IPO (Azar et al. 2023, eq. 17); TRL ``loss_type="ipo"``. Shapes [B] -> [B].

        L = (z - 1 / (2 * beta))^2     (beta is the paper's tau)

    z is computed on mean per-token log-ratios by default (``length_normalise=True``): the paper
    writes sequence log-likelihoods, but with summed log-probs the squared loss grows with
    response length; TRL normalises per token after confirming it with the authors."""

    beta: float = 0.1
    length_normalise: bool = True

    def __call__(self, policy: PairLogps, reference: PairLogps, batch: dict | None = None):
        chosen, rejected = log_ratios(policy, reference, self.length_normalise)
        loss = (chosen - rejected - 1 / (2 * self.beta)) ** 2
        return loss, pair_rewards(self.beta, policy, reference)


def check_label_noise(name: str, eps: float) -> None:
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"{name}: label_smoothing must lie in [0, 0.5) (a flip rate), got {eps}")


@dataclass
class CDPOLoss:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): DPO against
    labels smoothed by a flip rate eps. Shapes [B] -> [B].

        L = -(1 - eps) * log sigmoid(beta * z) - eps * log sigmoid(-beta * z)"""

    beta: float = 0.1
    label_smoothing: float = 0.1
    length_normalise: bool = False

    def __post_init__(self):
        check_label_noise("cdpo", self.label_smoothing)

    def __call__(self, policy: PairLogps, reference: PairLogps, batch: dict | None = None):
        chosen, rejected = log_ratios(policy, reference, self.length_normalise)
        logits, eps = self.beta * (chosen - rejected), self.label_smoothing
        loss = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        return loss, pair_rewards(self.beta, policy, reference)


@dataclass
class RobustDPOLoss:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO": the unbiased rDPO loss under a
    label-flip rate eps); TRL ``loss_type="robust"``. Shapes [B] -> [B].

        L = ((1 - eps) * -log sigmoid(beta * z) + eps * log sigmoid(-beta * z)) / (1 - 2 * eps)"""

    beta: float = 0.1
    label_smoothing: float = 0.1
    length_normalise: bool = False

    def __post_init__(self):
        check_label_noise("robust", self.label_smoothing)

    def __call__(self, policy: PairLogps, reference: PairLogps, batch: dict | None = None):
        chosen, rejected = log_ratios(policy, reference, self.length_normalise)
        logits, eps = self.beta * (chosen - rejected), self.label_smoothing
        loss = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
        return loss, pair_rewards(self.beta, policy, reference)


@dataclass
class HingeLoss:
    """Hinge loss of SLiC (Zhao et al. 2023) / RSO (Liu et al. 2023, MPO's Table 6), margin
    1/beta in log-ratio units; TRL ``loss_type="hinge"``. Shapes [B] -> [B].

        L = max(0, 1 - beta * z)"""

    beta: float = 0.1
    length_normalise: bool = False

    def __call__(self, policy: PairLogps, reference: PairLogps, batch: dict | None = None):
        chosen, rejected = log_ratios(policy, reference, self.length_normalise)
        loss = torch.relu(1 - self.beta * (chosen - rejected))
        return loss, pair_rewards(self.beta, policy, reference)


# Monotone increasing maps g0 for Score-DPO; g = score_scale * g0. Scores are in [0, 1];
# ``log`` and ``logit`` clamp them to [eps, 1 - eps] first (``log`` to [eps, inf)).
SCORE_MAPS = {
    "identity": lambda s, eps: s,
    "sqrt": lambda s, eps: s.clamp(min=0).sqrt(),
    "log": lambda s, eps: s.clamp(min=eps).log(),
    "logit": lambda s, eps: torch.logit(s.clamp(eps, 1 - eps)),
}


@dataclass
class SDPOLoss:
    """Score-DPO (UV-CoT, eq. 2). Shapes: log-probs and scores [B] -> [B].

        L = -log sigmoid(beta * z - (g(s_w) - g(s_l))),   g = score_scale * score_map

    s_w, s_l are ``batch["score_chosen"]`` / ``batch["score_rejected"]``. The paper requires g
    monotone increasing but does not fix it (and the released code never implements it), so
    ``score_map`` is one of SCORE_MAPS (identity, sqrt, log, logit: all increasing) and
    ``score_scale`` >= 0; score_scale = 0 recovers plain DPO (the paper's "w/ naive DPO")."""

    beta: float = 0.1
    score_map: str = "identity"
    score_scale: float = 1.0
    score_eps: float = 1e-6  # clamp for log / logit
    length_normalise: bool = False

    def __post_init__(self):
        if self.score_map not in SCORE_MAPS:
            raise ValueError(f"sdpo: score_map={self.score_map!r} is not a known monotone increasing map; "
                             f"choose one of {sorted(SCORE_MAPS)}")
        if self.score_scale < 0:
            raise ValueError(f"sdpo: score_scale must be >= 0 so that g stays increasing, got {self.score_scale}")

    def g(self, scores: torch.Tensor) -> torch.Tensor:
        return self.score_scale * SCORE_MAPS[self.score_map](scores, self.score_eps)

    def __call__(self, policy: PairLogps, reference: PairLogps, batch: dict):
        if "score_chosen" not in batch or "score_rejected" not in batch:
            raise KeyError("sdpo needs batch['score_chosen'] and batch['score_rejected'] ([B] tensors)")
        chosen, rejected = log_ratios(policy, reference, self.length_normalise)
        s_w = torch.as_tensor(batch["score_chosen"], dtype=chosen.dtype, device=chosen.device)
        s_l = torch.as_tensor(batch["score_rejected"], dtype=chosen.dtype, device=chosen.device)
        margin = self.g(s_w) - self.g(s_l)
        loss = -F.logsigmoid(self.beta * (chosen - rejected) - margin)
        return loss, {**pair_rewards(self.beta, policy, reference), "sdpo/score_margin": margin.detach().mean()}


def bco_terms(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, delta) -> torch.Tensor:
    """-log sigmoid(r_w - delta) - log sigmoid(-(r_l - delta)), each [B] -> [B]."""
    return -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))


@dataclass
class BCOPairLoss:
    """BCO's pair form without reward shift, exactly TRL 1.x's ``loss_type="bco_pair"``
    (delta = 0). Shapes [B] -> [B]. For parity checks; MPO's quality loss is ``BCOLoss``.

        L = -log sigmoid(beta * r_w) - log sigmoid(-beta * r_l),  r = log pi - log ref"""

    beta: float = 0.1

    def __call__(self, policy: PairLogps, reference: PairLogps, batch: dict | None = None):
        chosen, rejected = log_ratios(policy, reference)
        return bco_terms(self.beta * chosen, self.beta * rejected, 0.0), pair_rewards(self.beta, policy, reference)


@dataclass
class BCOLoss:
    """BCO (Jung et al. 2024) as MPO's quality loss (MPO eqs. 5-7). Shapes [B] -> [B].

        L = -log sigmoid(beta * r_w - delta) - log sigmoid(-(beta * r_l - delta)),  r = log pi - log ref

    delta is the reward shift: the running (cumulative) mean of the batch-mean rewards, where a
    batch's mean is taken over its 2B rewards {beta * r_w} u {beta * r_l} (detached). It starts
    at 0 and, as in TRL 0.x's DPO ``bco_pair`` (``RunningMoments``; InternVL's MPO recipe pins
    trl==0.10.1), it is updated with the current batch BEFORE the loss is computed:

        count += 1;  delta += (mean(batch rewards) - delta) / count

    so every call counts one batch (a micro-batch under gradient accumulation), each weighted
    equally. TRL 1.x's ``bco_pair`` dropped the shift (see ``BCOPairLoss``). Every call updates
    the shift, evaluation included; the trainer should only call it on training batches.

    State: ``state_dict() -> {"delta": float, "count": int}`` (plain, JSON-serialisable) and
    ``load_state_dict(state)``; save it with the checkpoint to resume the same shift."""

    beta: float = 0.1

    def __post_init__(self):
        self.delta, self.count = 0.0, 0

    def __call__(self, policy: PairLogps, reference: PairLogps, batch: dict | None = None):
        chosen, rejected = log_ratios(policy, reference)
        chosen_rewards, rejected_rewards = self.beta * chosen, self.beta * rejected
        batch_mean = float(torch.cat([chosen_rewards, rejected_rewards]).detach().mean())
        self.count += 1
        self.delta += (batch_mean - self.delta) / self.count
        loss = bco_terms(chosen_rewards, rejected_rewards, self.delta)
        metrics = {**reward_metrics(chosen_rewards, rejected_rewards), "bco/delta": torch.tensor(self.delta)}
        return loss, metrics

    def state_dict(self) -> dict:
        return {"delta": self.delta, "count": self.count}

    def load_state_dict(self, state: Mapping) -> None:
        self.delta, self.count = float(state["delta"]), int(state["count"])


SFT_REDUCTIONS = ("mean", "sum", "token_mean")


@dataclass
class SFTLoss:
    """Generation (SFT) loss: NLL of the chosen response (MPO eq. 8). Shapes [B] -> [B].

    reduction:
      mean        -log pi(y_w) / |y_w|: mean per-token NLL of each response (MPO paper, default).
      sum         -log pi(y_w): summed NLL (UV-CoT's released code).
      token_mean  -log pi(y_w) * B / sum_b |y_b|: the batch's tokens pooled, so the pair mean is
                  sum NLL / sum tokens (TRL 1.x's ``loss_type="sft"``); pooled per call, i.e.
                  per micro-batch.

    Rewards are reported as raw log-ratios (SFT has no beta)."""

    reduction: str = "mean"

    def __post_init__(self):
        if self.reduction not in SFT_REDUCTIONS:
            raise ValueError(f"sft: reduction={self.reduction!r}; choose one of {list(SFT_REDUCTIONS)}")

    def __call__(self, policy: PairLogps, reference: PairLogps, batch: dict | None = None):
        nll = -policy.chosen
        if self.reduction == "mean":
            loss = nll / policy.chosen_tokens.clamp(min=1)
        elif self.reduction == "sum":
            loss = nll
        else:
            loss = nll / policy.chosen_tokens.float().mean().clamp(min=1)
        return loss, pair_rewards(1.0, policy, reference)


@dataclass
class MultiNegativeDPOLoss:
    """Multi-negative DPO (SeVa appendix, eq. 18): one chosen against the set Y_r of rejected
    responses = the primary ``rejected`` plus the real entries of ``rejected_extra``.
    Shapes: [B] and [B, N] log-probs -> [B].

        eq. 18 (default):  L = -log sigmoid(beta * r_w - sum_{y in Y_r} beta * r_y)
        softmax=True:      L = -log [exp(beta r_w) / (exp(beta r_w) + sum_{y in Y_r} exp(beta r_y))]
                           (the likelihood of eq. 16 itself, InfoNCE / Plackett-Luce top-1)

    r = log pi - log ref. With no extras (or all masked) both equal DPO. Eq. 18 is the paper's
    printed objective; note that its rejected term grows with |Y_r|."""

    beta: float = 0.1
    softmax: bool = False

    def __call__(self, policy: PairLogps, reference: PairLogps, batch: dict | None = None):
        chosen, rejected = log_ratios(policy, reference)
        negatives, mask = rejected[:, None], torch.ones_like(rejected, dtype=torch.bool)[:, None]
        metrics = pair_rewards(self.beta, policy, reference)
        if policy.rejected_extra is not None:
            if reference.rejected_extra is None or reference.rejected_extra.shape != policy.rejected_extra.shape:
                raise ValueError("multi_negative_dpo: reference.rejected_extra must match policy.rejected_extra [B, N]")
            extra = policy.rejected_extra - reference.rejected_extra
            extra_mask = (policy.rejected_extra_mask if policy.rejected_extra_mask is not None
                          else torch.ones_like(extra, dtype=torch.bool))
            negatives, mask = torch.cat([negatives, extra], 1), torch.cat([mask, extra_mask.bool()], 1)
            if extra_mask.any():
                metrics["rewards/rejected_extra"] = (self.beta * extra.detach())[extra_mask.bool()].mean()
        metrics["multi/negatives"] = mask.float().sum(1).mean()
        if self.softmax:
            logits = torch.cat([chosen[:, None], negatives.masked_fill(~mask, -math.inf)], 1) * self.beta
            loss = -(self.beta * chosen - torch.logsumexp(logits, dim=1))
        else:
            loss = -F.logsigmoid(self.beta * chosen - self.beta * torch.where(mask, negatives, 0.0).sum(1))
        return loss, metrics


@dataclass
class Weighted:
    """One term of a mix: ``weight * loss(policy, reference, batch)``."""

    weight: float = 1.0
    loss: Any = None  # a loss callable; in a config, a loss node with its own _target_


def as_component(name: str, part) -> Weighted:
    """A mix component from a ``Weighted`` or a ``{weight, loss}`` mapping; a ValueError says
    what is wrong with it."""
    if isinstance(part, Mapping):
        unknown = set(part) - {"weight", "loss"}
        if unknown:
            raise ValueError(f"mpo: component {name!r} has unknown keys {sorted(unknown)}; "
                             "a component has exactly 'weight' and 'loss'")
        part = Weighted(**part)
    problem = None
    if not isinstance(part, Weighted):
        problem = f"must be {{weight, loss}}, got {type(part).__name__}"
    elif isinstance(part.loss, Mapping) or not callable(part.loss):
        problem = (f"has no instantiated loss (got {part.loss!r}); give loss a _target_ and build "
                   "the config with hydra.utils.instantiate")
    elif isinstance(part.weight, bool) or not isinstance(part.weight, int | float):
        problem = f"weight must be a number, got {part.weight!r}"
    if problem:
        raise ValueError(f"mpo: component {name!r} {problem}")
    return part


@dataclass
class MPOLoss:
    """Weighted mix of losses (MPO, eq. 3: L = w_p L_p + w_q L_q + w_g L_g). Shapes [B] -> [B].

        L = sum_k weight_k * L_k      (per pair; the trainer's pair mean makes it TRL's
                                       sum_k weight_k * mean(L_k), DPOConfig(loss_type=[...],
                                       loss_weights=[...]))

    ``components`` maps a name to ``Weighted(weight, loss)`` (or a dict with exactly the keys
    ``weight`` and ``loss``); in a config each component's ``loss`` is a node with its own
    ``_target_`` that Hydra instantiates recursively (conf/loss/mpo.yaml).

    Metrics: ``loss/<name>`` (each component's pair-mean loss, unweighted), the reward metrics
    of the first component, and every other metric of each component unchanged (``bco/delta``).
    State: ``state_dict() -> {name: component state}`` for components that have state."""

    components: dict[str, Weighted] = field(default_factory=dict)

    def __post_init__(self):
        if not self.components:
            raise ValueError("mpo: components is empty; give at least one {name: {weight, loss}}")
        self.components = {name: as_component(name, part) for name, part in self.components.items()}

    def __call__(self, policy: PairLogps, reference: PairLogps, batch: dict | None = None):
        total, metrics, rewards = 0.0, {}, None
        for name, part in self.components.items():
            loss, part_metrics = part.loss(policy, reference, batch)
            total = total + part.weight * loss
            metrics[f"loss/{name}"] = loss.detach().mean()
            if rewards is None:
                rewards = {k: v for k, v in part_metrics.items() if k.startswith("rewards/")}
            metrics.update({k: v for k, v in part_metrics.items() if not k.startswith("rewards/")})
        return total, {**(rewards or {}), **metrics}

    def state_dict(self) -> dict:
        return {name: part.loss.state_dict() for name, part in self.components.items()
                if hasattr(part.loss, "state_dict")}

    def load_state_dict(self, state: Mapping) -> None:
        for name, part_state in state.items():
            if name not in self.components or not hasattr(self.components[name].loss, "load_state_dict"):
                raise ValueError(f"mpo: saved state for component {name!r}, which this mix has no stateful loss for")
            self.components[name].loss.load_state_dict(part_state)
