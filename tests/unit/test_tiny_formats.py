"""The format-following items of the tiny base's SFT mix (models/tiny_formats.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from evaluation.judges import find_answer
from evaluation.suites.shapes import ShapesSpec, make_queries
from methods.boxes import iou, resolve_box
from methods.uvcot import BOX_SUFFIX
from models.tiny import TinySpec, ensure_tiny
from models.tiny_formats import ANSWER_STEP, BOX_STEP, COT, PLAIN, answering_region, format_item, item_kinds

SPEC = ShapesSpec(max_objects=2)


def test_item_kinds_hold_exactly_each_share():
    kinds = item_kinds(1000, box_share=0.3, cot_share=0.2, seed=0)
    assert Counter(kinds) == {BOX_STEP: 150, ANSWER_STEP: 150, COT: 200, PLAIN: 500}
    assert kinds != sorted(kinds), "the formats are interleaved, not in blocks"
    assert item_kinds(1000, 0.3, 0.2, seed=0) == kinds and item_kinds(1000, 0.3, 0.2, seed=1) != kinds
    assert set(item_kinds(50, 0.0, 0.0, seed=0)) == {PLAIN}


@pytest.mark.parametrize("box, cot", [(-0.1, 0.0), (0.7, 0.4)])
def test_item_kinds_reject_impossible_shares(box, cot):
    with pytest.raises(ValueError, match="sft_box_share.*sft_cot_share"):
        item_kinds(10, box, cot, seed=0)


def test_box_step_target_is_the_target_objects_box():
    for query in make_queries("sft", 40, 0, SPEC):
        prompt, images, target = format_item(query, BOX_STEP)
        assert prompt[0]["content"][-1]["text"].endswith(BOX_SUFFIX) and len(images) == 1
        box, parsed = resolve_box(target, *query["image"].size)
        assert parsed and iou(box, answering_region(query)) > 0.9


def test_answer_step_is_the_two_turn_chain_with_the_crop():
    query = next(q for q in make_queries("sft", 20, 0, SPEC) if q["qtype"] == "colour")
    prompt, images, target = format_item(query, ANSWER_STEP)
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"] and len(images) == 2
    assert images[0] is query["image"] and images[1].size != query["image"].size  # the crop
    assert target == query["answer"]


def test_cot_target_states_the_answer_after_mpos_marker():
    query = make_queries("sft", 1, 0, SPEC)[0]
    prompt, _, target = format_item(query, COT)
    assert "Final answer" in prompt[0]["content"][-1]["text"]
    assert find_answer(target, ["Final answer:"]) == query["answer"]


def test_regions_for_questions_about_no_single_object():
    queries = make_queries("sft", 60, 0, SPEC)
    count = next(q for q in queries if q["qtype"] == "count" and len(q["boxes"]) == 2)
    x0, y0, x1, y1 = answering_region(count)
    assert all(x0 <= b[0] and y0 <= b[1] and b[2] <= x1 and b[3] <= y1 for b in count["boxes"])
    absent = dict(count, boxes=[], target_box=[])
    assert answering_region(absent) == [0.0, 0.0, *map(float, count["image"].size)]


def test_a_base_with_format_items_builds_and_gets_its_own_cache_key(tmp_path):
    plain = TinySpec(sft_steps=4, sft_queries=64, check_queries=8, suite={"max_objects": 2})
    mixed = TinySpec(sft_steps=4, sft_queries=64, check_queries=8, suite={"max_objects": 2},
                     sft_box_share=0.5, sft_cot_share=0.25)
    assert plain.key() != mixed.key()
    # Bases cached before the format options existed keep their key (their off value is not hashed).
    assert TinySpec().key() == "83e6c9b4a7e1"
    built = ensure_tiny(mixed, tmp_path)  # batches mix one-image and two-image (crop) prompts
    assert (built / "manifest.json").exists()


def test_sft_phases_balanced_skewed_or_balanced_then_skewed():
    from evaluation.suites.shapes import favoured_answer
    from models.tiny import TinySpec, sft_phases

    def favoured_share(queries):
        spec = TinySpec().shapes()
        return sum(q["answer"] == favoured_answer(q["qtype"], spec) for q in queries) / len(queries)

    plain = sft_phases(TinySpec(sft_steps=10, sft_queries=200))
    skewed = sft_phases(TinySpec(sft_steps=10, sft_queries=200, sft_favoured_share=0.8))
    late = sft_phases(TinySpec(sft_steps=10, sft_queries=200, sft_favoured_share=0.8, sft_skew_steps=3))
    assert [first for first, _ in plain] == [0] and [first for first, _ in skewed] == [0]
    assert [first for first, _ in late] == [0, 7]  # the last 3 of 10 steps draw skewed answers
    assert late[0][1] == plain[0][1] and late[1][1] == skewed[0][1]
    assert favoured_share(skewed[0][1]) > 0.75 > favoured_share(plain[0][1])


def test_sft_skew_steps_need_a_skew_and_fit_in_the_steps():
    import pytest

    from models.tiny import TinySpec, sft_phases

    with pytest.raises(ValueError, match="needs model.tiny.sft_favoured_share"):
        sft_phases(TinySpec(sft_steps=10, sft_queries=50, sft_skew_steps=3))
    with pytest.raises(ValueError, match="must be in"):
        sft_phases(TinySpec(sft_steps=10, sft_queries=50, sft_favoured_share=0.6, sft_skew_steps=11))


def test_unanswerable_share_replaces_exactly_that_share_of_the_sft_queries(tmp_path):
    from evaluation.suites.shapes import UNANSWERABLE
    from models.tiny import build_tokenizer, sft_phases

    plain = sft_phases(TinySpec(sft_steps=10, sft_queries=200))[0][1]
    mixed = sft_phases(TinySpec(sft_steps=10, sft_queries=200, sft_unanswerable_share=0.15))[0][1]
    refusals = [i for i, q in enumerate(mixed) if q["answer"] == UNANSWERABLE]
    assert len(refusals) == 30 and len(mixed) == 200
    assert [q["id"] for i, q in enumerate(mixed) if i not in refusals] == \
        [q["id"] for i, q in enumerate(plain) if i not in refusals]
    assert TinySpec(sft_unanswerable_share=0.15).key() != TinySpec().key() == "83e6c9b4a7e1"
    with pytest.raises(ValueError, match="sft_unanswerable_share"):
        TinySpec(sft_unanswerable_share=1.0)
    # the refusal is one word of the base's vocabulary only when its SFT teaches it
    spec = TinySpec(sft_unanswerable_share=0.15, suite={"max_objects": 2})
    tok = build_tokenizer(spec)
    assert len(tok(UNANSWERABLE, add_special_tokens=False)["input_ids"]) == 1
    built = ensure_tiny(TinySpec(sft_steps=4, sft_queries=64, check_queries=8, suite={"max_objects": 2},
                                 sft_unanswerable_share=0.25, sft_box_share=0.5), tmp_path)
    assert (built / "manifest.json").exists()
