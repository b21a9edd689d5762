"The data layer at Sewer-ML size (sewer_ssl.scale): tables of the right shape, stages timed, projections worked out."
import numpy as np
import pandas as pd
import pytest

from sewer_ssl.config import CODES
from sewer_ssl.data import read_sewer_csv
from sewer_ssl.scale import (SEWER_ML_IMAGES, SEWER_ML_TRAIN, SEWER_ML_VAL, cache_fill_rate, draw_code_matrix, main,
                             project_sewer_ml, time_data_layer, write_sewer_ml_csvs)


def test_code_matrix_follows_the_generators_weights():
    from sewer_ssl.synthetic import CODE_WEIGHTS
    codes = draw_code_matrix(50_000, seed=1)
    assert codes.shape == (50_000, len(CODES)) and (codes.sum(1) >= 1).all()
    # the most frequent main code of the generator is the most frequent code here
    assert CODES[int(codes.sum(0).argmax())] == max(CODE_WEIGHTS, key=CODE_WEIGHTS.get)
    assert len({tuple(r) for r in codes[:5000]}) > 50, "many combinations, as in Sewer-ML"


def test_tables_have_sewer_mls_counts_at_scale(tmp_path):
    root = write_sewer_ml_csvs(tmp_path, scale=0.001)
    train = read_sewer_csv(root / "SewerML_Train.csv", check_files=False)
    val = read_sewer_csv(root / "SewerML_Val.csv", check_files=False)
    assert len(train) == round(SEWER_ML_TRAIN[0] * 0.001) + round(SEWER_ML_TRAIN[1] * 0.001)
    assert int(val.Defect.sum()) == round(SEWER_ML_VAL[1] * 0.001)
    assert not set(train.Filename) & set(val.Filename), "one image folder: names never repeat"
    assert ((train[list(CODES)].sum(1) > 0) == (train.Defect == 1)).all()


def test_every_stage_is_timed(tmp_path):
    df = time_data_layer(scale=0.002, img_size=32, work_dir=tmp_path)
    assert len(df) == 12 and (df.seconds >= 0).all() and (df.rows > 0).all()
    assert df.stage.str.contains("imbalance sampler").sum() == 5
    assert list(tmp_path.iterdir()) == [], "the temporary tables and caches are removed"


def test_projection_is_the_measured_rate_multiplied_out():
    fill = pd.DataFrame([dict(img_size=64, workers=1, img_s=100.0), dict(img_size=64, workers=2, img_s=150.0)])
    p = project_sewer_ml(fill, n_images=360_000, workers=(1, 4)).iloc[0]
    assert p.hours_1_workers == pytest.approx(1.0) and p.hours_4_workers == pytest.approx(0.25)
    assert p.disk_gib == pytest.approx(360_000 * 64 * 64 * 3 / 2 ** 30)
    assert SEWER_ML_IMAGES == 1_040_129 + 130_046


def test_fill_rate_on_real_png_files(tmp_path):
    df = cache_fill_rate(n=4, sizes=(32,), workers=(1,), width=96, height=64, work_dir=tmp_path)
    assert len(df) == 1 and df.img_s.iloc[0] > 0 and df.source.iloc[0] == "96x64 PNG"


def test_command_writes_both_tables(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "out"), "--scales", "0.001", "0.002", "--pngs", "3", "--png-size", "64x48",
                 "--img-size", "32", "--work-dir", str(tmp_path)]) == 0
    layer = pd.read_csv(tmp_path / "out" / "data_layer_scale.csv")
    fill = pd.read_csv(tmp_path / "out" / "cache_fill.csv")
    assert set(layer.scale) == {0.001, 0.002} and layer.growth.notna().sum() == 12
    assert {"hours_8_workers", "disk_gib", "command"} <= set(fill.columns)
    with pytest.raises(SystemExit): main(["--out", str(tmp_path), "--png-size", "big"])
