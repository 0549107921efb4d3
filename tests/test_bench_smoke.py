"""The benchmark harness runs end to end at tiny sizes (no assertion on time)."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path


def test_bench_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench/run.py", "--smoke", "--out", str(tmp_path)])
    mod = runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench" / "run.py"))
    assert mod["main"](["--smoke", "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("*-smoke.json")
    res = json.loads(result.read_text())
    assert set(res["items"]) == {"hooks", "feature_ablation", "mm_shap", "prefix", "suite"}
    assert res["items"]["prefix"]["max_abs_diff"] < 1e-5  # the KV-cache path scores like the plain one
    assert res["items"]["feature_ablation"]["correlation"] > 0.9  # same attributions as captum
    assert (tmp_path / result.name.replace(".json", ".md")).is_file()
