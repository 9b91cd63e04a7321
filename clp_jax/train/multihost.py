"""Multi-host (multi-process) training: start-up, which rows each process loads, and work done once.

One global batch, whatever the number of processes. The windows of step s are a function of s alone
(loop.WindowSampler) over the WHOLE feature store (every process opens every shard: they are memory-
mapped, so a process reads only the rows it needs). Each process loads the rows its own devices hold
(`process_rows`) and `jax.make_array_from_process_local_data` joins them. So a run on P processes trains
on exactly the batches of a single-process run with the same global batch size, and a checkpoint
resumes on any number of processes.

Work done once per shared directory, not once per process. `shared_directory` first finds out whether
all processes see the same cache directory (process 0 writes a probe file named by a random token it
broadcasts; the others look):
* shared (one machine, or `CLP_JAX_CACHE` and run.features_dir on a shared file system): process 0
  converts the backbone and writes the inputs dataset while the others wait at a barrier, then they open
  what it wrote. The feature store, the expensive part (a backbone pass or a generation per record), is
  split: process p writes every P-th shard of the plan, and all read the whole store after a barrier.
* not shared (each pod host has its own disk): every process builds its own copy, as a single host
  would; the builds are deterministic (greedy decoding, fixed seeds), so the copies agree.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

import jax
import numpy as np

T = TypeVar("T")

ENV_NUM_PROCESSES = "CLP_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "CLP_JAX_PROCESS_ID"


def initialize() -> None:
    """`jax.distributed.initialize()`: on Cloud TPU pods everything is found automatically; elsewhere
    (e.g. several processes on one machine) set JAX_COORDINATOR_ADDRESS=host:port (read by JAX),
    CLP_JAX_NUM_PROCESSES and CLP_JAX_PROCESS_ID. On CPU the collectives need
    JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo."""
    kw = {}
    if os.environ.get(ENV_NUM_PROCESSES):
        kw = dict(num_processes=int(os.environ[ENV_NUM_PROCESSES]), process_id=int(os.environ[ENV_PROCESS_ID]))
    jax.distributed.initialize(**kw)


def is_writer() -> bool:
    """The one process that writes what must be written once (metrics, eval.json, plots, heads.json)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def process_rows(mesh, batch_size: int) -> slice:
    """The rows of a global batch of `batch_size` that this process's devices hold under the batch
    sharding (leading axis over `data`): all of them in a single process, or when the `data` axis does
    not span processes (e.g. data=1), where every process holds the whole batch."""
    if mesh is None or jax.process_count() == 1:
        return slice(0, batch_size)
    from clp_jax.model.sharding import batch_sharding

    idx = batch_sharding(mesh, 1).addressable_devices_indices_map((batch_size,)).values()
    starts = [s[0].start or 0 for s in idx]
    stops = [batch_size if s[0].stop is None else s[0].stop for s in idx]
    lo, hi = min(starts), max(stops)
    if sum(b - a for a, b in set(zip(starts, stops))) != hi - lo:
        raise ValueError(f"Process {jax.process_index()} holds non-contiguous rows of the batch on mesh "
                         f"{dict(mesh.shape)}; order the mesh's devices by process.")
    return slice(lo, hi)


def shared_directory(path: str) -> bool:
    """Whether every process sees the same directory `path` (True in a single process)."""
    if jax.process_count() == 1:
        return True
    from jax.experimental import multihost_utils

    token = int(multihost_utils.broadcast_one_to_all(np.frombuffer(os.urandom(4), np.int32)[0] & 0x7FFFFFFF))
    probe = os.path.join(path, f".shared-probe-{token}")
    if is_writer():
        with open(probe, "w") as f:
            f.write("probe")
    barrier(f"clp_jax probe written {token}")
    seen = multihost_utils.process_allgather(np.int32(os.path.exists(probe)))
    barrier(f"clp_jax probe read {token}")
    if is_writer():
        os.remove(probe)
    return bool(np.all(seen))


def once(name: str, build: Callable[[], T], shared: bool) -> T:
    """`build()` on process 0 first; the others wait, then call it and find its result on disk. With
    a directory that is not shared, every process builds at once (as one host alone would)."""
    if jax.process_count() == 1 or not shared:
        return build()
    out = build() if is_writer() else None
    barrier(f"clp_jax built {name}")
    if not is_writer():
        out = build()
    return out
