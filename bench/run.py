"""mmaudit benchmarks: every figure a ratio measured side by side in one process.

    python bench/run.py            # full CPU run (< 15 min on 2 CPUs)
    python bench/run.py --smoke    # seconds; what CI runs so the harness cannot rot

Writes bench/results/<date>-<machine>.json and .md (the --smoke run writes to a temp
folder unless --out is given). Items (issue: benchmarks side by side with the peers):
 1 hooked forward reducing per-modality means at every layer vs the plain forward, and vs
   TransformerLens `run_with_cache` of the same sites
 2 image-patch ablation batched by mmaudit vs captum FeatureAblation (same attributions)
 3 MM-SHAP: forward passes to reach |error| <= 0.02 against a permutation-SHAP reference
 4 text variants on one image with the image prefix reused (KV cache) vs full forwards
 6 the standard suite on the tiny reference model: wall time and audit efficiency
(item 5, DP step time and memory, is bench/dp_step.py; item 7 is bench/gpu_llava7b.py)
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from audit.adapters import Query, load_adapter  # noqa: E402


def timeit(fn, *, repeat: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_model(out: Path, preset: str) -> Path:
    from reference_models.architectures import build_reference_model
    from reference_models.synthetic import vocabulary

    path = out / f"llava-{preset}"
    if not (path / "config.json").exists():
        model, proc = build_reference_model(arch="llava", preset=preset, words=vocabulary(), seed=0)
        model.eval().save_pretrained(path)
        proc.save_pretrained(path)
    return path


def _images(n: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


# ------------------------------------------------------------------ item 1
def item_hooks(adapter, *, batch: int, repeat: int) -> dict:
    size = adapter.model.config.vision_config.image_size
    enc = adapter.encode([Query("what colour are the shapes?", im, ("red",)) for im in _images(batch, size)])
    image_mask = (enc.input_ids == adapter.image_token_id)[..., None].to(torch.float32)
    sums = {}

    def reducer(layer):
        def hook(module, inputs, output):
            h = output[0] if isinstance(output, tuple) else output
            # per-modality sums on the device: two vectors per row instead of T x D
            sums[layer] = ((h * image_mask).sum(1), (h * (1 - image_mask)).sum(1))
        return hook

    sites = {f"language.blocks.{i}.resid": reducer(i) for i in range(adapter.n_layers)}

    def plain():
        with torch.no_grad():
            adapter.forward(enc)

    def hooked():
        with torch.no_grad(), adapter.hooks(sites):
            adapter.forward(enc)

    result = {"batch": batch, "tokens": int(enc.input_ids.shape[1])}
    t_plain, t_hooked = timeit(plain, repeat=repeat), timeit(hooked, repeat=repeat)
    result.update(plain_ms=1e3 * t_plain, hooked_ms=1e3 * t_hooked, hooked_vs_plain=t_hooked / t_plain)
    try:
        from transformer_lens.model_bridge import TransformerBridge

        from transformers import AutoModelForImageTextToText

        # the bridge rewires the model it wraps: give it its own copy, timed on the same inputs
        hf = AutoModelForImageTextToText.from_pretrained(adapter.path).eval().to(adapter.device)
        bridge = TransformerBridge.boot_transformers(str(adapter.path), hf_model=hf,
                                                     tokenizer=adapter.tokenizer, device=adapter.device)
        names = [f"blocks.{i}.hook_resid_post" for i in range(adapter.n_layers)]

        def tl():
            with torch.no_grad():
                bridge.run_with_cache(enc.inputs["input_ids"], pixel_values=enc.inputs["pixel_values"],
                                      attention_mask=enc.inputs["attention_mask"], names_filter=names)

        t_tl = timeit(tl, repeat=repeat)
        result.update(transformer_lens_ms=1e3 * t_tl, transformer_lens_vs_plain=t_tl / t_plain,
                      transformer_lens_vs_hooked=t_tl / t_hooked)
    except Exception as exc:  # the bridge is optional; say why it is missing
        result["transformer_lens_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return result


# ------------------------------------------------------------------ item 2
def item_feature_ablation(adapter, *, n_examples: int, grid: int) -> dict:
    from captum.attr import FeatureAblation

    from probes.mm_shap import mask_image

    size = adapter.model.config.vision_config.image_size
    images = _images(n_examples, size)
    cands = ("red", "green", "blue", "yellow")
    prompt = "what colour are the shapes?"
    red = 0
    n_feat = grid * grid

    def ours():
        out = []
        for im in images:
            qs = [Query(prompt, im, cands)] + [Query(prompt, mask_image(im, np.arange(n_feat) != k, grid), cands)
                                              for k in range(n_feat)]
            s = adapter.score(qs, batch_size=len(qs))
            out.append(np.array([s[0][red] - x[red] for x in s[1:]]))
        return out

    def captum_fa(per_eval: int):
        res = []
        for im in images:
            enc = adapter.encode([Query(prompt, im, cands)])
            px = enc.inputs["pixel_values"]
            rows = torch.arange(px.shape[-2]) * grid // px.shape[-2]
            cols = torch.arange(px.shape[-1]) * grid // px.shape[-1]
            fmask = (rows[:, None] * grid + cols[None, :]).expand_as(px[0])[None]
            grey = adapter.encode([Query(prompt, Image.new("RGB", im.size, (128, 128, 128)), cands)]).inputs["pixel_values"]
            n = enc.context_lengths[0]
            tok = adapter.continuation_ids("red")[0]

            def f(p):
                batch = {k: (v.expand(p.shape[0], *v.shape[1:]) if k != "pixel_values" else p)
                         for k, v in enc.inputs.items()}
                return torch.log_softmax(adapter.model(**batch).logits[:, n - 1].float(), -1)[:, tok]

            with torch.no_grad():
                attr = FeatureAblation(f).attribute(px, baselines=grey, feature_mask=fmask,
                                                    perturbations_per_eval=per_eval)
            res.append(np.array([float(attr[0][fmask[0] == k][0]) for k in range(n_feat)]))
        return res

    t0 = time.perf_counter()
    a = ours()
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = captum_fa(1)
    t_captum = time.perf_counter() - t0
    t0 = time.perf_counter()
    captum_fa(n_feat)
    t_captum_batched = time.perf_counter() - t0
    # ours scores log-softmax over the 4 choices; captum's forward is the full-vocab log-prob:
    # ablation deltas of the same token differ by the change of the choice normaliser, so
    # compare rank agreement and the correlation of the deltas.
    corr = float(np.corrcoef(np.concatenate(a), np.concatenate(b))[0, 1])
    return {"examples": n_examples, "features": n_feat, "ours_examples_per_s": n_examples / t_ours,
            "captum_examples_per_s": n_examples / t_captum, "speedup_vs_captum": t_captum / t_ours,
            "captum_batched_examples_per_s": n_examples / t_captum_batched,
            "speedup_vs_captum_batched": t_captum_batched / t_ours, "correlation": corr}


# ------------------------------------------------------------------ item 3
def item_mm_shap(adapter, *, n_examples: int, reference_pairs: int) -> dict:
    from probes.mm_shap import GRID, MASK_WORD, mask_image, modality_shares, shapley_permutations

    size = adapter.model.config.vision_config.image_size
    images = _images(n_examples, size)
    prompt, cands = "what colour are the shapes?", ("red", "green", "blue", "yellow")
    words = prompt.split()
    n_text, n_players = len(words), len(words) + GRID * GRID
    calls = {"n": 0}

    def make_value(im):
        def value(masks):
            calls["n"] += len(masks)
            qs = [Query(" ".join(w if m else MASK_WORD for w, m in zip(words, mk[:n_text])),
                        mask_image(im, mk[n_text:], GRID), cands) for mk in masks]
            return [s[0] for s in adapter.score(qs, batch_size=len(qs))]
        return value

    rows = []
    for i, im in enumerate(images):
        ref_phi = shapley_permutations(make_value(im), n_players, pairs=reference_pairs, rng=np.random.default_rng(10 + i))
        ref_v = modality_shares(ref_phi.mean(0), n_text)[0]
        for pairs in (1, 2, 4, 8):
            errs = []
            for rep in range(3):
                calls["n"] = 0
                phi = shapley_permutations(make_value(im), n_players, pairs=pairs, rng=np.random.default_rng(1000 * rep + i))
                errs.append(abs(modality_shares(phi.mean(0), n_text)[0] - ref_v))
            rows.append({"example": i, "pairs": pairs, "forward_passes": calls["n"], "abs_error": float(np.mean(errs))})
    by_pairs = {}
    for r in rows:
        by_pairs.setdefault(r["pairs"], []).append(r)
    curve = [{"pairs": p, "forward_passes": v[0]["forward_passes"], "mean_abs_error": float(np.mean([x["abs_error"] for x in v])),
              "max_abs_error": float(np.max([x["abs_error"] for x in v]))} for p, v in sorted(by_pairs.items())]
    enough = next((c["forward_passes"] for c in curve if c["max_abs_error"] <= 0.02), None)
    return {"players": n_players, "reference_forward_passes": 2 * reference_pairs * (n_players + 1),
            "curve": curve, "forward_passes_to_0.02": enough}


# ------------------------------------------------------------------ item 4
def item_prefix(adapter, *, variants: int, repeat: int) -> dict:
    from audit.adapters.prefix_cache import score_prompt_variants

    size = adapter.model.config.vision_config.image_size
    im = _images(1, size)[0]
    words = ["man", "woman", "person", "boy", "girl", "doctor", "nurse", "adult", "child", "worker"][:variants]
    prompts = [f"what is the job of this {w}?" for w in words]
    cands = ("doctor", "nurse")
    ref = adapter.score([Query(p, im, cands) for p in prompts], batch_size=variants)
    got = score_prompt_variants(adapter, im, prompts, cands)
    err = max(float(np.abs(x - y).max()) for x, y in zip(ref, got))
    t_prefix = timeit(lambda: score_prompt_variants(adapter, im, prompts, cands), repeat=repeat)
    t_each = timeit(lambda: [adapter.score([Query(p, im, cands)]) for p in prompts], repeat=repeat)
    t_batched = timeit(lambda: adapter.score([Query(p, im, cands) for p in prompts], batch_size=variants), repeat=repeat)
    return {"variants": variants, "max_abs_diff": err, "prefix_ms": 1e3 * t_prefix,
            "one_forward_per_variant_ms": 1e3 * t_each, "batched_full_forward_ms": 1e3 * t_batched,
            "speedup_vs_one_per_variant": t_each / t_prefix, "speedup_vs_batched_full": t_batched / t_prefix}


# ------------------------------------------------------------------ item 6
def item_suite(workdir: Path, *, n: int, epochs: int, max_examples: int | None) -> dict:
    from audit.dataset import Dataset
    from audit.runner import RunSpec, run_audit
    from probes.base import resolve_names
    from reference_models.synthetic import generate
    from reference_models.train import train_reference

    data, model = workdir / "suite-data", workdir / "suite-model"
    if not (data / "manifest.jsonl").exists():
        generate(data, n=n, bias=0.9, seed=0)
    t0 = time.perf_counter()
    if not (model / "eval.json").exists():
        train_reference(arch="llava", preset="tiny", variant="biased", data_dir=data, out_dir=model, epochs=epochs, progress=False)
    train_s = time.perf_counter() - t0
    names, _ = resolve_names(suite="standard")
    adapter = load_adapter(model)
    ds = Dataset.load(data).audit_split()
    out = workdir / f"suite-run-{time.time_ns()}"
    spec = RunSpec(model=str(model), data=str(data), probes=names, out=str(out), seed=0, suite="standard",
                   store=str(workdir / "bench.duckdb"), max_examples=max_examples)
    t0 = time.perf_counter()
    summary = run_audit(spec, adapter=adapter, data=ds, progress=False, log=lambda m: None).summary
    wall = time.perf_counter() - t0
    # lower bound: the forward passes the suite's probes declare, at the plain batched speed
    passes = sum(p.get("declared_forward_passes") or 0.0 for p in summary["probes"].values())
    e = next(x for x in ds if x.image and x.choices)
    q = Query(e.prompt, ds.image(e), e.choices)
    per_pass = timeit(lambda: adapter.score([q] * 16, batch_size=16), repeat=3) / 16
    return {"probes": names, "train_seconds": train_s, "suite_wall_s": wall, "declared_forward_passes": passes,
            "plain_forward_s_per_example": per_pass, "audit_efficiency": passes * per_pass / wall}


def _markdown(res: dict) -> str:
    lines = [f"# mmaudit bench — {res['date']} — {res['machine']}", "", f"command: `{res['command']}`", "",
             "| item | figure | value | target |", "|---|---|---|---|"]
    targets = {("hooks", "hooked_vs_plain"): "<= 1.05", ("feature_ablation", "speedup_vs_captum"): ">= 5",
               ("mm_shap", "forward_passes_to_0.02"): "<= 100", ("prefix", "speedup_vs_one_per_variant"): ">= 3",
               ("suite", "suite_wall_s"): "<= 300", ("suite", "audit_efficiency"): ">= 0.7"}
    for item, vals in res["items"].items():
        for k, v in vals.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                lines.append(f"| {item} | {k} | {v:.4g} | {targets.get((item, k), '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: keeps the harness alive in CI")
    ap.add_argument("--out", help="results folder (default bench/results, or a temp folder with --smoke)")
    ap.add_argument("--only", help="comma-separated items: hooks,feature_ablation,mm_shap,prefix,suite")
    args = ap.parse_args(argv)
    results_dir = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) if args.smoke else Path(__file__).parent / "results")
    results_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mmaudit-bench-"))
    only = set(args.only.split(",")) if args.only else None
    s = args.smoke
    items = {}
    tiny = load_adapter(build_model(work, "tiny"))
    plan = {
        "hooks": lambda: item_hooks(load_adapter(build_model(work, "tiny" if s else "small")), batch=2 if s else 8, repeat=2 if s else 7),
        "feature_ablation": lambda: item_feature_ablation(tiny, n_examples=1 if s else 8, grid=2 if s else 4),
        "mm_shap": lambda: item_mm_shap(tiny, n_examples=1 if s else 4, reference_pairs=2 if s else 12),
        "prefix": lambda: item_prefix(tiny, variants=8, repeat=2 if s else 20),
        "suite": lambda: item_suite(work, n=200 if s else 2000, epochs=1 if s else 20, max_examples=8 if s else None),
    }
    for name, fn in plan.items():
        if only and name not in only:
            continue
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        items[name] = fn()
    import transformers

    res = {"date": dt.date.today().isoformat(), "machine": f"{platform.node() or 'host'}-{os.cpu_count()}cpu",
           "command": "python bench/run.py" + (" --smoke" if s else "") + (f" --only {args.only}" if args.only else ""),
           "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads(), "smoke": s, "items": items}
    stem = f"{res['date']}-{'cpu' + str(os.cpu_count())}" + ("-smoke" if s else "")
    (results_dir / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (results_dir / f"{stem}.md").write_text(_markdown(res))
    print(_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
