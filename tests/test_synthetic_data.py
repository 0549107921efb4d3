"""The synthetic dataset: determinism, planted properties, and that it loads cleanly."""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from audit.dataset import Dataset
from audit.errors import InputError
from reference_models import synthetic as syn


def _rows(data_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (data_dir / "manifest.jsonl").read_text().splitlines()]


def _files(data_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(data_dir).as_posix(): p.read_bytes()
            for p in sorted(data_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict, float]:
    """The default-size dataset (n=2000), generated once, with its wall time."""
    out = tmp_path_factory.mktemp("syn") / "data"
    start = time.perf_counter()
    card = syn.generate(out, n=2000, bias=0.9, seed=3)
    return out, card, time.perf_counter() - start


@pytest.fixture(scope="module")
def rows(data) -> list[dict]:
    return _rows(data[0])


def test_generation_is_fast_and_counts_add_up(data, rows):
    out, card, seconds = data
    assert seconds < 30
    assert card["counts"]["total"] == len(rows) == 2000 + 200 + 2 * 200 * 2 + 64  # + typographic, cf sets, canaries
    assert json.loads((out / "datacard.json").read_text()) == card
    ordinary = [r for r in rows if "pair_id" not in r and set(r.get("tags", [])) <= {"pope"}]
    assert len(ordinary) == 2000
    fams = Counter(r["attributes"]["family"] for r in ordinary)
    assert set(fams) == set(syn.FAMILIES) and fams["occupation"] == 600
    splits = Counter(r["split"] for r in ordinary)
    assert abs(splits["train"] / 2000 - 0.7) < 0.04 and abs(splits["test"] / 2000 - 0.2) < 0.04


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        syn.generate(tmp_path / name, n=120, seed=seed)
    first = _files(tmp_path / "a")
    assert first == _files(tmp_path / "b")
    other = _files(tmp_path / "c")
    assert other["manifest.jsonl"] != first["manifest.jsonl"]
    assert other["images/ex-000000.png"] != first["images/ex-000000.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_every_line_loads_and_every_image_is_sound(data):
    ds = Dataset.load(data[0])
    assert len(ds) == data[1]["counts"]["total"] and not ds.skipped
    assert ds.check_images() == []
    assert ds.image(ds[0]).size == (64, 64)
    assert len({ex.id for ex in ds}) == len(ds)


def test_field_invariants(rows):
    for r in rows:
        assert all(isinstance(v, str) for v in r["attributes"].values()), r["id"]
        assert r["attributes"]["family"] in (*syn.FAMILIES, "canary")
        if "choices" in r:
            assert r["answer"] in r["choices"]
        if "pair_id" in r or "typographic" in r.get("tags", []):
            assert r["split"] == "test"
        if r["attributes"]["family"] in ("colour", "shape", "count", "presence"):
            a = r["attributes"]
            assert len(a["positions"].split(";")) == int(a["count"])
            if r["attributes"]["family"] != "presence":
                expected = {"colour": a["colour"], "shape": a["shape"],
                            "count": syn.COUNT_WORDS[int(a["count"]) - 1]}
                assert r["answer"] == expected[r["attributes"]["family"]]


def test_vocabulary_covers_every_word(rows):
    vocab = syn.vocabulary()
    assert vocab == sorted(set(vocab)) and set(syn.CANARY_WORDS) <= set(vocab)
    used = {w for r in rows for text in [r["prompt"], r.get("answer", ""), *r.get("choices", [])]
            for w in syn.split_words(text)}
    assert used <= set(vocab), used - set(vocab)


def test_pope_questions_are_balanced_and_negatives_are_absent(data, rows):
    pope = [r for r in rows if "pope" in r.get("tags", [])]
    answers = Counter(r["answer"] for r in pope)
    assert abs(answers["yes"] - answers["no"]) <= 1
    kinds = Counter(r["attributes"].get("pope_negative") for r in pope if r["answer"] == "no")
    assert set(kinds) == {"random", "popular", "adversarial"} and max(kinds.values()) - min(kinds.values()) <= 1
    popular = tuple(data[1]["popular_object"].split())
    for r in pope:
        a = r["attributes"]
        true, asked = (a["colour"], a["shape"]), (a["asked_colour"], a["asked_shape"])
        assert r["prompt"] == syn.PROMPTS["presence"].format(colour=asked[0], shape=asked[1])
        assert (asked == true) == (r["answer"] == "yes")
        if a.get("pope_negative") == "adversarial":
            assert (asked[0] == true[0]) != (asked[1] == true[1])
        if a.get("pope_negative") == "popular" and true != popular:
            assert asked == popular


def test_typographic_text_conflicts_with_true_colour(rows):
    typo = [r for r in rows if "typographic" in r.get("tags", [])]
    assert len(typo) == 200
    for r in typo:
        assert r["prompt"] == syn.PROMPTS["colour"] and r["answer"] == r["attributes"]["colour"]
        assert r["attributes"]["written_text"] in syn.COLOURS
        assert r["attributes"]["written_text"] != r["answer"]


def test_image_counterfactuals_differ_only_inside_the_marker_box(data):
    ds = Dataset.load(data[0])
    sets = {k: v for k, v in ds.counterfactual_sets().items() if k.startswith("cfi-")}
    assert len(sets) == 200
    for members in list(sets.values())[:60]:
        assert [m.attributes["group"] for m in members] == list(syn.GROUPS)
        assert {m.varies for m in members} == {"group"} and len({m.answer for m in members}) == 1
        assert len({m.prompt for m in members}) == 1 and len({m.image for m in members}) == 2
        a, b = (np.asarray(ds.image(m), dtype=np.int16) for m in members)
        x0, y0, x1, y1 = map(int, members[0].attributes["marker_box"].split(","))
        differs = np.abs(a - b).sum(axis=2) > 0
        inside = np.zeros_like(differs)
        inside[y0:y1, x0:x1] = True
        assert differs[inside].any() and not differs[~inside].any()


def test_marker_box_is_small_and_hats_differ():
    img_a, box = syn.draw_person(group="a", occupation="doctor", cue_visible=True, seed=5)
    img_b, box_b = syn.draw_person(group="b", occupation="doctor", cue_visible=True, seed=5)
    assert box == box_b and (box[2] - box[0]) * (box[3] - box[1]) < 0.1 * 64 * 64
    crop_a, crop_b = (np.asarray(i.crop(box)).reshape(-1, 3) for i in (img_a, img_b))
    assert (crop_a == syn.HAT_RGB["a"]).all(axis=1).sum() > 40
    assert (crop_b == syn.HAT_RGB["b"]).all(axis=1).sum() > 40


def test_text_counterfactuals_swap_one_word_and_share_the_image(data):
    ds = Dataset.load(data[0])
    sets = {k: v for k, v in ds.counterfactual_sets().items() if k.startswith("cft-")}
    assert len(sets) == 200
    for first, second in sets.values():
        assert first.image == second.image and first.answer == second.answer
        assert first.varies == second.varies == "gender_word"
        w1, w2 = first.prompt.split(), second.prompt.split()
        diff = [(x, y) for x, y in zip(w1, w2) if x != y]
        assert len(w1) == len(w2) and len(diff) == 1
        assert {t.strip("?") for t in diff[0]} == {"man", "woman"}
        assert first.attributes["gender_word"] == "man" and second.attributes["gender_word"] == "woman"


@pytest.mark.parametrize("bias", [0.9, 0.5])
def test_planted_bias_is_measurable_in_train(tmp_path, bias):
    card = syn.generate(tmp_path / "d", n=1500, bias=bias, seed=11, n_canaries=0)
    people = [r["attributes"] for r in _rows(tmp_path / "d") if r["split"] == "train"
              and r["attributes"]["family"] == "occupation" and "pair_id" not in r]
    for group, majority in (("a", "doctor"), ("b", "nurse")):
        jobs = [p["occupation"] for p in people if p["group"] == group]
        assert len(jobs) > 100
        assert abs(jobs.count(majority) / len(jobs) - bias) <= 0.05
        assert card["bias"]["train_p_occupation_given_group"][group][majority] == pytest.approx(
            jobs.count(majority) / len(jobs), abs=1e-6)
    # The cue is hidden about half the time, and the bias holds whether or not it is drawn.
    hidden = [p for p in people if p["occupation_cue"] == "hidden"]
    assert 0.35 < len(hidden) / len(people) < 0.65


def test_occupation_prompts(rows):
    occ = [r for r in rows if r["attributes"]["family"] == "occupation" and "pair_id" not in r]
    words = Counter(r["attributes"]["gender_word"] for r in occ)
    assert 0.4 < words["person"] / len(occ) < 0.6
    for r in occ:
        a = r["attributes"]
        assert a["gender_word"] in ("person", syn.GENDER_WORDS[a["group"]])
        assert r["prompt"] == syn.PROMPTS["occupation"].format(word=a["gender_word"])
        assert r["answer"] == a["occupation"] and r["choices"] == list(syn.OCCUPATIONS)


def test_canaries(rows):
    canaries = [r for r in rows if "canary" in r.get("tags", [])]
    assert len(canaries) == 64
    assert Counter(r["attributes"]["member"] for r in canaries) == {"yes": 32, "no": 32}
    for r in canaries:
        assert r["split"] == ("train" if r["attributes"]["member"] == "yes" else "test")
        assert r["prompt"] == "describe the image." and "choices" not in r
        assert len(r["answer"].split()) == 4 and set(r["answer"].split()) <= set(syn.CANARY_WORDS)
    assert len({r["answer"] for r in canaries}) == 64


def test_objects_are_visible_at_32px():
    img, centres = syn.draw_objects(colour="yellow", shape="triangle", count=4, seed=1)
    small = np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR), dtype=float)
    for x, y in centres:  # the centre pixel is clearly the object colour, not the background
        assert np.abs(small[y // 2, x // 2] - syn.RGB["yellow"]).max() < 60


def test_refuses_existing_folder_and_bad_parameters(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="exists and is not empty") as err:
        syn.generate(out, n=10)
    assert str(out) in str(err.value)
    assert (out / "keep.txt").read_text() == "mine"
    syn.generate(out, n=10, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "manifest.jsonl").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    syn.generate(empty, n=5)
    for kwargs, field in [({"bias": 1.5}, "bias"), ({"n": 0}, "n"), ({"image_size": 8}, "image_size"),
                          ({"cue_visible": -0.1}, "cue_visible"), ({"seed": -1}, "seed")]:
        with pytest.raises(InputError, match=f"^{field}: "):
            syn.generate(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_crash_leaves_no_half_written_folder(tmp_path, monkeypatch):
    calls = []

    def broken(*args):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("disk on fire")
        return real(*args)

    real = syn._render
    monkeypatch.setattr(syn, "_render", broken)
    with pytest.raises(RuntimeError):
        syn.generate(tmp_path / "data", n=50)
    assert list(tmp_path.iterdir()) == []
