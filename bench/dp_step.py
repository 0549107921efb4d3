"""Bench item 3: one DP-SGD step vs one non-private step of the same model and batch.

    python bench/dp_step.py                      # tiny LLaVA on CPU, batch 16, LoRA and full
    python bench/dp_step.py --device cuda --preset base --dtype bfloat16   # ~1B shape

Every copy starts from the same weights and trains the same parameters (`prepare_trainable`,
`structural_freeze`) with the same per-example loss (`audit.training.answer_loss`), optimiser
(Adam) and batch, through the same code as `mmaudit defend dp` (`defenses.dp.make_private`):
non-private; book-keeping clipping ("bk", one backward); Opacus' ghost clipping (two
backwards); Opacus' hooks (per-example gradients materialised); and "auto", the mode
`choose_grad_sample_mode` picks — the default. Steps alternate between the copies so drift
on a shared machine hits them alike.

Time: median seconds per step over --repeat steps after --warmup. Memory: on CUDA
`torch.cuda.max_memory_allocated` over one step; on CPU the resident training state (weights,
gradients, optimiser state) plus the peak of the CPU allocator during one step, read from the
`torch.profiler` memory events. Targets for the default mode: LoRA time <= 1.3x and memory
<= 1.1x, full fine-tuning time <= 1.5x. Writes bench/results/<date>-<machine>-dp_step.json.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

TARGETS = {"lora": {"time_ratio": 1.3, "memory_ratio": 1.1}, "full": {"time_ratio": 1.5}}
VARIANTS = ("non_private", "auto", "bk", "ghost", "hooks")
IMAGE_SIZE = {"tiny": 64, "small": 224, "base": 336}


def _state_bytes(model, optimizer) -> int:
    seen, total = set(), 0
    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    for st in optimizer.state.values():
        tensors += [v for v in st.values() if torch.is_tensor(v)]
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _cpu_step_peak(step) -> int:
    """Peak bytes held by the CPU allocator during `step()` above what was held before it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def _memory(step, model, optimizer, device: str) -> dict:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return {"peak_bytes": int(torch.cuda.max_memory_allocated())}
    step_peak = _cpu_step_peak(step)
    state = _state_bytes(model, optimizer)
    return {"peak_bytes": state + step_peak, "state_bytes": state, "step_peak_bytes": step_peak}


def _data(workdir: Path, preset: str, batch: int):
    from audit.dataset import Dataset
    from reference_models.synthetic import generate

    data_dir = workdir / f"data-{preset}"
    if not (data_dir / "manifest.jsonl").exists():
        generate(data_dir, n=max(64, batch * 2), seed=0, n_canaries=0, image_size=IMAGE_SIZE[preset])
    data = Dataset.load(data_dir)
    return data, [e for e in data.select(split="train") if e.answer][:batch]


