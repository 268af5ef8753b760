"""The Prefect task runner the ``iterate`` flow submits generate shards to (``generate.task_runner``).

- ``thread``: Prefect's default thread pool in the flow's process. Shards take turns on one
  cached model (tasks/generate.py), so sharding there buys shard-level resumption, not speed.
- ``dask``: a ``prefect_dask.DaskTaskRunner``. Without ``generate.dask.address`` it starts a
  LocalCluster of ``n_workers`` processes with one task slot each; every worker loads the
  policy itself from the paths the shard task receives. Each worker's torch gets
  ``torch_threads`` threads (0: $OMP_NUM_THREADS if set, else cores // n_workers) through
  OMP_NUM_THREADS, set in the worker's environment before it imports torch, so N workers do
  not oversubscribe the cores. With an address, the workers are whoever started them
  (``dask worker tcp://... --nthreads 1``): they need this package and see ``runs_dir`` at the
  same path (a shared filesystem), and PREFECT_API_URL set to a server both sides reach; with
  ``generate.backend=vllm`` also DASK_DISTRIBUTED__WORKER__DAEMON=False.
Only shard tasks are submitted; every other stage runs in the flow's process as before.
"""

from __future__ import annotations

import os


def task_runner(generate_cfg: dict):
    """The task runner for ``generate_cfg`` (None: keep the flow's default thread pool)."""
    if generate_cfg["task_runner"] == "thread":
        return None
    # Dask's per-worker start/stop banners (~30 INFO lines per worker) drown the stage progress;
    # set before distributed is imported here, and inherited by the worker processes.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    from prefect_dask import DaskTaskRunner

    dask = generate_cfg["dask"]
    if dask["address"]:
        return DaskTaskRunner(address=dask["address"])
    if generate_cfg["backend"] == "vllm":
        # vLLM runs in a child of the worker (tasks/generate.py); Dask's default daemon workers
        # may not start children.
        import dask as dask_lib

        dask_lib.config.set({"distributed.worker.daemon": False})
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": dask["n_workers"],
            "threads_per_worker": 1,  # one shard at a time per worker: one model in its memory
            "processes": True,
            "env": worker_env(worker_threads(dask)),
        },
    )


def worker_env(threads: int) -> dict[str, str]:
    """Environment of a worker process (a Dask shard worker, an experiment's child run): its
    torch thread count, set before it imports torch so workers do not oversubscribe the cores,
    this process's Prefect API, and as quiet as the flow's process (flows/iterate.py
    quiet_third_party_logs)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PREFECT_API_URL": api_url(),
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def api_url() -> str:
    """The Prefect API this process reports to, for the workers to report to as well.

    Without PREFECT_API_URL Prefect runs a temporary server for this process; a worker that
    is not told its address would start one of its own (~15 s each) and its shard's task run
    would not show under the flow. Starting that server here is what Prefect does on its
    first API call anyway (the server object is a per-process singleton)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return PREFECT_API_URL.value()
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return server.api_url


def worker_threads(dask: dict) -> int:
    if dask["torch_threads"] > 0:
        return dask["torch_threads"]
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, (os.cpu_count() or 1) // dask["n_workers"])


def with_task_runner(flow, cfg: dict):
    """``flow`` set up to submit to the configured task runner."""
    runner = task_runner(cfg["generate"])
    return flow if runner is None else flow.with_options(task_runner=runner)
