"""Loading real models: Hub ids from a local cache (offline) with revisions, dtypes, device
maps, identity without rereading weights, and refusal of weights that do not match."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from audit.adapters.loading import load_model
from audit.adapters.source import ModelSource, check_safetensors, model_identity
from audit.errors import InputError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(tmp_path: Path, model_dir: Path, repo: str = "acme/tiny-vlm") -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    cache = tmp_path / "hub"
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.is_file():
            shutil.copy(f, snap / f.name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    return cache


def _run(args, *, env=None):
    return subprocess.run([sys.executable, "-m", "audit", "run", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def test_hub_id_with_revision_and_dtype_offline(untrained_llava, small_data, tmp_path):
    cache = _hub_cache(tmp_path, untrained_llava)
    out = tmp_path / "run"
    res = _run(["--model", "acme/tiny-vlm", "--revision", "main", "--dtype", "bfloat16", "--data", str(small_data),
                "--probes", "modality_ablation", "--max-examples", "4", "--out", str(out),
                "--store", str(tmp_path / "s.duckdb")], env={"HF_HUB_CACHE": str(cache)})
    assert res.returncode == 0, res.stderr
    s = json.loads((out / "summary.json").read_text())
    m = s["model"]
    assert (m["hub_id"], m["revision"], m["commit"], m["dtype"]) == ("acme/tiny-vlm", "main", COMMIT, "bfloat16")
    assert m["sha256"] == f"hub:acme/tiny-vlm@{COMMIT}" and m["trust_remote_code"] is False
    assert s["config"]["dtype"] == "bfloat16"
    # a revision or an id that is not in the cache: one line, exit 2, nothing written
    for args, needle in ((["--model", "acme/tiny-vlm", "--revision", "v9"], "revision 'v9'"),
                         (["--model", "acme/other"], "not in the local cache")):
        bad = _run([*args, "--data", str(small_data), "--suite", "quick", "--out", str(tmp_path / "r2")],
                   env={"HF_HUB_CACHE": str(cache)})
        assert bad.returncode == 2 and needle in bad.stderr.strip().splitlines()[-1], bad.stderr
        assert not (tmp_path / "r2").exists()


def test_missing_weights_are_refused_unless_allowed(untrained_llava, small_data, tmp_path):
    model = tmp_path / "partial"
    shutil.copytree(untrained_llava, model)
    (weights,) = model.glob("*.safetensors")
    tensors = load_file(weights)
    dropped = sorted(k for k in tensors if "multi_modal_projector" in k)[0]
    del tensors[dropped]
    save_file(tensors, weights, metadata={"format": "pt"})
    args = ["--model", str(model), "--data", str(small_data), "--probes", "modality_ablation", "--max-examples", "2",
            "--store", str(tmp_path / "s.duckdb")]
    res = _run([*args, "--out", str(tmp_path / "r1")])
    assert res.returncode == 2 and "weights do not match" in res.stderr and "--allow-missing-weights" in res.stderr
    res = _run([*args, "--out", str(tmp_path / "r2"), "--allow-missing-weights"])
    assert res.returncode == 0, res.stderr
    s = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert any(f["severity"] == "fail" and "freshly initialised" in f["message"] for f in s["findings"])
    assert dropped in str(s["model"]["weights_not_loaded"]) or s["model"]["weights_not_loaded"]


def test_truncated_and_hostile_safetensors_are_one_line(untrained_llava, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(untrained_llava, model)
    (weights,) = model.glob("*.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="outside the file|does not fit"):
        load_model(model)
    weights.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(InputError, match="does not fit"):
        check_safetensors(weights)
    weights.write_bytes((4).to_bytes(8, "little") + b"\xff\xfe\x00\x01")
    with pytest.raises(InputError, match="not valid JSON"):
        check_safetensors(weights)


def test_identity_reads_weights_once_and_tells_fine_tunes_apart(untrained_llava, tmp_path, monkeypatch):
    monkeypatch.setenv("MMAUDIT_CACHE", str(tmp_path / "cache"))
    a = tmp_path / "a"
    shutil.copytree(untrained_llava, a)
    first = model_identity(ModelSource(path=a))
    import audit.adapters.source as source

    reads = []
    real_open = open

    def counting_open(path, mode="r", *args, **kw):
        if str(path).endswith(".safetensors") and "b" in mode:
            reads.append(path)
        return real_open(path, mode, *args, **kw)

    monkeypatch.setattr("builtins.open", counting_open)
    assert model_identity(ModelSource(path=a)) == first
    assert reads == []  # the cached per-file hash was used
    monkeypatch.setattr("builtins.open", real_open)
    b = tmp_path / "b"  # same architecture, one weight changed: a fine-tune
    shutil.copytree(untrained_llava, b)
    (weights,) = b.glob("*.safetensors")
    tensors = load_file(weights)
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    assert model_identity(ModelSource(path=b)) != first
    assert source.file_sha256(weights) == source.file_sha256(weights, cache=False)


def test_dtype_device_map_and_auto_batch_on_cpu(untrained_llava, small_data):
    from audit.adapters import Query
    from audit.batching import CAP_CPU, auto_batch_size
    from audit.dataset import Dataset

    adapter, info = load_model(untrained_llava, dtype="auto")
    assert info["dtype"] == "float32"  # the checkpoint's own
    bf, info = load_model(untrained_llava, dtype="bfloat16", device_map="auto")
    assert info["dtype"] == "bfloat16" and info["device_map"] == "auto"
    assert next(bf.model.parameters()).dtype == torch.bfloat16
    data = Dataset.load(small_data).audit_split()
    e = next(x for x in data if x.image and x.choices)
    q = Query(e.prompt, data.image(e), e.choices)
    a, b = adapter.score([q])[0], bf.score([q])[0]
    assert abs(a - b).max() < 0.1  # bfloat16 changes the numbers a little, not the model
    assert auto_batch_size(adapter, data) == CAP_CPU
    with pytest.raises(InputError, match="--dtype"):
        load_model(untrained_llava, dtype="int8")
    with pytest.raises(InputError, match="--device"):
        load_model(untrained_llava, device="tpu")


def test_auto_batch_halves_on_out_of_memory(untrained_llava, small_data):
    from audit.adapters import load_adapter
    from audit.batching import auto_batch_size
    from audit.dataset import Dataset

    adapter = load_adapter(untrained_llava)
    real = adapter.score

    def limited(queries, *, batch_size=16):
        if batch_size > 12:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(queries, batch_size=batch_size)

    adapter.score = limited
    assert auto_batch_size(adapter, Dataset.load(small_data).audit_split(), cap=64) == 8
