"""Pair builders on fixed inputs."""

from PIL import Image

from methods.reasoner import Reasoner, truncate_words
from methods.seva import SeVa
from models.records import message_text, user_prompt


def _query(qid: str, answer: str = "red"):
    return {"id": qid, "image": Image.new("RGB", (8, 8), (qid.__hash__() % 255, 0, 0)), "question": f"q {qid}?",
            "answer": answer, "qtype": "colour", "boxes": [], "target_box": [], "source": "test"}


def _scored(qid, cid, response, score, extras):
    return {"query_id": qid, "candidate_id": cid, "prompt": user_prompt(f"q {qid}?"), "response": response,
            "extras": extras, "score": score, "score_parts": {}}


def test_seva_pairs_clean_over_noised_and_drops_equal_answers():
    queries = {q["id"]: q for q in (_query("a"), _query("b"), _query("c"))}
    scored = [
        _scored("a", "a/none", "red", 1.0, {"augmentation": "none"}),
        _scored("a", "a/d", "blue", 0.0, {"augmentation": "diffusion"}),
        _scored("b", "b/none", "Red.", 1.0, {"augmentation": "none"}),
        _scored("b", "b/d", "red", 1.0, {"augmentation": "diffusion"}),  # equal after normalising
        _scored("c", "c/none", "green", 0.0, {"augmentation": "none"}),
        _scored("c", "c/d", "red", 1.0, {"augmentation": "diffusion"}),  # SeVa ignores correctness
    ]
    pairs, counts = SeVa().pair(scored, queries, seed=0)
    assert counts == {"dropped_equal": 1, "anchors": 0}
    assert [(p["query_id"], message_text(p["chosen"]), message_text(p["rejected"])) for p in pairs] == [
        ("a", "red", "blue"), ("c", "green", "red")]
    # training uses the ORIGINAL image for both responses
    assert pairs[0]["images"][0] is queries["a"]["image"]
    assert pairs[1]["score_chosen"] == 0.0 and pairs[1]["score_rejected"] == 1.0


def test_seva_anchor_keeps_equal_answers_as_chosen_equals_rejected_pairs():
    queries = {q["id"]: q for q in (_query("a"), _query("b"))}
    scored = [
        _scored("a", "a/none", "red", 1.0, {"augmentation": "none"}),
        _scored("a", "a/d", "blue", 0.0, {"augmentation": "diffusion"}),
        _scored("b", "b/none", "Red.", 1.0, {"augmentation": "none"}),
        _scored("b", "b/d", "red", 1.0, {"augmentation": "diffusion"}),
    ]
    pairs, counts = SeVa(anchor_equal=True).pair(scored, queries, seed=0)
    assert counts == {"dropped_equal": 0, "anchors": 1}
    anchor = next(p for p in pairs if p["query_id"] == "b")
    assert message_text(anchor["chosen"]) == message_text(anchor["rejected"]) == "Red."
    assert anchor["method"] == "seva-anchor"


def test_an_anchor_pair_has_zero_dpo_gradient_and_the_nll_of_its_answer():
    import torch

    from models.losses import DPOLoss, PairLogps

    # chosen and rejected computed separately from the same weights, as the trainer's two forks are
    weight = torch.tensor([0.7], requires_grad=True)
    x = torch.tensor([-1.9])
    ref = torch.tensor([-1.1])
    tokens = torch.tensor([2])
    policy = PairLogps(chosen=weight * x, rejected=weight * x, chosen_tokens=tokens, rejected_tokens=tokens)
    reference = PairLogps(chosen=ref, rejected=ref, chosen_tokens=tokens, rejected_tokens=tokens)
    loss, _ = DPOLoss()(policy, reference)
    loss.sum().backward()
    assert weight.grad.item() == 0.0


def _samples(qid, results):
    return [_scored(qid, f"{qid}/{i}", text, score, {"sample": i}) for i, (text, score) in enumerate(results)]


def test_reasoner_band_cap_and_distinct_responses():
    queries = {q: _query(q) for q in ("easy", "hard", "mid", "dup")}
    scored = (
        _samples("easy", [("red", 1.0)] * 8)  # accuracy 1.0 > 0.85: dropped
        + _samples("hard", [("blue", 0.0)] * 7 + [("red", 1.0)])  # accuracy 0.125 < 0.25: dropped
        + _samples("mid", [("red", 1.0)] * 2 + [("red.", 1.0)] * 2 + [("blue", 0.0), ("green", 0.0),
                                                                        ("one", 0.0), ("no", 0.0)])
        + _samples("dup", [("red", 1.0)] * 4 + [("blue", 0.0)] * 4)  # 1 distinct x 1 distinct
    )
    pairs, counts = Reasoner(max_pairs_per_query=3).pair(scored, queries, seed=0)
    assert counts == {"dropped_outside_band": 2, "dropped_no_contrast": 0}
    mid = [p for p in pairs if p["query_id"] == "mid"]
    dup = [p for p in pairs if p["query_id"] == "dup"]
    assert len(mid) == 3 and len(dup) == 1
    assert all(p["score_chosen"] == 1.0 and p["score_rejected"] == 0.0 for p in pairs)
    assert len({(message_text(p["chosen"]), message_text(p["rejected"])) for p in mid}) == 3
    assert (message_text(dup[0]["chosen"]), message_text(dup[0]["rejected"])) == ("red", "blue")


def test_reasoner_band_is_inclusive_and_configurable():
    queries = {"q": _query("q")}
    scored = _samples("q", [("red", 1.0)] * 2 + [("blue", 0.0)] * 6)  # accuracy exactly 0.25
    assert len(Reasoner().pair(scored, queries, seed=0)[0]) == 1
    assert Reasoner(accuracy_band=[0.3, 0.9]).pair(scored, queries, seed=0)[1]["dropped_outside_band"] == 1


