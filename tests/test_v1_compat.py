"""Runs written by mmaudit's schema version 1 (tests/fixtures/run_v1, made by the old code)
still read everywhere: the report (HTML and JSON), the gate (a policy naming v1 metrics and
group labels) and the dashboard (a store created with the v1 SQL schema, the run inserted
the way v1 did). Typed breakdowns are derived (audit.schema.upgrade_*): layers of the
attention rows, attributes of the group_fairness rows, sets of the counterfactual rows.

The fixture's model and data folders were on the machine that made it; the report must cope
without them (the copy below points at folders that certainly do not exist)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import yaml

from audit import cli
from audit.report import build_document, build_report

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "run_v1"
TIMEOUT = 120

# The SQL schema of audit/store.py at version 1 (commit 8f73d51), verbatim.
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  run_id VARCHAR PRIMARY KEY, created VARCHAR, run_dir VARCHAR, model_path VARCHAR,
  architecture VARCHAR, model_sha256 VARCHAR, data_path VARCHAR, data_sha256 VARCHAR,
  n_examples INTEGER, seed BIGINT, config JSON, environment JSON, parent_run_id VARCHAR,
  summary JSON
);
CREATE TABLE IF NOT EXISTS metrics (
  run_id VARCHAR, probe VARCHAR, metric VARCHAR, value DOUBLE, ci_low DOUBLE,
  ci_high DOUBLE, grp VARCHAR, n BIGINT
);
CREATE TABLE IF NOT EXISTS findings (run_id VARCHAR, probe VARCHAR, severity VARCHAR, message VARCHAR);
CREATE TABLE IF NOT EXISTS result_rows (
  run_id VARCHAR, probe VARCHAR, metric VARCHAR, value DOUBLE, example_id VARCHAR,
  grp VARCHAR, site VARCHAR, variant VARCHAR
);
CREATE TABLE IF NOT EXISTS artifacts (run_id VARCHAR, probe VARCHAR, name VARCHAR, kind VARCHAR, path VARCHAR);
"""
V1_ROW_COLUMNS = ["probe", "metric", "value", "example_id", "group", "site", "variant"]


def _record_v1(db: Path, summary: dict, rows: pd.DataFrame, *, run_dir: str) -> None:
    """Store.record_run of version 1 (8f73d51), without the class around it."""
    con = duckdb.connect(str(db))
    try:
        con.execute(V1_SCHEMA)
        con.execute("BEGIN")
        con.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [summary["run_id"], summary["created"], run_dir, summary["model"]["path"],
                     summary["model"]["architecture"], summary["model"]["sha256"], summary["data"]["path"],
                     summary["data"]["sha256"], summary["data"]["n"], summary["config"].get("seed"),
                     json.dumps(summary["config"]), json.dumps(summary["environment"]), None, json.dumps(summary)])
        metrics = pd.DataFrame(summary["metrics"], columns=["probe", "metric", "value", "ci_low", "ci_high", "group",
                                                            "n"])
        metrics.insert(0, "run_id", summary["run_id"])
        con.register("m", metrics)
        con.execute("INSERT INTO metrics SELECT run_id, probe, metric, value, ci_low, ci_high, \"group\", n FROM m")
        findings = pd.DataFrame(summary["findings"], columns=["probe", "severity", "message"])
        findings.insert(0, "run_id", summary["run_id"])
        con.register("f", findings)
        con.execute("INSERT INTO findings SELECT * FROM f")
        r = rows.reindex(columns=V1_ROW_COLUMNS).copy()
        r.insert(0, "run_id", summary["run_id"])
        r = r.astype({c: "string" for c in ["example_id", "group", "site", "variant"]})
        con.register("r", r)
        con.execute("INSERT INTO result_rows SELECT run_id, probe, metric, value, example_id, \"group\", site, variant "
                    "FROM r")
        con.execute("COMMIT")
    finally:
        con.close()


