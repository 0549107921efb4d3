"""Render a report document as self-contained HTML, as JSON, or as PDF (headless Chromium).

The HTML has no external reference: plotly.js comes inline from the installed plotly
package, images are data: URLs, and a Content-Security-Policy forbids any network fetch
and any script without this render's nonce. Every string from the document is
HTML-escaped; figure JSON is embedded with `<`, `>` and `&` as JSON escapes, so no payload
can close the script element it sits in.
"""
from __future__ import annotations

import html
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from audit.errors import InputError
from audit.report.output import HTML_MARK

__all__ = ["render_html", "render_json", "print_pdf", "find_chromium", "ERR_NO_CHROMIUM", "CHROMIUM_ENV"]

CHROMIUM_ENV = "MMAUDIT_CHROMIUM"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
ERR_NO_CHROMIUM = ("the pdf format prints the HTML report with headless Chromium, which is not installed; install it "
                   "(Debian/Ubuntu: apt-get install -y chromium) or set MMAUDIT_CHROMIUM to its path, or use "
                   "--format html")
_B64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
LEVEL_LABEL = {"missing": "Missing evidence", "warning": "Warning", "info": "Note"}

CSS = """
:root{--ink:#1d2330;--muted:#5b6472;--line:#dfe3ea;--accent:#2f5d8f;--bg:#f6f8fb}
*{box-sizing:border-box}
body{font-family:"DejaVu Sans",Helvetica,Arial,sans-serif;color:var(--ink);margin:0;background:white;
     font-size:13px;line-height:1.45}
main{max-width:960px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:0 0 4px} h2{font-size:19px;margin:0 0 6px;color:var(--accent)}
h3{font-size:14px;margin:16px 0 6px} h4{font-size:13px;margin:8px 0 4px}
.sub{color:var(--muted);margin:0 0 14px}
.cover{border-bottom:3px solid var(--accent);padding-bottom:14px;margin-bottom:10px}
.refs{font-size:11px;color:var(--muted);margin:0 0 10px}
.refs b{color:var(--ink);font-weight:600}
section.section{padding-top:18px;margin-top:18px;border-top:1px solid var(--line)}
table{border-collapse:collapse;width:100%;margin:6px 0 12px;font-size:11.5px}
caption{caption-side:top;text-align:left;font-weight:600;padding:4px 0;color:var(--ink)}
th,td{border:1px solid var(--line);padding:3px 6px;vertical-align:top;text-align:left;overflow-wrap:break-word}
thead th{background:var(--bg)}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.kv th{width:28%;background:var(--bg);font-weight:600}
.note{border-left:4px solid #8aa4c8;background:#f2f6fb;padding:6px 10px;margin:8px 0}
.note-warning{border-color:#d9a400;background:#fff8e1}
.note-missing{border-color:#b23b3b;background:#fdf0f0}
.note b{margin-right:6px}
.pill{display:inline-block;padding:0 7px;border-radius:9px;font-size:11px;font-weight:700;color:white;background:#888}
.pill.pass,.pill.complete{background:#2e7d4f}.pill.fail,.pill.missing{background:#b23b3b}
.pill.skip,.pill.partial{background:#b7860b}
figure{margin:8px 0 14px;break-inside:avoid} figcaption{font-size:11px;color:var(--muted)}
.plot{width:680px;max-width:100%}
.gallery .sets{display:flex;flex-wrap:wrap;gap:10px}
.gallery .set{border:1px solid var(--line);border-radius:6px;padding:6px 8px;break-inside:avoid;max-width:100%}
.gallery .items{display:flex;flex-wrap:wrap;gap:10px}
.thumb{width:200px;margin:0}
.thumb img{width:192px;height:192px;object-fit:contain;image-rendering:pixelated;border:1px solid var(--line);background:#eee}
.noimg{width:192px;height:60px;border:1px dashed var(--line);color:var(--muted);display:flex;align-items:center;
       justify-content:center;font-size:11px}
.thumb figcaption{overflow-wrap:anywhere;color:var(--ink)}
nav.toc ol{columns:2;margin:6px 0 0;padding-left:20px}
.trunc{color:var(--muted);font-size:11px}
@page{size:A4;margin:12mm}
h2,h3,h4,caption,.refs{break-after:avoid}
@media print{main{max-width:none;padding:0} section.section{break-before:page;border-top:none;margin-top:0}
 .cover{break-after:avoid} thead{display:table-header-group} tr{break-inside:avoid}
 table{font-size:10px} td.num{white-space:normal}}
"""


