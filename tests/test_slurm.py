"""The grid's SLURM path against real daemons: a private single-node cluster (slurmctld, slurmd and munge on
localhost, no accounting, no GPUs) runs a two-cell grid through sbatch, one job is cancelled mid-run, and the
next run redoes that cell only. Also: requests the cluster cannot serve are refused before anything is marked,
and cells whose job died are taken over. The `cluster` tests are skipped where SLURM is not installed
(`bash .ci/install_slurm.sh` installs it); the others need no cluster."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import sewer_ssl.grid as grid
from sewer_ssl.grid import GridError, build_cells, cell_state, run_grid, slurm_resources

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import LocalSlurm, missing_binaries  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = dict(n_train=160, n_val=160, size=32)
SETTINGS = dict(device="cpu", probe_epochs=20, data_kwargs=DATA)
QUIET = dict(log=lambda *a: None)
MISSING = missing_binaries()
NO_SLURM = f"SLURM is not installed (missing {', '.join(MISSING)}); bash .ci/install_slurm.sh installs it"


def two_cells(tmp_path, data_dir=None):
    return build_cells("main", outputs=tmp_path / "outputs", data_dir=str(data_dir or tmp_path / "data"),
                       method=["simclr"], backbone=["resnet18"], train_p=[0.45, 0.15], img_size=32, epochs=1,
                       test_ps=[0.45, 0.15], settings=SETTINGS)


def status(cell) -> dict:
    path = cell.run_dir / "cell_status.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def mark(cell, **record):
    cell.run_dir.mkdir(parents=True, exist_ok=True)
    (cell.run_dir / "cell_status.json").write_text(json.dumps(dict(run_id=cell.run_id, **record)))


# --- without a cluster ---------------------------------------------------------------------------------

class RefusingExecutor:
    "Stands in for submitit's executor where sbatch refuses the array, as on a cluster without GPUs."
    def map_array(self, *args):
        raise RuntimeError("sbatch: error: Batch job submission failed: Invalid generic resource (gres) specification")


def test_a_refused_submission_marks_no_cell_and_names_the_option(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    fresh, failed_before = two_cells(tmp_path)
    mark(failed_before, status="failed", error="an earlier error")
    monkeypatch.setattr(grid, "_slurm_executor", lambda *a, **k: RefusingExecutor())
    monkeypatch.setattr(grid, "_partition_nodes", lambda partition: None)    # as where sinfo cannot answer
    with pytest.raises(GridError, match=r"--gpus-per-task 0") as e:
        run_grid([fresh, failed_before], slurm=dict(cluster="slurm", time_min=5), **QUIET)
    assert "no cell was marked submitted" in str(e.value) and "gres" in str(e.value)
    assert not (fresh.run_dir / "cell_status.json").exists()              # as it was: never marked
    assert status(failed_before) == dict(run_id=failed_before.run_id, status="failed", error="an earlier error")
    assert cell_state(fresh) == ("pending", None) and cell_state(failed_before)[0] == "failed"


def test_a_submission_that_never_got_a_job_id_is_taken_over(tmp_path):
    old, dead, alive = build_cells("main", outputs=tmp_path, method=["simclr"], backbone=["resnet18"],
                                   train_p=[0.45, 0.15, 0.05])
    mark(old, status="submitted", job_id=None)                    # left by a refused submission of an older version
    gone = subprocess.Popen([sys.executable, "-c", "pass"]); gone.wait()
    mark(dead, status="submitted", job_id=None, host=grid.socket.gethostname(), pid=gone.pid)
    mark(alive, status="submitted", job_id=None, host=grid.socket.gethostname(), pid=grid.os.getpid())
    assert cell_state(old)[0] == "interrupted" and cell_state(dead)[0] == "interrupted"
    assert cell_state(alive)[0] == "submitted"                    # its submitter is still at work
    report = run_grid([old, dead, alive], dry_run=True, **QUIET).set_index("run_id")
    assert report.outcome.to_dict() == {old.run_id: "would run", dead.run_id: "would run", alive.run_id: "skip"}


def test_resources_follow_what_the_partition_has(monkeypatch):
    nodes = {"cpu": [("(null)", 4, 16000)], "gpu": [("gpu:a100:4(S:0-1)", 64, 512000), ("gpu:2,gpu:v100:1", 32, 256000)]}
    monkeypatch.setattr(grid, "_partition_nodes", lambda p: nodes[p])
    logged = []
    cpu = slurm_resources(dict(cluster="slurm", partition="cpu"), log=logged.append)
    assert (cpu["gpus_per_task"], cpu["cpus_per_task"]) == (0, 4) and "has no GPUs" in logged[0]
    gpu = slurm_resources(dict(cluster="slurm", partition="gpu"), log=logged.append)
    assert (gpu["gpus_per_task"], gpu["cpus_per_task"]) == (1, 8)
    assert grid._gpu_count("gpu:2,gpu:v100:1") == 3 and grid._gpu_count("(null)") == 0
    for request, option in [(dict(gpus_per_task=1), "--gpus-per-task 0"), (dict(cpus_per_task=8), "--cpus-per-task 4"),
                            (dict(mem_gb=64), "--mem-gb")]:
        with pytest.raises(GridError, match=option):
            slurm_resources(dict(cluster="slurm", partition="cpu", **request))
    with pytest.raises(GridError, match="--gpus-per-task 4 or fewer"):
        slurm_resources(dict(cluster="slurm", partition="gpu", gpus_per_task=5))


def test_sacct_warning_is_shown_once():
    import logging
    pytest.importorskip("submitit")
    grid._submitit()
    seen = []
    handler = logging.Handler(); handler.emit = lambda r: seen.append(r.getMessage())
    log = logging.getLogger("submitit"); log.addHandler(handler)
    try:
        grid._OnceFilter.seen = False
        for i in range(5): log.warning(f"Call #{i} - Bypassing sacct error boom, status may be inaccurate.")
        log.warning("another warning")
    finally:
        log.removeHandler(handler)
    assert len([m for m in seen if "Bypassing sacct error" in m]) == 1 and "another warning" in seen
    assert "not repeated" in seen[0]


# --- on a private SLURM cluster --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if MISSING: pytest.skip(NO_SLURM)
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as c:   # daemons stopped whatever the tests did
        yield c


@pytest.mark.cluster
@pytest.mark.skipif(bool(MISSING), reason=NO_SLURM)
def test_requests_the_cluster_cannot_serve_are_refused_before_submission(cluster, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    s = slurm_resources(dict(cluster="slurm", partition=cluster.partition), **QUIET)
    cpus = int(cluster.run("sinfo", "-h", "-o", "%c").stdout.strip())
    assert s["gpus_per_task"] == 0 and s["cpus_per_task"] == min(8, cpus)      # no GRES on this cluster
    with pytest.raises(GridError, match="has no GPUs.*--gpus-per-task 0"):
        slurm_resources(dict(cluster="slurm", partition=cluster.partition, gpus_per_task=1))
    with pytest.raises(GridError, match=f"--cpus-per-task {cpus} or fewer"):
        slurm_resources(dict(cluster="slurm", partition=cluster.partition, cpus_per_task=cpus + 1))
    with pytest.raises(GridError, match=f"--partition gpu: no such partition.*{cluster.partition}"):
        slurm_resources(dict(cluster="slurm", partition="gpu"))
    # where sinfo does not answer, the default asks for a GPU: sbatch itself refuses, and nothing stays marked
    monkeypatch.setattr(grid, "_partition_nodes", lambda partition: None)
    cells = two_cells(tmp_path)
    with pytest.raises(GridError, match=r"Invalid generic resource.*--gpus-per-task 0"):
        run_grid(cells, slurm=dict(cluster="slurm", partition=cluster.partition, time_min=5), **QUIET)
    assert [cell_state(c) for c in cells] == [("pending", None)] * 2
    assert cluster.run("squeue", "-h").stdout.strip() == ""


@pytest.mark.cluster
@pytest.mark.skipif(bool(MISSING), reason=NO_SLURM)
def test_cells_of_dead_jobs_are_taken_over(cluster, tmp_path):
    sleep = lambda: cluster.run("sbatch", "--parsable", "-c", "1", "-o", "/dev/null", "--wrap", "sleep 120").stdout.strip()
    cancelled, queued = sleep(), sleep()
    cluster.run("scancel", cancelled)
    cells = build_cells("main", outputs=tmp_path, method=["simclr"], backbone=["resnet18"], train_p=[0.45, 0.15, 0.05, 0.01])
    mark(cells[0], status="submitted", job_id=cancelled)
    mark(cells[1], status="submitted", job_id=queued)
    mark(cells[2], status="submitted", job_id="987654_3")     # a job the controller never heard of
    # running on another host (so its pid cannot be checked here) under a job that was cancelled
    mark(cells[3], status="running", host="node-17", pid=1, slurm_job=cancelled)
    assert [cell_state(c)[0] for c in cells] == ["submitted", "submitted", "submitted", "running"]
    states = grid.slurm_job_states([cancelled, queued, "987654_3"])
    assert states[cancelled][0] == "CANCELLED" and states[queued][0] in ("PENDING", "RUNNING") and "987654_3" not in states
    report = run_grid(cells, dry_run=True, **QUIET).set_index("run_id")
    assert report.before.tolist() == ["interrupted", "submitted", "interrupted", "interrupted"]
    assert report.outcome.tolist() == ["would run", "skip", "would run", "would run"]
    cluster.run("scancel", queued)


def wait_for(ok, timeout_s, what, proc=None):
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if ok(): return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the grid exited first:\n{proc.stdout.read()}")
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout_s} s")


@pytest.mark.cluster
@pytest.mark.skipif(bool(MISSING), reason=NO_SLURM)
def test_grid_through_sbatch_redoes_only_the_cancelled_cell(cluster, tmp_path):
    pytest.importorskip("submitit")
    first, second = two_cells(tmp_path)
    cmd = [sys.executable, "-m", "sewer_ssl.grid", "run", "main", "--methods", "simclr", "--backbones", "resnet18",
           "--train-ps", "0.45", "0.15", "--img-size", "32", "--epochs", "1", "--test-ps", "0.45", "0.15",
           "--outputs", str(tmp_path / "outputs"), "--data-dir", str(tmp_path / "data"), "--set", "device=cpu",
           "--set", "probe_epochs=20", "--set", f"data_kwargs={json.dumps(DATA)}",
           "--slurm", "--partition", cluster.partition, "--cpus-per-task", "1", "--time", "10"]
    env = {**grid.os.environ, **cluster.env(), "PYTHONUNBUFFERED": "1"}
    # the defaults (no --gpus-per-task) follow the cluster: no GPU asked for, so sbatch accepts the array
    grid_run = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # both jobs start (one CPU each); the second is cancelled while it trains
        wait_for(lambda: status(second).get("status") == "running" and status(first).get("status") == "running",
                 120, "both cells running", grid_run)
        job = status(second)["slurm_job"]
        assert "_" in job                                  # an array task: 12_1
        cluster.run("scancel", job)
        out, _ = grid_run.communicate(timeout=150)
    finally:
        if grid_run.poll() is None: grid_run.kill()
    assert grid_run.returncode == 1, out                   # a cell failed: the exit status says so
    assert "has no GPUs" in out and f"done   {first.run_id}" in out, out
    assert f"failed {second.run_id}: SLURM job {job} ended CANCELLED" in out, out
    assert out.count("Bypassing sacct error") <= 1, out
    assert cell_state(first) == ("done", None) and cell_state(second)[0] == "failed"
    kept = (first.run_dir / "metrics.json").stat().st_mtime_ns
    # the next run: the finished cell stays, the cancelled one runs again, the table is complete
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 cells, 1 finished before, 1 to run" in again.stdout and f"[1/1] done   {second.run_id}" in again.stdout
    assert (first.run_dir / "metrics.json").stat().st_mtime_ns == kept
    assert [cell_state(c) for c in (first, second)] == [("done", None)] * 2
    table = pd.read_csv(tmp_path / "outputs" / "results" / "main.csv")
    assert set(table.run_id) == {first.run_id, second.run_id} and set(table.status) == {"done"}
    assert sorted(set(table.train_p)) == [0.15, 0.45] and sorted(set(table.test_p)) == [0.15, 0.45]
    assert status(second)["slurm_job"] != job                # it ran in a job of the second array
