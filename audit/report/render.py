"""Render a report document as self-contained HTML, as JSON, or as PDF (headless Chromium).

The HTML has no external reference: plotly.js comes inline from the installed plotly
package, images are data: URLs, and a Content-Security-Policy forbids any network fetch
and any script without this render's nonce. Every string from the document is
HTML-escaped; figure JSON is embedded with `<`, `>` and `&` as JSON escapes, so no payload
can close the script element it sits in.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from audit.errors import InputError
from audit.report.cover import cover_html
from audit.report.escape import e as _e
from audit.report.escape import fmt as _fmt
from audit.report.escape import pill as _pill
from audit.report.escape import wb as _wb
from audit.report.output import HTML_MARK

__all__ = ["render_html", "render_json", "print_pdf", "find_chromium", "ERR_NO_CHROMIUM", "CHROMIUM_ENV"]

CHROMIUM_ENV = "MMAUDIT_CHROMIUM"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
ERR_NO_CHROMIUM = ("the pdf format prints the HTML report with headless Chromium, which is not installed; install it "
                   "(Debian/Ubuntu: apt-get install -y chromium) or set MMAUDIT_CHROMIUM to its path, or use "
                   "--format html")
_B64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
LEVEL_LABEL = {"fail": "Fail", "missing": "Missing evidence", "warning": "Warning", "info": "Note"}
SMALL_TABLE = (12, 1200)  # rows, characters: a table this short is kept on one page in the PDF (longer
# ones break between rows, their header repeated: keeping them whole would leave half-empty pages)

CSS = """
:root{--ink:#1d2330;--muted:#5b6472;--line:#c9d0da;--accent:#2f5d8f;--bg:#f3f5f9}
*{box-sizing:border-box}
body{font-family:"DejaVu Sans",Helvetica,Arial,sans-serif;color:var(--ink);margin:0;background:white;
     font-size:13px;line-height:1.45;overflow-wrap:anywhere}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:0 0 4px} h2{font-size:19px;margin:0 0 6px;color:var(--accent)}
