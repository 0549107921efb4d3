"""The dashboard's pages and their titles (no Streamlit import: tests/browser_check.py reads it).

The home page, one page per catalog page that has a file in dashboard/pages/, the sample
viewer and the run comparison, in that order."""
from __future__ import annotations

from pathlib import Path

from audit.catalog import PAGES

__all__ = ["nav", "HOME", "COMPARE", "SAMPLES"]

HOME, COMPARE, SAMPLES = "Runs & scorecard", "Run comparison", "Samples"


def nav() -> list[tuple[str, str]]:
    """(page file relative to dashboard/, title) of every page."""
    pages = Path(__file__).resolve().parent / "pages"
    return [("app.py", HOME), *((f"pages/{pid}.py", title) for pid, title in PAGES.items()
                                if (pages / f"{pid}.py").is_file()), ("pages/samples.py", SAMPLES),
            ("pages/compare.py", COMPARE)]
