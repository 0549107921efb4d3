"""The GPU pack: every GPU benchmark in one command, well under 8 minutes on one H100/H200.

    python bench/gpu.py               # one GPU: writes bench/results/<date>-gpu.json
    python bench/gpu.py --cpu-check   # tiny shapes on the CPU in seconds: checks the script itself

Items, each a ratio measured side by side in this process, next to its target:
 hooks     hooked forward (per-modality means at every layer) vs the plain SDPA forward vs
           TransformerLens `run_with_cache`, LLaVA-7B shape (CLIP ViT-L/14-336 + Llama-7B
           decoder, random weights, bfloat16, batch 8 x ~590 tokens); target hooks <= 1.05x
           SDPA. The plain forward's MFU (2 x parameters x tokens / time / peak bf16) is the ceiling.
 memory    peak memory of that hooked forward vs the plain one (torch.cuda counters)
 feature_ablation  image-patch ablation batched by mmaudit vs captum FeatureAblation at its
           default (one perturbation per forward) and batched; target >= 5x the default
 dp        one DP step vs the non-private step at the ~1B `base` preset (LoRA, and full
           fine-tuning), every clipping mode; target <= 1.3x for the default mode (LoRA)
 ray       one Ray actor holding the model on the GPU vs the local executor, same units of a
           small audit (when audit/executors/ray_executor.py and ray are installed)
 train     training throughput and MFU of the `small` reference preset (bf16 autocast)
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
TARGETS = {("hooks", "hooked_vs_plain"): ("<=", 1.05), ("memory", "hooked_vs_plain_peak"): ("<=", 1.1),
           ("feature_ablation", "speedup_vs_captum"): (">=", 5.0), ("dp", "lora.time_ratio"): ("<=", 1.3)}


def llava7b_shape(out: Path, *, cpu_check: bool, device: str):
    """(adapter, folder with config and processor) of a LLaVA-7B-shaped model with random
    weights, built on the device in place (nothing 13 GB goes through the disk)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from audit.adapters.families import family_of
    from audit.adapters.loading import make_adapter
    from reference_models.architectures import PRESETS, _clip_image_processor
    from reference_models.synthetic import vocabulary
    from reference_models.tokenizer import build_tokenizer

    tok = build_tokenizer(vocabulary() + [f"pad{i}" for i in range(64)], image_token="<image>")
    img, patch = (64, 16) if cpu_check else (336, 14)
    small = cpu_check
    vision = CLIPVisionConfig(hidden_size=64 if small else 1024, intermediate_size=128 if small else 4096,
                              num_hidden_layers=2 if small else 24, num_attention_heads=4 if small else 16,
                              image_size=img, patch_size=patch)
    text = LlamaConfig(vocab_size=32064, hidden_size=64 if small else 4096, intermediate_size=128 if small else 11008,
                       num_hidden_layers=2 if small else 32, num_attention_heads=4 if small else 32,
                       num_key_value_heads=4 if small else 32, max_position_embeddings=4096,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      image_seq_length=(img // patch) ** 2, vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    p = PRESETS["tiny"].__class__(img, patch, vision.hidden_size, 2, 64, 2, 4)
    proc = LlavaProcessor(image_processor=_clip_image_processor(p), tokenizer=tok, patch_size=patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=tok.chat_template)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(torch.float32 if small else torch.bfloat16).eval()
    path = out / "llava7b-shape"
    model.config.architectures = [type(model).__name__]  # what save_pretrained records; TransformerLens reads it
    model.config.name_or_path = str(path)
    model.config.save_pretrained(path)  # the config and processor only: the weights stay in memory
    proc.save_pretrained(path)
    proc = LlavaProcessor.from_pretrained(path)  # as a user's folder gives it (TransformerLens reads its origin)
    return make_adapter(model, proc, family=family_of("llava"), device=device), path


def item_hooks_7b(adapter, path: Path, *, repeat: int) -> dict:
    """bench/run.py's item 1 on the 7B shape; TransformerLens wraps the same weights last."""
    import run as bench
    from common import timeit

    size = adapter.model.config.vision_config.image_size
    enc = adapter.encode([bench.Query(bench.PROMPT, im, ("red",)) for im in bench.images(8, size)])
    sync = torch.cuda.synchronize if str(adapter.device).startswith("cuda") else None
    plain, hooked = bench._forwards(adapter, enc)
    t_plain, t_hooked = timeit(plain, repeat=repeat, sync=sync), timeit(hooked, repeat=repeat, sync=sync)
    out = {"batch": 8, "tokens": int(enc.input_ids.shape[1]), "plain_ms": 1e3 * t_plain, "hooked_ms": 1e3 * t_hooked,
           "hooked_vs_plain": t_hooked / t_plain}
    params = sum(p.numel() for p in adapter.model.parameters())
    name = torch.cuda.get_device_name() if sync else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    out["parameters"] = params
    out["plain_forward_mfu"] = 2 * params * 8 * out["tokens"] / t_plain / peak if peak else None
    try:  # the same weights, last: the bridge rewires the model it wraps
        out.update(bench.transformer_lens_timing(path, adapter.model, adapter, enc, repeat=repeat, sync=sync,
                                                 t_plain=t_plain, t_hooked=t_hooked))
    except Exception as exc:  # noqa: BLE001 - optional peer; say why it is missing
        out["transformer_lens_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return out


def item_ray(work: Path, *, device: str, cpu_check: bool) -> dict:
    """Wall time of the same units through one Ray actor (model on the GPU) and in-process."""
    if not (Path(__file__).resolve().parents[1] / "audit" / "executors" / "ray_executor.py").is_file():
        return {"skipped": "audit/executors/ray_executor.py does not exist"}
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        return {"skipped": "ray is not installed (pip install 'mmaudit[ray]')"}
    from audit.executors.ray_executor import RayExecutor
    from audit.adapters import load_adapter
    from audit.dataset import Dataset
    from audit.executors import LocalExecutor, Task
    from audit.runner import unit_seed
    from common import build_data, build_model
    from probes.base import get_probe

    preset = "tiny" if cpu_check else "small"
    model, data = build_model(work, preset), build_data(work, preset, n=200)
    probe = get_probe("hallucination" if cpu_check else "modality_ablation", batch_size=16)
    plan = probe.plan(load_adapter(model, device=device), Dataset.load(data).audit_split(),
                      max_examples=8 if cpu_check else 64)
    tasks = [Task(probe=probe.name, unit=u, seed=unit_seed(0, probe.name, u.index), options={"batch_size": 16})
             for u in plan.units]
    out = {"units": len(tasks), "probe": probe.name}
    results = {}
    for name, make in (("local", lambda: LocalExecutor(load_adapter(model, device=device))),
                       ("ray", lambda: RayExecutor(model=str(model), load_options={"device": device}, workers=1,
                                                   gpus_per_worker=0.0 if cpu_check else 1.0))):
        t0 = time.perf_counter()
        executor = make()
        got = []
        executor.run(tasks, on_result=lambda task, rows, error: got.append((task.unit.index, error)), progress=False)
        out[f"{name}_s"] = time.perf_counter() - t0
        results[name] = got
        if name == "ray":
            out["ray_timing"] = getattr(executor, "timing", None)
    out["errors"] = [str(e) for _, e in results["local"] + results["ray"] if e is not None][:3]
    out["ray_vs_local"] = out["ray_s"] / out["local_s"]
    out["ray_overhead_s"] = out["ray_s"] - out["local_s"]
    return out


def item_train(work: Path, *, device: str, cpu_check: bool) -> dict:
    """Reference training of the `small` preset (bench/gpu_train_small.py, folded in)."""
    from reference_models.synthetic import generate
    from reference_models.train import train_reference

    preset, n, epochs = ("tiny", 64, 1) if cpu_check else ("small", 2000, 1)
    data = work / f"train-data-{preset}"
    if not (data / "manifest.jsonl").is_file():
        generate(data, n=n, bias=0.5, seed=0, image_size=64 if cpu_check else 224, n_canaries=0)
    t0 = time.perf_counter()
    metrics = train_reference(arch="llava", preset=preset, variant="grounded", data_dir=data, out_dir=work / "trained",
                              device=device, epochs=epochs, batch_size=64, overwrite=True, progress=False)
    wall = time.perf_counter() - t0
    record = json.loads((work / "trained" / "reference.json").read_text())
    n_train, secs = record["train_examples"] * epochs, record["train_seconds"]
    tokens_per_example = ((64 // 8) if cpu_check else (224 // 16)) ** 2 + 24  # image tokens + prompt/answer
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    flops = 6 * record["parameters"] * tokens_per_example * n_train / secs
    return {"preset": preset, "epochs": epochs, "parameters": record["parameters"], "samples_per_s": n_train / secs,
            "train_seconds": secs, "wall_seconds_incl_eval": wall, "mfu_estimate": flops / peak if peak else None,
            "accuracy": metrics.get("accuracy") if isinstance(metrics, dict) else None}


def main(argv=None) -> int:
    import run as bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-check", action="store_true", help="tiny shapes on the CPU: checks the script itself")
    ap.add_argument("--only", help="comma-separated items")
    ap.add_argument("--out", help="results folder (default bench/results; a temp folder with --cpu-check)")
    args = ap.parse_args(argv)
    if not args.cpu_check and not torch.cuda.is_available():
        raise SystemExit("no GPU visible (use --cpu-check to test the script on tiny shapes)")
    warnings.filterwarnings("ignore")
    device = "cpu" if args.cpu_check else "cuda"
    if args.cpu_check:
        torch.set_num_threads(1)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    work = Path(tempfile.mkdtemp(prefix="mmaudit-gpu-"))
    only = set(args.only.split(",")) if args.only else None
    c = args.cpu_check
    big = {}

    def seven_b():
        if not big:
            big["adapter"], big["path"] = llava7b_shape(work, cpu_check=c, device=device)
        return big["adapter"], big["path"]

    def dp():
        import dp_step

        out = {}
        for train in ("lora", "full"):
            r = dp_step.bench_mode(train, preset="tiny" if c else "base", batch=4 if c else 8, device=device,
                                   repeat=2 if c else 5, warmup=1 if c else 2, workdir=work,
                                   dtype=torch.float32 if c else torch.bfloat16,
                                   variants=dp_step.VARIANTS if train == "lora" or c else ("non_private", "auto", "ghost"))
            out[train] = {k: v for k, v in r.items() if not isinstance(v, dict) or "step_ms" not in v}
            out[train]["variants"] = {k: {f: v[f] for f in ("mode", "step_ms", "peak_bytes", "time_ratio",
                                                           "memory_ratio") if f in v}
                                      for k, v in r.items() if isinstance(v, dict) and "step_ms" in v}
        return out

    items = {
        "hooks": lambda: item_hooks_7b(*seven_b(), repeat=3 if c else 10),
        "memory": lambda: {k: v for k, v in bench.item_memory(seven_b()[0], _data(work, c), batch=2 if c else 8).items()},
        "feature_ablation": lambda: bench.item_feature_ablation(seven_b()[0], n_examples=2, grid=4),
        "dp": dp,
        "ray": lambda: item_ray(work, device=device, cpu_check=c),
        "train": lambda: item_train(work, device=device, cpu_check=c),
    }
    name = torch.cuda.get_device_name() if not c else "cpu-check"
    res = {"date": dt.date.today().isoformat(), "device": name, "torch": torch.__version__,
           "command": "python bench/gpu.py" + (" --cpu-check" if c else "") + (f" --only {args.only}" if only else ""),
           "items": {}, "seconds": {}}
    import transformers

    res["transformers"] = transformers.__version__
    t_all = time.perf_counter()
    for key, fn in items.items():
        if only and key not in only:
            continue
        print(f"gpu bench: {key} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            res["items"][key] = fn()
        except Exception as exc:  # noqa: BLE001 - one failed item must not lose the others' numbers
            res["items"][key] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        res["seconds"][key] = round(time.perf_counter() - t0, 1)
        if key in ("memory", "feature_ablation") and not c:
            torch.cuda.empty_cache()
        if key == "feature_ablation":
            big.clear()  # the 7B weights are not needed past here
            if not c:
                torch.cuda.empty_cache()
    res["total_seconds"] = round(time.perf_counter() - t_all, 1)
    res["checks"] = [{"item": i, "figure": f, "value": bench._get(res["items"].get(i, {}), f), "target": f"{op} {t:g}",
                      "met": bench._met(op, bench._get(res["items"].get(i, {}), f), t)}
                     for (i, f), (op, t) in TARGETS.items() if i in res["items"]]
    results = Path(args.out) if args.out else (work if c else Path(__file__).parent / "results")
    results.mkdir(parents=True, exist_ok=True)
    dest = results / f"{res['date']}-{'cpu-check' if c else 'gpu'}.json"
    dest.write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({"checks": res["checks"], "seconds": res["seconds"], "written": str(dest)}, indent=1))
    return 0


def _data(work: Path, cpu_check: bool) -> Path:
    from common import build_data

    return build_data(work, "tiny", n=60) if cpu_check else build_data(work, "base", n=60)


if __name__ == "__main__":
    raise SystemExit(main())
