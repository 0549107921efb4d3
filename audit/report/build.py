"""Assemble the report document from a run and write it as HTML, JSON or PDF."""
from __future__ import annotations

import math
import os
import tempfile
from collections import Counter
from pathlib import Path

from audit.catalog import SECTIONS
from audit.errors import InputError
from audit.report import closing, provenance, results, sections, verdict
from audit.report.integrity import HashBudget, integrity_manifest
from audit.report.load import load_bundle
from audit.report.output import check_target
from audit.report.render import print_pdf, render_html, render_json
from audit.schema import metric_records

__all__ = ["build_document", "build_report", "SECTION_IDS", "DOC_SCHEMA_VERSION"]

# 2: sections follow the catalog, metrics carry typed `dims`, tables have typed breakdowns.
DOC_SCHEMA_VERSION = 2
# The catalog's result sections sit between the protocol and the mitigations; the glossary closes.
SECTION_IDS = ("identity", "architecture", "data", "protocol", *SECTIONS, "mitigations", "targets", "samples",
               "limitations", "manifest", "mapping", "glossary")


def _json_safe(obj):
    """Strict-JSON copy: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def build_document(run_dir: str | Path, *, store: str | Path | None = None, baseline: str | Path | None = None,
                   policy: str | Path | None = None, hash_budget: HashBudget | None = None) -> dict:
    """The report as plain data: what the JSON format writes and the HTML renders."""
    b = load_bundle(run_dir, store=store, baseline=baseline, policy=policy)
    integ = integrity_manifest(b.summary, b.run_dir, data_dir=b.data_dir, model_dir=b.model_dir, budget=hash_budget)
    secs = [sections.identity(b), sections.architecture(b), sections.data(b), sections.protocol(b)]
    secs += [results.result_section(b, sid) for sid in SECTIONS]
    secs.append(results.mitigations(b))
    target_sec, target_results = results.targets(b)
    secs += [target_sec, closing.samples_section(b, store=str(store) if store else None),
             sections.limitations(b, integ), sections.manifest(b, integ)]
    titles = {s["id"]: s["title"] for s in secs}
    secs += [sections.mapping(titles), closing.glossary(b)]
    s = b.summary
    findings = [f for f in s.get("findings") or [] if isinstance(f, dict)]
    verdict.settle(secs, findings, target_results)
    for i, sec in enumerate(secs, start=1):
        sec["number"] = i
    sev = Counter(str(f.get("severity")) for f in findings)
    name = (b.policy.system.name if b.policy and b.policy.system and b.policy.system.name
            else Path(str((s.get("model") or {}).get("path", "model"))).name)
    policy_name = (b.policy_path.name if b.policy_path else "policy") if b.policy is not None else None
    cover = verdict.cover_verdict(findings, target_results, policy=policy_name)
    top, more = verdict.top_findings(findings)
    run = {k: s.get(k) for k in ("run_id", "created", "data", "config", "parent_run_id")}
    # The model's own provenance and the environment, never a source checkout of the audit tool.
    run["model"] = {k: v for k, v in (s.get("model") or {}).items() if not provenance.is_tool_checkout(k)
                    or k in ("revision", "commit")}
    run["environment"] = provenance.environment(s.get("environment"))
    doc = {
        "schema_version": DOC_SCHEMA_VERSION,
        "kind": "mmaudit-report",
        "title": f"Audit report: {name}",
        "generated": integ["generated"],
        "run_id": s.get("run_id"),
        "run": run,
        "overview": {"findings": f"{sev.get('fail', 0)} fail, {sev.get('warning', 0)} warning, {sev.get('info', 0)} info",
                     "targets_verdict": cover["status"] if b.policy is not None else None,
                     "verdict": cover,
                     "top_findings": top, "more_findings": more,
                     "examples": provenance.examples_line(s),
                     "probes": provenance.probe_counts(s),
                     "sections": {x["id"]: x["status"] for x in secs}},
        "metrics": metric_records(b.metrics),
        "findings": s.get("findings") or [],
        "targets": target_results,
        "integrity": integ,
        "sections": secs,
    }
    return _json_safe(doc)


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_report(run_dir: str | Path, fmt: str = "html", *, out: str | Path | None = None,
                 store: str | Path | None = None, baseline: str | Path | None = None,
                 policy: str | Path | None = None, force: bool = False) -> Path:
    """Write RUN_DIR/report.<fmt> (or `out`) and return its path.

    Never over an input of the run, nor into the model or data folder; over an existing
    file only when it is a report mmaudit wrote, or with `force` (output.check_target)."""
    if fmt not in ("html", "pdf", "json"):
        raise InputError(f"unknown format {fmt!r}; choose html, pdf or json", where="--format")
    run_dir = Path(run_dir)
    target = Path(out) if out else run_dir / f"report.{fmt}"
    from audit.gate import load_summary

    summary = load_summary(run_dir)
    check_target(target, run_dir=run_dir, summary=summary, force=force)
    if not target.parent.is_dir():
        raise InputError("the folder for the report does not exist", where=str(target.parent))
    if fmt == "pdf":  # fail before the work when Chromium is missing
        from audit.report.render import ERR_NO_CHROMIUM, find_chromium

        if find_chromium() is None:
            raise InputError(ERR_NO_CHROMIUM, where="--format pdf")
    doc = build_document(run_dir, store=store, baseline=baseline, policy=policy)
    check_target(target, run_dir=run_dir, summary=summary, force=force)  # again: the build takes a while
    if fmt == "json":
        _write_atomic(target, lambda p: p.write_text(render_json(doc), encoding="utf-8"))
    elif fmt == "html":
        _write_atomic(target, lambda p: p.write_text(render_html(doc), encoding="utf-8"))
    else:
        with tempfile.TemporaryDirectory(prefix="mmaudit-report-") as tmp:
            page = Path(tmp) / "report.html"
            page.write_text(render_html(doc, for_print=True), encoding="utf-8")
            _write_atomic(target, lambda p: print_pdf(page, p))
    return target
