"""mmaudit CPU benchmarks: every figure a ratio measured side by side in one process.

    python bench/run.py            # full CPU run; run it ALONE (load average < 1)
    python bench/run.py --smoke    # seconds; what CI runs so the harness cannot rot
    python bench/run.py --only suite,dp

Writes bench/results/<date>-cpu<N>.json and .md, each figure next to its target (the
--smoke run writes to a temp folder unless --out is given). The load average before and
after every item is recorded: a shared machine makes any ratio meaningless. Items:
 hooks     1  hooked forward (per-modality means at every layer) vs the plain forward, and
              TransformerLens `run_with_cache` of the same sites (small preset)
 memory    4  peak memory of that hooked forward vs the plain one (small preset), the
              attention probe's forward for reference, bytes a probe unit leaves behind
 suite     1,2 audit efficiency = declared forward passes x plain forward seconds per pass /
              wall time of `run_audit`, standard and full suites, tiny and small presets,
              shared-prefix reuse off (the overhead measure) and on (its end-to-end speed-up,
              with the largest metric difference between the two runs)
 prefix    2  text variants on one image with the image prefix reused vs full forwards
 dp        3  DP step time and memory vs the non-private step, every clipping mode
              (bench/dp_step.py), LoRA and full fine-tuning of the tiny LLaVA
 estimate  6  per probe: declared vs counted forward passes, estimate vs actual seconds
 feature_ablation, mm_shap  patch ablation vs captum; MM-SHAP passes to |error| <= 0.02
The GPU items are bench/gpu.py.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from audit.adapters import Query, load_adapter  # noqa: E402
from common import build_data, build_model, images, load_average, peak_bytes, retained_bytes, timeit  # noqa: E402

# (item, figure) -> (comparison, target); figures of nested results are dotted paths
TARGETS = {
    ("hooks", "hooked_vs_plain"): ("<=", 1.05),
    ("memory", "hooked_vs_plain_peak"): ("<=", 1.1),
    ("feature_ablation", "speedup_vs_captum"): (">=", 5.0),
    ("mm_shap", "forward_passes_to_0.02"): ("<=", 100),
    ("prefix", "speedup_vs_one_per_variant"): (">=", 3.0),
    ("dp", "lora.time_ratio"): ("<=", 1.3),
    ("dp", "lora.memory_ratio"): ("<=", 1.1),
    ("dp", "full.time_ratio"): ("<=", 1.5),
    ("estimate", "estimate_vs_actual"): ("within", 2.0),
}
SUITE_TARGET = 0.85  # audit efficiency with prefix reuse off, every suite and preset
PROMPT = "what colour are the shapes?"
CHOICES = ("red", "green", "blue", "yellow")


# ------------------------------------------------------------------ item 1: hooks
def item_hooks(adapter, model_path: Path, *, batch: int, repeat: int) -> dict:
    size = adapter.model.config.vision_config.image_size
    enc = adapter.encode([Query(PROMPT, im, ("red",)) for im in images(batch, size)])
    sync = torch.cuda.synchronize if str(adapter.device).startswith("cuda") else None
    plain, hooked = _forwards(adapter, enc)
    result = {"batch": batch, "tokens": int(enc.input_ids.shape[1])}
    t_plain, t_hooked = timeit(plain, repeat=repeat, sync=sync), timeit(hooked, repeat=repeat, sync=sync)
    result.update(plain_ms=1e3 * t_plain, hooked_ms=1e3 * t_hooked, hooked_vs_plain=t_hooked / t_plain)
    try:
        from transformers import AutoModelForImageTextToText

        # the bridge rewires the model it wraps: give it its own copy, timed on the same inputs
        hf = AutoModelForImageTextToText.from_pretrained(model_path, dtype=adapter.model.dtype).eval()
        result.update(transformer_lens_timing(model_path, hf.to(adapter.device), adapter, enc, repeat=repeat,
                                              sync=sync, t_plain=t_plain, t_hooked=t_hooked))
    except Exception as exc:  # noqa: BLE001 - the bridge is optional; say why it is missing
        result["transformer_lens_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return result


def transformer_lens_timing(model_path, hf_model, adapter, enc, *, repeat: int, sync, t_plain: float,
                            t_hooked: float) -> dict:
    """TransformerLens `run_with_cache` of every layer's residual stream on `enc`, timed next to
    the plain and hooked forwards (the bridge rewires `hf_model`: pass a copy, or time it last)."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(model_path), hf_model=hf_model, tokenizer=adapter.tokenizer,
                                                 device=adapter.device)
    names = [f"blocks.{i}.hook_resid_post" for i in range(adapter.n_layers)]

    def tl():
        with torch.no_grad():
            bridge.run_with_cache(enc.inputs["input_ids"], pixel_values=enc.inputs["pixel_values"],
                                  attention_mask=enc.inputs["attention_mask"], names_filter=names)

    t_tl = timeit(tl, repeat=repeat, sync=sync)
    return dict(transformer_lens_ms=1e3 * t_tl, transformer_lens_vs_plain=t_tl / t_plain,
                transformer_lens_vs_hooked=t_tl / t_hooked)


