"""UV-CoT (methods/uvcot.py): eq. 1 on fixed scored candidates, pairs per step, the k cap, the
best chain, gamma = 0 at the last step; generation's candidate set with a stub policy; and
two-image prompts through the tiny model's processor, reference pass and box-CoT evaluation."""

import random

import pytest
from PIL import Image

from methods.boxes import crop, resolve_box
from methods.uvcot import (
    ANSWER_PROMPT,
    BOX_SUFFIX,
    UVCoT,
    answer_prompt,
    best_index,
    box_prompt,
    combined_score,
    preference_pairs,
)
from models.records import message_text

W = 64


def _query(qid="q", answer="red", target=(8.0, 8.0, 24.0, 24.0)):
    return {"id": qid, "image": Image.new("RGB", (W, W), (200, 10, 10)), "question": "What color is the circle?",
            "answer": answer, "qtype": "colour", "boxes": [list(target)] if target else [],
            "target_box": list(target) if target else [], "source": "test"}


def _box(qid, i, text, score=0.0, source="model"):
    box, parsed = resolve_box(text, W, W)
    extras = {"step": 1, "role": "box", "parent": None, "box_index": i, "box_text": text, "box": box,
              "parsed": parsed, "box_source": source}
    return {"query_id": qid, "candidate_id": f"{qid}/box{i}", "prompt": box_prompt("What color is the circle?"),
            "response": text, "extras": extras, "score": score, "score_parts": {}}


def _answers(box, results, greedy=None):
    rows = [("sample", j, text, score) for j, (text, score) in enumerate(results)]
    if greedy is not None:
        rows.append(("greedy", 0, greedy[0], greedy[1]))
    out = []
    for role, j, text, score in rows:
        extras = {**box["extras"], "step": 2, "role": role, "sample": j, "parent": box["candidate_id"]}
        cid = f"{box['candidate_id']}/ans{j}" if role == "sample" else f"{box['candidate_id']}/greedy"
        out.append({"query_id": box["query_id"], "candidate_id": cid,
                    "prompt": answer_prompt("What color is the circle?", box["response"]), "response": text,
                    "extras": extras, "score": score, "score_parts": {}})
    return out


def _fixture(qid="q"):
    """Four boxes: two real boxes and two texts without a box (both the fallback box)."""
    b0 = _box(qid, 0, "[0.10, 0.10, 0.40, 0.40]")  # pixels [6.4, 6.4, 25.6, 25.6]: near the target
    b1 = _box(qid, 1, "[0.50, 0.50, 0.90, 0.90]")
    b2 = _box(qid, 2, "left", score=1.0)  # unparsed: the judge's 1.0 must not count
    b3 = _box(qid, 3, "right")
    scored = [b0, b1, b2, b3]
    scored += _answers(b0, [("red", 1.0), ("red", 1.0), ("Red.", 1.0), ("blue", 0.0)], greedy=("red", 1.0))
    scored += _answers(b1, [("red", 1.0), ("blue", 0.0), ("green", 0.0), ("blue", 0.0)], greedy=("blue", 0.0))
    scored += _answers(b2, [("blue", 0.0)] * 4, greedy=("blue", 0.0))
    scored += _answers(b3, [("red", 1.0), ("blue", 0.0), ("blue", 0.0), ("blue", 0.0)], greedy=("red", 1.0))
    return scored


def _split(scored):
    boxes = [c for c in scored if c["extras"]["step"] == 1]
    answers = {}
    for c in scored:
        if c["extras"]["step"] == 2:
            answers.setdefault(c["extras"]["parent"], []).append(c)
    return boxes, answers


def test_combined_score_is_eq1_with_gamma_zero_at_the_last_step():
    assert combined_score(0.5, 0.75, gamma=2.0, last_step=False) == 2.0
    assert combined_score(0.5, 0.75, gamma=2.0, last_step=True) == 0.5
    assert combined_score(0.5, 0.75, gamma=0.0, last_step=False) == 0.5


def test_box_scores_judge_mode():
    boxes, answers = _split(_fixture())
    values = UVCoT(gamma=0.5).box_scores(boxes, answers)
    assert [v["s_next"] for v in values] == [0.75, 0.25, 0.0, 0.25]
    assert [v["s_cur"] for v in values] == [0.0, 0.0, 0.0, 0.0]  # "left" scored 1.0 but is no box
    assert [v["s"] for v in values] == [0.375, 0.125, 0.0, 0.125]


def test_box_scores_judge_mode_keeps_the_judges_score_of_a_real_box():
    boxes, answers = _split(_fixture())
    boxes[1] = {**boxes[1], "score": 0.6}
    values = UVCoT(gamma=1.0).box_scores(boxes, answers)
    assert values[1] == {"s_cur": 0.6, "s_next": 0.25, "s": 0.85}


