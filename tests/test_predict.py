"""The inspection workflow end to end: a tiny run, new images scored with it, operating points from
validation data only, the triage report and the exported detectors."""
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sewer_ssl.config import ExperimentConfig
from sewer_ssl.data import load_index, make_splits
from sewer_ssl.evaluate import OPERATING_POINTS, operating_points
from sewer_ssl.experiment import run_experiment
from sewer_ssl.evaluate import knn_scores
from sewer_ssl.predict import Detector, PredictError, export_detector, predict, read_images
from sewer_ssl.synthetic import generate_dataset


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    cfg = ExperimentConfig(method="simclr", img_size=32, epochs=1, batch_size=32, device="cpu", run_id="tiny",
                           out_dir=str(tmp / "runs"), data_dir=str(tmp / "data"), test_ps=(0.15, 0.05), probe_epochs=50,
                           data_kwargs=dict(n_train=200, n_val=400, size=32), method_kwargs=dict(proj_hidden=64, proj_dim=32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_experiment(cfg, progress=False)
    result["warnings"] = [str(w.message) for w in caught]
    generate_dataset(tmp / "new", n_train=12, n_val=4, size=48, seed=123)   # images the run never saw
    return tmp, cfg, result


def test_new_images_are_scored_and_a_corrupt_one_is_named(run):
    tmp, cfg, result = run
    images = sorted((tmp / "new" / "images").glob("*.png"))
    (tmp / "new" / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    loose = tmp / "loose.png"; loose.write_bytes(images[0].read_bytes())
    table, failed = predict(result["run_dir"], [loose, tmp / "new" / "images"], out=tmp / "scores.csv", progress=False)
    assert [Path(p).name for p, _ in failed] == ["corrupt.png"] and "corrupt.png" not in " ".join(table.file)
    assert len(table) == len(images) + 1 and list(table.file[:1]) == [str(loose)]          # input order kept
    written = pd.read_csv(tmp / "scores.csv")
    assert len(written) == len(table) and {"probability", "knn_score", "knn_percentile", "rank"} <= set(written)
    assert np.isclose(table.probability[0], table.probability[1 + images.index(images[0])])  # same pixels, same score
    assert table.probability.between(0, 1).all() and table.knn_percentile.between(0, 100).all()
    det = Detector.load(result["run_dir"])
    assert table.in_distribution.mean() >= 0.8          # images of the same generator look like the training data
    for name in OPERATING_POINTS:   # an image unlike the training data is flagged at no operating point
        assert (table[f"flag_{name}"] == ((table.probability >= det.thresholds[name]) & table.in_distribution)).all()


def test_training_images_score_as_the_run_evaluated_them(run):
    tmp, cfg, result = run
    train = result["splits"]["train"]
    csv = tmp / "train_list.csv"; train[["Filename"]].to_csv(csv, index=False)
    table, failed = predict(result["run_dir"], [csv], image_dir=tmp / "data" / "images", progress=False)
    det = Detector.load(result["run_dir"])
    with np.load(result["run_dir"] / "features.npz") as f:
        pos = pd.Index(f["train__keys"].astype(str)).get_indexer(train.Filename.astype(str))
        expected = det.probe.probability(f["train"][pos])
    assert not failed and len(table) == len(train)
    np.testing.assert_allclose(table.probability, expected, atol=1e-5)


def test_a_labels_csv_is_read_with_its_images_where_training_finds_them(run):
    tmp, cfg, result = run
    folder = tmp / "own"; (folder / "images").mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in (tmp / "new" / "images").glob("0*.png"))[:5]
    for n in names: (folder / "images" / n).write_bytes((tmp / "new" / "images" / n).read_bytes())
    pd.DataFrame({"Filename": names, "Defect": 0}).to_csv(folder / "labels.csv", index=False)
    table, failed = predict(result["run_dir"], [folder / "labels.csv"], progress=False)
    assert not failed and [Path(f) for f in table.file] == [folder / "images" / n for n in names]


def test_operating_points_come_from_validation_labels_only(run):
    tmp, cfg, result = run
    det = Detector.load(result["run_dir"])
    splits = make_splits(load_index(cfg.replace(data_dir=str(tmp / "data"))), cfg)
    with np.load(result["run_dir"] / "features.npz") as f:
        pos = pd.Index(f["val__keys"].astype(str)).get_indexer(splits["val"].Filename.astype(str))
        val_prob = det.probe.probability(f["val"][pos])
    assert det.thresholds == pytest.approx(operating_points(splits["val"].Defect, val_prob, cfg.target_recall))
    summary = json.loads((result["run_dir"] / "metrics.json").read_text())["operating_points"]
    assert summary["chosen_on"] == "validation pool" and summary["thresholds"] == pytest.approx(det.thresholds)
    rows = pd.DataFrame(summary["rows"])
    assert set(rows.test_p) == {0.15, 0.05} and set(rows.point) == set(OPERATING_POINTS)
    assert rows.recall.between(0, 1).all()


def test_photos_that_are_not_pipes_are_unfamiliar_and_not_flagged(run):
    from PIL import Image
    from sklearn.datasets import load_sample_images   # two photos (a pagoda, a flower), shipped with scikit-learn
    tmp, cfg, result = run
    folder = tmp / "photos"; folder.mkdir(exist_ok=True)
    for i, photo in enumerate(load_sample_images().images):
        Image.fromarray(photo).save(folder / f"photo{i}.png"); Image.fromarray(photo).convert("RGBA").save(folder / f"rgba{i}.png")
    first_test = tmp / "data" / "images" / result["splits"]["test"].Filename.iloc[0]
    Image.open(first_test).convert("RGB").resize((8, 8)).save(folder / "tiny.png")
    table, failed = predict(result["run_dir"], [folder], progress=False)
    by_name = table.set_index(table.file.map(lambda f: Path(f).name))
    photos = by_name.drop(index="tiny.png")
    assert not failed and not photos.in_distribution.any(), photos[["probability", "reason"]]
    assert photos.reason.str.contains("unlike the training images").all()
    assert not by_name.in_distribution["tiny.png"] and "upscaled from 8x8 to 32x32" in by_name.reason["tiny.png"]
    assert not table[[f"flag_{n}" for n in OPERATING_POINTS]].to_numpy().any()
    kept, _ = predict(result["run_dir"], [folder], progress=False, keep_unfamiliar=True)   # the option keeps them
    det = Detector.load(result["run_dir"])
    for name in OPERATING_POINTS:
        assert (kept[f"flag_{name}"] == (kept.probability >= det.thresholds[name])).all()
    # the run's own test images (held out like the validation images the thresholds came from): most are familiar
    own, _ = predict(result["run_dir"], [tmp / "data" / "images" / f for f in result["splits"]["test"].Filename], progress=False)
    assert own.in_distribution.mean() >= 0.9, own.reason[~own.in_distribution].tolist()


def test_familiarity_thresholds_come_from_held_out_validation_images(run):
    tmp, cfg, result = run
    det = Detector.load(result["run_dir"])
    with np.load(result["run_dir"] / "features.npz") as f:
        held_out = knn_scores(f["train"], f["val"], k=det.knn_k)
    fam = det.familiarity
    np.testing.assert_allclose(fam["held_out_features"], np.sort(held_out), rtol=1e-5)
    # each threshold: the smallest distance that at least 99 % of the held-out validation images stay within
    for name, distances in (("features", held_out), ("stats", fam["held_out_stats"])):
        t = fam[f"threshold_{name}"]
        assert (distances <= t * (1 + 1e-6)).mean() >= 0.99 and (distances < t * (1 - 1e-6)).mean() < 0.99


def test_metrics_of_test_sets_with_few_defects_are_flagged_and_said(run):
    tmp, cfg, result = run
    summary = json.loads((result["run_dir"] / "metrics.json").read_text())
    rows = pd.DataFrame(summary["rows"])
    few = rows.loc[rows.n_defect < 20].drop_duplicates("test_p")
    assert len(few)   # this tiny run's test sets are small
    flagged = summary["too_small_to_read"]
    assert flagged["min_defects"] == 20
    assert [(r["test_p"], r["n_defect"]) for r in flagged["test_sets"]] == list(zip(few.test_p, few.n_defect))
    said = [w for w in result["warnings"] if "too_small_to_read" in w]
    assert len(said) == 1 and all(f"{p:g}" in said[0] for p in few.test_p)


def test_exported_detectors_score_as_pytorch(run):
    pytest.importorskip("onnxruntime")
    import onnxruntime
    tmp, cfg, result = run
    det = Detector.load(result["run_dir"])
    images, _, _ = read_images(sorted((tmp / "new" / "images").glob("0*.png"))[:8], det.img_size)
    reference = det.score(images).probability.to_numpy()
    paths = export_detector(det, tmp / "export")
    contract = json.loads(paths["contract"].read_text())
    assert contract["input"]["shape"] == ["batch", 3, 32, 32] and contract["input"]["channel_order"] == "RGB"
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    scripted = torch.jit.load(str(paths["torchscript"]))(x).numpy()
    onnx = onnxruntime.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    assert np.abs(scripted - reference).max() < 1e-4 and np.abs(onnx - reference).max() < 1e-4


def test_onnx_scores_16_bit_and_grayscale_files_as_predict_does_when_fed_by_the_contract(run):
    pytest.importorskip("onnxruntime")
    import onnxruntime
    from PIL import Image
    tmp, cfg, result = run
    det = Detector.load(result["run_dir"])
    paths = export_detector(det, tmp / "export_contract")
    decode = json.loads(paths["contract"].read_text())["input"]["decode"]
    assert "top 8 bits" in decode["bit_depth"] and "not applied" in decode["exif_orientation"]
    rgb = np.asarray(Image.open(sorted((tmp / "new" / "images").glob("0*.png"))[0]).convert("RGB"))
    deep, gray = tmp / "deep16.png", tmp / "gray8.png"
    Image.fromarray((rgb.mean(2) * 257).astype(np.uint16)).save(deep); Image.fromarray(rgb).convert("L").save(gray)
    assert Image.open(deep).mode.startswith("I")

    def by_contract(path):   # numpy and PIL only, as a deployment would follow detector.json
        a = np.asarray(Image.open(path))
        if a.dtype.kind in "iu" and a.dtype.itemsize > 1: a = (np.clip(a, 0, 65535) >> 8).astype(np.uint8)
        if a.ndim == 2: a = np.repeat(a[..., None], 3, axis=2)
        a = np.asarray(Image.fromarray(a).resize((det.img_size,) * 2, Image.Resampling.BICUBIC))
        return a.transpose(2, 0, 1)[None].astype(np.float32) / 255

    session = onnxruntime.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    onnx = [session.run(None, {"images": by_contract(p)})[0][0] for p in (deep, gray)]
    table, _ = predict(result["run_dir"], [deep, gray], progress=False)
    np.testing.assert_allclose(table.probability, onnx, atol=1e-4)
    pixels, _, _ = read_images([deep, gray], det.img_size)   # the very pixels predict saw, not only the same score
    for p, seen in zip((deep, gray), pixels):
        np.testing.assert_array_equal(np.rint(by_contract(p)[0] * 255).astype(np.uint8), seen.transpose(2, 0, 1))


def test_the_command_line_scores_a_folder_and_writes_a_report(run):
    tmp, cfg, result = run
    out, report = tmp / "cli.csv", tmp / "report.html"
    p = subprocess.run([sys.executable, "-m", "sewer_ssl.predict", str(result["run_dir"]), str(tmp / "new" / "images"),
                        "--out", str(out), "--report", str(report), "--top-k", "3", "--quiet"],
                       capture_output=True, text=True, timeout=600)
    corrupt = (tmp / "new" / "images" / "corrupt.png").exists()
    assert p.returncode == (2 if corrupt else 0), p.stderr
    assert "images scored" in p.stdout and out.is_file() and report.read_text().count("<figure>") == 3
    det = Detector.load(result["run_dir"])
    for name, t in det.thresholds.items():   # enough digits to tell a threshold from 0, and what it flags
        assert f"{name:7s} threshold {t:.3g} (flags {det.share_flagged(name):.1%} of the run's validation images)" in p.stdout
    assert " 0.000" not in p.stdout and "what it means" in report.read_text()


def test_a_folder_that_is_not_a_finished_run_is_named(tmp_path):
    (tmp_path / "half").mkdir(); (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(PredictError, match=r"lacks checkpoint.pt, detector.npz"):
        Detector.load(tmp_path / "half")
    with pytest.raises(PredictError, match="does not exist"):
        Detector.load(tmp_path / "nowhere")
