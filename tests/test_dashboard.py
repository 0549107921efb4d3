"""The Streamlit dashboard: every page on an empty store, on a store with real runs and on a
synthetic store with 10,000+ result rows (schema versions 1 and 2 side by side); pages and
their probes follow the catalog; no torch import; untrusted strings inert; run ids and
image paths confined to the store and the data folder; loopback by default."""
from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from audit import catalog, cli
from audit.catalog import PAGES, MetricSpec, ProbeSpec
from audit.schema import metric_records, metrics_frame, rows_frame
from audit.store import Store

# The report tests' hand-written runs (schema v2, computed from the data's own examples).
from test_report_gate import _real_run, hand_run, splice  # noqa: E402  (tests/ is on sys.path under pytest)

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "dashboard" / "app.py"
PAGE_FILES = [APP] + sorted(p for p in (ROOT / "dashboard" / "pages").glob("*.py") if not p.name.startswith("_"))
TITLES = {"app": "Runs & scorecard", "compare": "Run comparison", "samples": "Samples", **PAGES}
PAYLOAD = '<script>alert("pwned")</script>'
IMG_PAYLOAD = '<img src=x onerror=alert(1)>'
TIMEOUT = 120


def _app(page: Path, **query):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(page), default_timeout=TIMEOUT)
    at.query_params.update(query)
    return at


def _run_page(page: Path, store: Path, monkeypatch, **query):
    monkeypatch.setenv("MMAUDIT_STORE", str(store))
    at = _app(page, **query)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title and at.title[0].value == TITLES[page.stem]
    return at


def _texts(at) -> str:
    return "\n".join(e.value for e in at.text)


def _frames(at) -> list[pd.DataFrame]:
    return [d.value for d in at.dataframe]


def test_every_catalog_page_has_a_file():
    stems = {p.stem for p in PAGE_FILES}
    assert set(PAGES) <= stems and {"app", "compare"} <= stems


# ------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def real_store(untrained_llava, small_data, tmp_path_factory):
    """A real run (modality_ablation, attention with --log-samples, plus hand-written fairness and
    safety probes) and a hand-written second run that names the first as parent, in one store."""
    root = tmp_path_factory.mktemp("dash")
    store = root / "store.duckdb"
    _real_run(untrained_llava, small_data, root / "a", root / "scratch.duckdb",
              probes=["modality_ablation", "attention"], log_samples=True)
    first = splice(root / "a", small_data, seed=0, store=store)
    hand_run(root / "b", small_data, untrained_llava, run_id="zz-child", seed=1,
             probes=["group_fairness", "counterfactual_bias"], store=store, parent=first["run_id"])
    return store


