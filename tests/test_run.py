"""End to end: nbs/run.ipynb through papermill, bad names, and the library in step with nbs/."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, epochs=2, batch_size=32, test_ps=[0.15, 0.05])


def _options(tmp_path, **extra):
    return dict(data_kwargs=dict(n_train=400, n_val=400, size=48), probe_epochs=100, **extra)


def test_run_notebook_writes_results(tmp_path):
    out = tmp_path / "executed.ipynb"
    pm.execute_notebook(str(ROOT / "nbs/run.ipynb"), str(out), kernel_name="python3", progress_bar=False,
                        # budget paper, but the explicit sizes of TINY win
                        parameters=dict(method="simclr", budget="paper", data_dir=str(tmp_path / "data"),
                                        out_dir=str(tmp_path / "runs"), run_id="tiny",
                                        options=_options(tmp_path, method_kwargs=dict(proj_hidden=128, proj_dim=64)),
                                        **TINY))
    run = tmp_path / "runs" / "tiny"
    assert {p.name for p in run.iterdir()} >= {"config.json", "history.csv", "metrics.json", "checkpoint.pt", "test_scores.npz"}
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"] == "simclr" and cfg["img_size"] == 32 and cfg["resolved"]["optimizer"] == "lars"
    assert cfg["budget"] == "paper" and (cfg["epochs"], cfg["batch_size"]) == (TINY["epochs"], TINY["batch_size"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert [r["test_p"] for r in metrics["rows"] if r["classifier"] == "linear_probe"] == [0.15, 0.05]
    # the probes, and the two controls scored on the same test images (chapter 09a)
    assert {r["classifier"] for r in metrics["rows"]} == {"linear_probe", "online_probe", "image_statistics", "untrained"}
    assert set(metrics["val_auroc"]) == {"linear_probe", "online_probe", "image_statistics", "untrained"}
    assert metrics["lidar_train"] > 1
    import numpy as np
    with np.load(run / "test_scores.npz") as f:
        n_test = sum(s["rows"] for s in metrics["splits"] if s["index"] == "test")
        assert len(f["filename"]) == len(f["logit__untrained"]) == len(f["knn__trained"]) == n_test
        assert set(np.unique(f["defect"])) == {0, 1}
    for r in metrics["rows"]:
        assert {"f1", "precision", "recall", "f1_normal", "all_defect_f1"} <= set(r)
        assert 0 <= r["f1"] <= 1 and 0 <= r["f1_normal"] <= 1
    history = (run / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,step,lr,loss") and len(history) > 2
    # the executed notebook printed the summary table
    text = out.read_text()
    assert "all_defect_f1" in text and "linear_probe" in text


def test_supervised_beats_all_defect_baseline(tmp_path):
    """A short supervised run on synthetic images must beat the trivial all-defect classifier."""
    from sewer_ssl.config import ExperimentConfig
    from sewer_ssl.experiment import run_experiment
    cfg = ExperimentConfig(method="supervised", img_size=48, epochs=6, batch_size=32, lr=4e-3, device="cpu",
                           train_p=0.45, test_ps=(0.45, 0.15), min_scale=1.0, t_val=0.0, probe_epochs=200,
                           data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "runs"),
                           # nuisance off and large, contrasty defects: a check that training learns, in seconds;
                           # the default data is calibrated to be hard (chapter 01, "Calibration")
                           data_kwargs=dict(n_train=1200, n_val=800, size=64, nuisance=0, visibility=2.5))
    res = run_experiment(cfg, progress=False)
    for row in res["metrics"].to_dict("records"):
        if row["classifier"] in ("image_statistics", "untrained"): continue   # the controls: not the model under test
        # 18 defect images at p = 0.15: the AUROC's standard error is about 0.07, so 0.7 is ~3 SE above chance
        assert row["auroc"] > 0.7, row
        assert row["f1"] > row["all_defect_f1"] + 0.03, row


@pytest.mark.parametrize("bad, message", [
    (dict(method="simsiam"), "unknown method 'simsiam'"),
    (dict(method="mae"), "needs backbone vit_tiny"),
    (dict(train_p=1.5), "strictly between 0 and 1"),
    (dict(dataset="imagenet"), "unknown dataset 'imagenet'"),
    (dict(backbone="resnet50"), "unknown backbone 'resnet50'"),
])
def test_bad_parameters_fail_clearly_and_write_nothing(tmp_path, bad, message):
    out = tmp_path / "executed.ipynb"
    params = dict(data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "runs"), **TINY)
    params.update(bad)
    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(ROOT / "nbs/run.ipynb"), str(out), kernel_name="python3",
                            progress_bar=False, parameters=params)
    assert message in str(err.value)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_library_is_in_step_with_notebooks(tmp_path):
    """nbdev_export on a copy of the sources reproduces sewer_ssl/ exactly."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "_docs", "__pycache__"))
    subprocess.run([shutil.which("nbdev_export") or "nbdev_export"], cwd=copy, check=True, capture_output=True)
    for py in sorted((ROOT / "sewer_ssl").glob("*.py")):
        assert (copy / "sewer_ssl" / py.name).read_text() == py.read_text(), \
            f"sewer_ssl/{py.name} differs from its notebook: edit nbs/, run nbdev_export then nbdev_clean"


