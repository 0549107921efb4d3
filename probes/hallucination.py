"""`hallucination`: POPE-style object presence questions ("is there a red circle?").

Audited examples: tagged "pope", with "yes" and "no" among the choices (any case) and a
yes/no reference answer. The predicted answer is the higher-scored of "yes"/"no" (other
choices are ignored), so black-box endpoints work. "yes" is the positive class, as in
POPE's evaluate.py (Li et al. 2023):

  pope_accuracy  = (TP + TN) / N            pope_precision = TP / (TP + FP)
  pope_yes_ratio = (TP + FP) / N            pope_recall    = TP / (TP + FN)
  pope_f1        = 2 · precision · recall / (precision + recall)
  pope_true_yes_ratio = (TP + FN) / N   (the yes-ratio of a model without a yes/no bias)

Negative-sampling settings (metric rows with `setting`, group = the setting's name):
- Upstream POPE files carry `attributes.pope_setting` (random / popular / adversarial) on
  every question, "yes" and "no" alike; a setting's metrics use exactly its questions, so
  they equal POPE's evaluate.py run on that setting's file.
- The synthetic data marks only the "no" questions (`attributes.pope_negative`); then a
  setting is every "yes" question without a setting plus that setting's "no" questions (a
  "no" question without either attribute counts as "unspecified"). In general, "yes"
  questions without a setting join every setting that has no "yes" question of its own.

Overall metrics (group null) pool every question once: POPE repeats the same positive
questions in all three setting files, so questions are deduplicated by (image, question
text, reference answer) before pooling, keeping the prediction of the lowest example id.
Rows carry that identity (a hash) in `set_id` and the question's setting in `setting`.

Intervals: Wilson (95 %) for accuracy, yes-ratio, precision and recall (each a binomial
proportion with its own denominator); F1, a ratio of counts, gets a seeded percentile
bootstrap over questions, or, where every resample gives the same F1 (a perfect model),
the exact bound `f1_exact_interval` instead of a zero-width interval.

Findings (overall questions only, so each is one test): a yes/no bias is an exact
two-sided binomial test of the number of "yes" answers against the data's true yes share
(false-alarm rate `alpha`, default 1 %) — a warning when the yes-ratio also differs from
it by at least 0.15, an info finding for a significant smaller gap; near-chance accuracy
is an exact one-sided test that rejects "accuracy ≥ chance + 0.10" (chance = the accuracy
of always giving the more frequent answer) at `alpha`.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
from scipy import stats

from audit.adapters.base import ModelAdapter, Query
from audit.catalog import CATALOG
from audit.dataset import Dataset, Example
from audit.stats import LEVEL, proportion_ci, seed_for
from probes._intervals import percentile_interval, resamples
from probes.base import Probe, Unit, finding, metrics_frame, register, rows_frame

__all__ = ["Hallucination", "pope_scores", "f1_exact_interval", "f1_interval", "question_key", "yes_bias_test", "below_chance_test", "UNSPECIFIED"]

UNSPECIFIED = "unspecified"
ALPHA = 0.01
YES_BIAS_EFFECT = 0.15  # |yes-ratio − true yes share| that makes a significant bias a warning
CHANCE_MARGIN = 0.10  # accuracy below chance + this margin is "near chance"


def pope_scores(truth, pred) -> dict[str, float]:
    """POPE metrics from 0/1 arrays (1 = "yes"); undefined ratios are NaN."""
    truth, pred = np.asarray(truth, bool), np.asarray(pred, bool)
    c = _counts(truth, pred)
    tp, fp, fn, n = c["tp"], c["fp"], c["fn"], truth.size
    precision = tp / (tp + fp) if tp + fp else np.nan
    recall = tp / (tp + fn) if tp + fn else np.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else (0.0 if fp or fn else np.nan)
    return {"pope_accuracy": (tp + c["tn"]) / n if n else np.nan,
            "pope_yes_ratio": (tp + fp) / n if n else np.nan,
            "pope_precision": precision, "pope_recall": recall, "pope_f1": f1,
            "pope_true_yes_ratio": (tp + fn) / n if n else np.nan}


def _counts(truth: np.ndarray, pred: np.ndarray) -> dict[str, int]:
    return {"tp": int(np.sum(truth & pred)), "fp": int(np.sum(~truth & pred)),
            "fn": int(np.sum(truth & ~pred)), "tn": int(np.sum(~truth & ~pred))}


def _harmonic(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def f1_exact_interval(tp: int, fp: int, fn: int, *, level: float = LEVEL) -> tuple[float, float]:
    """Conservative interval of F1 from simultaneous Clopper-Pearson intervals of precision
    and recall (each at 1 − (1 − level)/2, Bonferroni): F1, their harmonic mean, is
    increasing in both. An undefined precision (no "yes" answers) ranges over [0, 1]."""
    each = 1 - (1 - level) / 2
    p = proportion_ci(tp, tp + fp, level=each, method="exact") if tp + fp else (0.0, 1.0)
    r = proportion_ci(tp, tp + fn, level=each, method="exact") if tp + fn else (0.0, 1.0)
    return _harmonic(p[0], r[0]), _harmonic(p[1], r[1])


def f1_interval(truth, pred, *, seed: int, n_boot: int = 1000) -> tuple[float, float]:
    """Percentile bootstrap interval of POPE's F1 over questions: bootstrap_stat over
    `pope_scores(...)["pope_f1"]`, with every resample counted at once."""
    truth, pred = np.asarray(truth, bool), np.asarray(pred, bool)
    if truth.size == 0 or n_boot <= 0:
        return (np.nan, np.nan)
    idx = resamples(truth.size, seed=seed, n_boot=n_boot)
    t, p = truth[idx], pred[idx]
    tp, fp, fn = (t & p).sum(1), (~t & p).sum(1), (t & ~p).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tp > 0, 2 * tp / (2 * tp + fp + fn), np.where((fp > 0) | (fn > 0), 0.0, np.nan))
    return percentile_interval(f1)


def question_key(e: Example) -> str:
    """Identity of a question across setting files: image, question text, reference answer."""
    text = " ".join(e.prompt.split()).lower()
    raw = "\0".join((e.image or "", text, e.answer.strip().lower()))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _yes_no(ex: Example) -> tuple[int, int] | None:
    lowered = [c.strip().lower() for c in ex.choices or ()]
    if "yes" in lowered and "no" in lowered:
        return lowered.index("yes"), lowered.index("no")
    return None


def _setting(e: Example, truth: bool) -> str | None:
    explicit = e.attributes.get("pope_setting")
    if explicit:
        return str(explicit)
    return None if truth else str(e.attributes.get("pope_negative") or UNSPECIFIED)


def yes_bias_test(n_yes: int, n: int, true_share: float) -> float:
    """Exact two-sided binomial p-value of `n_yes` "yes" answers out of `n` when the model
    says "yes" with the data's true yes share."""
    if n <= 0 or not np.isfinite(true_share):
        return float("nan")
    return float(stats.binomtest(int(n_yes), int(n), float(true_share)).pvalue)


