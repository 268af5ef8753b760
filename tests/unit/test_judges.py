"""Judges: rule-based matching, the soft-score math on given logits, the judges' wiring with
fixed logits, and each model-based judge end to end on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from evaluation.judges import (
    AnchorJudge,
    CorrectnessJudge,
    RatingJudge,
    YesNoJudge,
    answers_match,
    expected_rating,
    find_answer,
    pick_anchors,
    rescale_rating,
    two_way_probability,
)
from models.records import user_prompt

# --- correctness ---------------------------------------------------------------------------


@pytest.mark.parametrize("response,answer,expected", [
    ("Red.", "red", True),                      # normalised exact match
    ("the  Circle", "circle", True),
    ("blue", "red", False),
    ("3", "3.0", True),                         # numbers
    ("3.00001", "3", True),                     # within rel_tol 1e-4
    ("3.1", "3", False),
    ("1,000", "1000", True),
    ("$4", "4", True),
    ("50%", "50", True),
    ("two", "2", True),
    ("-2.5", "-2.50", True),
    ("(B)", "B", True),                         # multiple-choice letters
    ("B.", "B", True),
    ("B) blue", "B", True),
    ("b", "(B)", True),
    ("(C)", "B", False),
    ("a red circle", "A", False),               # an article is not choice A
    ("the", "A", False),                        # both normalise to "" (articles)
    ("", "A", False),
    ("Because ... ### Answer: red", "red", True),       # markers
    ("I think blue. Final Answer: 3.0", "3", True),     # case-insensitive marker
    ("Final answer: red. Wait. final answer: blue", "blue", True),  # the last marker wins
    ("Final answer: red", "blue", False),
])
def test_correctness_matching(response, answer, expected):
    assert CorrectnessJudge().score_one(response, answer) == float(expected)


def test_relative_tolerance_is_configurable():
    assert not answers_match("105", "100", rel_tol=1e-4)
    assert answers_match("105", "100", rel_tol=0.05)
    assert CorrectnessJudge(rel_tol=0.05).score_one("Final answer: 104", "100") == 1.0


def test_find_answer_reports_a_missing_marker():
    assert find_answer("red", ["Final answer:"]) is None
    assert find_answer("so... FINAL ANSWER:  red ", ["Final answer:"]) == "red"
    assert find_answer("### Answer: x Final answer: y", ["### Answer:", "Final answer:"]) == "y"


def test_canonical_keys_group_equivalent_answers():
    judge = CorrectnessJudge()
    assert judge.canonical("3") == judge.canonical("Final answer: 3.0") == judge.canonical("three")
    assert judge.canonical("(B) blue") == judge.canonical("B.") == "(B)"
    assert judge.canonical("The Red.") == "red"


def _cand(qid, cid, response):
    return {"query_id": qid, "candidate_id": cid, "prompt": user_prompt("q?"), "response": response, "extras": {}}


def _query(qid, answer="red", image=None):
    return {"id": qid, "image": image, "question": "What color is the circle?", "answer": answer, "qtype": "colour",
            "boxes": [], "target_box": [], "source": "test"}


def test_correctness_scores_and_missing_answers():
    queries = {"a": _query("a"), "b": _query("b", answer=None)}
    scored = CorrectnessJudge().score([_cand("a", "a/0", "Final answer: red"), _cand("a", "a/1", "blue")],
                                      queries)
    assert [s["score"] for s in scored] == [1.0, 0.0]
    assert [s["score_parts"]["marker"] for s in scored] == [True, False]
    with pytest.raises(ValueError, match="missing_answer=neutral"):
        CorrectnessJudge().score([_cand("b", "b/0", "red")], queries)
    neutral = CorrectnessJudge(missing_answer="neutral").score([_cand("b", "b/0", "red")], queries)
    assert neutral[0]["score"] == 0.5 and neutral[0]["score_parts"]["correct"] is None


# --- soft-score math on given logits -------------------------------------------------------


def test_two_way_probability_from_logits():
    p = two_way_probability(torch.tensor([[2.0], [0.0], [-30.0]]), torch.tensor([[0.0], [0.0], [30.0]]))
    assert torch.allclose(p, torch.tensor([1 / (1 + math.exp(-2.0)), 0.5, 0.0]), atol=1e-6)
    # Two spellings of "yes" (equal logits) against one "no": (e^0 + e^0) / (e^0 + e^0 + e^0) = 2/3.
    assert torch.allclose(two_way_probability(torch.zeros(1, 2), torch.zeros(1, 1)), torch.tensor([2 / 3]))
    # Only the logit differences matter (the vocabulary's other tokens drop out).
    assert torch.allclose(two_way_probability(torch.tensor([[5.0]]), torch.tensor([[3.0]])),
                          two_way_probability(torch.tensor([[2.0]]), torch.tensor([[0.0]])))


def test_expected_rating_from_logits():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.2, 0.2], [0.2] * 5, [0.0, 0.0, 0.0, 0.0, 1.0]])
    expected, p = expected_rating(probs.clamp_min(1e-30).log(), [1, 2, 3, 4, 5])
    assert torch.allclose(p, probs, atol=1e-6)
    assert torch.allclose(expected, torch.tensor([3.2, 3.0, 5.0]), atol=1e-5)
    assert torch.allclose(rescale_rating(expected, 1, 5), torch.tensor([0.55, 0.5, 1.0]), atol=1e-5)


# --- judges' wiring with fixed logits (no model) -------------------------------------------


class _FakeEvaluator:
    processor = type("P", (), {"tokenizer": None})()
    batch_size = 8


@pytest.fixture
def fixed_logits(monkeypatch):
    """Replace the model side: answer tokens are 0..K-1, logits come from ``rows``."""
    import models.scoring

    rows: list[list[float]] = []
    seen: list = []

    def fake_logits(policy, prompts, images, token_ids, batch_size=None, label=""):
        seen.extend(prompts)
        return torch.tensor(rows[: len(prompts)])

    monkeypatch.setattr(models.scoring, "answer_token_ids", lambda tok, words: list(range(len(words))))
    monkeypatch.setattr(models.scoring, "next_token_logits", fake_logits)
    return rows, seen


def test_yesno_judge_from_given_logits(fixed_logits):
    rows, seen = fixed_logits
    rows += [[2.0, 0.0], [0.0, 0.0], [-1.0, 1.0]]
    cands = [_cand("a", f"a/{i}", r) for i, r in enumerate(["red", "blue", "red", "green"])]
    scored = YesNoJudge().score(cands, {"a": _query("a")}, evaluator=_FakeEvaluator())
    assert [round(s["score"], 4) for s in scored] == [round(1 / (1 + math.exp(-2)), 4), 0.5,
                                                       round(1 / (1 + math.exp(-2)), 4),
                                                       round(1 / (1 + math.exp(2)), 4)]
    assert len(seen) == 3  # the repeated "red" is judged once
    # The follow-up conversation: question with image, the answer, then the yes/no question.
    assert [m["role"] for m in seen[0]] == ["user", "assistant", "user"]
    assert seen[0][1]["content"][0]["text"] == "red"
    assert seen[0][2]["content"][-1]["text"] == YesNoJudge().question


def test_rating_judge_from_given_logits(fixed_logits):
    rows, _ = fixed_logits
    rows += [[0.0] * 5, [-100.0] * 4 + [0.0]]
    scored = RatingJudge().score([_cand("a", "a/0", "red"), _cand("a", "a/1", "blue")], {"a": _query("a")},
                                 evaluator=_FakeEvaluator())
    assert [round(s["score"], 4) for s in scored] == [0.5, 1.0]
    assert scored[0]["score_parts"]["expected_rating"] == pytest.approx(3.0)


def test_anchor_judge_from_given_logits(fixed_logits):
    rows, seen = fixed_logits
    rows += [[1.0, 0.0], [0.0, 3.0]]  # logits of ("1", "0") for the two compared candidates
    cands = [_cand("a", "a/0", "red"), _cand("a", "a/1", "blue"), _cand("a", "a/2", "Red."),
             _cand("a", "a/3", "green"), _cand("b", "b/0", "one"), _cand("a", "a/4", "blue")]
    scored = AnchorJudge(anchor="first").score(cands, {"a": _query("a"), "b": _query("b")},
                                               evaluator=_FakeEvaluator())
    scores = {s["candidate_id"]: s["score"] for s in scored}
    assert scores["a/0"] == 0.5 and scores["b/0"] == 0.5           # anchors
    assert scores["a/2"] == 0.5                                     # same answer as the anchor
    assert scores["a/1"] == scores["a/4"] == pytest.approx(1 / (1 + math.exp(-1)))  # p(1), given logits
    assert scores["a/3"] == pytest.approx(1 / (1 + math.exp(3)))
    assert len(seen) == 2  # N-1 comparisons, minus the anchor's duplicate and a repeated answer
    text = seen[0][0]["content"][-1]["text"]
    assert "Answer A: blue" in text and "Answer B: red" in text
    assert [s["candidate_id"] for s in scored] == [c["candidate_id"] for c in cands]  # order kept


def test_random_anchors_are_deterministic():
    cands = [_cand(q, f"{q}/{i}", str(i)) for q in "abcdef" for i in range(5)]
    first = pick_anchors(cands, "random", seed=0)
    assert first == pick_anchors(cands, "random", seed=0)
    assert all(cands[i]["query_id"] == q for q, i in first.items())
    assert pick_anchors(cands, "first", seed=0) == {q: 5 * k for k, q in enumerate("abcdef")}
    with pytest.raises(ValueError):
        pick_anchors(cands, "best", seed=0)


def test_model_judge_without_evaluator_fails_clearly():
    with pytest.raises(ValueError, match="evaluator"):
        YesNoJudge().score([_cand("a", "a/0", "red")], {"a": _query("a")})


# --- the model side on the tiny model ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_policy):
    from evaluation.suites.shapes import ShapesSpec, make_queries
    from models.sampling import Policy

    model, processor = tiny_policy
    queries = make_queries("train", 4, 0, ShapesSpec())
    cands = [_cand(q["id"], f"{q['id']}/{i}", r) for q in queries for i, r in enumerate([q["answer"], "blue", "two"])]
    return Policy(model, processor, batch_size=4), queries, cands


def test_answer_token_ids_on_the_tiny_tokenizer(tiny):
    from models.scoring import answer_token_ids

    tok = tiny[0].processor.tokenizer
    yes, no = answer_token_ids(tok, ["yes", "no"])
    assert tok.convert_ids_to_tokens([yes, no]) == ["▁yes", "▁no"]
    assert len(set(answer_token_ids(tok, ["1", "2", "3", "4", "5"]))) == 5
    assert tok.decode(answer_token_ids(tok, ["Yes"])).strip()  # a lone "▁" piece is skipped
    with pytest.raises(ValueError, match="share a first token"):
        answer_token_ids(tok, ["yes", "yes please"])


def test_next_token_logits_batched_equals_one_by_one(tiny):
    from models.scoring import next_token_logits

    policy, queries, _ = tiny
    prompts = [user_prompt(q["question"] + " " * i) for i, q in enumerate(queries)]  # different lengths
    images = [[q["image"]] for q in queries]
    ids = [5, 10, 100]
    batched = next_token_logits(policy, prompts, images, ids, batch_size=4)
    single = torch.cat([next_token_logits(policy, [p], [im], ids, batch_size=1) for p, im in zip(prompts, images)])
    assert batched.shape == (4, 3) and torch.allclose(batched, single, atol=1e-4)


@pytest.mark.parametrize("judge", [YesNoJudge(), RatingJudge(), AnchorJudge()], ids=["yesno", "rating", "anchor"])
def test_model_judges_end_to_end_on_the_tiny_model(tiny, judge):
    policy, queries, cands = tiny
    scored = judge.score(cands, {q["id"]: q for q in queries}, evaluator=policy)
    assert [s["candidate_id"] for s in scored] == [c["candidate_id"] for c in cands]
    assert all(0.0 <= s["score"] <= 1.0 and math.isfinite(s["score"]) for s in scored)
    assert all(s["score_parts"] for s in scored)
