"""Shared fixtures: small synthetic data and tiny reference models, built once per session."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on a loaded 2-CPU machine two
# threads per process made one forward ~100x slower (measured 1.47 s vs 0.008 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def _source_hash() -> str:
    """Hash of the code that makes fixture data and models (a cached copy is reused only if equal)."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for f in sorted((root / "reference_models").glob("*.py")) + [root / "audit" / "training.py"]:
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _cached(tmp_path_factory, name: str, build):
    """Build a fixture folder once per session; with MMAUDIT_TEST_CACHE set (local development
    only, never in CI), reuse it across sessions while the generating code is unchanged.
    Under pytest-xdist the workers of one session share each folder: the first builds it
    while the others wait on a lock (two workers never train the same model)."""
    import fcntl
    import shutil
    from pathlib import Path

    cache = os.environ.get("MMAUDIT_TEST_CACHE")
    if cache:
        root = Path(cache) / _source_hash()
    elif os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "shared-fixtures"  # common to this session's workers
    else:
        out = tmp_path_factory.mktemp("fixtures") / name
        build(out)
        return out
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / ".complete").is_file():
            tmp = final.with_name(f".{name}.{os.getpid()}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp)
            (tmp / ".complete").write_text("ok")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
    return final


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """800 ordinary examples at bias 0.9 (plus canaries, typographic and counterfactual sets)."""
    from reference_models.synthetic import generate

    return _cached(tmp_path_factory, "small-data", lambda p: generate(p, n=800, bias=0.9, seed=1, n_canaries=16))


def _train(tmp_path_factory, data, *, arch, variant, epochs=None, **kw):
    """`epochs=None`: the reference recipe (its floor on optimiser steps), as users get it."""
    from reference_models.train import train_reference

    def build(out):
        train_reference(arch=arch, preset="tiny", variant=variant, data_dir=data, out_dir=out, epochs=epochs,
                        progress=False, **kw)

    return _cached(tmp_path_factory, f"{arch}-{variant}-{epochs or 'recipe'}", build)


@pytest.fixture(scope="session")
def reference_data(tmp_path_factory):
    """The data size the reference recipe is stated for (`mmaudit reference data` defaults):
    training costs the same optimiser steps on it as on 800 examples. Same vocabulary as
    small_data, so its models read small_data's examples token for token."""
    from reference_models.synthetic import generate

    return _cached(tmp_path_factory, "reference-data", lambda p: generate(p, n=2000, bias=0.9, seed=1, n_canaries=0))


@pytest.fixture(scope="session")
def llava_grounded(tmp_path_factory, reference_data):
    return _train(tmp_path_factory, reference_data, arch="llava", variant="grounded")


# Blind by construction (exact, whatever the training length): a few epochs give the text
# side something to say, which is all the tests that use them need.
@pytest.fixture(scope="session")
def llava_shortcut(tmp_path_factory, small_data):
    return _train(tmp_path_factory, small_data, arch="llava", variant="text_shortcut", epochs=3)


@pytest.fixture(scope="session")
def mllama_shortcut(tmp_path_factory, small_data):
    return _train(tmp_path_factory, small_data, arch="mllama", variant="text_shortcut", epochs=1)


@pytest.fixture(scope="session")
def clip_grounded(tmp_path_factory, small_data):
    return _train(tmp_path_factory, small_data, arch="clip", variant="grounded", epochs=3)


@pytest.fixture(scope="session")
def untrained_llava(tmp_path_factory):
    """A tiny LLaVA straight from its config (no training): protocol and plumbing tests."""
    from reference_models.architectures import build_reference_model
    from reference_models.synthetic import vocabulary

    path = tmp_path_factory.mktemp("models") / "llava-untrained"
    model, proc = build_reference_model(arch="llava", preset="tiny", words=vocabulary(), seed=0)
    model.eval().save_pretrained(path)
    proc.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def blind_llava(tmp_path_factory):
    """Projector zeroed (weights and biases): the model cannot see the image at all."""
    import torch

    from reference_models.architectures import build_reference_model
    from reference_models.synthetic import vocabulary

    path = tmp_path_factory.mktemp("models") / "llava-blind"
    model, proc = build_reference_model(arch="llava", preset="tiny", words=vocabulary(), seed=0)
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.zero_()
    model.eval().save_pretrained(path)
    proc.save_pretrained(path)
    return path
