"""The symmetric pair filter (methods/balance.py) and its use in the pair stage."""

from collections import Counter

from methods.balance import answer_key, symmetric_pairs
from models.records import assistant_message


def pair(chosen: str, rejected: str, i: int) -> dict:
    return {"id": i, "chosen": assistant_message(chosen), "rejected": assistant_message(rejected)}


def directions(pairs):
    return Counter((answer_key(p["chosen"]), answer_key(p["rejected"])) for p in pairs)


def test_keeps_equal_numbers_of_each_direction():
    pairs = [pair("no", "yes", i) for i in range(5)] + [pair("Yes.", "no", 5 + i) for i in range(2)]
    pairs += [pair("red", "blue", 10), pair("blue", "red", 11), pair("green", "red", 12)]
    kept, dropped = symmetric_pairs(pairs, seed=0)
    assert directions(kept) == {("no", "yes"): 2, ("yes", "no"): 2, ("red", "blue"): 1, ("blue", "red"): 1}
    assert dropped == 4
    # original order, reproducible choice
    assert [p["id"] for p in kept] == sorted(p["id"] for p in kept)
    assert [p["id"] for p in symmetric_pairs(pairs, seed=0)[0]] == [p["id"] for p in kept]


def test_one_sided_rounds_keep_nothing():
    kept, dropped = symmetric_pairs([pair("yes", "no", i) for i in range(3)], seed=1)
    assert kept == [] and dropped == 3


def test_the_control_is_never_balanced():
    from methods.sft_control import ContinuedSFT
    from methods.reasoner import Reasoner

    assert ContinuedSFT.trains_on_ground_truth is True
    assert getattr(Reasoner, "trains_on_ground_truth", False) is False