def _synthetic_run(run_id: str, data: Path, n_examples: int, *, evil: bool, parent: str | None = None,
                   version: int = 2):
    """A summary and 10,000+ result rows shaped like the probes' output of schema `version`."""
    rng = np.random.default_rng(len(run_id))
    tag = PAYLOAD if evil else ""
    ids = [f"ex-{i:04d}{tag}" for i in range(n_examples)]
    grp = f"group{tag}"
    recs = []
    for e in ids:
        recs += [dict(probe="attention", metric="attention_heatmap", value=float(v), example_id=e,
                      group=f"{k // 8},{k % 8}", site="mean", variant="grid:8x8", grid_row=k // 8, grid_col=k % 8)
                 for k, v in enumerate(rng.random(64))]
        recs += [dict(probe="attention", metric="image_attention_share", value=float(rng.random()), example_id=e,
                      group=f"layer:{layer}", site=f"language.blocks.{layer}.attn", variant=f"head:{h}", layer=layer,
                      head=h) for layer in range(2) for h in range(4)]
        recs += [dict(probe="modality_ablation", metric="tv", value=float(rng.random()), example_id=e,
                      group="image", variant=f"image:{k}", modality="image") for k in ("blank", "noise")]
    for s in range(n_examples // 2):
        a, b = ids[2 * s], ids[2 * s + 1]
        cf = dict(probe="counterfactual_bias", group=grp, site=f"cf-{s:03d}{tag}", set_id=f"cf-{s:03d}{tag}",
                  attribute=grp)
        recs += [dict(cf, metric="flip", value=float(s % 5 == 0), example_id=a),
                 dict(cf, metric="logprob_gap", value=float(rng.random()), example_id=a),
                 dict(cf, metric="pred_first", value=1.0, example_id=a, variant=f"a{tag}", attribute_value=f"a{tag}"),
                 dict(cf, metric="pred_first", value=float(s % 5 != 0), example_id=b, variant="b", attribute_value="b"),
                 dict(cf, metric="p_first", value=0.7, example_id=a, variant=f"a{tag}", attribute_value=f"a{tag}"),
                 dict(cf, metric="p_first", value=0.4, example_id=b, variant="b", attribute_value="b")]
    if version == 1:  # the old layout: structure only in group / site / variant strings
        frame = pd.DataFrame([{k: r.get(k) for k in ("probe", "metric", "value", "example_id", "group", "site",
                                                     "variant")} for r in recs])
    else:
        v2 = []
        for r in recs:
            r = dict(r)
            if r["probe"] == "attention":
                r.pop("group")
                r["variant"] = "layer_head_mean" if r["metric"] == "attention_heatmap" else None
                r["site"] = r["site"] if r["metric"] != "attention_heatmap" else None
            elif r["probe"] == "modality_ablation":
                r.pop("group")
                r["variant"] = r["variant"].split(":")[1]
            else:
                r.pop("group")
                r.pop("site")
                r["variant"] = None
            v2.append(r)
        frame = rows_frame(v2)

    def m(probe, metric, value, group=None, lo=None, hi=None, **dims):
        return {"probe": probe, "metric": metric, "value": value, "ci_low": lo, "ci_high": hi, "group": group,
                "n": n_examples, **dims}

    metrics = [m("modality_ablation", "image_reliance", 0.4, None, 0.3, 0.5, scope="overall"),
               m("modality_ablation", "image_reliance", 0.5, "blank", 0.4, 0.6, variant="blank", modality="image"),
               m("modality_ablation", "accuracy", 0.8, "none", 0.7, 0.9, variant="none"),
               m("modality_ablation", "image_layer_curve", 0.3, "layer:0", layer=0),
               m("modality_ablation", "image_layer_curve", 0.1, "layer:1", layer=1),
               m("attention", "image_attention_share", 0.6, None, 0.5, 0.7, scope="overall"),
               m("attention", "image_attention_share", 0.6, "layer:0", layer=0),
               m("counterfactual_bias", "flip_rate", 0.2, grp, 0.1, 0.3, attribute=grp, scope="comparison"),
               m("group_fairness", "accuracy", 0.7, f"group{tag}=a", 0.6, 0.8, attribute="group",
                 attribute_value=f"a{tag}", scope="group"),
               m("group_fairness", "accuracy", 0.9, "group=b", 0.8, 1.0, attribute="group", attribute_value="b",
                 scope="group"),
               m("group_fairness", "accuracy", 0.9, f"group=b&gender=x{tag}", 0.8, 1.0, attribute="group",
                 attribute_value="b", attribute2="gender", attribute2_value=f"x{tag}", scope="intersection"),
               m("group_fairness", "accuracy_difference", 0.2, grp, 0.1, 0.3, attribute=grp, scope="comparison"),
               m("hallucination", "pope_accuracy", 0.6, None, 0.5, 0.7, scope="overall"),
               m("hallucination", "pope_accuracy", 0.5, "random", 0.4, 0.6, setting="random"),
               m("privacy_audit", "epsilon_theoretical", 4.0 if parent else 8.0, scope="overall"),
               m("privacy_audit", "epsilon_lower_bound", 1.5 if parent else 3.0, scope="overall"),
               m("privacy_audit", "mia_auc", 0.55, scope="overall")]
    if version == 1:
        metrics = [{k: x[k] for k in ("probe", "metric", "value", "ci_low", "ci_high", "group", "n")} for x in metrics]
    else:
        metrics = metric_records(metrics_frame([{**x, "scope": x.get("scope", "breakdown")} for x in metrics]))
    summary = {"schema_version": version, "run_id": run_id,
               "created": f"2026-01-0{1 + bool(parent) + (version == 2 and evil)}T00:00:00+00:00",
               "model": {"path": f"/models/m{tag}", "architecture": f"llava{tag}", "sha256": "0" * 64},
               "data": {"path": str(data), "sha256": "1" * 64, "n": n_examples},
               "config": {"seed": 0, "probes": ["attention"]}, "environment": {"python": tag or "3.11"},
               "metrics": metrics,
               "findings": [{"probe": "hallucination", "severity": "warning",
                             "message": f"too many yes {IMG_PAYLOAD if evil else ''}"}]}
    return summary, frame, ids


def _data_folder(root: Path, ids: list[str], *, evil: bool) -> Path:
    data = root / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (20, 120, 220)).save(data / "images" / "img.png")
    Image.new("RGB", (32, 32), (201, 7, 99)).save(root / "outside.png")
    lines = []
    for i, e in enumerate(ids):
        image = "../outside.png" if evil and i == 1 else "images/img.png"
        lines.append(json.dumps({"id": e, "image": image, "prompt": f"prompt {IMG_PAYLOAD if evil else i}",
                                 "choices": ["a", "b"], "answer": "a"}))
    (data / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return data


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """A version-1 run (recorded as the current store records it: typed row columns empty) and its
    version-2 child, each with 10,000+ result rows."""
    root = tmp_path_factory.mktemp("big")
    store = root / "store.duckdb"
    ids = [f"ex-{i:04d}" for i in range(150)]
    data = _data_folder(root, ids, evil=False)
    base, rows, _ = _synthetic_run("base000", data, 150, evil=False, version=1)
    Store(store).record_run(base, rows, run_dir=str(root / "base"))
    cand, rows2, _ = _synthetic_run("cand001", data, 150, evil=False, parent="base000")
    Store(store).record_run(cand, rows2, run_dir=str(root / "cand"), parent_run_id="base000")
    assert len(Store(store).rows("cand001")) > 10_000 and len(Store(store).rows("base000")) > 10_000
    return store


def _transcript(ids: list[str], *, prompt: str = "what is it?", probe: str = "modality_ablation") -> pd.DataFrame:
    """samples.parquet rows as `--log-samples` writes them: each example intact and with a blank image."""
    from audit.samples import samples_frame

    recs = []
    for i, e in enumerate(ids):
        for variant, scores in (("none", [-0.2, -1.9]), ("image:blank", [-1.2 - i % 2, -0.4])):
            recs.append({"probe": probe, "example_id": e, "variant": variant, "call": "score", "prompt": prompt,
                         "rendered_prompt": f"user : <image> {prompt} assistant :", "image_sha256": "ab12" * 4,
                         "candidates": json.dumps(["a", "b"]), "scores": scores,
                         "predicted": "a" if scores[0] > scores[1] else "b", "generated": None})
    return samples_frame(recs)


@pytest.fixture(scope="module")
def evil_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("evil")
    store = root / "store.duckdb"
    ids = [f"ex-{i:04d}{PAYLOAD}" for i in range(6)]
    data = _data_folder(root, ids, evil=True)
    for version in (1, 2):
        summary, rows, _ = _synthetic_run(f"evil{version}{PAYLOAD}", data, 6, evil=True, version=version)
        (root / f"run{version}").mkdir()
        _transcript(ids, prompt=f"{PAYLOAD} {IMG_PAYLOAD}").to_parquet(root / f"run{version}" / "samples.parquet")
        Store(store).record_run(summary, rows, run_dir=str(root / f"run{version}"))
    return store


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("page", PAGE_FILES, ids=lambda p: p.stem)
def test_every_page_on_an_empty_store(page, tmp_path, monkeypatch):
    at = _run_page(page, tmp_path / "no-store.duckdb", monkeypatch)
    assert any("no runs yet" in e.value for e in at.info)
    assert not (tmp_path / "no-store.duckdb").exists()  # reading never creates the store


@pytest.mark.parametrize("page", PAGE_FILES, ids=lambda p: p.stem)
def test_every_page_on_real_runs(page, real_store, monkeypatch):
    at = _run_page(page, real_store, monkeypatch)
    runs = Store(real_store).runs()
    assert at.sidebar.selectbox[0].value == runs.run_id.iloc[-1]  # the newest run by default
    if page.stem == "attention":
        # the first run has attention rows: pick it and see the image with its heatmap
        at.sidebar.selectbox[0].set_value(runs.run_id.iloc[0]).run()
        assert not at.exception and len(at.get("image")) >= 1
        assert "grid 8x8" in _texts(at)
        assert "Attention to the image" in [h.value for h in at.subheader]
        at.selectbox(key="attn_layer").set_value("layer 1").run()
        assert not at.exception and "mean over the selected heads" in _texts(at)
    if page.stem == "bias":
        text = _texts(at)
        assert "example:" in text and "choice_logprob[" in text and len(at.get("image")) >= 1
        assert set(at.selectbox(key="bias_attr").options) >= {"group", "gender_word"}  # typed `attribute`
    if page.stem == "modality":
        at.sidebar.selectbox[0].set_value(runs.run_id.iloc[0]).run()
        assert "Modality ablation" in [h.value for h in at.subheader]
        at.selectbox(key="mod_metric").set_value("tv").run()
        assert not at.exception and "image · blank" in at.multiselect(key="mod_ablations").options
    if page.stem == "safety":
        at.sidebar.selectbox[0].set_value(runs.run_id.iloc[0]).run()
        assert "Object hallucination (POPE)" in [h.value for h in at.subheader]
    if page.stem == "compare":
        assert "(its parent run)" in _texts(at)
        assert all(c.value.startswith("What this means: ") for c in at.caption[:len(at.get("plotly_chart"))])
    if page.stem == "app":
        assert len(at.dataframe) >= 3
    if page.stem == "samples":
        assert any("has no samples.parquet" in i.value for i in at.info)  # the hand-written child run has none
        at.sidebar.selectbox[0].set_value(runs.run_id.iloc[0]).run()
        assert not at.exception and "Modality ablation (modality_ablation)" in at.selectbox(key="smp_probe").options
        at.selectbox(key="smp_probe").set_value("modality_ablation").run()
        assert not at.exception and len(at.get("image")) == 1 and at.code[0].value.strip()
        assert list(_frames(at)[-1].columns) == ["candidate", "score", "share (softmax over candidates)",
                                                  "predicted"]


@pytest.mark.parametrize("page", PAGE_FILES, ids=lambda p: p.stem)
def test_every_page_on_10k_rows_of_both_versions(page, big_store, monkeypatch):
    for run_id in ("base000", "cand001"):  # version 1 and version 2
        at = _run_page(page, big_store, monkeypatch, run=run_id)
        assert at.sidebar.selectbox[0].value == run_id
        at.run()  # a rerun (any widget change) hits the caches
        assert not at.exception
        if page.stem == "attention":
            # layers and heads come from typed columns in both versions (v1: derived from site/variant)
            assert at.selectbox(key="attn_layer").options == ["all layers", "layer 0", "layer 1"]
            assert "grid 8x8" in _texts(at)
        if page.stem == "bias":
            assert "group" in at.selectbox(key="bias_attr").options
        if page.stem == "privacy":
            assert len(at.get("plotly_chart")) >= 2  # ε vs utility and fairness vs utility over the runs
        monkeypatch.delenv("MMAUDIT_STORE")


def test_dashboard_never_imports_torch(big_store):
    code = f"""
import os, sys
os.environ["MMAUDIT_STORE"] = {str(big_store)!r}
from streamlit.testing.v1 import AppTest
for page in {[str(p) for p in PAGE_FILES]!r}:
    at = AppTest.from_file(page, default_timeout=120)
    at.run()
    assert not at.exception, (page, [e.value for e in at.exception])
import dashboard.data, dashboard.ui
print("torch" in sys.modules, "transformers" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "False"]


def test_untrusted_strings_are_never_rendered_as_html(evil_store, monkeypatch):
    for path in [ROOT / "dashboard" / "app.py", ROOT / "dashboard" / "ui.py", ROOT / "dashboard" / "data.py",
                 *PAGE_FILES[1:]]:
        src = path.read_text()
        code = re.sub(r'"""[\s\S]*?"""', "", src)  # docstrings may name what the code never does
        assert "unsafe_allow_html" not in code and "st.html" not in code and "components.v1" not in code, path
    seen = ""
    for run_id in Store(evil_store).runs().run_id:
        for page in PAGE_FILES:
            at = _run_page(page, evil_store, monkeypatch, run=run_id)
            assert at.sidebar.selectbox[0].value == run_id
            for md in at.markdown:  # markdown is only used for our own labels, never for data
                assert not md.proto.allow_html
                assert PAYLOAD not in md.value and IMG_PAYLOAD not in md.value
            for kind in ("caption", "info", "warning", "error", "success", "subheader", "header"):
                for el in at.get(kind):
                    value = str(getattr(el, "value", ""))
                    assert "<script" not in value and "onerror" not in value
            seen += _texts(at)
            monkeypatch.delenv("MMAUDIT_STORE")
    assert PAYLOAD in seen  # shown, as plain text


def test_run_selection_and_images_stay_inside_the_store(big_store, evil_store, monkeypatch):
    from dashboard import data

    key = data.stamp(str(big_store))
    assert data.run_row(str(big_store), key, "../../etc/passwd") is None
    assert data.run_row(str(big_store), key, "cand001")["data_path"].endswith("data")
    # a ?run= link that is not a stored run id is ignored (the newest run stays selected)
    at = _run_page(APP, big_store, monkeypatch, run="../../../../etc/passwd")
    assert at.sidebar.selectbox[0].value == "cand001"
    at = _run_page(APP, big_store, monkeypatch, run="base000")
    assert at.sidebar.selectbox[0].value == "base000"
    # the evil manifest names ../outside.png for its second example: refused, no image
    row = Store(evil_store).runs().iloc[0]
    ids = Store(evil_store).rows(row.run_id, probe="attention").example_id.unique()
    assert data.image(row.data_path, ids[0]) is not None
    assert data.image(row.data_path, ids[1]) is None


def _one_run_store(root: Path, *, run_dir: Path, findings=(), data: Path | None = None, ids=("ex-0000",),
                   store: Path | None = None) -> Path:
    """A store holding one hand-made run recorded with `run_dir` as its run folder."""
    root.mkdir(parents=True, exist_ok=True)
    data = data or _data_folder(root, list(ids), evil=False)
    summary, rows, _ = _synthetic_run("one00001", data, len(ids), evil=False)
    summary["findings"] = list(findings)
    store = store or root / "one.duckdb"
    Store(store).record_run(summary, rows, run_dir=str(run_dir))
    return store


def test_sample_viewer_filters_and_shows_one_query(tmp_path, monkeypatch):
    ids = ["ex-0000", "ex-0001", "ex-0002"]
    data = _data_folder(tmp_path, ids, evil=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    frame = pd.concat([_transcript(ids), _transcript(ids[:1], probe="robustness")], ignore_index=True)
    frame.to_parquet(run_dir / "samples.parquet")
    store = _one_run_store(tmp_path, run_dir=run_dir, data=data, ids=ids)
    # a link from the report preselects the probe and the example (both checked against the options)
    at = _run_page(ROOT / "dashboard" / "pages" / "samples.py", store, monkeypatch, run="one00001",
                   probe="modality_ablation", example="ex-0001")
    assert at.selectbox(key="smp_probe").options == ["Modality ablation (modality_ablation)",
                                                     "Robustness to image perturbations (robustness)"]
    assert at.selectbox(key="smp_probe").value == "modality_ablation"
    assert at.selectbox(key="smp_example").value == "ex-0001"
    assert at.multiselect(key="smp_variants").options == ["image:blank", "none"]
    listed = _frames(at)[0]
    assert set(listed.example_id) == {"ex-0001"} and listed.variant.tolist() == ["image:blank", "none"]
    assert "answer changed under image:blank: a -> b" in listed.why.tolist()  # the worst query first
    assert at.code[0].value == "user : <image> what is it? assistant :"  # the rendered prompt
    cands = _frames(at)[1]
    assert cands.candidate.tolist() == ["a", "b"] and cands.score.tolist() == [-1.2 - 1, -0.4]
    assert cands.predicted.tolist() == [False, True]
    text = _texts(at)
    assert "predicted answer: b" in text and "reference answer: a" in text and "answer on the intact input: a" in text
    assert len(at.get("image")) == 1  # the example's image, from the data folder
    at.multiselect(key="smp_variants").set_value(["none"]).run()
    assert not at.exception and _frames(at)[0].variant.tolist() == ["none"]
    at.selectbox(key="smp_example").set_value("(all examples)").run()
    assert not at.exception and set(_frames(at)[0].example_id) == set(ids)
    monkeypatch.delenv("MMAUDIT_STORE")
    # a probe or example the run does not have is ignored, not used
    at = _run_page(ROOT / "dashboard" / "pages" / "samples.py", store, monkeypatch, probe="../../etc/passwd",
                   example="nope")
    assert at.selectbox(key="smp_probe").value == "modality_ablation"
    assert at.selectbox(key="smp_example").value == "(all examples)"


def test_sample_viewer_reads_only_the_recorded_run_folder(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _transcript(["ex-0000"], prompt="SECRET PROMPT").to_parquet(elsewhere / "samples.parquet")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "samples.parquet").symlink_to(elsewhere / "samples.parquet")  # leaves the run folder
    page = ROOT / "dashboard" / "pages" / "samples.py"
    for store in (_one_run_store(tmp_path, run_dir=run_dir),
                  _one_run_store(tmp_path / "gone", run_dir=tmp_path / "no-such-run")):
        at = _run_page(page, store, monkeypatch)
        assert any("has no samples.parquet" in i.value for i in at.info)
        assert "SECRET PROMPT" not in _texts(at) + " ".join(c.value for c in at.code)
        monkeypatch.delenv("MMAUDIT_STORE")


def test_findings_and_sidebar_are_never_cut_off(tmp_path, monkeypatch):
    long = "the model answers 'yes' to 12.5% of presence questions " + "; ".join(f"detail {i}" for i in range(80))
    store_dir = tmp_path / ("a-rather-long-folder-name-for-the-store-" * 3)
    store_dir.mkdir()
    run_dir = tmp_path / "run"
    store = _one_run_store(tmp_path, run_dir=run_dir, store=store_dir / "store.duckdb", findings=[
        {"probe": "hallucination", "severity": "warning", "message": long},
        {"probe": "counterfactual_bias", "severity": "fail", "message": "answers depend on 'group'"}])
    for page in (APP, ROOT / "dashboard" / "pages" / "safety.py"):
        at = _run_page(page, store, monkeypatch)
        shown = [t.value for t in at.text]
        assert f"WARNING · hallucination: {long}" in shown  # the whole message, as wrapping text
        assert all(long not in str(df.to_dict()) for df in _frames(at))  # not in a table cell that cuts it off
        codes = [c for c in at.sidebar.code]
        assert codes[0].value == str(store) and codes[0].proto.wrap_lines  # the whole store path, wrapped
        assert codes[1].value.startswith("one00001 · 2026-01-01T00:00:00 · llava") and codes[1].proto.wrap_lines
        assert f"run folder {run_dir}" in codes[1].value
        monkeypatch.delenv("MMAUDIT_STORE")
    at = _run_page(APP, store, monkeypatch)
    listed = [t.value for t in at.text if t.value.startswith(("FAIL ·", "WARNING ·"))]
    assert listed[0] == "FAIL · counterfactual_bias: answers depend on 'group'"  # worst first


def test_scorecard_shows_the_models_provenance_and_examples_per_probe(tmp_path, monkeypatch):
    ids = ["ex-0000"]
    data = _data_folder(tmp_path, ids, evil=False)
    summary, rows, _ = _synthetic_run("prov0001", data, 1, evil=False)
    summary["model"].update(hub_id="org/tiny", revision="main", commit="c" * 40, trust_remote_code=True)
    summary["environment"]["model_git_revision"] = "0123456789abcdef0123"
    summary["probes"] = {"attention": {"status": "ok", "examples": 24, "selected": 577, "units": 1}}
    summary["config"]["max_examples"] = 24
    store = tmp_path / "s.duckdb"
    Store(store).record_run(summary, rows, run_dir=str(tmp_path / "run"))
    at = _run_page(APP, store, monkeypatch)
    frames = _frames(at)
    prov = next(f for f in frames if "field" in f.columns and "Hugging Face Hub id" in set(f.field))
    assert dict(zip(prov.field, prov.value))["Hub commit resolved"] == "c" * 40
    assert any("trust_remote_code" in w.value for w in at.warning)
    counts = next(f for f in frames if "examples audited" in f.columns)
    assert counts.to_dict("records")[0]["examples that fit"] == 577
    assert "capped by --max-examples 24" in _texts(at)
    everything = _texts(at) + str([f.to_dict() for f in frames]) + str([j.value for j in at.json])
    assert "0123456789abcdef0123" not in everything and "model_git_revision" not in everything


def test_a_new_catalog_probe_appears_in_its_report_section_and_dashboard_page(tmp_path, monkeypatch):
    """Registering a spec is all it takes: no edit in the report or the dashboard."""
    from audit.report import build_document

    spec = ProbeSpec(name="zz_glare", title="Glare sensitivity (throwaway)", category="safety",
                     description="Share of answers that change under simulated lens glare.", citation="Nobody 2026",
                     section="safety", page="safety",
                     metrics=(MetricSpec("glare_flip_rate", "Glare flip rate", "Share of answers that change when "
                                         "glare is added; 0 means glare changes nothing.", "lower",
                                         dims=("strength",), headline=True),))
    catalog.register_spec(spec)
    try:
        recs = [dict(probe="zz_glare", metric="glare_flip_rate", value=0.25, ci_low=0.1, ci_high=0.4, n=40,
                     scope="overall"),
                *(dict(probe="zz_glare", metric="glare_flip_rate", value=v, ci_low=0.0, ci_high=0.5, n=40,
                       group=f"glare:{s}", perturbation="glare", strength=s, scope="breakdown")
                  for s, v in ((0.1, 0.1), (0.5, 0.4)))]
        summary = {"schema_version": 2, "run_id": "glare01", "created": "2026-03-01T00:00:00+00:00",
                   "model": {"path": str(tmp_path / "gone-model"), "architecture": "llava", "sha256": "0" * 64},
                   "data": {"path": str(tmp_path / "gone-data"), "sha256": "1" * 64, "n": 40},
                   "config": {"probes": ["zz_glare"], "seed": 0}, "environment": {},
                   "probes": {"zz_glare": {"status": "ok", "examples": 40}},
                   "metrics": metric_records(metrics_frame(recs)), "findings": []}
        run = tmp_path / "run"
        run.mkdir()
        (run / "summary.json").write_text(json.dumps(summary))
        rows_frame([]).to_parquet(run / "results.parquet")
        doc = build_document(run, store=tmp_path / "none.duckdb")
        safety = next(s for s in doc["sections"] if s["id"] == "safety")
        text = json.dumps(safety)
        assert safety["status"] == "complete" and "Glare sensitivity (throwaway) (zz_glare)" in text
        assert "Glare flip rate" in text and "0 means glare changes nothing" in text and "glare 0.5" in text
        assert "zz_glare" not in json.dumps([s for s in doc["sections"] if s["id"] in ("fairness", "privacy")])
        store = tmp_path / "store.duckdb"
        Store(store).record_run(summary, rows_frame([]), run_dir=str(run))
        at = _run_page(ROOT / "dashboard" / "pages" / "safety.py", store, monkeypatch)
        assert "Glare sensitivity (throwaway)" in [h.value for h in at.subheader]
        shown = pd.concat(_frames(at))
        assert "Glare flip rate" in set(shown.measure)
        assert any("0 means glare changes nothing" in c.value for c in at.caption)
        monkeypatch.delenv("MMAUDIT_STORE")
        other = _run_page(ROOT / "dashboard" / "pages" / "bias.py", store, monkeypatch)
        assert "Glare sensitivity (throwaway)" not in [h.value for h in other.subheader]
    finally:
        catalog._EXTRA.pop("zz_glare", None)


def test_dashboard_command_binds_loopback_by_default(tmp_path, monkeypatch, capsys):
    from audit import publish_cli

    calls = []
    monkeypatch.setattr(publish_cli, "_supervise", lambda cmd, env: calls.append((cmd, env)) or 0)
    monkeypatch.setattr(cli, "COMMAND_MODULES", tuple(dict.fromkeys((*cli.COMMAND_MODULES, "audit.publish_cli"))))
    assert cli.main(["dashboard", "--store", str(tmp_path / "s.duckdb")]) == 0
    cmd, env = calls[-1]
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == str(APP)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.port") + 1] == "8501"
    assert cmd[cmd.index("--server.headless") + 1] == "true"
    assert env["MMAUDIT_STORE"] == str((tmp_path / "s.duckdb").resolve())
    assert cli.main(["dashboard", "--store", str(tmp_path / "s.duckdb"), "--host", "0.0.0.0", "--port", "9000"]) == 0
    cmd, _ = calls[-1]
    assert cmd[cmd.index("--server.address") + 1] == "0.0.0.0"
    assert "no authentication" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["dashboard", "--port", "70000"])
    assert exc.value.code == 2
    assert cli.main(["dashboard", "--store", str(tmp_path)]) == 2  # a folder is not a store


def _children_of(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out |= {int(x) for x in (task / "children").read_text().split()}
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_dashboard_by_pid_stops_streamlit_too(tmp_path, sig):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "audit", "dashboard", "--store", str(tmp_path / "s.duckdb"),
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):  # wait for the server to answer (a hang guard, not a timing assertion)
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the dashboard never answered")
        children = _children_of(proc.pid)
        assert children, "streamlit runs as a child process"
        proc.send_signal(sig)
        proc.wait(timeout=60)
        for _ in range(60):
            if not any(_alive(c) for c in children):
                break
            time.sleep(0.5)
        assert not any(_alive(c) for c in children), "streamlit outlived the dashboard command"
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
