"""GRPO: group-relative advantages, the clipped importance-ratio objective with a k3 KL penalty,
and the training loop on rollout groups (DeepSeekMath; seeds/soft-rewards.txt, sec. 2.2).

For a prompt s, G rollouts a_1..a_G are sampled from the old policy pi_old with rewards r_i:

    A_i     = (r_i - mean(r)) / (std(r) + eps)                              (sec. 2.2.1)
    rho_i   = pi_theta(a_i | s) / pi_old(a_i | s)
    L_clip  = -1/G sum_i min(rho_i A_i, clip(rho_i, 1 - epsilon, 1 + epsilon) A_i)   (sec. 2.2.2)
    KL_i    = exp(q_i) - q_i - 1,   q_i = log pi_ref(a_i | s) - log pi_theta(a_i | s)  (k3, sec. 2.2.3)
    L       = L_clip + beta * 1/G sum_i KL_i

In PrefLoop the old policy and the reference are both the round's starting policy (its log-probs
of every rollout are computed once, in the pair stage, like DPO's reference log-probs), so no
second model sits in memory; ``train.epochs`` > 1 reuses the rollouts and the clip matters.

Departures, stated: the ratio and the KL are per *sequence* (the paper's formula uses
pi(a_i | s)), not per token as in DeepSeekMath's implementation; ``length_normalise`` divides
the sequence log-ratio by the number of sampled tokens (GSPO-style) for long free-text rollouts.
std is the unbiased group standard deviation with eps = 1e-4 (TRL's GRPOTrainer convention).

Two rollout policies (both: ``(model, groups) -> (logps [B, G], n_tokens [B, G])``):

- ``RatedRollouts``: the answer template "Score: " is forced (part of the prompt) and the rating
  is drawn from the softmax over the rating tokens only (at temperature T): the soft-reward
  distribution p(r | C) of sec. 3, so GRPO trains exactly what the soft evaluation reads. One
  forward per group: the G rollouts share their context.
- ``FreeRollouts``: free text (reasoning, then "Score: k"), summed full-vocabulary log-probs.

Shapes: B groups per batch, G rollouts per group, R rating tokens, V vocabulary.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from models.logprobs import EncodedPrompt, collate, sequence_logps
from models.progress import Progress
from models.trainer import optimizer_setup


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """[B, G] rewards -> [B, G] advantages (r - mean) / (std + eps), per group (G >= 2)."""
    if rewards.shape[-1] < 2:
        raise ValueError("group-normalised advantages need at least 2 rollouts per group")
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True)  # unbiased, as TRL
    return (rewards - mean) / (std + eps)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) from samples of pi_theta: exp(q) - q - 1,
    q = log pi_ref - log pi_theta. Non-negative, unbiased, zero where the two agree."""
    q = ref_logps - logps
    return torch.exp(q) - q - 1


@dataclass
class GRPOLoss:
    """Clipped-ratio GRPO loss with a k3 KL penalty (module docstring).

    Called as ``loss_fn(logps, old_logps, ref_logps, advantages, n_tokens)`` on [B, G] tensors
    (log-probs summed over each rollout's sampled tokens); returns the per-rollout loss [B, G]
    (the trainer averages it) and detached scalar metrics."""

    clip_eps: float = 0.2
    kl_beta: float = 0.04
    length_normalise: bool = False

    def __call__(self, logps, old_logps, ref_logps, advantages, n_tokens) -> tuple[torch.Tensor, dict]:
        scale = n_tokens.clamp(min=1).to(logps.dtype) if self.length_normalise else 1.0
        log_ratio = (logps - old_logps) / scale
        ratio = torch.exp(log_ratio)
        clipped = torch.clamp(ratio, 1 - self.clip_eps, 1 + self.clip_eps)
        surrogate = torch.minimum(ratio * advantages, clipped * advantages)
        kl = k3_kl(logps / scale, ref_logps / scale)
        loss = -surrogate + self.kl_beta * kl
        with torch.no_grad():
            metrics = {
                "kl": kl.mean(),
                "ratio": ratio.mean(),
                # where the clipped branch is active (its gradient is zero), as TRL's clip_ratio
                "clip_fraction": (((ratio < 1 - self.clip_eps) & (advantages < 0))
                                  | ((ratio > 1 + self.clip_eps) & (advantages > 0))).float().mean(),
                "surrogate": surrogate.mean(),
            }
        return loss, metrics


# --- the rollout policies ---------------------------------------------------------------------


@dataclass
class RolloutGroup:
    """One prompt's G rollouts, tokenised. ``prompt``: image + chat prompt (for rated rollouts
    followed by the forced answer prefix); ``completions``: the G token sequences that follow it
    (EOS included; for rated rollouts [rating token, EOS])."""

    prompt: EncodedPrompt
    completions: list[list[int]]


def split_last_token(tokenizer, texts: list[str]) -> tuple[list[int], list[int]]:
    """(shared context ids, one last token per text) for texts that tokenise to one common
    prefix plus one distinct final token each, e.g. "Score: 1" .. "Score: 5" -> ("Score:" ids,
    the ids of "1".."5" as they follow it). Raises ValueError when they do not."""
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    context = seqs[0][:-1]
    if any(s[:-1] != context for s in seqs) or len({s[-1] for s in seqs}) != len(seqs):
        raise ValueError(f"{texts} do not tokenise to a shared prefix plus one distinct final token each "
                         f"({seqs}); rated rollouts need single-token ratings")
    return context, [s[-1] for s in seqs]


