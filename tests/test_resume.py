"""A run killed with SIGKILL after its first checkpoint, then re-run with the same command, ends with the
metrics of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

SETTINGS = ["method=simclr", "img_size=16", "epochs=4", "batch_size=32", "device=cpu", "test_ps=[0.15]",
            "probe_epochs=30", 'data_kwargs={"n_train": 400, "n_val": 300, "size": 16}',
            'method_kwargs={"proj_hidden": 64, "proj_dim": 32}', "run_id=run"]


def command(tmp: Path, out: str):
    return [sys.executable, "-m", "sewer_ssl.experiment", "--quiet", f"data_dir={tmp / 'data'}",
            f"out_dir={tmp / out}", *SETTINGS]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    # the uninterrupted reference (it also generates the data and the image cache)
    subprocess.run(command(tmp_path, "ref"), check=True, env=env(), capture_output=True)
    reference = json.loads((tmp_path / "ref" / "run" / "metrics.json").read_text())

    ckpt = tmp_path / "killed" / "run" / "checkpoint.pt"
    proc = subprocess.Popen(command(tmp_path, "killed"), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    epoch_at_kill = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= epoch_at_kill < 4 and not (ckpt.parent / "metrics.json").exists()

    done = subprocess.run(command(tmp_path, "killed"), check=True, env=env(), capture_output=True, text=True)
    resumed = json.loads((tmp_path / "killed" / "run" / "metrics.json").read_text())
    assert resumed["rows"] == reference["rows"], done.stdout[-2000:]
    history = (ckpt.parent / "history.csv").read_text().splitlines()
    reference_history = (tmp_path / "ref" / "run" / "history.csv").read_text().splitlines()
    assert len(history) == len(reference_history)

    # the finished run, named with its data folder relative to the project root, is recognised:
    # it is re-scored from its stored features, not refused as a run with other settings
    root = Path(__file__).resolve().parents[1]
    again = [*command(tmp_path, "ref")[:4], f"data_dir={os.path.relpath(tmp_path / 'data', root)}",
             *command(tmp_path, "ref")[5:]]
    res = subprocess.run(again, env=env(), capture_output=True, text=True, cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "ref" / "run" / "metrics.json").read_text())["rows"] == reference["rows"]

