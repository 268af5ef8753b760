"""MPO's data engine: DropoutNTP truncation, correctness-pipeline and DropoutNTP pairing on
fixed scored inputs, the query split, and the text-only continuation on the tiny model."""

from __future__ import annotations

import pytest
from PIL import Image

from methods.mpo import MPO, truncate_by_words
from models.records import message_text, user_prompt

FIVE = "one two three four five"
SEVEN = "a b c d e f g"


@pytest.mark.parametrize("text,ratio,expected", [
    (FIVE, 0.25, "one"),                      # floor(5 * 0.25) = 1
    (FIVE, 0.5, "one two"),                   # floor(2.5) = 2: the first half, rounded down
    (FIVE, 0.75, "one two three"),            # floor(3.75) = 3
    (SEVEN, 0.25, "a"),                       # floor(1.75) = 1
    (SEVEN, 0.5, "a b c"),                    # floor(3.5) = 3
    (SEVEN, 0.75, "a b c d e"),               # floor(5.25) = 5
    ("w1 w2 w3 w4", 0.5, "w1 w2"),            # even: exactly half
    ("w1 w2 w3 w4", 0.75, "w1 w2 w3"),
    ("red", 0.5, ""),                         # one word: nothing kept (the pair is dropped)
    ("", 0.5, ""),
    ("  spaced\tout \n words  here ", 0.5, "spaced out"),  # words are whitespace-separated
])
def test_dropout_ntp_truncation(text, ratio, expected):
    assert truncate_by_words(text, ratio) == expected


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_truncation_ratio_must_drop_something(ratio):
    with pytest.raises(ValueError):
        truncate_by_words(FIVE, ratio)
    with pytest.raises(ValueError):
        MPO(keep_ratio=ratio)


def _query(qid, answer="red"):
    return {"id": qid, "image": Image.new("RGB", (8, 8)), "question": f"q {qid}?", "answer": answer,
            "qtype": "colour", "boxes": [], "target_box": [], "source": "test"}


def _scored(qid, cid, response, score, extras):
    return {"query_id": qid, "candidate_id": cid, "prompt": user_prompt(f"q {qid}?"), "response": response,
            "extras": extras, "score": score, "score_parts": {}}


def _samples(qid, results):
    return [_scored(qid, f"{qid}/{i}", text, score, {"pipeline": "correctness", "sample": i})
            for i, (text, score) in enumerate(results)]


def test_correctness_pairs_unparseable_is_wrong_and_cap_holds():
    queries = {q: _query(q) for q in ("mix", "noparse", "allgood", "many")}
    scored = (
        # correct + parsed; wrong; unparseable but "correct" text (still rejected)
        _samples("mix", [("x. Final answer: red", 1.0), ("y. Final answer: blue", 0.0), ("red", 1.0)])
        # nothing parseable: no chosen at all
        + _samples("noparse", [("red", 1.0), ("blue", 0.0)])
        # all correct and parsed: no rejected
        + _samples("allgood", [("Final answer: red", 1.0), ("so Final answer: red", 1.0)])
        # 3 distinct correct x 3 distinct wrong = 9 combinations, capped at 4
        + _samples("many", [(f"r{i}. Final answer: red", 1.0) for i in range(3)]
                   + [(f"b{i}. Final answer: blue", 0.0) for i in range(3)]
                   + [("r0. Final answer: red", 1.0)])  # a duplicate response adds nothing
    )
    pairs, counts = MPO(cot=True, max_pairs_per_query=4).pair(scored, queries, seed=0)
    assert counts == {"correctness_pairs": 2 + 4, "dropout_ntp_pairs": 0, "unparseable": 3,
                      "dropped_no_contrast": 2, "dropped_equal": 0, "dropped_empty": 0,
                      "dropped_no_prefix": 0}
    mix = sorted((message_text(p["chosen"]), message_text(p["rejected"]), p["score_rejected"])
                 for p in pairs if p["query_id"] == "mix")
    # the unparseable "red" is rejected although its text is right, with score 0
    assert mix == [("x. Final answer: red", "red", 0.0), ("x. Final answer: red", "y. Final answer: blue", 0.0)]
    many = [p for p in pairs if p["query_id"] == "many"]
    assert len(many) == 4 and len({(message_text(p["chosen"]), message_text(p["rejected"])) for p in many}) == 4
    assert all(p["images"][0] is queries[p["query_id"]]["image"] and p["method"] == "mpo" for p in pairs)


