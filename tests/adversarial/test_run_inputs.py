"""Hostile or careless input to `mmaudit run`: nothing the user has is lost or changed,
every failure is one line with exit code 2, and nothing fails open.

Classes covered here (the README's adversarial table lists every class and file):
data loss (outputs overlapping inputs, --force on foreign folders), fail-open (empty
selections), bad input (corrupt images found before any write, deeply nested JSON,
read-only or file outputs, broken chat templates), resources (prompts beyond the
context, huge sparse images hashed by streaming)."""
from __future__ import annotations

import json
import shutil

import pytest

from audit.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _argv(model, data, out, store, *extra):
    return ["run", "--model", str(model), "--data", str(data), "--probes", "modality_ablation", "--out", str(out),
            "--store", str(store), "--max-examples", "4", *extra]


def _err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines, "expected one line on stderr"
    return lines[-1]


def _snapshot(folder):
    return {p.relative_to(folder): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def data_copy(small_data, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(small_data, d)
    return d


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_out_overlapping_the_data_is_refused_and_the_data_untouched(untrained_llava, data_copy, tmp_path, capsys,
                                                                    where):
    out = {"same": data_copy, "parent": data_copy.parent, "inside": data_copy / "run"}[where]
    before = _snapshot(data_copy)
    assert main(_argv(untrained_llava, data_copy, out, tmp_path / "s.duckdb")) == 2
    assert "--data folder" in _err(capsys)
    assert _snapshot(data_copy) == before
    assert not (data_copy / "run").exists()


def test_out_inside_the_model_folder_is_refused(untrained_llava, small_data, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(untrained_llava, model)
    before = _snapshot(model)
    assert main(_argv(model, small_data, model / "audit", tmp_path / "s.duckdb")) == 2
    assert "--model folder" in _err(capsys)
    assert _snapshot(model) == before


def test_force_never_empties_a_folder_that_is_not_a_run(untrained_llava, small_data, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert main(_argv(untrained_llava, small_data, out, tmp_path / "s.duckdb", "--force")) == 2
    assert (out / "thesis.tex").read_text() == "years of work"
    _err(capsys)


def test_force_restarts_a_run_made_with_other_inputs(untrained_llava, small_data, tmp_path, capsys):
    out, store = tmp_path / "run", tmp_path / "s.duckdb"
    assert main(_argv(untrained_llava, small_data, out, store)) == 0
    assert main(_argv(untrained_llava, small_data, out, store, "--seed", "4")) == 2
    assert "--force" in _err(capsys)
    assert main(_argv(untrained_llava, small_data, out, store, "--seed", "4", "--force")) == 0
    assert json.loads((out / "summary.json").read_text())["config"]["seed"] == 4


def test_a_corrupt_image_stops_the_run_before_anything_is_written(untrained_llava, data_copy, tmp_path, capsys):
    rows = [json.loads(x) for x in (data_copy / "manifest.jsonl").read_text().splitlines() if x.strip()]
    victim = next(r for r in rows if r.get("split") == "test" and r.get("image") and r.get("choices"))
    img = data_copy / victim["image"]
    good = img.read_bytes()
    img.write_bytes(good[:40])  # truncated
    out = tmp_path / "run"
    assert main(_argv(untrained_llava, data_copy, out, tmp_path / "s.duckdb", "--max-examples", "400")) == 2
    assert "truncated or corrupt" in _err(capsys)
    assert not out.exists()
    img.write_bytes(good)  # fixed: the same command now just works
    assert main(_argv(untrained_llava, data_copy, out, tmp_path / "s.duckdb", "--max-examples", "400")) == 0


def test_deeply_nested_json_in_the_manifest_is_one_line(untrained_llava, tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "manifest.jsonl").write_text('{"id": "a", "prompt": "p", "attributes": ' + "[" * 100_000 + "]" * 100_000
                                      + "}\n")
    assert main(_argv(untrained_llava, d, tmp_path / "r", tmp_path / "s.duckdb")) == 2
    assert "line 1" in _err(capsys)


def test_an_explicit_probe_with_nothing_to_audit_is_an_error(untrained_llava, small_data, tmp_path, capsys):
    argv = _argv(untrained_llava, small_data, tmp_path / "r", tmp_path / "s.duckdb")
    argv[argv.index("modality_ablation")] = "retrieval_skew"  # needs a dual encoder: skipped, nothing left
    assert main(argv) == 2
    assert "nothing to audit" in _err(capsys)
    assert not (tmp_path / "r").exists()


def test_out_that_is_a_file_or_read_only_is_one_line(untrained_llava, small_data, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(_argv(untrained_llava, small_data, f, tmp_path / "s.duckdb")) == 2
    assert "not a folder" in _err(capsys)


def test_a_read_only_destination_is_one_line(untrained_llava, small_data, tmp_path, capsys, monkeypatch):
    from pathlib import Path

    real = Path.mkdir
    target = tmp_path / "ro" / "run"

    def mkdir(self, *a, **kw):  # what a read-only mount answers (root ignores chmod, so simulate it)
        if self == target:
            raise PermissionError(13, "Permission denied")
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert main(_argv(untrained_llava, small_data, target, tmp_path / "s.duckdb")) == 2
    assert "cannot create the run folder (Permission denied)" in _err(capsys)


def test_a_broken_chat_template_is_one_line(untrained_llava, small_data, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(untrained_llava, model)
    for name in ("chat_template.jinja", "chat_template.json"):
        if (model / name).exists():
            (model / name).unlink()
    cfg = json.loads((model / "processor_config.json").read_text()) if (model / "processor_config.json").exists() \
        else {}
    cfg["chat_template"] = "{% for m in messages %}{{ m.content | no_such_filter }}{% endfor %}"
    (model / "processor_config.json").write_text(json.dumps(cfg))
    (model / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    assert main(_argv(model, small_data, tmp_path / "r", tmp_path / "s.duckdb")) == 2
    assert "chat template" in _err(capsys)


def test_a_prompt_beyond_the_context_is_refused_before_any_forward(untrained_llava, tmp_path, capsys):
    from PIL import Image

    d = tmp_path / "d"
    d.mkdir()
    Image.new("RGB", (64, 64)).save(d / "a.png")
    prompt = " ".join(["red"] * 5000)  # a few hundred kB would be no different
    (d / "manifest.jsonl").write_text(json.dumps({"id": "a", "image": "a.png", "prompt": prompt,
                                                  "choices": ["red", "blue"], "answer": "red"}) + "\n")
    assert main(_argv(untrained_llava, d, tmp_path / "r", tmp_path / "s.duckdb")) == 2
    assert "longer than the model's context" in _err(capsys)


def test_a_huge_sparse_image_is_hashed_by_streaming(tmp_path):
    import resource

    from audit.dataset import Dataset

    d = tmp_path / "d"
    d.mkdir()
    with open(d / "big.png", "wb") as fh:
        fh.truncate(2 * 1024 ** 3)  # 2 GiB, sparse: costs no disk
    (d / "manifest.jsonl").write_text(json.dumps({"id": "a", "image": "big.png", "prompt": "p"}) + "\n")
    data = Dataset.load(d)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert len(data.sha256) == 64
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 512 * 1024  # far less than the file: it was never read whole
    assert data.check_images()  # and it is reported as not an image
