"""`mmaudit report` (HTML, JSON, PDF) and `mmaudit gate`: every catalog section present,
self-contained HTML, JSON round trip, PDF pages, missing probes said in place, untrusted
strings inert, image and file paths confined to the run/data/model folders, hashing capped,
the report never written over a file that is not its own, gate exit codes 0/1/2,
non-finite policy limits refused, baseline regressions.

Runs: modality_ablation and attention run for real on the untrained tiny LLaVA; the
fairness and safety probes' output is written by hand in the schema-v2 shape (typed
columns), computed from the data folder's own examples, and spliced into the run."""
from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from audit import cli
from audit.catalog import SECTIONS
from audit.errors import InputError
from audit.report import build_document, build_report
from audit.report.assets import UnsafePath, example_image, resolve_image
from audit.report.build import SECTION_IDS
from audit.report.integrity import HashBudget
from audit.report.render import ERR_NO_CHROMIUM, find_chromium, render_html, render_json
from audit.schema import metric_records, metrics_frame, rows_frame, upgrade_rows
from audit.stats import proportion_ci
from audit.store import Store

ROOT = Path(__file__).resolve().parents[1]
REAL = ["modality_ablation", "attention"]
HAND = ["counterfactual_bias", "group_fairness", "hallucination"]
PAYLOAD = '<script>alert("pwned")</script>'
IMG_PAYLOAD = '<img src=x onerror=alert(1)>'


# --------------------------------------------------------------------------- fixtures
def _manifest(data_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(data_dir) / "manifest.jsonl").read_text().splitlines() if x.strip()]


def _prop(k, n, **dims) -> dict:
    lo, hi = proportion_ci(int(k), int(n))
    return dict(value=k / n if n else float("nan"), ci_low=lo, ci_high=hi, n=int(n), **dims)


def hand_written(data_dir, *, seed: int, n_sets: int = 6, flip_every: int = 3) -> tuple[list[dict], list[dict]]:
    """(rows, metric records) of counterfactual_bias, group_fairness and hallucination as the
    ported probes write them (schema v2), computed from random answers on the data's examples."""
    rng = np.random.default_rng(seed)
    man = _manifest(data_dir)
    rows, metrics = [], []
    sets: dict[str, list[dict]] = {}
    for r in man:
        if r.get("pair_id") and r.get("varies") == "group":
            sets.setdefault(r["pair_id"], []).append(r)
    flips, gaps = [], []
    for k, (sid, members) in enumerate(sorted(sets.items())[:n_sets]):
        flip, gap = float(k % flip_every == 0), float(rng.random())
        common = dict(probe="counterfactual_bias", set_id=sid, attribute="group", example_id=members[0]["id"])
        rows += [dict(common, metric="flip", value=flip), dict(common, metric="logprob_gap", value=gap)]
        for j, m in enumerate(members):
            member = dict(probe="counterfactual_bias", set_id=sid, attribute="group",
                          attribute_value=m["attributes"]["group"], example_id=m["id"])
            rows.append(dict(member, metric="target_logprob", value=-0.5 - gap * j))
            rows += [dict(member, metric="choice_logprob", value=float(-rng.random()), token=c, token_index=t)
                     for t, c in enumerate(m["choices"])]
        flips.append(flip)
        gaps.append(gap)
    cf = dict(probe="counterfactual_bias", group="group", attribute="group", scope="comparison")
    metrics += [dict(cf, metric="flip_rate", **_prop(sum(flips), len(flips))),
                dict(cf, metric="mean_abs_logprob_gap", value=float(np.mean(gaps)), n=len(gaps)),
                dict(cf, metric="p_value", value=0.5, n=len(gaps))]
    occ = [r for r in man if (r.get("attributes") or {}).get("family") == "occupation"][:40]
    correct = {r["id"]: float(rng.random() < 0.7) for r in occ}
    for attr in ("group", "gender_word"):
        accs = {}
        for value in sorted({r["attributes"][attr] for r in occ}):
            ids = [r["id"] for r in occ if r["attributes"][attr] == value]
            rows += [dict(probe="group_fairness", metric="correct", value=correct[i], example_id=i, attribute=attr,
                          attribute_value=value) for i in ids]
            k = sum(correct[i] for i in ids)
            accs[value] = k / len(ids)
            metrics.append(dict(probe="group_fairness", metric="accuracy", group=f"{attr}={value}", attribute=attr,
                                attribute_value=value, scope="group", **_prop(k, len(ids))))
        metrics.append(dict(probe="group_fairness", metric="accuracy_difference", group=attr, attribute=attr,
                            scope="comparison", value=max(accs.values()) - min(accs.values()), n=len(occ)))
    cells: dict[tuple, list[str]] = {}
    for r in occ:
        cells.setdefault((r["attributes"]["group"], r["attributes"]["gender_word"]), []).append(r["id"])
    for (a, g), ids in sorted(cells.items()):
        metrics.append(dict(probe="group_fairness", metric="accuracy", group=f"group={a}&gender_word={g}",
                            attribute="group", attribute_value=a, attribute2="gender_word", attribute2_value=g,
                            scope="intersection", **_prop(sum(correct[i] for i in ids), len(ids))))
    pope = [r for r in man if (r.get("attributes") or {}).get("family") == "presence"][:30]
    yes = {r["id"]: float(rng.random() < 0.5) for r in pope}
    rows += [dict(probe="hallucination", metric="pred_yes", value=yes[r["id"]], example_id=r["id"],
                  setting=r["attributes"].get("pope_negative")) for r in pope]
    ok = [float((yes[r["id"]] == 1.0) == (r["answer"] == "yes")) for r in pope]
    metrics.append(dict(probe="hallucination", metric="pope_accuracy", scope="overall", **_prop(sum(ok), len(ok))))
    metrics.append(dict(probe="hallucination", metric="pope_yes_ratio", scope="overall",
                        **_prop(sum(yes.values()), len(yes))))
    for setting in sorted({r["attributes"].get("pope_negative") for r in pope} - {None}):
        part = [o for o, r in zip(ok, pope) if r["attributes"].get("pope_negative") == setting]
        metrics.append(dict(probe="hallucination", metric="pope_accuracy", group=setting, setting=setting,
                            scope="breakdown", **_prop(sum(part), len(part))))
    return rows, metrics


def write_run(run_dir: Path, *, summary: dict, rows: pd.DataFrame, store: Path | None = None,
              parent: str | None = None) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(run_dir / "results.parquet", index=False)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if store is not None:
        Store(store).record_run(summary, rows, run_dir=str(run_dir.resolve()), parent_run_id=parent)
    return summary


def splice(run_dir: Path, data_dir, *, seed: int, store: Path, parent: str | None = None) -> dict:
    """Add the hand-written probes' rows and metrics to a real run, and record it in `store`."""
    summary = json.loads((run_dir / "summary.json").read_text())
    extra_rows, extra_metrics = hand_written(data_dir, seed=seed)
    rows = pd.concat([upgrade_rows(pd.read_parquet(run_dir / "results.parquet"), 2), rows_frame(extra_rows)],
                     ignore_index=True)
    summary["metrics"] += metric_records(metrics_frame(extra_metrics))
    summary["config"]["probes"] += HAND
    summary["probes"].update({p: {"status": "ok", "examples": 30, "selected": 30, "units": 1} for p in HAND})
    return write_run(run_dir, summary=summary, rows=rows, store=store, parent=parent)


def hand_run(run_dir: Path, data_dir, model_dir, *, run_id: str, seed: int, probes=HAND, store: Path | None = None,
             parent: str | None = None, version: int = 2) -> dict:
    """A run written entirely by hand (no model call): summary.json + results.parquet."""
    rows, metrics = hand_written(data_dir, seed=seed)
    rows = [r for r in rows if r["probe"] in probes]
    metrics = [m for m in metrics if m["probe"] in probes]
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")  # after any real run before it
    summary = {"schema_version": version, "run_id": run_id, "created": created,
               "model": {"path": str(model_dir), "architecture": "llava", "sha256": "0" * 64},
               "data": {"path": str(data_dir), "sha256": "1" * 64, "n": 100},
               "config": {"probes": list(probes), "seed": seed}, "environment": {"python": "3.11", "device": "cpu"},
               "probes": {p: {"status": "ok", "examples": 30} for p in probes},
               "metrics": metric_records(metrics_frame(metrics)), "findings": [],
               "artifacts": [{"probe": None, "name": "results.parquet", "kind": "rows", "path": "results.parquet"}]}
    if parent:
        summary["parent_run_id"] = parent
    return write_run(run_dir, summary=summary, rows=rows_frame(rows), store=store, parent=parent)


def _real_run(model, data, out, store, *, probes, seed=0, max_examples=8, log_samples=False):
    from audit.adapters import load_adapter
    from audit.dataset import Dataset
    from audit.runner import RunSpec, run_audit

    spec = RunSpec(model=str(model), data=str(data), probes=list(probes), out=str(out), seed=seed, store=str(store),
                   max_examples=max_examples, log_samples=log_samples)
    return run_audit(spec, adapter=load_adapter(model), data=Dataset.load(data).audit_split(), progress=False,
                     log=lambda m: None).summary


