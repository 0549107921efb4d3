"""`moe_routing`: which experts a mixture-of-experts decoder sends image and text tokens to.

Router logits are read with forward hooks at `language.blocks.{i}.router` (the hooks return
nothing, so the forward pass is unchanged). Every context token is labelled with its
modality from the adapter's modality spans (`SPAN_SOURCES`: `image_spans`, `audio_spans`,
each read when the protocol declares it, so a new modality needs only its span method);
every other context token is `text` (template tokens included). Per example, layer and modality the probe counts the
tokens whose top-1 expert (largest router logit) is each expert, averages the entropy of
the router's softmax over experts, and repeats the forward pass with a blank (mid-grey)
image of the same size. Rows: `expert_tokens` (a count; the expert in `variant` as
`expert:k`), `router_entropy` and `routing_shift`, each with `layer`, `modality` and the
router's `site`.

Metrics:
- `expert_load` (layer, modality, expert): share of that modality's tokens whose top-1
  expert it is, pooled over examples.
- `modality_specialisation`: normalised mutual information between token modality and
  top-1 expert, NMI = 2 I(M; E) / (H(M) + H(E)) (arithmetic normalisation, sklearn's
  default), from the token counts pooled over examples, per layer; overall = the mean over
  layers (expert ids are not comparable across layers, so counts are never pooled across
  them). 1 = the expert determines the modality and vice versa; 0 = routing independent of
  modality (also when every token of a layer goes to one expert).
- `router_entropy` (nats; at most ln(#experts)): mean over examples of the mean entropy of
  the router's softmax per token, per layer and modality; overall per modality and for all
  tokens (token-weighted). For routers that gate with a sigmoid (Llama 4) it is still the
  entropy of the softmax of the logits.
- `routing_shift`: total variation between the text tokens' top-1 expert distributions
  with the real and with a blank image, per example and layer; 0 = the image does not move
  the text's routing.

Intervals: percentile bootstrap over examples (1000 resamples, bootstrap_stat's draws) for
the pooled statistics (`expert_load`, `modality_specialisation`); a degenerate bootstrap
at an end of [0, 1] (every resample reads exactly 0 or 1, e.g. routing fixed by
construction) gets the exact bound instead: the share of examples that could still
deviate after none of n did, 1 - 0.025^(1/n) (Clopper-Pearson). `router_entropy` and
`routing_shift` are means over examples: `audit.stats.mean_ci`.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd
import torch
from PIL import Image

from audit.adapters.base import GenerativeWhiteBox, ModelAdapter, Query, declared_members
from audit.adapters.sites import router_logits
from audit.catalog import CATALOG
from audit.errors import UnsupportedError
from audit.stats import LEVEL, mean_ci, proportion_ci, seed_for
from probes._intervals import resamples
from probes.base import Probe, Unit, metrics_frame, register, rows_frame

__all__ = ["MoERouting", "router_layers", "route", "token_modalities", "normalised_mutual_information",
           "SPAN_SOURCES", "ROUTER_SITE"]

ROUTER_SITE = "language.blocks.{}.router"
# Adapter members that return per-row ModalitySpans; each is read when the protocol declares it.
SPAN_SOURCES = ("image_spans", "audio_spans")
GREY = (128, 128, 128)
N_BOOT = 1000


def router_layers(adapter: ModelAdapter) -> list[int]:
    """Decoder blocks with a router (empty for dense models and non-white-box adapters)."""
    if not isinstance(adapter, GenerativeWhiteBox):
        return []
    found = []
    for i in range(adapter.n_layers):
        try:
            adapter.site_module(ROUTER_SITE.format(i))
        except UnsupportedError:
            continue
        found.append(i)
    return found


def token_modalities(adapter: GenerativeWhiteBox, enc) -> list[list[str]]:
    """Per row, the modality of each context token: the spans' modality, else `text`."""
    rows = [["text"] * n for n in enc.context_lengths]
    protocol = declared_members(GenerativeWhiteBox)
    for source in SPAN_SOURCES:
        if source not in protocol:
            continue
        for r, spans in enumerate(getattr(adapter, source)(enc.input_ids)):
            for span in spans:
                for pos in range(span.start, min(span.end, len(rows[r]))):
                    rows[r][pos] = span.modality
    return rows