def _forwards(adapter, enc):
    """(plain forward, hooked forward): hooks reduce each layer's residual stream to two
    per-modality sums per row on the device (what the modality probes read)."""
    image_mask = (enc.input_ids == adapter.image_token_id)[..., None]
    sums = {}

    def reducer(layer):
        def hook(module, inputs, output):
            h = output[0] if isinstance(output, tuple) else output
            m = image_mask.to(h.dtype)
            sums[layer] = ((h * m).sum(1), (h * (1 - m)).sum(1))
        return hook

    sites = {f"language.blocks.{i}.resid": reducer(i) for i in range(adapter.n_layers)}

    def plain():
        with torch.no_grad():
            adapter.forward(enc)

    def hooked():
        with torch.no_grad(), adapter.hooks(sites):
            adapter.forward(enc)
        sums.clear()  # nothing outlives the forward

    return plain, hooked


# ------------------------------------------------------------------ item 4: memory
def item_memory(adapter, data_path: Path, *, batch: int) -> dict:
    from audit.dataset import Dataset
    from probes.base import get_probe

    size = adapter.model.config.vision_config.image_size
    enc = adapter.encode([Query(PROMPT, im, ("red",)) for im in images(batch, size)])
    plain, hooked = _forwards(adapter, enc)
    plain()  # warm-up: lazy allocations do not count against either
    probe = get_probe("attention", batch_size=batch)
    data = Dataset.load(data_path).audit_split()
    unit = probe.plan(adapter, data, max_examples=batch).units[0]
    out = {"batch": batch, "tokens": int(enc.input_ids.shape[1]), "device": str(adapter.device)}
    out["plain_peak_bytes"] = peak_bytes(plain, adapter.device)
    out["hooked_peak_bytes"] = peak_bytes(hooked, adapter.device)
    out["hooked_vs_plain_peak"] = out["hooked_peak_bytes"] / out["plain_peak_bytes"]
    probe.run(adapter, unit, seed=0)  # warm-up: the image cache fills
    out["attention_unit_peak_bytes"] = peak_bytes(lambda: probe.run(adapter, unit, seed=0), adapter.device)
    out["attention_unit_vs_plain_peak"] = out["attention_unit_peak_bytes"] / out["plain_peak_bytes"]
    if not str(adapter.device).startswith("cuda"):
        out["retained_after_unit_bytes"] = retained_bytes(lambda: probe.run(adapter, unit, seed=0))
    out["image_cache_bytes"] = int(getattr(getattr(adapter, "_image_cache", None), "bytes", 0))
    return out


