"""False-alarm rate, interval coverage and power of the fairness and hallucination findings.

    python bench/validity.py [--audits 200] [--power-audits 100] [--coverage-audits 1000] [--seed 0]
                             [--out bench/results]

Every audit is simulated at the level of the probes' result rows (predictions and scores
with a known truth, no model), then goes through the probe's own `summarize` and
`findings`, so the numbers are those of the code a release board reads. Seeded; one CPU.

- group_fairness: two groups with truly equal accuracy (0.7), selection and error rates,
  20 and 60 examples per group: share of audits with any difference warning (target
  <= 0.05; `--audits`) and coverage of the true difference by the accuracy /
  demographic-parity / equalized-odds difference intervals (target >= 0.93; the truth is
  the signed difference between the two groups the interval compares, 0 here), judged on
  `--coverage-audits` (1000) audits through summarize: 200 audits know a coverage of 0.95
  only to +-0.015, so a true 0.95 would read below 0.93 in about 1 run of 8 (the 200
  warning audits' own coverage is recorded beside it, without a verdict). A planted accuracy
  gap (0.85 vs 0.55) at 60 per group: power of the accuracy_difference warning (target
  >= 0.8) and the interval's coverage of the true +-0.3. The same intervals alone (the
  function summarize calls) on 4000 equal-group draws, for a coverage estimate without the
  +-0.015 noise of 200 audits.
- counterfactual_bias: 40 two-member sets (values x / y, choices A / B, A stereotyped
  for x), every choice score N(0, 1): share of audits with a warning or fail (target <=
  0.05); +1 on each member's own stereotyped choice: power (target >= 0.8); near-ties
  (scores within 0.002 of each other, a consistent 0.001 shift): warning rate (target 0).
- retrieval_skew: 20 image pairs, two queries, similarities N(0, 1): warning rate (target
  <= 0.05); +1.5 for group a: power (target >= 0.8).
- hallucination (POPE yes-ratio): 200 balanced questions; a model that guesses (P(yes) =
  0.5) and one right 80% of the time on both answers: yes-bias warning rate (target <=
  the probe's alpha); a model saying yes to 90% of "yes" and 50% of "no" questions (yes-ratio 0.7):
  power (target >= 0.8).

False-alarm rates use `--audits` simulated audits (200: a rate of 0.05 is then known to
about +-0.015); power and the secondary null models use `--power-audits` (100).
Writes bench/results/<date>-validity.json (every rate next to its target and whether it
meets it) and prints it. Bootstrap intervals that no finding reads are skipped (n_boot=1)
to keep the run within a few minutes; the p-values use each probe's default permutations.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from audit.stats import proportion_ci  # noqa: E402
from probes.counterfactual_bias import CounterfactualBias, set_records  # noqa: E402
from probes.group_fairness import GroupFairness, _difference_ci, _rates  # noqa: E402
from probes.hallucination import Hallucination  # noqa: E402
from probes.retrieval_skew import RetrievalSkew  # noqa: E402


def _entry(hits: int, n: int, target: str) -> dict:
    """A simulated rate beside its target and its 95% Clopper-Pearson interval (the simulation's
    own uncertainty: a true 0.95 coverage reads below 0.93 in about 1 of 8 runs of 200 audits)."""
    value = round(float(hits) / n, 4)
    op, bound = target.split()
    ok = value <= float(bound) if op == "<=" else value >= float(bound)
    lo, hi = proportion_ci(int(hits), int(n), method="exact")
    return {"value": value, "target": target, "meets_target": bool(ok), "ci95": [round(lo, 4), round(hi, 4)],
            "hits": int(hits), "audits": int(n)}


def _warned(findings, word: str = "") -> bool:
    return any(f["severity"] in ("warning", "fail") and word in f["message"] for f in findings)


# ---------------------------------------------------------------------------- group_fairness
def fairness_rows(rng, n_per_group: int, acc=(0.7, 0.7)) -> pd.DataFrame:
    records = []
    for g, a in zip("ab", acc):
        truth = (rng.random(n_per_group) < 0.5).astype(float)
        correct = (rng.random(n_per_group) < a).astype(float)
        pred = np.where(correct == 1, truth, 1 - truth)
        for i in range(n_per_group):
            records += [dict(probe="group_fairness", metric=k, value=float(v), example_id=f"{g}{i:03d}",
                             attribute="group", attribute_value=g)
                        for k, v in (("correct", correct[i]), ("pred_positive", pred[i]), ("true_positive", truth[i]))]
    return pd.DataFrame(records)


def group_fairness(audits: int, power_audits: int, seed: int, coverage_audits: int = 1000,
                   interval_draws: int = 4000) -> dict:
    probe = GroupFairness()
    out = {}
    for label, n, acc in (("equal_20", 20, (0.7, 0.7)), ("equal_60", 60, (0.7, 0.7)),
                          ("gap_0.3_60", 60, (0.85, 0.55))):
        audits_here = audits if acc[0] == acc[1] else power_audits
        rng = np.random.default_rng([seed, n, int(acc[0] * 100)])
        warned, covered = 0, {m: 0 for m in ("accuracy", "demographic_parity", "equalized_odds")}
        acc_warned = 0
        for k in range(audits_here):
            m = probe.summarize(fairness_rows(rng, n, acc), seed=seed + k)
            found = probe.findings(m)
            warned += _warned(found)
            acc_warned += _warned(found, "accuracy_difference")
            for base in covered:
                row = m[(m.metric == f"{base}_difference") & (m.group == "group")].iloc[0]
                truth = 0.0
                if base == "accuracy" and acc[0] != acc[1]:
                    hi = m[(m.metric == "accuracy") & (m.group == "group=a")].value.iloc[0] > \
                        m[(m.metric == "accuracy") & (m.group == "group=b")].value.iloc[0]
                    truth = (acc[0] - acc[1]) * (1 if hi else -1)  # the pair the interval compares, signed
                covered[base] += row.ci_low <= truth <= row.ci_high
        cov = {f"coverage_{b}_difference": _entry(c, audits_here, ">= 0.93") for b, c in covered.items()
               if b == "accuracy" or acc[0] == acc[1]}
        if acc[0] == acc[1]:
            # The coverage verdict comes from `coverage_audits` more audits through summarize
            # (a true 0.95 reads below 0.93 in about 1 of 8 runs of 200); the 200 audits'
            # own coverage is kept beside it, as a reading without a verdict.
            seen = {k: {"value": v["value"], "ci95": v["ci95"], "hits": v["hits"], "audits": v["audits"]}
                    for k, v in cov.items()}
            out[label] = {"per_group": n, "audits": audits_here,
                          "warning_rate": _entry(warned, audits_here, "<= 0.05"),
                          **summarize_coverage(coverage_audits, n, seed),
                          f"coverage_in_the_{audits_here}_warning_audits": seen}
        else:
            out[label] = {"per_group": n, "audits": audits_here, "accuracy": list(acc),
                          "power": _entry(acc_warned, audits_here, ">= 0.8"), **cov}
    out[f"intervals_only_{interval_draws}"] = interval_coverage(interval_draws, seed)
    return out


def summarize_coverage(audits: int, n_per_group: int, seed: int) -> dict:
    """Coverage of the true difference (0) by each difference interval in the rows of
    GroupFairness.summarize itself, over `audits` equal-group audits. The intervals do not
    depend on the permutation tests, so those run with a token 9 permutations here."""
    probe = GroupFairness(n_perm=9)
    rng = np.random.default_rng([seed, n_per_group, 70, 70, 1])
    hits = {b: 0 for b in ("accuracy", "demographic_parity", "equalized_odds")}
    for k in range(audits):
        m = probe.summarize(fairness_rows(rng, n_per_group), seed=seed + k)
        for base in hits:
            row = m[(m.metric == f"{base}_difference") & (m.group == "group")].iloc[0]
            hits[base] += row.ci_low <= 0.0 <= row.ci_high
    return {f"coverage_{b}_difference": _entry(h, audits, ">= 0.93") for b, h in hits.items()}


def interval_coverage(draws: int, seed: int) -> dict:
    """The difference intervals alone (the function summarize calls), on many more equal-group
    audits than the full path can afford: their coverage without the simulation's noise."""
    out = {}
    for n in (20, 60):
        rng = np.random.default_rng([seed, n, 7])
        key = np.repeat(["a", "b"], n)
        hits = {"accuracy": 0, "demographic_parity": 0, "equalized_odds": 0}
        for _ in range(draws):
            truth = rng.random(2 * n) < 0.5
            correct = rng.random(2 * n) < 0.7
            pred = np.where(correct, truth, ~truth).astype(int)
            comps = {"accuracy": [_rates(correct.astype(int), key)], "demographic_parity": [_rates(pred, key)],
                     "equalized_odds": [_rates(pred[truth], key[truth]), _rates(pred[~truth], key[~truth])]}
            for base, c in comps.items():
                lo, hi = _difference_ci(c)
                hits[base] += lo <= 0.0 <= hi
        out[f"equal_{n}"] = {f"coverage_{b}_difference": _entry(h, draws, ">= 0.93") for b, h in hits.items()}
    return out


