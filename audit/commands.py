"""Implementations behind `audit.cli`: each `cmd_<name>(args)` returns an exit code."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from audit.errors import InputError

__all__ = ["cmd_reference", "cmd_serve", "cmd_runs", "cmd_demo"]


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def _replaceable(out: Path, *, marker: str, what: str) -> None:
    """--overwrite replaces only a folder this command wrote before (it holds `marker`) or an empty one."""
    if out.is_dir() and any(out.iterdir()) and not (out / marker).exists():
        raise InputError(f"--overwrite only replaces {what} written by mmaudit (with {marker}); this folder holds "
                         "something else and is kept", where=str(out))


def cmd_reference(args: argparse.Namespace) -> int:
    from audit.paths import check_output

    out = Path(args.out).expanduser()
    if args.reference_command == "data" and args.audio:
        from reference_models.audio import generate_audio

        if args.overwrite:
            _replaceable(out, marker="datacard.json", what="a dataset folder")
        card = generate_audio(args.out, n=args.n, seed=args.seed, overwrite=args.overwrite)
        print(f"wrote {card['counts']['total']} audio examples to {args.out} (splits: {card['counts']['by_split']})")
        return 0
    if args.reference_command == "data":
        from reference_models.synthetic import generate

        if args.overwrite:
            _replaceable(out, marker="datacard.json", what="a dataset folder")
        card = generate(args.out, n=args.n, bias=args.bias, seed=args.seed, image_size=args.image_size,
                        overwrite=args.overwrite)
        counts = card["counts"]
        print(f"wrote {counts['total']} examples to {args.out} (splits: {counts['by_split']})")
        return 0
    from reference_models.train import train_reference

    check_output(out, inputs=[("--data", args.data)])
    if args.arch == "audio":
        from reference_models.audio import train_audio_reference

        if args.overwrite:
            _replaceable(out, marker="reference.json", what="a reference model folder")
        metrics = train_audio_reference(variant=args.variant, data_dir=args.data, out_dir=args.out, preset=args.preset,
                                        epochs=args.epochs, seed=args.seed, progress=True, overwrite=args.overwrite)
        fams = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in metrics["families"].items())
        print(f"saved {args.out}; test accuracy {metrics['accuracy']:.3f} ({fams}); see {Path(args.out) / 'eval.json'}")
        return 0
    if args.overwrite and not (out / "checkpoint").is_dir():
        _replaceable(out, marker="reference.json", what="a reference model folder")
    metrics = train_reference(arch=args.arch, preset=args.preset, variant=args.variant, data_dir=args.data,
                              out_dir=args.out, device=args.device, seed=args.seed, text_encoder=args.text_encoder,
                              vision_encoder=args.vision_encoder, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, overwrite=args.overwrite)
    fams = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in metrics["families"].items())
    print(f"saved {args.out}; test accuracy {metrics['accuracy']:.3f} ({fams}); see {Path(args.out) / 'eval.json'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from reference_models.serve import serve

    serve(model_dir=args.model, host=args.host, port=args.port, device=args.device, max_batch=args.max_batch,
          request_timeout=args.request_timeout, dtype=args.dtype)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from audit.store import Store

    store = Store(args.store)
    runs = store.runs()
    if runs.empty:
        print(f"no runs in {store.path}")
        return 0
    print(runs.to_string(index=False))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from audit.demo import cmd_demo as run

    return run(args)