@pytest.fixture(scope="module")
def runs(untrained_llava, small_data, tmp_path_factory):
    """A real run of modality_ablation + attention (with its transcript, samples.parquet) with
    hand-written fairness/safety probes spliced in, and a hand-written child run (two fairness
    probes) that names it as parent."""
    root = tmp_path_factory.mktemp("report")
    store = root / "store.duckdb"
    _real_run(untrained_llava, small_data, root / "run", root / "scratch.duckdb", probes=REAL, log_samples=True)
    parent = splice(root / "run", small_data, seed=0, store=store)
    child = hand_run(root / "child", small_data, untrained_llava, run_id="child0001", seed=1,
                     probes=["group_fairness", "counterfactual_bias"], store=store, parent=parent["run_id"])
    return {"root": root, "store": store, "run": root / "run", "child": root / "child", "parent": parent,
            "child_summary": child, "data": small_data, "model": untrained_llava}


def main(argv, monkeypatch) -> int:
    """`mmaudit ARGV` with this module's commands wired as COMMAND_MODULES will wire them."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", tuple(dict.fromkeys((*cli.COMMAND_MODULES, "audit.publish_cli"))))
    return cli.main([str(a) for a in argv])


def _last_err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected a message on stderr"
    return err[-1]


def _section(doc, sid):
    return next(s for s in doc["sections"] if s["id"] == sid)


def _strip_volatile(obj):
    """Without the generation timestamps (the only thing that differs between two builds)."""
    if isinstance(obj, dict):
        return {k: _strip_volatile(v) for k, v in obj.items() if k != "generated"}
    if isinstance(obj, list):
        return [_strip_volatile(v) for v in obj if not (isinstance(v, list) and v[:1] == ["report generated"])]
    return obj


# ----------------------------------------------------------------------------- report
@pytest.mark.parametrize("argv", [["report"], ["gate"], ["dashboard"]])
def test_help_works(argv, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"], monkeypatch)
    assert exc.value.code == 0
    assert "usage: mmaudit" in capsys.readouterr().out


def test_html_report_has_every_section_and_is_self_contained(runs, monkeypatch, capsys):
    assert main(["report", runs["run"], "--format", "html", "--store", runs["store"]], monkeypatch) == 0
    page = (runs["run"] / "report.html").read_text()
    assert f"wrote {runs['run'] / 'report.html'}" in capsys.readouterr().out
    for sid in SECTION_IDS:
        assert f'id="sec-{sid}"' in page, sid
    for title in ("System identity and intended use", "Architecture and components",
                  "Data governance and bias examination", "Evaluation protocol", *SECTIONS.values(), "Mitigations",
                  "User-set targets", "Limitations", "Integrity manifest (SHA-256)",
                  "Regulatory and documentation mapping"):
        assert title.replace("&", "&amp;") in page, title
    # self-contained: no external src/href in the markup (the inline plotly.js bundle holds URL strings it
    # never loads for these traces, and the CSP forbids any fetch), no stylesheet links or imports
    markup = re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.S)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", markup, re.I)
    assert not re.search(r"""url\(\s*["']?\s*(?:https?:)?//""", markup, re.I)
    assert "<link" not in markup and "@import" not in markup
    assert "Plotly.newPlot" in page and "plotly.js v" in page  # the bundle is inline
    assert "default-src 'none'" in page  # CSP: the page may fetch nothing
    scripts = re.findall(r"<script[^>]*>", page)
    assert scripts and all('nonce="' in s for s in scripts)
    # evidence that needs the data folder: counterfactual sets and heatmap overlays as PNG data URLs
    assert page.count("data:image/png;base64,") >= 6
    assert "attention_heatmap (layer_head_mean) heatmaps" in page and "over the image grid" in page
    assert "counterfactual sets with the largest effect" in page
    for ref in ("Art. 10(2)(f)", "Art. 13(3)(b)(v)", "Art. 15(5)", "Annex IV(2)(g)", "Art. 55(1)(a)",
                "MEASURE 2.11", "MEASURE 2.10", "Quantitative Analyses", "Caveats and Recommendations"):
        assert ref in page
    # every probe's catalog title and the meaning of its metrics are shown
    for title in ("Modality ablation", "Attention to the image", "Counterfactual bias", "Group fairness",
                  "Object hallucination (POPE)"):
        assert title in page
    assert "What this means" in page and "Share of counterfactual sets whose chosen answer changes" in page
    # the integrity manifest hashes model, data and run files, and re-checks the data fingerprint
    doc = json.loads(render_json(build_document(runs["run"], store=runs["store"])))
    integ = doc["integrity"]
    assert integ["data_check"] == "unchanged since the audit"
    kinds = {f["kind"] for f in integ["files"]}
    assert kinds == {"model", "data", "run"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", f["sha256"]) for f in integ["files"])


def test_sections_follow_the_catalog_and_typed_dims(runs):
    doc = build_document(runs["run"], store=runs["store"])
    text = {sid: json.dumps(_section(doc, sid)) for sid in SECTIONS}
    assert "Group fairness (group_fairness)" in text["fairness"] and "group_fairness" not in text["safety"]
    assert "Object hallucination (POPE) (hallucination)" in text["safety"]
    assert "Attention to the image (attention)" in text["interpretability"]
    fair = _section(doc, "fairness")
    tables = [b for b in fair["blocks"] if b["type"] == "table"]
    per_group = next(t for t in tables if t["caption"].startswith("Per group"))
    cols = per_group["columns"]
    assert {"breakdown", "group", "measure", "unit"} <= set(cols)
    # the breakdown label comes from the typed attribute columns, the group label stays CONTRACT's
    row = next(r for r in per_group["rows"] if r[cols.index("group")] == "group=a")
    assert row[cols.index("breakdown")] == "group = a" and row[cols.index("measure")] == "Accuracy per group"
    inter = next(t for t in tables if t["caption"].startswith("Per intersection"))
    assert any(r[inter["columns"].index("breakdown")].startswith("group = a & gender_word = ") for r in inter["rows"])
    # the per-layer curve of the attention share is drawn from the typed `layer` column
    interp = _section(doc, "interpretability")
    curves = [b for b in interp["blocks"] if b["type"] == "figure" and "per layer" in
              b["figure"]["layout"]["title"]["text"]]
    assert curves and curves[0]["figure"]["data"][-1]["x"] == [0, 1]
    heads = [b for b in interp["blocks"] if b["type"] == "figure" and "per layer and head" in
             b["figure"]["layout"]["title"]["text"]]
    assert heads and heads[0]["figure"]["data"][0]["x"][:2] == ["head 0", "head 1"]


def test_json_round_trips(runs, monkeypatch):
    assert main(["report", runs["run"], "--format", "json", "--out", runs["root"] / "r.json"], monkeypatch) == 0
    loaded = json.loads((runs["root"] / "r.json").read_text())
    fresh = build_document(runs["run"])
    assert _strip_volatile(loaded) == _strip_volatile(json.loads(json.dumps(fresh)))
    assert loaded["schema_version"] == 2 and loaded["kind"] == "mmaudit-report"
    assert [s["id"] for s in loaded["sections"]] == list(SECTION_IDS)
    summary = json.loads((runs["run"] / "summary.json").read_text())
    assert loaded["metrics"] == summary["metrics"] and loaded["findings"] == summary["findings"]
    # the JSON is a complete description: the HTML rebuilt from it has every section and figure
    page = render_html(loaded, plotly_js="/* plotly */")
    assert all(f'id="sec-{sid}"' in page for sid in SECTION_IDS)
    assert page.count("Plotly.newPlot") == sum(b["type"] == "figure" for s in loaded["sections"] for b in s["blocks"])


def test_missing_probes_are_said_in_place_and_parent_is_compared(runs):
    doc = build_document(runs["child"], store=runs["store"])
    assert doc["overview"]["sections"]["interpretability"] == "missing"
    assert doc["overview"]["sections"]["safety"] == "missing"
    assert doc["overview"]["sections"]["privacy"] == "missing"
    text = json.dumps(_section(doc, "interpretability"))
    assert "No probe of this section produced results" in text and "modality_ablation" in text
    assert "privacy_audit" in json.dumps(_section(doc, "privacy"))
    mit = _section(doc, "mitigations")
    # the comparison is there; its badge warns that the parent measured probes this run did not
    assert mit["status"] == "warnings"
    assert any(b["type"] == "note" and b["level"] == "warning" and b["text"].startswith("Measured before but not")
               for b in mit["blocks"])
    table = next(b for b in mit["blocks"] if b["type"] == "table")
    assert table["columns"][:6] == ["probe", "metric", "group", "before", "after", "after − before"]
    row = next(r for r in table["rows"] if r[0] == "group_fairness" and r[1] == "accuracy_difference" and r[2] == "group")
    before = next(m["value"] for m in runs["parent"]["metrics"]
                  if (m["probe"], m["metric"], m["group"]) == ("group_fairness", "accuracy_difference", "group"))
    after = next(m["value"] for m in runs["child_summary"]["metrics"]
                 if (m["probe"], m["metric"], m["group"]) == ("group_fairness", "accuracy_difference", "group"))
    assert row[3] == pytest.approx(before) and row[4] == pytest.approx(after) and row[5] == pytest.approx(after - before)
    # the direction of a change comes from the catalog: a lower flip rate or accuracy gap is better
    for r in table["rows"]:
        if r[1] in ("flip_rate", "accuracy_difference") and r[5]:
            assert r[6] == ("better" if r[5] < 0 else "worse"), r
        if r[1] == "p_value":
            assert r[6] is None  # no agreed direction
    # without the store the parent cannot be found: said, not failed
    alone = build_document(runs["child"], store=runs["root"] / "elsewhere.duckdb")
    assert _section(alone, "mitigations")["status"] == "missing"
    # an explicit --baseline works without any store
    explicit = build_document(runs["child"], baseline=runs["run"], store=runs["root"] / "elsewhere.duckdb")
    assert _section(explicit, "mitigations")["status"] == "warnings"
    assert any(b["type"] == "table" for b in _section(explicit, "mitigations")["blocks"])


def test_privacy_and_defense_record_are_reported(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (model / "defense.json").write_text(json.dumps({
        "method": "dp", "source": {"model": "/models/base"}, "parameters": {"target_epsilon": 8},
        "privacy": {"epsilon": 7.5, "delta": 1e-5, "accountant": "rdp", "steps": 100},
        "utility": {"before": {"accuracy": 0.9}, "after": {"accuracy": 0.8}}}))
    summary = json.loads((run / "summary.json").read_text())
    summary["model"]["path"] = str(model)
    summary["metrics"] += metric_records(metrics_frame(
        [dict(probe="privacy_audit", metric=m, value=v, n=64, scope="overall")
         for m, v in (("epsilon_lower_bound", 9.0), ("mia_auc", 0.61), ("tpr_at_1pct_fpr", 0.05))]))
    (run / "summary.json").write_text(json.dumps(summary))
    doc = build_document(run, store=tmp_path / "none.duckdb")
    priv = _section(doc, "privacy")
    text = json.dumps(priv, ensure_ascii=False)
    assert priv["status"] == "warnings" and "exceeds the theoretical" in text  # 9.0 > 7.5 from the DP record
    assert "false-alarm rate of at most 5%" in text  # the warning states its error rate
    assert "ε theoretical (upper bound)" in text and "7.5" in text and "0.61" in text
    mit = json.dumps(_section(doc, "mitigations"), ensure_ascii=False)
    assert "Defense record" in mit and "utility before and after" in mit


@pytest.mark.xfail(not hasattr(__import__("audit.runner").runner, "model_fingerprint"), strict=True,
                   reason="audit/runner.py v2 records sha256 of the model path, not model_fingerprint(model): "
                          "the report cannot tell whether the model changed")
def test_integrity_rechecks_the_model_fingerprint(runs, tmp_path):
    doc = build_document(runs["run"], store=runs["store"])
    assert doc["integrity"]["model_check"] == "unchanged since the audit"
    run, model = tmp_path / "run", tmp_path / "model"
    shutil.copytree(runs["run"], run)
    shutil.copytree(runs["model"], model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "changed": True}))
    summary = json.loads((run / "summary.json").read_text())
    summary["model"]["path"] = str(model)
    (run / "summary.json").write_text(json.dumps(summary))
    assert "CHANGED" in build_document(run, store=tmp_path / "none.duckdb")["integrity"]["model_check"]


def test_report_with_policy_shows_targets_and_identity(runs, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "system": {"name": "Tiny LLaVA", "provider": "ACME", "intended_use": "answering questions about shapes",
                   "limitations": ["synthetic scenes only"]},
        "thresholds": [{"probe": "modality_ablation", "metric": "image_reliance", "min": 0.0, "max": 1.0},
                       {"probe": "group_fairness", "metric": "accuracy_difference", "group": "*", "max": -1.0}]}))
    doc = build_document(runs["run"], policy=policy)
    assert doc["title"] == "Audit report: Tiny LLaVA"
    assert doc["overview"]["targets_verdict"] == "fail"
    assert _section(doc, "identity")["status"] == "complete"
    statuses = [r["status"] for r in doc["targets"]]
    assert statuses[0] == "pass" and statuses.count("fail") >= 2  # one fail per attribute with "*"
    assert {r["kind"] for r in doc["targets"]} == {"threshold"}
    table = next(b for b in _section(doc, "targets")["blocks"] if b["type"] == "table")
    assert table["columns"][:3] == ["status", "kind", "rule"]
    assert "Declared by the provider: synthetic scenes only" in json.dumps(_section(doc, "limitations"))


