"""An experiment reuses a run another experiment finished with the same run key and rounds
(flows/ablate.finished_elsewhere), and nothing else."""

from pathlib import Path

from flows.ablate import finished_elsewhere


def make_run(root: Path, experiment: str, key: str, planned: int, finished_rounds: int) -> Path:
    run = root / experiment / key
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"rounds: {planned}\nseed: 0\n")
    for i in range(finished_rounds + 1):
        (run / f"round_{i}" / "eval").mkdir(parents=True)
        (run / f"round_{i}" / "eval" / "manifest.json").write_text("{}")
    return run


def cfg(root: Path, experiment: str, rounds: int = 3) -> dict:
    return {"runs_dir": str(root), "experiment_name": experiment, "rounds": rounds}


def test_a_finished_run_with_the_same_key_and_rounds_is_found(tmp_path):
    done = make_run(tmp_path, "methods", "abc123", planned=3, finished_rounds=3)
    assert finished_elsewhere(cfg(tmp_path, "seva_ablation"), "abc123") == done


def test_unfinished_other_rounds_other_keys_and_own_runs_are_not_reused(tmp_path):
    make_run(tmp_path, "methods", "unfinished", planned=3, finished_rounds=2)
    make_run(tmp_path, "methods", "fourrounds", planned=4, finished_rounds=4)
    make_run(tmp_path, "seva_ablation", "own", planned=3, finished_rounds=3)
    ablation = cfg(tmp_path, "seva_ablation")
    assert finished_elsewhere(ablation, "unfinished") is None
    assert finished_elsewhere(ablation, "fourrounds") is None  # planned 4 rounds: a different table row
    assert finished_elsewhere(ablation, "own") is None  # its own folder: resumed by iterate, not "reused"
    assert finished_elsewhere(ablation, "missing") is None


def test_a_reused_run_is_reported_under_the_label_this_experiment_gave_it(tmp_path):
    """The reused run's config carries the label of the experiment that ran it ('Reasoner' for
    a plain run); the report groups by this experiment's label, so its seeds land in one row."""
    import json

    from evaluation.report import INDEX, collect_runs

    reused = make_run(tmp_path, "probe", "k0", planned=3, finished_rounds=3)
    own = make_run(tmp_path, "methods", "k1", planned=3, finished_rounds=3)
    for run, label in ((reused, "Reasoner"), (own, "reasoner")):
        (run / "config.yaml").write_text(f"rounds: 3\nseed: 0\nlabel: {label}\n"
                                         "method: {_target_: methods.reasoner.Reasoner}\n")
        for i in range(4):
            (run / f"round_{i}" / "eval" / "manifest.json").write_text('{"metrics": {"accuracy": 0.5}}')
    entries = [{"label": "reasoner", "seed": 0, "run_dir": str(reused)},
               {"label": "reasoner", "seed": 1, "run_dir": str(own)}]
    (tmp_path / "methods" / INDEX).write_text(json.dumps({"experiment": "methods", "runs": entries}))
    assert [r["label"] for r in collect_runs(tmp_path, "methods")] == ["reasoner", "reasoner"]
