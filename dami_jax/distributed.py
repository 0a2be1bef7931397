"""One command on several processes (hosts): JAX's multi-controller runtime, work shards, one writer.

Every process runs the same command. `initialize` joins them through `jax.distributed`:
- on a TPU VM pod slice with no arguments at all (JAX finds the workers);
- elsewhere with `--coordinator HOST:PORT --num-processes N --process-id I`, or the environment
  variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.

A command then works on its `shard` of the items (whole batches dealt round-robin, the
same split on every process), and `map_sharded` brings every process's results to every
process in item order through JAX's own collectives (`multihost_utils`), as JSON bytes: no
files, no sockets of ours. Only `is_writer()` (process 0) writes outputs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dami_jax.errors import InputError

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
DEFAULT_TIMEOUT_S = 300


def add_process_args(parser: argparse.ArgumentParser) -> None:
    """The multi-process flags of a command (all three together, or none)."""
    g = parser.add_argument_group("several processes (jax.distributed; none needed on a TPU VM pod slice)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address, the same on all")
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help="how many processes run the command")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process, 0 <= I < N")
    g.add_argument("--init-timeout", type=int, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"seconds to wait for the coordinator and the other processes (default {DEFAULT_TIMEOUT_S})")


def init_from_args(args: argparse.Namespace) -> None:
    initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=args.init_timeout)


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, timeout_s: int = DEFAULT_TIMEOUT_S) -> None:
    """Join the other processes, if any; call before anything touches a JAX device.

    Explicit values win, then the environment; with neither, JAX's detection of a TPU VM pod
    slice decides, and no slice means one process. Already initialized: nothing to do.
    """
    import jax

    if jax.distributed.is_initialized():
        return
    given = _explicit(coordinator, num_processes, process_id)
    if timeout_s < 1:
        raise InputError(f"--init-timeout must be >= 1 second, got {timeout_s}")
    if given is not None and given[1] == 1:
        return  # one process: nothing to join
    if given is None:
        _auto_detect(timeout_s)
        return
    address, n, i = given
    deadline = time.monotonic() + timeout_s
    if i != 0:  # process 0 serves the coordinator; the others fail fast (JAX would abort) if it never answers
        _wait_for(address, deadline, timeout_s)
    print(f"dami: process {i} of {n}, coordinator {address} (waiting up to {timeout_s} s for all {n})",
          file=sys.stderr, flush=True)
    _join(address, n, i, initialization_timeout=max(1, int(deadline - time.monotonic())))


def shutdown() -> None:
    """Leave the other processes now (JAX does it at exit, but a process killed by a signal never
    exits normally, and the others then lose their coordinator); waits until every process leaves."""
    import jax

    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def _join(*args, **kwargs) -> None:
    import jax

    # CPU hosts reach each other through gloo (the default of recent JAX, not of older ones)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(*args, **kwargs)


def _explicit(coordinator, num_processes, process_id) -> tuple[str, int, int] | None:
    """(address, N, I) from the flags, else from the environment, else None; checked."""
    flags = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    source = "flags"
    if all(v is None for v in flags.values()):
        env = [os.environ.get(k) for k in ENV]
        if all(v is None for v in env):
            return None
        flags, source = dict(zip(ENV, env)), "environment variables"
    missing = [k for k, v in flags.items() if v is None]
    if missing:
        raise InputError(f"{', '.join(missing)} missing: the {source} {', '.join(flags)} go together "
                         "(or give none of them on a TPU VM pod slice)")
    address, n, i = flags.values()
    try:
        n, i = int(n), int(i)
    except ValueError:
        raise InputError(f"process count and id must be whole numbers, got {n!r} and {i!r}") from None
    if n < 1:
        raise InputError(f"the number of processes must be >= 1, got {n}")
    if not 0 <= i < n:
        raise InputError(f"process id {i} is outside 0..{n - 1} (ids of {n} processes)")
    host, _, port = str(address).rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"coordinator {address!r} is not HOST:PORT")
    return str(address), n, i


def _auto_detect(timeout_s: int) -> None:
    """On a Cloud TPU VM, JAX's own detection of the slice's workers; elsewhere one process.

    Only TPU VMs: JAX's other detectors (Kubernetes, SLURM, MPI) would also fire inside a CI pod or
    an interactive allocation meant for one process. Both questions are asked of JAX's private
    modules (it has no public answer): are we on a TPU VM, and has the backend started already (an
    in-process caller; initialize refuses then)."""
    from jax._src import cloud_tpu_init, xla_bridge

    if not cloud_tpu_init.running_in_cloud_tpu_vm or xla_bridge.backends_are_initialized():
        return
    try:
        _join(initialization_timeout=timeout_s)
    except ValueError:  # JAX found no slice to take the coordinator, count and id from
        return


def _wait_for(address: str, deadline: float, timeout_s: int) -> None:
    host, _, port = address.rpartition(":")
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise InputError(f"the coordinator {address} did not answer within {timeout_s} s; start process 0 "
                                 "with the same --coordinator, or raise --init-timeout") from None
            time.sleep(0.2)


def process_index() -> int:
    import jax

    return jax.process_index()


def process_count() -> int:
    import jax

    return jax.process_count()


def is_writer() -> bool:
    """Process 0 writes the outputs; the others only compute."""
    return process_index() == 0


def shard(items: Sequence, index: int | None = None, count: int | None = None, block: int = 1) -> list:
    """This process's items: blocks of `block` consecutive items dealt round-robin, from block `index`
    (the same split on every process). A block is the unit a one-process run computes together
    (a batch), so each process computes exactly what one process would."""
    index = process_index() if index is None else index
    count = process_count() if count is None else count
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return [x for start in range(index * block, len(items), count * block) for x in items[start: start + block]]


def unshard(parts: Sequence[Sequence], block: int = 1) -> list:
    """The inverse of `shard`: every process's part, in process order, back in item order."""
    parts = [list(p) for p in parts]
    out = []
    while any(parts):
        for p in parts:
            out += p[:block]
            del p[:block]
    return out


