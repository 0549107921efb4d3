"""The manifest loader: validation messages, safe image loading, selection and hashing."""
from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from audit import dataset as dmod
from audit.dataset import Dataset, Example
from audit.errors import InputError


def _png(path: Path, *, size=(8, 8), mode="RGB", seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").convert(mode).save(path)
    return path


def _write(data_dir: Path, rows: list) -> Path:
    """Write rows (dicts become JSON; strings are written verbatim) as manifest.jsonl."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (data_dir / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return data_dir


def _row(i: int, **fields) -> dict:
    return {"id": f"e{i}", "prompt": "what colour?", **fields}


def _bomb_png(path: Path, side: int = 20000) -> None:
    """A valid 1-bit PNG declaring side x side pixels; it compresses to a few kilobytes."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(
            ">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    row = b"\0" * (1 + side // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row * 1000) for _ in range(side // 1000)) + comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body)
                     + chunk(b"IEND", b""))


@pytest.fixture()
def good(tmp_path) -> Path:
    _png(tmp_path / "d" / "images" / "a.png", seed=1)
    _png(tmp_path / "d" / "images" / "b.jpg", seed=2)
    return _write(tmp_path / "d", [
        _row(1, image="images/a.png", answer="red", choices=["red", "blue"],
             attributes={"group": "a"}, split="train", tags=["pope"]),
        _row(2, image="images/b.jpg", split="test", pair_id="p1", varies="group",
             attributes={"group": "b"}),
        _row(3, image=None, split="test", pair_id="p1", varies="group", tags=["canary"]),
        _row(4, image="./images/a.png", split="val"),
    ])


def test_loads_fields(good):
    ds = Dataset.load(good)
    assert len(ds) == 4 and ds.path == good and [ex.line for ex in ds] == [1, 2, 3, 4]
    first = ds[0]
    assert first == Example(id="e1", prompt="what colour?", image="images/a.png", answer="red",
                            choices=("red", "blue"), attributes={"group": "a"}, tags=("pope",),
                            split="train", line=1)
    assert ds[3].image == "images/a.png"  # normalised
    assert ds.by_id("e2").pair_id == "p1" and hash(first)
    with pytest.raises(TypeError):
        first.attributes["group"] = "b"
    with pytest.raises(KeyError, match="e9"):
        ds.by_id("e9")
    assert Dataset.load(good / "manifest.jsonl").examples == ds.examples


def test_select_audit_split_and_counterfactual_sets(good):
    ds = Dataset.load(good)
    assert [ex.id for ex in ds.select(split="test")] == ["e2", "e3"]
    assert [ex.id for ex in ds.select(tags=["pope", "canary"])] == ["e1", "e3"]
    assert [ex.id for ex in ds.select(exclude_tags=["canary"])] == ["e1", "e2", "e4"]
    assert [ex.id for ex in ds.select(split=("train", "val"), predicate=lambda e: e.image)] == ["e1", "e4"]
    assert [ex.id for ex in ds.audit_split()] == ["e2", "e3"]
    assert ds.select(split="train").audit_split().examples == (ds[0],)
    assert {k: [m.id for m in v] for k, v in ds.counterfactual_sets().items()} == {"p1": ["e2", "e3"]}
    assert ds.select(split="test").sha256 == ds.sha256


