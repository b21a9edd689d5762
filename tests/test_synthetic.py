"""The synthetic Sewer-ML generator: determinism, the Sewer-ML layout, reuse and atomic writing."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import sewer_ssl.synthetic as syn
from sewer_ssl.config import CODES, COLUMNS, SPLIT_FILES
from sewer_ssl.synthetic import generate_dataset, render_pipe, sample_codes

TINY = dict(n_train=14, n_val=8, size=24, defect_rate=0.5, seed=1)


def files_of(folder):
    "Relative path -> bytes of every file under folder."
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_both(folder):
    return pd.concat([pd.read_csv(folder / SPLIT_FILES["train"]), pd.read_csv(folder / SPLIT_FILES["val"])])


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = files_of(generate_dataset(tmp_path / "a", **TINY))
    b = files_of(generate_dataset(tmp_path / "b", **TINY))
    assert a.keys() == b.keys() and len(a) == TINY["n_train"] + TINY["n_val"] + 3
    assert a == b


def test_serial_equals_parallel(tmp_path):
    kw = {**TINY, "n_train": 60, "n_val": 50}  # more than one chunk of 50 per worker
    serial = files_of(generate_dataset(tmp_path / "serial", workers=1, **kw))
    parallel = files_of(generate_dataset(tmp_path / "parallel", workers=2, **kw))
    assert serial == parallel


def test_different_seed_differs(tmp_path):
    a = files_of(generate_dataset(tmp_path / "a", **TINY))
    b = files_of(generate_dataset(tmp_path / "b", **{**TINY, "seed": 2}))
    assert a["images/00000001.png"] != b["images/00000001.png"]
    assert sum(a[k] != b[k] for k in a if k.startswith("images/")) > 0.9 * (TINY["n_train"] + TINY["n_val"])


def test_csv_has_the_sewer_ml_layout(tmp_path):
    out = generate_dataset(tmp_path / "d", **TINY)
    for split, n in (("train", TINY["n_train"]), ("val", TINY["n_val"])):
        table = pd.read_csv(out / SPLIT_FILES[split])
        assert tuple(table.columns) == COLUMNS and len(table) == n
    both = read_both(out)
    codes = both[list(CODES)]
    assert set(np.unique(codes.to_numpy())) <= {0, 1}
    assert (both.Defect == codes.any(axis=1).astype(int)).all()
    assert (both.ND == 1 - both.Defect).all() and (both.VA == 0).all()
    assert both.WaterLevel.dtype.kind == "i" and both.WaterLevel.between(0, 100).all()
    assert both.Filename.is_unique and both.Filename.str.fullmatch(r"\d{8}\.png").all()
    assert sorted(both.Filename) == sorted(p.name for p in (out / "images").iterdir())
    with Image.open(out / "images" / both.Filename.iloc[0]) as im:
        assert im.size == (TINY["size"], TINY["size"]) and im.mode == "RGB"
    params = json.loads((out / "synthetic.json").read_text())
    assert {k: params[k] for k in TINY} == TINY


def test_labels_match_what_is_drawn(tmp_path):
    out = generate_dataset(tmp_path / "d", **TINY)
    both = read_both(out)
    for _, row in both.iloc[:6].iterrows():
        index = int(row.Filename[:8])
        rng = syn._image_rng(TINY["seed"], index)
        codes = sample_codes(rng, 1.0 if row.Defect else 0.0)
        assert codes == tuple(c for c in CODES if row[c])
        img, meta = render_pipe(rng, codes, TINY["size"])
        assert np.array_equal(np.asarray(Image.open(out / "images" / row.Filename)), img)
        assert meta["water_level"] == row.WaterLevel


def test_defect_share(tmp_path):
    out = generate_dataset(tmp_path / "d", n_train=120, n_val=60, size=16, defect_rate=0.3, seed=0)
    for split, n in (("train", 120), ("val", 60)):
        assert pd.read_csv(out / SPLIT_FILES[split]).Defect.sum() == round(0.3 * n)
    rng = np.random.default_rng(0)
    assert abs(np.mean([len(sample_codes(rng, 0.47)) > 0 for _ in range(5000)]) - 0.47) < 0.03


def test_every_code_is_drawn_and_reported():
    for i, code in enumerate(CODES):
        img, meta = render_pipe(np.random.default_rng(i), (code,), 64, nuisance=0)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert meta["codes"] == (code,) and meta["boxes"][code] is not None, code
        _, _, changed = syn.defect_footprint(i, (code,), 64, nuisance=0, threshold=2)  # subtle ones too
        assert changed.any(), f"{code} left the image unchanged"
    with pytest.raises(ValueError, match="XX"):
        render_pipe(np.random.default_rng(0), ("XX",))


def test_defect_footprints_within_their_stated_ranges():
    """At the default settings each code changes a share of the pixels in the range its footprint class
    states: defects are local, not a different pipe."""
    for code in CODES:
        shares = [syn.defect_footprint([4, i], (code,), 64)[2].mean() for i in range(7)]
        lo, hi = syn.FOOTPRINT_RANGES[syn.DEFECT_MECHANISMS[code][1]]
        assert lo <= np.median(shares) <= hi, (code, np.median(shares), (lo, hi))


def test_visibility_scales_the_footprint():
    def changed(visibility):
        return np.mean([syn.defect_footprint(i, (c,), 48, nuisance=0, visibility=visibility)[2].mean()
                        for i in range(3) for c in ("RB", "OB", "BE", "PB", "AF", "RO")])
    assert changed(2.0) > 1.5 * changed(0.5)


def test_no_code_chooses_the_material():
    """The pipe (material, tint, joints) is drawn before any defect: the same pipe with or without a code."""
    for i in range(6):
        for code in ("OS", "GR", "DE"):
            a = syn._Scene(np.random.default_rng(i), (code,), 32, 1.0, 1.0)
            b = syn._Scene(np.random.default_rng(i), (), 32, 1.0, 1.0)
            assert a.draws == b.draws


@pytest.mark.parametrize("factor", list(syn.NUISANCE_FACTORS))
def test_each_nuisance_factor_changes_what_it_says_and_nothing_else(factor):
    def draws(seed, strength):
        return syn._Scene(np.random.default_rng(seed), ("RB",), 32, {factor: strength}, 1.0).draws
    changed = set()
    for seed in range(3):
        off, on = draws(seed, 0.0), draws(seed, 2.0)
        assert set(off) == set(on) == {"pipe", *syn.NUISANCE_FACTORS}
        changed |= {k for k in off if off[k] != on[k]}
    assert changed == {factor}


def test_nuisance_in_pixels():
    "Overlay text stays inside its boxes; vignetting darkens corners, not the centre; noise adds no bias."
    def img(**nuisance):
        return render_pipe(np.random.default_rng(5), (), 64, {"compression": 0, "noise": 0, **nuisance})
    plain, _ = img(overlay=0)
    text, meta = img(overlay=3)  # strength 3: the overlay is always there
    assert meta["overlay_boxes"]
    inside = np.zeros((64, 64), bool)
    for x0, y0, x1, y1 in meta["overlay_boxes"]:
        inside[y0:y1, x0:x1] = True
    diff = np.abs(text.astype(int) - plain).max(-1)
    assert diff[inside].max() > 50 and diff[~inside].max() == 0
    dark, _ = img(overlay=0, vignetting=2)
    ratio = dark.astype(float).mean(-1) / np.maximum(plain.astype(float).mean(-1), 1)
    assert ratio.max() <= 1.02 and ratio[:6, :6].mean() < ratio[28:36, 28:36].mean() - 0.05
    noisy, _ = img(overlay=0, noise=3)
    assert np.abs(noisy.astype(int) - plain).mean() > 1 and abs(noisy.astype(float).mean() - plain.mean()) < 1.5


def test_bad_nuisance_and_visibility_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="fog"):
        render_pipe(np.random.default_rng(0), (), 32, {"fog": 1})
    with pytest.raises(ValueError, match="visibility"):
        generate_dataset(tmp_path / "d", **TINY, visibility=0)
    assert not (tmp_path / "d").exists()


def test_stale_generator_version_is_refused(tmp_path):
    out = generate_dataset(tmp_path / "d", **TINY)
    meta = json.loads((out / "synthetic.json").read_text())
    (out / "synthetic.json").write_text(json.dumps({**meta, "version": 1}))
    with pytest.raises(FileExistsError, match="stale.*version 1"):
        generate_dataset(out, **TINY)
    generate_dataset(out, **TINY, overwrite=True)
    assert json.loads((out / "synthetic.json").read_text())["version"] == syn.GENERATOR_VERSION


def test_complete_dataset_is_reused(tmp_path, monkeypatch):
    out = generate_dataset(tmp_path / "d", **TINY)
    before = files_of(out)
    stamp = (out / "SewerML_Train.csv").stat().st_mtime_ns

    def must_not_render(*a, **k):
        raise AssertionError("a complete dataset was regenerated")
    monkeypatch.setattr(syn, "render_pipe", must_not_render)
    assert generate_dataset(tmp_path / "d", **TINY, workers=2) == out
    assert (out / "SewerML_Train.csv").stat().st_mtime_ns == stamp and files_of(out) == before


def test_mismatching_or_incomplete_folder_raises_unless_overwrite(tmp_path):
    out = generate_dataset(tmp_path / "d", **TINY)
    with pytest.raises(FileExistsError, match="seed"):
        generate_dataset(out, **{**TINY, "seed": 9})
    (out / "images" / "00000003.png").unlink()  # incomplete
    with pytest.raises(FileExistsError, match="images"):
        generate_dataset(out, **TINY)
    generate_dataset(out, **{**TINY, "seed": 9}, overwrite=True)
    assert json.loads((out / "synthetic.json").read_text())["seed"] == 9
    assert len(list((out / "images").iterdir())) == TINY["n_train"] + TINY["n_val"]
    stranger = tmp_path / "other"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("not a dataset")
    with pytest.raises(FileExistsError, match="synthetic.json"):
        generate_dataset(stranger, **TINY)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_interrupted_generation_leaves_no_dataset(tmp_path, monkeypatch):
    real, calls = syn.render_pipe, [0]

    def failing(*a, **k):
        calls[0] += 1
        if calls[0] > 5:
            raise KeyboardInterrupt  # like Ctrl-C in the middle of a run
        return real(*a, **k)
    monkeypatch.setattr(syn, "render_pipe", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path / "d", **TINY)
    assert not (tmp_path / "d" / "SewerML_Train.csv").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # an interrupted overwrite keeps the old dataset intact
    monkeypatch.setattr(syn, "render_pipe", real)
    old = files_of(generate_dataset(tmp_path / "d", **TINY))
    calls[0] = 0
    monkeypatch.setattr(syn, "render_pipe", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path / "d", **{**TINY, "seed": 5}, overwrite=True)
    assert files_of(tmp_path / "d") == old


def test_bad_arguments():
    with pytest.raises(ValueError, match="defect_rate"):
        sample_codes(np.random.default_rng(0), 1.5)
    with pytest.raises(ValueError, match="size"):
        render_pipe(np.random.default_rng(0), (), size=8)


def test_generated_folder_reads_back_through_the_sewer_ml_reader(tmp_path):
    """What the generator writes is a Sewer-ML folder: the strict `sewer-ml` adaptor reads it unchanged."""
    import pandas as pd
    from sewer_ssl.config import ExperimentConfig
    from sewer_ssl.data import load_index
    root = generate_dataset(tmp_path / "syn", n_train=30, n_val=20, size=32, seed=5)
    index = load_index(ExperimentConfig(dataset="sewer-ml", data_dir=str(root)))
    assert len(index.train) == 30 and len(index.val) == 20
    for split, table in (("Train", index.train), ("Val", index.val)):
        raw = pd.read_csv(root / f"SewerML_{split}.csv")
        assert list(raw.columns) == list(COLUMNS)
        assert table.Filename.tolist() == raw.Filename.tolist()
        assert (table[list(CODES) + ["Defect"]].to_numpy() == raw[list(CODES) + ["Defect"]].to_numpy()).all()
        assert all(Path(p).is_file() for p in table.path)