def route(adapter: GenerativeWhiteBox, queries, layers, *, batch_size: int) -> list[dict]:
    """Per query: `modality` (per context token), `top1` {layer: expert per token} and
    `entropy` {layer: softmax entropy per token}, from one hooked forward pass per batch."""
    out = []
    for s in range(0, len(queries), batch_size):
        batch = queries[s:s + batch_size]
        enc = adapter.encode(batch)
        seen: dict[int, list] = defaultdict(list)

        def keep(layer):
            return lambda module, args, output: seen[layer].append(router_logits(module, output).detach())

        with torch.no_grad(), adapter.hooks({ROUTER_SITE.format(i): keep(i) for i in layers}):
            adapter.forward(enc)
        b, t = enc.input_ids.shape[:2]
        per_layer = {}
        for i in layers:
            if len(seen[i]) != 1 or seen[i][0].numel() % (b * t):
                raise UnsupportedError(f"the router at {ROUTER_SITE.format(i)} ran {len(seen[i])} times or its "
                                       "logits are not one row per token", where=adapter.architecture)
            logits = seen[i][0].float().reshape(b, t, -1)
            logp = torch.log_softmax(logits, dim=-1)
            per_layer[i] = (logits.argmax(-1).cpu().numpy(), (-(logp.exp() * logp).sum(-1)).cpu().numpy())
        for r, mods in enumerate(token_modalities(adapter, enc)):
            n = enc.context_lengths[r]
            out.append({"modality": np.array(mods, dtype=object),
                        "top1": {i: per_layer[i][0][r, :n] for i in layers},
                        "entropy": {i: per_layer[i][1][r, :n] for i in layers}})
    return out