def _e(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


_PUNCT = re.compile(r"(?<=[_/.,=&;:])")
_SPACE = re.compile(r"(\s+)")


def _wb(x) -> str:
    """Escaped text with <wbr> break opportunities after _ / . , = & ; : and inside runs over 24 characters."""
    s = "" if x is None else str(x)
    if len(s) < 12:
        return html.escape(s, quote=True)
    out = []
    for piece in _PUNCT.split(s):
        for tok in _SPACE.split(piece):
            if len(tok) > 24 and not tok.isspace():
                out.append("<wbr>".join(html.escape(tok[i:i + 24], quote=True) for i in range(0, len(tok), 24)))
            else:
                out.append(html.escape(tok, quote=True))
        out.append("<wbr>")
    return "".join(out[:-1])


def _fmt(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return "—" if not math.isfinite(x) else f"{x:.4g}"
    return str(x)


def _script_json(obj) -> str:
    s = json.dumps(obj, allow_nan=False, ensure_ascii=True)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _refs(refs: dict) -> str:
    names = {"eu_ai_act": "EU AI Act", "nist_ai_rmf": "NIST AI RMF", "model_card": "Model Card"}
    parts = [f"<b>{_e(names.get(k, k))}:</b> {_e('; '.join(v))}" for k, v in refs.items() if v]
    return f'<p class="refs">{" &nbsp;·&nbsp; ".join(parts)}</p>' if parts else ""


def _table(b: dict) -> str:
    cols = b.get("columns") or []
    status_i = cols.index(b["status_col"]) if b.get("status_col") in cols else -1
    out = ['<table class="data">']
    if b.get("caption"):
        out.append(f"<caption>{_e(b['caption'])}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{_wb(c)}</th>" for c in cols) + "</tr></thead><tbody>")
    for row in b.get("rows") or []:
        cells = []
        for i, c in enumerate(row):
            if i == status_i and isinstance(c, str):
                cells.append(f'<td><span class="pill {_e(c.lower())}">{_e(c.upper())}</span></td>')
            elif isinstance(c, (int, float)) and not isinstance(c, bool):
                cells.append(f'<td class="num">{_e(_fmt(c))}</td>')
            else:
                cells.append(f"<td>{_wb(_fmt(c))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    if b.get("truncated"):
        out.append(f'<p class="trunc">{int(b["truncated"])} more row(s) in the JSON report.</p>')
    if not b.get("rows"):
        out.append('<p class="trunc">(no rows)</p>')
    return "".join(out)


def _gallery(b: dict) -> str:
    out = ['<div class="gallery">']
    if b.get("caption"):
        out.append(f"<h4>{_e(b['caption'])}</h4>")
    out.append('<div class="sets">')
    for g in b.get("groups") or []:
        out.append(f'<div class="set"><h4>{_e(g.get("title"))}</h4><div class="items">')
        for it in g.get("items") or []:
            png = it.get("png")
            img = (f'<img alt="{_e(it.get("title"))}" src="data:image/png;base64,{png}">'
                   if isinstance(png, str) and _B64.match(png) else '<div class="noimg">image not available</div>')
            lines = "<br>".join(_e(x) for x in it.get("lines") or [])
            out.append(f'<figure class="thumb">{img}<figcaption>{lines}</figcaption></figure>')
        out.append("</div></div>")
    out.append("</div></div>")
    return "".join(out)


def _block(b: dict, fig_id: str, nonce: str) -> str:
    t = b.get("type")
    if t == "heading":
        return f"<h3>{_e(b.get('text'))}</h3>"
    if t == "text":
        return f"<p>{_e(b.get('text'))}</p>"
    if t == "note":
        level = b.get("level") if b.get("level") in LEVEL_LABEL else "info"
        return f'<div class="note note-{level}"><b>{LEVEL_LABEL[level]}.</b>{_e(b.get("text"))}</div>'
    if t == "kv":
        cap = f"<caption>{_e(b['caption'])}</caption>" if b.get("caption") else ""
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_wb(_fmt(v))}</td></tr>" for k, v in b.get("items") or [])
        return f'<table class="kv">{cap}{rows}</table>'
    if t == "list":
        cap = f"<h4>{_e(b['caption'])}</h4>" if b.get("caption") else ""
        return cap + "<ul>" + "".join(f"<li>{_e(x)}</li>" for x in b.get("items") or []) + "</ul>"
    if t == "table":
        return _table(b)
    if t == "gallery":
        return _gallery(b)
    if t == "figure":
        fig = b.get("figure") or {}
        cap = f"<figcaption>{_e(b['caption'])}</figcaption>" if b.get("caption") else ""
        cfg = {"displayModeBar": False, "displaylogo": False, "responsive": False, "showLink": False}
        return (f'<figure><div class="plot" id="{fig_id}"></div>{cap}</figure>'
                f'<script nonce="{nonce}">Plotly.newPlot("{fig_id}",{_script_json(fig.get("data", []))},'
                f'{_script_json(fig.get("layout", {}))},{_script_json(cfg)});</script>')
    return ""


def _cover(doc: dict) -> str:
    run, ov = doc.get("run") or {}, doc.get("overview") or {}
    model, data = run.get("model") or {}, run.get("data") or {}
    rows = "".join(
        f'<tr><td><a href="#sec-{_e(s["id"])}">{_e(s.get("number", i))}. {_e(s["title"])}</a></td>'
        f'<td><span class="pill {_e(s["status"])}">{_e(s["status"].upper())}</span></td>'
        f'<td>{_e("; ".join(s.get("notes") or []))}</td></tr>'
        for i, s in enumerate(doc.get("sections") or [], start=1))
    verdict = ov.get("targets_verdict")
    vtxt = (f'<span class="pill {_e(verdict)}">{_e(str(verdict).upper())}</span>' if verdict else "no policy given")
    return (f'<header class="cover"><h1>{_e(doc.get("title"))}</h1>'
            f'<p class="sub">run {_e(doc.get("run_id"))} · audited {_e(run.get("created"))} · report generated '
            f'{_e(doc.get("generated"))} · mmaudit {_e((run.get("environment") or {}).get("mmaudit"))}</p>'
            f'<table class="kv"><tr><th>model</th><td>{_e(model.get("path"))} ({_e(model.get("architecture"))})</td></tr>'
            f'<tr><th>data</th><td>{_e(data.get("path"))} ({_e(data.get("n"))} audited examples)</td></tr>'
            f'<tr><th>findings</th><td>{_e(ov.get("findings"))}</td></tr>'
            f'<tr><th>targets</th><td>{vtxt}</td></tr></table>'
            f'<table class="data"><caption>Sections and the state of their evidence</caption>'
            f'<thead><tr><th>section</th><th>evidence</th><th>notes</th></tr></thead><tbody>{rows}</tbody></table>'
            "</header>")


def render_html(doc: dict, *, plotly_js: str | None = None, cover: bool = True) -> str:
    """The whole report as one HTML page (inline plotly.js unless the document has no figure).
    `cover=False` leaves out the title block (e.g. to show one section on its own)."""
    nonce = secrets.token_urlsafe(18)
    body, n = [], 0
    for i, s in enumerate(doc.get("sections") or [], start=1):
        parts = [f'<section class="section" id="sec-{_e(s.get("id"))}"><h2>{_e(s.get("number", i))}. '
                 f'{_e(s.get("title"))}</h2>',
                 _refs(s.get("references") or {})]
        for b in s.get("blocks") or []:
            n += b.get("type") == "figure"
            parts.append(_block(b, f"fig-{n}", nonce))
        parts.append("</section>")
        body.append("".join(parts))
    has_fig = any(b.get("type") == "figure" for s in doc.get("sections") or [] for b in s.get("blocks") or [])
    if has_fig and plotly_js is None:
        from plotly.offline import get_plotlyjs

        plotly_js = get_plotlyjs()
    safe_js = plotly_js.replace("</script", "<\\/script") if has_fig else ""
    js = f'<script nonce="{nonce}">{safe_js}</script>' if has_fig else ""
    csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; img-src data:; "
           "font-src data:; connect-src 'none'; base-uri 'none'; form-action 'none'")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">" + HTML_MARK.decode() +
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(doc.get('title'))}</title><style>{CSS}</style>{js}</head><body><main>"
            f"{_cover(doc) if cover else ''}{''.join(body)}</main></body></html>\n")


def render_json(doc: dict) -> str:
    return json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False) + "\n"


def find_chromium() -> str | None:
    env = os.environ.get(CHROMIUM_ENV)
    if env:
        return env if Path(env).is_file() and os.access(env, os.X_OK) else None
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def chromium_flags(profile: str) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}"]


def print_pdf(html_path: Path, pdf_path: Path, *, timeout: float = 180) -> None:
    exe = find_chromium()
    if exe is None:
        raise InputError(ERR_NO_CHROMIUM, where="--format pdf")
    with tempfile.TemporaryDirectory(prefix="mmaudit-chromium-") as profile:
        cmd = [exe, *chromium_flags(profile), "--no-pdf-header-footer", "--virtual-time-budget=10000",
               f"--print-to-pdf={pdf_path}", html_path.resolve().as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise InputError(f"Chromium did not finish printing within {timeout:.0f} s", where=exe) from exc
    if not pdf_path.is_file() or pdf_path.read_bytes()[:5] != b"%PDF-":
        tail = " ".join((proc.stderr or "").split()[-30:])
        raise InputError(f"Chromium wrote no PDF (exit {proc.returncode}): {tail}", where=exe)
