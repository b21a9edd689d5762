"""Bad-input, fault and sampling tests for sewer_ssl.data (fast: tiny folders written with PIL)."""
import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import sewer_ssl.data as data
from sewer_ssl.config import CODES, COLUMNS, PROPORTIONS, ExperimentConfig
from sewer_ssl.data import (DataError, ImageCache, SewerIndex, cap_keep_proportion, code_combination,
                            describe_splits, imbalance_counts, load_index, make_splits, read_sewer_csv,
                            safe_image_path, sample_imbalanced, stratified_sample, stratified_split,
                            test_sets, write_demo_folder)


def table(n_normal, defects_by_code, seed=0):
    "An index table with `n_normal` normal rows and, per code, that many single-code defect rows."
    n = n_normal + sum(defects_by_code.values())
    df = pd.DataFrame(0, index=range(n), columns=list(CODES), dtype=np.int8)
    start = n_normal
    for code, k in defects_by_code.items():
        df.loc[start:start + k - 1, code] = 1; start += k
    df["Defect"] = (df.sum(axis=1) > 0).astype(np.int8)
    df.insert(0, "Filename", [f"{seed}_{i}.png" for i in range(n)])
    return df


# -- the imbalance formula -----------------------------------------------------------------------

WORKED = {0.45: (818, 999), 0.15: (176, 997), 0.05: (52, 987), 0.02: (20, 980), 0.01: (10, 990)}


@pytest.mark.parametrize("p", PROPORTIONS)
def test_imbalance_counts_worked_example(p):
    assert imbalance_counts(1000, 900, p) == WORKED[p]


@pytest.mark.parametrize("p", PROPORTIONS)
def test_imbalance_counts_is_the_authors_formula(p):
    for n_normal, n_defect in [(552_820, 487_309), (68_681, 61_365), (1000, 3), (99, 99), (5000, 40)]:
        max_defects = int(n_normal * p / (1 - p))
        defects = min(max_defects, n_defect)
        normals = int(defects * (1 - p) / p)
        if defects and normals:
            assert imbalance_counts(n_normal, n_defect, p) == (defects, normals)


def test_scarce_defects_downsample_normals():
    assert imbalance_counts(1000, 100, 0.45) == (100, 122)


@pytest.mark.parametrize("p", PROPORTIONS)
def test_sample_imbalanced_draws_exact_counts(p):
    df = table(1000, {"RB": 450, "OB": 300, "RO": 150})
    s = sample_imbalanced(df, p, seed=3)
    defects, normals = WORKED[p]
    assert int(s["Defect"].sum()) == defects and int((s["Defect"] == 0).sum()) == normals
    assert s.index.is_unique and set(s.index) <= set(df.index)
    # defect types keep their share (largest remainder: within one of the exact share)
    for code, share in {"RB": 3 / 6, "OB": 2 / 6, "RO": 1 / 6}.items():
        assert abs(s[code].sum() - defects * share) < 1
    assert s.index.equals(sample_imbalanced(df, p, seed=3).index)


def test_sample_imbalanced_keeps_rare_combinations():
    df = table(5000, {"RB": 40, "OB": 5, "RO": 1, "IN": 1, "AF": 1})   # sklearn would refuse the singletons
    s = sample_imbalanced(df, 0.01, seed=0)
    assert imbalance_counts(5000, 48, 0.01) == (48, 4751)   # int(48 * 0.99 / 0.01) = int(4751.99...)
    assert int(s["Defect"].sum()) == 48 and (s[["RO", "IN", "AF"]].sum() == 1).all()


@pytest.mark.parametrize("p, fragment", [(0, "strictly between 0 and 1"), (1, "strictly between 0 and 1"),
                                         (1.5, "strictly between 0 and 1"), (True, "strictly between")])
def test_impossible_proportion(p, fragment):
    with pytest.raises(DataError, match=fragment):
        imbalance_counts(1000, 900, p)


