"The prepared GPU check (sewer_ssl.gpucheck) runs on the CPU at toy size, without papermill, nbdev or jupyter."
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sewer_ssl.gpucheck import THROUGHPUT_CONFIGS, _check_row, check_bf16_loss_close, run_checks

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
    assert len(tp) == len(THROUGHPUT_CONFIGS) and (tp.error == "").all() and (tp.img_s > 0).all()
    assert tp.data_wait.between(0, 1).all() and set(tp["mode"]) == {"eager"}
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
