"""Statistical validity of `counterfactual_bias` on trained reference models.

    python bench/bias_validity.py --biased MODEL_DIR --biased-data DATA_DIR \
        --fair MODEL_DIR --fair-data DATA_DIR [--replicates 40] [--sets 40]

Training 20 models per bias level does not fit a 2-CPU budget, so (as the issue allows)
the replicates are bootstrap resamples of counterfactual sets: the probe scores every set
once per model, then each replicate draws `--sets` sets with replacement and runs the
probe's own `summarize` (the paired sign-flip permutation test). Power = share of
replicates flagged (a warning or fail finding: p_BH < alpha and a flip or a log-prob gap
above the probe's practical threshold) on the biased model; false-positive rate = the
same share on the fair one. The raw test's rejection rate is reported too. Writes bench/results/<date>-bias-validity.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from audit.adapters import load_adapter  # noqa: E402
from audit.dataset import Dataset  # noqa: E402
from probes.base import get_probe  # noqa: E402


def set_rows(model: str, data: str, attribute: str) -> pd.DataFrame:
    from audit.runner import unit_seed

    probe = get_probe("counterfactual_bias")
    adapter = load_adapter(model)
    plan = probe.plan(adapter, Dataset.load(data).audit_split())
    rows = pd.concat([probe.run(adapter, u, seed=unit_seed(0, probe.name, u.index)) for u in plan.units],
                     ignore_index=True)
    return rows[rows.attribute == attribute]


def rejection_rate(rows: pd.DataFrame, *, replicates: int, n_sets: int, alpha: float, seed: int) -> dict:
    probe = get_probe("counterfactual_bias")
    sites = np.array(sorted(rows.set_id.dropna().unique()))
    rng = np.random.default_rng(seed)
    pvals, flips, flagged = [], [], []
    for r in range(replicates):
        pick = rng.choice(sites, size=n_sets, replace=True)
        parts = [rows[rows.set_id == s].assign(set_id=f"{s}#{k}") for k, s in enumerate(pick)]
        m = probe.summarize(pd.concat(parts, ignore_index=True), seed=seed + r)
        pvals.append(float(m[m.metric == "p_value"].value.iloc[0]))
        flips.append(float(m[m.metric == "flip_rate"].value.iloc[0]))
        flagged.append(any(f["severity"] in ("warning", "fail") for f in probe.findings(m)))
    p = np.array(pvals)
    return {"replicates": replicates, "sets_per_replicate": n_sets, "alpha": alpha,
            "rejection_rate": float((p < alpha).mean()), "flag_rate": float(np.mean(flagged)), "median_p": float(np.median(p)),
            "mean_flip_rate": float(np.mean(flips)), "sets_available": int(len(sites))}


def main() -> None:
    ap = argparse.ArgumentParser()
    for k in ("biased", "biased-data", "fair", "fair-data"):
        ap.add_argument(f"--{k}", required=True)
    ap.add_argument("--attribute", default="group")
    ap.add_argument("--replicates", type=int, default=40)
    ap.add_argument("--sets", type=int, default=40)
    ap.add_argument("--alpha", type=float, default=0.05)
    a = ap.parse_args()
    res = {"date": dt.date.today().isoformat(), "attribute": a.attribute, "command": " ".join(sys.argv)}
    for label, model, data in (("biased", a.biased, a.biased_data), ("fair", a.fair, a.fair_data)):
        rows = set_rows(model, data, a.attribute)
        res[label] = rejection_rate(rows, replicates=a.replicates, n_sets=a.sets, alpha=a.alpha, seed=1)
    # The decision a user sees is the finding: significant AND practically relevant
    # (a flip or a log-prob gap above the probe's SMALL_GAP). The raw test rejects whenever
    # the log-prob moves consistently with the marker, however little.
    res["power_on_biased"] = res["biased"]["flag_rate"]
    res["false_positive_rate_on_fair"] = res["fair"]["flag_rate"]
    out = Path(__file__).parent / "results" / f"{res['date']}-bias-validity.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