def test_box_scores_greedy_and_zero_modes():
    boxes, answers = _split(_fixture())
    greedy = UVCoT(gamma=1.0, box_s_cur="greedy").box_scores(boxes, answers)
    assert [v["s_cur"] for v in greedy] == [1.0, 0.0, 0.0, 1.0]
    assert [v["s"] for v in greedy] == [1.75, 0.25, 0.0, 1.25]
    zero = UVCoT(gamma=2.0, box_s_cur="zero").box_scores(boxes, answers)
    assert [v["s"] for v in zero] == [1.5, 0.5, 0.0, 0.5]
    no_greedy = {k: [a for a in v if a["extras"]["role"] == "sample"] for k, v in answers.items()}
    with pytest.raises(ValueError, match="greedy"):
        UVCoT(box_s_cur="greedy").box_scores(boxes, no_greedy)


def test_pairs_per_step_best_chain_and_counts():
    query = _query()
    pairs, counts = UVCoT(gamma=1.0, k=10).pair(_fixture(), {"q": query}, seed=0)
    box_pairs = [p for p in pairs if p["extras"]["step"] == 1]
    answer_pairs = [p for p in pairs if p["extras"]["step"] == 2]
    # s = [0.75, 0.25, 0.0, 0.25]. Boxes 2 and 3 ("left", "right") are both the fallback box
    # (drop_same_box): never paired with each other, and (box 0, fallback box) is offered once.
    got = {(message_text(p["chosen"]), message_text(p["rejected"]), p["score_chosen"], p["score_rejected"])
           for p in box_pairs}
    assert got == {
        ("[0.10, 0.10, 0.40, 0.40]", "[0.50, 0.50, 0.90, 0.90]", 0.75, 0.25),
        ("[0.10, 0.10, 0.40, 0.40]", "left", 0.75, 0.0),
        ("[0.50, 0.50, 0.90, 0.90]", "left", 0.25, 0.0),
    }
    for p in box_pairs:  # step 1: the first user turn and the original image only
        assert p["prompt"] == box_prompt(query["question"]) and len(p["images"]) == 1
        assert p["images"][0] is query["image"]
        assert p["method"] == "uvcot"

    # Best chain: box 0; its answers red/red/Red. (1.0) vs blue (0.0) -> one distinct pair.
    assert len(answer_pairs) == 1
    a = answer_pairs[0]
    assert (message_text(a["chosen"]), message_text(a["rejected"])) in {("red", "blue"), ("Red.", "blue")}
    assert (a["score_chosen"], a["score_rejected"]) == (1.0, 0.0)
    assert a["prompt"] == answer_prompt(query["question"], "[0.10, 0.10, 0.40, 0.40]")
    assert [m["role"] for m in a["prompt"]] == ["user", "assistant", "user"]
    assert len(a["images"]) == 2 and a["images"][0] is query["image"]
    expected_crop = crop(query["image"], resolve_box("[0.10, 0.10, 0.40, 0.40]", W, W)[0], 0.25)
    assert a["images"][1].size == expected_crop.size == (32, 32)
    for p in pairs:
        assert p["extras"]["best_box_text"] == "[0.10, 0.10, 0.40, 0.40]"
        assert p["extras"]["best_answer"] == "red" and p["extras"]["best_score"] == 0.75
    assert a["extras"]["chosen_s_next"] == 0.0 and a["extras"]["chosen_s_cur"] == 1.0

    assert counts["box_pairs"] == 3 and counts["answer_pairs"] == 1
    assert counts["no_box_contrast"] == 0 and counts["no_answer_contrast"] == 0
    assert counts["box_parse_rate"] == 0.5
    # The best box [6.4, 6.4, 25.6, 25.6] contains the target [8, 8, 24, 24].
    assert counts["box_iou_mean"] == pytest.approx((16 * 16) / (19.2 * 19.2))
    assert 0 < counts["box_iou_chosen_mean"] and counts["box_iou_rejected_mean"] < counts["box_iou_chosen_mean"]


def test_k_caps_pairs_per_step_and_sampling_is_seeded():
    queries = {"q": _query()}
    pairs, counts = UVCoT(k=1).pair(_fixture(), queries, seed=3)
    assert counts["box_pairs"] == 1 and counts["answer_pairs"] == 1 and len(pairs) == 2
    again, _ = UVCoT(k=1).pair(_fixture(), queries, seed=3)
    assert [p["pair_id"] for p in again] == [p["pair_id"] for p in pairs]
    none, counts = UVCoT(k=0).pair(_fixture(), queries, seed=3)
    assert none == [] and counts["no_box_contrast"] == 1 and counts["no_answer_contrast"] == 1


