"""Run work units on a Ray cluster (the `ray` extra): one actor per model replica.

Each actor loads the adapter once (`load_model` with the run's load options) and runs
`run_task` for the units it is handed. Results come back to the driver, and only the driver
calls `on_result`: the runner stays the single writer of unit files and of the DuckDB store.

Scheduling: units are sorted by declared cost, longest first, and each is handed to whichever
actor is free (`ray.wait` on the units in flight, one per actor). Long units start first and
short ones fill the gaps at the end, which absorbs costs that differ by more than 200x (the
replay in bench/ray_scaling.py measures it). One unit in flight per actor: a unit takes far
longer than a Ray round trip (~1 ms), so prefetching would gain nothing, and at the tail it
would hold a short unit behind a long one while another actor idles.

Faults use Ray's actor restart and task retry (`max_restarts` = `max_task_retries` =
`max_retries`). When a worker process or its node dies mid-unit, Ray starts the actor again
in a new process (on another node when the node is gone), which reloads the model, and runs
the unit there once it is up; the driver just sees a slower unit. A retry in the driver
instead would need its own liveness test: Ray fails a call made to a restarting actor at
once (ActorUnavailableError). A probe that raises is not retried (it would raise again):
the error goes to `on_result` at once, like the local executor. After `max_retries` deaths
an actor is gone for good; its unit is reported as failed and the other actors finish the
rest. Ctrl-C kills the actors and re-raises; the units already written make the run
resumable under either executor.

Connecting: `address=None` starts a private local Ray instance sized to the workers and
shuts it down afterwards; an address ("auto", "ray://head:10001", "head:6379") joins an
existing cluster (`ray start --head`, KubeRay, Slurm); a Ray session already open in this
process (a notebook, `ray job submit`) is used as it is. Workers import `audit` and `probes`:
on a local instance Ray puts the driver's working directory on their path, and the venv's
install is shared; on a cluster, install the same mmaudit version in the worker image, or
pass `runtime_env={"working_dir": "/path/to/checkout", "excludes": [".venv", ".git"]}`
(or submit with `ray job submit --working-dir .`). The model folder (or Hub cache) and the
data folder must be at the same paths on every node; each actor checks that it loaded the
model the driver audits (`identity`).
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence

from audit.errors import InputError
from audit.executors import OnResult, Task, run_task

__all__ = ["RayExecutor", "WorkerLost", "longest_first", "FAULT_ENV"]

# Fault injection for tests: "exit:PROBE:INDEX:MARKER" makes the worker os._exit on that unit
# while MARKER does not exist (it creates it first, so the retry succeeds; no MARKER: every
# time); "raise:PROBE:INDEX:" makes that unit raise every time. Read in the driver and passed
# to the actors, since a running cluster's workers do not see this process's environment.
FAULT_ENV = "MMAUDIT_TEST_RAY_FAULT"


class WorkerLost(RuntimeError):
    """A unit's Ray worker died and could not be restarted (its retries are spent)."""


def longest_first(tasks: Sequence[Task]) -> list[int]:
    """Indices of `tasks`, largest declared cost first; plan order among equal costs."""
    return sorted(range(len(tasks)), key=lambda i: -float(tasks[i].unit.cost))