# ----------------------------------------------------- what a new user reads first
FINDINGS = [
    {"probe": "counterfactual_bias", "severity": "fail", "message": "answers depend on 'group' (flip rate 100%)"},
    {"probe": "hallucination", "severity": "warning", "message": "the model answers 'yes' too rarely"},
    {"probe": "run", "severity": "warning", "message": "approximate scores from the endpoint"},
    {"probe": "group_fairness", "severity": "info", "message": "some groups are small"},
]


def _copy_run(runs, tmp_path, edit=None, name: str = "run") -> Path:
    """A copy of the module's run with summary.json edited by `edit(summary)`."""
    run = tmp_path / name
    shutil.copytree(runs["run"], run, ignore=shutil.ignore_patterns("report.*"))
    summary = json.loads((run / "summary.json").read_text())
    if edit is not None:
        edit(summary)
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def _with_findings(findings):
    def edit(summary):
        summary["findings"] = findings
    return edit


def _cover(page: str) -> str:
    return page.split('<section class="section"')[0]


@pytest.mark.parametrize("findings, status, text", [
    (FINDINGS, "fail", "FAIL: 1 failing finding, 2 warnings (1 info note)"),
    (FINDINGS[1:], "warnings", "WARNINGS: 2 warnings, no failing finding (1 info note)"),
    (FINDINGS[3:], "no findings", "NO FINDINGS: no failing finding and no warning (1 info note)"),
    ([], "no findings", "NO FINDINGS: no failing finding and no warning"),
])
def test_cover_states_a_verdict_without_a_policy(runs, tmp_path, findings, status, text):
    doc = build_document(_copy_run(runs, tmp_path, _with_findings(findings)), store=tmp_path / "none.duckdb")
    v = doc["overview"]["verdict"]
    assert (v["source"], v["status"], v["text"]) == ("findings", status, text)
    assert doc["overview"]["targets_verdict"] is None
    cover = _cover(render_html(doc, plotly_js="/* plotly */"))
    assert html.escape(text) in cover and "No policy was given" in cover
    fails = [f for f in findings if f["severity"] == "fail"]
    for f in fails:  # the failing finding itself is on the cover, linked to its section
        assert html.escape(f["message"]) in cover and 'href="#sec-fairness"' in cover
    assert ('<span class="pill fail">FAIL</span>' in cover) == bool(fails)


def test_cover_states_the_policy_verdict_and_the_findings(runs, tmp_path):
    run = _copy_run(runs, tmp_path, _with_findings(FINDINGS))
    failing = _policy(tmp_path, {"thresholds": [
        {"probe": "modality_ablation", "metric": "image_reliance", "min": 0.0, "max": 1.0},
        {"probe": "group_fairness", "metric": "accuracy_difference", "group": "group", "max": -1.0}]}, "fail.yaml")
    doc = build_document(run, policy=failing, store=tmp_path / "none.duckdb")
    v = doc["overview"]["verdict"]
    assert v["source"] == "policy" and v["status"] == "fail" and doc["overview"]["targets_verdict"] == "fail"
    assert v["text"] == "POLICY FAIL: 1 of 2 target checks failed (1 passed, 1 failed, 0 skipped)"
    cover = _cover(render_html(doc, plotly_js="/* plotly */"))
    assert html.escape(v["text"]) in cover
    assert "FAIL: 1 failing finding, 2 warnings (1 info note)" in cover  # the findings are not hidden by the policy
    passing = _policy(tmp_path, {"thresholds": [
        {"probe": "modality_ablation", "metric": "image_reliance", "min": 0.0, "max": 1.0}]}, "pass.yaml")
    doc = build_document(run, policy=passing, store=tmp_path / "none.duckdb")
    assert doc["overview"]["verdict"]["text"].startswith("POLICY PASS: every target check passed")
    assert doc["overview"]["targets_verdict"] == "pass" and doc["overview"]["verdict"]["findings"]["status"] == "fail"
    assert _section(doc, "targets")["status"] == "complete"


def test_section_badges_reflect_their_findings(runs, tmp_path):
    doc = build_document(_copy_run(runs, tmp_path, _with_findings(FINDINGS)), store=tmp_path / "none.duckdb")
    status = doc["overview"]["sections"]
    assert status["fairness"] == "fail"          # counterfactual_bias failed
    assert status["safety"] == "warnings"        # hallucination warned
    assert status["protocol"] == "warnings"      # a finding about the run itself
    assert status["interpretability"] == "complete"  # evidence and nothing to warn about
    assert status["privacy"] == "missing"        # no probe of it ran
    assert status["limitations"] == "fail"       # it lists every finding
    assert _section(doc, "fairness")["notes"][0] == "1 failing finding"
    # COMPLETE only with evidence and without a warning or failure in the section
    from audit.report.verdict import finding_section

    for sec in doc["sections"]:
        mine = [f for f in FINDINGS if finding_section(f) == sec["id"] and f["severity"] != "info"]
        levels = {b.get("level") for b in sec["blocks"] if b["type"] == "note"}
        if sec["status"] == "complete":
            assert not mine and not levels & {"fail", "warning", "missing"}, sec["id"]
    page = render_html(doc, plotly_js="/* plotly */")
    row = re.search(r'href="#sec-fairness">[^<]*</a></td><td>(.*?)</td>', page).group(1)
    assert row == '<span class="pill fail">FAIL</span>'
    # the same run without findings: no red or amber badge on those sections
    clean = build_document(_copy_run(runs, tmp_path, _with_findings([]), "clean"), store=tmp_path / "none.duckdb")
    assert clean["overview"]["sections"]["fairness"] in ("complete", "partial")
    assert clean["overview"]["sections"]["safety"] in ("complete", "partial")


