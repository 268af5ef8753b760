"""Stage 5: held-out exact-match accuracy of a policy, overall and per question type.

Greedy decoding; a response outside the suite's answer space counts as malformed (and wrong).
Scored by the same CorrectnessJudge that pairs correctness-based methods."""

from __future__ import annotations

from prefect import task

from evaluation.judges import CorrectnessJudge
from evaluation.metrics import accuracy_table, normalise
from models.records import user_prompt
from tasks.artifacts import is_done, stage_output, write_json, write_jsonl
from tasks.common import STAGE_OPTIONS, build, eval_queries, frozen_policy, round_dir


@task(name="evaluate", **STAGE_OPTIONS)
def evaluate(run_dir: str, round_index: int, cfg: dict, policy_ckpt: str | None) -> str:
    out = round_dir(run_dir, round_index) / "eval"
    if is_done(out):
        return str(out)
    with stage_output(out, "evaluate", {"policy": policy_ckpt}) as (tmp, manifest):
        queries = eval_queries(cfg)
        policy = frozen_policy(cfg, policy_ckpt)
        responses = policy.generate(
            [user_prompt(q["question"]) for q in queries], [[q["image"]] for q in queries],
            max_new_tokens=cfg["eval"]["max_new_tokens"], batch_size=cfg["eval"]["batch_size"],
            label=f"evaluate round {round_index}",
        )
        judge = CorrectnessJudge()
        answers = build(cfg["eval"]["source"]).answer_space()
        texts = [r[0] for r in responses]
        correct = [judge.score_one(t, q["answer"]) == 1.0 for t, q in zip(texts, queries)]
        malformed = [normalise(t) not in answers for t in texts]
        table = accuracy_table([q["qtype"] for q in queries], correct, malformed)
        write_json(tmp / "eval.json", table)
        write_jsonl(tmp / "predictions.jsonl", [
            {"id": q["id"], "qtype": q["qtype"], "question": q["question"], "answer": q["answer"],
             "response": t, "correct": c} for q, t, c in zip(queries, texts, correct)])
        manifest["counts"] = {"eval_items": len(queries)}
        manifest["metrics"] = table
    return str(out)
