"""`mmaudit report` (HTML, JSON, PDF) and `mmaudit gate`: every section present, self-contained
HTML, JSON round trip, PDF pages, missing probes said in place, untrusted strings inert,
image paths confined to the data folder, gate exit codes 0/1/2 and baseline regressions."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import pandas as pd
import pytest
import yaml
from PIL import Image

from audit import cli
from audit.errors import InputError
from audit.report import build_document, build_report
from audit.report.assets import UnsafePath, example_image, resolve_image
from audit.report.build import SECTION_IDS
from audit.report.render import ERR_NO_CHROMIUM, find_chromium, render_html, render_json

PROBES = ["modality_ablation", "attention", "hallucination", "counterfactual_bias", "group_fairness"]
PAYLOAD = '<script>alert("pwned")</script>'
IMG_PAYLOAD = '<img src=x onerror=alert(1)>'


# --------------------------------------------------------------------------- fixtures
def _run(model, data, out, store, *, probes, seed=0, max_examples=8, parent=None):
    from audit.adapters import load_adapter
    from audit.dataset import Dataset
    from audit.runner import RunSpec, run_audit

    spec = RunSpec(model=str(model), data=str(data), probes=list(probes), out=str(out), seed=seed, store=str(store),
                   max_examples=max_examples, parent_run_id=parent)
    return run_audit(spec, adapter=load_adapter(model), data=Dataset.load(data).audit_split(), progress=False,
                     log=lambda m: None)


@pytest.fixture(scope="module")
def runs(untrained_llava, small_data, tmp_path_factory):
    """A real run of five probes, and a child run (two probes) that names it as parent."""
    root = tmp_path_factory.mktemp("report")
    store = root / "store.duckdb"
    parent = _run(untrained_llava, small_data, root / "run", store, probes=PROBES)
    child = _run(untrained_llava, small_data, root / "child", store, probes=["group_fairness", "counterfactual_bias"],
                 seed=1, max_examples=12, parent=parent["run_id"])
    return {"root": root, "store": store, "run": root / "run", "child": root / "child", "parent": parent,
            "child_summary": child}


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
                  "Data governance and bias examination", "Evaluation protocol", "Fairness results",
                  "Accuracy, robustness and safety", "Interpretability and modality reliance", "Mitigations",
                  "Privacy", "User-set targets", "Limitations", "Integrity manifest (SHA-256)",
                  "Regulatory and documentation mapping"):
        assert title in page
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
    # evidence that needs the data folder: counterfactual pairs and heatmap overlays as PNG data URLs
    assert page.count("data:image/png;base64,") >= 6
    assert "attention heatmaps" in page and "Counterfactual sets with the largest effect" in page
    for ref in ("Art. 10(2)(f)", "Art. 13(3)(b)(v)", "Art. 15(5)", "Annex IV(2)(g)", "Art. 55(1)(a)",
                "MEASURE 2.11", "MEASURE 2.10", "Quantitative Analyses", "Caveats and Recommendations"):
        assert ref in page
    # the integrity manifest hashes model, data and run files, and re-checks the recorded fingerprints
    doc = json.loads(render_json(build_document(runs["run"], store=runs["store"])))
    integ = doc["integrity"]
    assert integ["model_check"] == integ["data_check"] == "unchanged since the audit"
    kinds = {f["kind"] for f in integ["files"]}
    assert kinds == {"model", "data", "run"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", f["sha256"]) for f in integ["files"])


def test_json_round_trips(runs, monkeypatch):
    assert main(["report", runs["run"], "--format", "json", "--out", runs["root"] / "r.json"], monkeypatch) == 0
    loaded = json.loads((runs["root"] / "r.json").read_text())
    fresh = build_document(runs["run"])
    assert _strip_volatile(loaded) == _strip_volatile(json.loads(json.dumps(fresh)))
    assert loaded["schema_version"] == 1 and loaded["kind"] == "mmaudit-report"
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
    assert "No interpretability probe produced results" in text
    assert "privacy_audit" in json.dumps(_section(doc, "privacy"))
    mit = _section(doc, "mitigations")
    assert mit["status"] == "complete"
    table = next(b for b in mit["blocks"] if b["type"] == "table")
    assert table["columns"][:6] == ["probe", "metric", "group", "before", "after", "after − before"]
    row = next(r for r in table["rows"] if r[0] == "group_fairness" and r[1] == "accuracy_difference" and r[2] == "group")
    before = next(m["value"] for m in runs["parent"]["metrics"]
                  if (m["probe"], m["metric"], m["group"]) == ("group_fairness", "accuracy_difference", "group"))
    after = next(m["value"] for m in runs["child_summary"]["metrics"]
                 if (m["probe"], m["metric"], m["group"]) == ("group_fairness", "accuracy_difference", "group"))
    assert row[3] == pytest.approx(before) and row[4] == pytest.approx(after) and row[5] == pytest.approx(after - before)
    # without the store the parent cannot be found: said, not failed
    alone = build_document(runs["child"], store=runs["root"] / "elsewhere.duckdb")
    assert _section(alone, "mitigations")["status"] == "missing"
    # an explicit --baseline works without any store
    explicit = build_document(runs["child"], baseline=runs["run"], store=runs["root"] / "elsewhere.duckdb")
    assert _section(explicit, "mitigations")["status"] == "complete"


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
    summary["metrics"] += [{"probe": "privacy_audit", "metric": m, "value": v, "ci_low": None, "ci_high": None,
                            "group": None, "n": 64}
                           for m, v in (("epsilon_lower_bound", 9.0), ("mia_auc", 0.61), ("tpr_at_1pct_fpr", 0.05))]
    (run / "summary.json").write_text(json.dumps(summary))
    doc = build_document(run, store=tmp_path / "none.duckdb")
    priv = _section(doc, "privacy")
    text = json.dumps(priv, ensure_ascii=False)
    assert priv["status"] == "partial" and "exceeds the theoretical" in text  # 9.0 > 7.5 from the DP record
    assert "ε theoretical (upper bound)" in text and "7.5" in text and "0.61" in text
    mit = json.dumps(_section(doc, "mitigations"), ensure_ascii=False)
    assert "Defense record" in mit and "utility before and after" in mit
    # the model folder is not the one audited: the integrity manifest says so
    assert "CHANGED" in _section(doc, "manifest")["blocks"][0]["items"][3][1]


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
    assert "Declared by the provider: synthetic scenes only" in json.dumps(_section(doc, "limitations"))


def test_report_bad_input_exits_2(tmp_path, monkeypatch, capsys):
    assert main(["report", tmp_path, "--format", "html"], monkeypatch) == 2
    assert "no summary.json" in _last_err(capsys)
    with pytest.raises(SystemExit) as exc:
        main(["report", tmp_path, "--format", "docx"], monkeypatch)
    assert exc.value.code == 2 and "--format" in _last_err(capsys)


def _pdf_pages(pdf: bytes, path) -> int:
    if shutil.which("pdfinfo"):
        out = subprocess.run(["pdfinfo", str(path)], capture_output=True, text=True, check=True).stdout
        return int(re.search(r"^Pages:\s+(\d+)", out, re.M).group(1))
    return len(re.findall(rb"/Type\s*/Page\b", pdf))


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install -y chromium); "
                                                    "the pdf format needs it")
def test_pdf_is_printed_with_one_page_break_per_section(runs, monkeypatch):
    out = runs["root"] / "report.pdf"
    assert main(["report", runs["run"], "--format", "pdf", "--out", out, "--store", runs["store"]], monkeypatch) == 0
    pdf = out.read_bytes()
    assert pdf[:5] == b"%PDF-"
    pages = _pdf_pages(pdf, out)
    # the cover page, then every section starts on a new page (print CSS), long ones take more
    assert len(SECTION_IDS) + 1 <= pages <= 4 * (len(SECTION_IDS) + 1)
    if shutil.which("pdftotext"):
        text = subprocess.run(["pdftotext", "-layout", str(out), "-"], capture_output=True, text=True).stdout
        for title in ("Fairness results", "Interpretability and modality reliance", "Integrity manifest"):
            assert title in text


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


def _evil_run(root):
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
    run = root / "run"
    run.mkdir()
    rows = [("attention", "attention_heatmap", 0.1 * k, evil_id, f"{k // 2},{k % 2}", "mean", "grid:2x2") for k in range(4)]
    rows += [("attention", "attention_heatmap", 0.2 * k, "ex-2", f"{k // 2},{k % 2}", "mean", "grid:2x2") for k in range(4)]
    rows += [("counterfactual_bias", "flip", 1.0, evil_id, PAYLOAD, f"set{PAYLOAD}", None),
             ("counterfactual_bias", "logprob_gap", 0.5, evil_id, PAYLOAD, f"set{PAYLOAD}", None),
             ("counterfactual_bias", "pred_first", 1.0, evil_id, PAYLOAD, f"set{PAYLOAD}", PAYLOAD),
             ("counterfactual_bias", "pred_first", 0.0, "ex-2", PAYLOAD, f"set{PAYLOAD}", "b")]
    pd.DataFrame(rows, columns=["probe", "metric", "value", "example_id", "group", "site", "variant"]).to_parquet(
        run / "results.parquet")
    metric = {"probe": "counterfactual_bias", "metric": "flip_rate", "value": 1.0, "ci_low": 1.0, "ci_high": 1.0,
              "group": PAYLOAD, "n": 1}
    summary = {"schema_version": 1, "run_id": f"r{PAYLOAD}", "created": "2026-01-01T00:00:00+00:00",
               "model": {"path": f"/nowhere/{PAYLOAD}", "architecture": IMG_PAYLOAD, "sha256": "0" * 64},
               "data": {"path": str(data), "sha256": "1" * 64, "n": 2},
               "config": {"probes": ["attention", "counterfactual_bias", PAYLOAD], "seed": 0},
               "environment": {"python": PAYLOAD, "device": "cpu"},
               "metrics": [metric, {**metric, "probe": "attention", "metric": "image_attention_share", "group": None},
                           {**metric, "probe": "group_fairness", "metric": "accuracy", "group": f"group={PAYLOAD}"},
                           {**metric, "probe": "group_fairness", "metric": "accuracy", "group": "group=b"}],
               "findings": [{"probe": "counterfactual_bias", "severity": "warning", "message": f"bad {IMG_PAYLOAD}"}]}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_untrusted_strings_stay_inert_in_the_report(tmp_path):
    run = _evil_run(tmp_path)
    page = build_report(run, "html").read_text()
    for payload in (PAYLOAD, IMG_PAYLOAD, "<script>alert", "onerror=alert(1)>"):
        assert payload not in page
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in page or \
           "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/<wbr>script&gt;" in page
    # every <script> element is ours (nonce) and none was opened by data
    scripts = re.findall(r"<script[^>]*>", page)
    assert all('nonce="' in s for s in scripts)
    assert page.count("Plotly.newPlot(") >= 1  # the per-group figure carries hostile labels
    assert len(scripts) == 1 + page.count("Plotly.newPlot(")
    # the image outside the data folder was refused: only in-folder images are embedded
    outside = io.BytesIO()
    Image.open(tmp_path / "outside.png").convert("RGB").save(outside, format="PNG")
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
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


@pytest.mark.parametrize("text, needle", [
    ("thresholds: [", "not valid YAML at line"),
    ("- just\n- a list\n", "must be a mapping"),
    ("thresholds:\n  - probe: a\n    metric: b\n    maxx: 1\n", "line 4: field 'thresholds[0].maxx': Extra inputs"),
    ("thresholds:\n  - {probe: a, metric: b}\n", "field 'thresholds[0]': give 'min', 'max' or both"),
    ("thresholds:\n  - {probe: a, metric: b, min: 2, max: 1}\n", "'min' (2.0) is greater than 'max' (1.0)"),
    ("thresholds:\n  - {probe: a, metric: b, max: lots}\n", "field 'thresholds[0].max': Input should be a valid number"),
    ("regressions:\n  - {probe: a, metric: b, max_increase: -1}\n", "field 'regressions[0].max_increase'"),
    ("version: 2\nthresholds: []\n", "field 'version'"),
    ("thresholds: []\n", "no 'thresholds' and no 'regressions'"),
])
def test_gate_malformed_policy_exits_2(runs, tmp_path, monkeypatch, capsys, text, needle):
    pol = _policy(tmp_path, text)
    assert main(["gate", runs["run"], "--policy", pol], monkeypatch) == 2
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


def _summary_dir(root, name, metrics):
    d = root / name
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"schema_version": 1, "run_id": name, "metrics": [
        {"probe": p, "metric": m, "value": v, "ci_low": None, "ci_high": None, "group": g, "n": 10}
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
    assert re.search(r"PASS\s+counterfactual_bias\.flip_rate\[gender\]", out)
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


def test_example_policy_is_valid(runs, monkeypatch):
    from pathlib import Path

    from audit.gate import load_policy

    example = Path(__file__).resolve().parents[1] / "docs" / "policy.example.yaml"
    policy = load_policy(example)
    assert policy.thresholds and policy.regressions and policy.system.intended_use
    assert main(["gate", runs["child"], "--policy", example, "--baseline", runs["run"]], monkeypatch) in (0, 1)
