"""The preference-training loop: setup, loop, cleanup, top to bottom.

Inputs are pair rows (``models.records.Pair`` plus ``ref_chosen_logp`` / ``ref_rejected_logp``
filled in by ``reference_logps`` in a batched no-grad pass of the round's starting policy),
so no reference model sits in memory during training.

Losses are called as ``loss_fn(policy: PairLogps, reference: PairLogps, batch)`` where
``batch`` holds ``index`` (pair indices), ``score_chosen`` and ``score_rejected`` ([B] tensors).

Each pair's image and prompt run once; chosen and rejected continue from the shared prefix's
KV cache (``pair_logps``), the loss is averaged over pairs, AdamW with linear warm-up and
cosine decay.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from models.logprobs import (
    EncodedPrompt,
    checkpointing_drops_cache,
    collate,
    collate_shared,
    completion_ids,
    encode_prompt,
    sequence_logps,
    shared_prefix_logps,
)
from models.losses import PairLogps
from models.progress import Progress
from models.records import message_text


@dataclass
class EncodedPair:
    prompt: EncodedPrompt
    chosen: list[int]
    rejected: list[int]


def encode_pairs(processor, pairs: list[dict], max_length: int) -> tuple[list[EncodedPair], list[int], int]:
    """Tokenise pairs once; returns (encoded, indices kept, number dropped as over-long).

    Over-long pairs are dropped, never truncated: cutting a sequence could cut inside the
    image tokens or remove the response the preference is about."""
    encoded, kept, dropped = [], [], 0
    for i, pair in enumerate(pairs):
        prompt = encode_prompt(processor, pair["prompt"], list(pair["images"] or []))
        chosen = completion_ids(processor.tokenizer, message_text(pair["chosen"]))
        rejected = completion_ids(processor.tokenizer, message_text(pair["rejected"]))
        if len(prompt.ids) + max(len(chosen), len(rejected)) > max_length:
            dropped += 1
            continue
        encoded.append(EncodedPair(prompt, chosen, rejected))
        kept.append(i)
    return encoded, kept, dropped


def pair_logps(model, batch: list[EncodedPair], pad_id: int, shared_prefix: bool = True) -> PairLogps:
    """Policy log-probs of chosen and rejected for a batch of B pairs (fields [B]).

    ``shared_prefix=True``: the image and prompt of each pair run once, chosen and rejected
    continue from their KV cache (``models.logprobs.shared_prefix_logps``).
    ``shared_prefix=False``: [chosen; rejected] run as 2B full sequences (TRL's layout; kept for
    comparison and parity tests; also used automatically under activation checkpointing, which
    disables the KV cache). Both give the same sums and counts."""
    device = next(model.parameters()).device
    if shared_prefix and not checkpointing_drops_cache(model):
        shared = collate_shared([p.prompt for p in batch], [[p.chosen, p.rejected] for p in batch], pad_id)
        logps, ntok = shared_prefix_logps(model, shared.to(device))
        return PairLogps(logps[:, 0], logps[:, 1], ntok[:, 0], ntok[:, 1])
    prompts = [p.prompt for p in batch] * 2
    completions = [p.chosen for p in batch] + [p.rejected for p in batch]
    logps, ntok = sequence_logps(model, collate(prompts, completions, pad_id).to(device))
    B = len(batch)
    return PairLogps(logps[:B], logps[B:], ntok[:B], ntok[B:])


def reference_logps(model, processor, encoded: list[EncodedPair], batch_size: int) -> tuple[list[float], list[float]]:
    """Summed log-probs of chosen and rejected under ``model`` (the round's starting policy),
    in a batched pass under ``torch.inference_mode`` with the shared-prefix engine."""
    model.eval()
    chosen, rejected = [], []
    progress = Progress("reference log-probs", len(encoded), unit="pairs")
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            out = pair_logps(model, encoded[start : start + batch_size], processor.tokenizer.pad_token_id)
            chosen += out.chosen.tolist()
            rejected += out.rejected.tolist()
            progress.update(len(encoded[start : start + batch_size]))
    return chosen, rejected


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_pairs(model, processor, pairs: list[dict], loss_fn, cfg: dict, seed: int) -> list[dict]:
    """Train ``model`` in place on ``pairs``; returns one metrics dict per optimizer step.

    cfg keys: lr, weight_decay, epochs, batch_size, grad_accum, warmup_ratio, max_grad_norm,
    max_length, max_steps (0 = epochs decide)."""
    # --- setup
    torch.manual_seed(seed)
    encoded, kept, _ = encode_pairs(processor, pairs, cfg["max_length"])
    ref_chosen = torch.tensor([pairs[i]["ref_chosen_logp"] for i in kept])
    ref_rejected = torch.tensor([pairs[i]["ref_rejected_logp"] for i in kept])
    score_chosen = torch.tensor([float(pairs[i]["score_chosen"]) for i in kept])
    score_rejected = torch.tensor([float(pairs[i]["score_rejected"]) for i in kept])
    pad_id = processor.tokenizer.pad_token_id
    device = next(model.parameters()).device
    micro = cfg["batch_size"] // cfg["grad_accum"]
    if micro < 1 or cfg["batch_size"] % cfg["grad_accum"]:
        raise ValueError(f"train.batch_size={cfg['batch_size']} must be a multiple of train.grad_accum={cfg['grad_accum']}")
    steps_per_epoch = math.ceil(len(encoded) / cfg["batch_size"])
    total = cfg["max_steps"] or steps_per_epoch * cfg["epochs"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total, max(1, int(cfg["warmup_ratio"] * total)))
    )
    rng = random.Random(seed)
    order: list[int] = []
    history: list[dict] = []
    progress = Progress("train", total, unit="steps")
    model.train()

    # --- loop
    for step in range(total):
        if len(order) < cfg["batch_size"]:
            order += rng.sample(range(len(encoded)), len(encoded))
        batch_idx, order = order[: cfg["batch_size"]], order[cfg["batch_size"] :]
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for start in range(0, len(batch_idx), micro):
            idx = batch_idx[start : start + micro]
            policy = pair_logps(model, [encoded[i] for i in idx], pad_id)
            reference = PairLogps(ref_chosen[idx].to(device), ref_rejected[idx].to(device),
                                  policy.chosen_tokens, policy.rejected_tokens)
            extras = {"index": idx, "score_chosen": score_chosen[idx].to(device),
                      "score_rejected": score_rejected[idx].to(device)}
            loss, metrics = loss_fn(policy, reference, extras)
            (loss.sum() / len(batch_idx)).backward()
            for name, value in {"loss": loss.mean(), **metrics}.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) * len(idx) / len(batch_idx)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        record = {"step": step, **sums, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]}
        history.append(record)
        progress.update(1, loss=record["loss"])

    # --- cleanup
    model.eval()
    return history