def setup(train: str, *, preset: str, batch: int, device: str, workdir: Path, lr: float,
          dtype: torch.dtype = torch.float32, variants=VARIANTS) -> dict:
    """One step function per variant, each on its own copy of the same weights."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from audit.adapters.generative import GenerativeAdapter
    from audit.adapters.sites import GENERATIVE_FAMILIES
    from audit.training import answer_loss, train_step
    from defenses.dp import choose_grad_sample_mode, make_private, prepare_trainable, structural_freeze
    from reference_models.architectures import build_reference_model
    from reference_models.synthetic import vocabulary

    data, examples = _data(workdir, preset, batch)
    model, proc = build_reference_model(arch="llava", preset=preset, words=vocabulary(), seed=0)
    model.to(device=device, dtype=dtype)
    copies = {}
    for variant in variants:
        ad = GenerativeAdapter(copy.deepcopy(model), proc, architecture="llava", sites=GENERATIVE_FAMILIES["llava"],
                               device=device)
        net = prepare_trainable(ad, mode=train)
        ad.model = net
        net.train()
        frozen = structural_freeze(ad)  # data-independent: the same frozen set for every copy
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        mode = None
        if variant == "non_private":
            def loss(ad=ad):
                return answer_loss(ad, data, examples).mean()
        else:
            mode = choose_grad_sample_mode(ad, variant)
            private = make_private(PrivacyEngine(), module=net, optimizer=opt, noise_multiplier=1.0,
                                   data_loader=DataLoader(TensorDataset(torch.arange(batch)), batch_size=batch),
                                   max_grad_norm=1.0, grad_sample_mode=mode, poisson_sampling=False)
            private.module.train()
            opt = private.optimizer

            def loss(ad=ad, private=private):
                return private.loss(answer_loss(ad, data, examples))

        copies[variant] = {"step": (lambda opt=opt, loss=loss: train_step(opt, loss)), "model": net,
                           "optimizer": opt, "mode": mode, "frozen": len(frozen),
                           "trainable": int(sum(p.numel() for p in params))}
    return copies


def bench_mode(train: str, *, preset: str, batch: int, device: str, repeat: int, warmup: int, workdir: Path,
               dtype: torch.dtype = torch.float32, variants=VARIANTS) -> dict:
    copies = setup(train, preset=preset, batch=batch, device=device, workdir=workdir, dtype=dtype,
                   lr=5e-3 if train == "lora" else 1e-3, variants=variants)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {k: [] for k in copies}
    for i in range(warmup + repeat):
        for name, c in copies.items():
            sync()
            t0 = time.perf_counter()
            c["step"]()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    out: dict = {}
    for name, c in copies.items():
        out[name] = {"mode": c["mode"], "step_ms": 1e3 * statistics.median(times[name]),
                     "step_ms_all": [round(1e3 * t, 3) for t in times[name]],
                     "trainable_parameters": c["trainable"], "frozen_tensors": c["frozen"],
                     **_memory(c["step"], c["model"], c["optimizer"], device)}
    base = out["non_private"]
    for name in copies:
        if name != "non_private":
            out[name]["time_ratio"] = out[name]["step_ms"] / base["step_ms"]
            out[name]["memory_ratio"] = out[name]["peak_bytes"] / base["peak_bytes"]
    default = out.get("auto") or next(v for k, v in out.items() if k != "non_private")
    out["default_mode"] = default["mode"]
    out["time_ratio"], out["memory_ratio"] = default["time_ratio"], default["memory_ratio"]
    out["targets"] = TARGETS[train]
    out["meets_targets"] = {k: out[k] <= v for k, v in TARGETS[train].items()}
    private = {k: out[k]["time_ratio"] for k in copies if k not in ("non_private", "auto")}
    out["fastest_private_mode"] = min(private, key=private.get) if private else None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=tuple(IMAGE_SIZE))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--modes", default="lora,full", help="what trains: lora, full or both")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    ap.add_argument("--out", help="results folder (default bench/results)")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    results_dir = Path(args.out) if args.out else Path(__file__).parent / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    machine = (torch.cuda.get_device_name().replace(" ", "-") if args.device == "cuda"
               else f"{platform.node() or 'host'}-{os.cpu_count()}cpu")
    res = {"date": dt.date.today().isoformat(), "machine": machine, "device": args.device, "preset": args.preset,
           "dtype": args.dtype, "batch": args.batch, "repeat": args.repeat, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "load_average": os.getloadavg(),
           "command": " ".join(["python", "bench/dp_step.py", *(argv if argv is not None else sys.argv[1:])]),
           "targets": TARGETS, "modes": {}}
    variants = tuple(v for v in args.variants.split(",") if v)
    if "non_private" not in variants:
        variants = ("non_private", *variants)
    with tempfile.TemporaryDirectory() as tmp:
        for train in [m for m in args.modes.split(",") if m]:
            r = bench_mode(train, preset=args.preset, batch=args.batch, device=args.device, repeat=args.repeat,
                           warmup=args.warmup, workdir=Path(tmp), dtype=getattr(torch, args.dtype), variants=variants)
            res["modes"][train] = r
            line = ", ".join(f"{k} x{r[k]['time_ratio']:.2f} time x{r[k]['memory_ratio']:.2f} memory"
                             for k in variants if k != "non_private")
            print(f"{train}: non-private {r['non_private']['step_ms']:.1f} ms/step; {line}; default "
                  f"{r['default_mode']} meets {r['meets_targets']}")
    res["load_average_after"] = os.getloadavg()
    path = results_dir / f"{res['date']}-{machine}-dp_step.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
