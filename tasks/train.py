"""Stage 4: train the next policy on the round's pairs with the configured loss.

A round that yields zero pairs is recorded as such and the policy is carried forward
unchanged (its checkpoint's policy.json points at the parent's weights).

``train.launcher=accelerate`` trains in ``train.num_processes`` ranks under ``accelerate
launch`` (models/distributed_train.py) instead of in this process; the checkpoint, log and
manifest it leaves are the same."""

from __future__ import annotations

import collections
import importlib.util
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

from omegaconf import OmegaConf
from prefect import task

from models import distributed_train
from models.load import load_policy, read_policy, save_policy, set_threads
from models.trainer import train_pairs
from tasks.artifacts import (
    is_done,
    read_jsonl,
    read_manifest,
    stage_output,
    write_json,
    write_jsonl,
)
from tasks.common import STAGE_OPTIONS, build, forget_policy, inject_fault, round_dir

LOSS_STATE = "loss_state.json"
log = logging.getLogger("prefloop")


def round_steps(train_cfg: dict, round_index: int) -> int | None:
    """The exact optimizer steps ``train.steps_per_round`` fixes for this round, or None."""
    fixed = train_cfg.get("steps_per_round") or []
    if not fixed:
        return None
    if round_index > len(fixed):
        raise ValueError(f"train.steps_per_round has {len(fixed)} entries but round {round_index} is running; "
                         "give one step count per round")
    return int(fixed[round_index - 1])


def resume_dir(out: Path) -> Path:
    """Mid-training saves (``train.save_every``) live beside the stage's temporary directory,
    which a restart deletes, so a killed training stage continues from its last save."""
    return out.parent / f"{out.name}.resume"