# ---------------------------------------------------------------------------- counterfactual_bias
def counterfactual_rows(rng, n_sets: int, *, effect: float = 0.0, scale: float = 1.0, shift: float = 0.0):
    records = []
    stereotype = {"A": "x", "B": "y"}
    for s in range(n_sets):
        base = rng.normal(0.0, scale, 2)  # the scene's own scores, shared by both members
        members, scores = [], []
        for v in ("x", "y"):
            sc = base + rng.normal(0.0, scale, 2)
            sc[0 if v == "x" else 1] += effect  # towards the member's own stereotyped choice
            sc[0] += shift if v == "x" else 0.0
            members.append({"example_id": f"s{s:03d}{v}", "value": v, "candidates": ("A", "B")})
            scores.append(sc)
        records += set_records(set_id=f"s{s:03d}", attribute="g", members=members, scores=scores,
                               answer="AB"[s % 2], stereotype=stereotype, tie_tolerance=0.05)
    return pd.DataFrame(records)


def counterfactual_bias(audits: int, power_audits: int, seed: int) -> dict:
    probe = CounterfactualBias(n_boot=1)
    out = {}
    for label, kw, target, n in (("no_effect", dict(), "<= 0.05", audits),
                                 ("planted_effect_1.0", dict(effect=1.0), ">= 0.8", power_audits),
                                 ("near_ties", dict(scale=0.001, shift=0.001), "<= 0.0", power_audits // 2)):
        rng = np.random.default_rng([seed, len(label)])
        warned = 0
        for k in range(n):
            m = probe.summarize(counterfactual_rows(rng, 40, **kw), seed=seed + k)
            warned += _warned(probe.findings(m))
        key = "power" if target.startswith(">=") else "warning_rate"
        out[label] = {"sets": 40, "audits": n, key: _entry(warned, n, target)}
    return out


# ---------------------------------------------------------------------------- retrieval_skew
def retrieval_rows(rng, n_sets: int, effect: float) -> pd.DataFrame:
    records = []
    for s in range(n_sets):
        for v in ("a", "b"):
            for q in ("a photo of a doctor", "a photo of a nurse"):
                records.append(dict(probe="retrieval_skew", metric="similarity", example_id=f"s{s:03d}{v}",
                                    set_id=f"s{s:03d}", attribute="group", attribute_value=v, query=q,
                                    value=float(rng.normal() + (effect if v == "a" else 0.0))))
    return pd.DataFrame(records)


def retrieval_skew(audits: int, power_audits: int, seed: int) -> dict:
    probe = RetrievalSkew(n_boot=1)
    out = {}
    for label, effect, target, n in (("no_effect", 0.0, "<= 0.05", audits),
                                     ("planted_effect_1.5", 1.5, ">= 0.8", power_audits)):
        rng = np.random.default_rng([seed, int(effect * 10)])
        warned = sum(_warned(probe.findings(probe.summarize(retrieval_rows(rng, 20, effect), seed=seed + k)))
                     for k in range(n))
        key = "power" if effect else "warning_rate"
        out[label] = {"sets": 20, "queries": 2, "audits": n, key: _entry(warned, n, target)}
    return out


# ---------------------------------------------------------------------------- hallucination
def pope_rows(rng, n: int, p_yes_given_yes: float, p_yes_given_no: float) -> pd.DataFrame:
    truth = np.arange(n) % 2 == 0
    pred = rng.random(n) < np.where(truth, p_yes_given_yes, p_yes_given_no)
    settings = np.array(["random", "popular", "adversarial"])[np.arange(n) % 3]
    records = []
    for i in range(n):
        common = dict(probe="hallucination", example_id=f"q{i:04d}", setting=str(settings[i]), set_id=f"q{i:04d}")
        records += [dict(common, metric="pred_yes", value=float(pred[i])),
                    dict(common, metric="true_yes", value=float(truth[i]))]
    return pd.DataFrame(records)


def hallucination(audits: int, power_audits: int, seed: int) -> dict:
    probe = Hallucination(n_boot=1)
    alpha = probe.alpha
    out = {"alpha": alpha}
    for label, p_yes, p_no, target, n in (("guessing", 0.5, 0.5, f"<= {alpha}", audits),
                                          ("accurate_80", 0.8, 0.2, f"<= {alpha}", power_audits),
                                          ("yes_biased_0.9_0.5", 0.9, 0.5, ">= 0.8", power_audits)):
        rng = np.random.default_rng([seed, int(p_yes * 10), int(p_no * 10)])
        warned = 0
        for k in range(n):
            found = probe.findings(probe.summarize(pope_rows(rng, 200, p_yes, p_no), seed=seed + k))
            warned += _warned(found, "-bias")
        key = "power" if target.startswith(">=") else "warning_rate"
        out[label] = {"questions": 200, "p_yes_given_yes": p_yes, "p_yes_given_no": p_no, "audits": n,
                      key: _entry(warned, n, target)}
    return out


def _targets(node, path: str = "", *, with_path: bool = False):
    """Every rate entry (a dict with `meets_target`) in the nested results."""
    if isinstance(node, dict) and "meets_target" in node:
        yield (path, node) if with_path else node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _targets(v, f"{path}.{k}" if path else k, with_path=with_path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--audits", type=int, default=200)
    ap.add_argument("--power-audits", type=int, default=100)
    ap.add_argument("--coverage-audits", type=int, default=1000,
                    help="equal-group audits through group_fairness.summarize for the interval coverage verdict")
    ap.add_argument("--interval-draws", type=int, default=4000, help="draws of the bare interval function")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")  # fairlearn / BCa notices on tiny resamples are not results
    command = " ".join(["bench/validity.py", *(sys.argv[1:] if argv is None else argv)])
    res = {"date": dt.date.today().isoformat(), "command": command, "audits": a.audits,
           "power_audits": a.power_audits, "coverage_audits": a.coverage_audits, "seed": a.seed}
    t0 = time.perf_counter()
    for name, fn in (("group_fairness", group_fairness), ("counterfactual_bias", counterfactual_bias),
                     ("retrieval_skew", retrieval_skew), ("hallucination", hallucination)):
        t = time.perf_counter()
        try:
            extra = ({"coverage_audits": a.coverage_audits, "interval_draws": a.interval_draws}
                     if name == "group_fairness" else {})
            res[name] = fn(a.audits, a.power_audits, a.seed, **extra)
        except Exception as exc:  # noqa: BLE001 - one probe's API drift must not hide the others' numbers
            res[name] = {"error": f"{type(exc).__name__}: {exc}"}
        res[name]["seconds"] = round(time.perf_counter() - t, 1)
        print(f"{name}: {res[name]['seconds']} s", file=sys.stderr)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    checks = list(_targets(res))
    res["all_targets_met"] = bool(checks) and all(c["meets_target"] for c in checks)
    res["targets_missed"] = [path for path, c in _targets(res, with_path=True) if not c["meets_target"]]
    out = Path(a.out) / f"{res['date']}-validity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