def all_gather_json(obj: Any) -> list:
    """Every process's JSON-able `obj`, in process order, on every process."""
    if process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj, default=_plain).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.int32(data.size))
    padded = np.zeros(_bucket(int(sizes.max())), np.uint8)
    padded[: data.size] = data
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(row[:size].tobytes()) for row, size in zip(rows, sizes)]


def broadcast_json(obj: Any) -> Any:
    """Process 0's JSON-able `obj` on every process (the others' argument is ignored)."""
    if process_count() == 1:
        return obj
    return json.loads(broadcast_bytes(json.dumps(obj, default=_plain).encode() if is_writer() else b""))


def broadcast_bytes(data: bytes) -> bytes:
    """Process 0's `data` on every process (the others' argument is ignored): its size, then the
    bytes padded to a `_bucket`, through JAX's collectives."""
    if process_count() == 1:
        return data
    from jax.experimental import multihost_utils

    local = np.frombuffer(data if is_writer() else b"", np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(local.size)))
    padded = np.zeros(_bucket(size), np.uint8)
    padded[: local.size] = local
    return multihost_utils.broadcast_one_to_all(padded)[:size].tobytes()


def broadcast_arrays(arrays: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Process 0's named arrays on every process (the others pass None), value for value, whatever
    their shapes and dtypes: one `.npz` (NumPy's own format, no pickles) in one `broadcast_bytes`.
    For arrays too big to travel well as JSON (a served request's pixels)."""
    if process_count() == 1:
        return dict(arrays)
    buf = io.BytesIO()
    if is_writer():
        np.savez(buf, **arrays)
    with np.load(io.BytesIO(broadcast_bytes(buf.getvalue())), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def from_writer(fn: Callable[[], Any]) -> Any:
    """fn() run on process 0 (it reads process 0's files); its JSON-able result on every process.
    Bad input fn raises there (an InputError) is raised on every process, so none waits in vain."""
    if process_count() == 1:
        return fn()
    sent = None
    if is_writer():
        try:
            sent = {"value": fn()}
        except InputError as e:
            broadcast_json({"error": str(e)})
            raise
    got = broadcast_json(sent)
    if "error" in got:
        raise InputError(got["error"])
    return got["value"]


def broadcast_array(x: np.ndarray | None, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """Process 0's array `x` on every process, value for value (the others pass None; all know its shape),
    through JAX's collectives: for arrays too big to travel well as JSON (features)."""
    if process_count() == 1:
        return np.asarray(x, dtype)
    from jax.experimental import multihost_utils

    local = np.asarray(x, dtype) if is_writer() else np.zeros(shape, dtype)
    if local.shape != tuple(shape):
        raise ValueError(f"process 0's array has shape {local.shape}, the others expect {tuple(shape)}")
    return np.asarray(multihost_utils.broadcast_one_to_all(local))


def _bucket(size: int) -> int:
    """A power of two >= size: the collectives compile once per shape, so few shapes."""
    return max(1024, 1 << (size - 1).bit_length())


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as JSON numbers and lists, sets as sorted lists."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"a value of type {type(value).__name__} cannot travel between processes as JSON")


def map_sharded(fn: Callable[[list], list], items: Sequence, block: int = 1) -> list:
    """fn over this process's `shard` of `items` (one JSON-able result per item); on every process,
    every result in item order. A process with an empty shard does not call fn."""
    mine = shard(items, block=block)
    results = list(fn(mine)) if mine else []
    if len(results) != len(mine):
        raise ValueError(f"fn gave {len(results)} results for {len(mine)} items")
    if process_count() == 1:
        return results
    return unshard(all_gather_json(results), block)
