"""`modality_ablation`: how much of each answer depends on the image and on the text.

For every example the closed-choice distribution of the intact input is compared with the
distribution after a content ablation of one modality. The distance is total variation,
TV(p, q) = ½ Σ|p − q| ∈ [0, 1]: 0 exactly when removing the modality leaves the answer
scores unchanged, 1 when the answer moves to a disjoint set of choices.
  image ablations: blank (mid-grey), mean (mean image of the work unit), noise (seeded
                   Gaussian), shuffled (another example's image, Gat et al. 2021)
  text ablations:  empty (prompt removed), shuffled (another example's prompt)
  audio ablations: silence (zeros), noise (seeded Gaussian at the clip's RMS), shuffled
                   (another example's clip, cut or zero-padded to this clip's length) —
                   for examples with an `audio` clip, on models that read audio
                   (`capabilities.modalities`); drawn from their own random stream, so the
                   image and text ablations draw exactly what they drew before audio existed
                   (on data without audio every row is unchanged)
`image_reliance` / `text_reliance` / `audio_reliance` are the per-example means over each modality's
ablations, averaged over examples; the interval is a BCa bootstrap over examples, or the
exact bound when every value is 0 (an image-blind model: [0, 1 − 0.025^(1/n)]).

The perceptual score (Gat et al. 2021) is the relative accuracy drop when a modality is
permuted across the examples of a work unit, (acc − acc_permuted) / acc, averaged over
K = 10 random derangements (one permutation alone ranged from −0.18 to 0 on 64 examples);
its interval is a percentile bootstrap over examples of the K-averaged score. The first
derangement is also the `shuffled` ablation above.

White-box early-fusion models also get the layer curve (`image_layer_curve`, dims
`layer`): the TV after the image tokens' residual stream at the output of decoder layer l
is replaced by its value on a blank image, i.e. image content removed from layer l on;
what earlier layers already moved out of the image positions survives it, so the curve
shows where image information has left the image tokens. The TV is taken against the intact
input scored the same (hooked, whole-sequence) way as the replaced passes, so a layer whose
replacement changes nothing reads exactly 0; an image-blind model reads 0.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from PIL import Image

from audit.adapters.base import Audio, GenerativeWhiteBox, ModelAdapter, Query
from audit.catalog import CATALOG
from audit.stats import mean_ci, seed_for
from probes._intervals import percentile_interval, resamples
from probes.base import Plan, Probe, Unit, finding, metrics_frame, register, rows_frame

IMAGE_ABLATIONS = ("blank", "mean", "noise", "shuffled")
TEXT_ABLATIONS = ("empty", "shuffled")
AUDIO_ABLATIONS = ("silence", "noise", "shuffled")
PERMUTATIONS = 10
GREY = (128, 128, 128)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum())


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation with no fixed point (a cyclic shift of a random order)."""
    order = rng.permutation(n)
    out = np.empty(n, dtype=int)
    out[order] = np.roll(order, 1)
    return out


