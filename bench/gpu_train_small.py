"""GPU: train the `small` LLaVA reference preset and record throughput, MFU and accuracy.

    python bench/gpu_train_small.py --out /tmp/bench-small [--epochs 3] [--n 8000]

Writes bench/results/<date>-gpu-train-small.json. MFU = 6 · trainable-parameter FLOPs per
token (forward + backward, dense) × tokens/s ÷ the GPU's peak bf16 dense FLOP/s (H100 SXM:
989 TFLOP/s); attention FLOPs are left out, so it slightly understates the true MFU. The
project never requires a GPU: this script refuses to run without one.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from pathlib import Path

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def main() -> None:
    import torch
    import transformers

    from reference_models.synthetic import generate
    from reference_models.train import train_reference

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n", type=int, default=8000)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no GPU visible: this benchmark only runs on a GPU")
    out = Path(args.out)
    data = out / "data"
    if not (data / "manifest.jsonl").is_file():
        generate(data, n=args.n, bias=0.5, seed=0, image_size=224)
    t0 = time.perf_counter()
    metrics = train_reference(arch="llava", preset="small", variant="grounded", data_dir=data, out_dir=out / "model",
                              device="cuda", epochs=args.epochs, batch_size=args.batch_size, overwrite=True)
    wall = time.perf_counter() - t0
    record = json.loads((out / "model" / "reference.json").read_text())
    n_train, secs = record["train_examples"] * args.epochs, record["train_seconds"]
    tokens_per_example = (224 // 16) ** 2 + 24  # image tokens + prompt/answer tokens (approx.)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    flops = 6 * record["parameters"] * tokens_per_example * n_train / secs
    result = {
        "what": "train llava/small grounded, bf16 autocast",
        "command": f"python bench/gpu_train_small.py --out {args.out} --epochs {args.epochs} --n {args.n}",
        "device": name, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "parameters": record["parameters"],
        "samples_per_s": n_train / secs, "train_seconds": secs, "wall_seconds_incl_eval": wall,
        "mfu_estimate": flops / peak if peak else None, "eval": metrics,
    }
    dest = Path(__file__).parent / "results" / f"{dt.date.today()}-gpu-train-small.json"
    dest.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "eval"}, indent=1))


if __name__ == "__main__":
    main()
