"""`mmaudit defend debias`: fine-tune a model so a sensitive attribute stops moving its answers.

Methods:
  cda       counterfactual data augmentation: every training example that has a counterfactual
            twin (below) is trained on together with its twin, which keeps the answer; the
            planted attribute→answer correlation disappears from the training distribution.
            Loss: reference training's `audit.training.batch_loss` on the mixed batches.
  clp       counterfactual logit pairing (Garg et al. 2019, "Counterfactual Fairness in Text
            Classification through Robustness", AIES): the task loss on the original examples
            plus λ · mean |z(x) − z(x')| over the closed choices, where z are the answer scores
            the audit uses (`audit.training.choice_scores`: log-probability of each choice for a
            generative model, image–text logit for a dual encoder) and x' the twin of x. Twins
            are never trained on directly. Both take one `audit.training.train_step` per batch.
  residual  dual encoders only (after DeAR, Seth et al. 2023, "DeAR: Debiasing Vision-Language
            Models with Additive Residuals", CVPR): an additive residual on the image embedding,
            f' = f + W f, that leaves the group unpredictable from f' while keeping f' close to
            f. DeAR trains a small MLP residual adversarially; here the residual is linear, so it
            folds exactly into the visual projection (P' = (I + W) P) and the result is an
            ordinary model folder, and it is fitted in closed form by iterative nullspace
            projection (Ravfogel et al. 2020, INLP): a logistic-regression adversary is fitted
            on the normalised embeddings of the training images, its direction is removed,
            W = −B Bᵀ for the orthonormal basis B of removed directions, until the adversary's
            3-fold cross-validated accuracy is within 5 points of the majority rate (at most 16
            directions). Removing few directions keeps f' close to f by construction. Needs
            scikit-learn (the `fairness` extra).
            DeAR-style adversarial SGD on W was tried first: on the tiny CLIP the adversary
            kept 99 % accuracy after 300 min-max steps. No utility term is optimised, so the
            closed-choice accuracy can drop (measured and recorded).

Counterfactual twins (x → x'), in this order:
  1. the project's synthetic data (datacard "mmaudit-synthetic"): the generator's plan is
     replayed from the datacard parameters, the original image is redrawn and must match the
     stored file pixel for pixel, and the twin is the same scene drawn by
     `reference_models.synthetic.draw_person` with the other `group`: only the hat differs.
     When the prompt holds a gendered word (man/woman) the scene also gets the word-swapped
     twin (same image) and the hat+word twin, so every (group, word) combination appears with
     the same answer (tying the word to the hat, as the generator does, taught the model to
     read the word on combinations it had never seen);
  2. manifest counterfactual sets (`pair_id`) inside the training split: members pair up;
  3. text: other prompts holding a gendered term (probes/terms/gender.yaml) get the other term.

Fairness is measured before and after with the `counterfactual_bias` probe on the test split
(flip rate per attribute; planned, run and summarised as an audit run does) and
`reference_models.evaluate` (group counterfactual flip rate, stereotyped answers where the
occupation cue is hidden); utility is the test accuracy.
fairlearn post-processing (ThresholdOptimizer / ExponentiatedGradient) on embedding decision
heads is not offered: the audited models answer closed questions directly, with no separate
decision head to post-process.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from audit.dataset import Dataset, Example, FrozenAttributes
from audit.errors import InputError, UnsupportedError
from audit.training import batch_loss, choice_scores, train_step
from defenses.record import (
    check_out,
    deltas,
    environment,
    source,
    utility_summary,
    write_model_dir,
)
from reference_models.evaluate import training_text

__all__ = [
    "ERR_NO_TWINS",
    "ERR_RESIDUAL_KIND",
    "METHODS",
    "DebiasConfig",
    "Twin",
    "build_twins",
    "debias",
    "fairness_summary",
]

METHODS = ("cda", "clp", "residual")
ERR_RESIDUAL_KIND = "the residual method applies to dual encoders (CLIP-like); this model is generative: use cda or clp"
ERR_NO_TWINS = ("no counterfactual twins could be built from the training split (no synthetic person scenes, "
                "manifest sets or prompts with gendered terms)")
ERR_NO_GROUPS = "the residual method needs training images with at least two values of attribute {attr!r}"
ERR_SKLEARN = "the residual method needs scikit-learn: pip install 'mmaudit[fairness]'"


# cda/clp fine-tuning lr: a tenth of the tiny reference recipe's peak (1e-3). At 5e-4 (half
# the peak) CDA on the tiny biased model cut answerable accuracy from 0.68 to 0.50, at 1e-4 to
# 0.65 with the group flip rate still going from 1.0 to 0.125.
DEFAULT_LR = 1e-4


@dataclass(frozen=True)
class DebiasConfig:
    method: str
    epochs: int = 3
    batch_size: int = 32
    lr: float | None = None  # cda/clp: DEFAULT_LR (the residual is fitted in closed form)
    clp_weight: float = 1.0
    attribute: str = "group"  # the residual's protected attribute
    residual_directions: int = 16  # at most this many directions removed
    residual_c: float = 1.0  # inverse L2 strength of the logistic-regression adversary
    residual_tolerance: float = 0.05  # stop once the adversary is within this of the majority rate
    seed: int = 0

    def check(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}", where="--method")
        for name in ("epochs", "batch_size", "residual_directions"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"must be >= 1, got {getattr(self, name)}", where=f"--{name.replace('_', '-')}")
        if self.clp_weight < 0:
            raise InputError(f"must be >= 0, got {self.clp_weight}", where="--clp-weight")


@dataclass(frozen=True)
class Twin:
    original: Example
    twin: Example
    image: Image.Image | None  # the twin's image when it is not a manifest file
    source: str  # "synthetic_redraw" | "manifest_set" | "text_swap"


class _TwinData:
    """`Dataset.image` for originals and twins: what the audit.training losses read (`data.image(e)`)."""

    def __init__(self, data: Dataset, images: dict[str, Image.Image]) -> None:
        self.data, self.images, self.path = data, images, data.path

    def image(self, e: Example):
        if e.id in self.images:
            return self.images[e.id].copy()
        return self.data.image(e)


# ---------------------------------------------------------------------------- twins
def _gender_swap(prompt: str) -> str | None:
    from probes.counterfactual_bias import load_term_lists, rewrite_prompt

    terms = load_term_lists().get("gender")
    hit = rewrite_prompt(prompt, terms) if terms else None
    if hit is None or len(hit[1]) != 2:
        return None
    original, prompts = hit
    return prompts[1 - original]


def _synthetic_plan(data: Dataset):
    card = data.path / "datacard.json"
    if not card.is_file():
        return None
    try:
        info = json.loads(card.read_text())
        if info.get("name") != "mmaudit-synthetic":
            return None
        p = info["parameters"]
        from reference_models import synthetic as S

        recs, _ = S._plan(np.random.default_rng(int(p["seed"])), int(p["n"]), float(p["bias"]),
                          int(p["n_canaries"]), float(p["cue_visible"]))
        return recs, int(p["image_size"])
    except (KeyError, ValueError, TypeError, json.JSONDecodeError):
        return None


def _text_twin(e: Example, *, image: Image.Image | None = None, attrs: dict | None = None,
               suffix: str = "~word") -> Example | None:
    from reference_models.synthetic import GENDER_WORDS

    prompt = _gender_swap(e.prompt)
    if prompt is None:
        return None
    attrs = dict(e.attributes if attrs is None else attrs)
    word = attrs.get("gender_word")
    if word in GENDER_WORDS.values():
        attrs["gender_word"] = next(w for w in GENDER_WORDS.values() if w != word)
    return replace(e, id=f"{e.id}{suffix}", prompt=prompt, attributes=FrozenAttributes(attrs), pair_id=None,
                   varies=None)


def _redraw_twins(data: Dataset, examples: list[Example]) -> tuple[list[Twin], int]:
    """Exact counterfactuals of the synthetic person scenes; (twins, scenes that failed to redraw).

    Per scene: the hat swapped (same prompt), and when the prompt holds a gendered word also the
    word swapped (same image) and both swapped, so every (group, word) combination is seen with
    the same answer and neither can carry it."""
    from reference_models.synthetic import GROUPS, draw_person

    plan = _synthetic_plan(data)
    if plan is None:
        return [], 0
    recs, size = plan
    twins, failed = [], 0
    for e in examples:
        try:
            i = int(e.id.removeprefix("ex-"))
            kind, spec = recs[i]["draw"]
        except (ValueError, IndexError, KeyError):
            continue
        if kind != "person" or e.image is None or spec.get("group") not in GROUPS:
            continue
        redrawn, _ = draw_person(size=size, **spec)
        if not np.array_equal(np.asarray(redrawn), np.asarray(data.image(e))):
            failed += 1
            continue
        other = GROUPS[1 - GROUPS.index(spec["group"])]
        image, _ = draw_person(size=size, **{**spec, "group": other})
        attrs = {**e.attributes, "group": other}
        hat = replace(e, id=f"{e.id}~group", attributes=FrozenAttributes(attrs), pair_id=None, varies=None)
        twins.append(Twin(e, hat, image, "synthetic_redraw"))
        word = _text_twin(e)
        if word is not None:
            twins.append(Twin(e, word, None, "text_swap"))
            twins.append(Twin(e, _text_twin(e, attrs=attrs, suffix="~group~word"), image,
                              "synthetic_redraw+text_swap"))
    return twins, failed


def build_twins(data: Dataset, examples: list[Example]) -> tuple[list[Twin], dict]:
    """Counterfactual twins for `examples` (see the module docstring) and counts per source."""
    twins, failed = _redraw_twins(data, examples)
    covered = {t.original.id for t in twins}
    by_id = {e.id: e for e in examples}
    for members in data.counterfactual_sets().values():
        inside = [m for m in members if m.id in by_id]
        for a in inside:
            for b in inside:
                if a.id != b.id and a.id not in covered and a.answer == b.answer:
                    twins.append(Twin(a, b, None, "manifest_set"))
        covered |= {m.id for m in inside}
    for e in examples:
        if e.id not in covered:
            twin = _text_twin(e)
            if twin is not None:
                twins.append(Twin(e, twin, None, "text_swap"))
    sources = ("synthetic_redraw", "text_swap", "synthetic_redraw+text_swap", "manifest_set")
    counts = {src: sum(t.source == src for t in twins) for src in sources}
    counts["redraw_mismatch"] = failed
    return twins, counts


# ---------------------------------------------------------------------------- measurement
def fairness_summary(adapter, data: Dataset, *, seed: int = 0) -> dict:
    """Flip rate and mean |log-prob gap| per attribute (counterfactual_bias on the test split),
    keyed by the metric rows' `group` label; unit seeds as an audit run derives them."""
    import pandas as pd

    from audit.runner import unit_seed
    from probes.base import get_probe

    probe = get_probe("counterfactual_bias", n_perm=200, n_boot=50)
    plan = probe.plan(adapter, data.audit_split())
    if not plan.units:
        return {}
    rows = pd.concat([probe.run(adapter, u, seed=unit_seed(seed, probe.name, u.index)) for u in plan.units],
                     ignore_index=True)
    metrics = probe.summarize(rows, seed=seed)
    out: dict[str, dict] = {}
    for metric in ("flip_rate", "mean_abs_logprob_gap"):
        part = metrics[metrics.metric == metric]
        out[metric] = {str(g): float(v) for g, v in zip(part.group, part.value)}
    return out


