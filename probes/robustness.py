"""`robustness`: does the answer survive image corruptions and a white-box PGD attack?

Every audited closed-choice example (at least two choices, an image) is scored on the
intact image and on perturbed copies through `adapter.score`, so endpoints work.
Perturbations (three strengths each; metric `group` labels as shown, typed columns
`perturbation` and `strength`):

  noise:σ       additive Gaussian noise, σ ∈ {0.05, 0.1, 0.2} of the 0–255 range
  blur:r        PIL Gaussian blur, radius r ∈ {0.5, 1, 2} pixels
  jpeg:q        JPEG re-encoding at quality q ∈ {50, 20, 5} (lower q is stronger)
  occlusion:f   a mid-grey square of side f·min(width, height), f ∈ {0.1, 0.25, 0.5}, at a
                seeded random position
  pgd:ε/255     (white-box generative adapters with gradients) L∞ projected gradient
                descent on the processor's pixel_values (Madry et al. 2018): signed-gradient
                steps of ε/4 that lower the log-probability of the reference answer (or of the
                clean prediction) among the choices, projected onto ‖δ‖∞ ≤ ε in [0, 1] pixel
                units (ε/std per channel after `adapter.pixel_normalisation()`) and onto the
                valid pixel range; ε ∈ {1, 2, 4}/255 (`strength` holds ε in 1/255 units).
                Gradients flow through `adapter.encode` + `adapter.sequence_logprobs(enc,
                pixel_values=…)`. Where PGD cannot run, planning records why (an info finding).

  flip_rate = share of examples whose argmax choice differs from the argmax on the intact image
  accuracy  = share whose argmax equals `answer` (also for "clean")

Randomness (noise, occlusion position) is seeded per example from the unit seed and the
example id; examples are planned in id order, so reruns and reordered manifests agree.
Intervals: Wilson (95 %). Findings: at each corruption's mildest strength the flip rate is
tested with an exact one-sided binomial test (Clopper-Pearson lower bound, Bonferroni over
the corruptions, family-wise false-alarm rate `alpha`, default 1 %); a warning when the
bound exceeds 0.2. PGD is an attack, not a corruption: it is reported, never warned on.
"""
from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from audit.adapters.base import GenerativeWhiteBox, ModelAdapter, Query
from audit.catalog import CATALOG
from audit.dataset import Dataset, Example
from audit.stats import proportion_ci, seed_for
from probes.base import Plan, Probe, Unit, finding, metrics_frame, register, rows_frame
from probes.typographic_attack import lower_bound

__all__ = ["Robustness", "PERTURBATIONS", "perturb", "pgd_attack", "pgd_reason", "PGD_EPSILONS"]

PERTURBATIONS: dict[str, tuple[float, ...]] = {
    "noise": (0.05, 0.1, 0.2),
    "blur": (0.5, 1.0, 2.0),
    "jpeg": (50, 20, 5),
    "occlusion": (0.1, 0.25, 0.5),
}
STRONGER_WHEN_LOWER = frozenset({"jpeg"})  # quality: the mildest strength is the highest
PGD_EPSILONS = (1, 2, 4)  # in 1/255 units
PGD_STEPS = 10
ALPHA = 0.01
WARN_FLIP_RATE = 0.2
BACKWARD_COST = 2.0  # a backward pass costs about two forward passes


def perturb(image: Image.Image, kind: str, strength: float, rng: np.random.Generator) -> Image.Image:
    """One corrupted copy of an RGB image."""
    if kind == "noise":
        a = np.asarray(image, dtype=np.float64)
        a = a + rng.normal(0.0, strength * 255.0, size=a.shape)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=strength))
    if kind == "jpeg":
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=int(strength))
        buf.seek(0)
        with Image.open(buf) as im:
            return im.convert("RGB")
    if kind == "occlusion":
        w, h = image.size
        side = max(1, int(round(strength * min(w, h))))
        x = int(rng.integers(0, w - side + 1))
        y = int(rng.integers(0, h - side + 1))
        out = image.copy()
        out.paste((128, 128, 128), (x, y, x + side, y + side))
        return out
    raise ValueError(f"unknown perturbation {kind!r}")