def test_gamma_zero_leaves_no_box_preference_under_a_correctness_judge():
    _, counts = UVCoT(gamma=0.0, k=10).pair(_fixture(), {"q": _query()}, seed=0)
    assert counts["box_pairs"] == 0 and counts["no_box_contrast"] == 1
    assert counts["answer_pairs"] == 1  # step 2 never used gamma
    assert counts["best_chain_score_mean"] == 0.0


def test_the_last_step_ignores_gamma():
    # Large gamma: answer pairs still carry s_cur alone (no s_next at the last step).
    pairs, _ = UVCoT(gamma=5.0, k=10).pair(_fixture(), {"q": _query()}, seed=0)
    answer = [p for p in pairs if p["extras"]["step"] == 2]
    assert answer and all((p["score_chosen"], p["score_rejected"]) == (1.0, 0.0) for p in answer)
    box = [p for p in pairs if p["extras"]["step"] == 1]
    assert max(p["score_chosen"] for p in box) == 5.0 * 0.75


def test_normalise_scores_maps_box_scores_into_unit_interval():
    pairs, _ = UVCoT(gamma=1.0, k=10, box_s_cur="greedy", normalise_scores=True).pair(
        _fixture(), {"q": _query()}, seed=0)
    assert all(0.0 <= p[s] <= 1.0 for p in pairs for s in ("score_chosen", "score_rejected"))
    assert max(p["score_chosen"] for p in pairs if p["extras"]["step"] == 1) == 1.75 / 2


def test_drop_same_box_off_pairs_distinct_texts_of_one_box():
    pairs, _ = UVCoT(k=10, drop_same_box=False).pair(_fixture(), {"q": _query()}, seed=0)
    texts = {(message_text(p["chosen"]), message_text(p["rejected"])) for p in pairs if p["extras"]["step"] == 1}
    assert ("right", "left") in texts


def test_best_chain_tie_breaks_prefer_parsed_then_lower_index():
    assert best_index([0.5, 0.5, 0.2]) == 0
    assert best_index([0.5, 0.5, 0.2], [False, True, True]) == 1
    assert best_index([0.1, 0.9]) == 1


def test_preference_pairs_never_pairs_equal_keys_or_equal_scores():
    rng = random.Random(0)
    items = ["a", "a", "b", "c"]
    pairs = preference_pairs(items, [1.0, 1.0, 0.0, 1.0], 10, rng, key=lambda x: x)
    assert sorted((items[w], items[lo]) for w, lo in pairs) == [("a", "b"), ("c", "b")]


def test_no_target_box_leaves_iou_out_of_the_counts():
    _, counts = UVCoT().pair(_fixture(), {"q": _query(target=None)}, seed=0)
    assert "box_iou_mean" not in counts and "box_iou_chosen_mean" not in counts


def test_invalid_settings_fail_clearly():
    with pytest.raises(ValueError, match="box_s_cur"):
        UVCoT(box_s_cur="oracle")
    with pytest.raises(ValueError, match="n_next"):
        UVCoT(n_next=0)
    with pytest.raises(ValueError, match="min_half_frac"):
        UVCoT(min_half_frac=0.9)


class StubPolicy:
    """Returns canned texts and records every call."""

    def __init__(self, box_texts, answer_text="red"):
        self.box_texts, self.answer_text, self.calls = box_texts, answer_text, []

    def generate(self, prompts, images, **kw):
        self.calls.append({"prompts": prompts, "images": images, **kw})
        n = kw.get("num_samples", 1)
        if BOX_SUFFIX in message_text(prompts[0]) and len(prompts[0]) == 1:
            return [self.box_texts[:n] for _ in prompts]
        return [[self.answer_text] * n for _ in prompts]


