"""Bad input (issue 5, item 4): every case below gives one clear message naming the problem and
the fix, or a counted, logged skip; never a bare traceback, never silent loss.

| #  | bad input                  | behaviour                                         | tests                                   |
|----|----------------------------|---------------------------------------------------|-----------------------------------------|
| 1  | corrupt image file         | row skipped, counted (``skipped``) and logged     | test_hf_data::test_bad_rows_are_skipped_counted_and_logged;   |
|    | (or a missing image file)  | as corrupt_image / missing_image_file             | test_hf_data::test_vqa_style_answer_lists_and_paths_to_image_files |
| 2  | missing column in a user   | the CLI exits 2 before any stage with one line    | test_hf_data::test_missing_column_names_column_available_columns_and_config_key; |
|    | dataset                    | naming the column, the columns there and the      | here: test_cli_missing_column_is_one_message_before_any_stage, |
|    |                            | override that fixes it                            | test_check_data_passes_readable_sources_and_names_the_group |
| 3  | empty answer               | row skipped, counted (empty_answer) and logged;   | test_hf_data::test_bad_rows_are_skipped_counted_and_logged; |
|    |                            | kept when no answer column is mapped              | test_hf_data::test_unmapped_answer_keeps_rows_without_ground_truth |
| 4  | grayscale / RGBA / very    | converted to RGB (alpha over white), downscaled   | test_hf_data::test_bad_rows_are_skipped_counted_and_logged |
|    | large image                | to image_max_side with its boxes; counted in      | (images of modes L and RGBA, a 2000x1000 image with a box) |
|    |                            | ``converted`` and logged                          |                                         |
| 5  | text-only query (no image) | row skipped as no_image, counted and logged: the  | test_hf_data::test_bad_rows_are_skipped_counted_and_logged |
|    |                            | methods and prompts need an image                 |                                         |
| 6  | unknown override key       | the CLI exits non-zero with one message naming    | here: test_cli_bad_override_is_one_message[unknown-*]; |
|    |                            | the key (with +key: the closest known key)        | test_config::test_misspelt_key_fails, test_config::test_force_added_keys_are_caught_by_validate; |
|    |                            |                                                   | here: test_force_added_key_names_the_closest_known_key |
| 7  | wrong value type           | the CLI exits non-zero with one message naming    | here: test_cli_bad_override_is_one_message[wrong-type]; |
|    |                            | the key and the type it needs                     | test_config::test_wrong_type_fails      |
| 8  | model not available        | the CLI exits 2 with one line: download it, point | here: test_cli_model_not_available_offline_is_one_message; |
|    | offline                    | model.name_or_path at it, or use model=tiny       | test_load::test_missing_model_offline_is_one_clear_message, test_load::test_unreachable_hub_fails_fast; |
|    |                            | (a hub dataset offline: the same for data)        | test_hf_data::test_hub_id_offline_fails_with_one_clear_message |
| 9  | a round with zero pairs    | manifests and MLflow round metrics record 0 pairs | integration/test_iterate::test_zero_pair_round_carries_policy_forward |
|    |                            | and carried_forward=1, a log line says so; the    |                                         |
|    |                            | checkpoint points at the parent policy            |                                         |
| 10 | full disk while writing an | the CLI exits 2 with one line (free space or move | test_artifacts::test_full_disk_gives_one_clear_message_and_no_partial_dir; |
|    | artifact                   | runs_dir, re-run), no traceback in the logs, not  | here: test_cli_full_disk_is_one_message_and_leaves_no_partial_dir, |
|    |                            | retried, no partial stage directory               | test_full_disk_is_not_retried, test_user_error_log_records_lose_their_traceback |

The CLI tests run the real ``python -m flows.iterate`` in a subprocess; all but the full-disk
one stop before the flow starts (a few seconds each).
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_cli(tmp_path: Path, overrides: list[str], driver: str | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m flows.iterate <overrides>`` (or ``python -c <driver> <overrides>``) offline,
    with an empty HF cache, writing only under tmp_path."""
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
    } | (env or {})
    command = [sys.executable, "-m", "flows.iterate"] if driver is None else [sys.executable, "-c", driver]
    where = [f"runs_dir={tmp_path / 'runs'}", f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    return subprocess.run([*command, *where, *overrides], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def assert_one_message(done: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    """Exit ``code``; no traceback anywhere; stderr is the message, holding every fragment."""
    output = done.stdout + done.stderr
    assert done.returncode == code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for fragment in fragments:
        assert fragment in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) <= 8, done.stderr


@pytest.mark.parametrize("override,code,fragments", [
    ("roundz=2", 1, ["Could not override 'roundz'", "Key 'roundz' not in 'Config'"]),
    ("+roundz=2", 2, ["error: invalid config", "Key 'roundz' not in 'Config'", "Did you mean 'rounds'?"]),
    ("rounds=abc", 1, ["Value 'abc' of type 'str' could not be converted to Integer", "full_key: rounds"]),
], ids=["unknown-key", "unknown-added-key", "wrong-type"])
def test_cli_bad_override_is_one_message(tmp_path, override, code, fragments):
    assert_one_message(run_cli(tmp_path, [override]), code, *fragments)


def test_force_added_key_names_the_closest_known_key():
    from hydra import compose, initialize_config_module

    from flows.schema import ConfigError, register, validate

    register()
    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose("config", overrides=["+method.noise_stp=3"])
        with pytest.raises(ConfigError, match=r"(?s)'noise_stp' not in 'SeVaSchema'.*Did you mean 'noise_step'\?"):
            validate(cfg)
        cfg = compose("config", overrides=["+model.lora.xyz=4"])
        with pytest.raises(ConfigError, match="Known keys there: enabled, r, alpha") as err:
            validate(cfg)
        assert "Did you mean" not in str(err.value)  # nothing close: no guess


def test_cli_model_not_available_offline_is_one_message(tmp_path):
    done = run_cli(tmp_path, ["model=llava7b"])
    assert_one_message(done, 2, "error: Model 'llava-hf/llava-1.5-7b-hf' is not in the local Hugging Face cache",
                       "model.name_or_path=/path/to/llava-1.5-7b-hf", "model=tiny")
    assert not (tmp_path / "runs").exists()  # failed before the flow


@pytest.fixture(scope="module")
def user_dataset(tmp_path_factory) -> Path:
    """A 4-row save_to_disk dataset with the default column names (image, question, answer)."""
    import datasets
    from PIL import Image

    path = tmp_path_factory.mktemp("user") / "vqa"
    rows = {"image": [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(4)],
            "question": ["What colour is it?"] * 4, "answer": ["red"] * 4}
    datasets.Dataset.from_dict(rows, features=datasets.Features({
        "image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string"),
    })).save_to_disk(str(path))
    return path


def test_cli_missing_column_is_one_message_before_any_stage(tmp_path, user_dataset):
    done = run_cli(tmp_path, ["data=hf", f"data.source.path={user_dataset}", "data.source.columns.answer=label"])
    assert_one_message(done, 2, "error: data.source: column 'label' (source.columns.answer) is not in dataset",
                       "available columns: ['answer', 'image', 'question']", "data.source.columns.answer=<column>")
    assert not (tmp_path / "runs").exists()  # failed before the flow (and before the model was built)


def test_check_data_passes_readable_sources_and_names_the_group(user_dataset):
    from flows.checks import check_data
    from flows.schema import ConfigError

    hf = {"_target_": "evaluation.suites.hf.HFSource", "path": str(user_dataset)}
    check_data({"data": {"source": hf, "split": "train"}, "eval": {"source": hf, "split": "train[50%:]"}})
    with pytest.raises(ConfigError, match=r"^eval.source: .*has no rows"):
        check_data({"data": {"source": hf, "split": "train"}, "eval": {"source": hf, "split": "train[4:]"}})
    with pytest.raises(ConfigError, match=r"^data.source: .*column 'img' \(source.columns.image\)"):
        check_data({"data": {"source": hf | {"columns": {"image": "img"}}, "split": "train"},
                    "eval": {"source": hf, "split": "train"}})
    with pytest.raises(ConfigError, match=r"^data.source: the hf data source needs a dataset: set data.source.path"):
        check_data({"data": {"source": hf | {"path": ""}, "split": "train"}, "eval": {"source": hf, "split": "train"}})


def test_full_disk_is_not_retried():
    from tasks.artifacts import DiskFull
    from tasks.common import retry_unless_user_error

    class Failed:
        def __init__(self, exc):
            self.exc = exc

        def result(self):
            raise self.exc

    assert not retry_unless_user_error(None, None, Failed(DiskFull("disk full while writing ...")))
    assert retry_unless_user_error(None, None, Failed(OSError(errno.EIO, "I/O error")))  # transient: retried


def test_user_error_log_records_lose_their_traceback():
    from flows.checks import _UserErrorWithoutTraceback, hide_user_error_tracebacks
    from tasks.artifacts import DiskFull

    hide_user_error_tracebacks()
    hide_user_error_tracebacks()  # idempotent
    logger = logging.getLogger("prefect.task_runs")
    assert sum(isinstance(f, _UserErrorWithoutTraceback) for f in logger.filters) == 1
    records = []
    for exc in (DiskFull("disk full while writing the pair stage"), OSError(errno.ENOSPC, "No space left"),
                RuntimeError("a bug")):
        try:
            raise exc
        except (OSError, RuntimeError):
            record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "Task run failed: %r", (exc,),
                                       sys.exc_info())
        assert logger.filter(record)
        records.append(record)
    assert [r.exc_info is None for r in records] == [True, True, False]  # a bug keeps its traceback
    assert "disk full while writing the pair stage" in records[0].getMessage()


