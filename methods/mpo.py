"""MPO's preference data engine (seeds/mpo.txt, sec. 3.1), trained with loss=mpo
(0.8 DPO + 0.2 BCO + 1.0 SFT, conf/loss/mpo.yaml).

Two pipelines, chosen per query:

Correctness pipeline (queries with a ground truth). ``num_samples`` responses at
``temperature``; with ``cot`` the question asks for reasoning that ends with
"Final answer: <answer>". Chosen = responses whose final answer the judge finds correct
(score >= 0.5); rejected = wrong ones AND, with ``cot``, ones with no "Final answer:" marker
("responses that fail to provide a clear final answer are also merged into the negative
set"). Up to ``max_pairs_per_query`` (correct, rejected) pairs of distinct responses per query
(released code: 32 samples at T=0.7, up to 15 pairs).

DropoutNTP (queries without a ground truth, plus a random ``answerless_fraction`` of the
others, so a labelled pool can mix both as MMPR does). Chosen = one sampled response to the
plain question; rejected = its first ``keep_ratio`` of words (the paper's dropout ratio DR,
sec. 8.2: the fraction KEPT, 0.5 best) continued by the same policy WITHOUT the image (a
text-only prompt). Pairs are dropped when the two responses are equal after normalisation,
when the chosen is empty, or when no word of it was kept (a one-word response: the rejected
would be a fresh blind answer, not a continuation).
The training pair keeps the image for both responses.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from evaluation.judges import find_answer
from evaluation.metrics import normalise
from models.records import (
    Candidate,
    Pair,
    Query,
    Scored,
    assistant_message,
    group_by_query,
    user_prompt,
)
from models.sampling import Policy

CORRECTNESS, DROPOUT_NTP = "correctness", "dropout_ntp"


def truncate_by_words(text: str, keep_ratio: float) -> str:
    """The first floor(n * keep_ratio) whitespace-separated words of ``text`` (n words).

    Rounding down keeps at least one word dropped for any ratio < 1, so the continuation
    always has something to replace; a one-word response keeps nothing (``MPO.pair`` then
    drops the pair)."""
    if not 0.0 <= keep_ratio < 1.0:
        raise ValueError(f"keep_ratio={keep_ratio} must lie in [0, 1)")
    words = text.split()
    return " ".join(words[: math.floor(len(words) * keep_ratio + 1e-9)])


@dataclass
class MPO:
    num_samples: int = 8
    temperature: float = 0.7
    max_pairs_per_query: int = 15
    cot: bool = True
    cot_instruction: str = 'Think step by step, then give the answer on the last line as "Final answer: <answer>".'
    answer_marker: str = "Final answer:"
    answerless_fraction: float = 0.0
    keep_ratio: float = 0.5
    max_new_tokens: int = 512

    def __post_init__(self):
        if not 0.0 <= self.answerless_fraction <= 1.0:
            raise ValueError(f"method.answerless_fraction={self.answerless_fraction} must lie in [0, 1]")
        truncate_by_words("", self.keep_ratio)  # validates the ratio

    def question(self, query: Query) -> str:
        return f"{query['question']} {self.cot_instruction}" if self.cot else query["question"]

    def split(self, queries: list[Query], seed: int) -> tuple[list[Query], list[Query]]:
        """(correctness queries, DropoutNTP queries): every answerless query goes to DropoutNTP,
        plus round(answerless_fraction * n) of the n answered ones, drawn with ``seed``."""
        answered = [q for q in queries if q["answer"] is not None]
        k = round(self.answerless_fraction * len(answered))
        as_answerless = {q["id"] for q in random.Random(seed).sample(answered, k)}
        correctness = [q for q in answered if q["id"] not in as_answerless]
        ntp = [q for q in queries if q["answer"] is None or q["id"] in as_answerless]
        return correctness, ntp

    def generate(self, policy: Policy, queries: list[Query], seed: int) -> list[Candidate]:
        from models.scoring import continue_responses

        correctness, ntp = self.split(queries, seed)
        candidates: list[Candidate] = []
        if correctness:
            prompts = [user_prompt(self.question(q)) for q in correctness]
            samples = policy.generate(
                prompts, [[q["image"]] for q in correctness], max_new_tokens=self.max_new_tokens,
                temperature=self.temperature, num_samples=self.num_samples, seed=seed, label="mpo correctness",
            )
            candidates += [
                Candidate(query_id=q["id"], candidate_id=f"{q['id']}/{j}", prompt=prompt, response=text,
                          extras={"pipeline": CORRECTNESS, "sample": j, "temperature": self.temperature})
                for q, prompt, texts in zip(correctness, prompts, samples)
                for j, text in enumerate(texts)
            ]
        if ntp:
            prompts = [user_prompt(q["question"]) for q in ntp]
            chosen = [texts[0] for texts in policy.generate(
                prompts, [[q["image"]] for q in ntp], max_new_tokens=self.max_new_tokens,
                temperature=self.temperature, seed=seed + 1, label="mpo dropout-ntp chosen",
            )]
            prefixes = [truncate_by_words(text, self.keep_ratio) for text in chosen]
            # The continuation sees the question but NOT the image: a text-only prompt.
            blind = [user_prompt(q["question"], n_images=0) for q in ntp]
            rejected = continue_responses(
                policy, blind, [[] for _ in ntp], prefixes, max_new_tokens=self.max_new_tokens,
                temperature=self.temperature, seed=seed + 2, label="mpo dropout-ntp continue",
            )
            for q, prompt, text_c, prefix, text_r, blind_prompt in zip(ntp, prompts, chosen, prefixes, rejected, blind):
                candidates.append(Candidate(query_id=q["id"], candidate_id=f"{q['id']}/ntp-chosen", prompt=prompt,
                                            response=text_c, extras={"pipeline": DROPOUT_NTP, "role": "chosen"}))
                candidates.append(Candidate(
                    query_id=q["id"], candidate_id=f"{q['id']}/ntp-rejected", prompt=blind_prompt, response=text_r,
                    extras={"pipeline": DROPOUT_NTP, "role": "rejected", "parent": f"{q['id']}/ntp-chosen",
                            "kept_words": len(prefix.split()), "keep_ratio": self.keep_ratio}))
        return candidates

    def parsed(self, response: str) -> bool:
        """With ``cot``, a response must state its final answer after the marker."""
        return not self.cot or find_answer(response, [self.answer_marker]) is not None

    def pair(self, scored: list[Scored], queries: dict[str, Query], seed: int) -> tuple[list[Pair], dict]:
        rng = random.Random(seed)
        by_query = group_by_query(scored)
        pairs: list[Pair] = []
        counts = {"correctness_pairs": 0, "dropout_ntp_pairs": 0, "unparseable": 0,
                  "dropped_no_contrast": 0, "dropped_equal": 0, "dropped_empty": 0,
                  "dropped_no_prefix": 0}
        for qid, cands in by_query.items():
            image = queries[qid]["image"]
            if cands[0]["extras"]["pipeline"] == DROPOUT_NTP:
                roles = {c["extras"]["role"]: c for c in cands}
                chosen, rejected = roles["chosen"], roles["rejected"]
                if not chosen["response"].strip():
                    # An empty sample (EOS first) is no answer to prefer; its SFT term would
                    # teach the policy to stop at once.
                    counts["dropped_empty"] += 1
                    continue
                if rejected["extras"].get("kept_words", 1) == 0:
                    # Nothing of the chosen was kept (a one-word response): the rejected is a
                    # fresh blind answer, not a continuation. On one-word answers such pairs
                    # pushed answer words down after the image and taught the tiny model to
                    # answer with nothing (40 % empty answers after one round).
                    counts["dropped_no_prefix"] += 1
                    continue
                if normalise(chosen["response"]) == normalise(rejected["response"]):
                    counts["dropped_equal"] += 1
                    continue
                pairs.append(_pair(f"{qid}/ntp", qid, chosen, rejected, image, chosen["score"], rejected["score"]))
                counts["dropout_ntp_pairs"] += 1
                continue
            good, bad = [], []
            for c in cands:
                ok = self.parsed(c["response"])
                counts["unparseable"] += not ok
                (good if ok and c["score"] >= 0.5 else bad).append((c, c["score"] if ok else 0.0))
            combos = [(g, b) for g in _distinct(good) for b in _distinct(bad)]
            if not combos:
                counts["dropped_no_contrast"] += 1
                continue
            for (c, sc), (r, sr) in rng.sample(combos, min(self.max_pairs_per_query, len(combos))):
                pairs.append(_pair(f"{c['candidate_id']}>{r['candidate_id']}", qid, c, r, image, sc, sr))
                counts["correctness_pairs"] += 1
        return pairs, counts


def _pair(pair_id: str, qid: str, chosen: Scored, rejected: Scored, image, score_c: float, score_r: float) -> Pair:
    # The chosen candidate's prompt carries the image placeholder; DropoutNTP's rejected was
    # written without the image but is trained with it (MPO eq. 2).
    return Pair(pair_id=pair_id, query_id=qid, prompt=chosen["prompt"], images=[image],
                chosen=assistant_message(chosen["response"]), rejected=assistant_message(rejected["response"]),
                score_chosen=score_c, score_rejected=score_r, rejected_extra=[], method="mpo")


def _distinct(items: list[tuple[Scored, float]]) -> list[tuple[Scored, float]]:
    """First (candidate, score) of each distinct response text, in order."""
    seen, out = set(), []
    for c, s in items:
        if c["response"] not in seen:
            seen.add(c["response"])
            out.append((c, s))
    return out
