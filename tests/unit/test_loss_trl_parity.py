"""PrefLoop's losses against TRL 1.16's own DPO loss code on identical log-probs.

TRL computes its losses inside ``DPOTrainer._compute_loss`` (no standalone function), right
after a model forward. We call that unbound method on a ``SimpleNamespace`` carrying the
attributes it reads, with a stand-in model whose fused-LM-head output is a fixed tensor of
per-token log-probs (zero where the label is -100, as TRL's fused head returns). Everything
from the log-probs to the loss (the loss formulas, IPO's length normalisation, SFT's token
pooling, the ``loss_type`` / ``loss_weights`` mix) is TRL's code, configured by a real
``DPOConfig``. Reference log-probs go in precomputed (``precompute_ref_log_probs``).

Where PrefLoop intentionally differs from TRL 1.x (BCO's running reward shift, which 1.x
dropped from ``bco_pair``) the test checks the documented formula by hand on top of TRL's.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from models.losses import (
    BCOLoss,
    BCOPairLoss,
    DPOLoss,
    HingeLoss,
    IPOLoss,
    MPOLoss,
    PairLogps,
    RobustDPOLoss,
    SFTLoss,
    Weighted,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

# DPOConfig itself triggers transformers' deprecation notice for `gradient_checkpointing`.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

CHOSEN_LENGTHS, REJECTED_LENGTHS = [3, 5, 2, 4], [4, 2, 6, 4]


def make_pairs(chosen_lengths=CHOSEN_LENGTHS, rejected_lengths=REJECTED_LENGTHS, seed=0):
    """Per-token policy log-probs [2B, L] (rows: chosen then rejected, zero past each length),
    their lengths [2B], and reference summed log-probs (chosen [B], rejected [B])."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(chosen_lengths + rejected_lengths)
    width = int(lengths.max())
    valid = torch.arange(width)[None, :] < lengths[:, None]
    per_token = (-3.0 * torch.rand(len(lengths), width, generator=gen)).masked_fill(~valid, 0.0)
    ref = per_token.sum(1) + torch.randn(len(lengths), generator=gen)  # differ from the policy by ~1 nat
    B = len(chosen_lengths)
    return per_token, lengths, ref[:B], ref[B:]


class FusedHeadStandIn:
    """Returns what ``model(..., labels=labels, fused_lm_head=True)`` returns in TRL 1.16: per-token
    log-probs of the next token, zeroed where the (shifted) label is -100, plus the per-token
    statistics TRL logs (irrelevant to the loss)."""

    def __init__(self, per_token: torch.Tensor):
        self.per_token = per_token

    def __call__(self, labels, **kwargs):
        valid = labels[:, 1:] != -100
        zeros = torch.zeros_like(self.per_token)
        return SimpleNamespace(log_probs=self.per_token.masked_fill(~valid, 0.0), entropy=zeros,
                               mean_logits=zeros, is_top1=zeros.bool(), log_sum_sq_probs=zeros)