def test_reasoner_truncates_to_90_words():
    long_right = " ".join(["word"] * 120) + " red"
    queries = {"q": _query("q")}
    scored = _samples("q", [(long_right, 1.0), ("blue", 0.0)])
    pair = Reasoner().pair(scored, queries, seed=0)[0][0]
    assert len(message_text(pair["chosen"]).split()) == 90
    assert truncate_words("a b c", 2) == "a b" and truncate_words("a b", 2) == "a b"


def test_seva_multi_negative_collects_distinct_wrong_answers():
    queries = {"a": _query("a")}
    scored = [
        _scored("a", "a/none", "red", 1.0, {"augmentation": "none"}),
        _scored("a", "a/diffusion", "blue", 0.0, {"augmentation": "diffusion"}),
        _scored("a", "a/crop", "red", 1.0, {"augmentation": "crop"}),  # same as chosen: not a negative
        _scored("a", "a/moco", "green", 0.0, {"augmentation": "moco"}),
        _scored("a", "a/flip", "Blue", 0.0, {"augmentation": "flip"}),  # duplicate negative
    ]
    (pair,), _ = SeVa(augmentations=["diffusion", "crop", "moco", "flip"]).pair(scored, queries, seed=0)
    assert message_text(pair["rejected"]) == "blue" and pair["rejected_extra"] == ["green"]


def test_image_augmentations_keep_size_and_change_pixels():
    import random

    from evaluation.suites.shapes import make_queries
    from methods.augment import IMAGE_AUGMENTATIONS

    image = make_queries("train", 1, seed=0)[0]["image"]
    for name, augment in IMAGE_AUGMENTATIONS.items():
        out = augment(image, random.Random(1), 0.8)
        assert out.size == image.size and out.mode == "RGB", name
        assert out.tobytes() != image.tobytes(), name


def test_seva_rejects_unknown_augmentation():
    import pytest

    with pytest.raises(ValueError, match="choose one or more of"):
        SeVa(augmentations=["blurr"])


def test_erase_leaves_only_the_background():
    import random

    from evaluation.suites.shapes import make_queries
    from methods.augment import erase

    image = make_queries("train", 1, seed=0)[0]["image"]
    out = erase(image, random.Random(0))
    assert out.getcolors() == [(image.size[0] * image.size[1], image.getpixel((0, 0)))]


def test_hue_rotation_moves_colours_to_other_hues_and_keeps_greys_and_layout():
    import colorsys
    import random

    from methods.augment import hue_rotation

    image = Image.new("RGB", (4, 4), (245, 245, 245))
    image.putpixel((1, 2), (220, 40, 40))  # the suite's red
    out = hue_rotation(image, random.Random(0), strength=2 / 3)
    assert out.getpixel((0, 0)) == (245, 245, 245)  # grey background: no hue to turn
    r, g, b = (c / 255 for c in out.getpixel((1, 2)))
    hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
    assert min(abs(hue - 120), abs(hue - 240)) < 4  # red turned a third of the circle either way
    unturned = hue_rotation(image, random.Random(0), strength=0.0).getpixel((1, 2))
    assert max(abs(a - b) for a, b in zip(unturned, (220, 40, 40))) <= 2  # PIL's HSV round trip rounds


class _RecordingPolicy:
    """Answers "red" to everything and records how each generate call decoded."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, images, **decoding):
        self.calls.append(decoding)
        return [["red"] for _ in prompts]


def test_seva_decodes_greedily_by_default_and_samples_each_view_from_its_own_seed():
    import pytest

    queries = [_query("a"), _query("b")]
    greedy = _RecordingPolicy()
    SeVa(augmentations=["flip", "crop"]).generate(greedy, queries, seed=5)
    assert all("temperature" not in call and "seed" not in call for call in greedy.calls)

    sampled = _RecordingPolicy()
    SeVa(augmentations=["flip", "crop"], temperature=1.0).generate(sampled, queries, seed=5)
    assert [c["temperature"] for c in sampled.calls] == [1.0, 1.0, 1.0]  # clean, flip, crop
    assert len({c["seed"] for c in sampled.calls}) == 3  # independent samples per view

    with pytest.raises(ValueError, match="method.temperature"):
        SeVa(temperature=-0.5)

    shared = _RecordingPolicy()
    SeVa(augmentations=["flip", "crop"], temperature=1.0, shared_noise=True).generate(shared, queries, seed=5)
    assert {c["seed"] for c in shared.calls} == {5} and all(c["reseed_per_batch"] for c in shared.calls)
    with pytest.raises(ValueError, match="shared_noise"):
        SeVa(shared_noise=True)


def test_shared_noise_samples_an_unchanged_view_identically(tiny_policy):
    """A flip leaves a mirror-symmetric image unchanged: with shared noise its sampled answers
    equal the clean ones query by query (no pair), across batches; with independent noise at a
    high temperature some differ."""
    from evaluation.suites.shapes import make_queries
    from models.sampling import Policy

    policy = Policy(*tiny_policy, batch_size=4)
    queries = [dict(q, image=Image.new("RGB", q["image"].size, (245, 245, 245))) for q in make_queries("test", 10, seed=0)]

    def differing(**options):
        method = SeVa(augmentations=["flip"], temperature=3.0, **options)
        cands = method.generate(policy, queries, seed=7)
        by_view = {aug: [c["response"] for c in cands if c["extras"]["augmentation"] == aug] for aug in ("none", "flip")}
        return sum(a != b for a, b in zip(by_view["none"], by_view["flip"]))

    assert differing(shared_noise=True) == 0
    assert differing() > 0
