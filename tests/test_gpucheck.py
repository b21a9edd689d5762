"The prepared GPU check (sewer_ssl.gpucheck) runs on the CPU at toy size, without papermill, nbdev or jupyter."
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sewer_ssl.gpucheck import FULL, TINY, _check_row, check_bf16_loss_close, run_checks, throughput_plan

# a finder that refuses the notebook tooling a bare GPU node lacks
_BLOCK = """
import sys, runpy
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('papermill', 'nbdev', 'jupyter', 'jupyterlab', 'ipykernel', 'nbclient', 'execnb', 'IPython', 'ipywidgets'):
            raise ImportError(f'{name} is not on a bare GPU node')
sys.meta_path.insert(0, Refuse())
sys.argv = ['gpucheck'] + sys.argv[1:]
runpy.run_module('sewer_ssl.gpucheck', run_name='__main__')
"""


def test_the_command_runs_on_cpu_without_notebook_tooling(tmp_path):
    out = tmp_path / "gpu"
    p = subprocess.run([sys.executable, "-c", _BLOCK, "--tiny", "--device", "cpu", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(f.name for f in out.glob("*.csv")) == ["checks.csv", "environment.csv", "multi_gpu.csv", "throughput.csv"]
    checks = pd.read_csv(out / "checks.csv")
    device_only = checks[checks.check.str.contains("on the device")]
    assert len(device_only) >= 3 and set(device_only.status) == {"skipped"}, "never 'passed' without CUDA"
    bf16 = checks[checks.check.str.contains("bf16")]
    assert len(bf16) == 11 and set(bf16.status) == {"passed"}
    tp = pd.read_csv(out / "throughput.csv").fillna({"error": ""})
    assert len(tp) == len(throughput_plan(TINY, compile=False)) and (tp.error == "").all() and (tp.img_s > 0).all()
    loop = tp[~tp.method.isin(["plain simclr", "views"])]
    assert loop.data_wait.between(0, 1).all() and set(loop["mode"]) == {"eager"}
    assert set(loop.method) == {"simclr", "byol", "barlow", "dino", "mae", "supervised"}
    plain = tp[tp.method == "plain simclr"]
    assert set(plain["mode"]) == {"per view", "one pass"} and set(plain.backbone) == {"resnet18", "vit_tiny"}
    simclr = tp[tp.method == "simclr"]
    assert simclr.ratio.notna().all() and ((simclr.ratio - simclr.img_s / simclr.plain_img_s).abs() < 1e-4 * simclr.ratio).all()   # CSV keeps 6 digits
    assert (tp.wall_s > 0).all()
    assert pd.read_csv(out / "multi_gpu.csv").status.iloc[0] == "skipped"
    assert pd.read_csv(out / "environment.csv").device.iloc[0] == "cpu"


def test_a_bf16_check_can_fail():
    row = check_bf16_loss_close("cpu", "simclr", "resnet18", tolerance=0.0)
    assert row["status"] == "FAILED" and row["value"] > 0   # bf16 is never bit-identical to fp32


def test_a_check_that_raises_is_recorded_as_failed(monkeypatch):
    import sewer_ssl.gpucheck as g
    def broken(device): raise RuntimeError("driver gone")
    monkeypatch.setattr(g, "check_knn_matches_cpu", broken)
    df = run_checks("cpu")
    assert (df.status == "FAILED").sum() == 1 and df.detail.str.contains("driver gone").any()


def test_arguments_are_checked(tmp_path):
    from sewer_ssl.gpucheck import main
    with pytest.raises(SystemExit): main(["--tiny"])                       # no --out
    with pytest.raises(SystemExit): main(["--tiny", "--out", str(tmp_path), "--batch-size", "1"])


def test_the_full_plan_has_every_row_and_compiles_last():
    plan = throughput_plan(FULL)
    loop = [r for r in plan if r["kind"] == "loop"]
    assert {r["method"] for r in loop} == {"simclr", "byol", "barlow", "dino", "mae", "supervised"}
    simclr = {(r["backbone"], r["img_size"]) for r in loop if r["method"] == "simclr" and not r["compile"]}
    plain = {(r["backbone"], r["img_size"], r["one_pass"]) for r in plan if r["kind"] == "plain"}
    assert simclr == {(b, s) for b in ("resnet18", "vit_tiny") for s in (224, 64)}
    assert plain == {(b, s, o) for b, s in simclr for o in (False, True)}
    compiled = [i for i, r in enumerate(plan) if r.get("compile")]
    assert compiled and compiled == list(range(len(plan) - len(compiled), len(plan)))   # the last rows
