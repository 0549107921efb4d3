"""`mmaudit demo` runs the whole path (shortened: one epoch, few examples) and is resumable."""
from __future__ import annotations

import json

from audit.demo import run_demo
from audit.store import Store


def test_demo_end_to_end_and_rerun_is_cheap(tmp_path, capsys):
    assert run_demo(out=tmp_path, epochs=1, max_examples=8) == 0
    summary = json.loads((tmp_path / "run-standard" / "summary.json").read_text())
    probes = {m["probe"] for m in summary["metrics"]}
    assert {"modality_ablation", "attention", "hallucination"} <= probes
    assert len(Store(tmp_path / "store.duckdb").runs()) == 1
    out = capsys.readouterr().out
    assert "mmaudit runs --store" in out and "mmaudit dashboard --store" in out
    assert (tmp_path / "run-standard" / "report.html").is_file()
    # a second call finds every stage done and records nothing new
    assert run_demo(out=tmp_path, epochs=1, max_examples=8) == 0
    assert len(Store(tmp_path / "store.duckdb").runs()) == 1
