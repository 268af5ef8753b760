"""The continued-SFT control (SeVa, Table 3, "cont. SFT"): the same optimizer steps as a
preference method, spent on the ground-truth answers of the same round queries.

A preference round is only worth its cost if it beats simply training on the labels, so
every results table carries this control. ``generate`` answers each query greedily (so the
pairs record what the policy said); ``pair`` makes one pair per answered query with the
ground truth as chosen and the greedy answer as rejected. Trained with ``loss=sft`` (the
method's default), only the chosen side is used; the rejected side makes the logged reward
margins comparable with the preference methods'. Queries without a ground truth cannot be
used and are counted (``dropped_no_answer``).
"""

from __future__ import annotations

from dataclasses import dataclass

from models.records import Candidate, Pair, Query, Scored, assistant_message, user_prompt
from models.sampling import Policy


@dataclass
class ContinuedSFT:
    max_new_tokens: int = 8
    # The SFT loss reads only the chosen (ground-truth) side, so train.balance_pairs, which the
    # control inherits from the method it controls for, must not throw its labels away.
    trains_on_ground_truth = True

    def generate(self, policy: Policy, queries: list[Query], seed: int) -> list[Candidate]:
        prompts = [user_prompt(q["question"]) for q in queries]
        greedy = policy.generate(prompts, [[q["image"]] for q in queries], max_new_tokens=self.max_new_tokens,
                                 label="sft-control greedy")
        return [Candidate(query_id=q["id"], candidate_id=f"{q['id']}/greedy", prompt=prompt, response=texts[0],
                          extras={"greedy": True})
                for q, prompt, texts in zip(queries, prompts, greedy)]

    def pair(self, scored: list[Scored], queries: dict[str, Query], seed: int) -> tuple[list[Pair], dict]:
        pairs, no_answer = [], 0
        for cand in scored:
            query = queries[cand["query_id"]]
            if not query.get("answer"):
                no_answer += 1
                continue
            pairs.append(Pair(
                pair_id=f"{query['id']}/truth>{cand['candidate_id']}", query_id=query["id"], prompt=cand["prompt"],
                images=[query["image"]], chosen=assistant_message(query["answer"]),
                rejected=assistant_message(cand["response"]), score_chosen=1.0, score_rejected=cand["score"],
                rejected_extra=[], method="sft_control",
            ))
        return pairs, {"dropped_no_answer": no_answer}