def test_images_are_rgb_copies(good, tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(good / "images" / "t.png")
    _png(good / "images" / "p.webp", mode="L")
    _write(good, [_row(1, image="images/t.png"), _row(2, image="images/p.webp"), _row(3)])
    ds = Dataset.load(good)
    clear = ds.image(ds[0])
    assert clear.mode == "RGB" and clear.getpixel((0, 0)) == (255, 255, 255)  # alpha on white
    assert ds.image(ds[1]).mode == "RGB" and ds.image(ds[2]) is None
    clear.putpixel((0, 0), (1, 2, 3))
    assert ds.image(ds[0]).getpixel((0, 0)) == (255, 255, 255)  # the cache was not touched
    assert ds.check_images() == []


def test_sha256_is_stable_and_sees_image_bytes(good):
    before = Dataset.load(good).sha256
    assert before == Dataset.load(good).sha256 and len(before) == 64
    _png(good / "images" / "a.png", seed=9)
    assert Dataset.load(good).sha256 != before


def test_missing_manifest_names_the_path(tmp_path):
    with pytest.raises(InputError, match="no manifest.jsonl") as err:
        Dataset.load(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "manifest.jsonl") in str(err.value)


def test_broken_json_names_file_and_line(tmp_path):
    _write(tmp_path, [_row(1), "", _row(2), '{"id": "e3", "prompt": ', _row(4)])
    with pytest.raises(InputError) as err:
        Dataset.load(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'manifest.jsonl'} line 4: not valid JSON (")


@pytest.mark.parametrize("row, message", [
    ('[1, 2]', "expected a JSON object, got a list"),
    ({"prompt": "p"}, "field 'id' is required and must be a non-empty string"),
    ({"id": "x", "prompt": ""}, "field 'prompt' is required and must be a non-empty string"),
    (_row(1, answer=3), "field 'answer' must be a string or null, got a number"),
    (_row(1, attributes=["a"]), "field 'attributes' must be an object or null, got a list"),
    (_row(1, tags="pope"), "field 'tags' must be a list of strings or null, got a string"),
    (_row(1, choices=[]), dmod.ERR_CHOICES),
    (_row(1, choices=["a", 1]), dmod.ERR_CHOICES),
    (_row(1, choices="a"), dmod.ERR_CHOICES),
    (_row(1, choices=["a", "b"], answer="c"), "field 'answer' 'c' is not one of 'choices'"),
    (_row(1, split="dev"), "field 'split' must be one of train, val, test, got 'dev'"),
    (_row(1, varies="group"), dmod.ERR_VARIES),
    (_row(1, anwser="x"), "unknown field 'anwser'"),
    (_row(1, image="images/none.png"), "field 'image' 'images/none.png': no such file"),
    (_row(1, image="../secret.png"), "field 'image' '../secret.png' points outside the dataset"),
    (_row(1, image="images/../../secret.png"), "points outside the dataset folder"),
    (_row(1, image="/etc/passwd.png"), "must be a path relative to the dataset folder"),
    (_row(1, image="images/a.gif"), "has extension '.gif'; expected one of png, jpg, jpeg, webp"),
])
def test_bad_lines_name_line_and_field(tmp_path, row, message):
    (tmp_path / "secret.png").write_bytes(b"x")
    _write(tmp_path / "d", [_row(0), row])
    with pytest.raises(InputError) as err:
        Dataset.load(tmp_path / "d")
    assert str(err.value).startswith(f"{tmp_path / 'd' / 'manifest.jsonl'} line 2: ")
    assert message in str(err.value)


def test_symlink_escaping_the_folder_is_refused(tmp_path):
    outside = _png(tmp_path / "outside.png")
    (tmp_path / "d" / "images").mkdir(parents=True)
    os.symlink(outside, tmp_path / "d" / "images" / "link.png")
    _write(tmp_path / "d", [_row(1, image="images/link.png")])
    with pytest.raises(InputError, match="points outside the dataset folder"):
        Dataset.load(tmp_path / "d")


def test_duplicate_ids_name_both_lines(tmp_path):
    _write(tmp_path, [_row(1), _row(2), _row(1)])
    with pytest.raises(InputError, match=r"line 3: field 'id' 'e1' is a duplicate "
                                         r"\(first on line 1, again on line 3\)"):
        Dataset.load(tmp_path)


def test_skip_keeps_good_lines_and_records_bad_ones(tmp_path):
    _png(tmp_path / "images" / "ok.png")
    _write(tmp_path, [_row(1, image="images/ok.png"), "{oops", _row(3, image="../x.png"),
                      _row(1), _row(5, choices=["a"], answer="b"), _row(6)])
    ds = Dataset.load(tmp_path, on_error="skip")
    assert [ex.id for ex in ds] == ["e1", "e6"]
    assert [line for line, _ in ds.skipped] == [2, 3, 4, 5]
    assert "not valid JSON" in ds.skipped[0][1] and "first on line 1" in ds.skipped[2][1]
    with pytest.raises(InputError, match="on_error"):
        Dataset.load(tmp_path, on_error="ignore")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    _bomb_png(tmp_path / "images" / "bomb.png")
    assert (tmp_path / "images" / "bomb.png").stat().st_size < 200_000
    _png(tmp_path / "images" / "mid.png", size=(40, 40))
    _write(tmp_path, [_row(1, image="images/bomb.png"), _row(2, image="images/mid.png")])
    ds = Dataset.load(tmp_path, max_image_pixels=1000)  # loading the manifest reads no pixels
    saved = Image.MAX_IMAGE_PIXELS
    with pytest.raises(InputError, match=r"bomb\.png \(example 'e1'\) is too large"):
        ds.image(ds[0])
    with pytest.raises(InputError, match=r"mid\.png \(example 'e2'\) is too large: 40x40 = 1600"):
        ds.image(ds[1])
    assert Image.MAX_IMAGE_PIXELS == saved  # PIL's global guard is restored
    assert [i for i, _ in ds.check_images()] == ["e1", "e2"]
    big = Dataset.load(tmp_path)  # the default limit (4096*4096) also refuses the bomb
    with pytest.raises(InputError, match="too large"):
        big.image(big[0])


def test_truncated_and_corrupt_images(tmp_path):
    data = _png(tmp_path / "images" / "full.png", size=(64, 64)).read_bytes()
    (tmp_path / "images" / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "images" / "junk.jpg").write_bytes(b"this is not a picture at all")
    _write(tmp_path, [_row(1, image="images/full.png"), _row(2, image="images/cut.png"),
                      _row(3, image="images/junk.jpg")])
    ds = Dataset.load(tmp_path)
    assert ds.image(ds[0]).size == (64, 64)
    with pytest.raises(InputError, match=r"cut\.png \(example 'e2'\) is truncated or corrupt"):
        ds.image(ds[1])
    with pytest.raises(InputError, match=r"junk\.jpg \(example 'e3'\) is truncated or corrupt"):
        ds.image(ds[2])
    assert [i for i, _ in ds.check_images()] == ["e2", "e3"]


def test_examples_pickle_and_views_share_images(small_data):
    import pickle

    from audit.dataset import Dataset

    data = Dataset.load(small_data)
    ex = next(e for e in data if e.image and e.attributes)
    back = pickle.loads(pickle.dumps(ex))
    assert back == ex and dict(back.attributes) == dict(ex.attributes)
    with pytest.raises(TypeError):
        back.attributes["x"] = 1  # still read-only
    view = Dataset.view(data.path, [back])
    assert view[0] is back and view.image(back).size == data.image(ex).size
    assert list(Dataset.view(data.path, [back]).image(back).getdata()) == list(data.image(ex).getdata())
