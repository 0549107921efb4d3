"""`privacy_audit`: empirical privacy leakage measured with canaries.

Canaries are manifest examples tagged `canary` whose `attributes.member` is "yes" (the
example is in the training split: the model was trained on it) or "no" (held out). Each is
an image no model could caption without memorising it and a caption of invented words
(reference_models/synthetic.py).

Score (loss-threshold membership inference, Yeom et al. 2018): s = the model's
log-probability of the canary's answer given its prompt and image, per answer word (the
matching score for a dual encoder). Members should score higher.

Metrics (group None unless noted; `variant` names the estimator):
- `mia_auc`: ROC AUC of s for member vs non-member (0.5 = no leakage): the Mann-Whitney
  U statistic over n_member · n_non-member (a tie counts one half); percentile bootstrap
  interval over canaries, or an exact one from disjoint pairs where that has zero width
  (`auc_interval`).
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
  has one, else 1/(10 N_train) (0, with an info finding, when the data has no train split).
  The headline row has variant "one_run"; rows with variant "one_run_10pct" (…25, 50; group
  "k=… (v/r correct)") give each guess count's bound.
  The synthetic data draws members as a balanced random half (exchangeable, not independent
  coin flips as the theorem assumes); with m ≥ 32 the difference is negligible in practice.
- `epsilon_lower_bound` group and variant "clopper_pearson": the classic threshold-attack estimate
  (Jagielski et al. 2020): at the score threshold maximising it among the pooled-score
  quantiles 50/75/90 %, ε ≥ max(log((1−δ−FNR⁺)/FPR⁺), log((1−δ−FPR⁺)/FNR⁺)) with one-sided
  Clopper–Pearson upper bounds FPR⁺, FNR⁺ (Bonferroni over thresholds and the two rates).
  It treats canaries as independent trials, which one training run does not strictly give,
  so it is reported beside the one-run bound, never as the headline value.
- `epsilon_theoretical` (DP models only): ε recomputed by the Opacus accountant from
  MODEL_DIR/dp_accountant.json (or the privacy block of defense.json) at its δ; variant =
  the accountant. An `epsilon_lower_bound` above it means the DP implementation is broken
  (a "fail" finding; the bound holds with 95 % confidence, so a correct DP run gets it with
  probability at most 5 %).

Data: the runner hands probes the test split, but members live in the train split, so
`plan` reloads the manifest from `data.path` (all splits, bad lines skipped), takes every
canary, reads the model's accountant state and fixes δ; units carry δ, its source and the
accountant's ε in `params` (the first unit writes them as rows for `summarize`). The
audit's data hash is unchanged because it is the same folder.

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

from audit.adapters.base import DualEncoderWhiteBox, GenerativeWhiteBox, ModelAdapter, Query
from audit.catalog import CATALOG
from audit.dataset import Dataset, Example
from audit.stats import proportion_ci, seed_for
from probes._intervals import percentile_interval, resamples
from probes.base import Plan, Probe, Unit, finding, metrics_frame, register, rows_frame

__all__ = [
    "BETA",
    "GUESS_FRACTIONS",
    "PrivacyAudit",
    "clopper_pearson",
    "clopper_pearson_epsilon",
    "auc_interval",
    "mia_auc",
    "one_run_epsilon",
    "one_run_p_value",
    "tpr_at_fpr",
]

BETA = 0.05
GUESS_FRACTIONS = (0.1, 0.25, 0.5)
THRESHOLD_QUANTILES = (0.5, 0.75, 0.9)
MEMBER = {"yes": 1, "no": 0}
DELTA_DEFAULT = "1/(10 N_train)"


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


def clopper_pearson(successes: int, n: int, *, level: float = 0.95) -> tuple[float, float]:
    """Two-sided exact binomial interval."""
    return proportion_ci(successes, n, level=level, method="exact")


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


def mia_auc(scores, members) -> float:
    """ROC AUC of `scores` for members: P(member score > non-member score) + ½ P(tie),
    i.e. the Mann-Whitney U of the members over n_member · n_non-member."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(members, dtype=int).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if not n1 or not n0:
        return float("nan")
    u = stats.mannwhitneyu(s[y], s[~y], alternative="two-sided", method="asymptotic").statistic
    return float(u) / (n1 * n0)


