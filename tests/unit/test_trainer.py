"""The training loop: multi-negative pairs reach the loss, and a killed training run resumes
from its mid-training save with the same weights and the same BCO running delta."""

import pytest
import torch

from evaluation.suites.shapes import make_queries
from models.load import load_policy
from models.losses import BCOLoss, DPOLoss, MultiNegativeDPOLoss
from models.records import assistant_message, user_prompt
from models.trainer import encode_pairs, pair_logps, reference_pass, train_pairs

CFG = dict(lr=5e-3, weight_decay=0.0, epochs=1, max_steps=6, batch_size=4, grad_accum=1, warmup_ratio=0.0,
           max_grad_norm=1.0, max_length=512, ref_batch_size=8, save_every=2)


def _model_cfg(tiny_model_dir):
    return {"name_or_path": str(tiny_model_dir), "dtype": "float32", "device": "cpu", "lora": {"enabled": False}}


def _pairs(processor, model, n=10, extras=False):
    rows = []
    for i, q in enumerate(make_queries("train", n, seed=9)):
        wrong = ["no", "blue", "three"] if q["answer"] not in ("no", "blue", "three") else ["yes", "red", "two"]
        rows.append({"prompt": user_prompt(q["question"]), "images": [q["image"]],
                     "chosen": assistant_message(q["answer"]), "rejected": assistant_message(wrong[0]),
                     "rejected_extra": wrong[1 : 1 + i % 3] if extras else [],
                     "score_chosen": 1.0, "score_rejected": 0.0})
    encoded, kept, _ = encode_pairs(processor, rows, 512)
    chosen, rejected, extra = reference_pass(model, processor, encoded, 4)
    return [rows[i] | {"ref_chosen_logp": c, "ref_rejected_logp": r, "ref_rejected_extra_logp": e}
            for i, c, r, e in zip(kept, chosen, rejected, extra)]


def test_extra_negatives_are_scored_like_primary_ones(tiny_policy):
    model, processor = tiny_policy
    pairs = _pairs(processor, model, n=6, extras=True)
    encoded, _, _ = encode_pairs(processor, pairs, 512)
    out = pair_logps(model, encoded, processor.tokenizer.pad_token_id)
    assert out.rejected_extra.shape == (6, 2)
    assert out.rejected_extra_mask.tolist() == [[k < i % 3 for k in range(2)] for i in range(6)]
    # An extra negative's log-prob equals the same text scored as a primary rejected response.
    for i, pair in enumerate(pairs):
        for k, text in enumerate(pair["rejected_extra"]):
            alone = encode_pairs(processor, [pair | {"rejected": assistant_message(text), "rejected_extra": []}], 512)[0]
            single = pair_logps(model, alone, processor.tokenizer.pad_token_id)
            assert out.rejected_extra[i, k].item() == pytest.approx(single.rejected.item(), abs=1e-4)
            assert pair["ref_rejected_extra_logp"][k] == pytest.approx(single.rejected.item(), abs=1e-4)
    concat = pair_logps(model, encoded, processor.tokenizer.pad_token_id, shared_prefix=False)
    torch.testing.assert_close(concat.rejected_extra[out.rejected_extra_mask],
                               out.rejected_extra[out.rejected_extra_mask], atol=1e-4, rtol=0)


def test_multi_negative_training_runs_and_uses_the_extras(tiny_model_dir):
    model, processor = load_policy(_model_cfg(tiny_model_dir), None, trainable=True)
    pairs = _pairs(processor, model, extras=True)
    history = train_pairs(model, processor, pairs, MultiNegativeDPOLoss(beta=0.1), CFG | {"save_every": 0}, seed=0)
    assert len(history) == 6 and all(h["multi/negatives"] > 1.0 for h in history)
    # At step 0 the policy is the reference: every log-ratio is 0, so the loss is log 2.
    assert history[0]["loss"] == pytest.approx(0.6931, abs=1e-3)


class Killed(Exception):
    pass


def _kill_at(step_to_die):
    def hook(step):
        if step == step_to_die:
            raise Killed

    return hook


def test_killed_training_resumes_with_same_weights_and_bco_delta(tiny_model_dir, tmp_path):
    cfg = _model_cfg(tiny_model_dir)
    frozen, processor = load_policy(cfg, None)
    pairs = _pairs(processor, frozen)

    straight, _ = load_policy(cfg, None, trainable=True)
    bco_straight = BCOLoss(beta=0.1)
    history = train_pairs(straight, processor, pairs, bco_straight, CFG, seed=3, resume_dir=tmp_path / "a")

    resumed, _ = load_policy(cfg, None, trainable=True)
    with pytest.raises(Killed):  # dies after step 4; the last save was after step 3
        train_pairs(resumed, processor, pairs, BCOLoss(beta=0.1), CFG, seed=3, resume_dir=tmp_path / "b",
                    on_step=_kill_at(4))
    fresh, _ = load_policy(cfg, None, trainable=True)  # a new process: nothing survives but the save
    bco_resumed = BCOLoss(beta=0.1)
    again = train_pairs(fresh, processor, pairs, bco_resumed, CFG, seed=3, resume_dir=tmp_path / "b")

    assert [h["step"] for h in again] == list(range(6))
    assert [h["loss"] for h in again] == pytest.approx([h["loss"] for h in history], abs=1e-6)
    assert bco_resumed.state_dict() == pytest.approx(bco_straight.state_dict())
    assert bco_straight.state_dict()["count"] == 6 and bco_straight.state_dict()["delta"] != 0.0
    for (name, a), (_, b) in zip(straight.named_parameters(), fresh.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_dpo_training_without_resume_dir_still_works(tiny_model_dir):
    model, processor = load_policy(_model_cfg(tiny_model_dir), None, trainable=True)
    history = train_pairs(model, processor, _pairs(processor, model, n=8), DPOLoss(0.1), CFG, seed=0)
    assert len(history) == 6


def test_sgd_steps_scale_with_the_gradient_where_adamw_steps_do_not():
    """train.optimizer: AdamW's first step moves every weight by about lr whatever its gradient's
    size (m / sqrt(v) is the gradient's sign); SGD's is lr x gradient (flows/schema.TrainSchema)."""
    from models.trainer import optimizer_setup

    def first_step(name: str) -> torch.Tensor:
        model = torch.nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            model.weight.zero_()
        cfg = {"batch_size": 1, "grad_accum": 1, "lr": 0.1, "weight_decay": 0.0, "warmup_ratio": 0.0,
               "optimizer": name}
        _, optimizer, _, _ = optimizer_setup(model, cfg, total_steps=1)
        model.weight.grad = torch.tensor([[1.0, 0.001]])
        optimizer.step()
        return -model.weight.detach()[0]

    assert torch.allclose(first_step("adamw"), torch.tensor([0.1, 0.1]), rtol=1e-3)
    assert torch.allclose(first_step("sgd"), torch.tensor([0.1, 0.0001]), rtol=1e-3)
    with pytest.raises(ValueError, match="choose adamw or sgd"):
        first_step("adam")