@pytest.fixture()
def run_v1(tmp_path) -> Path:
    """The fixture run, its model and data paths pointing at folders that do not exist."""
    run = tmp_path / "run_v1"
    shutil.copytree(FIXTURE, run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["schema_version"] == 1
    summary["model"]["path"] = str(tmp_path / "gone" / "model")
    summary["data"]["path"] = str(tmp_path / "gone" / "data")
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def _section(doc, sid):
    return next(s for s in doc["sections"] if s["id"] == sid)


def _tables(sec) -> list[dict]:
    return [b for b in sec["blocks"] if b["type"] == "table"]


def _column(table: dict, name: str) -> list:
    i = table["columns"].index(name)
    return [r[i] for r in table["rows"]]


# ----------------------------------------------------------------------------- report
def test_report_reads_a_version_1_run(run_v1):
    doc = build_document(run_v1, store=run_v1.parent / "none.duckdb")
    statuses = doc["overview"]["sections"]
    for sid in ("interpretability", "privacy"):
        assert statuses[sid] in ("complete", "partial"), sid
    # the fixture's warnings (small groups, a no-bias, text followed) badge the sections they are in
    assert statuses["fairness"] == statuses["safety"] == "warnings"
    assert _section(doc, "fairness")["notes"][0] == "1 warning" and _section(doc, "safety")["notes"][0] == "2 warnings"
    # the JSON's metrics carry typed dims derived from the v1 group labels
    layered = [m for m in doc["metrics"] if m["probe"] == "attention" and m["group"] == "layer:1"]
    assert layered and layered[0]["dims"]["layer"] == 1 and layered[0]["dims"]["scope"] == "breakdown"
    gf = next(m for m in doc["metrics"] if m["probe"] == "group_fairness" and m["group"] == "group=a&gender_word=man")
    assert gf["dims"] == {"scope": "intersection", "attribute": "group", "attribute_value": "a",
                          "attribute2": "gender_word", "attribute2_value": "man"}
    # attention per-layer rows show their layers; the layer x head map comes from the upgraded rows
    interp = _section(doc, "interpretability")
    breakdown = next(t for t in _tables(interp) if t["caption"].startswith("Breakdowns")
                     and "image_attention_share" in _column(t, "metric"))
    assert {"layer 0", "layer 1"} <= set(_column(breakdown, "breakdown"))
    titles = [b["figure"]["layout"]["title"]["text"] for b in interp["blocks"] if b["type"] == "figure"]
    assert "Attention on image tokens per layer and head (mean over examples)" in titles
    knock = next(t for t in _tables(interp) if "effect" in _column(t, "metric"))
    assert "image-&gt;last · layer 1" in _column(knock, "breakdown") or "image->last · layer 1" in \
        _column(knock, "breakdown")
    # group_fairness rows show attributes and values, by scope
    fair = _section(doc, "fairness")
    per_group = next(t for t in _tables(fair) if t["caption"].startswith("Per group"))
    assert {"group = a", "group = b", "gender_word = man"} <= set(_column(per_group, "breakdown"))
    inter = next(t for t in _tables(fair) if t["caption"].startswith("Per intersection"))
    assert "group = a & gender_word = person" in _column(inter, "breakdown")
    # counterfactual sets and heatmaps come from the upgraded rows (no data folder: no images, said so)
    galleries = [b for s in doc["sections"] for b in s["blocks"] if b["type"] == "gallery"]
    captions = " | ".join(g["caption"] for g in galleries)
    assert "counterfactual sets with the largest effect" in captions and "cfi-000000" in json.dumps(galleries)
    assert "attention_heatmap over the image grid" in captions and "without their images" in captions
    grid = next(g for g in galleries if "attention_heatmap" in g["caption"])
    assert "grid 8x8" in grid["groups"][0]["items"][0]["lines"]
    # robustness rows show perturbation and strength
    safety = _section(doc, "safety")
    rob = next(t for t in _tables(safety) if "flip_rate" in _column(t, "metric") and "pgd 4" in
               " ".join(map(str, _column(t, "breakdown"))))
    assert "noise 0.05" in _column(rob, "breakdown")
    # the missing folders are said, not fatal
    assert doc["integrity"]["data_check"].startswith("data folder not found")
    assert {f["kind"] for f in doc["integrity"]["files"]} == {"run"}
    assert _section(doc, "data")["status"] == "warnings"  # the data folder is gone: said, not fatal
    # version 1 recorded the git revision of the folder mmaudit ran from: never shown as the model's
    assert "model_git_revision" not in json.dumps(doc)


def test_report_html_and_json_of_a_version_1_run(run_v1, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMAND_MODULES", tuple(dict.fromkeys((*cli.COMMAND_MODULES, "audit.publish_cli"))))
    for fmt in ("html", "json"):
        assert cli.main(["report", str(run_v1), "--format", fmt, "--store", str(run_v1.parent / "none.duckdb")]) == 0
    page = (run_v1 / "report.html").read_text().replace("<wbr>", "")
    assert "<h3>Group fairness (group_fairness)</h3>" in page and "group = a &amp; gender_word = man" in page
    assert "model_git_revision" not in page  # the audit tool's checkout, not the model's
    doc = json.loads((run_v1 / "report.json").read_text())
    assert doc["schema_version"] == 2 and doc["run_id"] == "a5d8d81780b5"
    # the report read only the run's own files
    assert {f["file"] for f in doc["integrity"]["files"]} == {"summary.json", "results.parquet"}
    assert build_report(run_v1, "json", store=run_v1.parent / "none.duckdb").name == "report.json"  # its own output
    capsys.readouterr()


# ------------------------------------------------------------------------------- gate
def test_gate_reads_version_1_metrics_and_groups(run_v1, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMAND_MODULES", tuple(dict.fromkeys((*cli.COMMAND_MODULES, "audit.publish_cli"))))
    policy = tmp_path / "v1.yaml"
    policy.write_text(yaml.safe_dump({"thresholds": [
        {"probe": "group_fairness", "metric": "accuracy_difference", "group": "group", "max": 0.9},
        {"probe": "group_fairness", "metric": "accuracy", "group": "group=a&gender_word=person", "min": 0.5},
        {"probe": "attention", "metric": "image_attention_share", "group": "layer:0", "min": 0.5},
        {"probe": "modality_ablation", "metric": "accuracy", "group": "none", "min": 0.4},
        {"probe": "robustness", "metric": "flip_rate", "group": "pgd:4/255", "max": 0.1},
        {"probe": "privacy_audit", "metric": "epsilon_lower_bound", "group": "k=1 (0/2 correct)", "max": 1.0},
        {"probe": "group_fairness", "metric": "demographic_parity_ratio", "group": "group", "min": 0.8}]}))
    assert cli.main(["gate", str(run_v1), "--policy", str(policy)]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()

    def status(rule):
        return [ln.split()[0] for ln in lines if f" {rule} " in f" {ln} "]

    assert status("group_fairness.accuracy_difference[group]") == ["PASS"]  # 0.8
    assert status("group_fairness.accuracy[group=a&gender_word=person]") == ["PASS"]  # 0.5
    assert status("attention.image_attention_share[layer:0]") == ["PASS"]
    assert status("modality_ablation.accuracy[none]") == ["PASS"]
    assert status("robustness.flip_rate[pgd:4/255]") == ["FAIL"]  # 0.1667 > 0.1
    assert status("privacy_audit.epsilon_lower_bound[k=1 (0/2 correct)]") == ["PASS", "PASS"]  # two v1 rows
    assert status("group_fairness.demographic_parity_ratio[group]") == ["FAIL"]  # null: the evidence is missing
    assert "value is undefined (null) in the run" in out


def test_gate_compares_a_version_2_run_with_a_version_1_baseline(run_v1, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMAND_MODULES", tuple(dict.fromkeys((*cli.COMMAND_MODULES, "audit.publish_cli"))))
    from audit.schema import metric_records, summary_metrics_frame

    v1 = json.loads((run_v1 / "summary.json").read_text())
    cand = tmp_path / "cand"
    cand.mkdir()
    frame = summary_metrics_frame(v1)
    frame.loc[(frame.metric == "flip_rate") & (frame.probe == "counterfactual_bias"), "value"] = 0.5
    (cand / "summary.json").write_text(json.dumps({**v1, "schema_version": 2, "run_id": "cand",
                                                   "metrics": metric_records(frame)}))
    policy = tmp_path / "reg.yaml"
    policy.write_text(yaml.safe_dump({"regressions": [
        {"probe": "counterfactual_bias", "metric": "flip_rate", "group": "*", "max_increase": 0.1},
        {"probe": "group_fairness", "metric": "accuracy_difference", "group": "*", "max_increase": 0.0}]}))
    assert cli.main(["gate", str(cand), "--policy", str(policy), "--baseline", str(run_v1)]) == 1
    out = capsys.readouterr().out
    assert "FAIL    regression  counterfactual_bias.flip_rate[group]" in out
    assert "increased by 0.5 (> 0.1)" in out
    assert "PASS    regression  group_fairness.accuracy_difference[gender_word]" in out


# -------------------------------------------------------------------------- dashboard
@pytest.fixture()
def v1_store(run_v1, tmp_path) -> Path:
    db = tmp_path / "v1.duckdb"
    _record_v1(db, json.loads((run_v1 / "summary.json").read_text()), pd.read_parquet(run_v1 / "results.parquet"),
               run_dir=str(run_v1))
    return db


def _page(name: str, store: Path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MMAUDIT_STORE", str(store))
    path = ROOT / "dashboard" / ("app.py" if name == "app" else f"pages/{name}.py")
    at = AppTest.from_file(str(path), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _columns(con, table: str) -> set[str]:
    return {r[0] for r in con.execute(f"SELECT column_name FROM information_schema.columns WHERE table_name = '{table}'")
            .fetchall()}


def test_dashboard_reads_a_version_1_store(v1_store, monkeypatch):
    from audit.catalog import PAGES

    for name in ("app", *PAGES, "compare"):
        _page(name, v1_store, monkeypatch)
    at = _page("attention", v1_store, monkeypatch)
    assert at.selectbox(key="attn_layer").options == ["all layers", "layer 0", "layer 1"]  # from site/variant
    assert "grid 8x8" in "\n".join(t.value for t in at.text)
    at.selectbox(key="attn_layer").set_value("layer 1").run()
    assert not at.exception and "mean over the selected heads" in "\n".join(t.value for t in at.text)
    bias = _page("bias", v1_store, monkeypatch)
    assert set(bias.selectbox(key="bias_attr").options) == {"group", "gender_word"}  # from "group=a" labels
    bias.selectbox(key="bias_attr").set_value("group").run()
    assert not bias.exception
    frames = pd.concat([d.value for d in bias.dataframe])
    assert {"group = a", "group = b"} <= set(frames.breakdown)
    assert any(o.startswith("cfi-000000 ·") for o in bias.selectbox(key="bias_set").options)  # v1's site column
    text = "\n".join(t.value for t in bias.text)
    assert "group = a" in text and "group = b" in text and "p_first = " in text  # members side by side
    safety = _page("safety", v1_store, monkeypatch)
    rows = pd.concat([d.value for d in safety.dataframe])
    assert "pgd 4" in set(rows.breakdown) and "random" in set(rows.breakdown)
    # reading never migrates (or otherwise writes) the version-1 store
    con = duckdb.connect(str(v1_store), read_only=True)
    try:
        assert "scope" not in _columns(con, "metrics") and "layer" not in _columns(con, "result_rows")
    finally:
        con.close()


def test_dashboard_reads_a_migrated_store_with_runs_of_both_versions(v1_store, tmp_path, monkeypatch):
    """The current Store migrates a v1 store on its first write; the old run's typed columns stay empty."""
    from audit.schema import metric_records, metrics_frame, rows_frame
    from audit.store import Store

    v2 = {"schema_version": 2, "run_id": "new00002", "created": "2027-01-01T00:00:00+00:00",
          "model": {"path": "/gone", "architecture": "llava", "sha256": "0" * 64},
          "data": {"path": "/gone", "sha256": "1" * 64, "n": 2}, "config": {"seed": 0}, "environment": {},
          "metrics": metric_records(metrics_frame([dict(probe="attention", metric="image_attention_share", value=0.5,
                                                        group="layer:3", layer=3, scope="breakdown")])),
          "findings": []}
    rows = rows_frame([dict(probe="attention", metric="image_attention_share", value=0.5, example_id="e",
                            layer=3, head=h) for h in range(2)])
    Store(v1_store).record_run(v2, rows, run_dir=str(tmp_path), parent_run_id="a5d8d81780b5")
    at = _page("attention", v1_store, monkeypatch)  # the newest run: version 2
    assert at.selectbox(key="attn_layer").options == ["all layers", "layer 3"]
    at.sidebar.selectbox[0].set_value("a5d8d81780b5").run()  # the old run, through the migrated tables
    assert not at.exception and at.selectbox(key="attn_layer").options == ["all layers", "layer 0", "layer 1"]
    cmp_ = _page("compare", v1_store, monkeypatch)
    assert "(its parent run)" in "\n".join(t.value for t in cmp_.text)