h3{font-size:14px;margin:16px 0 6px} h4{font-size:13px;margin:8px 0 4px}
.sub,.muted{color:var(--muted)} .sub{margin:0 0 14px}
.cover{border-bottom:3px solid var(--accent);padding-bottom:14px;margin-bottom:10px}
.verdict{border:1px solid var(--line);border-left:8px solid #2e7d4f;border-radius:4px;padding:8px 12px;
         margin:10px 0 14px;background:#f6fbf7}
.verdict-fail{border-left-color:#b23b3b;background:#fdf3f3}
.verdict-warnings{border-left-color:#c27c0e;background:#fff9ec}
.verdict-head{font-size:15px}.verdict p{margin:6px 0}
ul.findings{margin:6px 0;padding-left:18px} ul.findings li{margin:3px 0}
.refs{font-size:11px;color:var(--muted);margin:0 0 10px}
.refs b{color:var(--ink);font-weight:600}
section.section{padding-top:18px;margin-top:18px;border-top:1px solid var(--line)}
table{border-collapse:collapse;border:1px solid var(--line);width:100%;margin:6px 0 12px;font-size:11.5px}
caption{caption-side:top;text-align:left;font-weight:600;padding:4px 0;color:var(--ink)}
th,td{border:1px solid var(--line);padding:3px 6px;vertical-align:top;text-align:left;overflow-wrap:anywhere}
thead th{background:var(--bg);overflow-wrap:normal}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap;overflow-wrap:normal}
table.kv th{width:28%;background:var(--bg);font-weight:600}
.note{border-left:4px solid #8aa4c8;background:#f2f6fb;padding:6px 10px;margin:8px 0}
.note-warning{border-color:#d9a400;background:#fff8e1}
.note-missing{border-color:#7d5ba6;background:#f6f1fb}
.note-fail{border-color:#b23b3b;background:#fdf0f0}
.note b{margin-right:6px}
.pill{display:inline-block;padding:0 7px;border-radius:9px;font-size:11px;font-weight:700;color:white;background:#888;
      white-space:nowrap}
.pill.pass,.pill.complete,.pill.nofindings{background:#2e7d4f}.pill.fail{background:#b23b3b}
.pill.warnings{background:#c27c0e}.pill.missing{background:#7d5ba6}.pill.partial{background:#8a7a12}
.pill.skip{background:#8a8a8a}.pill.info{background:#5b6f8f}
figure{margin:8px 0 16px;break-inside:avoid} figcaption{font-size:12px;color:var(--ink);margin-top:2px}
.plot{width:100%}
.gallery .sets{display:flex;flex-wrap:wrap;gap:10px}
.gallery .set{border:1px solid var(--line);border-radius:6px;padding:6px 8px;break-inside:avoid;max-width:100%}
.gallery .items{display:flex;flex-wrap:wrap;gap:10px}
.thumb{width:200px;margin:0}
.thumb img{width:192px;height:192px;object-fit:contain;image-rendering:pixelated;border:1px solid var(--line);background:#eee}
.noimg{width:192px;height:60px;border:1px dashed var(--line);color:var(--muted);display:flex;align-items:center;
       justify-content:center;font-size:11px}
.thumb figcaption{overflow-wrap:anywhere;color:var(--ink)}
.trunc{color:var(--muted);font-size:11px}
@page{size:A4;margin:12mm}
h2,h3,h4,caption,.refs,.keep{break-after:avoid} .keep{break-inside:avoid} p,li{orphans:3;widows:3}
table.small,table.kv,.note,.verdict,ul.findings li{break-inside:avoid}
@media print{main{max-width:none;padding:0} section.section{padding-top:10px;margin-top:12px}
 thead{display:table-header-group} tr{break-inside:avoid}
 table{font-size:10px} td.num{white-space:normal}}
"""
# The PDF lays the page out at the printable width of A4 (210 mm - 2 x 12 mm margins), so that
# charts, which plotly sizes once to their container, are drawn at the width they are printed at.
PRINT_CSS = ("main{width:186mm;max-width:186mm;margin:0;padding:0} body{font-size:11px} h1{font-size:22px} "
             "h2{font-size:16px} h3{font-size:13px} .thumb{width:128px} .thumb img{width:120px;height:120px} "
             ".noimg{width:120px} .thumb figcaption{font-size:9px} .gallery .set{max-width:49%} "
             ".gallery .set:has(.thumb:nth-child(3)){max-width:100%} .gallery .set h4{font-size:10px}")
PRINT_HEIGHT, PRINT_MIN_HEIGHT = 0.75, 200  # charts are drawn this much shorter in the PDF


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
    rows_ = b.get("rows") or []
    small = len(rows_) <= SMALL_TABLE[0] and sum(len(str(c)) for r in rows_ for c in r) <= SMALL_TABLE[1]
    out = [f'<table class="data{" small" if small else ""}">']
    if b.get("caption"):
        out.append(f"<caption>{_e(b['caption'])}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{_wb(c)}</th>" for c in cols) + "</tr></thead><tbody>")
    for row in b.get("rows") or []:
        cells = []
        for i, c in enumerate(row):
            if i == status_i and isinstance(c, str):
                cells.append(f"<td>{_pill(c)}</td>")
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


def _block(b: dict, fig_id: str, nonce: str, responsive: bool = True) -> str:
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
        cfg = {"displayModeBar": False, "displaylogo": False, "responsive": responsive, "showLink": False}
        layout = dict(fig.get("layout") or {})
        if not responsive and isinstance(layout.get("height"), (int, float)):  # print: a page is short
            layout["height"] = max(PRINT_MIN_HEIGHT, round(layout["height"] * PRINT_HEIGHT))
        return (f'<figure><div class="plot" id="{fig_id}"></div>{cap}</figure>'
                f'<script nonce="{nonce}">Plotly.newPlot("{fig_id}",{_script_json(fig.get("data", []))},'
                f'{_script_json(layout)},{_script_json(cfg)});</script>')
    return ""


def _section(s: dict, i: int, nonce: str, n: int, *, responsive: bool) -> tuple[str, int]:
    """One section's HTML (and the figure counter after it). Its title stays with its first lines,
    and a probe's heading with the sentence under it, on one printed page."""
    out = [f'<section class="section" id="sec-{_e(s.get("id"))}"><div class="keep"><h2>{_e(s.get("number", i))}. '
           f'{_e(s.get("title"))}</h2>{_refs(s.get("references") or {})}</div>']
    blocks, j = s.get("blocks") or [], 0
    while j < len(blocks):
        pair = (blocks[j].get("type") == "heading" and j + 1 < len(blocks)
                and blocks[j + 1].get("type") in ("text", "note"))
        parts = []
        for b in blocks[j:j + 2] if pair else blocks[j:j + 1]:
            n += b.get("type") == "figure"
            parts.append(_block(b, f"fig-{n}", nonce, responsive))
        out.append(f'<div class="keep">{"".join(parts)}</div>' if pair else parts[0])
        j += 2 if pair else 1
    out.append("</section>")
    return "".join(out), n


def render_html(doc: dict, *, plotly_js: str | None = None, cover: bool = True, for_print: bool = False) -> str:
    """The whole report as one HTML page (inline plotly.js unless the document has no figure).
    `cover=False` leaves out the title block (e.g. to show one section on its own); `for_print`
    lays the page out at A4's printable width (the PDF)."""
    nonce = secrets.token_urlsafe(18)
    body, n = [], 0
    for i, s in enumerate(doc.get("sections") or [], start=1):
        html_, n = _section(s, i, nonce, n, responsive=not for_print)
        body.append(html_)
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
            f"<title>{_e(doc.get('title'))}</title><style>{CSS}{PRINT_CSS if for_print else ''}</style>{js}"
            f"</head><body><main>{cover_html(doc) if cover else ''}{''.join(body)}</main></body></html>\n")


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
