"""Re-ranking by the DPO implicit reward on fixed rewards (evaluation/rerank.py)."""

from __future__ import annotations

import math

import pytest

from evaluation.rerank import (
    best_of_n,
    implicit_rewards,
    majority_vote,
    rerank_metrics,
    softmax,
    weighted_vote,
)


def test_implicit_reward_is_beta_times_log_ratio():
    assert implicit_rewards([-1.0, -5.0], [-2.0, -4.0], beta=0.1) == pytest.approx([0.1, -0.1])


def test_softmax_is_stable_and_normalised():
    w = softmax([1000.0, 1000.0, 0.0])
    assert w == pytest.approx([0.5, 0.5, 0.0]) and math.isclose(sum(w), 1.0)


def test_best_of_n_takes_the_highest_reward_first_among_equals():
    assert best_of_n(["a", "b", "c"], [0.1, 0.7, 0.3]) == 1
    assert best_of_n(["a", "b", "c"], [0.5, 0.5, 0.1]) == 0


def test_weighted_vote_sums_softmax_weights_per_answer():
    keys = ["red", "blue", "blue", "green"]
    # weights [3, 1, 1, 2] / 7: red 3/7 beats blue 1/7 + 1/7 and green 2/7
    rewards = [math.log(3), math.log(1), math.log(1), math.log(2)]
    assert weighted_vote(keys, rewards) == 0
    # blue's two samples together outweigh red's single best one: 0.3 + 0.3 > 0.4
    rewards = [math.log(0.4), math.log(0.3), math.log(0.3), math.log(1e-9)]
    assert weighted_vote(keys, rewards) == 1
    assert best_of_n(keys, rewards) == 0  # best-of-N disagrees with the vote here


def test_majority_vote_ignores_rewards_and_breaks_ties_by_first_answer():
    assert majority_vote(["red", "blue", "blue"], [9.0, 0.0, 0.0]) == 1
    assert majority_vote(["red", "blue", "blue", "red"]) == 0


def test_rerank_metrics_on_fixed_rewards():
    items = [
        # q1: the best reward is right, the majority is wrong
        {"keys": ["red", "blue", "blue"], "rewards": [2.0, 0.0, 0.0], "correct": [True, False, False]},
        # q2: everything right
        {"keys": ["one", "one", "one"], "rewards": [0.0, 0.0, 0.0], "correct": [True, True, True]},
        # q3: nothing right
        {"keys": ["yes", "yes", "yes"], "rewards": [1.0, 0.0, -1.0], "correct": [False, False, False]},
        # q4: the best single sample is wrong; the right answer wins the weighted vote
        {"keys": ["left", "right", "right"], "rewards": [math.log(0.4), math.log(0.3), math.log(0.3)],
         "correct": [False, True, True]},
    ]
    metrics, picks = rerank_metrics(items)
    assert metrics["rerank/best_of_n"] == pytest.approx(2 / 4)        # q1, q2
    assert metrics["rerank/weighted_vote"] == pytest.approx(3 / 4)    # q1 (0.78 vs 2 x 0.11), q2, q4
    assert metrics["rerank/majority_vote"] == pytest.approx(2 / 4)    # q2, q4
    assert metrics["rerank/any_correct"] == pytest.approx(3 / 4)
    assert metrics["rerank/sample_accuracy"] == pytest.approx((1 / 3 + 1 + 0 + 2 / 3) / 4)
    assert metrics["rerank/n_samples"] == 3
    assert picks[0] == {"best_of_n": 0, "weighted_vote": 0, "majority_vote": 1}


def test_rerank_of_nothing_fails():
    with pytest.raises(ValueError):
        rerank_metrics([])


def test_rerank_log_probs_match_the_concatenated_engine(tiny_policy):
    """The shared-prefix scoring used for re-ranking gives each sample's summed log-prob."""
    import torch

    from evaluation.suites.shapes import ShapesSpec, make_queries
    from models.logprobs import collate, completion_ids, encode_prompt, sequence_logps
    from models.records import user_prompt
    from models.sampling import Policy
    from models.scoring import completion_logps

    policy = Policy(*tiny_policy, batch_size=2)
    queries = make_queries("test", 3, 0, ShapesSpec())
    prompts = [encode_prompt(policy.processor, user_prompt(q["question"]), [q["image"]]) for q in queries]
    samples = [["red", "red", "blue circle"], ["yes", "", "no"], ["two", "one three", "left"]]
    shared = completion_logps(policy, prompts, samples)
    tok = policy.processor.tokenizer
    flat = [(p, completion_ids(tok, r)) for p, rs in zip(prompts, samples) for r in rs]
    with torch.no_grad():
        ref, _ = sequence_logps(policy.model, collate([p for p, _ in flat], [c for _, c in flat], tok.pad_token_id))
    assert torch.allclose(torch.tensor(shared).flatten(), ref, atol=1e-4)
    assert shared[0][0] == pytest.approx(shared[0][1])  # identical samples, identical log-probs
