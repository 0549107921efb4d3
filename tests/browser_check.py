"""Browser check of the dashboard (run by CI, not collected by pytest):

    python tests/browser_check.py [--screenshots DIR] [--keep DIR]

1. builds a temporary store holding a real run (synthetic data, an untrained tiny LLaVA,
   the standard probes plus robustness and privacy_audit, a few examples each, with
   --log-samples) and a second run that names the first as its parent;
2. starts the dashboard with the command line `mmaudit dashboard` uses, on a free port,
   bound to 127.0.0.1;
3. waits for /_stcore/health, then for a rendered page (headless Chromium --dump-dom
   until the page title and the run id are in the DOM);
4. takes a headless Chromium screenshot and checks it is not blank (enough distinct
   colours and non-white pixels). With --screenshots DIR it does this for every page
   (the sample viewer included), for views of the HTML report at a desktop width (the
   cover, result sections, the data card, the samples, the glossary) and for pages of the
   PDF report (pdftoppm), and writes the PNGs to DIR (docs/screenshots/ in the repository),
   each reduced to a palette PNG of at most MAX_PNG_BYTES.

Exit 0 when every screenshot passes, 1 otherwise (2 when Chromium is missing).
"""
from __future__ import annotations

import argparse
import html
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))



def dashboard_pages() -> tuple[tuple[str, str, str], ...]:
    """(URL path, page title, screenshot name) of every dashboard page, from the dashboard's
    navigation: app.py is the home page, pages/<name>.py is /<name>."""
    from dashboard.nav import nav

    return tuple(("" if f == "app.py" else Path(f).stem, title, "runs" if f == "app.py" else Path(f).stem)
                 for f, title in nav())


# (file name, section id, window height) of the report screenshots taken with --screenshots,
# at a desktop width; the cover is the top of the whole report as users get it
REPORT_SHOTS = (("report-cover", None, 2300), ("report-fairness", "fairness", 3200),
                ("report-interpretability", "interpretability", 3200), ("report-mitigations", "mitigations", 2400),
                ("report-data", "data", 3200), ("report-samples", "samples", 2600),
                ("report-glossary", "glossary", 2400))
DESKTOP = 1400
PDF_PAGES = ("report-pdf-page1", "report-pdf-pages")  # page 1, and the first pages side by side
MAX_PNG_BYTES = 400_000
PROBES = ["modality_ablation", "attention", "hallucination", "counterfactual_bias", "group_fairness"]
EXTRA = ("typographic_attack", "robustness", "privacy_audit")  # used when registered
MIN_COLOURS = 64
MIN_INK = 0.02  # share of pixels that are not near-white
ATTEMPTS = 5
SHOT_HEIGHT = {"bias": 2400, "modality": 2300, "samples": 1900}


def log(msg: str) -> None:
    print(f"[browser_check] {msg}", flush=True)


