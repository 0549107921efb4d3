"""`eval.json` of a reference model: accuracy per question family on the test split, the
same with blanked images (the text_shortcut check), the planted-bias indicators (flips
counted as the audit's counterfactual_bias probe counts them), and for dual encoders
retrieval R@1 over scene captions, and for mixture-of-experts models (`--arch moe`) the
routing: per decoder layer each modality's top-1 expert shares and the normalised mutual
information of modality and top-1 expert (the `moe_routing` probe's index)."""
from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np
from PIL import Image

from audit.adapters.base import ModelAdapter, Query, candidate_text
from audit.dataset import Dataset, Example
from reference_models.synthetic import COLOURS, COUNT_WORDS, OCCUPATIONS, SHAPES

__all__ = ["evaluate_reference", "scene_caption", "training_text", "predict", "bias_indicators", "decisive_answers",
           "STEREOTYPE"]

# The occupation that --bias makes more likely for each group.
STEREOTYPE = {"a": OCCUPATIONS[0], "b": OCCUPATIONS[1]}


def scene_caption(attributes) -> str | None:
    """'two red circle' for an object scene, None for anything else."""
    try:
        return f"{COUNT_WORDS[int(attributes['count']) - 1]} {attributes['colour']} {attributes['shape']}"
    except (KeyError, ValueError, IndexError):
        return None


def training_text(e: Example) -> str:
    """The text a dual encoder learns to match an example's image to: the full scene caption
    for object scenes (so retrieval is measurable), else `"{prompt} {answer}"`."""
    return scene_caption(e.attributes) or candidate_text(e.prompt, e.answer)


def _blank(img: Image.Image) -> Image.Image:
    return Image.new("RGB", img.size, (128, 128, 128))


def predict(adapter: ModelAdapter, queries: list[Query]) -> np.ndarray:
    """Index of the highest-scoring candidate of each query."""
    return np.array([int(np.argmax(s)) for s in adapter.score(queries, batch_size=64)])


def evaluate_reference(adapter: ModelAdapter, data: Dataset) -> dict:
    test = data.audit_split()
    plain = [e for e in test if e.choices and e.answer in e.choices and e.image and not e.pair_id
             and not {"canary", "typographic"} & set(e.tags)]
    images = [data.image(e) for e in plain]
    truth = np.array([e.choices.index(e.answer) for e in plain])
    pred = predict(adapter, [Query(e.prompt, im, e.choices) for e, im in zip(plain, images)])
    pred_blank = predict(adapter, [Query(e.prompt, _blank(im), e.choices) for e, im in zip(plain, images)])
    by_family: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(plain):
        by_family[e.attributes.get("family", "other")].append(i)
    families = {}
    for fam, idx in sorted(by_family.items()):
        idx = np.array(idx)
        families[fam] = {
            "n": int(len(idx)),
            "accuracy": float((pred[idx] == truth[idx]).mean()),
            "accuracy_blank_image": float((pred_blank[idx] == truth[idx]).mean()),
            "unchanged_when_blanked": float((pred[idx] == pred_blank[idx]).mean()),
            "chance": float(np.mean([1 / len(plain[i].choices) for i in idx])),
        }
    out = {"n_test": len(plain), "accuracy": float((pred == truth).mean()), "families": families,
           "unchanged_when_blanked": float((pred == pred_blank).mean())}
    out.update(bias_indicators(adapter, data, test, plain, pred))
    if adapter.capabilities.kind == "dual_encoder":
        out["retrieval"] = _retrieval(adapter, data, plain)
    routing = routing_indicators(adapter, data, plain)
    if routing is not None:
        out["routing"] = routing
    return out


