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
    items = res["items"]
    assert set(items) == {"hooks", "memory", "feature_ablation", "mm_shap", "prefix", "dp", "estimate",
                          "suite_standard_tiny"}
    assert items["prefix"]["max_abs_diff"] < 1e-5  # the KV-cache path scores like the plain one
    assert items["feature_ablation"]["correlation"] > 0.9  # same attributions as captum
    suite = items["suite_standard_tiny"]
    assert suite["max_value_difference"] < 1e-6  # prefix reuse changes no metric value
    assert not suite["reuse_off"]["failed"] and not suite["reuse_on"]["failed"]
    # every clipping mode of the DP step ran, and auto resolved to one of them
    assert items["dp"]["lora"]["default_mode"] in ("bk", "ghost", "hooks")
    assert set(items["dp"]["full"]["variants"]) == {"non_private", "auto", "bk", "ghost", "hooks"}
    # declared costs are the forward passes the probes run (the plain path counts whole rows)
    for name, probe in items["estimate"]["probes"].items():
        assert probe["counted_forward_rows"] > 0, name
    assert {c["item"] for c in res["checks"]} >= {"hooks", "memory", "dp", "estimate", "suite_standard_tiny"}
    assert (tmp_path / result.name.replace(".json", ".md")).is_file()


def test_validity_smoke(tmp_path):
    """bench/validity.py at a few audits: every rate sits beside its target, and the interval
    coverage verdict comes from the coverage audits, not from the warning audits."""
    mod = runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench" / "validity.py"))
    mod["main"](["--audits", "3", "--power-audits", "2", "--coverage-audits", "5", "--interval-draws", "5",
                 "--out", str(tmp_path)])
    (result,) = tmp_path.glob("*-validity.json")
    res = json.loads(result.read_text())
    assert res["coverage_audits"] == 5
    for probe in ("group_fairness", "counterfactual_bias", "retrieval_skew", "hallucination"):
        assert "error" not in res[probe], res[probe]
    eq = res["group_fairness"]["equal_60"]
    assert eq["warning_rate"]["audits"] == 3
    assert eq["coverage_equalized_odds_difference"]["audits"] == 5
    assert "meets_target" not in eq["coverage_in_the_3_warning_audits"]["coverage_equalized_odds_difference"]
    assert "intervals_only_5" in res["group_fairness"]
    assert res["all_targets_met"] == (not res["targets_missed"])