def test_parameters_cell_survives_nbdev_clean():
    nb = json.loads((ROOT / "nbs/run.ipynb").read_text())
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    source = "".join(tagged[0]["source"])
    for name in ("method", "backbone", "dataset", "data_dir", "train_p", "test_ps", "budget", "img_size", "epochs",
                 "batch_size", "seed", "out_dir"):
        assert f"\n{name} = " in "\n" + source, name


def test_unreachable_test_proportion_fails_before_training(tmp_path):
    """A test proportion the test pool cannot supply is reported before anything is trained or written."""
    from sewer_ssl.config import ExperimentConfig
    from sewer_ssl.data import DataError
    from sewer_ssl.experiment import run_experiment
    cfg = ExperimentConfig(img_size=16, epochs=1, batch_size=16, device="cpu", test_ps=(0.15, 0.01),
                           data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "runs"),
                           data_kwargs=dict(n_train=80, n_val=80, size=24))
    with pytest.raises(DataError, match=r"test_ps holds 0.01, which the test pool cannot supply: .* needs at least 99 normal and 1 defect images"):
        run_experiment(cfg, progress=False)
    assert not (tmp_path / "runs").exists()


def test_crops_come_from_the_cache_size_copy(tmp_path, monkeypatch):
    """With cache_size > img_size the training crops are cut from a sharper copy; evaluation keeps img_size."""
    import sewer_ssl.experiment as E
    from sewer_ssl.augment import CachedImages
    from sewer_ssl.config import ConfigError, ExperimentConfig
    built, fed = [], []
    real_for_index, real_init = E.ImageCache.for_index.__func__, CachedImages.__init__
    monkeypatch.setattr(E.ImageCache, "for_index",
                        classmethod(lambda cls, index, size, **kw: built.append(size) or real_for_index(cls, index, size, **kw)))
    monkeypatch.setattr(CachedImages, "__init__", lambda self, images, *a, **k: fed.append(images.shape[1]) or real_init(self, images, *a, **k))
    cfg = ExperimentConfig(img_size=16, cache_size=32, epochs=1, batch_size=16, device="cpu", test_ps=(0.45,),
                           probe_epochs=20, data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "runs"),
                           data_kwargs=dict(n_train=80, n_val=160, size=32))
    res = E.run_experiment(cfg, progress=False)
    assert built == [16, 32] and fed == [32], (built, fed)     # eval cache at 16 px, crops from the 32 px copy
    assert res["summary"]["precision"] == "fp32" and (res["run_dir"] / "metrics.json").is_file()
    with pytest.raises(ConfigError, match="cache_size must lie between img_size"):
        ExperimentConfig(img_size=64, cache_size=32)
