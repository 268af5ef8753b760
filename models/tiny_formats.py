"""Format-following items for the tiny base's SFT mix: UV-CoT's box chain and MPO's CoT answer.

A hub VLM arrives knowing the formats these methods prompt for. LLaVA-1.5's SFT mix holds
region-grounding data (RefCOCO, Visual Genome: answers written as "[x0, y0, x1, y1]"), which
is what UV-CoT's step 1 asks for (seeds/uv-cot.txt, sec. 3: the policy proposes a box);
InternVL's holds CoT data that ends in a stated answer, which MPO's correctness pipeline
parses (seeds/mpo.txt, sec. 3.1). The tiny base learns from its own SFT split only, so without
such items it never writes a box or "Final answer:", and those methods have nothing to rank
(README, "The embedded default").

With ``box_share`` = b and ``cot_share`` = c, a fraction b of the SFT queries become box-chain
items (half of them step 1: the question with the box request -> the target region's box;
half step 2: the two-turn conversation with that box and its crop -> the answer) and a
fraction c become CoT items (the question with MPO's CoT instruction -> "Final answer: <answer>");
the rest stay plain answers. Every target comes from the SFT split's ground truth (its answers
and object boxes), never from the pool the rounds draw from or the test split.
"""

from __future__ import annotations

import random

from methods.boxes import format_box
from models.records import Query, user_prompt

PLAIN, BOX_STEP, ANSWER_STEP, COT = "plain", "box_step", "answer_step", "cot"


def answering_region(query: Query) -> list[float]:
    """The pixel box that answers the query: its target object; for questions about no single
    object (counting, an absent object) the box around every object, else the whole image."""
    if query["target_box"]:
        return list(query["target_box"])
    if query["boxes"]:
        boxes = query["boxes"]
        return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
    width, height = query["image"].size
    return [0.0, 0.0, float(width), float(height)]


def format_item(query: Query, kind: str) -> tuple[list[dict], list, str]:
    """(prompt messages, images, target text) of one SFT item of the given kind."""
    if kind == PLAIN:
        return user_prompt(query["question"]), [query["image"]], query["answer"]
    # Imported here: the methods build on models/, and the tiny model is built before any method runs.
    from methods.mpo import MPO
    from methods.uvcot import UVCoT, box_prompt

    if kind == COT:
        cot = MPO(cot=True)
        return user_prompt(cot.question(query)), [query["image"]], f"{cot.answer_marker} {query['answer']}"
    box_text = format_box(answering_region(query), *query["image"].size)
    if kind == BOX_STEP:
        return box_prompt(query["question"]), [query["image"]], box_text
    if kind == ANSWER_STEP:
        # The same conversation and crop UV-CoT's step 2 builds from a box (methods/uvcot.py).
        chain = UVCoT().chain_inputs(query, box_text)
        return chain["prompt"], chain["images"], query["answer"]
    raise ValueError(f"unknown SFT item kind {kind!r}; choose one of {[PLAIN, BOX_STEP, ANSWER_STEP, COT]}")


def item_kinds(n: int, box_share: float, cot_share: float, seed: int) -> list[str]:
    """The kind of each of ``n`` SFT items: exactly round(n * share) of each format, shuffled."""
    if box_share < 0 or cot_share < 0 or box_share + cot_share > 1:
        raise ValueError(f"model.tiny.sft_box_share={box_share} and sft_cot_share={cot_share} must be >= 0 "
                         "and sum to at most 1 (they are shares of the SFT queries)")
    n_box, n_cot = round(n * box_share), round(n * cot_share)
    kinds = ([BOX_STEP] * (n_box // 2) + [ANSWER_STEP] * (n_box - n_box // 2) + [COT] * n_cot
             + [PLAIN] * (n - n_box - n_cot))
    random.Random(f"sft-formats/{seed}").shuffle(kinds)
    return kinds
