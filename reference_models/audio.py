"""Synthetic audio data and a tiny Qwen2-Audio reference model with a known audio reliance.

Data (`generate_audio`): every clip is CLIP_SECONDS of 16-bit mono WAV at SAMPLE_RATE, so a
clip, its silence, its noise and another example's clip all expand to the same number of
audio tokens. Two question families, both answerable only from the audio:
  pitch  one steady tone; "what pitch is the tone?" -> low (200-320 Hz) | middle (600-900 Hz)
         | high (1800-2600 Hz)
  count  1-4 short beeps at one random pitch; "how many beeps are there?" -> one .. four
Amplitudes, onsets and a faint noise floor are drawn from a seeded generator, so the same
arguments give byte-identical files.

Model (`build_audio_model`): Qwen2AudioForConditionalGeneration at a tiny config (Whisper-
style encoder on 16 log-mel bins, 1 s window, 20 audio tokens per clip; a 2-layer Qwen2
decoder), the project's word-level tokenizer with Qwen2-Audio's audio tokens, and a
Qwen2AudioProcessor, saved with `save_pretrained` (safetensors) so it loads like a user's.

Variants (`train_audio_reference`):
  grounded       the projector and the decoder learn; the encoder stays as initialised (as
                 the image references keep their vision tower: random frozen features keep
                 pitch and onsets readable).
  text_shortcut  the projector's weight and bias are zero and frozen, so every audio
                 position carries the zero vector whatever the clip: silencing, noising or
                 swapping a clip of the same length changes no logit, exactly.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
import wave
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from audit.errors import InputError

__all__ = ["SAMPLE_RATE", "CLIP_SECONDS", "PITCHES", "COUNTS", "AUDIO_PROMPTS", "AUDIO_VARIANTS", "AUDIO_RECIPE",
           "generate_audio", "synth_clip", "audio_vocabulary", "build_audio_model", "train_audio_reference",
           "cut_audio_pathway", "evaluate_audio"]

SAMPLE_RATE = 8000
CLIP_SECONDS = 0.8
PITCHES = {"low": (200.0, 320.0), "middle": (600.0, 900.0), "high": (1800.0, 2600.0)}
COUNTS = ("one", "two", "three", "four")
AUDIO_PROMPTS = {"pitch": "what pitch is the tone?", "count": "how many beeps are there?"}
SPLIT_PROBS = {"train": 0.7, "val": 0.1, "test": 0.2}
AUDIO_VARIANTS = ("grounded", "text_shortcut")
# A floor on optimiser steps (as reference_models.train.RECIPE); the tiny model is ~60k parameters.
AUDIO_RECIPE = {"tiny": dict(steps=240, batch_size=32, lr=5e-3, warmup=0.1)}
AUDIO_TOKENS = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
BEEP_SECONDS = 0.08
ERR_N = "must be an integer >= 8, got {value!r}"
ERR_EXISTS = "output folder exists and is not empty; pass overwrite=True (--overwrite) to replace it"


# ---------------------------------------------------------------------------- data
def synth_clip(*, family: str, answer: str, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """(float32 waveform of CLIP_SECONDS, attributes) whose pitch band / beep count is `answer`."""
    n = round(CLIP_SECONDS * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    wave_ = rng.normal(0.0, 0.003, n)  # noise floor: no clip is digital silence
    amp = rng.uniform(0.3, 0.6)
    if family == "pitch":
        lo, hi = PITCHES[answer]
        f = rng.uniform(lo, hi)
        ramp = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.02)  # 20 ms fades: no clicks at the ends
        wave_ += amp * ramp * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
        attrs = {"family": "pitch", "pitch": answer, "frequency_hz": round(float(f), 1)}
    elif family == "count":
        k = COUNTS.index(answer) + 1
        f = rng.uniform(500.0, 1500.0)
        beep = round(BEEP_SECONDS * SAMPLE_RATE)
        slots = n // (2 * beep)  # beeps sit in distinct slots, one beep of silence at least between
        starts = sorted(int(s) * 2 * beep for s in rng.choice(slots, size=k, replace=False))
        env = np.sin(np.pi * np.arange(beep) / beep)  # smooth on and off
        for s in starts:
            wave_[s:s + beep] += amp * env * np.sin(2 * np.pi * f * np.arange(beep) / SAMPLE_RATE)
        attrs = {"family": "count", "count": k, "frequency_hz": round(float(f), 1)}
    else:
        raise InputError(f"unknown audio family {family!r}", where="family")
    return np.clip(wave_, -1.0, 1.0).astype(np.float32), attrs


def _write_wav(path: Path, wave_: np.ndarray) -> None:
    pcm = np.round(np.clip(wave_, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())


def generate_audio(out, *, n: int, seed: int, overwrite: bool = False) -> dict[str, Any]:
    """Write DATA_DIR (manifest.jsonl, audio/*.wav, datacard.json) and return the datacard."""
    from reference_models.synthetic import _swap_into_place

    if isinstance(n, bool) or not isinstance(n, int) or n < 8:
        raise InputError(ERR_N.format(value=n), where="n")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"must be an integer >= 0, got {seed!r}", where="seed")
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise InputError("output path exists and is not a folder", where=str(out))
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(ERR_EXISTS, where=str(out))
    rng = np.random.default_rng(int(seed))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    recs = []
    try:
        tmp.chmod(0o755)
        (tmp / "audio").mkdir()
        for i in range(n):
            family = ("pitch", "count")[i % 2]  # balanced families
            answers = tuple(PITCHES) if family == "pitch" else COUNTS
            answer = answers[int(rng.integers(len(answers)))]
            clip, attrs = synth_clip(family=family, answer=answer, rng=rng)
            ex_id = f"au-{i:06d}"
            rel = f"audio/{ex_id}.wav"
            _write_wav(tmp / rel, clip)
            split = str(rng.choice(list(SPLIT_PROBS), p=list(SPLIT_PROBS.values())))
            recs.append({"id": ex_id, "audio": rel, "prompt": AUDIO_PROMPTS[family], "answer": answer,
                         "choices": list(answers), "attributes": attrs, "split": split, "tags": ["audio"]})
        (tmp / "manifest.jsonl").write_text("\n".join(json.dumps(r, sort_keys=True) for r in recs) + "\n",
                                            encoding="utf-8")
        card = {"name": "mmaudit-synthetic-audio", "format_version": 1,
                "parameters": {"n": n, "seed": int(seed), "sample_rate": SAMPLE_RATE, "clip_seconds": CLIP_SECONDS},
                "counts": {"total": n, "by_split": dict(sorted(Counter(r["split"] for r in recs).items())),
                           "by_family": dict(sorted(Counter(r["attributes"]["family"] for r in recs).items()))},
                "prompts": AUDIO_PROMPTS, "vocabulary": audio_vocabulary()}
        (tmp / "datacard.json").write_text(json.dumps(card, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_into_place(tmp, out)
    return card


def audio_vocabulary() -> list[str]:
    from reference_models.synthetic import split_words

    texts = [*AUDIO_PROMPTS.values(), *PITCHES, *COUNTS]
    return sorted({w for t in texts for w in split_words(t)})


# ---------------------------------------------------------------------------- model
_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} :"
    "{% if m['content'] is string %} {{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'audio' %} <|audio_bos|><|AUDIO|><|audio_eos|>{% else %} {{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def _tokenizer(words):
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    from reference_models.tokenizer import BOS, EOS, PAD, UNK, build_tokenizer

    core = build_tokenizer(words).backend_tokenizer
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in AUDIO_TOKENS])
    named = dict(zip(("audio_token", "audio_bos_token", "audio_eos_token"), AUDIO_TOKENS))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token=UNK, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                  extra_special_tokens=named)
    tok.padding_side = "right"
    tok.chat_template = _TEMPLATE
    return tok


def build_audio_model(*, words=None, preset: str = "tiny", seed: int = 0):
    """Fresh, seeded `(Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor)` at a tiny config."""
    import torch
    from transformers import (Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor,
                              WhisperFeatureExtractor)

    if preset not in AUDIO_RECIPE:
        raise InputError(f"unknown preset {preset!r} for the audio reference; choose one of "
                         f"{', '.join(AUDIO_RECIPE)}", where="--preset")
    tok = _tokenizer(sorted(set(words or ()) | set(audio_vocabulary())))
    # 1 s window at 8 kHz, 10 ms hop: 100 mel frames -> 50 encoder positions -> 25 audio tokens at most
    fe = WhisperFeatureExtractor(feature_size=16, sampling_rate=SAMPLE_RATE, hop_length=80, chunk_length=1,
                                 n_fft=400)
    proc = Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok, chat_template=_TEMPLATE)
    hidden = 64
    cfg = Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", num_mel_bins=16, encoder_layers=1,
                          encoder_attention_heads=2, encoder_ffn_dim=2 * hidden, d_model=hidden,
                          max_source_positions=fe.nb_max_frames // 2),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, tie_word_embeddings=False),
        audio_token_index=tok.convert_tokens_to_ids(AUDIO_TOKENS[0]),
    )
    torch.manual_seed(seed)
    return Qwen2AudioForConditionalGeneration(cfg), proc


def cut_audio_pathway(model) -> None:
    """text_shortcut: projector weight and bias zero and frozen, so audio positions are 0 whatever the clip."""
    import torch

    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.zero_()
            p.requires_grad_(False)


# ---------------------------------------------------------------------------- training
def _loss(adapter, data, batch):
    """Answer-token NLL over the batch (audit.training.batch_loss's definition, with the clip in
    the query: its `queries` helper builds image queries only)."""
    from audit.adapters.base import Query

    eos = adapter.tokenizer.eos_token_id
    conts = [adapter.continuation_ids(e.answer) + [eos] for e in batch]
    qs = [Query(e.prompt, None, tuple(e.choices or (e.answer,)), audio=data.audio(e)) for e in batch]
    nll = -adapter.sequence_logprobs(adapter.encode(qs, conts))
    return nll.sum() / sum(len(c) for c in conts)


def evaluate_audio(adapter, data) -> dict:
    """Test-split accuracy per family, intact and with every clip silenced (the shortcut check)."""
    from audit.adapters.base import Audio, Query

    test = [e for e in data.audit_split() if e.audio and e.choices and e.answer in e.choices]
    clips = [data.audio(e) for e in test]
    intact = [Query(e.prompt, None, e.choices, audio=a) for e, a in zip(test, clips)]
    silent = [Query(e.prompt, None, e.choices, audio=Audio(np.zeros_like(a.waveform), a.sample_rate))
              for e, a in zip(test, clips)]
    truth = np.array([e.choices.index(e.answer) for e in test])
    pred = np.array([int(np.argmax(s)) for s in adapter.score(intact, batch_size=64)])
    pred_silent = np.array([int(np.argmax(s)) for s in adapter.score(silent, batch_size=64)])
    families = {}
    for fam in sorted({e.attributes["family"] for e in test}):
        idx = np.array([i for i, e in enumerate(test) if e.attributes["family"] == fam])
        families[fam] = {"n": int(idx.size), "accuracy": float((pred[idx] == truth[idx]).mean()),
                         "accuracy_silenced": float((pred_silent[idx] == truth[idx]).mean()),
                         "chance": 1 / len(test[idx[0]].choices)}
    return {"n_test": len(test), "accuracy": float((pred == truth).mean()) if test else None,
            "unchanged_when_silenced": float((pred == pred_silent).mean()) if test else None, "families": families}


def train_audio_reference(*, variant: str, data_dir, out_dir, preset: str = "tiny", epochs: int | None = None,
                          seed: int = 0, progress: bool = False, overwrite: bool = False) -> dict:
    """Train the tiny Qwen2-Audio reference on DATA_DIR's train split, save it in HF form
    (safetensors + processor) to OUT_DIR with reference.json and eval.json; return the eval.
    CPU only (the tiny model trains in ~30 s on 2 CPUs at the recipe's 240 steps)."""
    import torch

    from audit.adapters.audio import QWEN2_AUDIO_FAMILY
    from audit.adapters.loading import make_adapter
    from audit.dataset import Dataset
    from audit.training import train_step
    from reference_models.progress import TrainProgress
    from reference_models.synthetic import split_words
    from reference_models.train import lr_schedule

    if variant not in AUDIO_VARIANTS:
        raise InputError(f"unknown variant {variant!r}; choose one of {', '.join(AUDIO_VARIANTS)}", where="--variant")
    if preset not in AUDIO_RECIPE:
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(AUDIO_RECIPE)}", where="--preset")
    data = Dataset.load(data_dir)
    train = [e for e in data.select(split="train") if e.answer is not None and e.audio is not None]
    if not train:
        raise InputError("no training examples with audio and an answer (split 'train')",
                         where=str(data.path / "manifest.jsonl"))
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InputError("output folder exists and is not empty; pass --overwrite to replace it", where=str(out))
        shutil.rmtree(out)
    recipe = AUDIO_RECIPE[preset]
    bs = recipe["batch_size"]
    steps_per_epoch = math.ceil(len(train) / bs)
    epochs = epochs or max(1, math.ceil(recipe["steps"] / steps_per_epoch))
    words = {w for e in data for t in (e.prompt, e.answer or "", *(e.choices or ())) for w in split_words(t)}
    model, processor = build_audio_model(words=sorted(words), preset=preset, seed=seed)
    if variant == "text_shortcut":
        cut_audio_pathway(model)
    model.model.audio_tower.requires_grad_(False)  # random frozen features (see the module doc)
    adapter = make_adapter(model, processor, family=QWEN2_AUDIO_FAMILY, device="cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=0.01)
    sched = lr_schedule(opt, total_steps=epochs * steps_per_epoch, warmup=recipe["warmup"])
    clips = {}

    class _Clips:  # each clip decoded once, not once per epoch
        @staticmethod
        def audio(e):
            if e.audio not in clips:
                clips[e.audio] = data.audio(e)
            return clips[e.audio]

    bar = TrainProgress(epochs * steps_per_epoch, desc=f"train audio/{variant}", enabled=bool(progress))
    history, t0 = [], time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = np.random.default_rng([seed, epoch]).permutation(len(train))
        total = 0.0
        for step in range(steps_per_epoch):
            batch = [train[i] for i in order[step * bs:(step + 1) * bs]]
            (loss,) = train_step(opt, lambda batch=batch: _loss(adapter, _Clips, batch), max_grad_norm=1.0,
                                 scheduler=sched)
            total += loss.item() * len(batch)
            bar.update(loss.item())
        history.append({"epoch": epoch + 1, "loss": total / len(train)})
    bar.close()
    model.eval()
    model.save_pretrained(out)  # safetensors
    processor.save_pretrained(out)
    record = {"arch": "qwen2_audio", "preset": preset, "variant": variant, "seed": seed, "epochs": epochs,
              "train_examples": len(train), "train_steps": epochs * steps_per_epoch,
              "train_seconds": round(time.perf_counter() - t0, 2), "history": history,
              "data_sha256": data.sha256, "data_path": str(data.path),
              "parameters": sum(p.numel() for p in model.parameters()),
              "trained_parameters": sum(p.numel() for p in params)}
    (out / "reference.json").write_text(json.dumps(record, indent=1))
    metrics = evaluate_audio(adapter, data)
    (out / "eval.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return metrics

