"""One rank of a data-parallel train stage, started by the train stage with
``train.launcher=accelerate`` (tasks/train.py) as

    accelerate launch --config_file <conf/accelerate/NAME.yaml> --num_processes N \\
        -m models.distributed_train <job.json>

The job file (JSON) holds:

    policy      checkpoint dir of the round's starting policy, or null for the base model
    parent      that policy's description (its policy.json), recorded in the new checkpoint
    pairs       the round's pairs with reference log-probs (a ``datasets.save_to_disk`` dir)
    model, loss, train   the resolved config groups;  seed: the round's training seed
    out         where rank 0 writes the checkpoint (the stage's temporary directory)
    final_dir   where that checkpoint will live after the stage's rename (for policy.json)
    resume      directory for mid-training saves (``train.save_every``), or null

Every rank loads the policy and all pairs and runs ``models.trainer.train_pairs`` on its share
of each batch (``models.data_parallel``); rank 0 saves the policy (``models.load.save_policy``)
and writes, beside the job file, ``history.jsonl`` (the per-step global metrics) and, for a
stateful loss, ``loss_state.json``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

LAUNCHERS = ("inprocess", "accelerate")
ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "conf" / "accelerate"
HISTORY, LOSS_STATE = "history.jsonl", "loss_state.json"

log = logging.getLogger("prefloop")


def accelerate_config_path(name: str) -> Path:
    """``conf/accelerate/<name>.yaml`` for a bare name (ddp_cpu, zero2, zero3), else a file path."""
    is_path = name.endswith((".yaml", ".yml")) or "/" in name
    path = Path(name) if is_path else ACCELERATE_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml")))
        raise ValueError(f"train.accelerate_config={name!r}: no file {path}; "
                         f"use one of {names} or the path of an accelerate config file")
    return path


def launch_command(job_path: Path, config: Path, num_processes: int) -> list[str]:
    # ``python -m accelerate.commands.launch`` rather than the ``accelerate`` script: the same
    # interpreter (and virtual environment) as the stage, whatever is on PATH.
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_processes", str(num_processes), "-m", "models.distributed_train", str(job_path)]


def main(job_path: Path) -> None:
    import datasets
    from accelerate import Accelerator
    from hydra.utils import instantiate

    from models.data_parallel import DataParallel
    from models.load import load_policy, save_policy, set_threads
    from models.trainer import train_pairs

    job = json.loads(job_path.read_text())
    accelerator = Accelerator()
    parallel = DataParallel(accelerator)
    # Rank 0 speaks for all (they log the same global metrics); other ranks only warn.
    logging.basicConfig(level=logging.INFO if parallel.is_main else logging.WARNING,
                        format=f"[rank {parallel.rank}] %(message)s", stream=sys.stdout, force=True)
    set_threads()

    model, processor = load_policy(job["model"] | {"device": str(accelerator.device)}, job["policy"], trainable=True)
    pairs = list(datasets.load_from_disk(job["pairs"]))
    loss_fn = instantiate(job["loss"], _convert_="all")
    if hasattr(loss_fn, "state_dict") and parallel.world > 1:
        log.warning("%s keeps a running state per call: each of the %d ranks updates its own from its "
                    "share of the batch, so the curve departs from a single process's",
                    type(loss_fn).__name__, parallel.world)
    resume = Path(job["resume"]) if job.get("resume") else None
    if resume is not None and parallel.zero:
        # ZeRO partitions the optimizer state (stage 3: the weights) across ranks; the resume
        # save holds whole tensors from one process, so it is not used there.
        log.warning("train.save_every is ignored under DeepSpeed ZeRO: a killed stage restarts training")
        resume = None

    history = train_pairs(model, processor, pairs, loss_fn, job["train"], job["seed"],
                          resume_dir=resume, parallel=parallel)

    with parallel.full_parameters(model):
        if parallel.is_main:
            save_policy(model, processor, Path(job["out"]), job["parent"], final_dir=Path(job["final_dir"]))
            (job_path.parent / HISTORY).write_text("".join(json.dumps(h) + "\n" for h in history))
            if hasattr(loss_fn, "state_dict"):
                (job_path.parent / LOSS_STATE).write_text(json.dumps(loss_fn.state_dict()))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also tears down the process group


if __name__ == "__main__":
    main(Path(sys.argv[1]))
