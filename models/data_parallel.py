"""Data parallelism for the preference trainer: each rank trains its share of every global
batch, and together they take the step that one process takes on the whole batch.

``DataParallel()`` (no accelerator) is the single process: the whole batch, plain backward,
plain clipping. ``DataParallel(accelerator)`` is one rank of an ``accelerate launch`` run
(``models/distributed_train.py``), in one of two ways:

- Plain processes (accelerate's MULTI_CPU / MULTI_GPU: gloo or NCCL). The model is not wrapped
  in ``torch.nn.parallel.DistributedDataParallel``: the shared-prefix engine
  (``models.logprobs.shared_prefix_logps``) calls the model once for each pair's image and
  prompt and again for the continuations, while DDP's reducer expects one forward per
  backward. Falling back to the concatenated layout (``shared_prefix=False``) would satisfy DDP
  but run every prompt twice. Instead each rank backpropagates sum(its pairs' losses) / GLOBAL
  batch size and the gradients are summed over ranks once per step, after the last micro-batch
  and before clipping. The loss is a sum of per-pair terms, so the summed gradient is the
  single-process gradient (up to float summation order); every rank then clips by the same
  norm and takes the same AdamW step, and the weights stay identical on all ranks without
  being broadcast.
- DeepSpeed ZeRO stage 2/3 (accelerate's DEEPSPEED; conf/accelerate/zero2.yaml, zero3.yaml):
  model, optimizer and schedule go through ``accelerator.prepare``; DeepSpeed partitions the
  optimizer state (stage 3: the parameters too) and reduces, clips and steps inside
  ``accelerator.backward``. Each micro-batch backpropagates its mean loss: DeepSpeed divides by
  its gradient-accumulation count and averages over ranks, which with equal micro-batches
  (checked in ``prepare``) is again the mean over the global batch. Not exercised by the test
  suite (it needs CUDA GPUs and the ``gpu`` extra).

Losses that pool over one call see a rank's share as their call, as they see a micro-batch
under ``train.grad_accum``: BCO's running reward shift (each rank keeps its own) and SFT's
``token_mean``. Per-pair losses (DPO, IPO, ...) give the single-process curve exactly.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


class DataParallel:
    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world = accelerator.num_processes if accelerator else 1
        self.zero = accelerator is not None and accelerator.distributed_type == "DEEPSPEED"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, batch: list[int]) -> list[int]:
        """This rank's contiguous slice of the global batch (all ranks draw the same batches:
        the data order comes from the same seed)."""
        n = len(batch)
        return batch[self.rank * n // self.world : (self.rank + 1) * n // self.world]

    def prepare(self, model, optimizer, scheduler, cfg: dict):
        """Hand model, optimizer and schedule to DeepSpeed (ZeRO); unchanged otherwise."""
        if not self.zero:
            return model, optimizer, scheduler
        share = cfg["batch_size"] // self.world
        micro = min(cfg["batch_size"] // cfg["grad_accum"], share)
        if cfg["batch_size"] % self.world or share % micro:
            raise ValueError(f"DeepSpeed needs equal micro-batches on every rank: train.batch_size="
                             f"{cfg['batch_size']} must split into {self.world} ranks x equal micro-batches "
                             f"(train.grad_accum={cfg['grad_accum']})")
        # Our values, not the "auto" ones accelerate would fill in (its clipping default is 1.0).
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = micro
        ds["gradient_accumulation_steps"] = share // micro
        ds["gradient_clipping"] = cfg["max_grad_norm"]
        self.accelerator.gradient_accumulation_steps = share // micro
        return self.accelerator.prepare(model, optimizer, scheduler)

    def backward(self, losses: torch.Tensor, global_batch: int) -> None:
        """Backpropagate one micro-batch's per-pair losses ([b])."""
        if self.zero:
            # accumulate() marks the last micro-batch of the step, where DeepSpeed's backward
            # also reduces, clips, steps and zeroes the gradients.
            with self.accelerator.accumulate():
                self.accelerator.backward(losses.mean())
        else:
            (losses.sum() / global_batch).backward()

    def reduce_and_clip(self, params: list[torch.Tensor], max_norm: float) -> float:
        """Sum gradients over ranks, clip; returns the global gradient norm before clipping."""
        if self.zero:
            norm = self.accelerator.clip_grad_norm_(params, max_norm)  # DeepSpeed's, already clipped
            return float(norm) if norm is not None else float("nan")
        if self.world > 1:
            _all_reduce_grads(params)
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def reduce_metrics(self, partial: dict[str, float]) -> dict[str, float]:
        """Global step metrics from each rank's partial sums (already weighted by pairs over the
        global batch): summed over ranks, in rank order, so every rank logs the same values.
        Objects rather than a tensor, so a metric that only some ranks report still adds up."""
        if self.world == 1:
            return partial
        gathered: list[dict] = [{} for _ in range(self.world)]
        dist.all_gather_object(gathered, partial)
        total: dict[str, float] = {}
        for part in gathered:
            for name, value in part.items():
                total[name] = total.get(name, 0.0) + value
        return total

    def full_parameters(self, model):
        """Context in which ``model`` holds full parameters (for saving): ZeRO-3 keeps 1/N of
        each on every rank, so all ranks must enter it together."""
        if self.zero and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(model.parameters()))
        return contextlib.nullcontext()


def _all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Sum ``.grad`` over ranks. A parameter no pair on this rank reached has no gradient here
    but may have one on another rank: reduce zeros in its place, and leave ``.grad`` unset only
    where no rank produced one, as the single process does (AdamW then skips it, decay included)."""
    device = params[0].device
    present = torch.tensor([float(p.grad is not None) for p in params], device=device)
    dist.all_reduce(present)
    pending = []
    for p, anywhere in zip(params, present.tolist()):
        if anywhere:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            pending.append(dist.all_reduce(p.grad, async_op=True))  # overlap the transfers
    for work in pending:
        work.wait()
