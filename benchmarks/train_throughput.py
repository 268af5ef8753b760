"""DPO training throughput: PrefLoop's engine against TRL 1.16's DPOTrainer on the same VLM.

    python benchmarks/train_throughput.py                      # tiny default: 64 image tokens
    python benchmarks/train_throughput.py --image-tokens 576   # LLaVA-1.5's 576 tokens per image

Both sides train their own copy of the same randomly initialised tiny LLaVA (models.tiny
build functions) on the same pairs, in the same batches and order, with the same optimizer
(AdamW, same lr, no weight decay, constant lr, grad-norm clip 1.0), DPO sigmoid loss, beta 0.1,
float32, reference log-probs precomputed from the initial weights. The sides' steps are timed
ALTERNATELY (step by step, rotating which side goes first), after warm-up steps; pairs/s per
epoch, medians over repeats, wall-clock and process CPU time. See benchmarks/README.md.

Sides:
    prefloop   pair_logps (shared prefix: image + prompt once per pair) + DPOLoss + AdamW step
    trl        DPOTrainer.training_step + AdamW step, reference log-probs fed precomputed in the
               batch (the same work as PrefLoop's step; TRL itself refuses
               precompute_ref_log_probs for vision datasets, so this is set after construction)
    trl+ref    (--trl-as-shipped) DPOTrainer as TRL runs vision DPO: a reference-model forward
               in every step
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.suites.shapes import answer_space, make_queries
from models.losses import DPOLoss, PairLogps
from models.records import assistant_message, user_prompt
from models.tiny import (
    TinySpec,
    aligned_chat_template,
    build_model,
    build_processor,
    build_tokenizer,
)
from models.trainer import encode_pairs, pair_logps, reference_logps

MODES = {
    # The embedded default's architecture: 64x64 images, patch 8 -> 64 image tokens.
    64: TinySpec(),
    # LLaVA-1.5's 576 image tokens (96x96, patch 4 -> 24x24) and a wider text model.
    576: TinySpec(image_size=96, patch_size=4, text_hidden=256, text_layers=2, text_heads=4),
}
SUFFIX = " Answer the question using a single word or phrase."


# --- setup -------------------------------------------------------------------------------


def make_pairs(spec: TinySpec, n: int, seed: int) -> list[dict]:
    """Shapes-suite questions; chosen = the answer, rejected = another answer or a phrase."""
    queries = make_queries("train", n, seed, spec.shapes())
    answers = sorted(answer_space(spec.shapes()))
    phrases = ["the red big circle is on the left", "there are three shapes", "purple square"]
    pairs = []
    for i, q in enumerate(queries):
        wrong = [a for a in answers if a != q["answer"]][i % (len(answers) - 1)]
        pairs.append({
            "prompt": user_prompt(q["question"] + (SUFFIX if i % 2 else "")),
            "images": [q["image"]],
            "chosen": assistant_message(q["answer"]),
            "rejected": assistant_message(phrases[i % 3] if i % 4 == 3 else wrong),
        })
    return pairs


def constant_lr(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def trl_trainer(model, ref_model, processor, rows, args, precomputed_refs: bool):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        output_dir="/tmp/prefloop-bench-trl", beta=args.beta, learning_rate=args.lr, weight_decay=0.0,
        per_device_train_batch_size=args.batch_size, max_length=None, bf16=False, use_cpu=args.device == "cpu",
        gradient_checkpointing=False, report_to=[], save_strategy="no", logging_steps=10**9,
        dataloader_num_workers=0, max_grad_norm=1.0,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=Dataset.from_list(rows[:8]),
                         processing_class=processor, optimizers=(optimizer, constant_lr(optimizer)))
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); we drive the steps
    trainer.precompute_ref_logps = precomputed_refs
    return trainer


# --- one step per side -------------------------------------------------------------------


def prefloop_step(side: dict, idx: list[int]) -> float:
    model, opt = side["model"], side["opt"]
    policy = pair_logps(model, [side["encoded"][i] for i in idx], side["pad"])
    reference = PairLogps(side["ref_chosen"][idx], side["ref_rejected"][idx], policy.chosen_tokens,
                          policy.rejected_tokens)
    loss, _ = side["loss_fn"](policy, reference)
    loss.mean().backward()
    torch.nn.utils.clip_grad_norm_(side["params"], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.mean())


def trl_step(side: dict, batch_no: int) -> float:
    trainer = side["trainer"]
    loss = trainer.training_step(trainer.model, side["batches"][batch_no])
    torch.nn.utils.clip_grad_norm_(side["params"], 1.0)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(loss)


# --- memory ------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory of a block above the memory in use when it starts.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats. CPU: the process's
    resident-set high-water mark (VmHWM), reset through /proc/self/clear_refs, minus VmRSS at
    the start, after gc and malloc_trim so memory freed by the other side is given back."""

    def __init__(self, device: torch.device):
        self.device = device
        self.libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        if self.libc is not None:
            self.libc.malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.start, self.hwm = self._status("VmRSS"), True
        except OSError:  # no clear_refs: fall back to ru_maxrss deltas (an underestimate)
            self.start, self.hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, False
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        elif self.hwm:
            self.peak = self._status("VmHWM") - self.start
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.start
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-tokens", type=int, choices=sorted(MODES), default=64)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per side")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--memory-steps", type=int, default=2, help="untimed steps per side measuring peak memory")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trl-as-shipped", action="store_true",
                        help="also time TRL with its per-step reference forward (what TRL does for vision data)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = MODES[args.image_tokens]

    # --- setup: one random init, one copy per side, the same pairs and batches
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer(spec)
    processor = build_processor(spec, tokenizer)
    base = build_model(spec, tokenizer).to(device).float().eval()
    pairs = make_pairs(spec, args.pairs, args.seed)
    print(f"model: {sum(p.numel() for p in base.parameters()) / 1e6:.2f} M params, image {spec.image_size}px "
          f"patch {spec.patch_size} -> {args.image_tokens} image tokens, text hidden {spec.text_hidden} x "
          f"{spec.text_layers} layers; {args.pairs} pairs, batch {args.batch_size}, {torch.get_num_threads()} "
          f"threads, device {device}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    if device.type == "cpu" and torch.get_num_threads() > 1 and os.getloadavg()[0] > (os.cpu_count() or 1):
        print("  warning: the machine is already loaded; with several torch threads per process the OpenMP "
              "threads oversubscribe the cores and every side slows severalfold (try --threads 1)", flush=True)

    t = time.perf_counter()
    encoded, kept, dropped = encode_pairs(processor, pairs, max_length=4096)
    prefloop_encode_s = time.perf_counter() - t
    assert dropped == 0 and len(kept) == len(pairs)
    seq_len = statistics.mean(len(e.prompt.ids) + (len(e.chosen) + len(e.rejected)) / 2 for e in encoded)
    order = [list(range(s, min(s + args.batch_size, len(pairs)))) for s in range(0, len(pairs), args.batch_size)]

    ref_model = copy.deepcopy(base).requires_grad_(False)
    reference_logps(ref_model, processor, encoded[: args.batch_size], args.batch_size)  # warm-up
    t = time.perf_counter()
    ref_chosen, ref_rejected = reference_logps(ref_model, processor, encoded, args.batch_size)
    sync(device)
    prefloop_ref_s = time.perf_counter() - t
    prefloop = {
        "model": copy.deepcopy(base).train(), "encoded": encoded, "pad": tokenizer.pad_token_id,
        "ref_chosen": torch.tensor(ref_chosen, device=device), "ref_rejected": torch.tensor(ref_rejected, device=device),
        "loss_fn": DPOLoss(beta=args.beta),
    }
    prefloop["params"] = list(prefloop["model"].parameters())
    prefloop["opt"] = torch.optim.AdamW(prefloop["params"], lr=args.lr, weight_decay=0.0)

    trl_processor = copy.deepcopy(processor)
    trl_processor.chat_template = aligned_chat_template(tokenizer.eos_token)
    rows = [dict(p) for p in pairs]
    trl = {"trainer": trl_trainer(copy.deepcopy(base), copy.deepcopy(ref_model), trl_processor, rows, args, True)}
    trl["params"] = list(trl["trainer"].model.parameters())
    t = time.perf_counter()
    batches = [trl["trainer"].data_collator(copy.deepcopy([rows[i] for i in idx])) for idx in order]
    trl_collate_s = time.perf_counter() - t
    with torch.no_grad():  # warm-up
        trl["trainer"].compute_ref_log_probs(trl["trainer"].ref_model, {k: v.to(device) for k, v in batches[0].items()})
    t = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = trl["trainer"].compute_ref_log_probs(
                trl["trainer"].ref_model, {k: v.to(device) for k, v in batch.items()})
    sync(device)
    trl_ref_s = time.perf_counter() - t
    trl["batches"] = [{k: v.to(device) for k, v in b.items()} for b in batches]
    ref_gap = max(
        (torch.cat([b["ref_chosen_logps"] for b in trl["batches"]]) - prefloop["ref_chosen"]).abs().max().item(),
        (torch.cat([b["ref_rejected_logps"] for b in trl["batches"]]) - prefloop["ref_rejected"]).abs().max().item(),
    )
    sides = {"prefloop": prefloop, "trl": trl}
    if args.trl_as_shipped:
        shipped = {"trainer": trl_trainer(copy.deepcopy(base), copy.deepcopy(ref_model), trl_processor, rows, args, False)}
        shipped["params"] = list(shipped["trainer"].model.parameters())
        shipped["batches"] = trl["batches"]
        sides["trl+ref"] = shipped
    del base

    def run_step(name: str, step_no: int) -> float:
        side = sides[name]
        if name == "prefloop":
            return prefloop_step(side, order[step_no % len(order)])
        return trl_step(side, step_no % len(order))

    # --- warm-up: the same first batches on every side (keeps the trajectories identical)
    for name in sides:
        for step in range(args.warmup_steps):
            run_step(name, step)

    # --- timed epochs: sides alternate step by step (which side goes first rotates), so a
    # change in background load hits every side alike; one epoch per side per repeat
    results = {name: {"wall": [], "cpu": [], "losses": [], "peak": 0} for name in sides}
    names = list(sides)
    for repeat in range(args.repeats):
        for name in names:
            results[name]["wall"].append(0.0)
            results[name]["cpu"].append(0.0)
        for step in range(len(order)):
            turn = repeat * len(order) + step
            for name in names[turn % len(names):] + names[: turn % len(names)]:
                sync(device)
                wall, cpu = time.perf_counter(), time.process_time()
                loss = run_step(name, args.warmup_steps + turn)
                sync(device)
                results[name]["wall"][-1] += time.perf_counter() - wall
                results[name]["cpu"][-1] += time.process_time() - cpu
                results[name]["losses"].append(loss)
        print(f"  repeat {repeat + 1}/{args.repeats}: " + ", ".join(
            f"{name} {len(pairs) / results[name]['wall'][-1]:.1f} pairs/s "
            f"(cpu {len(pairs) / results[name]['cpu'][-1]:.1f}, loss "
            f"{statistics.mean(results[name]['losses'][-len(order):]):.5f})" for name in names), flush=True)

    # --- peak memory: separate, untimed steps (the measurement trims the heap, which would
    # make the next step fault its memory back in), the same next batch for every side
    for name in names:
        for step in range(args.memory_steps):
            with PeakMemory(device) as mem:
                run_step(name, args.warmup_steps + args.repeats * len(order) + step)
            results[name]["peak"] = max(results[name]["peak"], mem.peak)

    # --- report
    summary = {}
    for name, r in results.items():
        wall = [len(pairs) / s for s in r["wall"]]
        summary[name] = {
            "pairs_per_s": statistics.median(wall),
            "spread": (min(wall), max(wall)),
            "cpu_pairs_per_s": statistics.median(len(pairs) / s for s in r["cpu"]),
            "peak_mib": r["peak"] / 2**20,
            "mean_loss": statistics.mean(r["losses"]),
        }
    ratio = summary["prefloop"]["pairs_per_s"] / summary["trl"]["pairs_per_s"]
    cpu_ratio = summary["prefloop"]["cpu_pairs_per_s"] / summary["trl"]["cpu_pairs_per_s"]
    target = 2.0 if args.image_tokens == 576 else 1.3
    mem_kind = "peak CUDA alloc" if device.type == "cuda" else "peak RSS rise"
    print()
    print(f"=== DPO train throughput, {args.image_tokens} image tokens/image, ~{seq_len:.0f} tokens/sequence, "
          f"{args.pairs} pairs x {args.repeats} epochs, batch {args.batch_size}, {torch.get_num_threads()} threads ===")
    print(f"{'side':10s} {'pairs/s (median)':>17s} {'min..max':>15s} {'cpu-time pairs/s':>17s} "
          f"{mem_kind + ' MiB':>22s} {'mean DPO loss':>14s}")
    for name, s in summary.items():
        lo, hi = s["spread"]
        print(f"{name:10s} {s['pairs_per_s']:17.1f} {lo:7.1f}..{hi:<7.1f} {s['cpu_pairs_per_s']:17.1f} "
              f"{s['peak_mib']:22.1f} {s['mean_loss']:14.6f}")
    print(f"PrefLoop/TRL pairs/s ratio: {ratio:.2f} wall-clock, {cpu_ratio:.2f} cpu-time  "
          f"(target >= {target}: {'MET' if ratio >= target else 'NOT MET'} on wall-clock)")
    if "trl+ref" in summary:
        print(f"PrefLoop/TRL-as-shipped (reference forward every step) ratio: "
              f"{summary['prefloop']['pairs_per_s'] / summary['trl+ref']['pairs_per_s']:.2f}")
    gap = abs(summary["prefloop"]["mean_loss"] - summary["trl"]["mean_loss"])
    print(f"mean DPO loss |PrefLoop - TRL| = {gap:.2e}; reference log-probs max |PrefLoop - TRL| = {ref_gap:.2e}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"outside the timed steps: PrefLoop encode {len(pairs) / prefloop_encode_s:.0f} pairs/s (once per round), "
          f"TRL collate {len(pairs) / trl_collate_s:.0f} pairs/s (every epoch, on the fly); reference pass: "
          f"PrefLoop {len(pairs) / prefloop_ref_s:.0f} pairs/s, TRL {len(pairs) / trl_ref_s:.0f} pairs/s")
    return {"summary": summary, "ratio": ratio, "cpu_ratio": cpu_ratio, "loss_gap": gap, "ref_gap": ref_gap}


if __name__ == "__main__":
    main()