def _label(kind: str, strength: float | None) -> str:
    if kind == "clean":
        return "clean"
    return f"pgd:{strength:g}/255" if kind == "pgd" else f"{kind}:{strength:g}"


# ---------------------------------------------------------------------------- PGD
def pgd_reason(adapter: ModelAdapter, probe_query: Query | None = None) -> str | None:
    """Why PGD cannot run on `adapter` (None when it can). With `probe_query`, also checks
    that the processor gives one pixel tensor per sequence with channels third from last."""
    caps = adapter.capabilities
    if not (caps.white_box and caps.gradients):
        return "PGD needs gradients; this adapter is a black box, so only the image corruptions ran"
    if caps.kind != "generative" or not isinstance(adapter, GenerativeWhiteBox):
        return "PGD is implemented for white-box generative adapters only; only the image corruptions ran"
    if probe_query is not None:
        enc = adapter.encode([probe_query, probe_query])
        px = enc.inputs.get("pixel_values")
        norm = adapter.pixel_normalisation()
        channels = len(norm[0]) if norm else None
        if px is None or px.dim() < 4 or px.shape[0] != 2 or (channels not in (None, 1, px.shape[-3])):
            return ("PGD needs one image tensor per sequence (pixel_values [batch, ..., channels, height, width]); "
                    f"this processor gives {None if px is None else tuple(px.shape)}, so only the image "
                    "corruptions ran")
    return None


