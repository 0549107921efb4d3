"""The Ray executor on a local 2-CPU Ray instance: the same numbers as the local executor for
every probe of the quick and standard suites, resume across executors, Ctrl-C, a worker
killed mid-unit (retried, identical results), a probe that raises (a fail finding, the rest
finishes), a worker out of retries (its unit and the rest fail, no hang) and a worker that
loaded another model (refused)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray", reason="the Ray executor is an optional extra (pip install 'mmaudit[ray]')")

import pandas as pd  # noqa: E402

from audit.adapters import load_adapter  # noqa: E402
from audit.dataset import Dataset  # noqa: E402
from audit.errors import InputError  # noqa: E402
from audit.executors import LocalExecutor, Task  # noqa: E402
from audit.executors.ray_executor import FAULT_ENV, RayExecutor, longest_first  # noqa: E402
from audit.runner import RunSpec, model_fingerprint, run_audit  # noqa: E402
from probes.base import Unit, resolve_names  # noqa: E402

CHEAP = ["attention", "group_fairness", "hallucination"]  # two units each at 40 examples, 1 pass per example


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024 ** 2,
             log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def straight(tmp_path_factory, untrained_llava, small_data):
    """The reference: the CHEAP probes at 40 examples, run locally without interruption."""
    out = tmp_path_factory.mktemp("straight") / "run"
    _audit(untrained_llava, small_data, out, probes=CHEAP, max_examples=40)
    return out


def _audit(model, data, out, *, probes, max_examples, executor=None):
    spec = RunSpec(model=str(model), data=str(data), probes=list(probes), out=str(out), seed=3,
                   store=str(out) + ".duckdb", max_examples=max_examples)
    adapter = load_adapter(model)
    executor = executor(adapter) if callable(executor) else executor
    return run_audit(spec, adapter=adapter, data=Dataset.load(data).audit_split(), executor=executor,
                     progress=False, log=lambda m: None)


def _ray(model, **kw):
    opts = dict(model=str(model), load_options={}, workers=2, address=None, gpus_per_worker=0.0, cpus_per_worker=1.0,
                max_retries=2, identity=model_fingerprint(str(model)), log=lambda m: None)
    return RayExecutor(**{**opts, **kw})


def _rows(out):
    rows = pd.read_parquet(out / "results.parquet")
    return rows.sort_values(list(rows.columns), na_position="first", kind="stable").reset_index(drop=True)


def _assert_same(a, b):
    """Same summary.json metrics, findings and probe records, and the same rows after sorting."""
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    assert sa["metrics"] and sa["metrics"] == sb["metrics"]
    assert sa["findings"] == sb["findings"]
    assert sa["probes"] == sb["probes"]
    pd.testing.assert_frame_equal(_rows(a), _rows(b))


class _Interrupting:
    """Wraps an executor: Ctrl-C arrives in the driver right after the `after`-th result."""

    def __init__(self, inner, after: int) -> None:
        self.inner, self.after, self.seen = inner, after, []

    def run(self, tasks, *, on_result, progress=True):
        def interrupt(task, rows, error):
            on_result(task, rows, error)
            self.seen.append(task)
            if len(self.seen) == self.after:
                raise KeyboardInterrupt

        self.inner.run(tasks, on_result=interrupt, progress=progress)


def _wait_for_cpus(n: float) -> float:
    """Ray frees a killed actor's CPU asynchronously: the CPUs available once it settles."""
    for _ in range(100):
        free = ray.available_resources().get("CPU", 0.0)
        if free >= n:
            return free
        time.sleep(0.2)
    return ray.available_resources().get("CPU", 0.0)


def test_longest_first_orders_by_declared_cost_and_keeps_plan_order_among_equals():
    tasks = [Task(probe="p", unit=Unit("p", k, (), "/", cost=c), seed=0) for k, c in enumerate([1, 200, 5, 200, 0.5])]
    assert longest_first(tasks) == [1, 3, 2, 0, 4]


