"""train.launcher=accelerate: the train stage run as 2 CPU processes (gloo) under a real
`accelerate launch` gives the in-process trainer's loss curve and weights on the same pairs;
a failed launch says why, and a DeepSpeed config on a machine without GPUs fails at once."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from evaluation.suites.shapes import make_queries
from models.load import load_policy
from models.losses import DPOLoss
from models.records import assistant_message, user_prompt
from models.trainer import encode_pairs, reference_pass, train_pairs
from tasks.artifacts import read_jsonl, read_manifest, stage_output

TRAIN = {"lr": 5e-3, "weight_decay": 0.0, "epochs": 1, "max_steps": 5, "batch_size": 4, "grad_accum": 1,
         "warmup_ratio": 0.0, "max_grad_norm": 1.0, "max_length": 512, "ref_batch_size": 8, "save_every": 0,
         "launcher": "accelerate", "num_processes": 2, "accelerate_config": "ddp_cpu"}


@pytest.fixture(scope="module")
def pairs_dir(tiny_policy, tmp_path_factory):
    """A finished pair stage: 16 shapes pairs (right answer over a wrong one) with reference
    log-probs from the tiny model, as the pair stage leaves them."""
    import datasets

    model, processor = tiny_policy
    rows = []
    for q in make_queries("train", 16, seed=5):
        wrong = "no" if q["answer"] != "no" else "yes"
        rows.append({"prompt": user_prompt(q["question"]), "images": [q["image"]],
                     "chosen": assistant_message(q["answer"]), "rejected": assistant_message(wrong),
                     "rejected_extra": [], "score_chosen": 1.0, "score_rejected": 0.0})
    encoded, kept, _ = encode_pairs(processor, rows, TRAIN["max_length"])
    chosen, rejected, _ = reference_pass(model, processor, encoded, TRAIN["ref_batch_size"])
    pairs = [rows[i] | {"ref_chosen_logp": c, "ref_rejected_logp": r} for i, c, r in zip(kept, chosen, rejected)]
    out = tmp_path_factory.mktemp("round") / "pairs"
    with stage_output(out, "pair", {}) as (tmp, manifest):
        datasets.Dataset.from_list(pairs).save_to_disk(str(tmp / "dataset"))
        manifest["counts"] = {"pairs": len(pairs)}
    return out


def test_two_processes_give_the_in_process_curve(tiny_model_dir, pairs_dir, tmp_path, monkeypatch):
    import datasets

    from tasks.train import train

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two ranks on a shared machine: one thread each
    model_cfg = {"name_or_path": str(tiny_model_dir), "dtype": "float32", "device": "cpu", "lora": {"enabled": False}}
    cfg = {"model": model_cfg, "method": {"_target_": "methods.seva.SeVa"},
           "loss": {"_target_": "models.losses.DPOLoss", "beta": 0.1}, "train": TRAIN, "seed": 0}
    checkpoint = train.fn(str(tmp_path / "run"), 1, cfg, str(pairs_dir), None)
    launched = read_jsonl(tmp_path / "run" / "round_1" / "checkpoint" / "train_log.jsonl")

    model, processor = load_policy(model_cfg, None, trainable=True)
    pairs = list(datasets.load_from_disk(str(pairs_dir / "dataset")))
    here = train_pairs(model, processor, pairs, DPOLoss(beta=0.1), TRAIN, seed=cfg["seed"] * 1000 + 1)

    assert len(launched) == len(here) == TRAIN["max_steps"]
    for name in ("loss", "grad_norm", "rewards/margin", "lr"):
        a, b = [h[name] for h in launched], [h[name] for h in here]
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), name
    # At step 0 the policy is the reference: every margin is 0 up to float noise, whose sign
    # decides "accuracy" there; from step 1 on the margins are real.
    assert [h["rewards/accuracy"] for h in launched[1:]] == [h["rewards/accuracy"] for h in here[1:]]
    assert here[-1]["loss"] < here[0]["loss"]  # it trained: the comparison is not of two no-ops
    print("\nloss, 2 processes:", [h["loss"] for h in launched], "\nloss, in process:", [h["loss"] for h in here],
          "\nmax relative difference:", max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(launched, here)))

    # Final weights: the update each run made, compared over all parameters at once. Per element,
    # AdamW divides by the root of the squared-gradient average, which lifts float noise in
    # near-zero gradients (the vision tower's) to ~1e-4 absolute, so a global measure is the fair one.
    # The per-element bound is a share of the largest move AdamW can make (~lr a step): a run on
    # other pairs or another seed differs by a good part of that, float noise by well under 1%.
    base, _ = load_policy(model_cfg, None)
    trained, _ = load_policy(model_cfg, checkpoint)
    flat = {name: torch.cat([p.detach().flatten() for p in m.parameters()])
            for name, m in (("base", base), ("launched", trained), ("here", model))}
    update = flat["here"] - flat["base"]
    gap = (flat["launched"] - flat["here"]).norm() / update.norm()
    print("relative difference of the weight updates:", gap.item(), "update norm:", update.norm().item())
    assert gap < 1e-3 and (flat["launched"] - flat["here"]).abs().max() < 0.01 * TRAIN["lr"] * TRAIN["max_steps"]
    manifest = read_manifest(checkpoint)
    assert manifest["counts"] == {"pairs": 16, "steps": TRAIN["max_steps"], "carried_forward": 0}
    assert not (tmp_path / "run" / "round_1" / "checkpoint" / "accelerate").exists()


def test_a_failed_launch_raises_with_the_tail_of_its_output():
    from tasks.train import run_streaming

    script = "import sys\nfor i in range(100): print('line', i)\nsys.exit('rank 1: out of memory')"
    with pytest.raises(RuntimeError, match=r"exited with 1[\s\S]*line 99\nrank 1: out of memory") as err:
        run_streaming([sys.executable, "-c", script], dict(os.environ))
    assert "line 50" not in str(err.value)  # the tail, not the whole output



def test_deepspeed_without_gpus_fails_before_launching(tmp_path):
    from tasks.train import train_launched

    cfg = {"train": TRAIN | {"accelerate_config": "zero2"}}
    with pytest.raises(ValueError, match="uses DeepSpeed, which needs CUDA GPUs"):
        train_launched(cfg, 1, "unused", None, {}, tmp_path, tmp_path / "checkpoint")
    assert not (tmp_path / "accelerate").exists()