def test_cover_counts_examples_per_probe_not_a_sum(runs, tmp_path):
    def edit(summary):
        summary["data"]["n"] = 1431
        summary["config"]["max_examples"] = 8
        summary["probes"]["modality_ablation"].update(examples=8, selected=577)
        summary["probes"]["attention"].update(examples=8, selected=8)

    doc = build_document(_copy_run(runs, tmp_path, edit), store=tmp_path / "none.duckdb")
    counts = {c["probe"]: c for c in doc["overview"]["probes"]}
    assert counts["modality_ablation"]["examples"] == 8 and counts["modality_ablation"]["selected"] == 577
    assert counts["modality_ablation"]["capped"] is True and counts["attention"]["capped"] is False
    assert counts["hallucination"]["examples"] == 30
    assert doc["overview"]["examples"] == ("Each probe audited between 8 and 30 examples of the 1431 examples in "
                                           "the audited split; 1 of 5 probe(s) capped by --max-examples 8.")
    page = render_html(doc, plotly_js="/* plotly */")
    cover = _cover(page)
    assert "1431 examples in the audited split" in cover and "audited examples" not in cover
    row = re.search(r"<tr><td>modality_<wbr>ablation</td>(.*?)</tr>", cover).group(1)
    assert '<td class="num">8</td><td class="num">577</td><td>yes</td>' in row
    table = next(b for b in _section(doc, "protocol")["blocks"] if b["type"] == "table"
                 and b["caption"].startswith("Examples per probe"))
    assert ["modality_ablation", "Modality ablation", "ok", 8, 577, "yes"] in table["rows"]


def test_only_the_models_own_provenance_is_shown(runs, tmp_path):
    tool_rev = "0123456789abcdef0123456789abcdef01234567"

    def edit(summary):
        summary["environment"].update(model_git_revision=tool_rev, git_commit="feedfacefeedface",
                                      mmaudit_git="c0ffee77")
        summary["model"].update(hub_id="org/tiny-llava", revision="main", commit="a" * 40, dtype="bfloat16",
                                device_map="auto", trust_remote_code=True, git_revision="c0ffee77",
                                weights_not_loaded={"missing_keys": ["lm_head.weight", "x.bias"]})

    run = _copy_run(runs, tmp_path, edit)
    doc = build_document(run, store=tmp_path / "none.duckdb")
    ident = _section(doc, "identity")
    model = dict(next(b for b in ident["blocks"] if b["type"] == "kv" and (b["caption"] or "").startswith(
        "The audited model"))["items"])
    assert model["Hugging Face Hub id"] == "org/tiny-llava" and model["revision asked for"] == "main"
    assert model["Hub commit resolved"] == "a" * 40 and model["dtype"] == "bfloat16"
    assert model["device map"] == "auto" and model["trust_remote_code (the model's own code ran)"] == "yes"
    assert model["weights not loaded from the checkpoint"] == "2 missing keys (e.g. lm_head.weight)"
    notes = [(b["level"], b["text"]) for b in ident["blocks"] if b["type"] == "note"]
    assert any(level == "warning" and "trust_remote_code" in t for level, t in notes)
    assert any(level == "fail" and "freshly initialised" in t for level, t in notes)
    assert ident["status"] == "fail"
    page = build_report(run, "html", store=tmp_path / "none.duckdb").read_text()
    as_json = build_report(run, "json", store=tmp_path / "none.duckdb").read_text()
    for text in (page, as_json):  # the audit tool's own checkout, nowhere
        assert tool_rev not in text and "feedfacefeedface" not in text and "c0ffee77" not in text
        assert "model_git_revision" not in text and "git_commit" not in text
    assert "org/<wbr>tiny-llava" in page and "a" * 24 in page


def _import_card(data: Path) -> dict:
    return {"datacard": "mmaudit import", "mmaudit_version": "0.2.0",
            "importer": {"name": "vlmevalkit", "module": "audit.importers.vlmevalkit", "version": "1",
                         "format": "vlmevalkit", "requested_format": "auto"},
            "sources": [{"path": "/bench/MMBench_DEV_EN.tsv", "kind": "file", "sha256": "ab" * 32, "bytes": 4096}],
            "image_folders": [], "mapping": {"/bench/MMBench_DEV_EN.tsv": {"question": "prompt", "answer": "answer",
                                                                         "category": "attributes.category"}},
            "ignored_columns": {"/bench/MMBench_DEV_EN.tsv": ["comment"]},
            "options": {"images": None, "map": {}, "prompt": None, "choices": None, "limit": 200},
            "licence": "Apache-2.0", "counts": {"examples": 200, "images": 180, "by_split": {"test": 200}}}


def _cells(blocks) -> list:
    out = []
    for b in blocks:
        out += [v for _, v in b.get("items") or []] + [c for r in b.get("rows") or [] for c in r]
    return out