def test_too_few_normals_names_the_need():
    with pytest.raises(DataError) as e:
        sample_imbalanced(table(50, {"RB": 900}), 0.01, seed=0)
    assert "p=0.01 keeps at least one defect only with >= 99 normal images; this table has 50" in str(e.value)
    with pytest.raises(DataError, match="has none"):
        imbalance_counts(100, 0, 0.15)
    with pytest.raises(DataError, match="at least one normal image only with >= 2 defect"):
        imbalance_counts(10, 1, 0.6)


# -- stratified sample ---------------------------------------------------------------------------

def test_stratified_sample_drops_singletons_and_matches_sklearn():
    from sklearn.model_selection import train_test_split
    df = table(200, {"RB": 40, "OB": 20, "RO": 1})
    half = stratified_sample(df, 0.5, seed=42)
    assert df.index[-1] not in half.index            # the lone RO row
    kept = df.iloc[:-1]
    expected, _ = train_test_split(kept, train_size=0.5, stratify=code_combination(kept), random_state=42)
    assert half.index.equals(expected.index)         # the authors' exact subset
    assert stratified_sample(df, 1.0) is df


def test_stratified_sample_falls_back_when_sklearn_refuses():
    codes = list(CODES)
    df = table(4, {c: 2 for c in codes[:10]})         # 11 strata, a 0.2 sample has 5 rows < 11 classes
    s = stratified_sample(df, 0.2, seed=0)
    assert len(s) == 5 and s.index.is_unique
    with pytest.raises(DataError, match="occurs once"):
        stratified_sample(table(1, {"RB": 1}), 0.5)
    with pytest.raises(DataError, match=r"in \(0, 1\]"):
        stratified_sample(df, 0)


# -- the CSV reader ------------------------------------------------------------------------------

@pytest.fixture
def demo(tmp_path):
    frame = write_demo_folder(tmp_path, n=20, size=12, seed=1)
    return tmp_path, frame


def test_reader_round_trip(demo):
    root, frame = demo
    df = read_sewer_csv(root / "SewerML_Train.csv")
    assert df["Filename"].tolist() == frame["Filename"].tolist()
    assert (df[list(CODES)].to_numpy() == frame[list(CODES)].to_numpy()).all()
    assert all(Path(p).is_file() and Path(p).is_absolute() for p in df["path"])
    assert list(df.columns[:19]) == ["Filename", *CODES, "Defect"]


def test_missing_csv(tmp_path):
    with pytest.raises(DataError, match="nothere.csv does not exist"):
        read_sewer_csv(tmp_path / "nothere.csv")


def test_missing_columns_are_named(demo):
    root, frame = demo
    frame.drop(columns=["PF", "Defect"]).to_csv(root / "bad.csv", index=False)
    with pytest.raises(DataError) as e:
        read_sewer_csv(root / "bad.csv")
    assert "missing column(s) ['PF', 'Defect']" in str(e.value) and "Filename, WaterLevel, VA" in str(e.value)


def test_non_binary_labels_are_named(demo):
    root, frame = demo
    frame.astype({"Defect": object}).assign(Defect=["yes"] + frame["Defect"].tolist()[1:]).to_csv(root / "bad.csv", index=False)
    with pytest.raises(DataError, match="column Defect must hold only 0 or 1, found yes"):
        read_sewer_csv(root / "bad.csv")


def test_duplicate_filenames(demo):
    root, frame = demo
    pd.concat([frame, frame.iloc[:1]]).to_csv(root / "dup.csv", index=False)
    with pytest.raises(DataError, match=f"appear more than once: {frame.Filename[0]}"):
        read_sewer_csv(root / "dup.csv")


def test_missing_image_is_named(demo):
    root, frame = demo
    for name in frame.Filename[[2, 5]]: (root / "images" / name).unlink()
    with pytest.raises(DataError) as e:
        read_sewer_csv(root / "SewerML_Train.csv")
    assert "2 of 20 images are missing" in str(e.value)
    assert frame.Filename[2] in str(e.value) and frame.Filename[5] in str(e.value)