# ------------------------------------------------------------------ patch ablation vs captum
def item_feature_ablation(adapter, *, n_examples: int, grid: int) -> dict:
    from captum.attr import FeatureAblation

    from probes.mm_shap import mask_image

    size = adapter.model.config.vision_config.image_size
    ims = images(n_examples, size)
    red, n_feat = 0, grid * grid
    sync = torch.cuda.synchronize if str(adapter.device).startswith("cuda") else (lambda: None)

    def ours():
        out = []
        for im in ims:
            qs = [Query(PROMPT, im, CHOICES)] + [Query(PROMPT, mask_image(im, np.arange(n_feat) != k, grid), CHOICES)
                                                 for k in range(n_feat)]
            s = adapter.score(qs, batch_size=len(qs))
            out.append(np.array([s[0][red] - x[red] for x in s[1:]]))
        return out

    def captum_fa(per_eval: int):
        res = []
        for im in ims:
            enc = adapter.encode([Query(PROMPT, im, CHOICES)])
            px = enc.inputs["pixel_values"]
            rows = torch.arange(px.shape[-2], device=px.device) * grid // px.shape[-2]
            cols = torch.arange(px.shape[-1], device=px.device) * grid // px.shape[-1]
            fmask = (rows[:, None] * grid + cols[None, :]).expand_as(px[0])[None]
            grey = adapter.encode([Query(PROMPT, Image.new("RGB", im.size, (128, 128, 128)), CHOICES)])
            n, tok = enc.context_lengths[0], adapter.continuation_ids("red")[0]

            def f(p):
                batch = {k: (v.expand(p.shape[0], *v.shape[1:]) if k != "pixel_values" else p)
                         for k, v in enc.inputs.items()}
                return torch.log_softmax(adapter.model(**batch).logits[:, n - 1].float(), -1)[:, tok]

            with torch.no_grad():
                attr = FeatureAblation(f).attribute(px, baselines=grey.inputs["pixel_values"], feature_mask=fmask,
                                                    perturbations_per_eval=per_eval)
            res.append(np.array([float(attr[0][fmask[0] == k][0]) for k in range(n_feat)]))
        return res

    def timed(fn):
        fn()  # warm-up
        sync()
        t0 = time.perf_counter()
        got = fn()
        sync()
        return got, time.perf_counter() - t0

    a, t_ours = timed(ours)
    b, t_captum = timed(lambda: captum_fa(1))
    _, t_batched = timed(lambda: captum_fa(n_feat))
    # ours scores log-softmax over the 4 choices, captum the full-vocabulary log-probability: the
    # deltas of the same token differ by the change of the choice normaliser, so compare correlation
    corr = float(np.corrcoef(np.concatenate(a), np.concatenate(b))[0, 1])
    return {"examples": n_examples, "features": n_feat, "ours_examples_per_s": n_examples / t_ours,
            "captum_examples_per_s": n_examples / t_captum, "speedup_vs_captum": t_captum / t_ours,
            "captum_batched_examples_per_s": n_examples / t_batched, "speedup_vs_captum_batched": t_batched / t_ours,
            "correlation": corr}


# ------------------------------------------------------------------ MM-SHAP convergence
def item_mm_shap(adapter, *, n_examples: int, reference_pairs: int, repeats: int = 3) -> dict:
    from probes.mm_shap import MASK_WORD, grid_side, mask_image, modality_shares, shapley_permutations

    size = adapter.model.config.vision_config.image_size
    words = PROMPT.split()
    n_text = len(words)
    grid = grid_side(n_text)
    n_players = n_text + grid * grid
    calls = {"n": 0}

    def make_value(im):
        def value(masks):  # called once per estimate with every distinct coalition: each scored once
            calls["n"] += len(masks)
            qs = [Query(" ".join(w if m else MASK_WORD for w, m in zip(words, mk[:n_text])),
                        mask_image(im, mk[n_text:], grid), CHOICES) for mk in masks]
            return [s[0] for s in adapter.score(qs, batch_size=16)]
        return value

    rows = []
    for i, im in enumerate(images(n_examples, size)):
        ref = shapley_permutations(make_value(im), n_players, pairs=reference_pairs, rng=np.random.default_rng(10 + i))
        ref_v = modality_shares(ref.mean(0), n_text)[0]
        for pairs in (1, 2, 4, 8):
            errs, passes = [], []
            for rep in range(repeats):
                calls["n"] = 0
                phi = shapley_permutations(make_value(im), n_players, pairs=pairs,
                                           rng=np.random.default_rng(1000 * rep + i))
                errs.append(abs(modality_shares(phi.mean(0), n_text)[0] - ref_v))
                passes.append(calls["n"])
            rows.append({"example": i, "pairs": pairs, "forward_passes": float(np.mean(passes)),
                         "abs_error": float(np.mean(errs)), "max_abs_error": float(np.max(errs))})
    curve = []
    for pairs in (1, 2, 4, 8):
        v = [r for r in rows if r["pairs"] == pairs]
        curve.append({"pairs": pairs, "forward_passes": float(np.mean([r["forward_passes"] for r in v])),
                      "mean_abs_error": float(np.mean([r["abs_error"] for r in v])),
                      "max_abs_error": float(np.max([r["max_abs_error"] for r in v]))})
    enough = next((c["forward_passes"] for c in curve if c["max_abs_error"] <= 0.02), None)
    return {"players": n_players, "grid_side": grid, "curve": curve, "forward_passes_to_0.02": enough}


