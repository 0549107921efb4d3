"""`activation_patching`: where image information enters and which layers carry it.

Each example runs clean (its own image) and corrupted (the image of another example in the
unit with a different answer, or a mid-grey image). For every decoder layer and position
group (image tokens, question text, answer position), the corrupted run is repeated with
that layer's residual stream at those positions restored from the clean run. With m the
log-probability of the clean answer,
    restored = (m_patched − m_corrupted) / (m_clean − m_corrupted)
is 1 when restoring that site alone recovers the clean answer and 0 when it does nothing
(Meng et al. 2022 causal tracing; Heimersheim & Nanda 2024 on metrics).
`image_effect` = m_clean − m_corrupted: a model that cannot see the image reads 0 and
every patching delta is 0.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from PIL import Image

from audit.adapters.base import ModelAdapter, Query
from audit.dataset import Dataset
from probes._positions import position_groups
from probes.attention_knockout import answer_ids
from probes.base import METRIC_COLUMNS, Probe, ProbeInfo, bootstrap_ci, register, rows_frame

GROUPS = ("image", "question", "last")
MIN_EFFECT = 1e-3  # below this the clean/corrupted difference is noise: no restored ratio


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace(output, new):
    return (new, *output[1:]) if isinstance(output, tuple) else new


@register
class ActivationPatching(Probe):
    info = ProbeInfo(
        name="activation_patching",
        category="interpretability",
        description="Share of the clean answer's log-probability restored by patching clean residual-stream "
                    "activations into a run on a counterfactual image, per layer and position group.",
        citation="Meng et al. 2022, Locating and Editing Factual Associations in GPT (NeurIPS)",
        cost_per_example=2 + 3 * 4,
        needs_white_box=True,
        kinds=("generative",),
        metrics=("image_effect", "restored"),
    )
    unit_size = 16

    def check(self, adapter: ModelAdapter) -> list[str]:
        problems = super().check(adapter)
        if not problems and adapter.capabilities.fusion != "early":
            problems.append("patching image-token positions needs image tokens in the sequence (early fusion)")
        return problems

    def run(self, adapter: ModelAdapter, data: Dataset, *, seed: int) -> pd.DataFrame:
        rng = np.random.default_rng(seed)
        examples = list(data)
        images = [data.image(e) for e in examples]
        clean_q = [Query(e.prompt, im, tuple(e.choices or (e.answer,))) for e, im in zip(examples, images)]
        scores = adapter.score(clean_q)
        conts = [answer_ids(adapter, e, s) for e, s in zip(examples, scores)]
        corrupt_q = []
        for i, (e, q) in enumerate(zip(examples, clean_q)):
            others = [j for j, o in enumerate(examples) if o.answer != e.answer and j != i]
            img = images[others[int(rng.integers(len(others)))]].resize(q.image.size) if others \
                else Image.new("RGB", q.image.size, (128, 128, 128))
            corrupt_q.append(Query(q.prompt, img, q.candidates))
        enc_c, enc_x = adapter.encode(clean_q, conts), adapter.encode(corrupt_q, conts)
        groups = position_groups(adapter, enc_c)
        layers = range(adapter.n_layers)
        cache: dict[int, torch.Tensor] = {}

        def keep(layer):
            return lambda m, i, o: cache.__setitem__(layer, _hidden(o).detach())

        with torch.no_grad():
            with adapter.hooks({f"language.blocks.{l}.resid": keep(l) for l in layers}):
                m_clean = adapter.continuation_logprobs(adapter.forward(enc_c).logits, enc_c)
            m_corrupt = adapter.continuation_logprobs(adapter.forward(enc_x).logits, enc_x)
            records = []
            effect = (m_clean - m_corrupt).tolist()
            for e, v in zip(examples, effect):
                records.append(dict(probe=self.info.name, metric="image_effect", value=v, example_id=e.id,
                                    group=None, site=None, variant=None))
            for layer in layers:
                for g in GROUPS:
                    mask = torch.stack([grp[g] for grp in groups])[..., None]

                    def patch(m, i, o, layer=layer, mask=mask):
                        return _replace(o, torch.where(mask, cache[layer], _hidden(o)))

                    with adapter.hooks({f"language.blocks.{layer}.resid": patch}):
                        m_patch = adapter.continuation_logprobs(adapter.forward(enc_x).logits, enc_x)
                    delta = (m_patch - m_corrupt).tolist()
                    for e, d, eff in zip(examples, delta, effect):
                        site = f"language.blocks.{layer}.resid"
                        records.append(dict(probe=self.info.name, metric="patch_delta", value=d, example_id=e.id,
                                            group=g, site=site, variant=f"layer:{layer}"))
                        if abs(eff) > MIN_EFFECT:
                            records.append(dict(probe=self.info.name, metric="restored", value=d / eff, example_id=e.id,
                                                group=g, site=site, variant=f"layer:{layer}"))
        return rows_frame(records)

    def summarize(self, rows: pd.DataFrame, *, seed: int) -> pd.DataFrame:
        out = []
        eff = rows[rows.metric == "image_effect"].sort_values("example_id").value
        if not eff.empty:
            lo, hi = bootstrap_ci(eff.abs().values, seed=seed)
            out.append((self.info.name, "image_effect", float(eff.abs().mean()), lo, hi, None, int(eff.size)))
        for metric in ("restored", "patch_delta"):
            part = rows[rows.metric == metric]
            for (g, layer), v in part.groupby(["group", "variant"], sort=True).value:
                lo, hi = bootstrap_ci(v.values, seed=seed)
                out.append((self.info.name, metric, float(v.mean()), lo, hi, f"{g}@{layer}", int(v.size)))
        return pd.DataFrame(out, columns=METRIC_COLUMNS)
