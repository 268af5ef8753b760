"""The preference-training loop: setup, loop, cleanup, top to bottom.

Inputs are pair rows (``models.records.Pair`` plus ``ref_chosen_logp`` / ``ref_rejected_logp``
filled in by ``reference_logps`` in a batched no-grad pass of the round's starting policy),
so no reference model sits in memory during training.

Losses are called as ``loss_fn(policy: PairLogps, reference: PairLogps, batch)`` where
``batch`` holds ``index`` (pair indices), ``score_chosen`` and ``score_rejected`` ([B] tensors).

Each pair's image and prompt run once; chosen and rejected continue from the shared prefix's
KV cache (``pair_logps``), the loss is averaged over pairs, AdamW with linear warm-up and
cosine decay. Under ``accelerate launch`` each rank trains its share of every batch and the
step equals the single-process one (``models.data_parallel``).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.data_parallel import DataParallel
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
    extras: list[list[int]] = field(default_factory=list)  # further rejected (multi-negative)


def encode_pairs(processor, pairs: list[dict], max_length: int) -> tuple[list[EncodedPair], list[int], int]:
    """Tokenise pairs once; returns (encoded, indices kept, number dropped as over-long).

    Over-long pairs are dropped, never truncated: cutting a sequence could cut inside the
    image tokens or remove the response the preference is about."""
    encoded, kept, dropped = [], [], 0
    for i, pair in enumerate(pairs):
        prompt = encode_prompt(processor, pair["prompt"], list(pair["images"] or []))
        chosen = completion_ids(processor.tokenizer, message_text(pair["chosen"]))
        rejected = completion_ids(processor.tokenizer, message_text(pair["rejected"]))
        extras = [completion_ids(processor.tokenizer, text) for text in pair.get("rejected_extra") or []]
        if len(prompt.ids) + max(len(c) for c in (chosen, rejected, *extras)) > max_length:
            dropped += 1
            continue
        encoded.append(EncodedPair(prompt, chosen, rejected, extras))
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
    B, N = len(batch), max(len(p.extras) for p in batch)
    # Extra negatives (multi-negative pairs) ride along as further continuations; pairs with
    # fewer than N extras repeat their rejected response there and are masked out.
    rows = [[p.chosen, p.rejected, *p.extras, *[p.rejected] * (N - len(p.extras))] for p in batch]
    if shared_prefix and not checkpointing_drops_cache(model):
        shared = collate_shared([p.prompt for p in batch], rows, pad_id)
        logps, ntok = shared_prefix_logps(model, shared.to(device))  # [B, 2 + N]
    else:
        prompts = [p.prompt for p in batch] * (2 + N)
        completions = [row[k] for k in range(2 + N) for row in rows]
        flat, flat_n = sequence_logps(model, collate(prompts, completions, pad_id).to(device))
        logps, ntok = flat.view(2 + N, B).T, flat_n.view(2 + N, B).T
    extra = extra_mask = None
    if N:
        extra = logps[:, 2:]
        extra_mask = torch.tensor([[k < len(p.extras) for k in range(N)] for p in batch], device=device)
    return PairLogps(logps[:, 0], logps[:, 1], ntok[:, 0], ntok[:, 1], extra, extra_mask)


def reference_pass(model, processor, encoded: list[EncodedPair], batch_size: int):
    """Summed log-probs of chosen, rejected and extra rejected responses under ``model`` (the
    round's starting policy), in a batched pass under ``torch.inference_mode`` with the
    shared-prefix engine. Returns (chosen [P], rejected [P], extras [P][n_extras_i])."""
    model.eval()
    chosen, rejected, extras = [], [], []
    progress = Progress("reference log-probs", len(encoded), unit="pairs")
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            out = pair_logps(model, batch, processor.tokenizer.pad_token_id)
            chosen += out.chosen.tolist()
            rejected += out.rejected.tolist()
            for i, p in enumerate(batch):
                extras.append(out.rejected_extra[i, : len(p.extras)].tolist() if p.extras else [])
            progress.update(len(batch))
    return chosen, rejected, extras


def reference_logps(model, processor, encoded: list[EncodedPair], batch_size: int) -> tuple[list[float], list[float]]:
    """Reference log-probs of chosen and rejected (see ``reference_pass``)."""
    chosen, rejected, _ = reference_pass(model, processor, encoded, batch_size)
    return chosen, rejected


# train.optimizer's choices (flows/schema checks the name before any stage).
OPTIMIZERS = {
    "adamw": torch.optim.AdamW,
    "sgd": lambda params, **kw: torch.optim.SGD(params, momentum=0.9, **kw),
}


def optimizer_setup(model, cfg: dict, total_steps: int):
    """(trainable params, optimizer, warm-up + cosine LambdaLR, micro-batch size) from train cfg;
    shared by the preference trainer and GRPO (models/grpo.py). ``optimizer``: adamw (default) or
    sgd with momentum 0.9, whose steps scale with the gradient (flows/schema.TrainSchema)."""
    micro = cfg["batch_size"] // cfg["grad_accum"]
    if micro < 1 or cfg["batch_size"] % cfg["grad_accum"]:
        raise ValueError(f"train.batch_size={cfg['batch_size']} must be a multiple of train.grad_accum={cfg['grad_accum']}")
    params = [p for p in model.parameters() if p.requires_grad]
    name = cfg.get("optimizer", "adamw")
    if name not in OPTIMIZERS:
        raise ValueError(f"train.optimizer={name!r}: choose {' or '.join(OPTIMIZERS)}")
    optimizer = OPTIMIZERS[name](params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, max(1, int(cfg["warmup_ratio"] * total_steps)))
    )
    return params, optimizer, scheduler, micro


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _padded_reference(values: list[list[float]], idx: list[int], width: int) -> torch.Tensor:
    """[len(idx), width] reference log-probs of extra negatives, zero-padded (masked later)."""
    out = torch.zeros((len(idx), width))
    for row, i in enumerate(idx):
        out[row, : len(values[i])] = torch.tensor(values[i][:width])
    return out


def save_resume_state(path: Path, state: dict) -> None:
    """Write the resumable training state atomically (a kill mid-write leaves the old one)."""
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path / "state.pt")


def train_pairs(model, processor, pairs: list[dict], loss_fn, cfg: dict, seed: int,
                resume_dir: Path | None = None, on_step: Callable[[int], None] | None = None,
                parallel: DataParallel | None = None) -> list[dict]:
    """Train ``model`` in place on ``pairs``; returns one metrics dict per optimizer step.

    cfg keys: lr, weight_decay, epochs, batch_size, grad_accum, warmup_ratio, max_grad_norm,
    max_length, max_steps (0 = epochs decide), save_every (0 = never).

    With ``resume_dir`` and ``save_every`` > 0 the full training state (trainable weights,
    optimizer, schedule, loss state such as BCO's running delta, data order, RNG) is saved
    every ``save_every`` steps, and a later call with the same arguments continues from the
    last save: a killed training stage resumes with the same result as an uninterrupted one.
    ``on_step(step)`` is called after each optimizer step (progress hooks, tests).

    ``parallel``: one rank of a data-parallel run (``models.data_parallel``; None: the single
    process). Every rank draws the same batches from the same seed and trains its share; the
    history holds the global metrics on every rank, and only rank 0 writes mid-training saves."""
    # --- setup
    parallel = parallel or DataParallel()
    torch.manual_seed(seed)
    encoded, kept, _ = encode_pairs(processor, pairs, cfg["max_length"])
    ref_chosen = torch.tensor([pairs[i]["ref_chosen_logp"] for i in kept])
    ref_rejected = torch.tensor([pairs[i]["ref_rejected_logp"] for i in kept])
    ref_extra = [list(pairs[i].get("ref_rejected_extra_logp") or []) for i in kept]
    score_chosen = torch.tensor([float(pairs[i]["score_chosen"]) for i in kept])
    score_rejected = torch.tensor([float(pairs[i]["score_rejected"]) for i in kept])
    pad_id = processor.tokenizer.pad_token_id
    device = next(model.parameters()).device
    total = cfg["max_steps"] or math.ceil(len(encoded) / cfg["batch_size"]) * cfg["epochs"]
    params, optimizer, scheduler, micro = optimizer_setup(model, cfg, total)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    rng = random.Random(seed)
    order: list[int] = []
    history: list[dict] = []
    start_step = 0
    save_every = cfg.get("save_every", 0)
    if resume_dir is not None and (resume_dir / "state.pt").exists():
        state = torch.load(resume_dir / "state.pt", weights_only=False)
        model.load_state_dict(state["weights"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if hasattr(loss_fn, "load_state_dict"):
            loss_fn.load_state_dict(state["loss"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        order, history, start_step = state["order"], state["history"], state["step"] + 1
    model, optimizer, scheduler = parallel.prepare(model, optimizer, scheduler, cfg)
    progress = Progress("train", total, unit="steps")
    progress.done = start_step
    model.train()

    # --- loop
    for step in range(start_step, total):
        if len(order) < cfg["batch_size"]:
            order += rng.sample(range(len(encoded)), len(encoded))
        batch_idx, order = order[: cfg["batch_size"]], order[cfg["batch_size"] :]
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        mine = parallel.share(batch_idx)
        for start in range(0, len(mine), micro):
            idx = mine[start : start + micro]
            policy = pair_logps(model, [encoded[i] for i in idx], pad_id)
            reference = PairLogps(ref_chosen[idx].to(device), ref_rejected[idx].to(device),
                                  policy.chosen_tokens, policy.rejected_tokens)
            if policy.rejected_extra is not None:
                reference.rejected_extra = _padded_reference(ref_extra, idx, policy.rejected_extra.shape[1]).to(device)
            extras = {"index": idx, "score_chosen": score_chosen[idx].to(device),
                      "score_rejected": score_rejected[idx].to(device)}
            loss, metrics = loss_fn(policy, reference, extras)
            parallel.backward(loss, len(batch_idx))
            for name, value in {"loss": loss.mean(), **metrics}.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) * len(idx) / len(batch_idx)
        grad_norm = parallel.reduce_and_clip(params, cfg["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        record = {"step": step, **parallel.reduce_metrics(sums), "grad_norm": grad_norm,
                  "lr": scheduler.get_last_lr()[0]}
        history.append(record)
        progress.update(1, loss=record["loss"])
        if (resume_dir is not None and save_every and (step + 1) % save_every == 0 and step + 1 < total
                and parallel.is_main):
            save_resume_state(resume_dir, {
                "weights": {k: v for k, v in model.state_dict().items() if k in trainable},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "loss": loss_fn.state_dict() if hasattr(loss_fn, "state_dict") else None,
                "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                "order": order, "history": history, "step": step,
            })
        if on_step is not None:
            on_step(step)

    # --- cleanup
    model.eval()
    return history