def _last_line(exc: BaseException) -> str:
    """The informative end of a Ray error (its message ends with the remote traceback)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else type(exc).__name__


def _inject_fault(spec: str, task: Task) -> None:
    mode, probe, index, marker = (spec.split(":", 3) + ["", "", "", ""])[:4]
    if task.probe != probe or str(task.unit.index) != index:
        return
    if mode == "raise":
        raise RuntimeError(f"injected failure in {probe} unit {index}")
    if mode == "exit" and not (marker and os.path.exists(marker)):
        if marker:
            with open(marker, "w") as fh:
                fh.write(str(os.getpid()))
        os._exit(1)


def _identity_of(model: str, load_options: dict) -> str:
    """The identity load_model will record for `model` (a hash of the folder; cached per file)."""
    from audit.adapters.source import model_identity, resolve_source, source_of_folder

    src = resolve_source(model, revision=load_options.get("revision"),
                         trust_remote_code=bool(load_options.get("trust_remote_code")))
    return model_identity(source_of_folder(src.path) if src.commit is None else src)


def _check_identity(found: str | None, expected: str, model: str) -> None:
    if found != expected:
        raise InputError(f"a Ray worker sees another model (identity {found}, the driver audits {expected}): "
                         "every node must see the same checkpoint", where=model)


class _Worker:
    """The body of one Ray actor: a model replica that runs units one at a time."""

    def __init__(self, model: str, load_options: dict, *, gpus: float, cpus: float, identity: str | None,
                 fault: str | None) -> None:
        self.fault = fault
        if identity is not None and not model.startswith(("http://", "https://")):
            _check_identity(_identity_of(model, load_options), identity, model)  # before any weight is read
        import torch

        torch.set_num_threads(max(1, int(cpus)))  # the actor's CPU share, not the node's cores
        from audit.adapters.loading import load_model

        opts = dict(load_options)
        if gpus > 0:  # Ray's CUDA_VISIBLE_DEVICES shows this actor its own GPU(s) only
            opts["device"] = "cuda"
            if gpus > 1:
                opts["device_map"] = opts.get("device_map") or "auto"
        else:
            opts["device"], opts["device_map"] = "cpu", None
        self.adapter, record = load_model(model, **opts)
        self.identity = record.get("identity")
        if identity is not None:
            _check_identity(self.identity, identity, model)

    def ready(self) -> str | None:
        return self.identity

    def run(self, task: Task):
        if self.fault:
            _inject_fault(self.fault, task)
        return run_task(self.adapter, task)


class RayExecutor:
    """Units on Ray actors, each holding one model replica; same `run` interface as LocalExecutor."""

    def __init__(self, *, model: str, load_options: dict | None = None, workers: int = 1, address: str | None = None,
                 gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0, max_retries: int = 3,
                 identity: str | None = None, runtime_env: dict | None = None, start_timeout_s: float = 1800.0,
                 log: Callable[[str], None] | None = None) -> None:
        import inspect

        from audit.adapters.loading import load_model

        if not isinstance(workers, int) or workers < 1:
            raise InputError(f"needs at least 1 worker, got {workers!r}", where="--workers")
        if not gpus_per_worker >= 0:
            raise InputError(f"must be >= 0, got {gpus_per_worker!r}", where="--gpus-per-worker")
        if not cpus_per_worker > 0:
            raise InputError(f"must be > 0, got {cpus_per_worker!r}", where="cpus_per_worker")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise InputError(f"must be a whole number >= 0, got {max_retries!r}", where="--max-retries")
        known = set(inspect.signature(load_model).parameters) - {"model"}
        unknown = sorted(set(load_options or {}) - known)
        if unknown:
            raise TypeError(f"load_options has unknown keys {unknown}; load_model takes {sorted(known)}")
        self.model, self.load_options = str(model), dict(load_options or {})
        self.workers, self.address = workers, address
        self.gpus_per_worker, self.cpus_per_worker = float(gpus_per_worker), float(cpus_per_worker)
        self.max_retries, self.identity, self.runtime_env = max_retries, identity, runtime_env
        self.start_timeout_s = start_timeout_s
        self.log = log or (lambda msg: print(f"mmaudit: {msg}", file=sys.stderr))
        # seconds from the start of the last run() to its first and to its last worker ready, and to its end
        self.timing: dict[str, float | None] = {}

    # ------------------------------------------------------------------ connecting
    def _connect(self, ray, n_actors: int) -> bool:
        """Join or start Ray; True when this call started it (and so must shut it down)."""
        if ray.is_initialized():
            return False
        env = {"runtime_env": self.runtime_env} if self.runtime_env else {}
        if self.address is None:
            # "local" always starts a private instance (never a stray RAY_ADDRESS), sized to the actors
            ray.init(address="local", num_cpus=max(1, math.ceil(n_actors * self.cpus_per_worker)),
                     include_dashboard=False, **env)
            have = ray.cluster_resources().get("GPU", 0.0)
            if self.gpus_per_worker > have:
                ray.shutdown()
                raise InputError(f"each worker asks for {self.gpus_per_worker:g} GPU and this machine has {have:g}",
                                 where="--gpus-per-worker")
        else:
            try:
                ray.init(address=self.address, **env)
            except (ConnectionError, SystemExit) as exc:  # Ray exits (code 15) when no cluster answers in time
                raise InputError(f"cannot join the Ray cluster ({type(exc).__name__}: {exc})",
                                 where=f"--ray-address {self.address}") from exc
        return True

    def _start(self, ray, n_actors: int) -> list:
        actor = ray.remote(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker,
                           max_restarts=self.max_retries, max_task_retries=self.max_retries)(_Worker)
        fault = os.environ.get(FAULT_ENV)  # read here: a cluster's workers do not see this process's env
        return [actor.remote(self.model, self.load_options, gpus=self.gpus_per_worker, cpus=self.cpus_per_worker,
                             identity=self.identity, fault=fault) for _ in range(n_actors)]

    # ------------------------------------------------------------------ running
    def run(self, tasks: Sequence[Task], *, on_result: OnResult, progress: bool = True) -> None:
        if not tasks:
            return
        try:
            import ray
        except ImportError as exc:
            raise InputError("the Ray executor needs Ray: pip install 'mmaudit[ray]'", where="--executor ray") from exc
        from audit.progress import CostProgress

        n_actors = min(self.workers, len(tasks))  # no replica is loaded only to sit idle
        t0 = time.perf_counter()
        self.timing = {"first_ready_s": None, "all_ready_s": None, "run_s": None}
        started = self._connect(ray, n_actors)
        actors: list = []
        try:
            actors = self._start(ray, n_actors)
            with CostProgress(tasks, enabled=progress) as bar:
                self._drive(ray, actors, tasks, on_result, bar, t0)
        finally:  # also on Ctrl-C and on an error from on_result: no actor outlives the run
            for a in actors:
                ray.kill(a, no_restart=True)
            if started:
                ray.shutdown()
            self.timing["run_s"] = round(time.perf_counter() - t0, 3)

    def _drive(self, ray, actors: list, tasks: Sequence[Task], on_result: OnResult, bar, t0: float) -> None:
        from ray.exceptions import RayError, RayTaskError

        pending = deque(longest_first(tasks))
        waiting: dict = {a.ready.remote(): (a, None) for a in actors}  # ref -> (actor, task index | None)
        idle: list = []
        failures: list[str] = []
        n_ready, deadline = 0, time.monotonic() + self.start_timeout_s

        def finish(i: int, rows, error) -> None:
            on_result(tasks[i], rows, error)
            bar.done(tasks[i])

        while pending or any(i is not None for _, i in waiting.values()):
            while idle and pending:
                a, i = idle.pop(), pending.popleft()
                waiting[a.run.remote(tasks[i])] = (a, i)
            if not waiting:  # every actor is gone and units remain: fail them, never hang
                if not n_ready:
                    raise InputError(f"no Ray worker could start: {failures[0]}", where="--executor ray")
                why = f"no Ray worker is left to run it (last failure: {failures[-1]})"
                while pending:
                    finish(pending.popleft(), None, WorkerLost(why))
                return
            timeout = None if n_ready else max(0.0, deadline - time.monotonic())
            done, _ = ray.wait(list(waiting), num_returns=1, timeout=timeout)
            if not done:
                raise InputError(f"no Ray worker started within {self.start_timeout_s:g} s; each asks for "
                                 f"{self.cpus_per_worker:g} CPU and {self.gpus_per_worker:g} GPU, the cluster has "
                                 f"{ray.cluster_resources()}", where="--executor ray")
            ref = done[0]
            a, i = waiting.pop(ref)
            try:
                value = ray.get(ref)
            except RayTaskError as exc:  # the probe raised: deterministic, so not retried
                cause = exc.cause if isinstance(exc.cause, Exception) else exc
                finish(i, None, cause)
                idle.append(a)
                continue
            except RayError as exc:  # the actor is gone for good: restarts spent, or it never started
                failures.append(_last_line(exc))
                if i is None:
                    self.log(f"a Ray worker could not start: {failures[-1]}")
                else:
                    finish(i, None, WorkerLost(f"its Ray worker died with no restart left (max_retries "
                                               f"{self.max_retries}): {failures[-1]}"))
                continue
            if i is None:
                n_ready += 1
                now = round(time.perf_counter() - t0, 3)
                self.timing["first_ready_s"] = self.timing["first_ready_s"] or now
                self.timing["all_ready_s"] = now if n_ready == len(actors) else None
            else:
                finish(i, value, None)
            idle.append(a)