# ------------------------------------------------------------------ item 2: prompt variants on one image
def item_prefix(model_path: Path, *, variants: int, repeat: int) -> dict:
    from audit.adapters.prefix_cache import score_prompt_variants

    on, off = load_adapter(model_path), load_adapter(model_path)
    off.prefix_reuse = False
    im = images(1, on.model.config.vision_config.image_size)[0]
    words = ["man", "woman", "person", "boy", "girl", "doctor", "nurse", "adult", "child", "worker"][:variants]
    prompts = [f"what is the job of this {w}?" for w in words]
    cands = ("doctor", "nurse")
    ref = off.score([Query(p, im, cands) for p in prompts], batch_size=variants)
    got = score_prompt_variants(on, im, prompts, cands)
    err = max(float(np.abs(x - y).max()) for x, y in zip(ref, got))
    t_prefix = timeit(lambda: score_prompt_variants(on, im, prompts, cands), repeat=repeat)
    t_each = timeit(lambda: [off.score([Query(p, im, cands)]) for p in prompts], repeat=repeat)
    t_batched = timeit(lambda: off.score([Query(p, im, cands) for p in prompts], batch_size=variants), repeat=repeat)
    return {"variants": variants, "max_abs_diff": err, "prefix_ms": 1e3 * t_prefix,
            "one_forward_per_variant_ms": 1e3 * t_each, "batched_full_forward_ms": 1e3 * t_batched,
            "speedup_vs_one_per_variant": t_each / t_prefix, "speedup_vs_batched_full": t_batched / t_prefix}


# ------------------------------------------------------------------ items 1, 2: suites
def _plain_seconds_per_pass(model_path: Path, data_path: Path, batch_size: int, batches: int = 6) -> float:
    """Seconds of one plain batched forward pass of a real query, the floor an audit's declared
    passes are measured against: `forward` on pre-encoded batches of distinct audit queries,
    each timed once after a warm-up, median per query."""
    import statistics

    from audit.dataset import Dataset

    adapter = load_adapter(model_path)
    data = Dataset.load(data_path).audit_split()
    queries = [Query(e.prompt, data.image(e), tuple(e.choices)) for e in data if e.image and e.choices]
    encs = [adapter.encode(queries[i:i + batch_size]) for i in range(0, batch_size * batches, batch_size)
            if len(queries[i:i + batch_size]) == batch_size]
    sync = torch.cuda.synchronize if str(adapter.device).startswith("cuda") else (lambda: None)
    times = []
    with torch.no_grad():
        adapter.forward(encs[0])
        for enc in encs[1:] or encs:
            sync()
            t0 = time.perf_counter()
            adapter.forward(enc)
            sync()
            times.append((time.perf_counter() - t0) / enc.input_ids.shape[0])
    return statistics.median(times)