def test_the_data_card_is_shown_as_tables(runs, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(Path(runs["data"]) / "manifest.jsonl", data / "manifest.jsonl")
    (data / "datacard.json").write_text(json.dumps(_import_card(data)))
    run = _copy_run(runs, tmp_path, lambda s: s["data"].update(path=str(data)))
    blocks = _section(build_document(run, store=tmp_path / "none.duckdb"), "data")["blocks"]
    head = next(b for b in blocks if b["type"] == "kv" and (b["caption"] or "").startswith("Data card"))
    items = dict(head["items"])
    assert items["origin"].startswith("imported by `mmaudit data import` (importer vlmevalkit")
    assert items["licence"] == "Apache-2.0"
    sources = next(b for b in blocks if b["type"] == "table" and b["caption"] == "sources")
    assert sources["columns"][:4] == ["path", "kind", "sha256", "bytes"]
    assert sources["rows"] == [["/bench/MMBench_DEV_EN.tsv", "file", "ab" * 32, 4096]]
    mapping = next(b for b in blocks if b["type"] == "table" and b["caption"].startswith("mapping"))
    assert ["/bench/MMBench_DEV_EN.tsv", "category", "attributes.category"] in mapping["rows"]
    assert any(b["type"] == "table" and b["caption"] == "counts: by_split" and b["rows"] == [[200]] for b in blocks)
    # nothing is dumped as JSON text
    assert not any(isinstance(c, str) and c.lstrip()[:1] in ("{", "[") for c in _cells(blocks))
    # the synthetic generator's card of the fixture data: its origin and counts as tables
    blocks = _section(build_document(runs["run"], store=runs["store"]), "data")["blocks"]
    assert dict(next(b for b in blocks if b["type"] == "kv" and (b["caption"] or "").startswith("Data card"))
                ["items"])["origin"].startswith("synthetic")
    split = next(b for b in blocks if b["type"] == "table" and b["caption"] == "counts: by_split")
    assert split["columns"] == ["test", "train", "val"]
    assert not any(isinstance(c, str) and c.lstrip()[:1] in ("{", "[") for c in _cells(blocks))


def test_glossary_lists_every_metric_shown(runs):
    from audit.report import meta

    doc = build_document(runs["run"], store=runs["store"])
    gloss = doc["sections"][-1]
    assert gloss["id"] == "glossary" and gloss["title"] == "Glossary of metrics"
    table = next(b for b in gloss["blocks"] if b["type"] == "table")
    assert table["columns"] == ["measure", "metric", "probe", "unit", "which way is better", "meaning"]
    listed = {(r[2], r[1]): r for r in table["rows"]}
    assert set(listed) == {(m["probe"], m["metric"]) for m in doc["metrics"]}
    for (probe, metric), r in listed.items():
        assert r[0] == meta.metric_label(probe, metric) and r[5] == meta.metric_meaning(probe, metric)
        assert r[4] in ("higher is better", "lower is better", "no agreed direction") or r[4].startswith("closer to")
    assert listed[("counterfactual_bias", "flip_rate")][4] == "lower is better"
    assert listed[("modality_ablation", "accuracy")][4] == "higher is better"


def _figures(doc, sid=None):
    return [b for s in doc["sections"] if sid in (None, s["id"]) for b in s["blocks"] if b["type"] == "figure"]


def test_charts_are_full_width_labelled_and_explained(runs, tmp_path):
    from audit.report import meta

    def edit(summary):  # two empty intersections: no example, and no value
        extra = [dict(probe="group_fairness", metric="accuracy", group=f"group={a}&gender_word=zz", attribute="group",
                      attribute_value=a, attribute2="gender_word", attribute2_value="zz", scope="intersection",
                      value=v, n=0) for a, v in (("a", 0.0), ("b", float("nan")))]
        summary["metrics"] += metric_records(metrics_frame(extra))

    doc = build_document(_copy_run(runs, tmp_path, edit), store=runs["store"])
    figs = _figures(doc)
    assert len(figs) >= 5
    pairs = {(m["probe"], m["metric"]) for m in doc["metrics"]}
    titles = {meta.axis_title(p, m) for p, m in pairs}
    for f in figs:
        lay = f["figure"]["layout"]
        assert "width" not in lay and lay["autosize"] is True  # the chart fills its column
        assert f["caption"].startswith("What this means: ") and len(f["caption"]) > 40
        axis = lay["xaxis"]["title"]["text"] if f["figure"]["data"][0]["type"] == "bar" else \
            lay["yaxis"]["title"]["text"] if f["figure"]["data"][0]["type"] == "scatter" else None
        if axis is not None:  # one catalog metric per axis, by its label and unit, never a raw name
            assert axis in {t.replace("&", "&amp;") for t in titles}, axis
            assert axis not in {m for _, m in pairs}
    inter = next(f for f in _figures(doc, "fairness") if "per intersection" in f["figure"]["layout"]["title"]["text"])
    labels = inter["figure"]["data"][0]["y"]
    assert labels and not any("zz" in y for y in labels)  # no blank bars for groups without examples
    assert "2 group(s) without examples or without a value are not drawn" in inter["caption"]
    # the before/after charts of the mitigations: one metric per chart
    child = build_document(runs["child"], store=runs["store"])
    mit = _figures(child, "mitigations")
    assert mit
    axes = [f["figure"]["layout"]["xaxis"]["title"]["text"] for f in mit]
    assert len(set(axes)) == len(mit) and all(a in titles for a in axes)
    assert all([t["name"] for t in f["figure"]["data"]] == ["before", "after"] for f in mit)
    page = render_html(doc, plotly_js="/* plotly */")
    assert page.count("<figcaption>What this means: ") == page.count("Plotly.newPlot(")


def _samples_frame(rows: list[dict]) -> pd.DataFrame:
    from audit.samples import samples_frame

    return samples_frame([{"call": "score", "rendered_prompt": None, "image_sha256": None, "generated": None,
                           **r, "candidates": json.dumps(r["candidates"])} for r in rows])


def test_samples_section_lists_the_worst_examples(runs, tmp_path):
    man = _manifest(runs["data"])
    pope = [r for r in man if (r.get("attributes") or {}).get("family") == "presence" and r["answer"] == "yes"][:3]
    a, b, c = (r["id"] for r in pope)

    def row(eid, variant, scores, predicted):
        rec = next(r for r in pope if r["id"] == eid)
        return dict(probe="hallucination", example_id=eid, variant=variant, prompt=rec["prompt"],
                    candidates=["yes", "no"], scores=scores, predicted=predicted)

    run = _copy_run(runs, tmp_path)
    _samples_frame([row(c, "none", [-0.1, -2.5], "yes"), row(b, "none", [-3.0, -0.05], "no"),
                    row(a, "none", [-0.2, -1.8], "yes"), row(a, "noise:0.1", [-1.5, -0.3], "no"),
                    dict(probe="hallucination", example_id=None, variant=None, prompt=PAYLOAD, candidates=["yes", "no"],
                         scores=[-0.7, -0.69], predicted="no")]).to_parquet(run / "samples.parquet")
    doc = build_document(run, store=tmp_path / "none.duckdb")
    sec = _section(doc, "samples")
    table = next(b for b in sec["blocks"] if b["type"] == "table")
    assert table["columns"] == ["example id", "variant", "prompt", "reference answer", "predicted answer",
                                "why it is listed"]
    ids = [r[0] for r in table["rows"]]
    assert ids[:3] == [a, b, c]  # the answer that flipped under noise, then the lowest share of the reference
    assert table["rows"][0][1] == "noise:0.1" and table["rows"][0][5] == "answer changed under noise:0.1: yes -> no"
    assert table["rows"][1][2] == pope[1]["prompt"] and table["rows"][1][3:5] == ["yes", "no"]
    assert ids[3] is None and sec["status"] == "partial"  # a row without example id is listed, and said
    text = json.dumps(sec)
    assert "mmaudit dashboard" in text and '\\"Samples\\"' in text and f"example={a}" in text
    page = render_html(doc, plotly_js="/* plotly */")
    assert PAYLOAD not in page and html.escape(PAYLOAD) in page.replace("<wbr>", "")
    # the real transcript of the fixture run (--log-samples): examples from the manifest
    real = _section(build_document(runs["run"], store=runs["store"]), "samples")
    first = next(b for b in real["blocks"] if b["type"] == "table")
    by_id = {r["id"]: r for r in man}
    assert first["rows"] and all(r[0] in by_id for r in first["rows"])
    assert all(r[2] == by_id[r[0]]["prompt"] for r in first["rows"] if r[1] == "none")
    # without samples.parquet (or with one that leaves the run folder) the section says how to get one
    (run / "samples.parquet").unlink()
    outside = tmp_path / "elsewhere.parquet"
    _samples_frame([row(a, "none", [-0.1, -2.5], "yes")]).to_parquet(outside)
    (run / "samples.parquet").symlink_to(outside)
    sec = _section(build_document(run, store=tmp_path / "none.duckdb"), "samples")
    assert sec["status"] == "missing" and "--log-samples" in json.dumps(sec) and a not in json.dumps(sec)


def test_report_bad_input_exits_2(tmp_path, monkeypatch, capsys):
    assert main(["report", tmp_path, "--format", "html"], monkeypatch) == 2
    assert "no summary.json" in _last_err(capsys)
    with pytest.raises(SystemExit) as exc:
        main(["report", tmp_path, "--format", "docx"], monkeypatch)
    assert exc.value.code == 2 and "--format" in _last_err(capsys)


# ----------------------------------------------------------------- where a report may go
def _snapshot(*paths) -> dict:
    return {p: p.read_bytes() for p in paths}


def test_report_never_replaces_a_file_that_is_not_its_own(runs, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(Path(runs["data"]) / "manifest.jsonl", data / "manifest.jsonl")
    summary = json.loads((run / "summary.json").read_text())
    summary["data"]["path"] = str(data)
    (run / "summary.json").write_text(json.dumps(summary))
    keep = _snapshot(run / "summary.json", run / "results.parquet", data / "manifest.jsonl")
    # the run's inputs and anything in the data folder: refused, even with --force
    for out in (run / "summary.json", run / "results.parquet", data / "manifest.jsonl", data / "report.html"):
        for force in ([], ["--force"]):
            assert main(["report", run, "--out", out, *force], monkeypatch) == 2
            err = _last_err(capsys)
            assert str(out) in err and "refusing" in err
    link = tmp_path / "link.html"
    link.symlink_to(run / "summary.json")
    assert main(["report", run, "--out", link, "--force"], monkeypatch) == 2
    assert "input of the run" in _last_err(capsys)
    assert _snapshot(*keep) == keep
    # any other existing file: refused unless --force
    other = tmp_path / "notes.txt"
    other.write_text("my notes")
    for fmt in ("html", "json"):
        assert main(["report", run, "--format", fmt, "--out", other], monkeypatch) == 2
        assert str(other) in _last_err(capsys) and other.read_text() == "my notes"
    assert main(["report", run, "--format", "json", "--out", other, "--force"], monkeypatch) == 0
    assert json.loads(other.read_text())["kind"] == "mmaudit-report"
    # its own previous output is replaced without --force, in every format
    for fmt in ("html", "json"):
        out = tmp_path / f"again.{fmt}"
        assert main(["report", run, "--format", fmt, "--out", out], monkeypatch) == 0
        assert main(["report", run, "--format", fmt, "--out", out], monkeypatch) == 0
    assert main(["report", run, "--format", "json", "--out", tmp_path / "again.html"], monkeypatch) == 0
    assert main(["report", run, "--out", tmp_path], monkeypatch) == 2  # a folder
    capsys.readouterr()


def _pdf_pages(pdf: bytes, path) -> int:
    if shutil.which("pdfinfo"):
        out = subprocess.run(["pdfinfo", str(path)], capture_output=True, text=True, check=True).stdout
        return int(re.search(r"^Pages:\s+(\d+)", out, re.M).group(1))
    return len(re.findall(rb"/Type\s*/Page\b", pdf))


def _vertical_lines(png: Path, *, min_run: int = 40) -> tuple[list[int], int]:
    """(x of every pixel column holding a vertical run of at least `min_run` non-white pixels,
    rightmost x with any ink) of a rasterised page."""
    a = np.asarray(Image.open(png).convert("L")) < 235
    runs_ = np.zeros(a.shape[1], dtype=int)
    best = np.zeros(a.shape[1], dtype=int)
    for row in a:
        runs_ = np.where(row, runs_ + 1, 0)
        best = np.maximum(best, runs_)
    return [int(x) for x in np.where(best >= min_run)[0]], int(np.where(a.any(axis=0))[0].max())


needs_chromium = pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install -y "
                                                                  "chromium); the pdf format needs it")


@needs_chromium
def test_pdf_flows_sections_without_forced_page_breaks(runs, tmp_path, monkeypatch):
    out = runs["root"] / "report.pdf"
    assert main(["report", runs["run"], "--format", "pdf", "--out", out, "--store", runs["store"]], monkeypatch) == 0
    pdf = out.read_bytes()
    assert pdf[:5] == b"%PDF-"
    # no page break is forced: the run's content (galleries, tables, charts) fills at most two pages per section
    assert _pdf_pages(pdf, out) <= 2 * len(SECTION_IDS)
    if shutil.which("pdftotext"):
        text = subprocess.run(["pdftotext", "-layout", str(out), "-"], capture_output=True, text=True).stdout
        for title in ("Fairness and bias", "Interpretability", "Integrity manifest", "Glossary of metrics"):
            assert title in text
        first = text.split("\f")[0]
        assert "NO FINDINGS" in first or "WARNINGS:" in first or "FAIL:" in first  # the verdict is on page 1
    # a second print replaces its own earlier PDF without --force
    assert main(["report", runs["run"], "--format", "pdf", "--out", out, "--store", runs["store"]], monkeypatch) == 0
    # a lean run (one probe, model and data folders gone): short sections share pages, where one page
    # per section would take at least N + 1 (the cover, then N sections)
    lean = tmp_path / "lean"
    summary = hand_run(lean, runs["data"], tmp_path / "gone-model", run_id="lean01", seed=0, probes=["hallucination"])
    summary["data"]["path"] = str(tmp_path / "gone-data")
    (lean / "summary.json").write_text(json.dumps(summary))
    pdf_path = build_report(lean, "pdf", store=tmp_path / "none.duckdb")
    assert _pdf_pages(pdf_path.read_bytes(), pdf_path) < len(SECTION_IDS) - 2


@needs_chromium
@pytest.mark.skipif(shutil.which("pdftoppm") is None, reason="pdftoppm (poppler-utils) rasterises the PDF")
def test_pdf_tables_keep_their_right_border(runs, tmp_path):
    """A table cell holding a long unbreakable token (a path, a hash) neither pushes the table past
    the printable area (its right border cut off) nor makes Chromium shrink the whole page."""
    run = tmp_path / "run"
    summary = hand_run(run, runs["data"], tmp_path / "gone-model", run_id="wide01", seed=0, probes=["hallucination"])
    summary["model"]["path"] = str(tmp_path / ("m" * 40) / ("x" * 300))
    summary["data"]["path"] = str(tmp_path / "gone-data")
    (run / "summary.json").write_text(json.dumps(summary))
    pdf = build_report(run, "pdf", store=tmp_path / "none.duckdb")
    subprocess.run(["pdftoppm", "-r", "72", "-gray", "-f", "1", "-l", "1", str(pdf), str(tmp_path / "page")],
                   check=True, capture_output=True)
    png = next(tmp_path.glob("page*.pgm"))
    width = Image.open(png).width  # A4 at 72 dpi: 595 px; the printable area ends 12 mm (34 px) before the edge
    right_edge = width - round(12 / 25.4 * 72)
    lines, ink = _vertical_lines(png)
    assert lines and right_edge - 4 <= max(lines) <= right_edge + 1, (max(lines), right_edge)
    assert ink <= right_edge + 1


def test_pdf_without_chromium_is_a_clear_input_error(runs, monkeypatch, capsys):
    monkeypatch.setenv("MMAUDIT_CHROMIUM", str(runs["root"] / "no-such-chromium"))
    assert main(["report", runs["run"], "--format", "pdf", "--out", runs["root"] / "x.pdf"], monkeypatch) == 2
    err = _last_err(capsys)
    assert "apt-get install -y chromium" in err and err.startswith("mmaudit: error: --format pdf:")
    assert not (runs["root"] / "x.pdf").exists()
    with pytest.raises(InputError, match=re.escape(ERR_NO_CHROMIUM)):
        build_report(runs["run"], "pdf", out=runs["root"] / "x.pdf")


# ------------------------------------------------------------------- untrusted strings
def _png(path, colour):
    Image.new("RGB", (16, 16), colour).save(path)


def _evil_run(root, version: int):
    """A hand-made RUN_DIR whose every string is hostile, with a data folder beside it."""
    data = root / "data"
    (data / "images").mkdir(parents=True)
    _png(data / "images" / "ok.png", (10, 200, 10))
    _png(root / "outside.png", (201, 7, 99))  # must never be read through a manifest path
    evil_id = f"ex{PAYLOAD}"
    manifest = [
        {"id": evil_id, "image": "images/ok.png", "prompt": f"what is {IMG_PAYLOAD}?", "choices": ["a", "b"],
         "answer": "a", "attributes": {"group": PAYLOAD}, "pair_id": "p1", "varies": "group"},
        {"id": "ex-2", "image": "../outside.png", "prompt": "escape", "choices": ["a", "b"], "answer": "a",
         "attributes": {"group": "b"}, "pair_id": "p1", "varies": "group"},
    ]
    (data / "manifest.jsonl").write_text("\n".join(json.dumps(m) for m in manifest) + "\n")
    (data / "datacard.json").write_text(json.dumps({  # hostile keys and values in the data card too
        "datacard": "mmaudit import", "licence": PAYLOAD, "importer": {"name": IMG_PAYLOAD, "format": PAYLOAD},
        "sources": [{"path": PAYLOAD, "sha256": IMG_PAYLOAD}], "mapping": {PAYLOAD: {IMG_PAYLOAD: "prompt"}},
        "counts": {PAYLOAD: 1, "by_split": {IMG_PAYLOAD: 2}}, PAYLOAD: [IMG_PAYLOAD]}))
    run = root / "run"
    run.mkdir()
    _samples_frame([dict(probe="counterfactual_bias", example_id=evil_id, variant=PAYLOAD, prompt=IMG_PAYLOAD,
                         candidates=["a", PAYLOAD], scores=[-0.1, -2.0], predicted="a", generated=PAYLOAD)]
                   ).to_parquet(run / "samples.parquet")
    metric = {"probe": "counterfactual_bias", "metric": "flip_rate", "value": 1.0, "ci_low": 1.0, "ci_high": 1.0,
              "group": PAYLOAD, "n": 1}
    metrics = [metric, {**metric, "probe": "attention", "metric": "image_attention_share", "group": None},
               {**metric, "probe": "group_fairness", "metric": "accuracy", "group": f"group={PAYLOAD}"},
               {**metric, "probe": "group_fairness", "metric": "accuracy", "group": "group=b"}]
    if version == 1:  # the old layout: structure packed into group / site / variant strings
        rows = [("attention", "attention_heatmap", 0.1 * k, evil_id, f"{k // 2},{k % 2}", "mean", "grid:2x2")
                for k in range(4)]
        rows += [("attention", "attention_heatmap", 0.2 * k, "ex-2", f"{k // 2},{k % 2}", "mean", "grid:2x2")
                 for k in range(4)]
        rows += [("counterfactual_bias", "flip", 1.0, evil_id, PAYLOAD, f"set{PAYLOAD}", None),
                 ("counterfactual_bias", "logprob_gap", 0.5, evil_id, PAYLOAD, f"set{PAYLOAD}", None),
                 ("counterfactual_bias", "pred_first", 1.0, evil_id, PAYLOAD, f"set{PAYLOAD}", PAYLOAD),
                 ("counterfactual_bias", "pred_first", 0.0, "ex-2", PAYLOAD, f"set{PAYLOAD}", "b")]
        frame = pd.DataFrame(rows, columns=["probe", "metric", "value", "example_id", "group", "site", "variant"])
    else:
        recs = [dict(probe="attention", metric="attention_heatmap", value=0.1 * k, example_id=e, variant=PAYLOAD,
                     grid_row=k // 2, grid_col=k % 2) for e in (evil_id, "ex-2") for k in range(4)]
        cf = dict(probe="counterfactual_bias", set_id=f"set{PAYLOAD}", attribute=PAYLOAD)
        recs += [dict(cf, metric="flip", value=1.0, example_id=evil_id),
                 dict(cf, metric="target_logprob", value=-1.0, example_id=evil_id, attribute_value=PAYLOAD),
                 dict(cf, metric="target_logprob", value=-2.0, example_id="ex-2", attribute_value="b"),
                 dict(cf, metric="choice_logprob", value=-1.0, example_id=evil_id, attribute_value=PAYLOAD,
                      token=IMG_PAYLOAD, token_index=0),
                 dict(cf, metric="choice_logprob", value=-1.5, example_id="ex-2", attribute_value="b",
                      token=IMG_PAYLOAD, token_index=0)]
        frame = rows_frame(recs)
        dims = [dict(attribute=PAYLOAD, scope="comparison"), dict(scope="overall"),
                dict(attribute="group", attribute_value=PAYLOAD, scope="group"),
                dict(attribute="group", attribute_value="b", scope="group")]
        metrics = [{**m, "dims": d} for m, d in zip(metrics, dims)]
    frame.to_parquet(run / "results.parquet")
    summary = {"schema_version": version, "run_id": f"r{PAYLOAD}", "created": "2026-01-01T00:00:00+00:00",
               "model": {"path": f"/nowhere/{PAYLOAD}", "architecture": IMG_PAYLOAD, "sha256": "0" * 64},
               "data": {"path": str(data), "sha256": "1" * 64, "n": 2},
               "config": {"probes": ["attention", "counterfactual_bias", PAYLOAD], "seed": 0},
               "environment": {"python": PAYLOAD, "device": "cpu"}, "metrics": metrics,
               "findings": [{"probe": "counterfactual_bias", "severity": "warning", "message": f"bad {IMG_PAYLOAD}"}]}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.mark.parametrize("version", [1, 2])
def test_untrusted_strings_stay_inert_in_the_report(tmp_path, version):
    run = _evil_run(tmp_path, version)
    page = build_report(run, "html").read_text()
    for payload in (PAYLOAD, IMG_PAYLOAD, "<script>alert", "onerror=alert(1)>"):
        assert payload not in page
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in page or \
           "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/<wbr>script&gt;" in page
    # the data card and the transcript carried hostile strings as well, and were shown
    assert "Data card (datacard.json of the data folder)" in page and "samples.parquet of this run holds 1" in page
    # every <script> element is ours (nonce) and none was opened by data
    scripts = re.findall(r"<script[^>]*>", page)
    assert all('nonce="' in s for s in scripts)
    assert page.count("Plotly.newPlot(") >= 1  # the per-group figure carries hostile labels
    assert len(scripts) == 1 + page.count("Plotly.newPlot(")
    # the image outside the data folder was refused: only in-folder images are embedded
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert pngs  # the heatmaps and the set members are drawn
    colours = {Image.open(io.BytesIO(base64.b64decode(p))).convert("RGB").getpixel((0, 0)) for p in pngs}
    assert (201, 7, 99) not in colours
    # the JSON format keeps the strings as data (valid JSON, nothing executed)
    doc = json.loads(build_report(run, "json").read_text())
    assert doc["run_id"] == f"r{PAYLOAD}"


def test_image_paths_cannot_leave_the_data_folder(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    _png(data / "images" / "ok.png", (0, 0, 255))
    _png(tmp_path / "secret.png", (255, 0, 0))
    (data / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    assert resolve_image(data, "images/ok.png") == (data / "images" / "ok.png").resolve()
    for bad in ("../secret.png", "images/../../secret.png", str(tmp_path / "secret.png"), "/etc/passwd",
                "images/link.png", "..\\secret.png", "C:\\x.png", "images/ok.txt", "", "images/missing.png"):
        with pytest.raises(UnsafePath):
            resolve_image(data, bad)
        assert example_image(data, {"image": bad}) is None
    assert example_image(data, {"image": "images/ok.png"}).getpixel((0, 0)) == (0, 0, 255)


def test_report_lists_only_what_the_audit_wrote_or_read(runs, tmp_path):
    """A summary naming /etc as its folders and artifacts outside the run lists nothing of them; a
    huge sparse image named by the manifest is not hashed (noted), and the build still finishes."""
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    summary = json.loads((run / "summary.json").read_text())
    summary["model"]["path"] = "/etc"
    summary["data"]["path"] = "/etc"
    summary["artifacts"] = [{"name": "x", "kind": "rows", "path": p} for p in
                            ("/etc/passwd", "../../../../etc/hostname", "results.parquet")]
    (run / "summary.json").write_text(json.dumps(summary))
    doc = build_document(run, store=tmp_path / "none.duckdb")
    files = doc["integrity"]["files"]
    assert {f["kind"] for f in files} == {"run"}
    assert {f["file"] for f in files} >= {"summary.json", "results.parquet"}
    assert not any("passwd" in f["file"] or "hostname" in f["file"] for f in files)
    assert "passwd" not in json.dumps(doc["sections"])
    # a data folder whose manifest names a 64 GiB sparse image, and a sparse weight file
    data, model = tmp_path / "data", tmp_path / "model"
    (data / "images").mkdir(parents=True)
    _png(data / "images" / "ok.png", (1, 2, 3))
    with open(data / "images" / "huge.png", "wb") as fh:
        fh.truncate(64 * 2**30)
    (data / "manifest.jsonl").write_text("\n".join(json.dumps(
        {"id": f"e{i}", "image": f"images/{n}.png", "prompt": "p", "choices": ["a", "b"], "answer": "a"})
        for i, n in enumerate(("ok", "huge"))) + "\n")
    model.mkdir()
    (model / "config.json").write_text("{}")
    with open(model / "model.safetensors", "wb") as fh:
        fh.truncate(64 * 2**30)
    summary["model"]["path"], summary["data"]["path"] = str(model), str(data)
    (run / "summary.json").write_text(json.dumps(summary))
    doc = build_document(run, store=tmp_path / "none.duckdb", hash_budget=HashBudget(max_file=2**30))
    integ = doc["integrity"]
    weights = next(f for f in integ["files"] if f["file"] == "model.safetensors")
    assert weights["sha256"] is None and "over the 1.0 GiB per-file cap" in weights["note"]
    images = next(f for f in integ["files"] if f["file"].startswith("images named by manifest.jsonl"))
    assert images["file"].startswith("images named by manifest.jsonl (1 files") and "1 of 2" in images["note"]
    assert any("huge.png: not hashed" in s for s in integ["skipped"])
    assert integ["data_check"].startswith("not re-checked: huge.png is 64.0 GiB")
    assert "huge.png: not hashed" in json.dumps(_section(doc, "limitations"))


# ------------------------------------------------------------------------------- gate
def _policy(tmp_path, obj, name="policy.yaml") -> str:
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else yaml.safe_dump(obj, sort_keys=False))
    return str(p)


def test_gate_passes_and_prints_a_table(runs, tmp_path, monkeypatch, capsys):
    pol = _policy(tmp_path, {"thresholds": [
        {"probe": "modality_ablation", "metric": "image_reliance", "min": 0.0, "max": 1.0, "bound": "ci_high"},
        {"probe": "group_fairness", "metric": "accuracy_difference", "group": "*", "max": 1.0},
        {"probe": "privacy_audit", "metric": "epsilon_lower_bound", "max": 8, "optional": True}]})
    assert main(["gate", runs["run"], "--policy", pol], monkeypatch) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "SKIP" in out and "modality_ablation.image_reliance" in out
    assert "group_fairness.accuracy_difference[group]" in out
    assert "gate: PASS" in out
    lines = out.splitlines()
    assert lines[0].startswith("Thresholds (limits on this run's metric rows): ")
    assert lines[1].split()[:3] == ["status", "kind", "rule"]
    assert re.search(r"PASS\s+threshold\s+modality_ablation\.image_reliance", out)
    assert "Regressions" not in out and "(thresholds: " in lines[-1] and "regressions: none in the policy" in lines[-1]


def test_gate_output_says_which_rows_are_thresholds_and_which_regressions(tmp_path, monkeypatch, capsys):
    base = _summary_dir(tmp_path, "base", [("counterfactual_bias", "flip_rate", "group", 0.10),
                                           ("modality_ablation", "accuracy", None, 0.80)])
    cand = _summary_dir(tmp_path, "cand", [("counterfactual_bias", "flip_rate", "group", 0.30),
                                           ("modality_ablation", "accuracy", None, 0.78)])
    both = _policy(tmp_path, {
        "thresholds": [{"probe": "modality_ablation", "metric": "accuracy", "min": 0.5},
                       {"probe": "counterfactual_bias", "metric": "flip_rate", "group": "group", "max": 0.2}],
        "regressions": [{"probe": "counterfactual_bias", "metric": "flip_rate", "group": "*", "max_increase": 0.5}]})
    assert main(["gate", cand, "--policy", both, "--baseline", base], monkeypatch) == 1
    out = capsys.readouterr().out
    thresholds, regressions, verdict = out.split("\n\n")
    assert thresholds.startswith("Thresholds (limits on this run's metric rows): 2 row(s) checked")
    assert regressions.startswith("Regressions (allowed change of each metric row against the baseline): "
                                  "1 row(s) checked")
    assert all(" threshold " in ln for ln in thresholds.splitlines()[3:])
    assert all(" regression " in ln for ln in regressions.splitlines()[3:])
    assert re.search(r"FAIL\s+threshold\s+counterfactual_bias\.flip_rate\[group\]", thresholds)
    assert re.search(r"PASS\s+regression\s+counterfactual_bias\.flip_rate\[group\]", regressions)
    assert verdict.strip() == ("gate: FAIL — run cand against baseline base: 2 passed, 1 failed, 0 skipped "
                               "(thresholds: 1 passed, 1 failed, 0 skipped; "
                               "regressions: 1 passed, 0 failed, 0 skipped)")


def test_gate_fails_on_threshold_and_on_missing_metric(runs, tmp_path, monkeypatch, capsys):
    pol = _policy(tmp_path, {"thresholds": [
        {"probe": "modality_ablation", "metric": "image_reliance", "max": -0.5},
        {"probe": "privacy_audit", "metric": "epsilon_lower_bound", "max": 8},
        {"probe": "modality_ablation", "metric": "image_relaince", "min": 0}]})
    assert main(["gate", runs["run"], "--policy", pol], monkeypatch) == 1
    out = capsys.readouterr().out
    assert "> max -0.5" in out
    assert "probe 'privacy_audit' has no metrics in the run" in out
    assert "did you mean 'image_reliance'?" in out
    assert "gate: FAIL" in out and "3 failed" in out


def test_gate_null_values_fail_unless_optional(tmp_path, monkeypatch, capsys):
    run = _summary_dir(tmp_path, "run", [("group_fairness", "demographic_parity_ratio", "group", None),
                                         ("group_fairness", "accuracy", "group=a", 0.5)])
    rule = {"probe": "group_fairness", "metric": "demographic_parity_ratio", "group": "group", "min": 0.8}
    assert main(["gate", run, "--policy", _policy(tmp_path, {"thresholds": [rule]})], monkeypatch) == 1
    assert "value is undefined (null) in the run" in capsys.readouterr().out
    assert main(["gate", run, "--policy", _policy(tmp_path, {"thresholds": [{**rule, "optional": True}]}, "o.yaml")],
                monkeypatch) == 0
    assert "SKIP" in capsys.readouterr().out


@pytest.mark.parametrize("text, needle", [
    ("thresholds: [", "not valid YAML at line"),
    ("- just\n- a list\n", "must be a mapping"),
    ("thresholds:\n  - probe: a\n    metric: b\n    maxx: 1\n", "line 4: field 'thresholds[0].maxx': Extra inputs"),
    ("thresholds:\n  - {probe: a, metric: b}\n", "field 'thresholds[0]': give 'min', 'max' or both"),
    ("thresholds:\n  - {probe: a, metric: b, min: 2, max: 1}\n", "'min' (2.0) is greater than 'max' (1.0)"),
    ("thresholds:\n  - {probe: a, metric: b, max: lots}\n", "field 'thresholds[0].max': must be a finite number"),
    ("regressions:\n  - {probe: a, metric: b, max_increase: -1}\n", "field 'regressions[0].max_increase'"),
    ("version: 2\nthresholds: []\n", "field 'version'"),
    ("thresholds: []\n", "no 'thresholds' and no 'regressions'"),
    # a limit that is not a finite number would compare false with everything: fail open
    ("thresholds:\n  - {probe: a, metric: b, max: .nan}\n", "field 'thresholds[0].max': must be a finite number"),
    ("thresholds:\n  - {probe: a, metric: b, max: .NaN}\n", "field 'thresholds[0].max': must be a finite number"),
    ("thresholds:\n  - {probe: a, metric: b, min: -.inf}\n", "field 'thresholds[0].min': must be a finite number"),
    ("thresholds:\n  - {probe: a, metric: b, max: .inf}\n", "field 'thresholds[0].max': must be a finite number"),
    ("thresholds:\n  - {probe: a, metric: b, max: nan}\n", "field 'thresholds[0].max': must be a finite number"),
    ("thresholds:\n  - {probe: a, metric: b, max: '0.1'}\n", "field 'thresholds[0].max': must be a finite number"),
    ("thresholds:\n  - {probe: a, metric: b, max: true}\n", "field 'thresholds[0].max': must be a finite number"),
    ("regressions:\n  - {probe: a, metric: b, max_increase: .nan}\n",
     "field 'regressions[0].max_increase': must be a finite number"),
    ("regressions:\n  - {probe: a, metric: b, max_decrease: .inf}\n",
     "field 'regressions[0].max_decrease': must be a finite number"),
])
def test_gate_malformed_policy_exits_2(runs, tmp_path, monkeypatch, capsys, text, needle):
    pol = _policy(tmp_path, text)
    assert main(["gate", runs["run"], "--policy", pol, "--baseline", runs["run"]], monkeypatch) == 2
    err = _last_err(capsys)
    assert needle in err and pol in err


def test_gate_bad_paths_exit_2(runs, tmp_path, monkeypatch, capsys):
    good = _policy(tmp_path, {"thresholds": [{"probe": "a", "metric": "b", "max": 1}]})
    assert main(["gate", runs["run"], "--policy", tmp_path / "missing.yaml"], monkeypatch) == 2
    assert "cannot read policy" in _last_err(capsys)
    assert main(["gate", tmp_path / "norun", "--policy", good], monkeypatch) == 2
    assert "no summary.json" in _last_err(capsys)
    reg = _policy(tmp_path, {"regressions": [{"probe": "a", "metric": "b", "max_increase": 0}]}, "reg.yaml")
    assert main(["gate", runs["run"], "--policy", reg], monkeypatch) == 2
    assert "--baseline" in _last_err(capsys)
    assert main(["gate", runs["run"], "--policy", reg, "--baseline", tmp_path / "nobase"], monkeypatch) == 2
    assert "--baseline" in _last_err(capsys)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "summary.json").write_text(json.dumps({"schema_version": 3, "metrics": []}))
    assert main(["gate", odd, "--policy", good], monkeypatch) == 2
    assert "unsupported schema_version 3" in _last_err(capsys)


def _summary_dir(root, name, metrics):
    d = root / name
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"schema_version": 2, "run_id": name, "metrics": [
        {"probe": p, "metric": m, "value": v, "ci_low": None, "ci_high": None, "group": g, "n": 10,
         "dims": {"scope": "overall" if g is None else "breakdown"}}
        for p, m, g, v in metrics]}))
    return d


