"""`privacy_audit`: empirical privacy leakage measured with canaries.

Canaries are manifest examples tagged `canary` whose `attributes.member` is "yes" (the
example is in the training split: the model was trained on it) or "no" (held out). Each is
an image no model could caption without memorising it and a caption of invented words
(reference_models/synthetic.py).

Score (loss-threshold membership inference, Yeom et al. 2018): s = the model's
log-probability of the canary's answer given its prompt and image, per answer word (the
matching score for a dual encoder). Members should score higher.

Metrics (group None unless noted):
- `mia_auc`: ROC AUC of s for member vs non-member (0.5 = no leakage); percentile
  bootstrap interval over canaries.
- `tpr_at_1pct_fpr`: the largest true-positive rate at a threshold whose false-positive
  rate is ≤ 1 %; its interval is Clopper–Pearson (95 %) on the members above that threshold.
- `epsilon_lower_bound`: the one-run audit of Steinke, Nasr & Jagielski (2023), "Privacy
  Auditing with One (1) Training Run" (NeurIPS). The auditor guesses "member" for the k
  top-scored canaries and "non-member" for the k bottom-scored ones and abstains on the rest;
  r = 2k guesses, v of them correct, m canaries. For an (ε, δ)-DP training run with canaries
  included independently with probability ½, their Theorem 3.1 bounds the chance of v or more
  correct guesses by
      p(ε, δ) = P[Bin(r, q) ≥ v] + 2 m δ · max_{1≤i≤v} P[v − i ≤ Bin(r, q) < v] / i,
      q = e^ε / (1 + e^ε).
  ε̂ = sup{ε ≥ 0 : p(ε, δ) < β} (bisection), reported at β = 0.05: with 95 % confidence the
  run is not (ε̂, δ)-DP. k is tried at 10 %, 25 % and 50 % of m per side, each at β/3
  (Bonferroni), so choosing the best k keeps the level. δ is the accountant's when the model
  has one, else 1/(10 N_train). Rows with group "k=…" give each guess count's bound.
  The synthetic data draws members as a balanced random half (exchangeable, not independent
  coin flips as the theorem assumes); with m ≥ 32 the difference is negligible in practice.
- `epsilon_lower_bound` group "clopper_pearson": the classic threshold-attack estimate
  (Jagielski et al. 2020): at the score threshold maximising it among the pooled-score
  quantiles 50/75/90 %, ε ≥ max(log((1−δ−FNR⁺)/FPR⁺), log((1−δ−FPR⁺)/FNR⁺)) with one-sided
  Clopper–Pearson upper bounds FPR⁺, FNR⁺ (Bonferroni over thresholds and the two rates).
  It treats canaries as independent trials, which one training run does not strictly give,
  so it is reported beside the one-run bound, never as the headline value.
- `epsilon_theoretical` (DP models only): ε recomputed by the Opacus accountant from
  MODEL_DIR/dp_accountant.json (or the privacy block of defense.json) at its δ. An
  `epsilon_lower_bound` above it means the DP implementation is broken (a "fail" finding).

Data: the runner hands probes the test split, but members live in the train split, so
`select` reloads the manifest from `data.path` (all splits, bad lines skipped) and returns
every canary; the audit's data hash is unchanged because it is the same folder.

Not done: offline LiRA (Carlini et al. 2022) would need tens of shadow models trained with
and without each canary — minutes per shadow even for the tiny reference model — and is
left out; the loss-threshold score is the attack used.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from audit.adapters.base import ModelAdapter, Query
from audit.dataset import Dataset, Example
from probes._stats import bootstrap_stat, seed_for
from probes.base import METRIC_COLUMNS, Probe, ProbeInfo, register, rows_frame

__all__ = [
    "BETA",
    "GUESS_FRACTIONS",
    "PrivacyAudit",
    "clopper_pearson",
    "clopper_pearson_epsilon",
    "one_run_epsilon",
    "one_run_p_value",
    "tpr_at_fpr",
]

BETA = 0.05
GUESS_FRACTIONS = (0.1, 0.25, 0.5)
THRESHOLD_QUANTILES = (0.5, 0.75, 0.9)
MEMBER = {"yes": 1, "no": 0}


def _member(e: Example) -> int | None:
    return MEMBER.get(str(e.attributes.get("member", "")).lower())


# ---------------------------------------------------------------------------- statistics
def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Steinke et al. (2023) Thm 3.1: P[≥ v of r guesses correct] under (ε, δ)-DP, m canaries."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    q = 1.0 / (1.0 + math.exp(-eps))
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    alpha, below = 0.0, 0.0
    for i in range(1, v + 1):
        below += float(stats.binom.pmf(v - i, r, q))  # P[v - i <= Bin < v]
        alpha = max(alpha, below / i)
    return min(1.0, tail + 2 * m * delta * alpha)


def _largest_eps(p_of_eps, beta: float, *, eps_max: float = 50.0, iters: int = 60) -> float:
    """sup{ε ≥ 0 : p(ε) < β} for p non-decreasing in ε (0 when even ε = 0 is not rejected)."""
    if p_of_eps(0.0) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_of_eps(hi) < beta:
        lo, hi = hi, hi * 2
        if hi > eps_max:
            return eps_max
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_of_eps(mid) < beta else (lo, mid)
    return lo


def one_run_epsilon(scores, members, *, delta: float, beta: float = BETA,
                    fractions=GUESS_FRACTIONS) -> tuple[float, list[dict]]:
    """(ε̂, per-k details): the best Bonferroni-corrected one-run lower bound."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(members, dtype=int)
    m = len(s)
    order = np.argsort(-s, kind="stable")
    details, best = [], 0.0
    for f in fractions:
        k = min(max(1, int(math.floor(f * m))), m // 2)
        if k < 1:
            continue
        v = int(y[order[:k]].sum() + (1 - y[order[m - k:]]).sum())
        eps = _largest_eps(lambda e, k=k, v=v: one_run_p_value(m, 2 * k, v, e, delta), beta / len(fractions))
        details.append({"k": k, "guesses": 2 * k, "correct": v, "epsilon": eps})
        best = max(best, eps)
    return best, details


def clopper_pearson(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided exact binomial interval."""
    if n == 0:
        return (float("nan"), float("nan"))
    a = 1 - level
    lo = 0.0 if successes == 0 else float(stats.beta.ppf(a / 2, successes, n - successes + 1))
    hi = 1.0 if successes == n else float(stats.beta.ppf(1 - a / 2, successes + 1, n - successes))
    return lo, hi


def _cp_upper(successes: int, n: int, alpha: float) -> float:
    return 1.0 if successes >= n else float(stats.beta.ppf(1 - alpha, successes + 1, n - successes))


def clopper_pearson_epsilon(scores, members, *, delta: float, beta: float = BETA,
                            quantiles=THRESHOLD_QUANTILES) -> float:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(members, dtype=int).astype(bool)
    n_in, n_out = int(y.sum()), int((~y).sum())
    if not n_in or not n_out:
        return float("nan")
    alpha = beta / (2 * len(quantiles))
    best = 0.0
    for t in np.quantile(s, quantiles):
        guess = s >= t
        fp, fn = int((guess & ~y).sum()), int((~guess & y).sum())
        fpr, fnr = _cp_upper(fp, n_out, alpha), _cp_upper(fn, n_in, alpha)
        for num, den in ((1 - delta - fnr, fpr), (1 - delta - fpr, fnr)):
            if num > 0 and den > 0:
                best = max(best, math.log(num / den))
    return best


def tpr_at_fpr(scores, members, fpr: float = 0.01) -> tuple[float, int, int]:
    """(TPR, members above the threshold, members) at the lowest threshold with FPR ≤ fpr."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(members, dtype=int).astype(bool)
    neg, pos = np.sort(s[~y])[::-1], s[y]
    allowed = int(math.floor(fpr * len(neg)))  # false positives tolerated
    # threshold strictly above the (allowed+1)-th highest non-member score
    t = neg[allowed] if allowed < len(neg) else -np.inf
    tp = int((pos > t).sum())
    return (tp / len(pos) if len(pos) else float("nan")), tp, len(pos)


def _auc(scores, members) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(members, dtype=int)
    if y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, scores))


