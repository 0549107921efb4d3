"""Audio as a modality: the dataset field, Query.audio, the Qwen2-Audio adapter (a tiny model
built from its config, saved and loaded back), the audio players of modality_ablation and
mm_shap, and the audio reference models whose audio reliance is known by construction
(text_shortcut: projector zero and frozen -> exactly 0; grounded: clearly above 0)."""
from __future__ import annotations

import json
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from audit.adapters.audio import QWEN2_AUDIO_FAMILY, QWEN2_AUDIO_SITES
from audit.adapters.base import Audio, Query
from audit.adapters.families import family_of
from audit.dataset import Dataset
from audit.errors import InputError, UnsupportedError
from conftest import _cached
from probes.base import get_probe
from reference_models.audio import (AUDIO_PROMPTS, CLIP_SECONDS, COUNTS, PITCHES, SAMPLE_RATE, build_audio_model,
                                    generate_audio, train_audio_reference)

CHOICES = tuple(PITCHES)
PROMPT = AUDIO_PROMPTS["pitch"]


def _tone(freq=440.0, seconds=CLIP_SECONDS, rate=SAMPLE_RATE, amp=0.5) -> Audio:
    t = np.arange(round(seconds * rate)) / rate
    return Audio((amp * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate)


def open_audio_model(path):
    """The model folder as an adapter: through load_adapter once qwen2_audio is registered,
    else through the same transformers auto classes and the family's adapter."""
    if family_of("qwen2_audio") is not None:
        from audit.adapters import load_adapter

        return load_adapter(path)
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    from audit.adapters.loading import make_adapter

    model = AutoModelForMultimodalLM.from_pretrained(path, use_safetensors=True, attn_implementation="sdpa")
    return make_adapter(model.eval(), AutoProcessor.from_pretrained(path), family=QWEN2_AUDIO_FAMILY, device="cpu")


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def audio_data(tmp_path_factory):
    return _cached(tmp_path_factory, "audio-data", lambda p: generate_audio(p, n=120, seed=3))


def _train_audio(tmp_path_factory, data, variant, epochs):
    def build(out):
        train_audio_reference(variant=variant, data_dir=data, out_dir=out, epochs=epochs, progress=False)

    return _cached(tmp_path_factory, f"audio-{variant}-{epochs}", build)


@pytest.fixture(scope="session")
def audio_grounded(tmp_path_factory, audio_data):
    return _train_audio(tmp_path_factory, audio_data, "grounded", 24)


@pytest.fixture(scope="session")
def audio_shortcut(tmp_path_factory, audio_data):
    # deaf by construction whatever the training length: two epochs give the text side a prior
    return _train_audio(tmp_path_factory, audio_data, "text_shortcut", 2)


@pytest.fixture(scope="session")
def tiny_audio(tmp_path_factory):
    """An untrained tiny Qwen2-Audio from its config, saved and loaded like a user's model."""
    path = tmp_path_factory.mktemp("models") / "qwen2-audio-tiny"
    model, proc = build_audio_model(seed=0)
    model.eval().save_pretrained(path)
    proc.save_pretrained(path)
    return open_audio_model(path)


# ---------------------------------------------------------------------------- known answers
def _ablation(adapter, data, n=16):
    probe = get_probe("modality_ablation", batch_size=32, permutations=3)
    plan = probe.plan(adapter, Dataset.load(data).audit_split(), max_examples=n)
    rows = probe.run(adapter, plan.units[0], seed=0)
    return rows, probe.summarize(rows, seed=0)


def _overall(metrics, name):
    m = metrics[(metrics.metric == name) & (metrics.scope == "overall")]
    assert len(m) == 1, name
    return float(m.value.iloc[0])


def test_text_shortcut_reads_audio_reliance_exactly_zero(audio_shortcut, audio_data):
    rows, metrics = _ablation(open_audio_model(audio_shortcut), audio_data)
    tv = rows[(rows.metric == "tv") & (rows.modality == "audio")]
    assert set(tv.variant) == {"silence", "noise", "shuffled"} and len(tv) == 3 * 16
    assert (tv.value == 0.0).all()  # exactly: every audio position carries the zero vector
    assert _overall(metrics, "audio_reliance") == 0.0
    assert _overall(metrics, "perceptual_score_audio") == 0.0
    assert _overall(metrics, "text_reliance") > 0.0  # the text pathway is intact


def test_grounded_reads_audio_reliance_clearly_above_zero(audio_grounded, audio_data):
    rows, metrics = _ablation(open_audio_model(audio_grounded), audio_data)
    reliance = metrics[(metrics.metric == "audio_reliance") & (metrics.scope == "overall")].iloc[0]
    assert reliance.value > 0.25 and reliance.ci_low > 0.1, reliance  # measured 0.42-0.66 over seeds 0-3
    intact = metrics[(metrics.metric == "accuracy") & (metrics.group == "none")].value.iloc[0]
    silenced = metrics[(metrics.metric == "accuracy") & (metrics.group == "audio:silence")].value.iloc[0]
    assert intact > silenced  # the answer needs the clip
    assert "image" not in set(rows.modality.dropna())  # an audio model gets no image ablation


def test_mm_shap_audio_share_is_zero_for_the_shortcut_and_positive_when_grounded(audio_shortcut, audio_grounded,
                                                                                  audio_data):
    shares = {}
    for name, path in (("shortcut", audio_shortcut), ("grounded", audio_grounded)):
        probe = get_probe("mm_shap", batch_size=64, pairs=2)
        plan = probe.plan(open_audio_model(path), Dataset.load(audio_data).audit_split(), max_examples=3)
        rows = probe.run(open_audio_model(path), plan.units[0], seed=0)
        a = rows[rows.metric == "a_shap"].set_index("example_id").value
        t = rows[rows.metric == "t_shap"].set_index("example_id").value
        np.testing.assert_allclose(a + t, 1.0, atol=1e-12)  # audio-only model: two shares
        seg = rows[(rows.metric == "shapley") & (rows.modality == "audio")]
        assert seg.token_index.nunique() == 9 and seg.token.str.endswith("s").all()  # 5 words -> 3x3 segments
        shares[name] = (a, seg)
    a, seg = shares["shortcut"]
    assert (a == 0.0).all() and (seg.value == 0.0).all()
    assert shares["grounded"][0].mean() > 0.2


def test_declared_cost_of_audio_examples_is_the_queries_scored(tiny_audio, audio_data):
    probe = get_probe("modality_ablation", batch_size=64, permutations=2)
    plan = probe.plan(tiny_audio, Dataset.load(audio_data).audit_split(), max_examples=3)
    scored = []
    real = tiny_audio.score

    def counting(queries, *, batch_size=16):
        scored.extend(queries)
        return real(queries, batch_size=batch_size)

    tiny_audio.score = counting  # an instance attribute: the adapter itself is untouched
    try:
        probe.run(tiny_audio, plan.units[0], seed=0)
    finally:
        del tiny_audio.score
    assert plan.units[0].cost == len(scored) == 3 * (4 + 2 * 2)  # intact, text: 1 + P, audio: 2 + P
    assert sum(q.variant.startswith("audio:") for q in scored) == 3 * (2 + 2)


def test_audio_examples_are_skipped_with_a_finding_on_an_image_model(untrained_llava, audio_data):
    from audit.adapters import load_adapter

    plan = get_probe("modality_ablation").plan(load_adapter(untrained_llava), Dataset.load(audio_data))
    assert not plan.units and plan.n_selected == 0
    assert any("does not read" in f["message"] for f in plan.findings)


def test_three_block_shares_reduce_to_mm_shaps_two_block_shares():
    from probes.mm_shap import group_sampling_errors, group_shares, modality_shares, sampling_errors

    rng = np.random.default_rng(0)
    phi = rng.normal(size=(8, 7))  # 4 antithetic pairs, 3 words and 4 other players
    v, t = modality_shares(phi.mean(0), 3)
    t2, a2 = group_shares(phi.mean(0), (3, 4))
    assert (t2, a2) == pytest.approx((t, v), abs=1e-12)
    se_player, se_v = sampling_errors(phi, 3)
    se_player2, (_, se_a) = group_sampling_errors(phi, (3, 4))
    np.testing.assert_allclose(se_player2, se_player)
    assert se_a == pytest.approx(se_v, abs=1e-12)
    shares = group_shares(phi.mean(0), (3, 2, 2))
    assert sum(shares) == pytest.approx(1.0) and all(x >= 0 for x in shares)
    assert group_shares(phi.mean(0), (3, 0, 4))[1] == 0.0  # no image players: no image share


def test_masked_segments_are_silent_and_shuffled_clips_fit_the_replaced_one():
    from probes.mm_shap import mask_audio
    from probes.modality_ablation import fit_length

    clip = Audio(np.arange(1, 11, dtype=np.float32), 10)
    masked = mask_audio(clip, np.array([True, False, True]))  # segments [0,3) [3,6) [6,10)
    np.testing.assert_array_equal(masked.waveform, [1, 2, 3, 0, 0, 0, 7, 8, 9, 10])
    short, long_ = Audio(np.ones(4, np.float32), 10), Audio(np.ones(20, np.float32), 10)
    np.testing.assert_array_equal(fit_length(short, clip).waveform, [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    assert fit_length(long_, clip).waveform.size == 10
    fast = fit_length(Audio(np.ones(40, np.float32), 40), clip)  # resampled 40 -> 10 Hz, then cut to 10 samples
    assert fast.sample_rate == 10 and fast.waveform.size == 10


# ---------------------------------------------------------------------------- the data
def test_generated_clips_answer_their_question_by_construction(audio_data):
    data = Dataset.load(audio_data)
    assert Dataset.load(audio_data).sha256 == data.sha256
    for e in list(data)[:40]:
        clip = data.audio(e)
        assert clip.sample_rate == SAMPLE_RATE and clip.waveform.size == round(CLIP_SECONDS * SAMPLE_RATE)
        if e.attributes["family"] == "pitch":
            spectrum = np.abs(np.fft.rfft(clip.waveform))
            peak = np.fft.rfftfreq(clip.waveform.size, 1 / SAMPLE_RATE)[spectrum.argmax()]
            lo, hi = PITCHES[e.answer]
            assert lo - 5 <= peak <= hi + 5, (e.id, peak, e.answer)
        else:
            loud = np.abs(clip.waveform) > 0.05
            onsets = int(loud[0]) + int(np.sum(~loud[:-1] & loud[1:]))
            bursts = np.split(loud, np.flatnonzero(np.diff(loud.astype(int)) == -1) + 1)
            assert sum(b.any() for b in bursts) >= COUNTS.index(e.answer) + 1 and onsets >= 1
            # beeps sit in distinct slots: count the slots holding energy
            beep = round(0.08 * SAMPLE_RATE)
            slots = [np.abs(clip.waveform[s:s + beep]).max() > 0.05 for s in range(0, clip.waveform.size, 2 * beep)]
            assert sum(slots) == COUNTS.index(e.answer) + 1, e.id


def test_generate_audio_is_deterministic(tmp_path):
    a = generate_audio(tmp_path / "a", n=8, seed=5)
    b = generate_audio(tmp_path / "b", n=8, seed=5)
    assert a == b
    assert (tmp_path / "a" / "manifest.jsonl").read_bytes() == (tmp_path / "b" / "manifest.jsonl").read_bytes()
    assert (tmp_path / "a" / "audio" / "au-000003.wav").read_bytes() == \
        (tmp_path / "b" / "audio" / "au-000003.wav").read_bytes()
    with pytest.raises(InputError, match="not empty"):
        generate_audio(tmp_path / "a", n=8, seed=5)


# ---------------------------------------------------------------------------- the dataset field
def _write_wav(path: Path, samples: np.ndarray, *, rate=8000, width=2, channels=1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())


def _manifest(root: Path, *rows: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.jsonl").write_text("".join(json.dumps({"prompt": "p", **r}) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("path,message", [("../out.wav", "outside the dataset folder"),
                                          ("/abs/a.wav", "must be a path relative"),
                                          ("a.mp3", "expected one of wav, flac"),
                                          ("missing.wav", "no such file")])
def test_audio_path_checks_name_the_line(tmp_path, path, message):
    _write_wav(tmp_path / "out.wav", np.zeros(10, "<i2"))
    root = _manifest(tmp_path / "d", {"id": "x", "audio": path})
    (root / "a.mp3").write_bytes(b"")
    with pytest.raises(InputError, match=message) as err:
        Dataset.load(root)
    assert "line 1" in str(err.value) and "'audio'" in str(err.value)


def test_an_audio_symlink_out_of_the_folder_is_refused(tmp_path):
    _write_wav(tmp_path / "secret.wav", np.zeros(10, "<i2"))
    root = _manifest(tmp_path / "d", {"id": "x", "audio": "link.wav"})
    (root / "link.wav").symlink_to(tmp_path / "secret.wav")
    with pytest.raises(InputError, match="outside the dataset folder"):
        Dataset.load(root)


def test_pcm_wav_reads_as_mono_float(tmp_path):
    root = tmp_path / "d"
    _write_wav(root / "s16.wav", np.array([0, 16384, -32768, 32767], "<i2"))
    _write_wav(root / "u8.wav", np.array([128, 192, 0, 255], np.uint8), width=1)
    _write_wav(root / "stereo.wav", np.array([16384, -16384, 8192, 8192], "<i2"), channels=2)
    # 24-bit little-endian: 2^22 (= 0.5) and -2^23 (= -1)
    _write_wav(root / "s24.wav", np.frombuffer(bytes([0, 0, 0x40, 0, 0, 0x80]), np.uint8), width=3)
    _manifest(root, *({"id": n, "audio": f"{n}.wav"} for n in ("s16", "u8", "stereo", "s24")))
    data = Dataset.load(root)
    got = {e.id: data.audio(e) for e in data}
    np.testing.assert_allclose(got["s16"].waveform, [0, 0.5, -1, 32767 / 32768])
    np.testing.assert_allclose(got["u8"].waveform, [0, 0.5, -1, 127 / 128])
    np.testing.assert_allclose(got["stereo"].waveform, [0, 0.25])  # channels averaged
    np.testing.assert_allclose(got["s24"].waveform, [0.5, -1])
    assert got["s16"].sample_rate == 8000 and got["s16"].waveform.dtype == np.float32
    assert not got["s16"].waveform.flags.writeable
    assert data.check_audio() == []


def test_a_too_long_clip_is_refused_before_decoding_and_names_the_example(tmp_path):
    from audit.dataset import MAX_AUDIO_SECONDS

    root = tmp_path / "d"
    _write_wav(root / "long.wav", np.zeros(int(1000 * (MAX_AUDIO_SECONDS + 1)), "<i2"), rate=1000)
    data = Dataset.load(_manifest(root, {"id": "long-one", "audio": "long.wav"}))
    with pytest.raises(InputError, match=r"'long-one'.*over the limit of 30 s"):
        data.audio(data.by_id("long-one"))
    assert [i for i, _ in data.check_audio()] == ["long-one"]


def test_an_oversized_audio_file_is_refused(tmp_path, monkeypatch):
    import audit.dataset as dataset

    root = tmp_path / "d"
    _write_wav(root / "a.wav", np.zeros(800, "<i2"))
    data = Dataset.load(_manifest(root, {"id": "big", "audio": "a.wav"}))
    monkeypatch.setattr(dataset, "MAX_AUDIO_BYTES", 1000)
    with pytest.raises(InputError, match=r"'big'.*over the limit of 1000"):
        data.audio(data.by_id("big"))


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_a_corrupt_audio_file_names_the_example(tmp_path, kind):
    root = tmp_path / "d"
    _write_wav(root / "a.wav", np.zeros(800, "<i2"))
    raw = (root / "a.wav").read_bytes()
    (root / "a.wav").write_bytes(b"RIFF\x00\x01garbage" * 4 if kind == "garbage" else raw[:200])
    data = Dataset.load(_manifest(root, {"id": "bad-clip", "audio": "a.wav"}))
    with pytest.raises(InputError, match=r"'bad-clip'.*(truncated|corrupt)"):
        data.audio(data.by_id("bad-clip"))


def test_flac_without_soundfile_names_the_package(tmp_path, monkeypatch):
    root = tmp_path / "d"
    root.mkdir()
    (root / "a.flac").write_bytes(b"fLaC")
    data = Dataset.load(_manifest(root, {"id": "f", "audio": "a.flac"}))
    monkeypatch.setitem(sys.modules, "soundfile", None)  # `import soundfile` now fails
    with pytest.raises(InputError, match=r"'f'.*needs the soundfile package"):
        data.audio(data.by_id("f"))


def test_audio_files_are_part_of_the_dataset_hash(tmp_path):
    root = tmp_path / "d"
    _write_wav(root / "a.wav", np.zeros(800, "<i2"))
    _manifest(root, {"id": "x", "audio": "a.wav"})
    before = Dataset.load(root).sha256
    _write_wav(root / "a.wav", np.ones(800, "<i2"))
    assert Dataset.load(root).sha256 != before


def test_query_with_audio_is_a_hashable_value():
    a, b = _tone(), _tone()
    assert a == b and hash(a) == hash(b) and a != _tone(441.0)
    q = Query(PROMPT, None, CHOICES, audio=a)
    assert q == Query(PROMPT, None, CHOICES, audio=b, variant="other") and hash(q) == hash(Query(PROMPT, None, CHOICES,
                                                                                                   audio=b))
    assert Query(PROMPT, None, CHOICES).audio is None and Query(PROMPT, None, CHOICES) != q
    with pytest.raises(ValueError):
        Audio(np.zeros((2, 3)), 8000)
    with pytest.raises(ValueError):
        Audio(np.zeros(3), 0)


# ---------------------------------------------------------------------------- the family
def _scattered_positions(a, enc) -> list[int]:
    """Positions whose embedding entering the first decoder block is not the token's own."""
    seen = {}

    def embed(m, i, o):
        seen["tok"] = o

    def first_block(m, args, kwargs):
        seen["in"] = args[0] if args else kwargs["hidden_states"]

    h1 = a.site_module("language.embed").register_forward_hook(embed)
    h2 = a.site_module("language.blocks.0.resid").register_forward_pre_hook(first_block, with_kwargs=True)
    try:
        with torch.no_grad():
            a.forward(enc)
    finally:
        h1.remove()
        h2.remove()
    return (seen["in"] != seen["tok"]).any(-1)[0].nonzero().flatten().tolist()


def test_audio_spans_are_where_the_model_puts_audio_features(tiny_audio):
    a = tiny_audio
    assert a.architecture == "qwen2_audio" and a.capabilities.modalities == ("audio", "text")
    lengths = []
    for seconds in (CLIP_SECONDS, 0.4):
        enc = a.encode([Query(PROMPT, None, CHOICES, audio=_tone(seconds=seconds))])
        spans = a.audio_spans(enc.input_ids)[0]
        assert len(spans) == 1 and spans[0].modality == "audio"
        assert _scattered_positions(a, enc) == list(range(spans[0].start, spans[0].end))
        assert a.image_spans(enc.input_ids) == [[]]  # no position is an image token
        lengths.append(len(spans[0]))
    assert lengths == [20, 10]  # one audio token per 40 ms (4 mel frames of 10 ms)


def test_audio_scores_are_finite_batch_invariant_log_probabilities(tiny_audio):
    a = tiny_audio
    qs = [Query(PROMPT, None, CHOICES, audio=_tone(f, seconds=s)) for f, s in ((250, 0.8), (700, 0.5), (2000, 0.3))]
    together = a.score(qs, batch_size=3)
    for q, x in zip(qs, together):
        assert np.all(np.isfinite(x)) and (x <= 0).all()
        np.testing.assert_allclose(x, a.score([q])[0], atol=1e-5)
    multi = a.score([Query(PROMPT, None, ("low middle",), audio=qs[0].audio)])[0][0]
    low, middle = a.continuation_ids("low")[0], a.continuation_ids("middle")[0]
    with torch.no_grad():
        lp1 = torch.log_softmax(a.forward(a.encode([qs[0]])).logits[0, -1], -1)[low]
        lp2 = torch.log_softmax(a.forward(a.encode([qs[0]], [[low]])).logits[0, -1], -1)[middle]
    assert multi == pytest.approx(float(lp1 + lp2), abs=1e-5)
    # text-only queries score too, in their own batches
    mixed = a.score([qs[0], Query(PROMPT, None, CHOICES)], batch_size=2)
    np.testing.assert_allclose(mixed[0], together[0], atol=1e-5)


def test_audio_noop_hooks_fire_and_leave_logits_bit_identical(tiny_audio):
    a = tiny_audio
    enc = a.encode([Query(PROMPT, None, CHOICES, audio=_tone())])
    sites = [f"language.blocks.{i}.{p}" for i in range(a.n_layers) for p in ("resid", "attn")]
    sites += ["language.embed", "projector", "audio.blocks.0"]
    seen = []
    with torch.no_grad():
        plain = a.forward(enc).logits
        with a.hooks({s: (lambda m, i, o, s=s: seen.append(s)) for s in sites}):
            hooked = a.forward(enc).logits
    assert set(seen) == set(sites) and torch.equal(plain, hooked)
    with pytest.raises(UnsupportedError, match="audio.blocks"):
        a.site_module("vision.blocks.0")


def test_audio_model_question_mask_is_exactly_the_prompt(tiny_audio):
    a = tiny_audio
    enc = a.encode([Query(PROMPT, None, CHOICES, audio=_tone())])
    ids = enc.input_ids[0][a.question_mask(enc)[0]].tolist()
    assert ids == a.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]


def test_audio_model_refuses_images_and_overlong_clips_and_resamples(tiny_audio):
    from PIL import Image

    a = tiny_audio
    with pytest.raises(UnsupportedError, match="does not read image"):
        a.score([Query(PROMPT, Image.new("RGB", (8, 8)), CHOICES)])
    with pytest.raises(InputError, match="longer than the model's audio window of 1 s"):
        a.score([Query(PROMPT, None, CHOICES, audio=_tone(seconds=1.5))])
    # a 16 kHz clip is resampled to the feature extractor's 8 kHz: same audio tokens as 8 kHz
    n8 = a.audio_spans(a.encode([Query(PROMPT, None, CHOICES, audio=_tone(rate=8000))]).input_ids)[0][0]
    n16 = a.audio_spans(a.encode([Query(PROMPT, None, CHOICES, audio=_tone(rate=16000))]).input_ids)[0][0]
    assert len(n8) == len(n16) > 0
    out = a.generate([Query(PROMPT, None, CHOICES, audio=_tone())], max_new_tokens=2)
    assert len(out) == 1 and isinstance(out[0], str)


def test_site_map_resolves_on_the_real_size_qwen2_audio():
    import transformers

    from audit.adapters.sites import resolve

    cfg = transformers.Qwen2AudioConfig()
    with torch.device("meta"):
        model = getattr(transformers, QWEN2_AUDIO_FAMILY.auto_class).from_config(cfg)
    assert len(resolve(model, QWEN2_AUDIO_SITES.language_layers)) == cfg.text_config.num_hidden_layers
    assert len(resolve(model, QWEN2_AUDIO_SITES.vision_layers)) == cfg.audio_config.encoder_layers
    assert isinstance(resolve(model, QWEN2_AUDIO_SITES.embed), torch.nn.Embedding)
    assert isinstance(resolve(model, QWEN2_AUDIO_SITES.projector).linear, torch.nn.Linear)
    assert getattr(cfg, QWEN2_AUDIO_SITES.image_token_attr) == cfg.audio_token_id


def test_the_registered_family_builds_the_audio_adapter():
    fam = family_of("qwen2_audio")
    assert fam is QWEN2_AUDIO_FAMILY and fam.adapter == "audit.adapters.audio:Qwen2AudioAdapter"
    assert fam.sites.vision_layers == "model.audio_tower.layers" and fam.sites.image_token_attr == "audio_token_index"


# ---------------------------------------------------------------------------- the dashboard
def test_dashboard_modality_page_shows_audio_reliance_and_segments(audio_grounded, audio_data, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from audit.runner import RunSpec, run_audit

    store = tmp_path / "store.duckdb"
    spec = RunSpec(model=str(audio_grounded), data=str(audio_data), probes=["modality_ablation", "mm_shap"],
                   out=str(tmp_path / "run"), seed=0, store=str(store), max_examples=3)
    summary = run_audit(spec, adapter=open_audio_model(audio_grounded),
                        data=Dataset.load(audio_data).audit_split(), progress=False, log=lambda m: None).summary
    got = {(m["probe"], m["metric"]) for m in summary["metrics"]}
    assert {("modality_ablation", "audio_reliance"), ("mm_shap", "a_shap")} <= got
    monkeypatch.setenv("MMAUDIT_STORE", str(store))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "dashboard" / "pages" / "modality.py"),
                           default_timeout=120)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Audio" in [h.value for h in at.subheader]
    charts = at.get("plotly_chart")
    waves = [c for c in charts if "Waveform" in c.proto.spec]
    assert len(waves) == 1  # the clip was read from the data folder and drawn with its segments
    assert any('"heatmap"' in c.proto.spec for c in charts)