def test_gate_baseline_regressions(tmp_path, monkeypatch, capsys):
    base = _summary_dir(tmp_path, "base", [("counterfactual_bias", "flip_rate", "group", 0.10),
                                           ("counterfactual_bias", "flip_rate", "gender", 0.20),
                                           ("modality_ablation", "accuracy", None, 0.80)])
    cand = _summary_dir(tmp_path, "cand", [("counterfactual_bias", "flip_rate", "group", 0.30),
                                           ("counterfactual_bias", "flip_rate", "gender", 0.15),
                                           ("modality_ablation", "accuracy", None, 0.78)])
    strict = _policy(tmp_path, {"regressions": [
        {"probe": "counterfactual_bias", "metric": "flip_rate", "group": "*", "max_increase": 0.05},
        {"probe": "modality_ablation", "metric": "accuracy", "max_decrease": 0.01}]}, "strict.yaml")
    assert main(["gate", cand, "--policy", strict, "--baseline", base], monkeypatch) == 1
    out = capsys.readouterr().out
    assert "increased by 0.2 (> 0.05)" in out and "decreased by 0.02 (> 0.01)" in out
    assert re.search(r"PASS\s+regression\s+counterfactual_bias\.flip_rate\[gender\]", out)
    loose = _policy(tmp_path, {"regressions": [
        {"probe": "counterfactual_bias", "metric": "flip_rate", "group": "*", "max_increase": 0.5},
        {"probe": "modality_ablation", "metric": "accuracy", "max_decrease": 0.05}]}, "loose.yaml")
    assert main(["gate", cand, "--policy", loose, "--baseline", base], monkeypatch) == 0
    gone = _policy(tmp_path, {"regressions": [
        {"probe": "robustness", "metric": "flip_rate", "max_increase": 0.5}]}, "gone.yaml")
    assert main(["gate", cand, "--policy", gone, "--baseline", base], monkeypatch) == 1
    assert "probe 'robustness' has no metrics in the run" in capsys.readouterr().out


