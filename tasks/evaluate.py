"""Stage 5: held-out exact-match accuracy of a policy, overall and per question type.

Greedy decoding; a response outside the suite's answer space counts as malformed (and wrong).
Scored by the same CorrectnessJudge that pairs correctness-based methods.

With ``eval.rerank_samples`` = N > 0 (off by default), a trained round also re-ranks N sampled
answers per query by the DPO implicit reward beta * (log pi(y|x) - log ref(y|x)), where ref is
the round's starting policy (``reference_ckpt``), and adds best-of-N, reward-weighted vote and
majority vote accuracy to eval.json as ``rerank/*`` (evaluation/rerank.py;
seeds/llava-reasoner-dpo.txt, sec. 5.2)."""

from __future__ import annotations

from prefect import task

from evaluation.boxcot import run_box_cot
from evaluation.judges import CorrectnessJudge
from evaluation.metrics import accuracy_table, normalise
from evaluation.rerank import implicit_rewards, rerank_metrics
from models.records import Query, user_prompt
from tasks.artifacts import is_done, stage_output, write_json, write_jsonl
from tasks.common import STAGE_OPTIONS, build, eval_queries, frozen_policy, round_dir


@task(name="evaluate", **STAGE_OPTIONS)
def evaluate(run_dir: str, round_index: int, cfg: dict, policy_ckpt: str | None,
             reference_ckpt: str | None = None) -> str:
    """``reference_ckpt``: the round's starting policy (None: the base model); read only when
    re-ranking is on and ``round_index`` > 0 (round 0's policy is untrained)."""
    out = round_dir(run_dir, round_index) / "eval"
    if is_done(out):
        return str(out)
    rerank = cfg["eval"].get("rerank_samples", 0) > 0 and round_index > 0
    if cfg["eval"].get("rerank_final_only"):
        rerank = rerank and round_index == cfg["rounds"]
    inputs = {"policy": policy_ckpt} | ({"reference": reference_ckpt} if rerank else {})
    with stage_output(out, "evaluate", inputs) as (tmp, manifest):
        queries = eval_queries(cfg)
        policy = frozen_policy(cfg, policy_ckpt)
        responses = policy.generate(
            [user_prompt(q["question"]) for q in queries], [[q["image"]] for q in queries],
            max_new_tokens=cfg["eval"]["max_new_tokens"], batch_size=cfg["eval"]["batch_size"],
            label=f"evaluate round {round_index}",
        )
        judge = CorrectnessJudge()
        unanswered = [q["id"] for q in queries if not q["answer"]]
        if unanswered:
            raise ValueError(f"{len(unanswered)} evaluation queries have no answer (e.g. {unanswered[0]}); "
                             "held-out accuracy needs ground truth: map eval.source.columns.answer")
        answers = build(cfg["eval"]["source"]).answer_space()
        texts = [r[0] for r in responses]
        table, correct = score_responses(texts, queries, judge, answers)
        if cfg["eval"].get("sampled_temperature", 0) > 0:
            table |= sampled_accuracy(cfg, policy, queries, judge, answers)
        method = build(cfg["method"])
        if hasattr(method, "evaluate"):  # method-specific metrics (judge_grpo: the judge's pairwise accuracy)
            table |= method.evaluate(policy, cfg)
        if cfg["method"].get("eval_box_cot"):  # UV-CoT: box -> crop -> answer, on a subset
            subset = queries[: cfg["eval"]["box_cot_size"]]
            box_table, box_rows = run_box_cot(policy, subset, cfg["method"], judge=judge, answers=answers or None,
                                              label=f"box-CoT evaluate round {round_index}")
            table |= {f"box_cot/{k}": v for k, v in box_table.items()}
            write_jsonl(tmp / "box_cot_predictions.jsonl", box_rows)
        if rerank:
            rerank_table, rows = rerank_eval(cfg, queries, policy_ckpt, reference_ckpt, judge,
                                             seed=cfg["seed"] * 1000 + round_index)
            table |= rerank_table
            write_jsonl(tmp / "rerank.jsonl", rows)
        write_json(tmp / "eval.json", table)
        write_jsonl(tmp / "predictions.jsonl", [
            {"id": q["id"], "qtype": q["qtype"], "question": q["question"], "answer": q["answer"],
             "response": t, "correct": c} for q, t, c in zip(queries, texts, correct)])
        manifest["counts"] = {"eval_items": len(queries)}
        manifest["metrics"] = table
    return str(out)