def test_generate_emits_boxes_and_answer_samples_with_two_image_prompts():
    queries = [_query("a"), _query("b")]
    policy = StubPolicy(["[0.1, 0.1, 0.4, 0.4]", "left", "(32, 32, 60, 60)"])
    method = UVCoT(n_boxes=3, n_next=2, random_boxes=1)
    cands = method.generate(policy, queries, seed=7)
    boxes = [c for c in cands if c["extras"]["role"] == "box"]
    samples = [c for c in cands if c["extras"]["role"] == "sample"]
    assert len(boxes) == 2 * 4 and len(samples) == 2 * 4 * 2
    assert not [c for c in cands if c["extras"]["role"] == "greedy"]
    box_call, answer_call = policy.calls
    assert box_call["num_samples"] == 3 and box_call["temperature"] == 0.7 and box_call["seed"] == 7
    assert answer_call["num_samples"] == 2 and answer_call["seed"] == 8
    for images in answer_call["images"]:
        assert len(images) == 2 and images[1].size[0] == images[1].size[1] >= 32
    a_boxes = [c for c in boxes if c["query_id"] == "a"]
    assert [c["extras"]["parsed"] for c in a_boxes] == [True, False, True, True]
    assert [c["extras"]["box_source"] for c in a_boxes] == ["model"] * 3 + ["random"]
    assert a_boxes[1]["extras"]["box"] == [16.0, 16.0, 48.0, 48.0]  # fallback
    assert a_boxes[2]["extras"]["box"] == [32.0, 32.0, 60.0, 60.0]  # pixels
    s = samples[0]
    assert s["extras"]["parent"] == "a/box0" and s["extras"]["step"] == 2
    assert s["prompt"][2]["content"][1]["text"] == ANSWER_PROMPT.format(question="What color is the circle?")
    n_placeholders = sum(item["type"] == "image" for m in s["prompt"] for item in m["content"])
    assert n_placeholders == 2
    # Random proposals are deterministic per (seed, query).
    again = UVCoT(n_boxes=3, n_next=2, random_boxes=1).generate(StubPolicy(policy.box_texts), queries, seed=7)
    assert [c["response"] for c in again] == [c["response"] for c in cands]


def test_generate_greedy_mode_adds_one_greedy_answer_per_box():
    policy = StubPolicy(["left", "right"])
    cands = UVCoT(n_boxes=2, n_next=1, box_s_cur="greedy").generate(policy, [_query()], seed=0)
    assert sum(c["extras"]["role"] == "greedy" for c in cands) == 2
    assert "temperature" not in policy.calls[2]


def test_pairs_save_as_a_dataset():
    import datasets

    pairs, _ = UVCoT(k=10).pair(_fixture(), {"q": _query()}, seed=0)
    ds = datasets.Dataset.from_list(pairs)
    row = next(r for r in ds if r["extras"]["step"] == 2)
    assert len(row["images"]) == 2 and row["images"][1].size == (32, 32)


def test_end_to_end_on_the_tiny_model(tiny_policy):
    """Two-image prompts: processor token counts, scoring, pairs, the reference pass, box-CoT eval."""
    from evaluation.boxcot import evaluate_box_cot
    from evaluation.judges import CorrectnessJudge
    from evaluation.suites.shapes import make_queries
    from models.logprobs import encode_prompt, image_features_per_image
    from models.sampling import Policy
    from models.trainer import encode_pairs, reference_logps

    model, processor = tiny_policy
    policy = Policy(model, processor, batch_size=8)
    queries = make_queries("train", 5, 0)
    method = UVCoT(n_boxes=2, n_next=2, random_boxes=2, k=2)
    cands = method.generate(policy, queries, seed=0)
    per_image = image_features_per_image(model)
    for c in cands[:6]:
        n_images = 1 if c["extras"]["step"] == 1 else 2
        q = next(q for q in queries if q["id"] == c["query_id"])
        images = [q["image"]] if n_images == 1 else method.chain_inputs(q, c["extras"]["box_text"])["images"]
        enc = encode_prompt(processor, c["prompt"], images)
        assert enc.ids.count(processor.image_token_id) == n_images * per_image
        assert enc.vision["pixel_values"].shape[0] == n_images
    scored = CorrectnessJudge().score(cands, {q["id"]: q for q in queries})
    pairs, counts = method.pair(scored, {q["id"]: q for q in queries}, seed=0)
    assert counts["box_pairs"] + counts["answer_pairs"] == len(pairs) > 0
    assert any(len(p["images"]) == 1 for p in pairs)  # random proposals give box-step contrast
    encoded, _, dropped = encode_pairs(processor, pairs, 2048)
    assert dropped == 0
    chosen, rejected = reference_logps(model, processor, encoded, batch_size=4)
    assert len(chosen) == len(pairs) and all(v < 0 for v in chosen + rejected)

    metrics = evaluate_box_cot(policy, queries, {"_target_": "methods.uvcot.UVCoT", "n_boxes": 2},
                               answers={"red", "blue", "green", "yellow"})
    assert metrics["n"] == 5 and 0 <= metrics["accuracy"] <= 1 and "accuracy/colour" in metrics
    assert 0 <= metrics["box_parse_rate"] <= 1 and metrics["n_box_iou"] == sum(bool(q["target_box"]) for q in queries)
    assert all(isinstance(v, (int, float)) for v in metrics.values())