def test_without_cot_the_judge_alone_decides():
    queries = {"q": _query("q")}
    scored = _samples("q", [("red", 1.0), ("blue", 0.0)])
    pairs, counts = MPO(cot=False).pair(scored, queries, seed=0)
    assert counts["unparseable"] == 0 and len(pairs) == 1
    assert (message_text(pairs[0]["chosen"]), message_text(pairs[0]["rejected"])) == ("red", "blue")


def _ntp(qid, chosen, rejected, kept=1):
    return [_scored(qid, f"{qid}/ntp-chosen", chosen, 0.5, {"pipeline": "dropout_ntp", "role": "chosen"}),
            {**_scored(qid, f"{qid}/ntp-rejected", rejected, 0.5, {"pipeline": "dropout_ntp", "role": "rejected",
                                                                  "parent": f"{qid}/ntp-chosen", "kept_words": kept}),
             "prompt": user_prompt(f"q {qid}?", n_images=0)}]


def test_dropout_ntp_pairs_keep_the_image_and_drop_equal_empty_or_prefixless():
    queries = {q: _query(q, answer=None) for q in ("n1", "n2", "n3", "n4")}
    scored = (_ntp("n1", "a red circle on the left", "a red square", kept=3) + _ntp("n2", "Red.", "red")
              + _ntp("n3", " ", "blue", kept=0) + _ntp("n4", "red", "blue", kept=0))
    pairs, counts = MPO().pair(scored, queries, seed=0)
    assert (counts["dropout_ntp_pairs"], counts["dropped_equal"], counts["dropped_empty"],
            counts["dropped_no_prefix"]) == (1, 1, 1, 1)
    (pair,) = pairs
    assert message_text(pair["chosen"]) == "a red circle on the left"
    assert message_text(pair["rejected"]) == "a red square"
    # trained WITH the image although the rejected was written without it
    assert pair["images"][0] is queries["n1"]["image"]
    assert pair["prompt"][0]["content"][0]["type"] == "image"


def test_split_sends_answerless_and_a_fraction_to_dropout_ntp():
    queries = [_query(f"q{i}") for i in range(8)] + [_query("none", answer=None)]
    correctness, ntp = MPO(answerless_fraction=0.25).split(queries, seed=3)
    assert len(correctness) == 6 and len(ntp) == 3 and "none" in {q["id"] for q in ntp}
    assert {q["id"] for q in correctness}.isdisjoint({q["id"] for q in ntp})
    assert MPO(answerless_fraction=0.25).split(queries, seed=3) == (correctness, ntp)
    assert len(MPO(answerless_fraction=0.0).split(queries, seed=3)[1]) == 1


def test_text_only_continuation_on_the_tiny_model(tiny_policy):
    """The tiny LLaVA answers a prompt with no image (images=[]), and a continuation starts
    with the kept prefix."""
    from evaluation.suites.shapes import ShapesSpec, make_queries
    from models.sampling import Policy
    from models.scoring import continue_responses

    policy = Policy(*tiny_policy, batch_size=8)
    queries = make_queries("train", 6, 0, ShapesSpec())
    prefixes = ["", "red", "red left", "", "one two", "yes"]
    out = continue_responses(policy, [user_prompt(q["question"], n_images=0) for q in queries],
                             [[] for _ in queries], prefixes, max_new_tokens=4, temperature=0.0)
    assert len(out) == 6
    assert all(o.startswith(p) for o, p in zip(out, prefixes))
    assert all(len(o.split()) > len(p.split()) or o == p for o, p in zip(out, prefixes))
    # Greedy and batched: the same as one by one (left padding is exact).
    one = [continue_responses(policy, [user_prompt(q["question"], n_images=0)], [[]], [p], max_new_tokens=4)[0]
           for q, p in zip(queries, prefixes)]
    assert one == out

    method = MPO(num_samples=2, max_new_tokens=4, cot=False, answerless_fraction=0.5)
    cands = method.generate(policy, queries, seed=0)
    ntp = [c for c in cands if c["extras"]["pipeline"] == "dropout_ntp"]
    assert len(cands) == 3 * 2 + 3 * 2 and len(ntp) == 6
    for c in ntp:
        if c["extras"]["role"] == "rejected":
            assert all(item["type"] == "text" for m in c["prompt"] for item in m["content"])  # no image