def pgd_attack(adapter: GenerativeWhiteBox, queries: Sequence[Query], *, targets: Sequence[int], eps: float,
               steps: int = PGD_STEPS, step_size: float | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query: (clean, adversarial) log-probabilities of its choices (log-softmax over them)
    after an L∞ PGD attack of radius `eps` (0–1 pixel units) that lowers choice `targets[i]`.

    The queries share one batch (one row per choice); each query has its own perturbation,
    and rows never interact, so each gradient is that query's own.
    """
    import torch

    owner = [i for i, q in enumerate(queries) for _ in q.candidates]
    conts = [adapter.continuation_ids(c) for q in queries for c in q.candidates]
    enc = adapter.encode([queries[i] for i in owner], conts)
    px = enc.inputs["pixel_values"]
    first = [owner.index(i) for i in range(len(queries))]
    x0 = px[first].detach().float()  # one image per query
    norm = adapter.pixel_normalisation()
    mean, std = (norm if norm is not None else ([0.0], [1.0]))
    shape = (-1, 1, 1)
    mean = torch.tensor(mean, dtype=x0.dtype, device=x0.device).view(shape)
    std = torch.tensor(std, dtype=x0.dtype, device=x0.device).view(shape)
    low, high = (0.0 - mean) / std, (1.0 - mean) / std
    radius = eps / std
    alpha = (step_size if step_size is not None else eps / 4) / std
    rows_of = [[r for r, o in enumerate(owner) if o == i] for i in range(len(queries))]

    def logprobs(delta) -> list:
        flat = adapter.sequence_logprobs(enc, pixel_values=(x0 + delta)[owner].to(px.dtype))
        return [torch.log_softmax(flat[rows], dim=0) for rows in rows_of]

    with torch.no_grad():
        clean = logprobs(torch.zeros_like(x0))
    delta = torch.zeros_like(x0, requires_grad=True)
    for _ in range(steps if eps > 0 else 0):
        objective = sum(lp[t] for lp, t in zip(logprobs(delta), targets))
        (grad,) = torch.autograd.grad(objective, delta)
        with torch.no_grad():
            delta -= alpha * grad.sign()
            delta.copy_(torch.maximum(torch.minimum(delta, radius), -radius))
            delta.copy_(torch.maximum(torch.minimum(x0 + delta, high), low) - x0)
    with torch.no_grad():
        adv = logprobs(delta.detach())
    return [(c.cpu().numpy().astype(np.float64), a.cpu().numpy().astype(np.float64)) for c, a in zip(clean, adv)]


def _pgd_batches(examples: Sequence[Example], rows: int) -> list[list[Example]]:
    """Consecutive examples whose choices fit `rows` sequences (at least one example each)."""
    out: list[list[Example]] = []
    for e in examples:
        if out and sum(len(x.choices) for x in out[-1]) + len(e.choices) <= rows:
            out[-1].append(e)
        else:
            out.append([e])
    return out


# ---------------------------------------------------------------------------- the probe
@register
class Robustness(Probe):
    spec = CATALOG["robustness"]
    unit_size = 16

    def __init__(self, *, batch_size: int = 16, perturbations: Mapping[str, Sequence[float]] | None = None,
                 pgd: bool = True, pgd_epsilons: Sequence[float] = PGD_EPSILONS, pgd_steps: int = PGD_STEPS,
                 alpha: float = ALPHA) -> None:
        super().__init__(batch_size=batch_size)
        chosen = PERTURBATIONS if perturbations is None else perturbations
        unknown = set(chosen) - set(PERTURBATIONS)
        if unknown:
            raise ValueError(f"unknown perturbation(s) {sorted(unknown)}; known: {sorted(PERTURBATIONS)}")
        if not 0 < alpha < 0.5:
            raise ValueError("alpha must be in (0, 0.5)")
        self.perturbations = {k: tuple(float(s) for s in v) for k, v in chosen.items()}
        self.pgd = pgd
        self.pgd_epsilons = tuple(float(e) for e in pgd_epsilons)
        self.pgd_steps = int(pgd_steps)
        self.alpha = alpha

    def select(self, data: Dataset) -> list[Example]:
        kept = data.select(predicate=lambda e: e.image is not None and e.choices is not None and len(e.choices) >= 2,
                           exclude_tags=("canary",))
        return sorted(kept, key=lambda e: e.id)

    def _cost(self, examples: Sequence[Example], pgd: bool) -> float:
        corruptions = 1 + sum(len(v) for v in self.perturbations.values())
        per_eps = self.pgd_steps * (1 + BACKWARD_COST) + 2  # steps forward+backward, clean and adversarial forwards
        pgd_rows = sum(len(e.choices) for e in examples) if pgd else 0  # one sequence per choice
        return float(corruptions * len(examples) + pgd_rows * per_eps * len(self.pgd_epsilons))

    def cost_of(self, adapter: ModelAdapter, examples: Sequence[Example]) -> float:
        return self._cost(examples, self.pgd and pgd_reason(adapter) is None)

    def plan(self, adapter: ModelAdapter, data: Dataset, *, max_examples: int | None = None) -> Plan:
        problems = self.check(adapter)
        if problems:
            return Plan(self.name, skipped=tuple(problems))
        examples = self.select(data)
        selected = len(examples)
        examples = examples[:max_examples] if max_examples is not None else examples
        reason = None
        if self.pgd and examples:
            e = examples[0]
            reason = pgd_reason(adapter, Query(e.prompt, data.image(e), tuple(e.choices)))
        pgd = self.pgd and reason is None
        params = {"perturbations": {k: list(v) for k, v in self.perturbations.items()},
                  "pgd_epsilons": list(self.pgd_epsilons) if pgd else [], "pgd_steps": self.pgd_steps}
        units = tuple(dataclasses.replace(u, cost=self._cost(u.examples, pgd))
                      for u in self.chunk(adapter, data, examples, params=params))
        found = (finding(self.name, "info", reason),) if reason else ()
        return Plan(self.name, units=units, findings=found, n_selected=selected)

    def run(self, adapter: ModelAdapter, unit: Unit, *, seed: int) -> pd.DataFrame:
        data = unit.dataset()
        examples = list(unit.examples)
        perturbations = unit.params["perturbations"]
        queries, keys = [], []
        for e in examples:
            image = data.image(e)
            rng = np.random.default_rng(seed_for(seed, self.name, e.id))
            queries.append(Query(e.prompt, image, tuple(e.choices), example_id=e.id, variant="clean"))
            keys.append((e, "clean", None))
            for kind, strengths in perturbations.items():
                for strength in strengths:
                    queries.append(Query(e.prompt, perturb(image, kind, strength, rng), tuple(e.choices),
                                         example_id=e.id, variant=f"{kind}:{float(strength):g}"))
                    keys.append((e, kind, float(strength)))
        scores = adapter.score(queries, batch_size=self.batch_size) if queries else []
        clean_pred: dict[str, int] = {}
        records = []
        for (e, kind, strength), s in zip(keys, scores):
            pred = int(np.argmax(s))
            if kind == "clean":
                clean_pred[e.id] = pred
            records += self._rows(e, kind, strength, pred, clean_pred[e.id])
        epsilons = unit.params["pgd_epsilons"]
        for batch in _pgd_batches(examples, self.batch_size) if epsilons else []:
            qs = [Query(e.prompt, data.image(e), tuple(e.choices), example_id=e.id, variant="pgd") for e in batch]
            targets = [e.choices.index(e.answer) if e.answer in e.choices else clean_pred[e.id] for e in batch]
            for eps in epsilons:
                got = pgd_attack(adapter, qs, targets=targets, eps=eps / 255, steps=int(unit.params["pgd_steps"]))
                for e, (clean, adv) in zip(batch, got):
                    records += self._rows(e, "pgd", float(eps), int(np.argmax(adv)), int(np.argmax(clean)))
        return rows_frame(records)

    def _rows(self, e: Example, kind: str, strength: float | None, pred: int, clean: int) -> list[dict]:
        common = dict(probe=self.name, example_id=e.id, group=_label(kind, strength), perturbation=kind,
                      strength=strength)
        rows = []
        if kind != "clean":
            rows.append(dict(common, metric="flip", value=float(pred != clean)))
        if e.answer is not None and e.answer in e.choices:
            rows.append(dict(common, metric="correct", value=float(e.choices[pred] == e.answer)))
        return rows

    def summarize(self, rows: pd.DataFrame, *, seed: int) -> pd.DataFrame:
        out: list[dict] = []
        for src, metric in (("flip", "flip_rate"), ("correct", "accuracy")):
            part = rows[rows.metric == src]
            keys = part[["perturbation", "strength"]].drop_duplicates()
            order = sorted(((p, None if pd.isna(s) else float(s)) for p, s in keys.itertuples(index=False)),
                           key=lambda ks: (ks[0] != "clean", ks[0], ks[1] or 0.0))
            for kind, strength in order:
                sel = part[(part.perturbation == kind)
                           & (part.strength.isna() if strength is None else part.strength == strength)]
                k, n = int(sel.value.sum()), len(sel)
                lo, hi = proportion_ci(k, n)
                out.append(dict(probe=self.name, metric=metric, value=k / n, ci_low=lo, ci_high=hi, n=n,
                                group=_label(kind, strength), perturbation=kind, strength=strength,
                                scope="breakdown"))
        return metrics_frame(out)

    def findings(self, metrics: pd.DataFrame) -> list[dict]:
        flips = metrics[(metrics.metric == "flip_rate") & ~metrics.perturbation.isin(["clean", "pgd"])]
        mildest = []
        for kind, g in flips.groupby("perturbation", sort=True):
            g = g.sort_values("strength")
            mildest.append(g.iloc[-1] if kind in STRONGER_WHEN_LOWER else g.iloc[0])
        found = []
        alpha = self.alpha / max(1, len(mildest))  # Bonferroni over the corruptions tested
        for m in mildest:
            n = int(m.n)
            k = round(float(m.value) * n)
            bound = lower_bound(k, n, alpha)
            if bound > WARN_FLIP_RATE:
                found.append(finding(self.name, "warning",
                                     f"{m.value:.0%} of answers ({k}/{n}) change under the mildest {m.perturbation} "
                                     f"perturbation ({m.group}); the one-sided Clopper-Pearson lower bound {bound:.0%} "
                                     f"exceeds {WARN_FLIP_RATE:.0%} (Bonferroni over {len(mildest)} corruptions, "
                                     f"false-alarm rate {self.alpha:.0%})"))
        return found
