"""Stage artifacts: atomic directories with a manifest.

A stage writes everything into ``<stage>.tmp-<pid>/``, writes ``manifest.json`` last, then
renames the directory to ``<stage>/``. A rename within one filesystem is atomic, so a
``<stage>/`` directory either does not exist or is complete: a killed run leaves only a
``.tmp-*`` directory, which the next attempt deletes and redoes. A stage whose final
directory holds a manifest is done and is skipped.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "manifest.json"


class DiskFull(OSError):
    """No space left while writing a stage; the message says what to do."""


def is_done(stage_dir: str | Path) -> bool:
    return (Path(stage_dir) / MANIFEST).is_file()


def read_manifest(stage_dir: str | Path) -> dict:
    return json.loads((Path(stage_dir) / MANIFEST).read_text())


def manifest_hash(stage_dir: str | Path) -> str:
    """Identity of a finished stage's output: the hash of its manifest."""
    return hashlib.sha256((Path(stage_dir) / MANIFEST).read_bytes()).hexdigest()[:16]


def versions() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


@contextmanager
def stage_output(final_dir: str | Path, stage: str, inputs: dict[str, str | None],
                 started_at: float | None = None):
    """Yield ``(tmp_dir, manifest)``; the caller fills tmp_dir and manifest["counts"] etc.

    ``inputs`` maps names to upstream stage directories (or None); their manifest hashes are
    recorded so a manifest says exactly what it was computed from. ``started_at`` (a
    ``time.time()``) is when the stage's work began, for a stage that worked before opening its
    output (sharded generation): ``total_s`` then counts from there."""
    final_dir = Path(final_dir)
    if final_dir.exists() and not is_done(final_dir):
        # A directory without manifest can only come from a bug or a hand edit: never read it.
        raise RuntimeError(f"{final_dir} exists without {MANIFEST}; delete it to recompute the stage")
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    for leftover in final_dir.parent.glob(f"{final_dir.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)  # a killed attempt's partial output
    tmp_dir = final_dir.parent / f"{final_dir.name}.tmp-{os.getpid()}"
    tmp_dir.mkdir()
    manifest: dict = {
        "stage": stage,
        "inputs": {name: (manifest_hash(path) if path and is_done(path) else None) for name, path in inputs.items()},
        "input_paths": {name: (str(path) if path else None) for name, path in inputs.items()},
        "counts": {},
        "timings": {},
        "versions": versions(),
    }
    start = time.perf_counter() - (time.time() - started_at if started_at is not None else 0.0)
    try:
        yield tmp_dir, manifest
        manifest["timings"]["total_s"] = round(time.perf_counter() - start, 3)
        manifest["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json(tmp_dir / MANIFEST, manifest)
    except OSError as err:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if err.errno == errno.ENOSPC:
            raise DiskFull(f"disk full while writing the {stage} stage into {final_dir}; nothing partial was "
                           "kept. Free space (or point runs_dir=... at a larger disk) and re-run the same "
                           "command: finished stages are kept.") from err
        raise
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if final_dir.exists():  # a concurrent attempt finished first; its output is equivalent
        shutil.rmtree(tmp_dir)
    else:
        os.rename(tmp_dir, final_dir)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