def score_responses(texts: list[str], queries: list[Query], judge: CorrectnessJudge,
                    answers: set[str]) -> tuple[dict, list[bool]]:
    """(accuracy table, per-item correctness) of one response per query; a response outside the
    answer space is malformed. Without a known answer space (a user dataset with free-form
    answers) nothing is malformed."""
    correct = [judge.score_one(t, q["answer"]) == 1.0 for t, q in zip(texts, queries)]
    malformed = [normalise(t) not in answers for t in texts] if answers else [False] * len(texts)
    return accuracy_table([q["qtype"] for q in queries], correct, malformed), correct


def sampled_accuracy(cfg: dict, policy, queries: list[Query], judge: CorrectnessJudge, answers: set[str]) -> dict:
    """``sampled/*``: accuracy and malformed rate of one answer per item sampled at
    ``eval.sampled_temperature`` (TINY-DEFAULT.md: preference rounds can move sampled accuracy
    where greedy accuracy stays put). The seed is fixed per run, not per round, so rounds differ
    only by their policy."""
    ecfg = cfg["eval"]
    samples = policy.generate(
        [user_prompt(q["question"]) for q in queries], [[q["image"]] for q in queries],
        max_new_tokens=ecfg["max_new_tokens"], temperature=ecfg["sampled_temperature"], num_samples=1,
        seed=cfg["seed"] * 1000 + 999, batch_size=ecfg["batch_size"], label="evaluate sampled",
    )
    table, _ = score_responses([s[0] for s in samples], queries, judge, answers)
    return {f"sampled/{k}": v for k, v in table.items() if not k.startswith("n")}


def rerank_eval(cfg: dict, queries: list[Query], policy_ckpt: str | None, reference_ckpt: str | None,
                judge: CorrectnessJudge, seed: int) -> tuple[dict, list[dict]]:
    """Sample N answers per query from the policy, score them under the policy and the
    reference (image and prompt once per query and model), and re-rank.
    Returns (rerank/* metrics, per-query rows)."""
    from models.logprobs import encode_prompt
    from models.scoring import completion_logps

    ecfg = cfg["eval"]
    n = ecfg["rerank_samples"]
    prompts = [user_prompt(q["question"]) for q in queries]
    policy = frozen_policy(cfg, policy_ckpt)
    samples = policy.generate(
        prompts, [[q["image"]] for q in queries], max_new_tokens=ecfg["max_new_tokens"],
        temperature=ecfg.get("rerank_temperature", 1.0), num_samples=n, seed=seed,
        batch_size=ecfg["batch_size"], label="rerank sample",
    )
    logps = {}
    for name, ckpt in (("policy", policy_ckpt), ("reference", reference_ckpt)):
        model = frozen_policy(cfg, ckpt)
        encoded = [encode_prompt(model.processor, p, [q["image"]]) for p, q in zip(prompts, queries)]
        logps[name] = completion_logps(model, encoded, samples, batch_size=cfg["train"]["ref_batch_size"],
                                       label=f"rerank {name} log-probs")
    items = []
    for q, texts, pol, ref in zip(queries, samples, logps["policy"], logps["reference"]):
        items.append({"keys": [judge.canonical(t) for t in texts],
                      "rewards": implicit_rewards(pol, ref, ecfg.get("rerank_beta", 0.1)),
                      "correct": [judge.score_one(t, q["answer"]) == 1.0 for t in texts]})
    metrics, picks = rerank_metrics(items)
    out_rows = []
    for q, texts, item, pick in zip(queries, samples, items, picks):
        out_rows.append({"id": q["id"], "answer": q["answer"], "samples": texts, "rewards": item["rewards"],
                         "correct": item["correct"], "picks": pick})
    return metrics, out_rows
