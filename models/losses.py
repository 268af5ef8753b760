"""Preference losses. Each is a small callable selected from conf/loss/*.yaml by ``_target_``.

Every loss takes the policy's and the reference's summed log-probs of the chosen and
rejected responses (``PairLogps``, each field shape [B]) plus the batch's extra columns,
and returns ``(per_pair_loss [B], metrics)`` where metrics are scalar tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    chosen: torch.Tensor  # [B] summed log pi(y_w | x)
    rejected: torch.Tensor  # [B] summed log pi(y_l | x)
    chosen_tokens: torch.Tensor  # [B] number of completion tokens of y_w
    rejected_tokens: torch.Tensor  # [B]


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
    }


@dataclass
class DPOLoss:
    """Sigmoid DPO (Rafailov et al. 2023, eq. 7):

        L = -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])

    Implicit rewards r = beta * (log pi - log ref) are reported per response.
    """

    beta: float = 0.1

    def __call__(self, policy: PairLogps, reference: PairLogps, batch: dict | None = None):
        chosen_ratio = policy.chosen - reference.chosen
        rejected_ratio = policy.rejected - reference.rejected
        loss = -F.logsigmoid(self.beta * (chosen_ratio - rejected_ratio))
        metrics = reward_metrics(self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach())
        return loss, metrics