FULL_DISK = """
import errno, runpy
from pathlib import Path
import tasks.evaluate

def no_space(cfg):  # the disk fills while round 0's evaluate stage writes its output
    (tmp,) = Path(cfg["runs_dir"]).glob("*/*/round_0/eval.tmp-*")
    (tmp / "predictions.jsonl").write_text("{}")
    raise OSError(errno.ENOSPC, "No space left on device")

tasks.evaluate.eval_queries = no_space
runpy.run_module("flows.iterate", run_name="__main__", alter_sys=True)
"""


def test_cli_full_disk_is_one_message_and_leaves_no_partial_dir(prefect_harness, tmp_path):
    from prefect.settings import get_current_settings

    done = run_cli(tmp_path, [], driver=FULL_DISK, env={"PREFECT_API_URL": str(get_current_settings().api.url)})
    assert_one_message(done, 2, "error: disk full while writing the evaluate stage into",
                       "nothing partial was kept", "re-run the same command")
    assert "Retry" not in done.stdout + done.stderr  # a full disk is not retried
    (round_0,) = (tmp_path / "runs" / "prefloop").glob("*/round_0")
    assert list(round_0.iterdir()) == []  # neither eval/ nor eval.tmp-*


def test_main_command_waits_long_enough_for_prefects_first_server_start():
    """Prefect waits 20 s for its temporary server by default, which a fresh machine's first
    start overran (session 13); importing the flow raises the wait and turns off the server's
    telemetry heartbeat (a "database is locked" traceback at every start, session 14), and a
    user's own settings win."""
    probe = ("import flows.iterate; from prefect.settings import get_current_settings; "
             "s = get_current_settings().server; "
             "print(s.ephemeral.startup_timeout_seconds, s.analytics_enabled)")
    ours = ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "PREFECT_SERVER_ANALYTICS_ENABLED")
    env = {k: v for k, v in os.environ.items() if k not in ours}
    root = Path(__file__).parents[2]
    default = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True)
    assert default.stdout.strip().splitlines()[-1] == "120 False", default.stderr
    own = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True,
                         env={**env, ours[0]: "45", ours[1]: "true"})
    assert own.stdout.strip().splitlines()[-1] == "45 True", own.stderr