def test_the_local_default_never_imports_ray():
    code = ("import sys\nfrom audit.runner import run_audit\nfrom audit.executors import LocalExecutor\n"
            "from audit.executors.ray_executor import RayExecutor\nimport audit.run_cli\n"
            "RayExecutor(model='m', workers=2)\nassert 'ray' not in sys.modules, 'ray was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_bad_settings_are_input_errors():
    for kw, where in [({"workers": 0}, "--workers"), ({"gpus_per_worker": -1}, "--gpus-per-worker"),
                      ({"max_retries": -1}, "--max-retries")]:
        with pytest.raises(InputError, match=where):
            RayExecutor(model="m", **kw)
    with pytest.raises(TypeError, match="unknown keys"):
        RayExecutor(model="m", load_options={"devcie": "cpu"})


def test_same_numbers_as_local_for_every_probe_of_the_quick_and_standard_suites(cluster, untrained_llava,
                                                                                 small_data, tmp_path):
    quick, _ = resolve_names(suite="quick")
    names, _ = resolve_names(suite="standard")
    assert set(quick) <= set(names)
    local = _audit(untrained_llava, small_data, tmp_path / "local", probes=names, max_examples=12)
    executor = _ray(untrained_llava)
    remote = _audit(untrained_llava, small_data, tmp_path / "ray", probes=names, max_examples=12, executor=executor)
    assert local.exit_code == remote.exit_code == 0
    assert 0 < executor.timing["first_ready_s"] <= executor.timing["all_ready_s"] <= executor.timing["run_s"]
    assert {n: p["status"] for n, p in remote.summary["probes"].items()} == {n: "ok" for n in names}
    _assert_same(tmp_path / "local", tmp_path / "ray")


def test_interrupted_under_one_executor_resumes_under_the_other(cluster, straight, untrained_llava, small_data,
                                                                 tmp_path):
    kw = dict(probes=CHEAP, max_examples=40)
    # Ctrl-C under Ray after 4 of 6 units (one worker: the hand-out order is observable)
    ray_out, stopper = tmp_path / "ray-then-local", _Interrupting(_ray(untrained_llava, workers=1), after=4)
    with pytest.raises(KeyboardInterrupt):
        _audit(untrained_llava, small_data, ray_out, executor=stopper, **kw)
    costs = [t.unit.cost for t in stopper.seen]
    assert costs == [32.0, 32.0, 32.0, 8.0]  # longest first; plan order would be 32, 8, 32, 8, 32, 2
    assert _wait_for_cpus(2.0) == 2.0  # the actor was killed, not left holding its CPU
    units = {p: p.stat().st_mtime_ns for p in (ray_out / "units").rglob("*.parquet")}
    assert len(units) == 4 and not (ray_out / "summary.json").exists()
    _audit(untrained_llava, small_data, ray_out, **kw)  # resumed locally
    assert {p: p.stat().st_mtime_ns for p in units} == units  # finished units were not recomputed
    _assert_same(straight, ray_out)

    local_out = tmp_path / "local-then-ray"
    with pytest.raises(KeyboardInterrupt):
        _audit(untrained_llava, small_data, local_out, executor=lambda a: _Interrupting(LocalExecutor(a), after=2),
               **kw)
    assert len(list((local_out / "units").rglob("*.parquet"))) == 2
    _audit(untrained_llava, small_data, local_out, executor=_ray(untrained_llava, workers=1), **kw)
    _assert_same(straight, local_out)


def test_a_worker_killed_mid_unit_is_retried_and_changes_nothing(cluster, straight, untrained_llava, small_data,
                                                                 tmp_path, monkeypatch):
    marker = tmp_path / "attention-1-died"
    monkeypatch.setenv(FAULT_ENV, f"exit:attention:1:{marker}")
    result = _audit(untrained_llava, small_data, tmp_path / "killed", probes=CHEAP, max_examples=40,
                    executor=_ray(untrained_llava, workers=1, max_retries=1))
    assert marker.is_file()  # the first attempt at attention unit 1 took its worker process down
    assert result.exit_code == 0 and result.failed_units == []
    _assert_same(straight, tmp_path / "killed")


def test_a_probe_that_raises_is_a_fail_finding_and_the_rest_finishes(cluster, untrained_llava, small_data, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "raise:attention:0:")
    out = tmp_path / "run"
    result = _audit(untrained_llava, small_data, out, probes=["attention", "group_fairness"], max_examples=40,
                    executor=_ray(untrained_llava, workers=1))
    assert result.exit_code == 1 and result.failed_units == ["attention unit 0"]
    s = result.summary
    (f,) = [f for f in s["findings"] if f["severity"] == "fail"]
    assert f["probe"] == "attention" and "unit 0" in f["message"] and "injected failure" in f["message"]
    assert s["probes"]["attention"]["status"] == "failed" and not [m for m in s["metrics"] if m["probe"] == "attention"]
    assert [m for m in s["metrics"] if m["probe"] == "group_fairness"]
    done = sorted(p.relative_to(out / "units").as_posix() for p in (out / "units").rglob("*.parquet"))
    assert done == ["attention/00001.parquet", "group_fairness/00000.parquet", "group_fairness/00001.parquet"]


def test_a_worker_out_of_retries_fails_its_unit_and_the_rest_without_hanging(cluster, untrained_llava, small_data,
                                                                              tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "exit:attention:0:")  # no marker: it kills the worker every time
    result = _audit(untrained_llava, small_data, tmp_path / "run", probes=["attention"], max_examples=40,
                    executor=_ray(untrained_llava, workers=1, max_retries=0))
    # unit 0 (the longest) runs first and kills the only worker, which may not restart; unit 1 has no worker
    assert result.exit_code == 1 and result.failed_units == ["attention unit 0", "attention unit 1"]
    messages = [f["message"] for f in result.summary["findings"] if f["severity"] == "fail"]
    assert "WorkerLost" in messages[0] and "no Ray worker is left" in messages[1]


def test_a_worker_that_loads_another_model_is_refused(cluster, untrained_llava, small_data, tmp_path):
    with pytest.raises(InputError, match="no Ray worker could start.*another model"):
        _audit(untrained_llava, small_data, tmp_path / "run", probes=["attention"], max_examples=8,
               executor=_ray(untrained_llava, workers=1, identity="0" * 64))


def test_ctrl_c_in_a_driver_that_started_its_own_ray(straight, untrained_llava, small_data, tmp_path):
    """A real SIGINT while the driver waits on Ray: it exits, takes its private Ray down, and
    the run resumes under the local executor with the same numbers as a straight run."""
    out = tmp_path / "run"
    code = f"""
import os
import signal
import sys
import time
from pathlib import Path

import ray

from audit.adapters import load_adapter
from audit.dataset import Dataset
from audit.executors.ray_executor import RayExecutor
from audit.runner import RunSpec, run_audit
model, data, out = sys.argv[1:4]
# a terminal's default Ctrl-C handling (a pytest-xdist worker starts its children with SIGINT ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
_wait = ray.wait


def interrupted_wait(*args, **kwargs):
    # Ctrl-C as soon as the first unit is written, while units are still left: a real SIGINT
    # to this driver from inside its wait on Ray, whatever the machine's load
    if any((Path(out) / "units").rglob("*.parquet")):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)  # the KeyboardInterrupt is raised here
    return _wait(*args, **kwargs)


ray.wait = interrupted_wait
spec = RunSpec(model=model, data=data, probes={CHEAP!r}, out=out, seed=3, store=out + ".duckdb", max_examples=40)
executor = RayExecutor(model=model, load_options={{}}, workers=1, address=None, gpus_per_worker=0.0,
                       cpus_per_worker=1.0, max_retries=0)
run_audit(spec, adapter=load_adapter(model), data=Dataset.load(data).audit_split(), executor=executor,
          progress=False, log=print)
"""
    proc = subprocess.Popen([sys.executable, "-c", code, str(untrained_llava), str(small_data), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err, err[-2000:]
    assert not (out / "summary.json").exists()
    assert 1 <= len(list((out / "units").rglob("*.parquet"))) < 6
    _audit(untrained_llava, small_data, out, probes=CHEAP, max_examples=40)
    _assert_same(straight, out)


def test_command_line_executor_ray_matches_local(cluster, untrained_llava, small_data, tmp_path, capsys):
    """`mmaudit run --executor ray --workers 2` through the CLI, then the same run locally: same numbers,
    and the executor settings are not part of the run's identity (a run resumes under either)."""
    from audit.cli import main

    base = ["run", "--model", str(untrained_llava), "--data", str(small_data), "--probes", "hallucination",
            "--max-examples", "40", "--store", str(tmp_path / "s.duckdb")]
    assert main([*base, "--out", str(tmp_path / "ray"), "--executor", "ray", "--workers", "2"]) == 0
    assert main([*base, "--out", str(tmp_path / "local")]) == 0
    _assert_same(tmp_path / "ray", tmp_path / "local")
    config = json.loads((tmp_path / "ray" / "summary.json").read_text())["config"]
    assert "executor" not in config and "workers" not in config
    assert main([*base, "--out", str(tmp_path / "x"), "--ray-address", "127.0.0.1:1"]) == 2
    assert "--executor ray" in capsys.readouterr().err