def build_store(root: Path, *, max_examples: int = 12) -> tuple[Path, Path]:
    """Data, model and two linked runs under `root`; returns (store, run_dir of the first run)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from audit.adapters import load_adapter
    from audit.dataset import Dataset
    from audit.runner import RunSpec, run_audit
    from reference_models.architectures import build_reference_model
    from reference_models.synthetic import generate, vocabulary

    from probes.base import available

    probes = PROBES + [p for p in EXTRA if p in available()]
    data, model, store = root / "data", root / "model", root / "store.duckdb"
    generate(data, n=240, bias=0.9, seed=1, n_canaries=16)
    m, proc = build_reference_model(arch="llava", preset="tiny", words=vocabulary(), seed=0)
    m.eval().save_pretrained(model)
    proc.save_pretrained(model)
    adapter, ds = load_adapter(model), Dataset.load(data).audit_split()
    first = run_audit(RunSpec(model=str(model), data=str(data), probes=probes, out=str(root / "run-a"), seed=0,
                              store=str(store), max_examples=max_examples, log_samples=True), adapter=adapter,
                      data=ds, progress=False, log=lambda _: None).summary
    run_audit(RunSpec(model=str(model), data=str(data), probes=probes, out=str(root / "run-b"), seed=1,
                      store=str(store), max_examples=max_examples + 4, parent_run_id=first["run_id"],
                      log_samples=True), adapter=adapter, data=ds, progress=False, log=lambda _: None)
    return store, root / "run-a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the dashboard exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200 and b"ok" in r.read():
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no answer from {url}/_stcore/health within {timeout:.0f} s")


def chromium_base(chromium: str, profile: Path) -> list[str]:
    return [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}", "--window-size=1400,1000"]


def wait_rendered(chromium: str, profile: Path, url: str, needles: list[str], tries: int = 6) -> None:
    """Until the DOM holds every needle (the first loads after a start can be empty)."""
    missing = needles
    for i in range(tries):
        budget = 8000 + 4000 * i
        out = subprocess.run([*chromium_base(chromium, profile), f"--virtual-time-budget={budget}", "--dump-dom", url],
                             capture_output=True, text=True, timeout=120)
        missing = [n for n in needles if n not in out.stdout and html.escape(n, quote=False) not in out.stdout]
        if not missing:
            return
        time.sleep(1.5)
    raise RuntimeError(f"{url} never showed {missing!r}")


def screenshot(chromium: str, profile: Path, url: str, out: Path, *, height: int = 1000, width: int = 1400,
               budget: int = 15000) -> None:
    cmd = [*chromium_base(chromium, profile), f"--virtual-time-budget={budget}", f"--screenshot={out}", url]
    cmd[cmd.index("--window-size=1400,1000")] = f"--window-size={width},{height}"
    subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if not out.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot of {url}")


def trim_bottom(png: Path, margin: int = 30) -> None:
    """Cut the empty white space below the content (tall windows for long report sections)."""
    import numpy as np
    from PIL import Image

    im = Image.open(png).convert("RGB")
    rows = np.where((np.asarray(im).min(axis=2) < 245).any(axis=1))[0]
    if rows.size and rows[-1] + margin < im.height:
        im.crop((0, 0, im.width, rows[-1] + margin)).save(png)


def shrink(png: Path, *, max_height: int = 3400, max_bytes: int = MAX_PNG_BYTES) -> None:
    """A palette PNG (256 colours) of at most `max_height` pixels, halved in size until it fits `max_bytes`."""
    from PIL import Image

    im = Image.open(png).convert("RGB")
    if im.height > max_height:
        im = im.crop((0, 0, im.width, max_height))
    while True:
        im.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)
        if png.stat().st_size <= max_bytes or im.width < 500:
            return
        im = im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.Resampling.LANCZOS)


def pdf_shots(pdf: Path, shots: Path, work: Path) -> list[Path]:
    """Page 1 of the PDF at a readable resolution, and its first eight pages side by side (how
    sections flow over pages), rasterised by pdftoppm."""
    from PIL import Image

    exe = shutil.which("pdftoppm")
    if exe is None:
        raise RuntimeError("pdftoppm is not installed (apt-get install -y poppler-utils)")
    subprocess.run([exe, "-r", "110", "-png", "-f", "1", "-l", "1", str(pdf), str(work / "page1")], check=True,
                   capture_output=True, timeout=120)
    subprocess.run([exe, "-r", "40", "-png", "-f", "1", "-l", "8", str(pdf), str(work / "thumb")], check=True,
                   capture_output=True, timeout=120)
    first = shots / f"{PDF_PAGES[0]}.png"
    shutil.move(str(next(work.glob("page1*.png"))), first)
    thumbs = [Image.open(p).convert("RGB") for p in sorted(work.glob("thumb*.png"))]
    w, h = thumbs[0].size
    sheet = Image.new("RGB", (4 * (w + 8) + 8, ((len(thumbs) + 3) // 4) * (h + 8) + 8), (120, 120, 120))
    for i, t in enumerate(thumbs):
        sheet.paste(t, (8 + (i % 4) * (w + 8), 8 + (i // 4) * (h + 8)))
    pages = shots / f"{PDF_PAGES[1]}.png"
    sheet.save(pages)
    return [first, pages]


def not_blank(png: Path) -> tuple[bool, str]:
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(png).convert("RGB"))
    colours = len(np.unique(a.reshape(-1, 3)[::7], axis=0))
    ink = float((a.min(axis=2) < 235).mean())
    ok = colours >= MIN_COLOURS and ink >= MIN_INK
    return ok, f"{png.name}: {colours} colours, {ink:.1%} non-white pixels"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--screenshots", metavar="DIR", help="screenshot every page and the report into DIR")
    ap.add_argument("--keep", metavar="DIR", help="build the store here and keep it (default: a temporary folder)")
    args = ap.parse_args(argv)
    from audit.report.render import find_chromium

    chromium = find_chromium()
    if chromium is None:
        log("chromium is not installed (apt-get install -y chromium)")
        return 2
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mmaudit-browser-"))
    work.mkdir(parents=True, exist_ok=True)
    profile = work / "chromium-profile"
    shots = Path(args.screenshots) if args.screenshots else work / "shots"
    shots.mkdir(parents=True, exist_ok=True)
    proc = None
    try:
        t0 = time.monotonic()
        store, run_dir = (work / "store.duckdb", work / "run-a") if (work / "store.duckdb").is_file() \
            else build_store(work)
        log(f"store ready in {time.monotonic() - t0:.0f} s: {store}")
        from audit.publish_cli import dashboard_command
        from audit.store import Store

        run_ids = list(Store(store).runs().run_id)
        port = free_port()
        cmd, env = dashboard_command(store=store, host="127.0.0.1", port=port)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work)
        url = f"http://127.0.0.1:{port}"
        wait_health(url, proc)
        log(f"dashboard healthy on {url}")
        pages = dashboard_pages() if args.screenshots else dashboard_pages()[:1]
        failures = 0
        for slug, title, name in pages:
            page_url = f"{url}/{slug}"
            wait_rendered(chromium, profile, page_url, [title, run_ids[-1]])
            out = shots / f"dashboard-{name}.png"
            for attempt in range(1, ATTEMPTS + 1):  # the script may still be running on the first load
                height = SHOT_HEIGHT.get(name, 1700) if args.screenshots else 1000
                screenshot(chromium, profile, page_url, out, height=height)
                ok, msg = not_blank(out)
                if ok:
                    break
                log(f"attempt {attempt}: {msg}")
                time.sleep(1.0)
            if args.screenshots:
                shrink(out)
            failures += not ok
            log(("ok   " if ok else "FAIL ") + msg)
        if args.screenshots:
            from audit.report import build_document, build_report
            from audit.report.render import render_html

            child = run_dir.parent / "run-b"
            report = build_report(child, "html", store=store)  # the whole report, as users get it
            doc = build_document(child, store=store)
            for name, section, height in REPORT_SHOTS:  # one view each: the top of the report, or one section
                page = report if section is None else work / f"{name}.html"
                if section is not None:
                    page.write_text(render_html(dict(doc, sections=[s for s in doc["sections"] if s["id"] == section]),
                                                cover=False))
                out = shots / f"{name}.png"
                screenshot(chromium, profile, page.resolve().as_uri(), out, height=height, width=DESKTOP,
                           budget=5000)
                trim_bottom(out)
                ok, msg = not_blank(out)
                shrink(out)
                failures += not ok
                log(("ok   " if ok else "FAIL ") + msg)
            pdf = build_report(child, "pdf", store=store, out=work / "report.pdf")
            for out in pdf_shots(pdf, shots, work):
                ok, msg = not_blank(out)
                shrink(out)
                failures += not ok
                log(("ok   " if ok else "FAIL ") + msg)
        log("PASS" if not failures else f"FAIL: {failures} blank screenshot(s)")
        return 1 if failures else 0
    except Exception as exc:  # noqa: BLE001 - CI wants one clear line and a non-zero exit
        log(f"FAIL: {type(exc).__name__}: {exc}")
        return 1
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