def _auc_bootstrap(s: np.ndarray, y: np.ndarray, *, seed: int, n_boot: int, level: float) -> tuple[float, float]:
    """bootstrap_stat of `mia_auc` with every resample ranked at once: AUC = (R₁ − n₁(n₁+1)/2) /
    (n₁n₀), R₁ the members' rank sum (average ranks for ties), which is Mann-Whitney's U."""
    if s.size == 0 or n_boot <= 0:
        return (float("nan"), float("nan"))
    idx = resamples(s.size, seed=seed, n_boot=n_boot)
    ranks, members = stats.rankdata(s[idx], axis=1), y[idx]
    n1 = members.sum(1)
    n0 = s.size - n1
    u = (ranks * members).sum(1) - n1 * (n1 + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = np.where((n1 > 0) & (n0 > 0), u / (n1 * n0), np.nan)
    return percentile_interval(auc, level=level)


def auc_interval(scores, members, *, seed: int, n_boot: int = 1000, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `mia_auc` over canaries. When every resample gives
    the same AUC (perfect separation, all scores tied) that interval has zero width; then
    it is the exact interval from disjoint (member, non-member) pairs in the given order,
    which are independent: P(X > Y) ≤ AUC ≤ P(X ≥ Y), so ties count as losses for the
    lower limit and as wins for the upper one (Clopper-Pearson on each)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(members, dtype=int).astype(bool)
    lo, hi = _auc_bootstrap(s, y, seed=seed, n_boot=n_boot, level=level)
    if np.isfinite(lo) and np.isfinite(hi) and hi > lo:
        return lo, hi
    pos, neg = s[y], s[~y]
    m = min(len(pos), len(neg))
    if m == 0:
        return (float("nan"), float("nan"))
    wins, ties = int(np.sum(pos[:m] > neg[:m])), int(np.sum(pos[:m] == neg[:m]))
    return (proportion_ci(wins, m, level=level, method="exact")[0],
            proportion_ci(wins + ties, m, level=level, method="exact")[1])


# ---------------------------------------------------------------------------- planning
def _model_dir(adapter: ModelAdapter) -> Path | None:
    """The local model folder of a white-box adapter (where a DP accountant is saved)."""
    if not isinstance(adapter, (GenerativeWhiteBox, DualEncoderWhiteBox)):
        return None
    name = getattr(adapter.model, "name_or_path", None)
    return Path(name) if name and Path(name).is_dir() else None


def _privacy_params(adapter: ModelAdapter, full: Dataset) -> dict:
    """δ (the accountant's, else 1/(10 N_train)), its source, and the accountant's ε."""
    state, path = None, _model_dir(adapter)
    if path is not None:
        from defenses.record import read_accountant

        state = read_accountant(path)
    if state is not None:
        from defenses.record import epsilon_from_accountant

        return {"delta": float(state["delta"]), "delta_source": "accountant",
                "epsilon_theoretical": epsilon_from_accountant(state), "accountant": str(state.get("accountant"))}
    n_train = sum(1 for e in full if e.split == "train" and e.answer is not None)
    return {"delta": 1.0 / (10 * n_train) if n_train else 0.0, "delta_source": DELTA_DEFAULT if n_train else "none",
            "epsilon_theoretical": None, "accountant": None}


# ---------------------------------------------------------------------------- the probe
@register
class PrivacyAudit(Probe):
    spec = CATALOG["privacy_audit"]
    unit_size = 64

    def __init__(self, *, batch_size: int = 16, beta: float = BETA, n_boot: int = 1000) -> None:
        super().__init__(batch_size=batch_size)
        if not 0 < beta < 1:
            raise ValueError("beta must be in (0, 1)")
        self.beta = beta
        self.n_boot = n_boot

    @staticmethod
    def _all_splits(data: Dataset) -> Dataset:
        # The runner passes the audit (test) split; members are in "train": reload every split.
        return Dataset.load(data.path, on_error="skip", max_image_pixels=data.max_image_pixels)

    @staticmethod
    def _canaries(full: Dataset) -> list[Example]:
        kept = full.select(tags=("canary",), predicate=lambda e: _member(e) is not None and bool(e.answer))
        return sorted(kept, key=lambda e: e.id)

    def select(self, data: Dataset) -> list[Example]:
        """Every canary with a membership label and an answer, from all splits, in id order."""
        return self._canaries(self._all_splits(data))

    def plan(self, adapter: ModelAdapter, data: Dataset, *, max_examples: int | None = None) -> Plan:
        problems = self.check(adapter)
        if problems:
            return Plan(self.name, skipped=tuple(problems))
        full = self._all_splits(data)
        examples = self._canaries(full)
        selected = len(examples)
        examples = examples[:max_examples] if max_examples is not None else examples
        params = _privacy_params(adapter, full)
        found = ()
        if params["delta_source"] == "none":
            found = (finding(self.name, "info", "the data has no train split, so delta = 0 was used for the "
                                                "epsilon lower bounds (a pure epsilon-DP claim)"),)
        return Plan(self.name, units=self.chunk(adapter, full, examples, params=params), findings=found,
                    n_selected=selected)

    def run(self, adapter: ModelAdapter, unit: Unit, *, seed: int) -> pd.DataFrame:
        data = unit.dataset()
        examples = list(unit.examples)
        name, p = self.name, unit.params
        queries = [Query(e.prompt, data.image(e), (e.answer,), example_id=e.id, variant="canary") for e in examples]
        scores = adapter.score(queries, batch_size=self.batch_size) if queries else []
        records = []
        for e, s in zip(examples, scores):
            words = max(1, len(e.answer.split()))
            records.append(dict(probe=name, metric="score", value=float(np.asarray(s)[0]) / words, example_id=e.id,
                                group="member" if _member(e) else "non_member"))
        if unit.index == 0:  # run-level facts, once
            records.append(dict(probe=name, metric="delta", value=float(p["delta"]), variant=p["delta_source"]))
            if p.get("epsilon_theoretical") is not None:
                records.append(dict(probe=name, metric="epsilon_theoretical", value=float(p["epsilon_theoretical"]),
                                    variant=p.get("accountant")))
        return rows_frame(records)

    def summarize(self, rows: pd.DataFrame, *, seed: int) -> pd.DataFrame:
        name = self.name
        sc = rows[rows.metric == "score"].sort_values("example_id", kind="stable")
        s = sc.value.to_numpy(dtype=np.float64)
        y = sc.group.eq("member").fillna(False).to_numpy(dtype=int)
        out: list[dict] = []
        d = rows[rows.metric == "delta"]
        delta = float(d.value.iloc[0]) if len(d) else 0.0
        theo = rows[rows.metric == "epsilon_theoretical"]
        if len(theo):
            out.append(dict(probe=name, metric="epsilon_theoretical", value=float(theo.value.iloc[0]), n=len(s),
                            variant=_text(theo.variant.iloc[0]), scope="overall"))
        if len(s) == 0 or y.min() == y.max():
            return metrics_frame(out)
        lo, hi = auc_interval(s, y, seed=seed_for(seed, name, "auc"), n_boot=self.n_boot)
        out.append(dict(probe=name, metric="mia_auc", value=mia_auc(s, y), ci_low=lo, ci_high=hi, n=len(s),
                        scope="overall"))
        tpr, tp, n_in = tpr_at_fpr(s, y, 0.01)
        lo, hi = clopper_pearson(tp, n_in)
        out.append(dict(probe=name, metric="tpr_at_1pct_fpr", value=tpr, ci_low=lo, ci_high=hi, n=len(s),
                        scope="overall"))
        eps, details = one_run_epsilon(s, y, delta=delta, beta=self.beta)
        out.append(dict(probe=name, metric="epsilon_lower_bound", value=eps, n=len(s), variant="one_run",
                        scope="overall"))
        for f, det in zip(GUESS_FRACTIONS, details):
            out.append(dict(probe=name, metric="epsilon_lower_bound", value=det["epsilon"], n=len(s),
                            group=f"k={det['k']} ({det['correct']}/{det['guesses']} correct)",
                            variant=f"one_run_{round(f * 100)}pct", scope="breakdown"))
        out.append(dict(probe=name, metric="epsilon_lower_bound", n=len(s), group="clopper_pearson",
                        value=clopper_pearson_epsilon(s, y, delta=delta, beta=self.beta),
                        variant="clopper_pearson", scope="breakdown"))
        out.append(dict(probe=name, metric="delta", value=delta, n=len(s), scope="overall",
                        variant=_text(d.variant.iloc[0]) if len(d) and "variant" in d else None))
        return metrics_frame(out)

    def findings(self, metrics: pd.DataFrame) -> list[dict]:
        name = self.name
        m = metrics[metrics.group.isna()].set_index("metric").value if len(metrics) else pd.Series(dtype=float)
        found = []
        if "mia_auc" not in m:
            return [finding(name, "warning",
                            "no canaries with both member 'yes' and 'no' were found; nothing to audit")]
        eps_lb, eps_th = m.get("epsilon_lower_bound"), m.get("epsilon_theoretical")
        confidence = f"{1 - self.beta:.0%}"
        if eps_th is not None and eps_lb is not None and eps_lb > eps_th + 1e-9:
            found.append(finding(name, "fail", f"empirical ε lower bound {eps_lb:.3f} exceeds the accountant's ε "
                                               f"{eps_th:.3f}: with {confidence} confidence the DP training does not "
                                               f"deliver its guarantee (false-alarm rate {self.beta:.0%})"))
        elif eps_lb is not None and eps_lb > 0:
            found.append(finding(name, "warning", f"canary membership is detectable: with {confidence} confidence "
                                                  f"the training run is not ({eps_lb:.2f}, δ)-DP (one-run audit, "
                                                  f"false-alarm rate {self.beta:.0%}; MIA AUC {m['mia_auc']:.3f})"))
        return found


def _text(v) -> str | None:
    return None if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)) else str(v)
