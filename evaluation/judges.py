"""Scorers shared by pairing and evaluation, so the two cannot drift.

A judge maps candidates (with their queries) to scores in [0, 1], with its raw values in
``score_parts``:

    score(candidates, queries_by_id, evaluator=None) -> list[Scored]   (same order)

``needs_model`` says whether the judge reads an evaluator model; the score stage then passes
``evaluator`` (a ``models.sampling.Policy``): the round's starting policy when the judge's
``model`` is None (self-evaluation), else the separate model that ``model`` configures (a
dict shaped like the top-level ``model`` config; UV-CoT's larger evaluator).

Judges (conf/judge/<name>.yaml):
    correctness  rule-based match with the ground truth (no model)
    yesno        p(yes) / (p(yes) + p(no)) for "Is the answer right?" (UV-CoT's released scorer)
    rating       expected rating over the rating tokens only, rescaled to [0, 1]
                 (seeds/soft-rewards.txt, sec. 3: soft reward, single-item rating)
    anchor       p(answer beats the query's anchor answer) from the logits of {0, 1}; the anchor
                 scores 0.5 (seeds/soft-rewards.txt, sec. 3: anchor-based pairwise, N-1 comparisons)

The probability math is in pure functions on logits (``two_way_probability``,
``expected_rating``, ``rescale_rating``), so it is tested on fixed tensors; the model side
(prompt encoding, the forward pass, finding the answer tokens) is ``models.scoring``.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from evaluation.metrics import normalise
from models.records import Candidate, Query, Scored, assistant_message, user_prompt

# --- answer extraction and rule-based matching --------------------------------------------

DEFAULT_MARKERS = ["### Answer:", "Final answer:"]  # LLaVA-Reasoner; MPO ("Final Answer: ...")

NUMBER_WORDS = {w: i for i, w in enumerate([
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"])}

_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")
_LETTER_ANSWER = re.compile(r"^\(?([A-Za-z])\)?[.:]?$")
# A choice letter in a response: "(B)", "(B) blue", "B.", "B)", "B) blue", "B:" or a bare "B".
_LETTER_RESPONSE = re.compile(r"^(?:\(([A-Za-z])\)|([A-Za-z])(?:[.):](?:\s|$)|$))")


def find_answer(response: str, markers: list[str]) -> str | None:
    """The text after the LAST occurrence of any marker (case-insensitive), or None when the
    response holds no marker (MPO: no clear final answer)."""
    best, end = -1, -1
    lowered = response.lower()
    for marker in markers:
        pos = lowered.rfind(marker.lower())
        if pos > best:
            best, end = pos, pos + len(marker)
    return response[end:].strip() if best >= 0 else None


def extract_answer(response: str, markers: list[str] | str | None) -> str:
    """The text after the last marker (e.g. "### Answer:"), or the whole response."""
    if isinstance(markers, str):
        markers = [markers]
    found = find_answer(response, markers or [])
    return response.strip() if found is None else found


def parse_number(text: str) -> float | None:
    """3, 3.0, -2.5, 1,000, $4, 50%, "three" -> a float; anything else -> None."""
    t = text.strip().lower().rstrip(".").strip()
    if t in NUMBER_WORDS:
        return float(NUMBER_WORDS[t])
    t = t.replace(",", "").lstrip("$").rstrip("%").strip()
    return float(t) if _NUMBER.match(t) else None


def choice_letter(text: str, *, is_answer: bool) -> str | None:
    """The multiple-choice letter of a ground truth ("B", "(B)", "B.") or of a response
    ("(B)", "B.", "B) blue", "B"), upper-cased; None when there is none. A response's letter
    must be bracketed, followed by ".", ")" or ":", or stand alone, so the article in
    "a red circle" is not read as choice A."""
    t = text.strip()
    if is_answer:
        m = _LETTER_ANSWER.match(t)
        return m.group(1).upper() if m else None
    m = _LETTER_RESPONSE.match(t)
    return (m.group(1) or m.group(2)).upper() if m else None


def answers_match(predicted: str, answer: str, rel_tol: float) -> bool:
    """Normalised exact match, else the same number within ``rel_tol`` (relative), else the
    same multiple-choice letter when the ground truth is a letter."""
    # Normalising drops articles, so "A" (a choice) and "the" both become "": equal empty forms
    # count only when the raw texts agree.
    same_raw = predicted.strip().lower() == answer.strip().lower()
    if normalise(predicted) == normalise(answer) and (normalise(answer) or same_raw):
        return True
    a, p = parse_number(answer), parse_number(predicted)
    if a is not None and p is not None:
        return math.isclose(p, a, rel_tol=rel_tol, abs_tol=1e-12)
    letter = choice_letter(answer, is_answer=True)
    return letter is not None and choice_letter(predicted, is_answer=False) == letter


@dataclass
class CorrectnessJudge:
    """1.0 when the answer extracted from the response matches the ground truth, else 0.0.

    Extraction: the text after the last of ``answer_markers`` ("### Answer:", "Final answer:",
    case-insensitive), or the whole response when none occurs. Matching
    (``answers_match``): normalised exact match; numbers within ``rel_tol`` ("3" == "3.0",
    "two" == "2"); multiple-choice letters ("(B)", "B.", "B) blue" == "B").
    ``missing_answer``: "error" fails on a query without a ground truth (the usual mistake:
    an unmapped answer column); "neutral" scores its candidates 0.5 (for methods that pair
    answerless queries without the judge, e.g. MPO's DropoutNTP on answerless data)."""

    answer_markers: list[str] = field(default_factory=lambda: list(DEFAULT_MARKERS))
    rel_tol: float = 1e-4
    missing_answer: str = "error"

    needs_model = False

    def __post_init__(self):
        if self.missing_answer not in ("error", "neutral"):
            raise ValueError(f"judge.missing_answer={self.missing_answer!r}; choose error or neutral")

    def extract(self, response: str) -> str:
        return extract_answer(response, self.answer_markers)

    def score_one(self, response: str, answer: str) -> float:
        return float(answers_match(self.extract(response), answer, self.rel_tol))

    def canonical(self, response: str) -> str:
        """A key under which equivalent answers vote together ("3.0" and "three" -> "3.0";
        "(B) blue" -> "(B)"; else the normalised text)."""
        text = self.extract(response)
        number = parse_number(text)
        if number is not None:
            return repr(float(number))
        letter = choice_letter(text, is_answer=False)
        if letter is not None:
            return f"({letter})"
        return normalise(text)

    def score(self, candidates: list[Candidate], queries: dict[str, Query], evaluator=None) -> list[Scored]:
        scored = []
        for cand in candidates:
            answer = queries[cand["query_id"]]["answer"]
            marker = find_answer(cand["response"], self.answer_markers) is not None
            if answer is None:
                if self.missing_answer == "error":
                    raise ValueError(
                        f"query {cand['query_id']} has no ground-truth answer; judge=correctness needs "
                        "answers (map an answer column in data=..., choose a model-based judge, or set "
                        "judge.missing_answer=neutral when the method pairs such queries itself)")
                scored.append(Scored(**cand, score=0.5, score_parts={"correct": None, "marker": marker}))
                continue
            value = self.score_one(cand["response"], answer)
            scored.append(Scored(**cand, score=value, score_parts={"correct": value, "marker": marker}))
        return scored


# --- soft scores from next-token logits (pure) ---------------------------------------------


def two_way_probability(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """p(positive) / (p(positive) + p(negative)) from next-token logits.

    positive [B, P], negative [B, Q]: logits of the tokens that mean "yes" ("1") and "no" ("0")
    (several spellings sum). Softmax over the full vocabulary then renormalising over the two
    sets equals a softmax over these logits alone: sigmoid(logsumexp(pos) - logsumexp(neg)).
    Returns [B] in [0, 1]."""
    return torch.sigmoid(torch.logsumexp(positive.float(), -1) - torch.logsumexp(negative.float(), -1))


def expected_rating(logits: torch.Tensor, values: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft reward (soft-rewards eq. 1-2): p(r) = softmax over the rating tokens' logits only,
    E[r] = sum_r r p(r). logits [B, R] in the order of ``values`` [R]; returns (E [B], p [B, R])."""
    probs = logits.float().softmax(-1)
    return probs @ torch.tensor(values, dtype=probs.dtype), probs


def rescale_rating(expected: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """(E - low) / (high - low): a rating on [low, high] as a score in [0, 1]."""
    return (expected - low) / (high - low)


# --- model-based judges --------------------------------------------------------------------


def _follow_up(query: Query, response: str, question: str) -> list[dict]:
    """The query's question with its image, the candidate's answer, then ``question`` as a
    second user turn (text only: the image is already in the conversation)."""
    return user_prompt(query["question"]) + assistant_message(response) + user_prompt(question, n_images=0)


def _logits_per_candidate(evaluator, candidates: list[Candidate], queries: dict[str, Query], make_prompt,
                           token_ids: list[int], batch_size: int, label: str) -> torch.Tensor:
    """[N, K] logits, one row per candidate, from ONE forward per distinct (query, response):
    identical samples (frequent with short answers) share their row."""
    from models.scoring import next_token_logits

    keys = [(c["query_id"], c["response"]) for c in candidates]
    unique = list(dict.fromkeys(keys))
    prompts = [make_prompt(queries[qid], response) for qid, response in unique]
    images = [[queries[qid]["image"]] for qid, _ in unique]
    logits = next_token_logits(evaluator, prompts, images, token_ids, batch_size, label=label)
    row = {key: i for i, key in enumerate(unique)}
    return logits[[row[key] for key in keys]] if keys else logits


def _need_evaluator(evaluator, name: str):
    if evaluator is None:
        raise ValueError(f"judge={name} reads an evaluator model's logits; the score stage must pass "
                         "evaluator=Policy (the round's policy, or judge.model)")
    return evaluator


@dataclass
class YesNoJudge:
    """score = p(yes) / (p(yes) + p(no)) for the evaluator's next token after the follow-up
    turn ``question`` (UV-CoT's released code scores by yes/no questions).

    The conversation: user (image + query question), assistant (candidate), user (``question``),
    then the generation prompt. ``yes_words`` / ``no_words``: spellings whose first tokens
    count as yes / no (their probabilities sum). ``model``: None = the round's starting
    policy judges itself; a model config dict = a separate evaluator."""

    question: str = "Is the answer right? Please answer yes or no."
    yes_words: list[str] = field(default_factory=lambda: ["yes"])
    no_words: list[str] = field(default_factory=lambda: ["no"])
    model: dict[str, Any] | None = None
    batch_size: int = 32

    needs_model = True

    def score(self, candidates: list[Candidate], queries: dict[str, Query], evaluator=None) -> list[Scored]:
        from models.scoring import answer_token_ids

        evaluator = _need_evaluator(evaluator, "yesno")
        ids = answer_token_ids(evaluator.processor.tokenizer, self.yes_words + self.no_words)
        logits = _logits_per_candidate(evaluator, candidates, queries,
                                       lambda q, r: _follow_up(q, r, self.question), ids, self.batch_size,
                                       label="judge yesno")
        n_yes = len(self.yes_words)
        p_yes = two_way_probability(logits[:, :n_yes], logits[:, n_yes:])
        return [Scored(**c, score=float(p), score_parts={"p_yes": float(p), "logit_yes": float(row[:n_yes].max()),
                                                         "logit_no": float(row[n_yes:].max())})
                for c, p, row in zip(candidates, p_yes, logits)]


@dataclass
class RatingJudge:
    """Expected rating (soft-rewards sec. 3): the evaluator is asked ``question`` as a follow-up
    turn; at the rating position p(r) = softmax over the rating tokens ``ratings`` only, and
    score = (sum_r r p(r) - min r) / (max r - min r) (1..5 -> [0, 1]). Ratings must start
    with distinct tokens (checked)."""

    question: str = "Rate the answer from 1 (wrong) to 5 (right). Answer with one number."
    ratings: list[str] = field(default_factory=lambda: ["1", "2", "3", "4", "5"])
    model: dict[str, Any] | None = None
    batch_size: int = 32

    needs_model = True

    def values(self) -> list[float]:
        values = [float(r) for r in self.ratings]
        if max(values) == min(values):
            raise ValueError("judge.ratings needs at least two different values")
        return values

    def score(self, candidates: list[Candidate], queries: dict[str, Query], evaluator=None) -> list[Scored]:
        from models.scoring import answer_token_ids

        evaluator = _need_evaluator(evaluator, "rating")
        values = self.values()
        ids = answer_token_ids(evaluator.processor.tokenizer, self.ratings)
        logits = _logits_per_candidate(evaluator, candidates, queries,
                                       lambda q, r: _follow_up(q, r, self.question), ids, self.batch_size,
                                       label="judge rating")
        expected, probs = expected_rating(logits, values)
        scores = rescale_rating(expected, min(values), max(values))
        return [Scored(**c, score=float(s), score_parts={"expected_rating": float(e),
                                                         "p": dict(zip(self.ratings, p.tolist()))})
                for c, s, e, p in zip(candidates, scores, expected, probs)]


def pick_anchors(candidates: list[Candidate], how: str, seed: int) -> dict[str, int]:
    """Index (into ``candidates``) of each query's anchor: its first candidate, or a random
    one drawn deterministically from (seed, query id)."""
    by_query: dict[str, list[int]] = {}
    for i, c in enumerate(candidates):
        by_query.setdefault(c["query_id"], []).append(i)
    if how == "first":
        return {qid: idx[0] for qid, idx in by_query.items()}
    if how == "random":
        return {qid: random.Random(f"{seed}:{qid}").choice(idx) for qid, idx in by_query.items()}
    raise ValueError(f"judge.anchor={how!r}; choose first or random")


@dataclass
class AnchorJudge:
    """Anchor-based pairwise soft reward (soft-rewards sec. 3). Per query one candidate is the
    anchor (score 0.5); every other candidate k is shown with the anchor, as "Answer A" (k)
    and "Answer B" (anchor), and asked ``question``; score = p(1) / (p(1) + p(0)) from the
    logits of the tokens {``yes_token``, ``no_token``}. N-1 comparisons per query, not N^2.

    Departure: a candidate whose response equals the anchor's (after normalisation) gets 0.5
    without a comparison (the model would be comparing an answer with itself), and identical
    responses of one query share one comparison (so at most N-1 forward passes).
    ``anchor``: "random" (the paper; deterministic per (seed, query id)) or "first"."""

    question: str = "Is answer A better than answer B? Answer 1 for yes, 0 for no."
    yes_token: str = "1"
    no_token: str = "0"
    anchor: str = "random"
    seed: int = 0
    model: dict[str, Any] | None = None
    batch_size: int = 32

    needs_model = True

    def comparison_prompt(self, query: Query, response: str, anchor: str) -> list[dict]:
        return user_prompt(f"{query['question']}\nAnswer A: {response}\nAnswer B: {anchor}\n{self.question}")

    def score(self, candidates: list[Candidate], queries: dict[str, Query], evaluator=None) -> list[Scored]:
        from models.scoring import answer_token_ids

        evaluator = _need_evaluator(evaluator, "anchor")
        anchors = pick_anchors(candidates, self.anchor, self.seed)
        anchor_text = {qid: candidates[i]["response"] for qid, i in anchors.items()}
        compare = [i for i, c in enumerate(candidates)  # candidate indices that need a comparison
                   if i != anchors[c["query_id"]] and normalise(c["response"]) != normalise(anchor_text[c["query_id"]])]
        ids = answer_token_ids(evaluator.processor.tokenizer, [self.yes_token, self.no_token])
        logits = _logits_per_candidate(
            evaluator, [candidates[i] for i in compare], queries,
            lambda q, r: self.comparison_prompt(q, r, anchor_text[q["id"]]), ids, self.batch_size,
            label="judge anchor")
        p_better = dict(zip(compare, two_way_probability(logits[:, :1], logits[:, 1:]).tolist()))
        scored = []
        for i, c in enumerate(candidates):
            anchor_i = anchors[c["query_id"]]
            value = p_better.get(i, 0.5)
            scored.append(Scored(**c, score=value, score_parts={
                "p_better": value, "anchor": candidates[anchor_i]["candidate_id"], "is_anchor": i == anchor_i,
                "compared": i in p_better}))
        return scored