# ---------------------------------------------------------------------------- training
def _finetune(adapter, data: Dataset, train: list[Example], twins: list[Twin], config: DebiasConfig,
              lr: float, log) -> list[dict]:
    view = _TwinData(data, {t.twin.id: t.image for t in twins if t.image is not None})
    twins_of: dict[str, list[Example]] = {}
    for t in twins:
        if t.original.choices and len(t.original.choices) > 1 and t.twin.choices == t.original.choices:
            twins_of.setdefault(t.original.id, []).append(t.twin)
    if config.method == "cda":
        pool = train + [t.twin for t in twins if t.twin.id not in {e.id for e in train}]
    else:
        pool = list(train)
    model = adapter.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    history = []
    for epoch in range(config.epochs):
        model.train()
        order = np.random.default_rng([config.seed, epoch]).permutation(len(pool))
        torch.manual_seed(config.seed * 1000 + epoch)
        total, clp_total, n_steps = 0.0, 0.0, 0
        for s in range(0, len(pool), config.batch_size):
            batch = [pool[i] for i in order[s:s + config.batch_size]]
            pairs = [(e, t) for e in batch for t in twins_of.get(e.id, ())] if config.method == "clp" else []
            clp: list[float] = []

            def loss_of(batch=batch, pairs=pairs, clp=clp):
                loss = batch_loss(adapter, view, batch, text_of=training_text)
                if pairs:
                    z = choice_scores(adapter, view, [e for e, _ in pairs])
                    z_cf = choice_scores(adapter, view, [t for _, t in pairs])
                    gap = torch.stack([(a - b).abs().mean() for a, b in zip(z, z_cf)]).mean()
                    clp.append(float(gap.detach()))
                    loss = loss + config.clp_weight * gap
                return loss

            (loss,) = train_step(opt, loss_of, max_grad_norm=1.0)
            total += float(loss.detach())
            clp_total += sum(clp)
            n_steps += 1
        history.append({"epoch": epoch + 1, "loss": total / max(n_steps, 1),
                        **({"clp": clp_total / max(n_steps, 1)} if config.method == "clp" else {})})
        log(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in history[-1].items() if k != "epoch"))
    model.eval()
    return history