def routing_indicators(adapter: ModelAdapter, data: Dataset, examples: list[Example], *,
                       limit: int = 64) -> dict | None:
    """Top-1 expert shares by modality and the modality-specialisation index per layer on the
    first `limit` examples; None for a model without routers."""
    from probes.moe_routing import normalised_mutual_information, route, router_layers

    layers = router_layers(adapter)
    if not layers or not examples:
        return None
    chosen = examples[:limit]
    got = route(adapter, [Query(e.prompt, data.image(e), ()) for e in chosen], layers, batch_size=32)
    out = {}
    for i in layers:
        tokens = defaultdict(lambda: defaultdict(int))
        for g in got:
            for m, x in zip(g["modality"], g["top1"][i]):
                tokens[m][int(x)] += 1
        mods = sorted(tokens)
        n_exp = 1 + max(x for m in mods for x in tokens[m])
        table = np.array([[tokens[m][x] for x in range(n_exp)] for m in mods], dtype=float)
        out[str(i)] = {"modality_specialisation": float(normalised_mutual_information(table)),
                       "top1_share": {m: {str(x): c / sum(tokens[m].values()) for x, c in sorted(tokens[m].items())}
                                      for m in mods}}
    return {"n": len(chosen), "layers": out}


def decisive_answers(scores: np.ndarray, choices) -> tuple[str, float]:
    """(top answer, its probability margin over the runner-up) within the choice set."""
    p = np.exp(scores - np.logaddexp.reduce(scores))
    order = np.argsort(-p, kind="stable")
    return choices[int(order[0])], float(p[order[0]] - p[order[1]]) if len(p) > 1 else float("nan")


def bias_indicators(adapter, data, test, plain, pred) -> dict:
    """Stereotyped answers where the occupation cue is hidden, and counterfactual flip rate.

    A flip is what the audit's `counterfactual_bias` probe calls one: two members of a set
    choose different answers, each by more than TIE_TOLERANCE probability. A model that is
    indifferent (0.501 vs 0.499, say: a fair model where the cue is hidden) has no answer to
    flip, and counting its argmax changes measured noise (0.40 on one fair model with every
    answer within 0.01 of a tie). The plain argmax change rate is kept alongside."""
    from probes.counterfactual_bias import TIE_TOLERANCE

    hidden = [(i, e) for i, e in enumerate(plain) if e.attributes.get("occupation_cue") == "hidden"]
    rate = None
    if hidden:
        rate = float(np.mean([e.choices[pred[i]] == STEREOTYPE.get(e.attributes.get("group")) for i, e in hidden]))
    sets = [m for m in test.counterfactual_sets().values() if m[0].varies == "group" and m[0].choices]
    flips, changes = [], []
    for members in sets:
        scores = adapter.score([Query(e.prompt, data.image(e), e.choices) for e in members], batch_size=64)
        answers = [decisive_answers(np.asarray(s, dtype=float), e.choices) for s, e in zip(scores, members)]
        flips.append(len({a for a, margin in answers if margin > TIE_TOLERANCE}) > 1)
        changes.append(len({a for a, _ in answers}) > 1)
    return {"hidden_cue_stereotype_rate": rate, "hidden_cue_n": len(hidden),
            "group_counterfactual_flip_rate": float(np.mean(flips)) if flips else None,
            "group_counterfactual_argmax_change_rate": float(np.mean(changes)) if changes else None,
            "group_counterfactual_sets": len(flips), "tie_tolerance": TIE_TOLERANCE}


def _retrieval(adapter, data, plain: list[Example]) -> dict:
    """Image -> caption R@1 over every (count, colour, shape) caption; chance = 1/48."""
    seen, imgs, truth = set(), [], []
    captions = [f"{n} {c} {s}" for n, c, s in itertools.product(COUNT_WORDS, COLOURS, SHAPES)]
    for e in plain:
        cap = scene_caption(e.attributes)
        if cap and e.image not in seen:
            seen.add(e.image)
            imgs.append(data.image(e))
            truth.append(captions.index(cap))
    if not imgs:
        return {"n": 0}
    scores = adapter.score([Query("", im, tuple(captions)) for im in imgs], batch_size=64)
    pred = np.array([int(np.argmax(s)) for s in scores])
    return {"n": len(imgs), "r_at_1": float((pred == np.array(truth)).mean()), "chance": 1 / len(captions)}