# ---------------------------------------------------------------------------- the probe
def _model_dir(adapter: ModelAdapter) -> Path | None:
    name = getattr(getattr(adapter, "model", None), "name_or_path", None)
    return Path(name) if name and Path(name).is_dir() else None


@register
class PrivacyAudit(Probe):
    info = ProbeInfo(
        name="privacy_audit",
        category="privacy",
        description="Membership inference on canaries (loss threshold): ROC AUC, TPR at 1% FPR, and a one-run "
                    "lower bound on the training run's ε, beside the accountant's ε for DP models.",
        citation="Steinke, Nasr & Jagielski 2023, Privacy Auditing with One (1) Training Run (NeurIPS); "
                 "Jagielski, Ullman & Oprea 2020, Auditing Differentially Private Machine Learning (NeurIPS); "
                 "Yeom et al. 2018, Privacy Risk in Machine Learning (CSF)",
        cost_per_example=1.0,
        metrics=("epsilon_lower_bound", "epsilon_theoretical", "mia_auc", "tpr_at_1pct_fpr", "delta"),
    )
    unit_size = 64

    def __init__(self, *, beta: float = BETA, n_boot: int = 1000) -> None:
        self.beta = beta
        self.n_boot = n_boot
        self._default_delta: float | None = None

    def select(self, data: Dataset) -> Dataset:
        # The runner passes the audit (test) split; members are in "train": reload every split.
        full = Dataset.load(data.path, on_error="skip")
        n_train = sum(1 for e in full if e.split == "train" and e.answer is not None)
        self._default_delta = 1.0 / (10 * n_train) if n_train else None
        return full.select(tags=("canary",), predicate=lambda e: _member(e) is not None and bool(e.answer))

    def run(self, adapter: ModelAdapter, data: Dataset, *, seed: int) -> pd.DataFrame:
        examples = list(data)
        name = self.info.name
        queries = [Query(e.prompt, data.image(e), (e.answer,)) for e in examples]
        scores = adapter.score(queries) if queries else []
        records = []
        for e, s in zip(examples, scores):
            words = max(1, len(e.answer.split()))
            records.append(dict(probe=name, metric="score", value=float(np.asarray(s)[0]) / words, example_id=e.id,
                                group="member" if _member(e) else "non_member", site=None, variant=None))
        state, path = None, _model_dir(adapter)
        if path is not None:
            from defenses.record import epsilon_from_accountant, read_accountant

            state = read_accountant(path)
        if state is not None:
            records.append(dict(probe=name, metric="epsilon_theoretical", value=epsilon_from_accountant(state),
                                example_id=None, group=None, site=state.get("accountant"), variant=None))
            records.append(dict(probe=name, metric="delta", value=float(state["delta"]), example_id=None,
                                group=None, site="accountant", variant=None))
        elif self._default_delta is not None:
            records.append(dict(probe=name, metric="delta", value=self._default_delta, example_id=None,
                                group=None, site="1/(10 N_train)", variant=None))
        return rows_frame(records)

    def summarize(self, rows: pd.DataFrame, *, seed: int) -> pd.DataFrame:
        name = self.info.name
        sc = rows[rows.metric == "score"].sort_values("example_id")
        s = sc.value.to_numpy(dtype=np.float64)
        y = (sc.group == "member").to_numpy(dtype=int)
        out: list[tuple] = []
        d = rows[rows.metric == "delta"].value
        delta = float(d.iloc[0]) if len(d) else 0.0
        theo = rows[rows.metric == "epsilon_theoretical"]
        if len(theo):
            out.append((name, "epsilon_theoretical", float(theo.value.iloc[0]), np.nan, np.nan, None, len(s)))
        if len(s) == 0 or y.min() == y.max():
            return pd.DataFrame(out, columns=METRIC_COLUMNS)
        s_seed = seed_for(seed, name)
        auc = _auc(s, y)
        lo, hi = bootstrap_stat(len(s), lambda idx: _auc(s[idx], y[idx]), seed=s_seed, n_boot=self.n_boot)
        out.append((name, "mia_auc", auc, lo, hi, None, len(s)))
        tpr, tp, n_in = tpr_at_fpr(s, y, 0.01)
        cp_lo, cp_hi = clopper_pearson(tp, n_in)
        out.append((name, "tpr_at_1pct_fpr", tpr, cp_lo, cp_hi, None, len(s)))
        eps, details = one_run_epsilon(s, y, delta=delta, beta=self.beta)
        out.append((name, "epsilon_lower_bound", eps, np.nan, np.nan, None, len(s)))
        for det in details:
            out.append((name, "epsilon_lower_bound", det["epsilon"], np.nan, np.nan,
                        f"k={det['k']} ({det['correct']}/{det['guesses']} correct)", len(s)))
        out.append((name, "epsilon_lower_bound", clopper_pearson_epsilon(s, y, delta=delta, beta=self.beta),
                    np.nan, np.nan, "clopper_pearson", len(s)))
        out.append((name, "delta", delta, np.nan, np.nan, None, len(s)))
        return pd.DataFrame(out, columns=METRIC_COLUMNS)

    def findings(self, metrics: pd.DataFrame) -> list[dict]:
        name = self.info.name
        m = metrics[metrics.group.isna()].set_index("metric").value if len(metrics) else pd.Series(dtype=float)
        found = []
        if "mia_auc" not in m:
            found.append({"probe": name, "severity": "warning",
                          "message": "no canaries with both member 'yes' and 'no' were found; nothing to audit"})
            return found
        eps_lb, eps_th = m.get("epsilon_lower_bound"), m.get("epsilon_theoretical")
        if eps_th is not None and eps_lb is not None and eps_lb > eps_th + 1e-9:
            found.append({"probe": name, "severity": "fail",
                          "message": f"empirical ε lower bound {eps_lb:.3f} exceeds the accountant's ε {eps_th:.3f}: "
                                     "the DP training does not deliver its guarantee"})
        elif eps_lb is not None and eps_lb > 0:
            found.append({"probe": name, "severity": "warning",
                          "message": f"canary membership is detectable: with 95% confidence the training run is not "
                                     f"({eps_lb:.2f}, δ)-DP (MIA AUC {m['mia_auc']:.3f})"})
        return found