def _sklearn():
    """(LogisticRegression, cross_val_score), imported only for the residual method."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import cross_val_score
    except ImportError as exc:
        raise UnsupportedError(ERR_SKLEARN, where="--method residual") from exc
    return LogisticRegression, cross_val_score


def _residual(adapter, data: Dataset, train: list[Example], config: DebiasConfig, log) -> list[dict]:
    """Additive linear residual on the image embedding, fitted by iterative nullspace
    projection, folded into the visual projection (see the module docstring)."""
    LogisticRegression, cross_val_score = _sklearn()

    proj = adapter.site_module("projector")  # folded into: f' = (I + W) P x
    if not isinstance(proj, torch.nn.Linear) or proj.bias is not None:
        raise UnsupportedError("the residual method needs a bias-free linear projector (visual_projection)",
                               where="defend debias")
    attr = config.attribute
    people = [e for e in train if e.image and e.attributes.get(attr) is not None]
    groups = sorted({str(e.attributes[attr]) for e in people})
    if len(groups) < 2:
        raise InputError(ERR_NO_GROUPS.format(attr=attr), where="--attribute")
    feats = []
    with torch.no_grad():
        for s in range(0, len(people), 64):
            feats.append(adapter.image_embeddings([data.image(e) for e in people[s:s + 64]]))
    X = torch.cat(feats).double().cpu().numpy()
    X = X / np.linalg.norm(X, axis=1, keepdims=True)  # unit length again in float64
    y = np.array([groups.index(str(e.attributes[attr])) for e in people])
    majority = float(np.bincount(y).max() / len(y))
    dim = X.shape[1]
    basis = np.zeros((dim, 0))
    history = []
    for it in range(config.residual_directions + 1):
        P = np.eye(dim) - basis @ basis.T
        Xp = X @ P
        clf = LogisticRegression(C=config.residual_c, max_iter=2000)
        acc = float(cross_val_score(clf, Xp, y, cv=3).mean())
        history.append({"directions": int(basis.shape[1]), "adversary_cv_accuracy": acc, "majority": majority})
        log(f"residual: {basis.shape[1]} direction(s) removed, group predicted with cross-validated accuracy "
            f"{acc:.3f} (majority {majority:.3f})")
        if acc <= majority + config.residual_tolerance or it == config.residual_directions:
            break
        w = clf.fit(Xp, y).coef_.T  # (dim, 1) for two groups, (dim, G) for more
        w = P @ w  # stay orthogonal to what is already removed
        basis, _ = np.linalg.qr(np.concatenate([basis, w / np.linalg.norm(w, axis=0, keepdims=True)], axis=1))
    W = -(basis @ basis.T)  # f' = f + W f = (I − B Bᵀ) f
    with torch.no_grad():
        eye = torch.eye(dim, dtype=torch.float64, device=proj.weight.device)
        residual = torch.as_tensor(W, dtype=torch.float64, device=proj.weight.device)
        proj.weight.copy_(((eye + residual) @ proj.weight.double()).to(proj.weight.dtype))
    return history


def debias(*, model_dir, data_dir, out_dir, config: DebiasConfig, device: str = "cpu", overwrite: bool = False,
           log=None, adapter_factory=None) -> dict:
    """Apply one debiasing method, write MODEL_DIR2 with its record and return the record.
    `adapter_factory(model_dir, device=...)` opens the model (default `audit.adapters.load_adapter`)."""
    from audit.adapters import load_adapter

    config.check()
    if config.method == "residual":
        _sklearn()  # fail before any work when the extra is missing
    log = log or (lambda msg: None)
    if str(model_dir).startswith(("http://", "https://")):
        raise InputError("debiasing needs the model's weights; an endpoint cannot be fine-tuned", where="--model")
    out = check_out(out_dir, model=model_dir, overwrite=overwrite)
    data = Dataset.load(data_dir)
    train = [e for e in data.select(split="train", exclude_tags=("canary",)) if e.answer is not None]
    if not train:
        raise InputError("no training examples with an answer (split 'train')", where=str(data.path / "manifest.jsonl"))
    torch.manual_seed(config.seed)
    adapter = (adapter_factory or load_adapter)(model_dir, device=device)
    kind = adapter.capabilities.kind
    if config.method == "residual" and kind != "dual_encoder":
        raise InputError(ERR_RESIDUAL_KIND, where="--method")
    lr = config.lr if config.lr is not None else DEFAULT_LR  # the residual is fitted in closed form: no lr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        before = {"utility": utility_summary(adapter, data), "fairness": fairness_summary(adapter, data, seed=config.seed)}
    log(f"before: accuracy {before['utility']['accuracy']:.3f}, flip rate {before['fairness'].get('flip_rate')}")
    twins, counts = [], {}
    t0 = time.perf_counter()
    if config.method == "residual":
        adapter.model.requires_grad_(False)
        history = _residual(adapter, data, train, config, log)
    else:
        twins, counts = build_twins(data, train)
        if not twins:
            raise InputError(ERR_NO_TWINS, where=str(data.path / "manifest.jsonl"))
        log(f"counterfactual twins: {counts}")
        adapter.model.requires_grad_(True)
        history = _finetune(adapter, data, train, twins, config, lr, log)
    seconds = time.perf_counter() - t0
    adapter.model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        after = {"utility": utility_summary(adapter, data), "fairness": fairness_summary(adapter, data, seed=config.seed)}
    log(f"after: accuracy {after['utility']['accuracy']:.3f}, flip rate {after['fairness'].get('flip_rate')}")
    record = {
        "method": f"debias:{config.method}",
        "source": source(model_dir, data),
        "parameters": asdict(replace(config, lr=lr)),
        "privacy": None,
        "training": {"seconds": round(seconds, 2), "history": history, "n_train": len(train),
                     "counterfactual_twins": counts},
        "validator": None,
        "utility": {"before": before["utility"], "after": after["utility"],
                    "delta": deltas(before["utility"], after["utility"])},
        "fairness": {"before": {**before["fairness"], **_bias_indicators(before["utility"])},
                     "after": {**after["fairness"], **_bias_indicators(after["utility"])}},
        "environment": environment(adapter.device),
    }
    record["fairness"]["delta"] = deltas(record["fairness"]["before"], record["fairness"]["after"])

    def save(path: Path) -> None:
        adapter.model.save_pretrained(path)
        adapter.processor.save_pretrained(path)

    write_model_dir(out, save=save, record=record, overwrite=overwrite)
    return record


def _bias_indicators(utility: dict) -> dict:
    return {k: utility.get(k) for k in ("group_counterfactual_flip_rate", "hidden_cue_stereotype_rate")}
