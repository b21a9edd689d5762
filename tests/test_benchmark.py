"""The throughput benchmark: the command line on one tiny configuration, its table, lightly kept optional,
and our losses against lightly's where the definitions coincide."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from sewer_ssl import benchmark
from sewer_ssl.config import ConfigError, ExperimentConfig

ROOT = Path(__file__).resolve().parents[1]
HAS_LIGHTLY = benchmark.lightly_available()
needs_lightly = pytest.mark.skipif(not HAS_LIGHTLY, reason='lightly not installed (pip install -e ".[benchmark]")')

COLUMNS = {"method", "backbone", "img_size", "batch", "steps", "warmup", "block",
           *(f"{k}_{c}" for k in ("ours", "lightly")
             for c in ("img_s", "s_step", "s_step_iqr", "step_mib", "state_mib", "params_m", "loss")),
           *(f"{k}_e2e_{c}" for k in ("ours", "lightly") for c in ("img_s", "s_step", "s_step_iqr")),
           "ratio_ours_lightly", "ratio_e2e", "e2e_views", "lightly_e2e_views", "memory_format", "precision",
           "device", "device_name", "torch", "lightly", "command"}


def test_cli_runs_one_tiny_configuration_and_lightly_is_imported_only_on_demand(tmp_path):
    """One fresh process: importing every module of the library must not import lightly; then
    `python -m sewer_ssl.benchmark` (run the way `-m` runs it) times one tiny configuration."""
    args = ["--device", "cpu", "--img-size", "16", "--batch", "4", "--steps", "1", "--warmup", "1",
            "--methods", "simclr,mae", "--backbones", "resnet18", "--threads", "1", "--out", str(tmp_path)]
    if not HAS_LIGHTLY: args.append("--no-lightly")
    mods = sorted(p.stem for p in (ROOT / "sewer_ssl").glob("*.py") if not p.stem.startswith("_"))
    code = ("import importlib, runpy, sys\n"
            f"for m in {mods!r}: importlib.import_module('sewer_ssl.' + m)\n"
            "assert 'lightly' not in sys.modules, 'lightly was imported at import time'\n"
            "del sys.modules['sewer_ssl.benchmark']\n"
            f"sys.argv = ['sewer_ssl.benchmark', *{args!r}]\n"
            "runpy.run_module('sewer_ssl.benchmark', run_name='__main__', alter_sys=True)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "ours/lightly" in res.stdout and "simclr" in res.stdout
    path = tmp_path / "train_throughput_cpu_16px.csv"
    assert path.exists() and not list(tmp_path.glob(".*tmp"))  # written atomically, nothing left behind
    df = pd.read_csv(path)
    assert set(df.columns) == COLUMNS
    assert df[["method", "backbone"]].values.tolist() == [["simclr", "resnet18"]]  # MAE is ViT-only: skipped
    row = df.iloc[0]
    assert row.ours_img_s > 0 and row.ours_s_step > 0 and row.ours_state_mib > 0 and row.ours_e2e_img_s > 0
    assert row.device == "cpu" and row.torch == torch.__version__ and "--img-size 16" in row.command
    if HAS_LIGHTLY:
        assert row.lightly_img_s > 0
        assert row.ratio_ours_lightly == pytest.approx(row.ours_img_s / row.lightly_img_s, rel=1e-4)
        assert row.ours_params_m == pytest.approx(row.lightly_params_m)  # SimCLR: identical head widths
        assert row.lightly_e2e_img_s > 0 and row.lightly_e2e_views == "lightly SimCLRViewTransform per image"
        assert row.ratio_e2e == pytest.approx(row.ours_e2e_img_s / row.lightly_e2e_img_s, rel=1e-4)
    assert row.e2e_views == "DeviceViews"
    assert row.memory_format == ("channels_last" if torch.backends.mkldnn.is_available() else "contiguous_format")


def test_supervised_has_no_lightly_column():
    row = benchmark.benchmark_config("supervised", "vit_tiny", img_size=16, batch=4, steps=1, warmup=0,
                                     device="cpu", e2e=False)
    assert row["ours_img_s"] > 0 and pd.isna(row["lightly_img_s"]) and pd.isna(row["ratio_ours_lightly"])


def test_bad_names_fail_before_running():
    with pytest.raises(ConfigError, match="resnet18, vit_tiny"):
        benchmark.run_benchmark(["simclr"], ["resnet50"], steps=1)
    with pytest.raises(ConfigError, match="no valid"):
        benchmark.run_benchmark(["mae"], ["resnet18"], steps=1)


def test_missing_lightly_names_the_install_command(monkeypatch):
    benchmark.require_lightly.cache_clear()
    monkeypatch.setitem(sys.modules, "lightly", None)  # makes `import lightly` fail
    try:
        with pytest.raises(ImportError, match=r'pip install -e "\.\[benchmark\]"'):
            benchmark.require_lightly()
        with pytest.raises(ImportError, match="benchmark"):
            benchmark.run_benchmark(["simclr"], ["resnet18"], steps=1)
    finally:
        benchmark.require_lightly.cache_clear()


@needs_lightly
def test_losses_agree_with_lightly():
    for seed in (0, 1):
        df = benchmark.loss_agreement(seed=seed)
        assert len(df) == 7
        bad = df[df.abs_diff > 1e-5 * df.ours.abs().clip(lower=1)]
        assert bad.empty, bad.to_string()


@needs_lightly
def test_loss_relations_hold_beyond_the_worked_example():
    import lightly.loss as ll
    torch.manual_seed(3)
    p, z = torch.randn(10, 5), torch.randn(10, 5)
    from sewer_ssl.losses import barlow_twins_loss, byol_loss
    # BYOL: 2 - 2 cos = 2 + 2 ncs, for any inputs, including the symmetrised two-direction loss
    ncs = ll.NegativeCosineSimilarity()
    assert torch.allclose(byol_loss(p, z) + byol_loss(z, p), 4 + 2 * (ncs(p, z) + ncs(z, p)), atol=1e-6)
    # Barlow Twins: ours is lightly's times the scale, for every lambda
    for lambd in (0.0, 0.0051, 1.0):
        assert torch.allclose(barlow_twins_loss(p, z, lambd, 0.024), 0.024 * ll.BarlowTwinsLoss(lambd)(p, z),
                              rtol=1e-5)


@needs_lightly
@pytest.mark.parametrize("method, backbone, gap", [("byol", "resnet18", 4096), ("barlow", "resnet18", 4096),
                                                   ("dino", "resnet18", 0), ("mae", "vit_tiny", -192)])
def test_lightly_counterparts_have_our_head_widths(method, backbone, gap):
    "Same trainable parameters up to the biases lightly drops before a BatchNorm and its MAE mask token."
    from sewer_ssl.methods import build_method
    cfg = ExperimentConfig(method=method, backbone=backbone, img_size=16)
    ours, theirs = build_method(cfg), benchmark.build_lightly_method(cfg)
    assert benchmark.trainable_parameters(ours) - benchmark.trainable_parameters(theirs) == gap


def test_verdict_compares_the_ratio_with_the_noise():
    df = pd.DataFrame(dict(ours_s_step=[1.0, 1.0, 1.0, 1.0], ours_s_step_iqr=[0.01, 0.01, 0.5, 0.01],
                           lightly_s_step=[2.0, 0.5, 1.2, float("nan")], lightly_s_step_iqr=[0.02, 0.01, 0.1, float("nan")]))
    df["ratio_ours_lightly"] = df.lightly_s_step / df.ours_s_step  # images/s ratio = inverse time ratio
    assert benchmark.verdict(df).tolist() == ["ours faster", "lightly faster", "within noise", ""]


@needs_lightly
def test_both_view_makers_reduce_to_normalisation_without_augmentation():
    """With the augmentation switched off (crop scale 1, no jitter, no flip) our batched views and
    lightly's per-image views are both the normalised image: the e2e arms make the same kind of view."""
    from sewer_ssl.augment import normalize
    cfg = ExperimentConfig(method="simclr", backbone="resnet18", img_size=16, min_scale=1.0, t_val=0.0, flip=False)
    u8 = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = normalize()(u8)
    for maker in (benchmark.view_maker, benchmark.lightly_view_maker):
        make, name = maker(cfg, 2, torch.device("cpu"))
        views = make(u8)
        assert len(views) == 2, name
        for v in views: torch.testing.assert_close(v, expected, atol=1e-5, rtol=0, msg=name)


