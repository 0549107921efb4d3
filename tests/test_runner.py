"""`mmaudit run`: CONTRACT outputs (schema v2), store round trip, determinism, resume after a
SIGKILL at a chosen unit boundary, failing units, concurrent writers, and the first
known-answer test (a blind model reads image_reliance 0)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from audit.adapters import load_adapter
from audit.dataset import Dataset
from audit.runner import FAULT_ENV, RunSpec, run_audit
from audit.schema import ROW_COLUMNS, SCHEMA_VERSION
from audit.store import Store


def _run(model, data, out, store, *, seed=0, max_examples=40, probes=("modality_ablation",), **kw):
    spec = RunSpec(model=str(model), data=str(data), probes=list(probes), out=str(out), seed=seed,
                   store=str(store), max_examples=max_examples, **kw)
    return run_audit(spec, adapter=load_adapter(model), data=Dataset.load(data).audit_split(), progress=False,
                     log=lambda m: None).summary


def _metric(summary, probe, metric, group=None):
    return next(m for m in summary["metrics"] if m["probe"] == probe and m["metric"] == metric and m["group"] == group)


def test_summary_matches_contract(untrained_llava, small_data, tmp_path):
    s = _run(untrained_llava, small_data, tmp_path / "run", tmp_path / "store.duckdb")
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk == s
    assert s["schema_version"] == SCHEMA_VERSION == 2
    for key in ("run_id", "created", "model", "data", "config", "environment", "metrics", "findings", "probes"):
        assert key in s
    assert set(s["model"]) >= {"path", "architecture", "sha256"} and len(s["model"]["sha256"]) == 64
    assert os.path.isabs(s["model"]["path"]) and os.path.isabs(s["data"]["path"])
    assert set(s["data"]) >= {"path", "sha256", "n"}
    assert set(s["environment"]) >= {"python", "torch", "transformers", "device"}
    for m in s["metrics"]:
        assert set(m) == {"probe", "metric", "value", "ci_low", "ci_high", "group", "n", "dims"}
    for name in ("image_reliance", "text_reliance"):
        m = _metric(s, "modality_ablation", name)
        assert 0.0 <= m["ci_low"] <= m["value"] <= m["ci_high"] <= 1.0
        assert m["dims"]["scope"] == "overall"
    assert s["probes"]["modality_ablation"]["examples"] == 40
    rows = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert list(rows.columns) == ROW_COLUMNS
    tv = rows[rows.metric == "tv"]
    assert ((tv.value >= 0) & (tv.value <= 1)).all()
    assert set(tv.modality.dropna()) == {"image", "text"}  # typed, not "image:blank"
    assert {"blank", "mean", "noise", "shuffled", "empty"} <= set(tv.variant)


def test_store_round_trip(untrained_llava, small_data, tmp_path):
    store = tmp_path / "store.duckdb"
    s = _run(untrained_llava, small_data, tmp_path / "run", store)
    st = Store(store)
    runs = st.runs()
    assert list(runs.run_id) == [s["run_id"]]
    assert st.summary(s["run_id"]) == s
    metrics = st.metrics(s["run_id"])
    assert len(metrics) == len(s["metrics"])
    assert set(metrics.scope.dropna()) <= {"overall", "breakdown"}
    rows = st.rows(s["run_id"])
    assert len(rows) == len(pd.read_parquet(tmp_path / "run" / "results.parquet"))
    assert set(st.artifacts(s["run_id"]).name) == {"results.parquet", "summary.json"}
    # append-only: recording the same run again changes nothing
    st.record_run(s, pd.read_parquet(tmp_path / "run" / "results.parquet"), run_dir=str(tmp_path / "run"))
    assert len(Store(store).metrics(s["run_id"])) == len(metrics)


def test_empty_store_reads_empty(tmp_path):
    assert Store(tmp_path / "none.duckdb").runs().empty
    assert not (tmp_path / "none.duckdb").exists()


def test_same_seed_same_metrics(untrained_llava, small_data, tmp_path):
    a = _run(untrained_llava, small_data, tmp_path / "a", tmp_path / "s.duckdb", seed=7)
    b = _run(untrained_llava, small_data, tmp_path / "b", tmp_path / "s.duckdb", seed=7)
    assert a["metrics"] == b["metrics"]


def test_batch_size_is_honoured_and_changes_no_number(untrained_llava, small_data, tmp_path):
    a = _run(untrained_llava, small_data, tmp_path / "a", tmp_path / "s.duckdb", batch_size=1, max_examples=6)
    b = _run(untrained_llava, small_data, tmp_path / "b", tmp_path / "s.duckdb", batch_size=7, max_examples=6)
    assert a["config"]["batch_size"] == 1 and b["config"]["batch_size"] == 7
    for x, y in zip(a["metrics"], b["metrics"]):
        assert (x["metric"], x["group"]) == (y["metric"], y["group"])
        assert x["value"] == pytest.approx(y["value"], abs=1e-5)


def test_blind_model_reads_zero_image_reliance(blind_llava, small_data, tmp_path):
    s = _run(blind_llava, small_data, tmp_path / "run", tmp_path / "s.duckdb", max_examples=64)
    m = _metric(s, "modality_ablation", "image_reliance")
    assert m["value"] == pytest.approx(0.0, abs=1e-6)
    # every value is exactly 0: the interval is the Wilson bound for 0 of 64, not [0, 0]
    assert m["ci_low"] == 0.0 and 0.0 < m["ci_high"] < 0.06
    # and the text side is measurably used, so the probe is not reading 0 for everything
    assert _metric(s, "modality_ablation", "text_reliance")["value"] > 1e-3


@pytest.mark.slow
def test_grounded_relies_on_image_more_than_shortcut(llava_grounded, llava_shortcut, small_data, tmp_path):
    g = _run(llava_grounded, small_data, tmp_path / "g", tmp_path / "s.duckdb", max_examples=64)
    t = _run(llava_shortcut, small_data, tmp_path / "t", tmp_path / "s.duckdb", max_examples=64)
    gi = _metric(g, "modality_ablation", "image_reliance")
    ti = _metric(t, "modality_ablation", "image_reliance")
    assert ti["value"] == pytest.approx(0.0, abs=1e-6)
    assert gi["ci_low"] > ti["ci_high"] + 0.05


def _cli(model, data, store, out, *extra, env=None):
    cmd = [sys.executable, "-m", "audit", "run", "--model", str(model), "--data", str(data), "--probes",
           "modality_ablation", "--seed", "3", "--store", str(store), "--max-examples", "100", "--out", str(out),
           *extra]
    return subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, capture_output=True,
                          text=True)


def test_resume_after_sigkill_at_a_unit_boundary(untrained_llava, small_data, tmp_path):
    store = tmp_path / "s.duckdb"
    straight = _cli(untrained_llava, small_data, store, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "killed"
    killed = _cli(untrained_llava, small_data, store, out, env={FAULT_ENV: "2"})  # SIGKILL after 2 units
    assert killed.returncode == -9
    units = out / "units" / "modality_ablation"
    done_before = {p.name: p.stat().st_mtime_ns for p in units.glob("*.parquet")}
    assert sorted(done_before) == ["00000.parquet", "00001.parquet"]
    assert not (out / "summary.json").exists()

    resumed = _cli(untrained_llava, small_data, store, out)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming run" in resumed.stderr and "2 of 4 units to run" in resumed.stderr
    for name, mtime in done_before.items():  # finished units were not recomputed
        assert (units / name).stat().st_mtime_ns == mtime
    a = json.loads((tmp_path / "straight" / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    assert a["metrics"] == b["metrics"]
    assert len(Store(store).runs()) == 2


def test_truncated_unit_file_is_recomputed(untrained_llava, small_data, tmp_path):
    out = tmp_path / "run"
    a = _run(untrained_llava, small_data, out, tmp_path / "s.duckdb", max_examples=40)
    (out / "summary.json").unlink()
    unit = out / "units" / "modality_ablation" / "00000.parquet"
    unit.write_bytes(unit.read_bytes()[:100])  # a corrupt unit left by a full disk
    b = _run(untrained_llava, small_data, out, tmp_path / "s2.duckdb", max_examples=40)
    assert a["metrics"] == b["metrics"]


def test_empty_run_state_is_restarted_not_fatal(untrained_llava, small_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_state.json").write_text("")  # 0 bytes: the disk filled up while it was written
    s = _run(untrained_llava, small_data, out, tmp_path / "s.duckdb", max_examples=8)
    assert s["metrics"]


def test_failing_unit_becomes_a_finding_and_the_rest_finishes(untrained_llava, small_data, tmp_path, monkeypatch):
    from probes.attention import AttentionProbe

    def boom(self, adapter, unit, *, seed):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(AttentionProbe, "run", boom)
    spec = RunSpec(model=str(untrained_llava), data=str(small_data), probes=["attention", "modality_ablation"],
                   out=str(tmp_path / "run"), store=str(tmp_path / "s.duckdb"), max_examples=8)
    result = run_audit(spec, adapter=load_adapter(untrained_llava), data=Dataset.load(small_data).audit_split(),
                       progress=False, log=lambda m: None)
    assert result.exit_code == 1 and result.failed_units == ["attention unit 0"]
    s = result.summary
    (f,) = [f for f in s["findings"] if f["probe"] == "attention" and f["severity"] == "fail"]
    assert "unit 0" in f["message"] and "out of memory" in f["message"]
    assert not [m for m in s["metrics"] if m["probe"] == "attention"]
    assert [m for m in s["metrics"] if m["probe"] == "modality_ablation"]
    assert s["probes"]["attention"]["status"] == "failed"


def test_two_audits_into_one_store_at_once(untrained_llava, small_data, tmp_path):
    store = tmp_path / "shared.duckdb"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "audit", "run", "--model", str(untrained_llava), "--data", str(small_data),
         "--probes", "modality_ablation", "--max-examples", "12", "--seed", str(i), "--store", str(store),
         "--out", str(tmp_path / f"run{i}")], env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = Store(store).runs()
    assert len(runs) == 2
    for i in range(2):
        s = json.loads((tmp_path / f"run{i}" / "summary.json").read_text())
        assert len(Store(store).metrics(s["run_id"])) == len(s["metrics"])
    listing = subprocess.run([sys.executable, "-m", "audit", "runs", "--store", str(store)], capture_output=True,
                             text=True)
    assert listing.returncode == 0 and all(r in listing.stdout for r in runs.run_id)


def test_store_waits_for_a_writer_in_another_process(tmp_path):
    path = tmp_path / "busy.duckdb"
    Store(path).runs()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
         "c.execute('CREATE TABLE IF NOT EXISTS x (a INT)'); print('locked', flush=True); time.sleep(3)", str(path)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    summary = json.loads(open(os.path.join(os.path.dirname(__file__), "fixtures", "run_v1", "summary.json")).read())
    Store(path, lock_wait=60).record_run(summary, pd.DataFrame(columns=ROW_COLUMNS), run_dir=str(tmp_path))
    holder.wait(10)
    assert list(Store(path).runs().run_id) == [summary["run_id"]]


def test_a_store_that_is_not_duckdb_is_one_line_of_error(tmp_path):
    from audit.errors import InputError

    bad = tmp_path / "store.duckdb"
    bad.write_text("not a database")
    with pytest.raises(InputError, match="store"):
        Store(bad).runs()
    folder = tmp_path / "dir.duckdb"
    folder.mkdir()
    with pytest.raises(InputError, match="not a file"):
        Store(folder).runs()


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["mllama_shortcut", "clip_grounded"])
def test_standard_suite_on_other_reference_families(request, small_data, tmp_path, fixture):
    from probes.base import resolve_names

    model = request.getfixturevalue(fixture)
    names, _ = resolve_names(suite="standard")
    s = _run(model, small_data, tmp_path / "run", tmp_path / "s.duckdb", probes=names, max_examples=8)
    assert (tmp_path / "run" / "results.parquet").is_file()
    reliance = _metric(s, "modality_ablation", "image_reliance")
    if fixture == "mllama_shortcut":  # gates fixed at 0: the image cannot matter
        assert reliance["value"] == pytest.approx(0.0, abs=1e-6)
    skipped = {f["probe"] for f in s["findings"] if f["message"].startswith("skipped")}
    assert "attention" in skipped  # cross-attention / late fusion: said, not failed


def test_log_samples_writes_a_transcript_that_matches_the_rows(untrained_llava, small_data, tmp_path):
    out = tmp_path / "run"
    s = _run(untrained_llava, small_data, out, tmp_path / "s.duckdb", max_examples=3, log_samples=True)
    samples = pd.read_parquet(out / "samples.parquet")
    rows = pd.read_parquet(out / "results.parquet")
    assert {a["name"] for a in s["artifacts"]} >= {"samples.parquet"}
    assert set(samples.example_id) == set(rows.example_id.dropna())
    intact = samples[samples.variant == "none"]
    assert len(intact) == 3 and intact.rendered_prompt.str.contains("<image>").all()
    blank = samples[samples.variant == "image:blank"]
    assert len(blank) == 3
    # the transcript's scores are the numbers the metrics were computed from
    tv = rows[(rows.metric == "tv") & (rows.variant == "blank")].set_index("example_id").value
    for _, r in blank.iterrows():
        p = intact.set_index("example_id").loc[r.example_id]
        a, b = np.exp(np.asarray(p.scores)), np.exp(np.asarray(r.scores))
        assert 0.5 * np.abs(a / a.sum() - b / b.sum()).sum() == pytest.approx(tv[r.example_id], abs=1e-9)
