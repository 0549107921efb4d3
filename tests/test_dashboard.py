"""The Streamlit dashboard: every page on an empty store, on a store with real runs and on a
synthetic store with 10,000+ result rows; no torch import; untrusted strings inert; run ids
and image paths confined to the store and the data folder; loopback by default."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from audit import cli
from audit.store import Store

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "dashboard" / "app.py"
PAGES = [APP] + sorted(p for p in (ROOT / "dashboard" / "pages").glob("*.py") if not p.name.startswith("_"))
TITLES = {"app": "Runs & scorecard", "attention": "Attention explorer", "modality": "Modality reliance",
          "bias": "Bias explorer", "safety": "Safety", "privacy": "Privacy & defenses", "compare": "Run comparison"}
PAYLOAD = '<script>alert("pwned")</script>'
IMG_PAYLOAD = '<img src=x onerror=alert(1)>'
TIMEOUT = 120


def _app(page: Path, store: Path, **query):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(page), default_timeout=TIMEOUT)
    at.query_params.update(query)
    return at


def _run_page(page: Path, store: Path, monkeypatch, **query):
    monkeypatch.setenv("MMAUDIT_STORE", str(store))
    at = _app(page, store, **query)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title and at.title[0].value == TITLES[page.stem]
    return at


def _texts(at) -> str:
    return "\n".join(e.value for e in at.text)


# ------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def real_store(untrained_llava, small_data, tmp_path_factory):
    """Two real runs (the second names the first as parent) in one store."""
    from audit.adapters import load_adapter
    from audit.dataset import Dataset
    from audit.runner import RunSpec, run_audit

    root = tmp_path_factory.mktemp("dash")
    store = root / "store.duckdb"
    adapter, data = load_adapter(untrained_llava), Dataset.load(small_data).audit_split()
    probes = ["modality_ablation", "attention", "hallucination", "counterfactual_bias", "group_fairness"]
    first = run_audit(RunSpec(model=str(untrained_llava), data=str(small_data), probes=probes, out=str(root / "a"),
                              store=str(store), max_examples=8), adapter=adapter, data=data, progress=False,
                      log=lambda m: None)
    run_audit(RunSpec(model=str(untrained_llava), data=str(small_data), probes=["group_fairness", "counterfactual_bias"],
                      out=str(root / "b"), store=str(store), seed=1, max_examples=12, parent_run_id=first["run_id"]),
              adapter=adapter, data=data, progress=False, log=lambda m: None)
    return store


def _synthetic_run(run_id: str, data: Path, n_examples: int, *, evil: bool, parent: str | None = None):
    """A summary and 10,000+ long-form rows shaped like the real probes' output."""
    rng = np.random.default_rng(len(run_id))
    tag = PAYLOAD if evil else ""
    ids = [f"ex-{i:04d}{tag}" for i in range(n_examples)]
    rows = []
    for e in ids:
        rows += [("attention", "attention_heatmap", float(v), e, f"{k // 8},{k % 8}", "mean", "grid:8x8")
                 for k, v in enumerate(rng.random(64))]
        rows += [("attention", "image_attention_share", float(rng.random()), e, f"layer:{layer}",
                  f"language.blocks.{layer}.attn", f"head:{h}") for layer in range(2) for h in range(4)]
        rows += [("modality_ablation", "tv", float(rng.random()), e, "image", None, f"image:{k}")
                 for k in ("blank", "noise")]
    for s in range(n_examples // 2):
        a, b = ids[2 * s], ids[2 * s + 1]
        site, grp = f"cf-{s:03d}{tag}", f"group{tag}"
        rows += [("counterfactual_bias", "flip", float(s % 5 == 0), a, grp, site, None),
                 ("counterfactual_bias", "logprob_gap", float(rng.random()), a, grp, site, None),
                 ("counterfactual_bias", "pred_first", 1.0, a, grp, site, f"a{tag}"),
                 ("counterfactual_bias", "pred_first", float(s % 5 != 0), b, grp, site, "b"),
                 ("counterfactual_bias", "p_first", 0.7, a, grp, site, f"a{tag}"),
                 ("counterfactual_bias", "p_first", 0.4, b, grp, site, "b")]
    frame = pd.DataFrame(rows, columns=["probe", "metric", "value", "example_id", "group", "site", "variant"])

    def m(probe, metric, value, group=None, lo=None, hi=None):
        return {"probe": probe, "metric": metric, "value": value, "ci_low": lo, "ci_high": hi, "group": group,
                "n": n_examples}

    metrics = [m("modality_ablation", "image_reliance", 0.4, None, 0.3, 0.5),
               m("modality_ablation", "image_reliance", 0.5, "blank", 0.4, 0.6),
               m("modality_ablation", "accuracy", 0.8, "none", 0.7, 0.9),
               m("modality_ablation", "image_layer_curve", 0.3, "layer:0"),
               m("modality_ablation", "image_layer_curve", 0.1, "layer:1"),
               m("attention", "image_attention_share", 0.6, None, 0.5, 0.7),
               m("attention", "image_attention_share", 0.6, "layer:0"),
               m("counterfactual_bias", "flip_rate", 0.2, f"group{tag}", 0.1, 0.3),
               m("group_fairness", "accuracy", 0.7, f"group{tag}=a", 0.6, 0.8),
               m("group_fairness", "accuracy", 0.9, "group=b", 0.8, 1.0),
               m("group_fairness", "accuracy", 0.9, f"group=b&gender=x{tag}", 0.8, 1.0),
               m("group_fairness", "accuracy_difference", 0.2, f"group{tag}", 0.1, 0.3),
               m("hallucination", "pope_accuracy", 0.6, None, 0.5, 0.7),
               m("hallucination", "pope_accuracy", 0.5, "random", 0.4, 0.6),
               m("privacy_audit", "epsilon_theoretical", 4.0 if parent else 8.0),
               m("privacy_audit", "epsilon_lower_bound", 1.5 if parent else 3.0),
               m("privacy_audit", "mia_auc", 0.55)]
    summary = {"schema_version": 1, "run_id": run_id, "created": f"2026-01-0{1 + bool(parent)}T00:00:00+00:00",
               "model": {"path": f"/models/m{tag}", "architecture": f"llava{tag}", "sha256": "0" * 64},
               "data": {"path": str(data), "sha256": "1" * 64, "n": n_examples},
               "config": {"seed": 0, "probes": ["attention"]}, "environment": {"python": tag or "3.11"},
               "metrics": metrics,
               "findings": [{"probe": "hallucination", "severity": "warning",
                             "message": f"too many yes {IMG_PAYLOAD if evil else ''}"}]}
    return summary, frame, ids


def _data_folder(root: Path, ids: list[str], *, evil: bool) -> Path:
    data = root / "data"
    (data / "images").mkdir(parents=True)
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
    root = tmp_path_factory.mktemp("big")
    store = root / "store.duckdb"
    ids = [f"ex-{i:04d}" for i in range(150)]
    data = _data_folder(root, ids, evil=False)
    base, rows, _ = _synthetic_run("base000", data, 150, evil=False)
    Store(store).record_run(base, rows, run_dir=str(root / "base"))
    cand, rows2, _ = _synthetic_run("cand001", data, 150, evil=False, parent="base000")
    Store(store).record_run(cand, rows2, run_dir=str(root / "cand"), parent_run_id="base000")
    assert len(Store(store).rows("cand001")) > 10_000
    return store


@pytest.fixture(scope="module")
def evil_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("evil")
    store = root / "store.duckdb"
    ids = [f"ex-{i:04d}{PAYLOAD}" for i in range(6)]
    data = _data_folder(root, ids, evil=True)
    summary, rows, _ = _synthetic_run(f"evil{PAYLOAD}", data, 6, evil=True)
    Store(store).record_run(summary, rows, run_dir=str(root / "run"))
    return store


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_every_page_on_an_empty_store(page, tmp_path, monkeypatch):
    at = _run_page(page, tmp_path / "no-store.duckdb", monkeypatch)
    assert any("no runs yet" in e.value for e in at.info)
    assert not (tmp_path / "no-store.duckdb").exists()  # reading never creates the store


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_every_page_on_real_runs(page, real_store, monkeypatch):
    at = _run_page(page, real_store, monkeypatch)
    runs = Store(real_store).runs()
    assert at.sidebar.selectbox[0].value == runs.run_id.iloc[-1]  # the newest run by default
    if page.stem == "attention":
        # the first run has attention rows: pick it and see the image with its heatmap
        at.sidebar.selectbox[0].set_value(runs.run_id.iloc[0]).run()
        assert not at.exception and len(at.get("image")) >= 1
        assert "grid 8x8" in _texts(at)
        at.selectbox(key="attn_layer").set_value("layer 1").run()
        assert not at.exception
    if page.stem == "bias":
        assert "answer:" in _texts(at) and len(at.get("image")) >= 1  # a counterfactual pair with images
    if page.stem == "compare":
        assert "(its parent run)" in _texts(at)
    if page.stem == "app":
        assert len(at.dataframe) >= 3


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_every_page_stays_responsive_on_10k_rows(page, big_store, monkeypatch):
    t0 = time.perf_counter()
    at = _run_page(page, big_store, monkeypatch)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    at.run()  # a rerun (any widget change) hits the caches
    assert not at.exception
    assert first < 30 and time.perf_counter() - t0 < 10, (first, time.perf_counter() - t0)
    if page.stem == "privacy":
        assert len(at.get("plotly_chart")) >= 2  # ε vs utility and fairness vs utility over the runs


def test_dashboard_never_imports_torch(big_store):
    code = f"""
import os, sys
os.environ["MMAUDIT_STORE"] = {str(big_store)!r}
from streamlit.testing.v1 import AppTest
for page in {[str(p) for p in PAGES]!r}:
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
                 *PAGES[1:]]:
        src = path.read_text()
        code = re.sub(r'"""[\s\S]*?"""', "", src)  # docstrings may name what the code never does
        assert "unsafe_allow_html" not in code and "st.html" not in code and "components.v1" not in code, path
    seen = ""
    for page in PAGES:
        at = _run_page(page, evil_store, monkeypatch)
        for md in at.markdown:  # markdown is only used for our own labels, never for data
            assert not md.proto.allow_html
            assert PAYLOAD not in md.value and IMG_PAYLOAD not in md.value
        for kind in ("caption", "info", "warning", "error", "success", "subheader", "header"):
            for el in at.get(kind):
                assert "<script" not in str(getattr(el, "value", "")) and "onerror" not in str(getattr(el, "value", ""))
        seen += _texts(at)
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


def test_dashboard_command_binds_loopback_by_default(tmp_path, monkeypatch, capsys):
    from audit import publish_cli

    calls = []
    monkeypatch.setattr(publish_cli.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
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