def test_many_missing_images_are_counted(demo):
    root, frame = demo
    frame.assign(Filename="x" + frame.Filename).to_csv(root / "gone.csv", index=False)
    with pytest.raises(DataError, match=r"20 of 20 images are missing.*\(20 in all\)"):
        read_sewer_csv(root / "gone.csv", image_dir=root / "images")


@pytest.mark.parametrize("bad", ["../x.png", "sub/../../x.png", "/etc/passwd", "C:\\x.png", "..\\x.png"])
def test_escaping_paths_are_refused(demo, bad):
    root, frame = demo
    frame.assign(Filename=[bad] + frame.Filename.tolist()[1:]).to_csv(root / "esc.csv", index=False)
    with pytest.raises(DataError, match="absolute or contain '..'"):
        read_sewer_csv(root / "esc.csv", image_dir=root / "images", check_files=False)
    with pytest.raises(DataError, match="absolute path|contains '..'"):
        safe_image_path(root / "images", bad)


def test_symlink_out_of_folder_is_refused(demo, tmp_path_factory):
    root, frame = demo
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    Image.new("RGB", (4, 4)).save(outside)
    os.symlink(outside, root / "images" / "link.png")
    frame.assign(Filename=["link.png"] + frame.Filename.tolist()[1:]).to_csv(root / "link.csv", index=False)
    with pytest.raises(DataError, match="resolve outside.*link.png"):
        read_sewer_csv(root / "link.csv", image_dir=root / "images")
    with pytest.raises(DataError, match="outside the image folder"):
        safe_image_path(root / "images", "link.png")


# -- the image cache -----------------------------------------------------------------------------

def test_cache_decodes_once_and_matches_pil(demo, monkeypatch):
    root, frame = demo
    calls = []
    real = data.decode_image
    monkeypatch.setattr(data, "decode_image", lambda path, size: calls.append(path) or real(path, size))
    cache = ImageCache(root / "images", frame.Filename, size=8, cache_dir=root / "cache")
    assert cache.ensure(frame.Filename[:5]) == 5 and len(calls) == 5
    assert cache.ensure(frame.Filename) == 15 and len(calls) == 20
    assert cache.ensure(frame.Filename) == 0 and len(calls) == 20
    again = ImageCache(root / "images", frame.Filename, size=8, cache_dir=root / "cache")
    assert again.load(frame.Filename).shape == (20, 8, 8, 3) and len(calls) == 20   # a second run decodes nothing
    for i in (0, 7):
        with Image.open(root / "images" / frame.Filename[i]) as im:
            direct = np.asarray(im.convert("RGB").resize((8, 8), Image.Resampling.BICUBIC))
        assert np.array_equal(again.images[again.rows([frame.Filename[i]])[0]], direct)


def test_cache_modes_become_rgb(tmp_path):
    (tmp_path / "im").mkdir()
    Image.fromarray(np.full((10, 10), 77, np.uint8)).save(tmp_path / "im/gray.png")
    Image.new("RGBA", (10, 10), (1, 2, 3, 0)).save(tmp_path / "im/rgba.png")
    Image.fromarray(np.full((10, 10), 256 * 200, np.uint16)).save(tmp_path / "im/gray16.png")
    cache = ImageCache(tmp_path / "im", ["gray.png", "rgba.png", "gray16.png"], 6, tmp_path / "cache")
    x = cache.load(["gray.png", "rgba.png", "gray16.png"])
    assert (x[0] == 77).all() and (x[1] == [1, 2, 3]).all() and (x[2] == 200).all()


