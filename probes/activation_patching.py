"""`activation_patching`: where image information enters and which layers carry it.

Each example runs clean (its own image) and corrupted (the image of another example in the
unit with a different answer, or a mid-grey image when there is none). For every decoder
layer and position group (probes._positions: image, question, special, last), the
corrupted run is repeated with that layer's residual stream at those positions restored
from the clean run. With m the log-probability of the clean answer,
    restored = (m_patched - m_corrupted) / (m_clean - m_corrupted)
is 1 when restoring that site alone recovers the clean answer and 0 when it does nothing
(Meng et al. 2022 causal tracing; Heimersheim & Nanda 2024 on metrics); it is written only
where |m_clean - m_corrupted| > MIN_EFFECT, since below that the ratio is noise.
`image_effect` = |m_clean - m_corrupted|: a model that cannot see the image reads 0 and
every patching delta is 0. Restoring the last positions at the last layer restores 1 by
construction (the final logits are the clean ones).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from audit.adapters.base import GenerativeWhiteBox, ModelAdapter, Query
from audit.catalog import CATALOG
from audit.dataset import Example
from audit.stats import mean_ci, seed_for
from probes._positions import GROUPS, answer_continuations, answer_scoring_cost, position_groups
from probes.base import Probe, Unit, metrics_frame, register, rows_frame

MIN_EFFECT = 1e-3  # nats; below this the clean/corrupted difference is noise: no restored ratio
GREY = (128, 128, 128)


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace(output, new):
    return (new, *output[1:]) if isinstance(output, tuple) else new


def corrupted_images(examples: Sequence[Example], images: Sequence[Image.Image], rng: np.random.Generator):
    """For each example, another example's image with a different answer (resized), else grey."""
    out = []
    for i, (e, im) in enumerate(zip(examples, images)):
        others = [j for j, o in enumerate(examples) if j != i and o.answer != e.answer]
        out.append(images[others[int(rng.integers(len(others)))]].resize(im.size) if others
                   else Image.new("RGB", im.size, GREY))
    return out


@register
class ActivationPatching(Probe):
    spec = CATALOG["activation_patching"]
    unit_size = 16

    def cost_of(self, adapter: ModelAdapter, examples: Sequence[Example]) -> float:
        per_example = 2 + len(GROUPS) * adapter.n_layers  # clean, corrupted, one per patched site
        return float(per_example * len(examples) + answer_scoring_cost(examples))

    def run(self, adapter: GenerativeWhiteBox, unit: Unit, *, seed: int) -> pd.DataFrame:
        data = unit.dataset()
        rng = np.random.default_rng(seed)
        examples = list(unit.examples)
        images = [data.image(e) for e in examples]
        clean = [Query(e.prompt, im, tuple(e.choices or (e.answer,))) for e, im in zip(examples, images)]
        corrupt = [Query(q.prompt, im, q.candidates) for q, im in zip(clean, corrupted_images(examples, images, rng))]
        conts = answer_continuations(adapter, examples, clean, batch_size=self.batch_size)
        records: list[dict] = []
        for s in range(0, len(examples), self.batch_size):
            sl = slice(s, s + self.batch_size)
            records += self._batch(adapter, examples[sl], clean[sl], corrupt[sl], conts[sl])
        return rows_frame(records)

    def _batch(self, adapter, batch, clean_q, corrupt_q, conts) -> list[dict]:
        enc_c, enc_x = adapter.encode(clean_q, conts), adapter.encode(corrupt_q, conts)
        if not torch.equal(enc_c.input_ids, enc_x.input_ids):
            raise RuntimeError("clean and corrupted inputs tokenise differently; positions cannot be patched")
        groups = position_groups(adapter, enc_c)
        layers = range(adapter.n_layers)
        cache: dict[int, torch.Tensor] = {}

        def keep(layer):
            return lambda m, i, o: cache.__setitem__(layer, _hidden(o).detach())

        name, records = self.name, []
        with torch.no_grad():
            with adapter.hooks({f"language.blocks.{layer}.resid": keep(layer) for layer in layers}):
                m_clean = adapter.sequence_logprobs(enc_c)
            m_corrupt = adapter.sequence_logprobs(enc_x)
            effect = (m_clean - m_corrupt).tolist()
            records += [dict(probe=name, metric="image_effect", value=abs(v), example_id=e.id)
                        for e, v in zip(batch, effect)]
            for layer in layers:
                site = f"language.blocks.{layer}.resid"
                for g in GROUPS:
                    mask = groups[g][..., None]

                    def patch(m, i, o, layer=layer, mask=mask):
                        return _replace(o, torch.where(mask, cache[layer], _hidden(o)))

                    with adapter.hooks({site: patch}):
                        delta = (adapter.sequence_logprobs(enc_x) - m_corrupt).tolist()
                    for e, d, eff in zip(batch, delta, effect):
                        base = dict(probe=name, example_id=e.id, site=site, layer=layer, position_group=g)
                        records.append(dict(base, metric="patch_delta", value=d))
                        if abs(eff) > MIN_EFFECT:
                            records.append(dict(base, metric="restored", value=d / eff))
        return records

    def summarize(self, rows: pd.DataFrame, *, seed: int) -> pd.DataFrame:
        out: list[dict] = []
        name = self.name
        eff = rows[rows.metric == "image_effect"].sort_values("example_id").value
        if not eff.empty:
            lo, hi = mean_ci(eff.values, seed=seed_for(seed, name, "image_effect"), bounds=(0.0, float("inf")))
            out.append(dict(probe=name, metric="image_effect", value=float(eff.mean()), ci_low=lo, ci_high=hi,
                            n=int(eff.size), modality="image", scope="overall"))
        for metric in ("restored", "patch_delta"):
            part = rows[rows.metric == metric].sort_values(["position_group", "layer", "example_id"])
            for (g, layer), v in part.groupby(["position_group", "layer"], sort=True).value:
                lo, hi = mean_ci(v.values, seed=seed_for(seed, name, metric, g, str(layer)))
                out.append(dict(probe=name, metric=metric, value=float(v.mean()), ci_low=lo, ci_high=hi,
                                group=f"{g}@layer:{int(layer)}", n=int(v.size), position_group=g, layer=int(layer),
                                scope="breakdown"))
        return metrics_frame(out)