@task(name="train", **STAGE_OPTIONS)
def train(run_dir: str, round_index: int, cfg: dict, pairs_dir: str, policy_ckpt: str | None) -> str:
    out = round_dir(run_dir, round_index) / "checkpoint"
    if is_done(out):
        return str(out)
    inject_fault(cfg, "train", round_index, out)
    with stage_output(out, "train", {"pairs": pairs_dir, "policy": policy_ckpt}) as (tmp, manifest):
        parent = read_policy(policy_ckpt, cfg["model"])
        n_pairs = read_manifest(pairs_dir)["counts"]["pairs"]
        steps = round_steps(cfg["train"], round_index)
        if n_pairs == 0 or steps == 0:
            if n_pairs == 0:
                log.warning("round %d yielded zero preference pairs (see %s/manifest.json): no training; the "
                            "round's policy is carried forward unchanged", round_index, pairs_dir)
            write_json(tmp / "policy.json", parent)
            manifest["counts"] = {"pairs": n_pairs, "steps": 0, "carried_forward": 1}
        else:
            if steps is not None:  # a fixed step count for this round (the matched continued-SFT control)
                cfg = cfg | {"train": cfg["train"] | {"max_steps": steps}}
            forget_policy()  # free the inference copy before loading a trainable one
            method = build(cfg["method"])
            launcher = cfg["train"].get("launcher", "inprocess")
            if launcher not in distributed_train.LAUNCHERS:
                raise ValueError(f"train.launcher={launcher!r} is not one of {', '.join(distributed_train.LAUNCHERS)}")
            if launcher == "accelerate":
                if hasattr(method, "train"):
                    raise ValueError(f"train.launcher=accelerate runs the preference-loss trainer; method "
                                     f"{cfg['method']['_target_']} trains with its own loop: use train.launcher=inprocess")
                history = train_launched(cfg, round_index, pairs_dir, policy_ckpt, parent, tmp, out)
            else:
                history = train_here(cfg, round_index, pairs_dir, policy_ckpt, parent, method, tmp, out)
            write_jsonl(tmp / "train_log.jsonl", history)
            last = history[-max(1, len(history) // 4):]  # the final quarter of steps
            manifest["counts"] = {"pairs": n_pairs, "steps": len(history), "carried_forward": 0}
            names = {k for h in last for k in h if k != "step"}  # some metrics appear in some steps only
            manifest["metrics"] = {k: sum(h[k] for h in last if k in h) / sum(k in h for h in last) for k in names}
    shutil.rmtree(resume_dir(out), ignore_errors=True)  # finished: mid-training saves are spent
    return str(out)


def train_here(cfg: dict, round_index: int, pairs_dir: str, policy_ckpt: str | None, parent: dict,
               method, tmp: Path, out: Path) -> list[dict]:
    """Train in this process; writes the checkpoint (and loss state) into ``tmp``."""
    import datasets

    set_threads()
    pairs = list(datasets.load_from_disk(str(Path(pairs_dir) / "dataset")))
    model, processor = load_policy(cfg["model"], policy_ckpt, trainable=True)
    if hasattr(method, "train"):
        # Hook: a method with its own objective (judge_grpo: GRPO on rollout groups) trains
        # the model in place and returns per-step metrics; the `loss` group is not used.
        history = method.train(model, processor, pairs, cfg["train"], seed=cfg["seed"] * 1000 + round_index)
    else:  # DPO-family methods: the configured preference loss
        loss_fn = build(cfg["loss"])
        history = train_pairs(model, processor, pairs, loss_fn, cfg["train"],
                              seed=cfg["seed"] * 1000 + round_index, resume_dir=resume_dir(out))
        # A stateful loss (BCO's running delta) starts fresh each round, like its new
        # reference; its final state is kept with the checkpoint for inspection.
        if hasattr(loss_fn, "state_dict"):
            write_json(tmp / LOSS_STATE, loss_fn.state_dict())
    save_policy(model, processor, tmp, parent, final_dir=out)
    return history


def train_launched(cfg: dict, round_index: int, pairs_dir: str, policy_ckpt: str | None, parent: dict,
                   tmp: Path, out: Path) -> list[dict]:
    """Train in ``train.num_processes`` ranks under ``accelerate launch``; rank 0 writes the
    checkpoint into ``tmp``. The job file and the ranks' outputs live in ``tmp/accelerate/``,
    removed once read, so the checkpoint holds the same files as an in-process one."""
    train_cfg = cfg["train"]
    config = distributed_train.accelerate_config_path(train_cfg["accelerate_config"])
    settings = OmegaConf.load(config)
    if settings.get("distributed_type") == "DEEPSPEED":
        # Fail here, once, rather than in every rank and again on each retry of the stage.
        import torch

        if importlib.util.find_spec("deepspeed") is None or not torch.cuda.is_available():
            raise ValueError(f"train.accelerate_config={train_cfg['accelerate_config']} uses DeepSpeed, which needs "
                             "CUDA GPUs and the gpu extra (pip install -e '.[gpu]'); on CPU use ddp_cpu")
    work = tmp / "accelerate"
    work.mkdir()
    job = work / "job.json"
    write_json(job, {"policy": policy_ckpt, "parent": parent, "pairs": str(Path(pairs_dir) / "dataset"),
                     "model": cfg["model"], "loss": cfg["loss"], "train": train_cfg,
                     "seed": cfg["seed"] * 1000 + round_index, "out": str(tmp), "final_dir": str(out),
                     "resume": str(resume_dir(out))})
    env = dict(os.environ)
    n = train_cfg["num_processes"]
    if settings.get("use_cpu"):
        # accelerate's torchrun launcher does not pass the config's use_cpu on to the ranks.
        env["ACCELERATE_USE_CPU"] = "true"
        # N ranks share the cores: without a limit each would start one thread per core.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    run_streaming(distributed_train.launch_command(job, config, n), env)
    history = read_jsonl(work / distributed_train.HISTORY)
    if (work / distributed_train.LOSS_STATE).exists():
        write_json(tmp / LOSS_STATE, json.loads((work / distributed_train.LOSS_STATE).read_text()))
    shutil.rmtree(work)
    return history


def run_streaming(cmd: list[str], env: dict | None = None, tail_lines: int = 40) -> None:
    """Run ``cmd``, its output (stdout and stderr) streamed line by line to the log; a non-zero
    exit raises with the last ``tail_lines`` lines, where the ranks' traceback is."""
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        try:
            for line in proc.stdout:
                tail.append(line.rstrip())
                log.info("%s", tail[-1])
        except BaseException:  # interrupted (Ctrl-C, a Prefect cancel): do not leave ranks running
            proc.terminate()
            raise
    if proc.returncode:
        raise RuntimeError(f"distributed training failed: `{' '.join(cmd)}` exited with {proc.returncode}; "
                           "last lines of its output:\n" + "\n".join(tail))
