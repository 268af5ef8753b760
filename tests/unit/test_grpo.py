"""Judge GRPO: rewards on fixed strings, group advantages, the clipped-ratio + k3 loss against
hand-computed values, soft pairwise accuracy and Mean@k, the judge-pairs suite, the method's
pairing, and its rollout policies on the session's tiny model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hydra import compose, initialize_config_module

from evaluation.judges import expected_rating
from evaluation.rating_rewards import (
    GRPORewardJudge,
    format_rating,
    mean_at_k,
    ordered_pairs,
    pairwise_accuracy,
    parse_rating,
    reward_parts,
)
from evaluation.suites.judge_pairs import JudgePairsSource, count_violations
from flows.schema import register, validate
from methods.judge_grpo import JudgeGRPO
from models.grpo import GRPOLoss, group_advantages, k3_kl, split_last_token
from models.records import user_prompt
from models.sampling import Policy


def near(x, tol=1e-6):
    return pytest.approx(x, abs=tol)


# --- rewards ------------------------------------------------------------------------------


@pytest.mark.parametrize("text,rating", [
    ("Score: 4", 4), ("Score:3", 3), ("  Score: 2 ", 2), ("The circle is red. Score: 1", 1),
    ("Score: 2 Score: 5", 5), ("score: 4", None), ("Score: 4 because", None), ("4", None), ("red", None),
    ("", None), ("MyScore: 4", None),
])
def test_parse_rating(text, rating):
    assert parse_rating(text) == rating


@pytest.mark.parametrize("response,target,parts", [
    ("Score: 3", 3, (1.0, 1.0, 1.0)),      # distance 0
    ("Score: 4", 3, (1.0, 0.0, 0.75)),     # distance 1
    ("Score: 1", 3, (1.0, 0.0, 0.5)),      # distance 2
    ("Score: 1", 5, (1.0, 0.0, 0.0)),      # distance 4
    ("Score: 9", 5, (1.0, 0.0, 0.0)),      # parseable, out of scale: format only
    ("red", 3, (0.0, 0.0, 0.0)),           # unparseable: nothing
])
def test_reward_parts_format_exact_approx(response, target, parts):
    got = reward_parts(response, target)
    assert (got["format"], got["exact"], got["approx"]) == parts


def _cand(qid, j, response):
    return {"query_id": qid, "candidate_id": f"{qid}/{j}", "prompt": user_prompt("q"), "response": response,
            "extras": {"sample": j, "rollout": "rated"}}


def test_reward_judge_sums_parts_and_scales_into_unit_interval():
    queries = {"a": {"id": "a", "answer": format_rating(3)}}
    responses = ["Score: 3", "Score: 2", "Score: 5", "Score: 1 is my guess", "no idea"]
    scored = GRPORewardJudge().score([_cand("a", j, r) for j, r in enumerate(responses)], queries, evaluator=None)
    assert [s["score_parts"]["reward"] for s in scored] == [3.0, 1.75, 1.5, 0.0, 0.0]
    assert [s["score"] for s in scored] == [near(v / 3) for v in (3.0, 1.75, 1.5, 0.0, 0.0)]
    assert scored[1]["score_parts"]["predicted"] == 2 and scored[1]["score_parts"]["target"] == 3
    weighted = GRPORewardJudge(format_weight=0.5, exact_weight=2.0, approx_weight=1.0)
    assert weighted.score([_cand("a", 0, "Score: 3")], queries)[0]["score"] == near(1.0)
    assert weighted.score([_cand("a", 0, "Score: 2")], queries)[0]["score_parts"]["reward"] == near(1.25)


def test_reward_judge_rejects_queries_without_a_rating():
    with pytest.raises(ValueError, match="data=judge_pairs"):
        GRPORewardJudge().score([_cand("a", 0, "Score: 3")], {"a": {"id": "a", "answer": "red"}})


# --- advantages and loss ------------------------------------------------------------------


def test_group_advantages_hand_computed():
    rewards = [3.0, 1.75, 1.5, 0.0]
    mean = sum(rewards) / 4
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 3)  # unbiased
    got = group_advantages(torch.tensor([rewards, [1.0, 1.0, 1.0, 1.0]]), eps=1e-4)
    assert got[0].tolist() == [near((r - mean) / (std + 1e-4), 1e-5) for r in rewards]
    assert got[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # a flat group carries no signal
    assert mean == 1.5625 and std == near(1.2311072, 1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.tensor([[1.0]]))


# Three rollouts of one group: ratio above the clip with A > 0, below it with A < 0, inside.
LOGPS, OLD, REF = [-1.0, -2.0, -3.0], [-1.2, -1.5, -3.05], [-0.9, -2.2, -3.0]
ADV = [1.0, -1.0, 0.5]


def _loss(beta=0.1, n_tokens=(1, 1, 1), length_normalise=False, logps=None):
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    logps = logps if logps is not None else t(LOGPS)
    loss_fn = GRPOLoss(clip_eps=0.2, kl_beta=beta, length_normalise=length_normalise)
    return loss_fn(logps, t(OLD), t(REF), t(ADV), torch.tensor([list(n_tokens)]))


def test_clipped_ratio_and_k3_kl_hand_computed():
    ratios = [math.exp(a - b) for a, b in zip(LOGPS, OLD)]          # 1.2214, 0.6065, 1.0513
    clipped = [min(max(r, 0.8), 1.2) for r in ratios]
    surrogate = [min(r * a, c * a) for r, c, a in zip(ratios, clipped, ADV)]
    assert surrogate == [near(1.2), near(-0.8), near(0.5 * math.exp(0.05))]
    kl = [math.exp(r - p) - (r - p) - 1 for p, r in zip(LOGPS, REF)]  # k3: q = ref - logp
    assert kl == [near(math.exp(0.1) - 1.1), near(math.exp(-0.2) - 0.8), 0.0]
    loss, metrics = _loss(beta=0.1)
    assert loss[0].tolist() == [near(-s + 0.1 * k) for s, k in zip(surrogate, kl)]
    assert float(metrics["kl"]) == near(sum(kl) / 3)
    assert float(metrics["clip_fraction"]) == near(2 / 3)
    assert float(metrics["ratio"]) == near(sum(ratios) / 3)
    assert k3_kl(torch.tensor([-1.0]), torch.tensor([-1.0])).item() == 0.0


def test_clipped_rollouts_get_no_policy_gradient():
    logps = torch.tensor([LOGPS], dtype=torch.float64, requires_grad=True)
    loss, _ = _loss(beta=0.0, logps=logps)
    loss.sum().backward()
    # d(-ratio * A)/d logp = -ratio * A inside the clip range; zero where the clip is active.
    assert logps.grad[0].tolist() == [0.0, 0.0, near(-0.5 * math.exp(0.05))]


def test_length_normalised_ratio():
    loss, metrics = _loss(beta=0.1, n_tokens=(2, 5, 1), length_normalise=True)
    ratios = [math.exp((a - b) / n) for a, b, n in zip(LOGPS, OLD, (2, 5, 1))]
    surrogate = [min(r * a, min(max(r, 0.8), 1.2) * a) for r, a in zip(ratios, ADV)]
    kl = [math.exp((r - p) / n) - (r - p) / n - 1 for p, r, n in zip(LOGPS, REF, (2, 5, 1))]
    assert loss[0].tolist() == [near(-s + 0.1 * k) for s, k in zip(surrogate, kl)]
    assert float(metrics["clip_fraction"]) == 0.0


# --- soft rewards, pairwise accuracy, Mean@k ------------------------------------------------


def test_expected_rating_is_softmax_over_rating_tokens():
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5], [1.0, 1.0, 1.0]]))
    assert expected_rating(logits, [1, 2, 3])[0].tolist() == [near(0.2 + 0.6 + 1.5), near(2.0)]
    assert expected_rating(torch.tensor([[0.0, 100.0]]), [1, 5])[0].item() == near(5.0)


def test_ordered_pairs_within_a_prompt_with_different_truths():
    truths, groups = [3, 1, 2, 2, 2], ["a", "a", "a", "b", "b"]
    assert ordered_pairs(truths, groups) == [(0, 1), (0, 2), (2, 1)]


def test_pairwise_accuracy_soft_scores_ties_and_missing():
    pairs = [(0, 1), (0, 2), (2, 1)]
    assert pairwise_accuracy([2.5, 1.2, 2.0], pairs) == 1.0
    assert pairwise_accuracy([2.5, 2.0, 1.2], pairs) == near(2 / 3)          # (2, 1) wrong
    assert pairwise_accuracy([2.0, 1.0, 2.0], pairs) == near((1 + 0.5 + 1) / 3)  # tie: 0.5
    assert pairwise_accuracy([None, 1.0, 2.0], pairs) == near((0.5 + 0.5 + 1) / 3)
    with pytest.raises(ValueError):
        pairwise_accuracy([1.0], [])


def test_mean_at_k_and_its_pairwise_accuracy():
    samples = [[3, 1, None], [None, None, 2], [2, 2, 2]]
    assert mean_at_k(samples, 1) == [3.0, None, 2.0]
    assert mean_at_k(samples, 3) == [2.0, 2.0, 2.0]
    # truths 3 > 1 for one prompt: one sample each misorders, the mean of three does not
    ratings = [[1, 3, 3], [3, 1, 1]]
    pairs = ordered_pairs([3, 1], ["p", "p"])
    assert pairwise_accuracy(mean_at_k(ratings, 1), pairs) == 0.0
    assert pairwise_accuracy(mean_at_k(ratings, 3), pairs) == 1.0


# --- the judge-pairs suite --------------------------------------------------------------------


def test_count_violations_uses_the_best_assignment():
    described = [("red", "circle"), ("blue", "square")]
    assert count_violations(described, [("blue", "square"), ("red", "circle")]) == 0
    assert count_violations(described, [("red", "square"), ("blue", "square")]) == 1
    assert count_violations(described, [("green", "triangle"), ("blue", "square")]) == 2


@pytest.mark.parametrize("objects", [1, 2])
def test_judge_pairs_deterministic_balanced_and_sliced(objects):
    source = JudgePairsSource(objects=objects)
    groups = source.groups("train", 100, seed=0)
    again = source.groups("train", 100, seed=0)
    assert [q["image"].tobytes() for g in groups for q in g] == [q["image"].tobytes() for g in again for q in g]
    other = source.groups("test", 100, seed=0)
    assert [q["question"] for g in groups for q in g] != [q["question"] for g in other for q in g]
    assert source.ratings() == list(range(1, 2 * objects + 2))
    for g in groups:
        truths = [parse_rating(q["answer"]) for q in g]
        assert len(set(truths)) == len(g) == 3 and set(truths) <= set(source.ratings())
        assert len({q["question"] for q in g}) == 1 and all(len(q["boxes"]) == objects for q in g)
    counts = [sum(parse_rating(q["answer"]) == r for g in groups for q in g) for r in source.ratings()]
    assert min(counts) > 0.6 * 300 / len(counts)
    flat = [q for g in groups for q in g]
    assert [q["id"] for q in source.queries("train", 10, 20, 0)] == [q["id"] for q in flat[10:20]]


def test_judge_pairs_config_errors():
    with pytest.raises(ValueError, match="images_per_prompt"):
        JudgePairsSource(objects=1, images_per_prompt=4)
    with pytest.raises(ValueError, match="data=judge_pairs"):
        JudgePairsSource.from_config({"_target_": "evaluation.suites.shapes.ShapesSource", "suite": {}})


# --- the method's pairing (no model) ----------------------------------------------------------


def _scored(qid, responses, target):
    judge = GRPORewardJudge()
    return judge.score([_cand(qid, j, r) for j, r in enumerate(responses)], {qid: {"answer": format_rating(target)}})


def test_pair_builds_groups_with_advantages_and_drops_flat_groups():
    from PIL import Image

    scored = (_scored("a", ["Score: 3", "Score: 1", "Score: 2", "Score: 3"], 3)
              + _scored("b", ["Score: 2", "Score: 2", "Score: 2", "Score: 2"], 1))
    queries = {q: {"id": q, "image": Image.new("RGB", (8, 8))} for q in "ab"}
    rows, counts = JudgeGRPO(group_size=4).pair(scored[::-1], queries, seed=0)  # order-independent
    assert counts["groups"] == 1 and counts["dropped_flat_groups"] == 1
    row = rows[0]
    assert row["group_id"] == "a" and row["completions"] == ["Score: 3", "Score: 1", "Score: 2", "Score: 3"]
    assert row["rewards"] == [3.0, 1.5, 1.75, 3.0]
    expected = group_advantages(torch.tensor([row["rewards"]], dtype=torch.float64))[0].tolist()
    assert row["advantages"] == [near(a) for a in expected] and row["images"][0] is queries["a"]["image"]
    assert counts["mean_reward"] == near((3 + 1.5 + 1.75 + 3 + 4 * 1.75) / 8)


def test_method_rejects_bad_settings():
    with pytest.raises(ValueError, match="rollout"):
        JudgeGRPO(rollout="beam")
    with pytest.raises(ValueError, match="group_size"):
        JudgeGRPO(group_size=1)
    with pytest.raises(ValueError, match="temperature"):
        JudgeGRPO(rollout="free", temperature=0.7)


def test_method_config_re_defaults_judge_data_and_train():
    register()
    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose("config", overrides=["method=judge_grpo", "method.group_size=4"])
        explicit = compose("config", overrides=["method=judge_grpo", "train=default", "data=shapes"])
    validate(cfg)
    assert cfg.method._target_ == "methods.judge_grpo.JudgeGRPO" and cfg.method.group_size == 4
    assert cfg.judge._target_.endswith("GRPORewardJudge")
    assert cfg.data.source._target_.endswith("JudgePairsSource") and (cfg.train.lr, cfg.train.epochs) == (1e-3, 4)
    assert JudgePairsSource(**{k: v for k, v in cfg.data.source.items() if k != "_target_"}).ratings() == [1, 2, 3]
    # the command line still wins
    assert explicit.train.lr == 3e-4 and explicit.data.source._target_.endswith("ShapesSource")


# --- rollout policies on the tiny model --------------------------------------------------------


EVAL_CFG = {"data": {"source": {"_target_": "evaluation.suites.judge_pairs.JudgePairsSource", "suite": {},
                                "objects": 1, "images_per_prompt": 3}}, "seed": 0}
TRAIN_CFG = {"lr": 1e-2, "weight_decay": 0.0, "epochs": 1, "max_steps": 6, "batch_size": 2, "grad_accum": 2,
             "warmup_ratio": 0.0, "max_grad_norm": 1.0, "max_length": 2048, "ref_batch_size": 4}


def test_rating_tokens_of_the_tiny_tokenizer(tiny_policy):
    _, processor = tiny_policy
    context, ids = split_last_token(processor.tokenizer, [format_rating(r) for r in (1, 2, 3)])
    tokens = processor.tokenizer.convert_ids_to_tokens(ids)
    assert [t.strip("▁") for t in tokens] == ["1", "2", "3"]
    assert processor.tokenizer.decode(context).strip() == "Score:"
    with pytest.raises(ValueError, match="single-token"):
        split_last_token(processor.tokenizer, ["Score: 1", "Score: 12"])


def test_rated_rollouts_round_trip_generate_score_pair_reference_train(judge_tiny_policy):
    model, processor = judge_tiny_policy
    policy = Policy(model, processor, batch_size=8)
    method = JudgeGRPO(group_size=6, eval_prompts=4)
    queries = JudgePairsSource().queries("train", 0, 6, seed=0)
    candidates = method.generate(policy, queries, seed=1)
    assert len(candidates) == 36 and all(parse_rating(c["response"]) in (1, 2, 3) for c in candidates)
    assert [c["response"] for c in method.generate(policy, queries, seed=1)] == [c["response"] for c in candidates]
    by_id = {q["id"]: q for q in queries}
    rows, _ = method.pair(GRPORewardJudge().score(candidates, by_id), by_id, seed=0)
    rows, dropped = method.reference_pass(policy, rows, TRAIN_CFG)
    assert rows and dropped == 0
    # old log-probs = log softmax over the rating tokens only, at the rating position
    logits = method._rating_logits(policy, [by_id[r["group_id"]] for r in rows])
    for row, lp in zip(rows, logits.log_softmax(-1)):
        assert row["old_logps"] == [near(lp[parse_rating(t) - 1].item(), 1e-5) for t in row["completions"]]

    # Training raises the probability of the rating with positive advantage.
    row = {**rows[0], "completions": ["Score: 3", "Score: 3", "Score: 1", "Score: 1"],
           "advantages": [1.0, 1.0, -1.0, -1.0]}
    row["old_logps"] = [logits.log_softmax(-1)[0][r - 1].item() for r in (3, 3, 1, 1)]
    trained = copy.deepcopy(model).requires_grad_(True)
    history = method.train(trained, processor, [row, row], TRAIN_CFG, seed=0)
    assert len(history) == 6 and {"loss", "kl", "clip_fraction", "ratio", "grad_norm"} <= set(history[0])
    trained.eval()
    after = method._rating_logits(Policy(trained, processor), [by_id[row["group_id"]]]).softmax(-1)[0]
    before = logits.softmax(-1)[0]
    assert after[2] > before[2] and after[0] < before[0]

    metrics = method.evaluate(policy, EVAL_CFG)
    assert metrics["n/judge_pairs"] == 12 and metrics["rating/format_rate"] == 1.0
    for key in ("pairwise_accuracy/soft", "pairwise_accuracy/mean_at_1", "pairwise_accuracy/mean_at_3"):
        assert 0.0 <= metrics[key] <= 1.0


def test_free_rollouts_sample_text_and_score_full_sequences(tiny_policy):
    from models.logprobs import collate, completion_ids, encode_prompt, sequence_logps

    model, processor = tiny_policy
    policy = Policy(model, processor, batch_size=8)
    method = JudgeGRPO(rollout="free", group_size=3, max_new_tokens=4, eval_prompts=2, eval_k=2)
    queries = JudgePairsSource().queries("train", 0, 2, seed=0)
    candidates = method.generate(policy, queries, seed=0)
    assert len(candidates) == 6
    rows = [{"group_id": q["id"], "prompt": user_prompt(q["question"]), "images": [q["image"]],
             "completions": ["Score: 2", "red", "Score: 3"], "advantages": [1.0, -1.0, 0.0]} for q in queries]
    rows, _ = method.reference_pass(policy, rows, TRAIN_CFG)
    prompt = encode_prompt(processor, rows[0]["prompt"], rows[0]["images"])
    ids = [completion_ids(processor.tokenizer, t) for t in rows[0]["completions"]]
    expected, _ = sequence_logps(model, collate([prompt] * 3, ids, processor.tokenizer.pad_token_id))
    assert rows[0]["old_logps"] == [near(v, 1e-4) for v in expected.tolist()]
    metrics = method.evaluate(policy, EVAL_CFG)
    assert metrics["n/judge_pairs"] == 6 and 0.0 <= metrics["pairwise_accuracy/soft"] <= 1.0
