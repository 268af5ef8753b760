from collections import Counter

import pytest

from evaluation.suites.shapes import (
    QUESTION_TYPES,
    ShapesSpec,
    answer_space,
    load_split,
    make_queries,
    spec_from_config,
)


def test_deterministic_per_seed_and_split():
    a = make_queries("train", 30, seed=3)
    b = make_queries("train", 30, seed=3)
    assert [q["question"] for q in a] == [q["question"] for q in b]
    assert [q["image"].tobytes() for q in a] == [q["image"].tobytes() for q in b]
    other_seed = make_queries("train", 30, seed=4)
    other_split = make_queries("test", 30, seed=3)
    assert [q["image"].tobytes() for q in a] != [q["image"].tobytes() for q in other_seed]
    assert [q["image"].tobytes() for q in a] != [q["image"].tobytes() for q in other_split]


def test_question_types_balanced_and_answers_valid():
    spec = ShapesSpec()
    queries = make_queries("test", 500, seed=0, spec=spec)
    counts = Counter(q["qtype"] for q in queries)
    assert set(counts) == set(QUESTION_TYPES) and set(counts.values()) == {100}
    space = answer_space(spec)
    assert all(q["answer"] in space for q in queries)
    exist = Counter(q["answer"] for q in queries if q["qtype"] == "exist")
    assert 35 <= exist["yes"] <= 65


def test_boxes_inside_image_and_target_box_is_an_object():
    for q in make_queries("train", 200, seed=1):
        assert q["image"].size == (64, 64)
        for x0, y0, x1, y1 in q["boxes"]:
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        if q["target_box"]:
            assert q["target_box"] in q["boxes"]
        if q["qtype"] == "count":
            assert q["answer"] == ["zero", "one", "two", "three"][len(q["boxes"])]


def test_position_answer_matches_target_box():
    for q in make_queries("test", 300, seed=2):
        if q["qtype"] == "position":
            cx = (q["target_box"][0] + q["target_box"][2]) / 2
            assert q["answer"] == ("left" if cx < 32 else "right")


def test_hf_dataset_split_has_qtype_and_images():
    ds = load_split("test", 10, seed=0)
    assert ds.num_rows == 10 and "qtype" in ds.column_names
    assert ds[0]["image"].size == (64, 64)


def test_bad_spec_fails_clearly():
    with pytest.raises(ValueError, match="unknown shapes suite keys"):
        spec_from_config({"colours": ["red"]})
    with pytest.raises(ValueError, match="unknown colours"):
        ShapesSpec(colors=("red", "teal"))


def test_skewed_queries_over_represent_the_favoured_answer_per_type():
    from evaluation.suites.shapes import favoured_answer, skewed_queries

    spec = ShapesSpec()
    queries = skewed_queries("sft", 500, seed=0, spec=spec, favoured_share=0.6)
    assert len(queries) == 500 and len({q["id"] for q in queries}) == 500
    for qtype in QUESTION_TYPES:
        of_type = [q for q in queries if q["qtype"] == qtype]
        assert len(of_type) == 100
        assert sum(q["answer"] == favoured_answer(qtype, spec) for q in of_type) == 60, qtype
    # deterministic, and drawn from the split's own stream (ids are stream positions)
    again = skewed_queries("sft", 500, seed=0, spec=spec, favoured_share=0.6)
    assert [q["id"] for q in again] == [q["id"] for q in queries]
    natural = make_queries("sft", 2000, seed=0, spec=spec)
    by_id = {q["id"]: q["question"] for q in natural}
    assert all(by_id.get(q["id"], q["question"]) == q["question"] for q in queries)
    with pytest.raises(ValueError, match="favoured_share"):
        skewed_queries("sft", 10, seed=0, spec=spec, favoured_share=1.5)


def test_skewed_queries_give_a_single_answer_type_all_its_quota():
    """With one object per image, count can only be "one": the quota must not wait for others."""
    from evaluation.suites.shapes import skewed_queries

    spec = ShapesSpec(max_objects=1)
    queries = skewed_queries("sft", 100, seed=0, spec=spec, favoured_share=0.6)
    counts = [q["answer"] for q in queries if q["qtype"] == "count"]
    assert len(queries) == 100 and counts == ["one"] * 20


def test_validation_split_is_its_own_stream():
    # Tuning on `validation` must not see the `test` items (or the round pool's).
    def items(queries):
        return {(q["question"], q["image"].tobytes()) for q in queries}

    validation = make_queries("validation", 200, seed=0)
    assert items(validation) == items(make_queries("validation", 200, seed=0))
    for other in ("test", "train", "sft"):
        assert not items(validation) & items(make_queries(other, 200, seed=0))


def test_unknown_split_fails_before_any_stage():
    from flows.checks import ConfigError, check_data
    from tasks.common import build

    source = {"_target_": "evaluation.suites.shapes.ShapesSource", "suite": {"max_objects": 2}}
    build(source).check("validation")
    check_data({"data": {"source": source, "split": "train"}, "eval": {"source": source, "split": "validation"}})
    with pytest.raises(ConfigError, match=r"eval.source: unknown split 'valid'; choose from .*validation"):
        check_data({"data": {"source": source, "split": "train"}, "eval": {"source": source, "split": "valid"}})


def test_unanswerable_questions_name_an_absent_object_and_cycle_their_types():
    from evaluation.suites.shapes import UNANSWERABLE, ShapesSource, corpus, unanswerable_queries

    spec = ShapesSpec(max_objects=2)
    queries = unanswerable_queries("sft", 30, 0, spec)
    assert [q["qtype"] for q in queries[:3]] == ["colour", "shape", "position"]
    assert all(q["answer"] == UNANSWERABLE for q in queries)
    assert [q["question"] for q in queries] == [q["question"] for q in unanswerable_queries("sft", 30, 0, spec)]
    for q in queries:
        named = q["question"].split(" the ")[1].split()[0].rstrip("?")
        # the named shape (colour, position) or colour (shape) is in no object's pixels: the
        # images are rendered from objects without it, so its RGB value never appears
        if q["qtype"] == "shape":
            from evaluation.suites.shapes import COLOR_RGB
            assert COLOR_RGB[named] not in {c for _, c in q["image"].getcolors(4096)}
        else:
            assert named in spec.shapes
    # a refusal is well-formed on the suite's splits (never right there) but not tokenizer text
    assert UNANSWERABLE in ShapesSource(suite={"max_objects": 2}).answer_space()
    assert UNANSWERABLE not in corpus(spec)