def item_suite(work: Path, *, preset: str, suite: str, n_data: int, max_examples: int | None,
               reuse=("off", "on"), batch_size: int = 16) -> dict:
    from audit.dataset import Dataset
    from audit.runner import RunSpec, run_audit
    from probes.base import probe_class, resolve_names

    data, model = build_data(work, preset, n=n_data), build_model(work, preset)
    names, _ = resolve_names(suite=suite)
    for name in names:  # imports (scipy, fairlearn, captum) are not audit work
        probe_class(name)
    per_pass = _plain_seconds_per_pass(model, data, batch_size)
    out: dict = {"preset": preset, "suite": suite, "max_examples": max_examples, "batch_size": batch_size,
                 "plain_forward_s_per_pass": per_pass}
    metrics = {}
    for mode in reuse:
        adapter = load_adapter(model)  # cold caches for every run
        adapter.prefix_reuse = mode == "on"
        spec = RunSpec(model=str(model), data=str(data), probes=names, out=str(work / f"run-{time.time_ns()}"),
                       seed=0, suite=suite, store=str(work / "bench.duckdb"), max_examples=max_examples,
                       batch_size=batch_size)
        load0 = load_average()
        t0 = time.perf_counter()
        summary = run_audit(spec, adapter=adapter, data=Dataset.load(data).audit_split(), progress=False,
                            log=lambda m: None).summary
        wall = time.perf_counter() - t0
        passes = sum(p.get("declared_forward_passes") or 0.0 for p in summary["probes"].values())
        out[f"reuse_{mode}"] = {"wall_s": wall, "declared_forward_passes": passes,
                                "audit_efficiency": passes * per_pass / wall, "estimate_vs_actual": passes * per_pass / wall,
                                "failed": [f["message"] for f in summary["findings"] if f["severity"] == "fail"],
                                "load_before": load0, "load_after": load_average()}
        metrics[mode] = summary["metrics"]
    out["audit_efficiency"] = out["reuse_off"]["audit_efficiency"] if "reuse_off" in out else None
    if len(metrics) == 2:
        out["reuse_speedup"] = out["reuse_off"]["wall_s"] / out["reuse_on"]["wall_s"]
        # values agree to float rounding; a BCa interval of a few examples can jump on a 1e-7
        # change (resampled means that tie with the observed one), so intervals are shown apart
        out["max_value_difference"] = _max_difference(metrics["off"], metrics["on"], ("value",))
        out["max_interval_difference"] = _max_difference(metrics["off"], metrics["on"], ("ci_low", "ci_high"))
    return out


def _max_difference(a: list[dict], b: list[dict], keys) -> float:
    worst = 0.0
    if len(a) != len(b):
        return float("inf")
    for x, y in zip(a, b):
        if (x["probe"], x["metric"], x["group"]) != (y["probe"], y["metric"], y["group"]):
            return float("inf")
        for k in keys:
            u, v = x.get(k), y.get(k)
            if u is None or v is None or (isinstance(u, float) and math.isnan(u)):
                if (u is None) != (v is None):
                    return float("inf")
                continue
            worst = max(worst, abs(u - v))
    return worst