def trl_loss(per_token, lengths, ref_chosen, ref_rejected, **config) -> torch.Tensor:
    """TRL 1.16's DPO loss (a scalar: sum_k weight_k * mean over pairs of loss_k)."""
    args = DPOConfig(output_dir="unused", report_to=[], use_cpu=True, bf16=False,
                     precompute_ref_log_probs=True, **config)
    rows, width = per_token.shape
    # One prompt token, then the completion: completion_mask marks the completion tokens.
    completion_mask = torch.zeros(rows, width + 1, dtype=torch.long)
    completion_mask[:, 1:] = (torch.arange(width)[None, :] < lengths[:, None]).long()
    inputs = {"input_ids": torch.ones(rows, width + 1, dtype=torch.long), "attention_mask": completion_mask.clone(),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    inputs["attention_mask"][:, 0] = 1
    trainer = SimpleNamespace(  # the attributes DPOTrainer.__init__ sets from args and _compute_loss reads
        args=args, beta=args.beta, loss_types=args.loss_type,
        loss_weights=args.loss_weights or [1.0] * len(args.loss_type),
        label_smoothing=args.label_smoothing, use_weighting=args.use_weighting, ld_alpha=args.ld_alpha,
        f_divergence_type=args.f_divergence_type, precompute_ref_logps=args.precompute_ref_log_probs,
        aux_loss_enabled=False, model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    return DPOTrainer._compute_loss(trainer, FusedHeadStandIn(per_token), inputs, return_outputs=False)


def prefloop_loss(loss_fn, per_token, lengths, ref_chosen, ref_rejected, batch=None):
    """PrefLoop's loss on the same numbers, reduced as the trainer does (mean over pairs)."""
    B = len(ref_chosen)
    summed = per_token.sum(1)
    policy = PairLogps(summed[:B], summed[B:], lengths[:B], lengths[B:])
    reference = PairLogps(ref_chosen, ref_rejected, lengths[:B], lengths[B:])
    loss, metrics = loss_fn(policy, reference, batch or {"index": list(range(B))})
    return loss.mean(), metrics


@pytest.fixture(scope="module")
def pairs():
    return make_pairs()


@pytest.mark.parametrize("loss_fn,config", [
    (DPOLoss(beta=0.1), {"loss_type": "sigmoid", "beta": 0.1}),
    (DPOLoss(beta=0.3, length_normalise=True), {"loss_type": "sigmoid_norm", "beta": 0.3}),
    (IPOLoss(beta=0.1), {"loss_type": "ipo", "beta": 0.1}),
    (IPOLoss(beta=0.5), {"loss_type": "ipo", "beta": 0.5}),
    (RobustDPOLoss(beta=0.1, label_smoothing=0.2), {"loss_type": "robust", "beta": 0.1, "label_smoothing": 0.2}),
    (HingeLoss(beta=0.2), {"loss_type": "hinge", "beta": 0.2}),
    (BCOPairLoss(beta=0.1), {"loss_type": "bco_pair", "beta": 0.1}),
    (SFTLoss(reduction="token_mean"), {"loss_type": "sft"}),
], ids=["dpo", "dpo_norm", "ipo", "ipo_beta0.5", "robust", "hinge", "bco_pair", "sft_token_mean"])
def test_single_loss_matches_trl(pairs, loss_fn, config):
    expected = trl_loss(*pairs, **config)
    got, _ = prefloop_loss(loss_fn, *pairs)
    assert float(got) == pytest.approx(float(expected), abs=1e-4)


def test_sft_per_sequence_mean_matches_trl_on_equal_lengths():
    """MPO's paper SFT (per-sequence token mean, PrefLoop's default) equals TRL's pooled token
    mean when all chosen responses have the same length; with unequal lengths they differ
    (``reduction="token_mean"`` is TRL's)."""
    equal = make_pairs([4, 4, 4, 4], [3, 5, 2, 6], seed=1)
    assert float(prefloop_loss(SFTLoss(), *equal)[0]) == pytest.approx(float(trl_loss(*equal, loss_type="sft")), abs=1e-4)
    unequal = make_pairs()
    assert abs(float(prefloop_loss(SFTLoss(), *unequal)[0]) - float(trl_loss(*unequal, loss_type="sft"))) > 1e-3


MPO_TRL = {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0], "beta": 0.1}


def mpo_mix_trl_form() -> MPOLoss:
    """The MPO mix with TRL 1.x's components: unshifted bco_pair and pooled-token SFT."""
    return MPOLoss(components={"dpo": Weighted(0.8, DPOLoss(beta=0.1)), "bco": Weighted(0.2, BCOPairLoss(beta=0.1)),
                               "sft": Weighted(1.0, SFTLoss(reduction="token_mean"))})


def test_mpo_mix_matches_trl_loss_type_list(pairs):
    expected = trl_loss(*pairs, **MPO_TRL)
    got, metrics = prefloop_loss(mpo_mix_trl_form(), *pairs)
    assert float(got) == pytest.approx(float(expected), abs=1e-4)
    parts = [trl_loss(*pairs, loss_type=t, beta=0.1) for t in ("sigmoid", "bco_pair", "sft")]
    for name, part in zip(("dpo", "bco", "sft"), parts):
        assert float(metrics[f"loss/{name}"]) == pytest.approx(float(part), abs=1e-4)


def test_mpo_mix_gradients_match_trl(pairs):
    per_token, *rest = pairs
    leaf_trl, leaf_ours = per_token.clone().requires_grad_(), per_token.clone().requires_grad_()
    (grad_trl,) = torch.autograd.grad(trl_loss(leaf_trl, *rest, **MPO_TRL), leaf_trl)
    (grad_ours,) = torch.autograd.grad(prefloop_loss(mpo_mix_trl_form(), leaf_ours, *rest)[0], leaf_ours)
    valid = torch.arange(per_token.shape[1])[None, :] < rest[0][:, None]
    assert torch.allclose(grad_ours[valid], grad_trl[valid], atol=1e-5)


def test_mpo_paper_mix_is_trl_mix_plus_the_bco_shift():
    """conf/loss/mpo.yaml's form (BCO with the running shift, per-sequence SFT) on equal chosen
    lengths: 0.8 * TRL sigmoid + 1.0 * TRL sft + 0.2 * the shifted BCO computed by hand, where
    the shift after the first batch is that batch's mean reward (updated before the loss)."""
    per_token, lengths, ref_chosen, ref_rejected = make_pairs([4, 4, 4, 4], [3, 5, 2, 6], seed=2)
    mix = MPOLoss(components={"dpo": Weighted(0.8, DPOLoss(beta=0.1)), "bco": Weighted(0.2, BCOLoss(beta=0.1)),
                              "sft": Weighted(1.0, SFTLoss())})
    got, metrics = prefloop_loss(mix, per_token, lengths, ref_chosen, ref_rejected)

    B, summed = len(ref_chosen), per_token.sum(1).tolist()
    rc = [0.1 * (p - r) for p, r in zip(summed[:B], ref_chosen.tolist())]
    rr = [0.1 * (p - r) for p, r in zip(summed[B:], ref_rejected.tolist())]
    delta = sum(rc + rr) / (2 * B)
    logsig = lambda x: -math.log1p(math.exp(-x))
    bco = sum(-logsig(c - delta) - logsig(-(r - delta)) for c, r in zip(rc, rr)) / B
    rest = trl_loss(per_token, lengths, ref_chosen, ref_rejected, loss_type=["sigmoid", "sft"],
                    loss_weights=[0.8, 1.0], beta=0.1)
    assert float(got) == pytest.approx(float(rest) + 0.2 * bco, abs=1e-4)
    assert float(metrics["bco/delta"]) == pytest.approx(delta, abs=1e-6)