def below_chance_test(n_correct: int, n: int, chance: float, *, margin: float = CHANCE_MARGIN) -> float:
    """Exact one-sided p-value of H0 "accuracy ≥ chance + margin" (small p: near chance)."""
    bar = min(1.0, chance + margin)
    if n <= 0 or bar >= 1.0:
        return float("nan")
    return float(stats.binomtest(int(n_correct), int(n), bar, alternative="less").pvalue)


@register
class Hallucination(Probe):
    spec = CATALOG["hallucination"]

    def __init__(self, *, batch_size: int = 16, n_boot: int = 1000, alpha: float = ALPHA) -> None:
        super().__init__(batch_size=batch_size)
        if not 0 < alpha < 1:
            raise ValueError("alpha must be in (0, 1)")
        self.n_boot = n_boot
        self.alpha = alpha

    def select(self, data: Dataset) -> list[Example]:
        kept = data.select(tags=("pope",), exclude_tags=("canary",),
                           predicate=lambda e: e.image is not None and _yes_no(e) is not None
                           and (e.answer or "").strip().lower() in ("yes", "no"))
        return sorted(kept, key=lambda e: e.id)

    def run(self, adapter: ModelAdapter, unit: Unit, *, seed: int) -> pd.DataFrame:
        data = unit.dataset()
        examples = list(unit.examples)
        queries = [Query(e.prompt, data.image(e), tuple(e.choices), example_id=e.id, variant="none") for e in examples]
        scores = adapter.score(queries, batch_size=self.batch_size) if queries else []
        records = []
        for e, s in zip(examples, scores):
            yes, no = _yes_no(e)
            truth = e.answer.strip().lower() == "yes"
            common = dict(probe=self.name, example_id=e.id, setting=_setting(e, truth), set_id=question_key(e))
            records += [dict(common, metric="pred_yes", value=float(s[yes] > s[no])),
                        dict(common, metric="true_yes", value=float(truth))]
        return rows_frame(records)

    # ------------------------------------------------------------------ summary
    @staticmethod
    def _table(rows: pd.DataFrame) -> pd.DataFrame:
        t = rows.pivot_table(index="example_id", columns="metric", values="value", aggfunc="first")
        first = rows.drop_duplicates("example_id").set_index("example_id")
        key = first.set_id.reindex(t.index).fillna(pd.Series(t.index, index=t.index))  # v1 rows: no key
        return t.assign(setting=first.setting.reindex(t.index), key=key).sort_index()

    @staticmethod
    def _subsets(t: pd.DataFrame) -> list[tuple[str | None, pd.DataFrame]]:
        unique = t.drop_duplicates("key", keep="first")  # sorted by example id: the lowest id stays
        out: list[tuple[str | None, pd.DataFrame]] = [(None, unique)]
        floating = t.setting.isna() & (t.true_yes == 1)  # "yes" questions that belong to no one setting
        for s in sorted(t.setting.dropna().unique()):
            own = t.setting == s
            has_yes = bool((own & (t.true_yes == 1)).any())
            out.append((s, t[own] if has_yes else t[own | floating]))
        return out

    def summarize(self, rows: pd.DataFrame, *, seed: int) -> pd.DataFrame:
        out: list[dict] = []
        if rows.empty:
            return metrics_frame(out)
        for setting, part in self._subsets(self._table(rows)):
            out += self._metrics(part, setting, seed)
        return metrics_frame(out)

    def _metrics(self, part: pd.DataFrame, setting: str | None, seed: int) -> list[dict]:
        truth, pred = part.true_yes.to_numpy() == 1, part.pred_yes.to_numpy() == 1
        c, n = _counts(truth, pred), len(part)
        point = pope_scores(truth, pred)
        fractions = {"pope_accuracy": (c["tp"] + c["tn"], n), "pope_yes_ratio": (c["tp"] + c["fp"], n),
                     "pope_precision": (c["tp"], c["tp"] + c["fp"]), "pope_recall": (c["tp"], c["tp"] + c["fn"]),
                     "pope_true_yes_ratio": (c["tp"] + c["fn"], n)}
        intervals = {m: proportion_ci(k, d) for m, (k, d) in fractions.items()}
        lo, hi = f1_interval(truth, pred, seed=seed_for(seed, self.name, "f1", str(setting)), n_boot=self.n_boot)
        # every resample alike (a perfect model): no zero-width interval, the exact bound instead
        intervals["pope_f1"] = (lo, hi) if hi > lo else f1_exact_interval(c["tp"], c["fp"], c["fn"])
        dims = dict(group=setting, setting=setting, scope="overall" if setting is None else "breakdown")
        return [dict(probe=self.name, metric=m, value=point[m], ci_low=intervals[m][0], ci_high=intervals[m][1],
                     n=n, **dims) for m in point]

    # ------------------------------------------------------------------ findings
    def findings(self, metrics: pd.DataFrame) -> list[dict]:
        if metrics.empty:
            return []
        overall = metrics[metrics.group.isna()].set_index("metric")
        need = {"pope_yes_ratio", "pope_accuracy", "pope_true_yes_ratio"}
        if not need <= set(overall.index):
            return []
        n = int(overall.loc["pope_yes_ratio", "n"])
        yes, acc = float(overall.loc["pope_yes_ratio", "value"]), float(overall.loc["pope_accuracy", "value"])
        share = float(overall.loc["pope_true_yes_ratio", "value"])
        found = []
        p = yes_bias_test(round(yes * n), n, share)
        if np.isfinite(p) and p < self.alpha:
            gap = yes - share
            severity = "warning" if abs(gap) >= YES_BIAS_EFFECT else "info"
            found.append(finding(self.name, severity,
                                 f"the model answers 'yes' to {yes:.1%} of {n} presence questions whose true yes "
                                 f"share is {share:.1%}: a {'yes' if gap > 0 else 'no'}-bias (exact binomial test "
                                 f"p = {p:.2g} < {self.alpha:g}, false-alarm rate {self.alpha:.0%}; a warning from "
                                 f"a gap of {YES_BIAS_EFFECT:.2f})"))
        chance = max(share, 1 - share)
        p = below_chance_test(round(acc * n), n, chance)
        if np.isfinite(p) and p < self.alpha:
            found.append(finding(self.name, "warning",
                                 f"POPE accuracy is {acc:.1%} on {n} questions, near chance ({chance:.0%}, always "
                                 f"giving the more frequent answer): the exact one-sided binomial test rejects "
                                 f"accuracy ≥ {min(1.0, chance + CHANCE_MARGIN):.0%} (p = {p:.2g}, false-alarm rate "
                                 f"{self.alpha:.0%})"))
        return found
