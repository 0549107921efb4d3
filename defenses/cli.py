"""`mmaudit defend dp|debias`. Added to the CLI through `add_commands(subparsers)`."""
from __future__ import annotations

import argparse
import sys

from audit.argtypes import DTYPE_CHOICES, device, positive_float, positive_int, seed

__all__ = ["add_commands", "cmd_defend_debias", "cmd_defend_dp"]


def _probability(text: str) -> float:
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {text}")
    return value


def _log(msg: str) -> None:
    print(f"mmaudit: {msg}", file=sys.stderr)


def _prepare(args: argparse.Namespace):
    """Check OUT against both inputs before any work; open the model in the chosen dtype."""
    import functools

    from audit.adapters.loading import resolve_device
    from audit.paths import check_output

    check_output(args.out, inputs=[("--model", args.model), ("--data", args.data)])
    return resolve_device(args.device), functools.partial(_open, dtype=args.dtype)


def _open(model_dir, *, device, dtype):
    from audit.adapters.loading import load_adapter

    return load_adapter(model_dir, device=device, dtype=dtype)


def add_commands(sub) -> None:
    from defenses.debias import METHODS
    from defenses.dp import ACCOUNTANTS, GRAD_SAMPLE_MODES, MODES

    d = sub.add_parser("defend", help="write a defended copy of a model (DP fine-tuning, debiasing)")
    dsub = d.add_subparsers(dest="defend_command", required=True, metavar="DEFENSE")

    dp = dsub.add_parser("dp", help="differentially private fine-tuning (Opacus DP-SGD, LoRA + ghost clipping)",
                         description="Fine-tune MODEL_DIR on the train split of DATA_DIR with DP-SGD and write "
                                     "MODEL_DIR2 (merged weights, processor, dp_accountant.json, defense.json).")
    dp.add_argument("--model", required=True, metavar="MODEL_DIR")
    dp.add_argument("--data", required=True, metavar="DATA_DIR")
    dp.add_argument("--target-epsilon", required=True, type=positive_float, metavar="E",
                    help="privacy budget ε the whole run may spend")
    dp.add_argument("--out", required=True, metavar="MODEL_DIR2")
    dp.add_argument("--delta", type=_probability, help="δ (default 1/(10 N), N = training records; must be < 1/N)")
    dp.add_argument("--mode", choices=MODES, default="lora",
                    help="lora: LoRA on the language model's q/v (default); full: every supported module")
    dp.add_argument("--accountant", choices=ACCOUNTANTS, default="rdp")
    dp.add_argument("--grad-sample-mode", choices=GRAD_SAMPLE_MODES, default="ghost",
                    help="ghost: ghost clipping, two backward passes, no per-sample gradients (default); "
                         "hooks: per-sample gradients, one backward pass (faster for small LoRA)")
    dp.add_argument("--epochs", type=positive_int, default=3)
    dp.add_argument("--batch-size", type=positive_int, default=32, help="expected logical batch (Poisson)")
    dp.add_argument("--physical-batch-size", type=positive_int, default=16,
                    help="largest batch in memory (BatchMemoryManager)")
    dp.add_argument("--lr", type=positive_float, help="learning rate (default 5e-3 lora, 1e-3 full)")
    dp.add_argument("--max-grad-norm", type=positive_float, default=1.0, help="per-example clipping norm C")
    dp.add_argument("--lora-r", type=positive_int, default=8)
    dp.add_argument("--device", default="cpu", type=device, metavar="{cpu,cuda,cuda:N,auto}")
    dp.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES,
                    help="weights' dtype while training (default float32: DP noise and clipping want full precision)")
    dp.add_argument("--seed", type=seed, default=0)
    dp.add_argument("--overwrite", action="store_true", help="replace an existing MODEL_DIR2")
    dp.set_defaults(handler=cmd_defend_dp)

    db = dsub.add_parser("debias", help="counterfactual debiasing (cda, clp) or a DeAR-style residual (dual encoders)",
                         description="Fine-tune MODEL_DIR so the sensitive attribute stops moving its answers and "
                                     "write MODEL_DIR2 with defense.json (fairness and utility before/after).")
    db.add_argument("--method", required=True, choices=METHODS)
    db.add_argument("--model", required=True, metavar="MODEL_DIR")
    db.add_argument("--data", required=True, metavar="DATA_DIR")
    db.add_argument("--out", required=True, metavar="MODEL_DIR2")
    db.add_argument("--epochs", type=positive_int, default=3)
    db.add_argument("--batch-size", type=positive_int, default=32)
    db.add_argument("--lr", type=positive_float, help="learning rate of cda/clp fine-tuning (default 1e-4)")
    db.add_argument("--clp-weight", type=positive_float, default=1.0, help="λ of the logit-pairing term (clp)")
    db.add_argument("--attribute", default="group", help="protected attribute for the residual adversary")
    db.add_argument("--residual-directions", type=positive_int, default=16,
                    help="residual: most directions removed from the image embedding")
    db.add_argument("--device", default="cpu", type=device, metavar="{cpu,cuda,cuda:N,auto}")
    db.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="weights' dtype while training")
    db.add_argument("--seed", type=seed, default=0)
    db.add_argument("--overwrite", action="store_true", help="replace an existing MODEL_DIR2")
    db.set_defaults(handler=cmd_defend_debias)


def cmd_defend_dp(args: argparse.Namespace) -> int:
    from defenses.dp import DPConfig, dp_finetune

    config = DPConfig(target_epsilon=args.target_epsilon, delta=args.delta, epochs=args.epochs,
                      batch_size=args.batch_size, physical_batch_size=args.physical_batch_size, lr=args.lr,
                      max_grad_norm=args.max_grad_norm, mode=args.mode, lora_r=args.lora_r,
                      accountant=args.accountant, grad_sample_mode=args.grad_sample_mode, seed=args.seed)
    dev, factory = _prepare(args)
    rec = dp_finetune(model_dir=args.model, data_dir=args.data, out_dir=args.out, config=config,
                      device=dev, overwrite=args.overwrite, log=_log, adapter_factory=factory)
    p, u = rec["privacy"], rec["utility"]
    print(f"saved {args.out}: ε = {p['epsilon']:.3f} (target {p['target_epsilon']}) at δ = {p['delta']:.3g}, "
          f"{p['accountant']} accountant, {p['steps']} steps, noise multiplier {p['noise_multiplier']:.3f}; "
          f"test accuracy {u['before']['accuracy']:.3f} -> {u['after']['accuracy']:.3f}; "
          f"{len(rec['validator']['frozen'])} parameter tensor(s) frozen for Opacus (see defense.json)")
    return 0


def cmd_defend_debias(args: argparse.Namespace) -> int:
    from defenses.debias import DebiasConfig, debias

    config = DebiasConfig(method=args.method, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          clp_weight=args.clp_weight, attribute=args.attribute, residual_directions=args.residual_directions,
                          seed=args.seed)
    dev, factory = _prepare(args)
    rec = debias(model_dir=args.model, data_dir=args.data, out_dir=args.out, config=config,
                 device=dev, overwrite=args.overwrite, log=_log, adapter_factory=factory)
    u, f = rec["utility"], rec["fairness"]
    flips = ", ".join(f"{g} {f['before']['flip_rate'].get(g, float('nan')):.3f} -> {v:.3f}"
                      for g, v in sorted(f["after"].get("flip_rate", {}).items()))
    print(f"saved {args.out}: test accuracy {u['before']['accuracy']:.3f} -> {u['after']['accuracy']:.3f}; "
          f"counterfactual flip rate {flips or 'n/a'} (see defense.json)")
    return 0