def test_gate_real_runs_against_parent(runs, tmp_path, monkeypatch, capsys):
    pol = _policy(tmp_path, {"regressions": [
        {"probe": "group_fairness", "metric": "accuracy_difference", "group": "*", "max_increase": 1.0,
         "max_decrease": 1.0}]})
    assert main(["gate", runs["child"], "--policy", pol, "--baseline", runs["run"]], monkeypatch) == 0
    assert "against baseline" in capsys.readouterr().out


def test_example_policies_work_as_documented(runs, monkeypatch, capsys):
    from audit.gate import load_policy

    example = ROOT / "docs" / "policy.example.yaml"
    regressions = ROOT / "docs" / "policy.regressions.example.yaml"
    policy = load_policy(example)
    assert policy.thresholds and not policy.regressions and policy.system.intended_use
    # the README's command, from the repository root: thresholds only, no --baseline needed; exit 0 or 1
    monkeypatch.chdir(ROOT)
    code = main(["gate", runs["run"], "--policy", "docs/policy.example.yaml"], monkeypatch)
    out = capsys.readouterr().out
    assert code == (1 if re.search(r"^FAIL\s+threshold", out, re.M) else 0)
    assert out.startswith("Thresholds (limits on this run's metric rows): ") and "Regressions (" not in out
    assert out.rstrip().splitlines()[-1].startswith(f"gate: {'FAIL' if code else 'PASS'} — run ")
    reg = load_policy(regressions)
    assert reg.regressions and not reg.thresholds
    assert "needs --baseline" in regressions.read_text().splitlines()[0] or \
           "--baseline" in "\n".join(regressions.read_text().splitlines()[:6])
    assert main(["gate", runs["child"], "--policy", regressions], monkeypatch) == 2
    assert "--baseline" in _last_err(capsys)
    assert main(["gate", runs["child"], "--policy", regressions, "--baseline", runs["run"]], monkeypatch) in (0, 1)
    assert "regression" in capsys.readouterr().out


def test_report_reads_store_runs_of_both_versions(runs, tmp_path):
    """The parent found through the store may be a version-1 run (its labels join the v2 run's)."""
    v1 = json.loads((ROOT / "tests" / "fixtures" / "run_v1" / "summary.json").read_text())
    store = tmp_path / "mixed.duckdb"
    Store(store).record_run(v1, pd.read_parquet(ROOT / "tests" / "fixtures" / "run_v1" / "results.parquet"),
                            run_dir=str(ROOT / "tests" / "fixtures" / "run_v1"))
    child = tmp_path / "child"
    hand_run(child, runs["data"], runs["model"], run_id="kid", seed=2, parent=v1["run_id"])
    doc = build_document(child, store=store)
    table = next(b for b in _section(doc, "mitigations")["blocks"] if b["type"] == "table")
    assert any(r[:3] == ["group_fairness", "accuracy_difference", "group"] for r in table["rows"])
