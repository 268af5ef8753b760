import json

import pytest

from tasks.artifacts import is_done, read_manifest, stage_output


def test_stage_output_is_atomic_and_records_manifest(tmp_path):
    final = tmp_path / "round_1" / "scores"
    with stage_output(final, "score", {"candidates": None}) as (tmp, manifest):
        assert not final.exists() and tmp.name.startswith("scores.tmp-")
        (tmp / "scores.jsonl").write_text("{}\n")
        manifest["counts"] = {"scored": 1}
    assert is_done(final) and (final / "scores.jsonl").exists()
    m = read_manifest(final)
    assert m["stage"] == "score" and m["counts"] == {"scored": 1} and "total_s" in m["timings"]
    assert "torch" in m["versions"]


def test_failed_stage_leaves_no_final_dir(tmp_path):
    final = tmp_path / "pairs"
    with pytest.raises(RuntimeError, match="boom"):
        with stage_output(final, "pair", {}) as (tmp, _):
            (tmp / "half.json").write_text("{")
            raise RuntimeError("boom")
    assert not final.exists() and list(tmp_path.iterdir()) == []


def test_leftover_tmp_from_killed_attempt_is_removed_and_redone(tmp_path):
    final = tmp_path / "checkpoint"
    stale = tmp_path / "checkpoint.tmp-99999"
    stale.mkdir()
    (stale / "partial.safetensors").write_bytes(b"\0" * 10)
    with stage_output(final, "train", {}) as (tmp, _):
        (tmp / "ok").write_text("1")
    assert not stale.exists() and is_done(final)


def test_input_hashes_identify_upstream(tmp_path):
    up = tmp_path / "a"
    with stage_output(up, "generate", {}) as (_, m):
        m["counts"] = {"n": 1}
    with stage_output(tmp_path / "b", "score", {"candidates": str(up)}) as _:
        pass
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert len(manifest["inputs"]["candidates"]) == 16


def test_directory_without_manifest_is_never_read(tmp_path):
    final = tmp_path / "eval"
    final.mkdir()
    (final / "eval.json").write_text("{}")
    assert not is_done(final)
    with pytest.raises(RuntimeError, match="without manifest.json"):
        with stage_output(final, "evaluate", {}):
            pass


def test_full_disk_gives_one_clear_message_and_no_partial_dir(tmp_path):
    import errno

    from tasks.artifacts import DiskFull

    final = tmp_path / "round_1" / "pairs"
    with pytest.raises(DiskFull, match="disk full while writing the pair stage.*re-run the same command"):
        with stage_output(final, "pair", {}) as (tmp, _):
            (tmp / "part.arrow").write_bytes(b"\0" * 8)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not final.exists() and list(final.parent.iterdir()) == []