def test_corrupt_images_are_named_and_others_cached(demo):
    root, frame = demo
    (root / "images" / frame.Filename[3]).write_bytes(b"\x89PNG garbage bytes")
    good = (root / "images" / frame.Filename[9]).read_bytes()
    (root / "images" / frame.Filename[9]).write_bytes(good[: len(good) // 2])   # truncated
    cache = ImageCache(root / "images", frame.Filename, size=8, cache_dir=root / "cache")
    with pytest.raises(DataError) as e:
        cache.ensure()
    msg = str(e.value)
    assert "2 of 20 images could not be decoded (the other 18 are cached)" in msg
    assert frame.Filename[3] in msg and frame.Filename[9] in msg
    flags = np.asarray(cache.filled)
    assert flags[3] == 0 and flags[9] == 0 and flags.sum() == 18   # nothing half-done is flagged
    assert (np.asarray(cache.images[3]) == 0).all()
    # fixing the files and calling again decodes only those two
    Image.new("RGB", (12, 12), (9, 9, 9)).save(root / "images" / frame.Filename[3])
    Image.new("RGB", (12, 12), (9, 9, 9)).save(root / "images" / frame.Filename[9])
    assert cache.ensure() == 2 and (cache.load([frame.Filename[3]]) == 9).all()


def test_cache_missing_image_and_unknown_name(demo):
    root, frame = demo
    cache = ImageCache(root / "images", frame.Filename, size=8, cache_dir=root / "cache")
    (root / "images" / frame.Filename[0]).unlink()
    with pytest.raises(DataError, match=f"{frame.Filename[0]} \\(FileNotFoundError"):
        cache.ensure()
    with pytest.raises(DataError, match="not in this image cache"):
        cache.rows(["nope.png"])


def test_cache_with_worker_processes(demo):
    root, frame = demo
    cache = ImageCache(root / "images", frame.Filename, size=8, cache_dir=root / "cache")
    cache.chunk = 4
    assert cache.ensure(workers=2) == 20 and cache.n_filled == 20
    serial = ImageCache(root / "images", frame.Filename, size=8, cache_dir=root / "cache2")
    assert np.array_equal(serial.load(frame.Filename), cache.load(frame.Filename))


def test_cache_identity(demo):
    root, frame = demo
    a = ImageCache(root / "images", frame.Filename, 8, root / "cache")
    assert ImageCache(root / "images", frame.Filename, 16, root / "cache").dir != a.dir
    assert ImageCache(root / "images", frame.Filename[:10], 8, root / "cache").dir != a.dir
    assert ImageCache(root / "images", frame.Filename, 8, root / "cache").dir == a.dir
    assert not [p for p in (root / "cache").iterdir() if p.name.endswith(".tmp")]


# -- splits --------------------------------------------------------------------------------------

def index_of(n_normal, defects, seed=0):
    train, val = table(n_normal, defects, seed), table(n_normal, defects, seed + 1)
    return SewerIndex("toy", train, val, Path("."))


@pytest.mark.parametrize("p", PROPORTIONS)
def test_make_splits(p):
    index = index_of(4000, {"RB": 1500, "OB": 1000, "RO": 500, "IN": 1})
    cfg = ExperimentConfig(train_p=p, seed=7)
    splits = make_splits(index, cfg)
    half = stratified_sample(index.train, 0.5, 42)
    n_normal, n_defect = int((half.Defect == 0).sum()), int(half.Defect.sum())
    defects, normals = imbalance_counts(n_normal, n_defect, p)
    train = splits["train"]
    assert (int(train.Defect.sum()), int((train.Defect == 0).sum())) == (defects, normals)
    assert describe_splits(splits).loc["train", "realised_p"] == pytest.approx(defects / (defects + normals))
    val, test = splits["val"], splits["test"]
    assert not set(val.Filename) & set(test.Filename)
    assert set(val.Filename) | set(test.Filename) <= set(index.val.Filename)
    assert abs(len(val) - len(test)) <= 1 and abs(val.Defect.mean() - test.Defect.mean()) < 0.01
    for q, t in test_sets(test, cfg.test_ps, 42).items():
        assert set(t.Filename) <= set(test.Filename)
        n0, n1 = int((test.Defect == 0).sum()), int(test.Defect.sum())
        assert (int(t.Defect.sum()), int((t.Defect == 0).sum())) == imbalance_counts(n0, n1, q)


def test_make_splits_max_train_keeps_proportion():
    index = index_of(4000, {"RB": 1500, "OB": 1000})
    splits = make_splits(index, ExperimentConfig(train_p=0.15, max_train=200))
    assert len(splits["train"]) == 200 and int(splits["train"].Defect.sum()) == 30
    one = cap_keep_proportion(splits["train"], 50, seed=0)
    assert len(one) == 50 and 1 <= one.Defect.sum() <= 10


def test_describe_splits_flattens_test_sets():
    t = table(100, {"RB": 10})
    out = describe_splits({"train": t, "test": {0.05: t.iloc[:50]}})
    assert out.loc["train"].tolist()[:3] == [110, 100, 10] and "test@0.05" in out.index


# -- dataset adaptors ----------------------------------------------------------------------------

def test_sewer_ml_folder_layouts(tmp_path):
    write_demo_folder(tmp_path, n=10, seed=1, subdir=".")
    write_demo_folder(tmp_path, n=8, seed=2, csv_name="SewerML_Val.csv", subdir=".")
    index = load_index(ExperimentConfig(dataset="sewer-ml", data_dir=str(tmp_path)))
    assert index.image_dir == tmp_path.resolve() and (len(index.train), len(index.val)) == (10, 8)
    (tmp_path / "SewerML_Val.csv").unlink()
    with pytest.raises(DataError, match="SewerML_Val.csv does not exist"):
        load_index(ExperimentConfig(dataset="sewer-ml", data_dir=str(tmp_path)))


def test_train_val_overlap_is_refused(tmp_path):
    frame = write_demo_folder(tmp_path, n=10, seed=1)
    frame.to_csv(tmp_path / "SewerML_Val.csv", index=False)
    with pytest.raises(DataError, match="in both the train and the val CSV"):
        load_index(ExperimentConfig(dataset="sewer-ml", data_dir=str(tmp_path)))


def test_folder_adaptor_single_csv(tmp_path):
    for sub in ("cracked", "ok"): (tmp_path / sub).mkdir()
    names = [f"{'cracked' if i % 5 == 0 else 'ok'}/img{i}.jpg" for i in range(50)]
    for i, n in enumerate(names): Image.new("RGB", (10, 10), (i, i, i)).save(tmp_path / n)
    pd.DataFrame({"Filename": names, "Defect": [int(n.startswith("cracked")) for n in names]}).to_csv(
        tmp_path / "my_labels.csv", index=False)
    cfg = ExperimentConfig(dataset="folder", data_dir=str(tmp_path), data_kwargs={"csv": "my_labels.csv"})
    index = load_index(cfg)
    assert (len(index.train), len(index.val)) == (40, 10)
    assert (int(index.train.Defect.sum()), int(index.val.Defect.sum())) == (8, 2)    # stratified 80/20
    assert not set(index.train.Filename) & set(index.val.Filename)
    assert (index.train[list(CODES)] == 0).all().all()
    assert load_index(cfg).train.index.equals(index.train.index)                     # seeded
    cache = ImageCache.for_index(index, 4, tmp_path / "cache")
    assert cache.load(index.val.Filename).shape == (10, 4, 4, 3)
    with pytest.raises(DataError, match="nor labels.csv"):
        load_index(cfg.replace(data_kwargs={}))


def test_unknown_dataset():
    cfg = ExperimentConfig()
    cfg.dataset = "imagenet"      # bypasses the config's own check
    with pytest.raises(DataError, match="unknown dataset 'imagenet'; choose one of: synthetic, sewer-ml"):
        load_index(cfg)


def test_synthetic_adaptor_passes_generator_options(tmp_path, monkeypatch):
    seen = {}

    def generate_dataset(out_dir, n_train=4000, n_val=2000, size=128, seed=0, overwrite=False):
        seen.update(n_train=n_train, size=size, seed=seed)
        write_demo_folder(out_dir, n=n_train, seed=1, size=size)
        write_demo_folder(out_dir, n=n_val, seed=2, size=size, csv_name="SewerML_Val.csv")
        return Path(out_dir)

    monkeypatch.setitem(sys.modules, "sewer_ssl.synthetic", types.SimpleNamespace(generate_dataset=generate_dataset))
    cfg = ExperimentConfig(data_dir=str(tmp_path / "syn"), seed=5,
                           data_kwargs=dict(n_train=30, n_val=12, size=8, check_files=True))
    index = load_index(cfg)
    assert seen == dict(n_train=30, size=8, seed=0) and (len(index.train), len(index.val)) == (30, 12)
    with pytest.warns(UserWarning, match="typo"):
        load_index(cfg.replace(data_kwargs=dict(n_train=30, n_val=12, size=8, typo=1)))


def fake_elpv(monkeypatch, n=40, fail_after=None):
    rng = np.random.default_rng(0)
    probs = np.array([0, 1 / 3, 2 / 3, 1.0] * (n // 4))
    images = rng.integers(0, 256, (n, 12, 12), dtype=np.uint8)
    types_ = np.array(["mono", "poly"] * (n // 2))
    module = types.ModuleType("elpv_dataset.utils")
    module.load_dataset = lambda: (images, probs, types_)
    monkeypatch.setitem(sys.modules, "elpv_dataset", types.ModuleType("elpv_dataset"))
    monkeypatch.setitem(sys.modules, "elpv_dataset.utils", module)
    if fail_after is not None:
        real_save, count = Image.Image.save, [0]

        def save(self, *a, **k):
            count[0] += 1
            if count[0] > fail_after: raise OSError("disk full")
            return real_save(self, *a, **k)
        monkeypatch.setattr(Image.Image, "save", save)


def test_elpv_export_labels_and_split(tmp_path, monkeypatch):
    fake_elpv(monkeypatch)
    index = load_index(ExperimentConfig(dataset="elpv", data_dir=str(tmp_path / "elpv")))
    assert (len(index.train), len(index.val)) == (30, 10)
    both = pd.concat([index.train, index.val])
    assert (both.Defect == (both.probability >= 0.5)).all() and int(both.Defect.sum()) == 20
    assert (both[list(CODES)] == 0).all().all()
    assert int(index.train.Defect.sum()) == 15            # stratified on probability x type


def test_elpv_failure_leaves_nothing(tmp_path, monkeypatch):
    fake_elpv(monkeypatch, fail_after=7)
    with pytest.raises(OSError, match="disk full"):
        load_index(ExperimentConfig(dataset="elpv", data_dir=str(tmp_path / "elpv")))
    assert list(tmp_path.iterdir()) == []


def test_elpv_missing_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "elpv_dataset", None)
    monkeypatch.setitem(sys.modules, "elpv_dataset.utils", None)
    with pytest.raises(DataError, match="pip install elpv-dataset"):
        load_index(ExperimentConfig(dataset="elpv", data_dir=str(tmp_path / "elpv")))
    assert not (tmp_path / "elpv").exists()


def test_elpv_refuses_a_foreign_folder(tmp_path, monkeypatch):
    fake_elpv(monkeypatch)
    (tmp_path / "elpv").mkdir(); (tmp_path / "elpv/notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds no ELPV export"):
        load_index(ExperimentConfig(dataset="elpv", data_dir=str(tmp_path / "elpv")))
    assert (tmp_path / "elpv/notes.txt").read_text() == "mine"


@pytest.mark.skipif(importlib.util.find_spec("elpv_dataset") is None, reason="elpv-dataset not installed")
def test_elpv_real_package(tmp_path):
    index = load_index(ExperimentConfig(dataset="elpv", data_dir=str(tmp_path / "elpv")))
    assert (len(index.train), len(index.val)) == (1968, 656)
    assert int(index.train.Defect.sum() + index.val.Defect.sum()) == 715 + 106
    x = ImageCache.for_index(index, 16, tmp_path / "cache").load(index.val.Filename[:4])
    assert x.shape == (4, 16, 16, 3) and (x[..., 0] == x[..., 1]).all()   # grayscale as RGB