def last_logits(model, prompts: list[EncodedPrompt], pad_id: int) -> torch.Tensor:
    """[B, V] next-token logits after each prompt (left padded, only the last position)."""
    batch = collate(prompts, [[] for _ in prompts], pad_id).to(next(model.parameters()).device)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                logits_to_keep=1, use_cache=False, **batch.vision)
    return out.logits[:, -1].float()


@dataclass
class RatedRollouts:
    """Rollouts = one rating token drawn from softmax(logits[rating_ids] / temperature) after the
    forced answer prefix; its log-prob is that restricted log-softmax (the prefix and the EOS
    after the rating are forced, log-prob 0). n_tokens = 1."""

    rating_ids: list[int]
    pad_id: int
    temperature: float = 1.0

    def rating_logits(self, model, prompts: list[EncodedPrompt]) -> torch.Tensor:
        """[B, R] logits of the rating tokens (not divided by the temperature)."""
        return last_logits(model, prompts, self.pad_id)[:, self.rating_ids]

    def __call__(self, model, groups: list[RolloutGroup]) -> tuple[torch.Tensor, torch.Tensor]:
        logps = (self.rating_logits(model, [g.prompt for g in groups]) / self.temperature).log_softmax(-1)
        index = {token: i for i, token in enumerate(self.rating_ids)}
        actions = torch.tensor([[index[c[0]] for c in g.completions] for g in groups], device=logps.device)
        return logps.gather(1, actions), torch.ones_like(actions)


@dataclass
class FreeRollouts:
    """Rollouts = free text sampled at temperature 1; summed full-vocabulary log-probs."""

    pad_id: int

    def __call__(self, model, groups: list[RolloutGroup]) -> tuple[torch.Tensor, torch.Tensor]:
        G = len(groups[0].completions)
        prompts = [g.prompt for g in groups for _ in g.completions]
        completions = [c for g in groups for c in g.completions]
        logps, n = sequence_logps(model, collate(prompts, completions, self.pad_id).to(next(model.parameters()).device))
        return logps.view(-1, G), n.view(-1, G)


def rollout_logps(model, groups: list[RolloutGroup], policy, batch_size: int) -> list[list[float]]:
    """Per-rollout log-probs [N][G] under ``model`` (the round's starting policy), no grad."""
    model.eval()
    out: list[list[float]] = []
    progress = Progress("old log-probs", len(groups), unit="groups")
    with torch.inference_mode():
        for start in range(0, len(groups), batch_size):
            logps, _ = policy(model, groups[start : start + batch_size])
            out += logps.tolist()
            progress.update(len(groups[start : start + batch_size]))
    return out


# --- the training loop ------------------------------------------------------------------------


def train_grpo(model, groups: list[RolloutGroup], old_logps: torch.Tensor, ref_logps: torch.Tensor,
               advantages: torch.Tensor, policy, loss_fn, cfg: dict, seed: int) -> list[dict]:
    """Train ``model`` in place on rollout groups; one metrics dict per optimizer step.

    old_logps, ref_logps, advantages: [N, G]. ``policy`` scores rollouts (RatedRollouts /
    FreeRollouts). A step takes ``cfg["batch_size"]`` groups (G rollouts each) in
    ``grad_accum`` micro-batches; the loss is the mean over the step's rollouts. cfg keys as
    ``models.trainer.train_pairs``: lr, weight_decay, epochs, batch_size, grad_accum,
    warmup_ratio, max_grad_norm, max_steps (0 = epochs decide)."""
    # --- setup
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    total = cfg["max_steps"] or math.ceil(len(groups) / cfg["batch_size"]) * cfg["epochs"]
    params, optimizer, scheduler, micro = optimizer_setup(model, cfg, total)
    rng = random.Random(seed)
    order: list[int] = []
    history: list[dict] = []
    progress = Progress("train grpo", total, unit="steps")
    model.train()

    # --- loop
    for step in range(total):
        if len(order) < cfg["batch_size"]:
            order += rng.sample(range(len(groups)), len(groups))
        batch_idx, order = order[: cfg["batch_size"]], order[cfg["batch_size"] :]
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for start in range(0, len(batch_idx), micro):
            idx = batch_idx[start : start + micro]
            logps, n_tokens = policy(model, [groups[i] for i in idx])
            loss, metrics = loss_fn(logps, old_logps[idx].to(device), ref_logps[idx].to(device),
                                    advantages[idx].to(device), n_tokens)
            (loss.sum() / loss.shape[1] / len(batch_idx)).backward()
            for name, value in {"loss": loss.detach().mean(), **metrics}.items():
                sums[name] = sums.get(name, 0.0) + float(value) * len(idx) / len(batch_idx)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        record = {"step": step, **sums, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]}
        history.append(record)
        progress.update(1, loss=record["loss"])

    # --- cleanup
    model.eval()
    return history
