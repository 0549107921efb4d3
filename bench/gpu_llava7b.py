"""GPU benchmark on a LLaVA-7B-shaped model (random weights, bf16, batch 8 x ~590 tokens).

    python bench/gpu_llava7b.py              # one H100: items 1, 2, 4 in a few minutes
    python bench/gpu_llava7b.py --cpu-check  # tiny shape on CPU: checks the script itself

Shape: CLIP ViT-L/14 at 336 px (576 image tokens) + a Llama-7B decoder (4096 wide, 32
layers, 32 heads, MLP 11008, vocabulary 32064); rows are the 576 image tokens plus the
synthetic prompts (~590 tokens, a little shorter than DESIGN.md's 641-token batches). Writes bench/results/<date>-<gpu>-llava7b.json with each figure a ratio measured
side by side in this process, and the plain forward's MFU (2·params·tokens / time / peak
bf16 FLOP/s; attention FLOPs left out) as the ceiling. Item 5 (DP step) is bench/dp_step.py.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def build(out: Path, *, cpu_check: bool) -> Path:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from reference_models.architectures import _clip_image_processor, PRESETS
    from reference_models.synthetic import vocabulary
    from reference_models.tokenizer import build_tokenizer

    tok = build_tokenizer(vocabulary() + [f"pad{i}" for i in range(64)], image_token="<image>")
    img, patch = (64, 16) if cpu_check else (336, 14)
    vision = CLIPVisionConfig(hidden_size=64 if cpu_check else 1024, intermediate_size=128 if cpu_check else 4096,
                              num_hidden_layers=2 if cpu_check else 24, num_attention_heads=4 if cpu_check else 16,
                              image_size=img, patch_size=patch)
    text = LlamaConfig(vocab_size=32064, hidden_size=64 if cpu_check else 4096, intermediate_size=128 if cpu_check else 11008,
                       num_hidden_layers=2 if cpu_check else 32, num_attention_heads=4 if cpu_check else 32,
                       num_key_value_heads=4 if cpu_check else 32, max_position_embeddings=4096,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    n_img = (img // patch) ** 2
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      image_seq_length=n_img, vision_feature_layer=-2, vision_feature_select_strategy="default")
    p = PRESETS["tiny"].__class__(img, patch, vision.hidden_size, 2, 64, 2, 4)
    proc = LlavaProcessor(image_processor=_clip_image_processor(p), tokenizer=tok, patch_size=patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=tok.chat_template)
    torch.manual_seed(0)
    with torch.device("cpu" if cpu_check else "cuda"):
        model = LlavaForConditionalGeneration(cfg).to(torch.float32 if cpu_check else torch.bfloat16).eval()
    path = out / "llava7b-shape"
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def main() -> None:
    import transformers

    import run as bench

    from audit.adapters import load_adapter

    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-check", action="store_true")
    args = ap.parse_args()
    if not args.cpu_check and not torch.cuda.is_available():
        raise SystemExit("no GPU visible (use --cpu-check to test the script on a tiny shape)")
    work = Path(tempfile.mkdtemp(prefix="mmaudit-gpu-"))
    path = build(work, cpu_check=args.cpu_check)
    device = "cpu" if args.cpu_check else "cuda"
    adapter = load_adapter(path, device=device, dtype=None if args.cpu_check else torch.bfloat16)
    items = {"hooks": bench.item_hooks(adapter, batch=8, repeat=3 if args.cpu_check else 10)}
    items["feature_ablation"] = bench.item_feature_ablation(adapter, n_examples=2, grid=4)
    items["prefix"] = bench.item_prefix(adapter, variants=8, repeat=3 if args.cpu_check else 10)
    params = sum(p.numel() for p in adapter.model.parameters())
    tokens = 8 * items["hooks"]["tokens"]
    name = torch.cuda.get_device_name() if not args.cpu_check else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    mfu = 2 * params * tokens / (items["hooks"]["plain_ms"] / 1e3) / peak if peak else None
    res = {"date": dt.date.today().isoformat(), "device": name, "torch": torch.__version__,
           "transformers": transformers.__version__, "parameters": params, "tokens_per_batch": tokens,
           "plain_forward_mfu": mfu, "command": "python bench/gpu_llava7b.py" + (" --cpu-check" if args.cpu_check else ""),
           "items": items}
    tag = "cpu-check" if args.cpu_check else name.replace(" ", "_")
    dest = Path(__file__).parent / "results" / f"{res['date']}-{tag}-llava7b.json"
    if args.cpu_check:
        dest = work / dest.name
    dest.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