def test_the_cpu_step_command_prints_the_profile_before_and_after_and_the_lightly_comparison(tmp_path, capsys):
    "The quiet-machine command (`python -m sewer_ssl.cpustep --parts profile,precision`) at toy size."
    from sewer_ssl.cpustep import main
    args = ["--out", str(tmp_path), "--parts", "profile,precision", "--img-size", "16", "--batch", "4", "--steps", "1",
            "--warmup", "1", "--methods", "simclr", "--backbones", "resnet18"]
    assert main(args) == 0
    prof = pd.read_csv(tmp_path / "cpu_step_profile.csv")
    assert sorted(zip(prof.method, prof.step)) == sorted((m, s) for m in ("simclr",)
                                                         for s in ("reference", "multi-tensor"))
    ref, new = (prof[prof.step == s].set_index("method") for s in ("reference", "multi-tensor"))
    assert (new.ops_optimiser * 4 < ref.ops_optimiser).all() and (new.syncs == 0).all() and (new.cpu_ms_total > 0).all()
    assert (new.ops_forward == ref.ops_forward).all() and (new.ops_backward == ref.ops_backward).all()  # same model work
    prec = pd.read_csv(tmp_path / "cpu_step_precision.csv")
    assert set(prec.method) == {"simclr"} and (prec.ours_e2e_img_s > 0).all()
    if HAS_LIGHTLY: assert (prec.ratio_e2e > 0).all()
    assert "ops_total" in capsys.readouterr().out