# ------------------------------------------------------------------ item 6: the estimate, per probe
class _RowCounter:
    """Counts the rows of every forward the model runs (no hook: prefix reuse stays on)."""

    def __init__(self, model):
        self.rows, self._forward, self._model = 0, model.forward, model
        model.forward = self

    def __call__(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.rows += int(ids.shape[0]) if torch.is_tensor(ids) else 0
        return self._forward(*args, **kwargs)

    def remove(self):
        del self._model.forward


def item_estimate(work: Path, *, preset: str, n_data: int, max_examples: int, batch_size: int = 16) -> dict:
    from audit.dataset import Dataset
    from audit.estimate import estimate
    from audit.executors import Task
    from audit.runner import unit_seed
    from probes.base import get_probe, resolve_names

    data_path, model = build_data(work, preset, n=n_data), build_model(work, preset)
    data = Dataset.load(data_path).audit_split()
    adapter = load_adapter(model)
    names, _ = resolve_names(suite="full")
    out, total_est, total_actual = {"preset": preset, "max_examples": max_examples, "probes": {}}, 0.0, 0.0
    for name in names:
        probe = get_probe(name, batch_size=batch_size)
        plan = probe.plan(adapter, data, max_examples=max_examples)
        if not plan.units:
            continue
        tasks = [Task(probe=name, unit=u, seed=unit_seed(0, name, u.index), options={"batch_size": batch_size})
                 for u in plan.units]
        est = estimate(adapter, tasks, batch_size=batch_size)
        row = {"declared_forward_passes": plan.cost, "estimate_s": est.seconds}
        for reuse in (False, True):  # rows are counted on the plain path: a shared prefix splits a row in two
            adapter.prefix_reuse = reuse
            counter = _RowCounter(adapter.model)
            t0 = time.perf_counter()
            for t in tasks:
                probe.run(adapter, t.unit, seed=t.seed)
            actual = time.perf_counter() - t0
            counter.remove()
            if not reuse:
                row.update(counted_forward_rows=counter.rows, rows_vs_declared=counter.rows / plan.cost,
                           actual_s_reuse_off=actual)
            else:
                row.update(actual_s=actual, estimate_vs_actual=(est.seconds or 0.0) / actual if actual else None)
        total_est += est.seconds or 0.0
        total_actual += row["actual_s"]
        out["probes"][name] = row
    out["estimate_s"], out["actual_s"] = total_est, total_actual
    out["estimate_vs_actual"] = total_est / total_actual if total_actual else None
    ratios = [p["estimate_vs_actual"] for p in out["probes"].values() if p["estimate_vs_actual"]]
    out["worst_probe_ratio"] = max(ratios, key=lambda r: max(r, 1 / r)) if ratios else None
    return out


# ------------------------------------------------------------------ item 3: DP step
def item_dp(work: Path, *, repeat: int, warmup: int, batch: int) -> dict:
    import warnings

    import dp_step

    warnings.filterwarnings("ignore")
    out = {}
    for train in ("lora", "full"):
        r = dp_step.bench_mode(train, preset="tiny", batch=batch, device="cpu", repeat=repeat, warmup=warmup,
                               workdir=work)
        out[train] = {k: v for k, v in r.items() if not isinstance(v, dict) or "step_ms" not in v}
        out[train]["variants"] = {k: {f: v[f] for f in ("mode", "step_ms", "peak_bytes", "time_ratio", "memory_ratio")
                                      if f in v} for k, v in r.items() if isinstance(v, dict) and "step_ms" in v}
    return out


# ------------------------------------------------------------------ report
def _get(d: dict, path: str):
    if path in d:  # a figure whose own name holds a dot (forward_passes_to_0.02)
        return d[path]
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _met(op: str, value, target) -> bool | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if op == "<=":
        return value <= target
    if op == ">=":
        return value >= target
    return 1 / target <= value <= target


def checks(res: dict) -> list[dict]:
    out = []
    for (item, path), (op, target) in TARGETS.items():
        if item in res["items"]:
            v = _get(res["items"][item], path)
            out.append({"item": item, "figure": path, "value": v, "target": f"{op} {target:g}",
                        "met": _met(op, v, target)})
    for key, s in res["items"].items():
        if key.startswith("suite_"):
            v = s.get("audit_efficiency")
            out.append({"item": key, "figure": "audit_efficiency (reuse off)", "value": v,
                        "target": f">= {SUITE_TARGET:g}", "met": _met(">=", v, SUITE_TARGET)})
            for mode in ("reuse_off", "reuse_on"):
                if mode in s:
                    v = s[mode]["estimate_vs_actual"]
                    out.append({"item": key, "figure": f"estimate_vs_actual ({mode})", "value": v,
                                "target": "within 2", "met": _met("within", v, 2.0)})
    return out


def markdown(res: dict) -> str:
    lines = [f"# mmaudit bench — {res['date']} — {res['machine']}", "", f"command: `{res['command']}`",
             f"load average before/after: {res['load_before']} / {res['load_after']}", "",
             "| item | figure | value | target | met |", "|---|---|---|---|---|"]
    for c in res["checks"]:
        v = c["value"]
        shown = f"{v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
        lines.append(f"| {c['item']} | {c['figure']} | {shown} | {c['target']} | "
                     f"{'' if c['met'] is None else ('yes' if c['met'] else 'NO')} |")
    lines += ["", "| item | figure | value |", "|---|---|---|"]
    for item, vals in res["items"].items():
        for k, v in _flatten(vals):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                lines.append(f"| {item} | {k} | {v:.4g} |")
    return "\n".join(lines) + "\n"


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        elif not isinstance(v, list):
            yield f"{prefix}{k}", v


def plan_items(work: Path, smoke: bool) -> dict:
    """Item name -> zero-argument callable (sizes: --smoke keeps every item to seconds)."""
    s = smoke
    tiny = build_model(work, "tiny")
    big = tiny if s else build_model(work, "small")
    items = {
        "hooks": lambda: item_hooks(load_adapter(big), big, batch=2 if s else 8, repeat=2 if s else 7),
        "memory": lambda: item_memory(load_adapter(big), build_data(work, "tiny" if s else "small", n=60 if s else 200),
                                      batch=2 if s else 8),
        "feature_ablation": lambda: item_feature_ablation(load_adapter(tiny), n_examples=1 if s else 8,
                                                          grid=2 if s else 4),
        "mm_shap": lambda: item_mm_shap(load_adapter(tiny), n_examples=1 if s else 4, reference_pairs=2 if s else 12,
                                        repeats=1 if s else 3),
        "prefix": lambda: item_prefix(tiny, variants=8, repeat=2 if s else 20),
        "dp": lambda: item_dp(work, repeat=2 if s else 15, warmup=1 if s else 3, batch=4 if s else 16),
        "estimate": lambda: item_estimate(work, preset="tiny", n_data=60 if s else 400, max_examples=2 if s else 8),
    }
    suites = ([("tiny", "standard", 60, 4, ("off", "on"))] if s else
              [("tiny", "standard", 1000, 300, ("off", "on")), ("tiny", "full", 400, 12, ("off", "on")),
               ("small", "standard", 200, 4, ("off", "on")), ("small", "full", 200, 1, ("off",))])
    for preset, suite, n, max_examples, reuse in suites:
        items[f"suite_{suite}_{preset}"] = (lambda preset=preset, suite=suite, n=n, m=max_examples, r=reuse:
                                            item_suite(work, preset=preset, suite=suite, n_data=n, max_examples=m,
                                                       reuse=r))
    return items


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: keeps the harness alive in CI")
    ap.add_argument("--out", help="results folder (default bench/results, or a temp folder with --smoke)")
    ap.add_argument("--only", help="comma-separated items (hooks, memory, feature_ablation, mm_shap, prefix, dp, "
                                   "estimate, suite = every suite_* item)")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    results_dir = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) if args.smoke
                                                   else Path(__file__).parent / "results")
    results_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mmaudit-bench-"))
    only = set(args.only.split(",")) if args.only else None
    res = {"date": dt.date.today().isoformat(), "machine": f"{platform.node() or 'host'}-{os.cpu_count()}cpu",
           "command": "python bench/run.py" + (" --smoke" if args.smoke else "")
                      + (f" --only {args.only}" if args.only else ""),
           "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "smoke": args.smoke, "load_before": load_average(), "items": {}, "item_load": {}}
    for name, fn in plan_items(work, args.smoke).items():
        if only and name not in only and not (name.startswith("suite_") and "suite" in only):
            continue
        print(f"bench: {name} (load {load_average()}) ...", file=sys.stderr, flush=True)
        before = load_average()
        res["items"][name] = fn()
        res["item_load"][name] = {"before": before, "after": load_average()}
    import transformers

    res.update(transformers=transformers.__version__, load_after=load_average())
    res["checks"] = checks(res)
    stem = f"{res['date']}-cpu{os.cpu_count()}" + ("-smoke" if args.smoke else "")
    (results_dir / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    (results_dir / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
