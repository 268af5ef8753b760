"""Stage 4: train the next policy on the round's pairs with the configured loss.

A round that yields zero pairs is recorded as such and the policy is carried forward
unchanged (its checkpoint's policy.json points at the parent's weights)."""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import task

from models.load import load_policy, read_policy, save_policy, set_threads
from models.trainer import train_pairs
from tasks.artifacts import is_done, read_manifest, stage_output, write_json, write_jsonl
from tasks.common import STAGE_OPTIONS, build, forget_policy, inject_fault, round_dir

LOSS_STATE = "loss_state.json"


def resume_dir(out: Path) -> Path:
    """Mid-training saves (``train.save_every``) live beside the stage's temporary directory,
    which a restart deletes, so a killed training stage continues from its last save."""
    return out.parent / f"{out.name}.resume"


@task(name="train", **STAGE_OPTIONS)
def train(run_dir: str, round_index: int, cfg: dict, pairs_dir: str, policy_ckpt: str | None) -> str:
    import datasets

    out = round_dir(run_dir, round_index) / "checkpoint"
    if is_done(out):
        return str(out)
    inject_fault(cfg, "train", round_index, out)
    with stage_output(out, "train", {"pairs": pairs_dir, "policy": policy_ckpt}) as (tmp, manifest):
        parent = read_policy(policy_ckpt, cfg["model"])
        n_pairs = read_manifest(pairs_dir)["counts"]["pairs"]
        if n_pairs == 0:
            write_json(tmp / "policy.json", parent)
            manifest["counts"] = {"pairs": 0, "steps": 0, "carried_forward": 1}
        else:
            forget_policy()  # free the inference copy before loading a trainable one
            set_threads()
            pairs = list(datasets.load_from_disk(str(Path(pairs_dir) / "dataset")))
            model, processor = load_policy(cfg["model"], policy_ckpt, trainable=True)
            method = build(cfg["method"])
            if hasattr(method, "train"):
                # Hook: a method with its own objective (judge_grpo: GRPO on rollout groups) trains
                # the model in place and returns per-step metrics; the `loss` group is not used.
                history = method.train(model, processor, pairs, cfg["train"],
                                       seed=cfg["seed"] * 1000 + round_index)
            else:  # DPO-family methods: the configured preference loss
                loss_fn = build(cfg["loss"])
                history = train_pairs(model, processor, pairs, loss_fn, cfg["train"],
                                      seed=cfg["seed"] * 1000 + round_index, resume_dir=resume_dir(out))
                # A stateful loss (BCO's running delta) starts fresh each round, like its new
                # reference; its final state is kept with the checkpoint for inspection.
                if hasattr(loss_fn, "state_dict"):
                    write_json(tmp / LOSS_STATE, loss_fn.state_dict())
            save_policy(model, processor, tmp, parent, final_dir=out)
            write_jsonl(tmp / "train_log.jsonl", history)
            last = history[-max(1, len(history) // 4):]  # the final quarter of steps
            manifest["counts"] = {"pairs": len(pairs), "steps": len(history), "carried_forward": 0}
            names = {k for h in last for k in h if k != "step"}  # some metrics appear in some steps only
            manifest["metrics"] = {k: sum(h[k] for h in last if k in h) / sum(k in h for h in last) for k in names}
    shutil.rmtree(resume_dir(out), ignore_errors=True)  # finished: mid-training saves are spent
    return str(out)