def _entropy(p: np.ndarray, axis) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def normalised_mutual_information(counts) -> np.ndarray:
    """2 I(M; E) / (H(M) + H(E)) of contingency tables [..., modalities, experts] (nats
    cancel). NaN where fewer than two modalities occur; 0 where one expert takes every token."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum(axis=(-2, -1), keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = c / total
    pm, pe = p.sum(-1), p.sum(-2)
    hm, he = _entropy(pm, -1), _entropy(pe, -1)
    joint = _entropy(p, (-2, -1))
    mi = np.maximum(hm + he - joint, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        nmi = np.clip(np.where(hm > 1e-12, 2 * mi / (hm + he), np.nan), 0.0, 1.0)
    # a table fixed by construction reads its end exactly, not one rounding error away from it
    return np.where(np.abs(nmi - 1.0) < 1e-12, 1.0, np.where(nmi < 1e-12, 0.0, nmi))


def _exact_if_degenerate(value: float, lo: float, hi: float, n: int) -> tuple[float, float]:
    """A zero-width bootstrap interval at 0 or 1 becomes the exact bound after 0 of n examples."""
    if np.isfinite(value) and lo == hi == value and value in (0.0, 1.0):
        width = proportion_ci(0, n, method="exact")[1]
        return (0.0, width) if value == 0.0 else (1.0 - width, 1.0)
    return lo, hi


@register
class MoERouting(Probe):
    spec = CATALOG["moe_routing"]

    def check(self, adapter: ModelAdapter) -> list[str]:
        problems = super().check(adapter)
        if problems:
            return problems
        if not router_layers(adapter):
            return [f"moe_routing applies to mixture-of-experts language models only: no decoder block of this "
                    f"{adapter.architecture} model has a router at language.blocks.{{i}}.router (its MLPs are "
                    f"dense, or the family's site map names no router)"]
        return []

    def select(self, data):
        """Every non-canary example with an image (no answer needed: nothing is scored)."""
        return list(data.select(predicate=lambda e: e.image is not None, exclude_tags=("canary",)))

    def cost_per_example(self, adapter: ModelAdapter) -> float:
        return 2.0  # the real image and a blank one

    def chunk(self, adapter, data, examples, *, size=None, params=None) -> tuple[Unit, ...]:
        # the default plan's units, plus the blocks that have a router (a unit must not re-resolve them)
        return super().chunk(adapter, data, examples, size=size, params={"layers": router_layers(adapter)})

    def run(self, adapter: ModelAdapter, unit: Unit, *, seed: int) -> pd.DataFrame:
        data = unit.dataset()
        layers = list(unit.params["layers"])
        examples = list(unit.examples)
        images = [data.image(e) for e in examples]
        real = [Query(e.prompt, im, (), example_id=e.id, variant="none") for e, im in zip(examples, images)]
        blank = [Query(e.prompt, Image.new("RGB", im.size, GREY), (), example_id=e.id, variant="image:blank")
                 for e, im in zip(examples, images)]
        got = route(adapter, real + blank, layers, batch_size=self.batch_size)
        records = []
        for e, intact, ablated in zip(examples, got[:len(examples)], got[len(examples):]):
            for i in layers:
                site = ROUTER_SITE.format(i)
                base = dict(probe=self.name, example_id=e.id, layer=i, site=site)
                for m in sorted(set(intact["modality"])):
                    mask = intact["modality"] == m
                    experts, counts = np.unique(intact["top1"][i][mask], return_counts=True)
                    records += [dict(base, metric="expert_tokens", value=float(c), modality=m,
                                     variant=f"expert:{int(x)}") for x, c in zip(experts, counts)]
                    records.append(dict(base, metric="router_entropy", value=float(intact["entropy"][i][mask].mean()),
                                        modality=m))
                shift = _text_shift(intact, ablated, i)
                if shift is not None:
                    records.append(dict(base, metric="routing_shift", value=shift, modality="text", variant="blank"))
        return rows_frame(records)

    def summarize(self, rows: pd.DataFrame, *, seed: int) -> pd.DataFrame:
        name, out = self.name, []
        counts = rows[rows.metric == "expert_tokens"]
        if counts.empty:
            return metrics_frame(out)
        ids = sorted(counts.example_id.unique())
        layers = sorted(int(x) for x in counts.layer.unique())
        mods = sorted(counts.modality.unique())
        experts = counts.variant.str.slice(len("expert:")).astype(int)
        n_exp = int(experts.max()) + 1
        cube = np.zeros((len(ids), len(layers), len(mods), n_exp))
        ix = {k: j for j, k in enumerate(ids)}
        cube[counts.example_id.map(ix).to_numpy(), counts.layer.map(layers.index).to_numpy(),
             counts.modality.map(mods.index).to_numpy(), experts.to_numpy()] = counts.value.to_numpy()
        n = len(ids)
        # every resample's pooled table at once: multiplicity of each example in each draw
        draws = resamples(n, seed=seed_for(seed, name, "pooled"), n_boot=N_BOOT)
        weights = np.zeros((N_BOOT, n))
        np.add.at(weights, (np.arange(N_BOOT)[:, None], draws), 1.0)
        boot = np.tensordot(weights, cube, axes=1)  # [boot, layer, modality, expert]
        pooled = cube.sum(0)

        nmi, nmi_boot = normalised_mutual_information(pooled), normalised_mutual_information(boot)
        with np.errstate(invalid="ignore"):
            stats_ = np.concatenate([nmi, [np.nanmean(nmi) if np.isfinite(nmi).any() else np.nan]])
            boots = np.concatenate([nmi_boot, np.nanmean(nmi_boot, axis=1, keepdims=True)], axis=1)
        lo, hi = _quantiles(boots)
        for j, value in enumerate(stats_):
            low, high = _exact_if_degenerate(float(value), lo[j], hi[j], n)
            row = dict(probe=name, metric="modality_specialisation", value=float(value), ci_low=low, ci_high=high, n=n)
            if j < len(layers):
                row.update(group=f"layer:{layers[j]}", layer=layers[j], scope="breakdown")
            else:
                row.update(scope="overall")
            out.append(row)

        with np.errstate(invalid="ignore", divide="ignore"):
            load = pooled / pooled.sum(-1, keepdims=True)
            load_boot = boot / boot.sum(-1, keepdims=True)
        llo, lhi = _quantiles(load_boot)
        for (a, b, c), value in np.ndenumerate(load):
            if not np.isfinite(value):
                continue
            low, high = _exact_if_degenerate(float(value), llo[a, b, c], lhi[a, b, c], n)
            out.append(dict(probe=name, metric="expert_load", value=float(value), ci_low=low, ci_high=high, n=n,
                            group=f"layer:{layers[a]}/{mods[b]}/expert:{c}", layer=layers[a], modality=mods[b],
                            variant=f"expert:{c}", scope="breakdown"))

        out += self._entropy(rows, cube, ids, layers, mods, seed)
        out += self._shift(rows, seed)
        return metrics_frame(out)

    def _entropy(self, rows, cube, ids, layers, mods, seed) -> list[dict]:
        name, out = self.name, []
        ent = rows[rows.metric == "router_entropy"]
        bounds = (0.0, float(np.log(cube.shape[-1]))) if cube.shape[-1] > 1 else None
        table = ent.pivot_table(index="example_id", columns=["layer", "modality"], values="value", aggfunc="first")
        table = table.reindex(index=ids, columns=pd.MultiIndex.from_product([layers, mods]))
        values = table.to_numpy().reshape(len(ids), len(layers), len(mods))
        tokens = cube.sum(-1)  # [example, layer, modality]

        def add(v, **dims):
            v = v[np.isfinite(v)]
            if v.size == 0:
                return
            label = "/".join(f"{k}:{x}" if k == "layer" else str(x) for k, x in dims.items()) or None
            lo, hi = mean_ci(v, seed=seed_for(seed, name, "entropy", label or "all"), bounds=bounds)
            out.append(dict(probe=name, metric="router_entropy", value=float(v.mean()), ci_low=lo, ci_high=hi,
                            n=int(v.size), group=label, scope="overall" if label is None else "breakdown", **dims))

        with np.errstate(invalid="ignore", divide="ignore"):
            add(np.nansum(values * tokens, axis=(1, 2)) / np.where(np.isfinite(values), tokens, 0).sum(axis=(1, 2)))
            for b, m in enumerate(mods):
                add(np.nanmean(values[:, :, b], axis=1), modality=m)
                for a, layer in enumerate(layers):
                    add(values[:, a, b], layer=layer, modality=m)
        return out

    def _shift(self, rows, seed) -> list[dict]:
        name, out = self.name, []
        shift = rows[rows.metric == "routing_shift"]
        if shift.empty:
            return out
        per_example = shift.groupby("example_id", sort=True).value.mean()
        lo, hi = mean_ci(per_example.to_numpy(), seed=seed_for(seed, name, "shift"), bounds=(0.0, 1.0))
        out.append(dict(probe=name, metric="routing_shift", value=float(per_example.mean()), ci_low=lo, ci_high=hi,
                        n=int(per_example.size), modality="text", variant="blank", scope="overall"))
        for layer, g in shift.groupby("layer", sort=True):
            lo, hi = mean_ci(g.value.to_numpy(), seed=seed_for(seed, name, "shift", str(layer)), bounds=(0.0, 1.0))
            out.append(dict(probe=name, metric="routing_shift", value=float(g.value.mean()), ci_low=lo, ci_high=hi,
                            n=int(len(g)), group=f"layer:{int(layer)}", layer=int(layer), modality="text",
                            variant="blank", scope="breakdown"))
        return out

    def findings(self, metrics: pd.DataFrame) -> list[dict]:
        overall = metrics[(metrics.metric == "modality_specialisation") & (metrics.scope == "overall")]
        if overall.empty or not np.isfinite(overall.value.iloc[0]):
            return []
        r = overall.iloc[0]
        return [{"probe": self.name, "severity": "info",
                 "message": f"experts specialise by modality with normalised mutual information {r.value:.2f} "
                            f"(95% interval {r.ci_low:.2f}-{r.ci_high:.2f}; 0 = routing independent of modality, "
                            f"1 = the expert determines the modality)"}]


def _text_shift(intact: dict, ablated: dict, layer: int) -> float | None:
    """TV between the text tokens' top-1 expert distributions with the real and a blank image."""
    a = intact["top1"][layer][intact["modality"] == "text"]
    b = ablated["top1"][layer][ablated["modality"] == "text"]
    if a.size == 0 or b.size == 0:
        return None
    n = int(max(a.max(), b.max())) + 1
    p, q = np.bincount(a, minlength=n) / a.size, np.bincount(b, minlength=n) / b.size
    return float(0.5 * np.abs(p - q).sum())


def _quantiles(boot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval per component over axis 0, NaN resamples skipped (bootstrap_stat's)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN component stays NaN
        lo, hi = np.nanquantile(boot, [(1 - LEVEL) / 2, (1 + LEVEL) / 2], axis=0)
    return lo, hi
