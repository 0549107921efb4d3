"""Section badges and the cover's verdict, from the run's findings and the policy's targets.

A section's badge says the worst thing in it: FAIL when it holds a failing finding (or a
fail note, or a failed target), MISSING when it has no evidence, WARNINGS when it holds a
warning, PARTIAL when some of its evidence is missing, and COMPLETE only when it has
evidence and nothing to warn about. A finding belongs to the section its probe's catalog
spec names; findings about the run itself (probe "run") or a probe the catalog does not
know belong to the protocol; the limitations section lists, and so reflects, all of them.

The cover states a verdict in every case: the policy's when one is given, otherwise the
worst finding ("FAIL: 1 failing finding", "WARNINGS: ...", "NO FINDINGS"), with counts.
"""
from __future__ import annotations

from collections import Counter

from audit.report import meta

__all__ = ["finding_section", "settle", "cover_verdict", "top_findings", "STATUSES"]

STATUSES = ("fail", "missing", "warnings", "partial", "complete")  # worst first
COVER_FINDINGS = 12


def finding_section(f: dict) -> str:
    spec = meta.spec_of(str(f.get("probe")))
    return spec.section if spec is not None and spec.section else "protocol"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def settle(sections: list[dict], findings: list[dict], targets: list[dict]) -> None:
    """Set each section's status (and lead its notes with counts) from what it holds."""
    findings = [f for f in findings if isinstance(f, dict)]
    for sec in sections:
        sid = sec["id"]
        mine = findings if sid == "limitations" else [f for f in findings if finding_section(f) == sid]
        sev = Counter(str(f.get("severity")) for f in mine)
        levels = {b.get("level") for b in sec["blocks"] if b.get("type") == "note"}
        failed_targets = sum(r.get("status") == "fail" for r in targets) if sid == "targets" else 0
        lead = []
        if sev["fail"]:
            lead.append(_plural(sev["fail"], "failing finding"))
        if failed_targets:
            lead.append(f"{failed_targets} of {len(targets)} target checks failed")
        if sev["warning"]:
            lead.append(_plural(sev["warning"], "warning"))
        if sev["fail"] or failed_targets or "fail" in levels:
            sec["status"] = "fail"
        elif sec["status"] == "missing":
            pass
        elif sev["warning"] or "warning" in levels:
            sec["status"] = "warnings"
        sec["notes"] = lead + [n for n in sec.get("notes") or [] if n not in lead]


def _findings_verdict(sev: Counter) -> tuple[str, str]:
    info = f" ({_plural(sev['info'], 'info note')})" if sev["info"] else ""
    if sev["fail"]:
        more = f", {_plural(sev['warning'], 'warning')}" if sev["warning"] else ""
        return "fail", f"FAIL: {_plural(sev['fail'], 'failing finding')}{more}{info}"
    if sev["warning"]:
        return "warnings", f"WARNINGS: {_plural(sev['warning'], 'warning')}, no failing finding{info}"
    return "no findings", f"NO FINDINGS: no failing finding and no warning{info}"


def cover_verdict(findings: list[dict], targets: list[dict], *, policy: str | None) -> dict:
    """{"source": "policy" | "findings", "status", "text", "findings": {status, text, counts}, "targets"}."""
    sev = Counter(str(f.get("severity")) for f in findings if isinstance(f, dict))
    f_status, f_text = _findings_verdict(sev)
    out = {"findings": {"status": f_status, "text": f_text,
                        "counts": {k: sev.get(k, 0) for k in ("fail", "warning", "info")}}, "targets": None}
    if policy is None:
        return {"source": "findings", "status": f_status, "text": f_text, **out}
    n = Counter(r.get("status") for r in targets)
    status = "fail" if n["fail"] else "pass"
    detail = f"{n['pass']} passed, {n['fail']} failed, {n['skip']} skipped"
    text = (f"POLICY FAIL: {n['fail']} of {len(targets)} target checks failed ({detail})" if n["fail"]
            else f"POLICY PASS: every target check passed or was skipped ({detail})")
    out["targets"] = {"policy": policy, "pass": n["pass"], "fail": n["fail"], "skip": n["skip"]}
    return {"source": "policy", "status": status, "text": text, **out}


def top_findings(findings: list[dict], limit: int = COVER_FINDINGS) -> tuple[list[dict], int]:
    """The failing findings, then the warnings (with the section each belongs to), and how many more there are."""
    rank = {"fail": 0, "warning": 1}
    worst = sorted((f for f in findings if isinstance(f, dict) and f.get("severity") in rank),
                   key=lambda f: rank[f["severity"]])
    shown = [{"severity": f.get("severity"), "probe": f.get("probe"), "message": f.get("message"),
              "section": finding_section(f)} for f in worst[:limit]]
    return shown, max(len(worst) - limit, 0)