def fit_length(clip: Audio, like: Audio) -> Audio:
    """`clip` at `like`'s sample rate and length (cut, or zero-padded at the end): a shuffled
    clip occupies the same audio positions as the one it replaces (as shuffled images are resized)."""
    w = clip.waveform
    if clip.sample_rate != like.sample_rate:
        from scipy.signal import resample_poly

        g = int(np.gcd(clip.sample_rate, like.sample_rate))
        w = resample_poly(w.astype(np.float64), like.sample_rate // g, clip.sample_rate // g)
    n = like.waveform.size
    out = np.zeros(n, dtype=np.float32)
    out[:min(n, w.size)] = w[:n]
    return Audio(out, like.sample_rate)


def _reads(e, modalities) -> bool:
    return (e.image is not None and "image" in modalities) or (e.audio is not None and "audio" in modalities)


def readable_examples(data):
    """Scoreable, non-canary examples with an image or an audio clip (the modality probes' selection)."""
    return list(data.select(predicate=lambda e: (e.image is not None or e.audio is not None)
                            and bool(e.choices or e.answer), exclude_tags=("canary",)))


def plan_readable(probe: Probe, adapter: ModelAdapter, data, *, max_examples: int | None = None) -> Plan:
    """Probe.plan over `probe.select(data)`, keeping the examples with an input the model reads
    (an image model skips audio-only examples, with an info finding saying how many)."""
    problems = probe.check(adapter)
    if problems:
        return Plan(probe.name, skipped=tuple(problems))
    reads = adapter.capabilities.modalities
    candidates = probe.select(data)
    examples = [e for e in candidates if _reads(e, reads)]
    notes = []
    if len(examples) < len(candidates):
        notes.append(finding(probe.name, "info", f"{len(candidates) - len(examples)} examples skipped: their only "
                             f"non-text input is one this model does not read ({', '.join(reads)})"))
    selected = len(examples)
    if max_examples is not None:
        examples = examples[:max_examples]
    return Plan(probe.name, units=probe.chunk(adapter, data, examples), findings=tuple(notes), n_selected=selected)


def _has_layer_curve(adapter: ModelAdapter) -> bool:
    caps = adapter.capabilities
    return isinstance(adapter, GenerativeWhiteBox) and caps.hooks and caps.fusion == "early"


@register
class ModalityAblation(Probe):
    spec = CATALOG["modality_ablation"]

    def __init__(self, *, batch_size: int = 16, permutations: int = PERMUTATIONS) -> None:
        super().__init__(batch_size=batch_size)
        if permutations < 1:
            raise ValueError("permutations must be >= 1")
        self.permutations = permutations

    def select(self, data):
        return readable_examples(data)

    def plan(self, adapter: ModelAdapter, data, *, max_examples: int | None = None) -> Plan:
        return plan_readable(self, adapter, data, max_examples=max_examples)

    def cost_of(self, adapter: ModelAdapter, examples) -> float:
        reads = adapter.capabilities.modalities
        n_image = sum(e.image is not None and "image" in reads for e in examples)
        n_audio = sum(e.audio is not None and "audio" in reads for e in examples)
        # image-only examples cost cost_per_example, as always
        image_part = 3 + self.permutations + (adapter.n_layers + 2 if _has_layer_curve(adapter) else 0)
        return float(len(examples) * (2 + self.permutations) + n_image * image_part
                     + n_audio * (2 + self.permutations))

    def cost_per_example(self, adapter: ModelAdapter) -> float:
        # layer curve: the blank source pass, the intact reference pass and one pass per layer
        layers = adapter.n_layers + 2 if _has_layer_curve(adapter) else 0
        return 1 + 3 + self.permutations + 1 + self.permutations + layers

    def shared_of(self, adapter: ModelAdapter, examples) -> float:
        # one scoring call per unit reads n own images, one grey, one mean and n noise images;
        # every other query (text ablations, images permuted from other examples) re-reads one of them
        n = len(examples)
        queries = n * (5 + 2 * self.permutations) if n > 1 else 5 * n
        return float(max(0, queries - (2 * n + 2 if n > 1 else 4 * n)))

    def run(self, adapter: ModelAdapter, unit: Unit, *, seed: int) -> pd.DataFrame:
        data = unit.dataset()
        examples = list(unit.examples)
        n = len(examples)
        rng = np.random.default_rng(seed)
        reads = adapter.capabilities.modalities
        images = [data.image(e) if "image" in reads else None for e in examples]
        clips = [data.audio(e) if "audio" in reads else None for e in examples]
        cands = [tuple(e.choices or (e.answer,)) for e in examples]
        seen = [im for im in images if im is not None]
        mean_img = None
        if seen:
            stack = np.stack([np.asarray(im.resize(seen[0].size), dtype=np.float64) for im in seen])
            mean_img = Image.fromarray(stack.mean(0).round().astype(np.uint8))
        perms = [derangement(n, rng) for _ in range(self.permutations)] if n > 1 else []
        keys: list[tuple[int, str, str, int | None]] = []  # (example, modality, variant, permutation)
        queries: list[Query] = []

        def add(i, modality, variant, q, k=None):
            keys.append((i, modality, variant, k))
            label = variant if modality == "none" else f"{modality}:{variant}" + (f":{k}" if k else "")
            queries.append(Query(q.prompt, q.image, q.candidates, example_id=examples[i].id, variant=label,
                                 audio=q.audio))

        for i, (e, im, au, c) in enumerate(zip(examples, images, clips, cands)):
            add(i, "none", "none", Query(e.prompt, im, c, audio=au))
            if im is not None:
                add(i, "image", "blank", Query(e.prompt, Image.new("RGB", im.size, GREY), c, audio=au))
                add(i, "image", "mean", Query(e.prompt, mean_img.resize(im.size), c, audio=au))
                noise = rng.normal(128, 64, size=(im.size[1], im.size[0], 3)).clip(0, 255).astype(np.uint8)
                add(i, "image", "noise", Query(e.prompt, Image.fromarray(noise), c, audio=au))
            add(i, "text", "empty", Query("", im, c, audio=au))
            for k, perm in enumerate(perms):
                j = int(perm[i])
                if im is not None:
                    src = _next_with(images, perm, i)  # perm[i] itself when every example has an image
                    if src is not None:
                        add(i, "image", "shuffled" if k == 0 else "permuted",
                            Query(e.prompt, images[src].resize(im.size), c, audio=au), k)
                add(i, "text", "shuffled" if k == 0 else "permuted", Query(examples[j].prompt, im, c, audio=au), k)
        self._add_audio(add, examples, images, clips, cands, seed)
        scores = adapter.score(queries, batch_size=self.batch_size)
        intact = {i: adapter.choice_distribution(s) for (i, m, _, _), s in zip(keys, scores) if m == "none"}
        reference = intact
        with_image = [i for i, im in enumerate(images) if im is not None]
        if _has_layer_curve(adapter) and with_image:
            base = [q for (i, m, _, _), q in zip(keys, queries) if m == "none" and images[i] is not None]
            ref, curve = _layer_curve_scores(adapter, base, batch_size=self.batch_size)
            reference = {with_image[r]: adapter.choice_distribution(s) for r, s in enumerate(ref)}
            for layer, layer_scores in enumerate(curve):
                for r, s in enumerate(layer_scores):
                    keys.append((with_image[r], "image", f"layer_blank:{layer}", None))
                    scores.append(s)
        name = self.name
        records = []
        for (i, modality, variant, k), s in zip(keys, scores):
            e = examples[i]
            layer = None
            if variant.startswith("layer_blank:"):
                variant, layer = "layer_blank", int(variant.split(":")[1])
            base = dict(probe=name, example_id=e.id, modality=None if modality == "none" else modality,
                        variant=variant, layer=layer)
            if modality != "none" and variant != "permuted":
                # the layer curve compares with the intact input run the way its passes run
                tv = total_variation((reference if layer is not None else intact)[i], adapter.choice_distribution(s))
                records.append(dict(base, metric="tv", value=tv,
                                    site=f"language.blocks.{layer}.resid" if layer is not None else None))
            if layer is None and e.answer is not None and e.choices and e.answer in e.choices:
                correct = float(int(np.argmax(s)) == e.choices.index(e.answer))
                records.append(dict(base, metric="correct", value=correct,
                                    variant="permuted" if k is not None else variant, draw=k))
        return rows_frame(records)

    def _add_audio(self, add, examples, images, clips, cands, seed: int) -> None:
        """Audio ablations of every example with a clip, from a random stream of their own."""
        heard = [i for i, a in enumerate(clips) if a is not None]
        if not heard:
            return
        rng = np.random.default_rng(seed_for(seed, self.name, "audio"))
        perms = [derangement(len(heard), rng) for _ in range(self.permutations)] if len(heard) > 1 else []
        for r, i in enumerate(heard):
            e, im, au, c = examples[i], images[i], clips[i], cands[i]
            add(i, "audio", "silence", Query(e.prompt, im, c, audio=Audio(np.zeros_like(au.waveform), au.sample_rate)))
            rms = float(np.sqrt(np.mean(np.square(au.waveform, dtype=np.float64)))) or 0.1
            noise = rng.normal(0.0, rms, size=au.waveform.size).clip(-1.0, 1.0)
            add(i, "audio", "noise", Query(e.prompt, im, c, audio=Audio(noise, au.sample_rate)))
            for k, perm in enumerate(perms):
                other = clips[heard[int(perm[r])]]
                add(i, "audio", "shuffled" if k == 0 else "permuted",
                    Query(e.prompt, im, c, audio=fit_length(other, au)), k)

    def summarize(self, rows: pd.DataFrame, *, seed: int) -> pd.DataFrame:
        out: list[dict] = []
        name = self.name
        tv = rows[rows.metric == "tv"]
        ablations = tv[tv.variant != "layer_blank"]
        for modality, metric in (("image", "image_reliance"), ("text", "text_reliance"), ("audio", "audio_reliance")):
            part = ablations[ablations.modality == modality]
            if part.empty:
                continue
            per_example = part.groupby("example_id", sort=True).value.mean()
            lo, hi = mean_ci(per_example.values, seed=seed_for(seed, name, metric), bounds=(0.0, 1.0))
            out.append(dict(probe=name, metric=metric, value=float(per_example.mean()), ci_low=lo, ci_high=hi,
                            n=int(per_example.size), modality=modality, scope="overall"))
            for variant, g in part.groupby("variant", sort=True):
                lo, hi = mean_ci(g.value.values, seed=seed_for(seed, name, metric, variant), bounds=(0.0, 1.0))
                out.append(dict(probe=name, metric=metric, value=float(g.value.mean()), ci_low=lo, ci_high=hi,
                                group=variant, n=int(len(g)), modality=modality, variant=variant, scope="breakdown"))
        curve = tv[tv.variant == "layer_blank"]
        for layer, g in curve.groupby("layer", sort=True):
            lo, hi = mean_ci(g.value.values, seed=seed_for(seed, name, "curve", str(layer)), bounds=(0.0, 1.0))
            out.append(dict(probe=name, metric="image_layer_curve", value=float(g.value.mean()), ci_low=lo,
                            ci_high=hi, group=f"layer:{int(layer)}", n=int(len(g)), modality="image",
                            layer=int(layer), scope="breakdown"))
        correct = rows[rows.metric == "correct"]
        for (modality, variant), g in correct.groupby([correct.modality.fillna("none"), "variant"], sort=True):
            if variant == "permuted":
                continue
            lo, hi = mean_ci(g.value.values, seed=seed_for(seed, name, "acc", modality, variant), bounds=(0.0, 1.0))
            label = variant if modality == "none" else f"{modality}:{variant}"
            out.append(dict(probe=name, metric="accuracy", value=float(g.value.mean()), ci_low=lo, ci_high=hi,
                            group=label, n=int(len(g)), modality=None if modality == "none" else modality,
                            variant=variant, scope="breakdown"))
        out += self._perceptual(correct, seed)
        return metrics_frame(out)

    def _perceptual(self, correct: pd.DataFrame, seed: int) -> list[dict]:
        """(acc − mean_k acc_k) / acc per modality, k over the permutations (Gat et al. 2021)."""
        out = []
        intact = correct[correct.modality.isna()].set_index("example_id").value.sort_index()
        if intact.empty or intact.mean() == 0:
            return out
        for modality in ("image", "text", "audio"):
            perm = correct[(correct.modality == modality) & correct.draw.notna()]
            if perm.empty:
                continue
            table = perm.pivot_table(index="example_id", columns="draw", values="value", aggfunc="first")
            table = table.reindex(intact.index)
            base, permuted = intact.to_numpy(), table.to_numpy().mean(axis=1)
            ok = np.isfinite(permuted)
            base, permuted = base[ok], permuted[ok]
            # every resample at once (bootstrap_stat's draws and quantiles, vectorised)
            idx = np.vstack([np.arange(base.size)[None],
                             resamples(base.size, seed=seed_for(seed, self.name, "perceptual", modality))])
            acc, perm_acc = base[idx].mean(axis=1), permuted[idx].mean(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                score = np.where(acc > 0, (acc - perm_acc) / acc, np.nan)
            lo, hi = percentile_interval(score[1:]) if base.size else (np.nan, np.nan)
            out.append(dict(probe=self.name, metric=f"perceptual_score_{modality}",
                            value=float(score[0]), ci_low=lo, ci_high=hi, n=int(base.size),
                            modality=modality, scope="overall"))
        return out


def _next_with(items, perm, i: int) -> int | None:
    """The first index after i along the permutation's cycle whose item is present (None: none is)."""
    j = int(perm[i])
    while j != i and items[j] is None:
        j = int(perm[j])
    return None if j == i else j


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _layer_curve_scores(adapter: GenerativeWhiteBox, queries, *, batch_size: int) -> tuple[list, list[list]]:
    """(intact reference scores, per layer l the scores with the image positions of layer l's
    output replaced by the same positions of a run on a blank image: image content removed
    from layer l on).

    Every pass scores identical shapes in identical batches, so the k-th forward of the
    blank pass supplies the k-th forward of each replaced pass. The reference runs with the
    same (hooked, whole-sequence) forwards as the replaced passes, so a layer whose
    replacement changes nothing reads exactly 0.
    """
    blank = [Query(q.prompt, Image.new("RGB", q.image.size, GREY), q.candidates, example_id=q.example_id,
                   variant="image:blank(layer curve source)") for q in queries]
    n_layers = adapter.n_layers
    cache: dict[int, list] = {layer: [] for layer in range(n_layers)}

    def keep(layer):
        return lambda m, i, o: cache[layer].append(_hidden(o).detach())

    with adapter.hooks({f"language.blocks.{layer}.resid": keep(layer) for layer in cache}):
        adapter.score(blank, batch_size=batch_size)
    state = {"k": 0}

    def remember_ids(module, inputs, output):
        state["image"] = (inputs[0] == adapter.image_token_id)[..., None]

    intact = [Query(q.prompt, q.image, q.candidates, example_id=q.example_id, variant="none(layer curve reference)")
              for q in queries]
    with adapter.hooks({"language.embed": remember_ids}):
        reference = adapter.score(intact, batch_size=batch_size)
    out = []
    for layer in range(n_layers):
        state["k"] = 0

        def replace(module, inputs, output, layer=layer):
            src = cache[layer][state["k"]]
            state["k"] += 1
            new = torch.where(state["image"], src, _hidden(output))
            return (new, *output[1:]) if isinstance(output, tuple) else new

        tagged = [Query(q.prompt, q.image, q.candidates, example_id=q.example_id, variant=f"image:layer_blank:{layer}")
                  for q in queries]
        with adapter.hooks({"language.embed": remember_ids, f"language.blocks.{layer}.resid": replace}):
            out.append(adapter.score(tagged, batch_size=batch_size))
    return reference, out
