"""The report's cover as HTML: title, the verdict (always one), the failing findings and
warnings with the section each is in, the model and data, how many examples each probe
audited, and every section with its badge."""
from __future__ import annotations

from audit.report import meta
from audit.report.escape import e, fmt, pill, wb

__all__ = ["cover_html"]


def _verdict(ov: dict, numbers: dict) -> str:
    v = ov.get("verdict") or {}
    status = v.get("status") or "no findings"
    head = f'<div class="verdict-head">{pill(status)} <b>{e(v.get("text"))}</b></div>'
    lines = []
    if v.get("source") == "policy":
        f = v.get("findings") or {}
        lines.append(f"<p>Findings of the run: {pill(f.get('status') or 'no findings')} {e(f.get('text'))}</p>")
    else:
        lines.append('<p class="muted">No policy was given (--policy POLICY.yaml), so this verdict is the worst '
                     "finding of the run.</p>")
    items = []
    for f in ov.get("top_findings") or []:
        sid = str(f.get("section"))
        where = (f' <a href="#sec-{e(sid)}">(section {e(numbers.get(sid, ""))})</a>' if sid in numbers else "")
        items.append(f"<li>{pill(f.get('severity'))} <b>{e(f.get('probe'))}</b>: {e(f.get('message'))}{where}</li>")
    if items:
        lines.append('<ul class="findings">' + "".join(items) + "</ul>")
    if ov.get("more_findings"):
        lines.append(f'<p class="muted">{e(ov["more_findings"])} more warning(s) under Limitations.</p>')
    cls = {"fail": "fail", "warnings": "warnings", "missing": "warnings"}.get(status, "ok")
    return f'<div class="verdict verdict-{cls}">{head}{"".join(lines)}</div>'


def _title(probe) -> str:
    spec = meta.spec_of(str(probe))
    return spec.title if spec else ""


def _probes(ov: dict) -> str:
    counts = ov.get("probes") or []
    if not counts:
        return ""
    rows = "".join(
        f"<tr><td>{wb(c.get('probe'))}</td><td>{e(_title(c.get('probe')))}</td><td>{pill(c.get('status'))}</td>"
        f"<td class=\"num\">{e(fmt(c.get('examples')))}</td>"
        f"<td class=\"num\">{e(fmt(c.get('selected')))}</td><td>{'yes' if c.get('capped') else 'no'}</td></tr>"
        for c in counts)
    return ('<table class="data"><caption>Examples audited per probe</caption><thead><tr><th>probe</th>'
            "<th>title</th><th>status</th><th>examples audited</th><th>examples that fit</th>"
            f"<th>capped by --max-examples</th></tr></thead><tbody>{rows}</tbody></table>")


def cover_html(doc: dict) -> str:
    # The cover's tables are not kept whole on one printed page: page 1 fills, headers repeat.
    run, ov = doc.get("run") or {}, doc.get("overview") or {}
    model, data = run.get("model") or {}, run.get("data") or {}
    secs = doc.get("sections") or []
    numbers = {str(s.get("id")): s.get("number", i) for i, s in enumerate(secs, start=1)}
    rows = "".join(
        f'<tr><td><a href="#sec-{e(s["id"])}">{e(s.get("number", i))}. {e(s["title"])}</a></td>'
        f'<td>{pill(s["status"])}</td><td>{e("; ".join(s.get("notes") or []))}</td></tr>'
        for i, s in enumerate(secs, start=1))
    targets = (ov.get("verdict") or {}).get("targets")
    ttxt = (f"{e(targets.get('policy'))}: {e(targets.get('pass'))} passed, {e(targets.get('fail'))} failed, "
            f"{e(targets.get('skip'))} skipped" if targets else "no policy given (--policy POLICY.yaml)")
    ident = model.get("sha256") or model.get("identity")
    return (f'<header class="cover"><h1>{e(doc.get("title"))}</h1>'
            f'<p class="sub">run {e(doc.get("run_id"))} · audited {e(run.get("created"))} · report generated '
            f'{e(doc.get("generated"))} · mmaudit {e((run.get("environment") or {}).get("mmaudit"))}</p>'
            f"{_verdict(ov, numbers)}"
            f'<table class="kv"><tr><th>model</th><td>{wb(model.get("path"))} ({e(model.get("architecture"))})'
            f'{"<br>identity " + wb(ident) if ident else ""}</td></tr>'
            f'<tr><th>data</th><td>{wb(data.get("path"))}: {e(data.get("n"))} examples in the audited split</td></tr>'
            f'<tr><th>examples audited</th><td>{e(ov.get("examples"))}</td></tr>'
            f'<tr><th>findings</th><td>{e(ov.get("findings"))}</td></tr>'
            f"<tr><th>targets</th><td>{ttxt}</td></tr></table>"
            f"{_probes(ov)}"
            f'<table class="data"><caption>Sections and the state of their evidence</caption>'
            f'<thead><tr><th>section</th><th>evidence</th><th>notes</th></tr></thead><tbody>{rows}</tbody></table>'
            "</header>")
