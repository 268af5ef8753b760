"""Every loss against values computed by hand (plain Python math on the same numbers), BCO's
running shift and its state, the MPO mix, multi-negative DPO, and every conf/loss option."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate

from flows.schema import register, validate
from models.losses import (
    BCOLoss,
    BCOPairLoss,
    CDPOLoss,
    DPOLoss,
    HingeLoss,
    IPOLoss,
    MPOLoss,
    MultiNegativeDPOLoss,
    PairLogps,
    RobustDPOLoss,
    SDPOLoss,
    SFTLoss,
    Weighted,
)

CONF = Path(__file__).resolve().parents[2] / "conf"
LOSS_OPTIONS = sorted(p.stem for p in (CONF / "loss").glob("*.yaml") if not p.stem.endswith("_schema"))

# Two pairs. Log-ratios: chosen [0.5, -0.5], rejected [-0.2, 0.4]; z = [0.7, -0.9].
P_CHOSEN, P_REJECTED = [-5.0, -7.0], [-6.0, -6.0]
R_CHOSEN, R_REJECTED = [-5.5, -6.5], [-5.8, -6.4]
N_CHOSEN, N_REJECTED = [2, 4], [3, 5]
CR = [p - r for p, r in zip(P_CHOSEN, R_CHOSEN)]
RR = [p - r for p, r in zip(P_REJECTED, R_REJECTED)]
Z = [c - r for c, r in zip(CR, RR)]
SCORES_W, SCORES_L = [0.9, 0.6], [0.3, 0.6]


def near(x):
    return pytest.approx(x, abs=1e-5)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def logps(chosen, rejected, extra=None, mask=None) -> PairLogps:
    t = lambda v, dtype=torch.float32: None if v is None else torch.tensor(v, dtype=dtype)
    return PairLogps(t(chosen), t(rejected), t(N_CHOSEN, torch.long), t(N_REJECTED, torch.long),
                     t(extra), t(mask, torch.bool))


POLICY, REFERENCE = logps(P_CHOSEN, P_REJECTED), logps(R_CHOSEN, R_REJECTED)
BATCH = {"index": [0, 1], "score_chosen": torch.tensor(SCORES_W), "score_rejected": torch.tensor(SCORES_L)}


def check(loss_fn, expected, policy=POLICY, reference=REFERENCE, batch=BATCH):
    loss, metrics = loss_fn(policy, reference, batch)
    assert loss.shape == (len(expected),)
    assert loss.tolist() == near(expected)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
        assert metrics[key].dim() == 0
    return loss, metrics


def test_dpo():
    _, metrics = check(DPOLoss(beta=0.1), [-logsig(0.1 * z) for z in Z])
    assert float(metrics["rewards/chosen"]) == near(0.1 * sum(CR) / 2)
    assert float(metrics["rewards/margin"]) == near(0.1 * sum(Z) / 2)
    assert float(metrics["rewards/accuracy"]) == 0.5


def test_dpo_length_normalised():
    zn = [c / nc - r / nr for c, r, nc, nr in zip(CR, RR, N_CHOSEN, N_REJECTED)]
    check(DPOLoss(beta=0.5, length_normalise=True), [-logsig(0.5 * z) for z in zn])


def test_ipo_length_normalised_by_default():
    zn = [c / nc - r / nr for c, r, nc, nr in zip(CR, RR, N_CHOSEN, N_REJECTED)]
    check(IPOLoss(beta=0.1), [(z - 1 / (2 * 0.1)) ** 2 for z in zn])
    check(IPOLoss(beta=0.25, length_normalise=False), [(z - 2.0) ** 2 for z in Z])


def test_cdpo():
    eps = 0.2
    check(CDPOLoss(beta=0.1, label_smoothing=eps),
          [-(1 - eps) * logsig(0.1 * z) - eps * logsig(-0.1 * z) for z in Z])


def test_robust():
    eps = 0.2
    check(RobustDPOLoss(beta=0.1, label_smoothing=eps),
          [((1 - eps) * -logsig(0.1 * z) + eps * logsig(-0.1 * z)) / (1 - 2 * eps) for z in Z])


def test_cdpo_and_robust_reduce_to_dpo_without_noise():
    dpo = [-logsig(0.1 * z) for z in Z]
    check(CDPOLoss(label_smoothing=0.0), dpo)
    check(RobustDPOLoss(label_smoothing=0.0), dpo)


@pytest.mark.parametrize("loss_cls", [CDPOLoss, RobustDPOLoss])
def test_flip_rate_must_be_below_half(loss_cls):
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        loss_cls(label_smoothing=0.5)


def test_hinge():
    check(HingeLoss(beta=2.0), [max(0.0, 1 - 2.0 * z) for z in Z])  # first pair past the margin: 0


HAND_MAPS = {
    "identity": lambda s: s,
    "sqrt": math.sqrt,
    "log": lambda s: math.log(max(s, 1e-6)),
    "logit": lambda s: math.log(s / (1 - s)),
}


@pytest.mark.parametrize("score_map", sorted(HAND_MAPS))
def test_sdpo_score_maps(score_map):
    g = lambda s: 2.0 * HAND_MAPS[score_map](s)
    expected = [-logsig(0.1 * z - (g(sw) - g(sl))) for z, sw, sl in zip(Z, SCORES_W, SCORES_L)]
    _, metrics = check(SDPOLoss(beta=0.1, score_map=score_map, score_scale=2.0), expected)
    assert float(metrics["sdpo/score_margin"]) == near((g(0.9) - g(0.3)) / 2)


def test_sdpo_equal_scores_or_zero_scale_is_dpo():
    dpo = [-logsig(0.1 * z) for z in Z]
    loss, _ = SDPOLoss(score_scale=5.0)(POLICY, REFERENCE, BATCH)
    assert float(loss[1]) == near(dpo[1])  # second pair: equal scores
    check(SDPOLoss(score_scale=0.0), dpo)


def test_sdpo_rejects_non_increasing_options():
    with pytest.raises(ValueError, match="monotone increasing"):
        SDPOLoss(score_map="square")
    with pytest.raises(ValueError, match="score_scale"):
        SDPOLoss(score_scale=-1.0)
    with pytest.raises(KeyError, match="score_chosen"):
        SDPOLoss()(POLICY, REFERENCE, {"index": [0, 1]})


def test_bco_pair_is_unshifted_bco():
    check(BCOPairLoss(beta=0.1), [-logsig(0.1 * c) - logsig(-0.1 * r) for c, r in zip(CR, RR)])


# Three batches of policy log-probs against REFERENCE; rewards are beta * log-ratio.
BCO_BATCHES = [([-5.0, -7.0], [-6.0, -6.0]), ([-4.0, -6.0], [-7.0, -8.0]), ([-6.0, -5.0], [-5.0, -7.5])]


def bco_by_hand(beta: float, batches):
    """Per batch: (expected loss [B], delta after the update): delta = cumulative mean of the
    batch-mean rewards, updated with the current batch before the loss."""
    out, means = [], []
    for chosen, rejected in batches:
        rc = [beta * (p - r) for p, r in zip(chosen, R_CHOSEN)]
        rr = [beta * (p - r) for p, r in zip(rejected, R_REJECTED)]
        means.append(sum(rc + rr) / len(rc + rr))
        delta = sum(means) / len(means)
        out.append(([-logsig(c - delta) - logsig(-(r - delta)) for c, r in zip(rc, rr)], delta))
    return out


def test_bco_running_delta_over_three_batches():
    bco, expected = BCOLoss(beta=0.5), bco_by_hand(0.5, BCO_BATCHES)
    assert bco.state_dict() == {"delta": 0.0, "count": 0}
    for (chosen, rejected), (loss, delta) in zip(BCO_BATCHES, expected):
        _, metrics = check(bco, loss, policy=logps(chosen, rejected))
        assert bco.delta == near(delta) and float(metrics["bco/delta"]) == near(delta)
    assert bco.count == 3
    assert len({round(d, 6) for _, d in expected}) == 3  # the shift really moved


def test_bco_state_dict_round_trip():
    first = BCOLoss(beta=0.5)
    for chosen, rejected in BCO_BATCHES[:2]:
        first(logps(chosen, rejected), REFERENCE, BATCH)
    state = json.loads(json.dumps(first.state_dict()))  # plain, serialisable
    resumed = BCOLoss(beta=0.5)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == first.state_dict()
    batch3 = logps(*BCO_BATCHES[2])
    loss_a, _ = first(batch3, REFERENCE, BATCH)
    loss_b, _ = resumed(batch3, REFERENCE, BATCH)
    assert torch.equal(loss_a, loss_b) and resumed.delta == first.delta
    assert resumed.delta == near(bco_by_hand(0.5, BCO_BATCHES)[2][1])


def test_sft_reductions():
    check(SFTLoss(), [-p / n for p, n in zip(P_CHOSEN, N_CHOSEN)])
    check(SFTLoss(reduction="sum"), [-p for p in P_CHOSEN])
    loss, _ = check(SFTLoss(reduction="token_mean"), [-p / (sum(N_CHOSEN) / 2) for p in P_CHOSEN])
    assert float(loss.mean()) == near(-sum(P_CHOSEN) / sum(N_CHOSEN))
    with pytest.raises(ValueError, match="reduction"):
        SFTLoss(reduction="max")


def test_mpo_mix_is_the_weighted_sum_of_its_components():
    mix = MPOLoss(components={"dpo": Weighted(0.8, DPOLoss(beta=0.1)),
                              "bco": {"weight": 0.2, "loss": BCOPairLoss(beta=0.1)},
                              "sft": Weighted(1.0, SFTLoss())})
    dpo = [-logsig(0.1 * z) for z in Z]
    bco = [-logsig(0.1 * c) - logsig(-0.1 * r) for c, r in zip(CR, RR)]
    sft = [-p / n for p, n in zip(P_CHOSEN, N_CHOSEN)]
    _, metrics = check(mix, [0.8 * d + 0.2 * b + 1.0 * s for d, b, s in zip(dpo, bco, sft)])
    assert float(metrics["loss/dpo"]) == near(sum(dpo) / 2)
    assert float(metrics["loss/bco"]) == near(sum(bco) / 2)
    assert float(metrics["loss/sft"]) == near(sum(sft) / 2)
    assert float(metrics["rewards/margin"]) == near(0.1 * sum(Z) / 2)  # the first component's
    assert mix.state_dict() == {}


def test_mpo_mix_carries_bco_state():
    mix = MPOLoss(components={"dpo": Weighted(0.8, DPOLoss()), "bco": Weighted(0.2, BCOLoss(beta=0.5))})
    for chosen, rejected in BCO_BATCHES[:2]:
        _, metrics = mix(logps(chosen, rejected), REFERENCE, BATCH)
    delta = bco_by_hand(0.5, BCO_BATCHES)[1][1]
    assert float(metrics["bco/delta"]) == near(delta)
    resumed = MPOLoss(components={"dpo": Weighted(0.8, DPOLoss()), "bco": Weighted(0.2, BCOLoss(beta=0.5))})
    resumed.load_state_dict(json.loads(json.dumps(mix.state_dict())))
    assert resumed.state_dict() == {"bco": {"delta": near(delta), "count": 2}}
    with pytest.raises(ValueError, match="'sft'"):
        resumed.load_state_dict({"sft": {}})


@pytest.mark.parametrize("components,match", [
    ({}, "empty"),
    ({"dpo": {"wieght": 1.0, "loss": DPOLoss()}}, "unknown keys"),
    ({"dpo": {"weight": 1.0, "loss": {"_target_": "models.losses.DPOLoss"}}}, "no instantiated loss"),
    ({"dpo": {"weight": "high", "loss": DPOLoss()}}, "must be a number"),
])
def test_mpo_rejects_malformed_components(components, match):
    with pytest.raises(ValueError, match=match):
        MPOLoss(components=components)


EXTRA_P = [[-6.5, -9.0], [-6.2, 0.0]]  # second pair: one real extra, one padded entry
EXTRA_R = [[-6.0, -8.0], [-6.6, 0.0]]
EXTRA_MASK = [[True, True], [True, False]]


def test_multi_negative_eq18():
    extra = [[p - r for p, r, m in zip(ps, rs, ms) if m] for ps, rs, ms in zip(EXTRA_P, EXTRA_R, EXTRA_MASK)]
    expected = [-logsig(0.1 * c - 0.1 * (r + sum(e))) for c, r, e in zip(CR, RR, extra)]
    policy, reference = logps(P_CHOSEN, P_REJECTED, EXTRA_P, EXTRA_MASK), logps(R_CHOSEN, R_REJECTED, EXTRA_R)
    _, metrics = check(MultiNegativeDPOLoss(beta=0.1), expected, policy, reference)
    assert float(metrics["multi/negatives"]) == near(2.5)
    assert float(metrics["rewards/rejected_extra"]) == near(0.1 * sum(sum(e) for e in extra) / 3)


def test_multi_negative_softmax_eq16():
    beta = 0.1
    extra = [[p - r for p, r, m in zip(ps, rs, ms) if m] for ps, rs, ms in zip(EXTRA_P, EXTRA_R, EXTRA_MASK)]
    expected = [-(beta * c - math.log(math.exp(beta * c) + sum(math.exp(beta * x) for x in [r, *e])))
                for c, r, e in zip(CR, RR, extra)]
    policy, reference = logps(P_CHOSEN, P_REJECTED, EXTRA_P, EXTRA_MASK), logps(R_CHOSEN, R_REJECTED, EXTRA_R)
    check(MultiNegativeDPOLoss(beta=beta, softmax=True), expected, policy, reference)


@pytest.mark.parametrize("softmax", [False, True])
def test_multi_negative_reduces_to_dpo_with_one_rejected(softmax):
    dpo = [-logsig(0.1 * z) for z in Z]
    check(MultiNegativeDPOLoss(softmax=softmax), dpo)  # no extras
    masked = logps(P_CHOSEN, P_REJECTED, EXTRA_P, [[False, False], [False, False]])
    check(MultiNegativeDPOLoss(softmax=softmax), dpo, masked, logps(R_CHOSEN, R_REJECTED, EXTRA_R))


def test_multi_negative_padding_gets_no_gradient():
    extra = torch.tensor([[-6.5, float("nan")], [-6.2, -1e9]], requires_grad=True)
    policy = PairLogps(POLICY.chosen, POLICY.rejected, POLICY.chosen_tokens, POLICY.rejected_tokens,
                       extra, torch.tensor([[True, False], [True, False]]))
    reference = logps(R_CHOSEN, R_REJECTED, [[-6.0, 0.0], [-6.6, 0.0]])
    for softmax in (False, True):
        loss, _ = MultiNegativeDPOLoss(softmax=softmax)(policy, reference, BATCH)
        (grad,) = torch.autograd.grad(loss.sum(), extra)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all() and (grad[:, 1] == 0).all()


# --- every conf/loss option composes, validates, instantiates and runs


@pytest.fixture(scope="module")
def hydra_ctx():
    register()
    with initialize_config_module("conf", version_base="1.3"):
        yield


@pytest.mark.parametrize("name", LOSS_OPTIONS)
def test_every_loss_config_composes_and_instantiates(hydra_ctx, name):
    cfg = compose("config", overrides=[f"loss={name}"])
    validate(cfg)
    loss_fn = instantiate(cfg.loss, _convert_="all")
    policy = logps(P_CHOSEN, P_REJECTED, EXTRA_P, EXTRA_MASK)
    loss, metrics = loss_fn(policy, logps(R_CHOSEN, R_REJECTED, EXTRA_R), BATCH)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    assert {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"} <= set(metrics)


def test_mpo_configs(hydra_ctx):
    mpo = instantiate(compose("config", overrides=["loss=mpo"]).loss, _convert_="all")
    assert {n: (p.weight, type(p.loss)) for n, p in mpo.components.items()} == {
        "dpo": (0.8, DPOLoss), "bco": (0.2, BCOLoss), "sft": (1.0, SFTLoss)}
    assert mpo.components["sft"].loss.reduction == "mean" and mpo.components["dpo"].loss.beta == 0.1
    released = instantiate(compose("config", overrides=["loss=uvcot_released"]).loss, _convert_="all")
    assert {n: (p.weight, type(p.loss)) for n, p in released.components.items()} == {
        "dpo": (0.1, DPOLoss), "sft": (0.9, SFTLoss)}
    assert released.components["sft"].loss.reduction == "sum"


def test_mpo_components_can_be_changed_added_and_removed(hydra_ctx):
    cfg = compose("config", overrides=["loss=mpo", "loss.components.bco.loss.beta=0.3",
                                       "+loss@loss.components.ipo.loss=ipo", "loss.components.ipo.weight=0.5",
                                       "~loss.components.sft"])
    validate(cfg)
    mix = instantiate(cfg.loss, _convert_="all")
    assert list(mix.components) == ["dpo", "bco", "ipo"]
    assert mix.components["bco"].loss.beta == 0.3 and mix.components["ipo"].weight == 0.5


@pytest.mark.parametrize("overrides", [
    ["loss=mpo", "loss.components.dpo.wieght=1"],
    ["loss=mpo", "loss.components.dpo.loss.betaa=1"],
    ["loss=uvcot_released", "loss.components.sft.loss.reductio=sum"],
    ["loss=sdpo", "loss.score_mapp=log"],
    ["loss=bco", "loss.beta=high"],
])
def test_misspelt_loss_keys_fail_at_composition(hydra_ctx, overrides):
    with pytest.raises(ConfigCompositionException):
        compose("config", overrides=overrides)


def test_bad_option_values_fail_at_instantiation(hydra_ctx):
    for overrides, match in [(["loss=sdpo", "loss.score_map=square"], "monotone increasing"),
                             (["loss=uvcot_released", "loss.components.sft.loss.reduction=max"], "reduction")]:
        cfg = compose("config", overrides=overrides)
        with pytest.raises(InstantiationException, match=match):
            instantiate(cfg.loss, _convert_="all")
