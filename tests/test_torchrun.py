"""Two-node torchrun on loopback: two separate `torchrun` launches (--nnodes 2, one process each, gloo on
CPU) take exactly the optimisation step of one process holding the combined batch, and a whole run
trains on both nodes while only rank 0 writes the run folder. Run as a script, this file is the
worker each launch starts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import one_step  # noqa: E402  (the same step, batch and model as the 2-process check)

from sewer_ssl.distributed import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not TORCHRUN.is_file(), reason=f"torchrun not found beside {sys.executable}")


def two_nodes(args: list[str], tmp_path, timeout_s: int = 300, node_args=None) -> list[subprocess.CompletedProcess]:
    """Launch `torchrun --nnodes 2 --nproc_per_node 1 --node_rank r ... args` for r = 0 and 1 at once, as on two
    machines whose rendezvous is 127.0.0.1; `node_args(r)` appends per-node arguments."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = []
    for r in (0, 1):
        cmd = [str(TORCHRUN), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(r),
               "--master_addr", "127.0.0.1", "--master_port", str(port), *args, *(node_args(r) if node_args else [])]
        log = open(tmp_path / f"node{r}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    done = []
    try:
        for p, log in procs:
            p.wait(timeout=timeout_s); log.close()
            done.append(subprocess.CompletedProcess(p.args, p.returncode, (tmp_path / Path(log.name).name).read_text()))
    finally:
        for p, _ in procs:
            if p.poll() is None: p.kill()
    return done


@pytest.mark.parametrize("method_name, backbone", [("simclr", "resnet18")])
def test_two_nodes_take_the_step_of_one_process_on_the_combined_batch(method_name, backbone, tmp_path):
    nodes = two_nodes([__file__, "step", method_name, backbone, str(tmp_path)], tmp_path)
    for r, n in enumerate(nodes): assert n.returncode == 0, f"node {r}:\n{n.stdout[-3000:]}"
    loss_1, state_1 = one_step(method_name, backbone)
    for r in (0, 1):
        got = np.load(tmp_path / f"rank{r}.npz")
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == dict(rank=r, world=2)
        assert float(got["__loss__"]) == pytest.approx(loss_1, rel=1e-5)
        for k, ref in state_1.items():
            np.testing.assert_allclose(got[k], ref, rtol=1e-4, atol=1e-5, err_msg=f"rank {r}: {k}")


def test_two_node_run_is_written_by_rank_0_only(tmp_path):
    # each node gets its own out_dir, as two machines without a shared disk: rank 1 must leave its empty
    data = tmp_path / "data"
    settings = ["method=simclr", "backbone=resnet18", "img_size=32", "epochs=1", "batch_size=32", "device=cpu",
                "probe_epochs=20", "test_ps=[0.45,0.15]", f"data_dir={data}", "run_id=two-nodes",
                'data_kwargs={"n_train":128,"n_val":160,"size":32}']
    subprocess.run([sys.executable, "-c", "import sys; from sewer_ssl.experiment import config_from, parse_overrides; "
                    "from sewer_ssl.data import load_index; load_index(config_from(parse_overrides(sys.argv[1:])))",
                    *settings], cwd=ROOT, check=True, capture_output=True)   # the data exist before both nodes start
    nodes = two_nodes(["-m", "sewer_ssl.experiment", "--quiet", *settings], tmp_path, timeout_s=400,
                      node_args=lambda r: [f"out_dir={tmp_path / f'node{r}'}"])
    for r, n in enumerate(nodes): assert n.returncode == 0, f"node {r}:\n{n.stdout[-3000:]}"
    run = tmp_path / "node0" / "two-nodes"
    assert {"config.json", "metrics.json", "history.csv"} <= {p.name for p in run.iterdir()}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["rows"] and all(0 <= row["f1"] <= 1 for row in metrics["rows"])
    assert not (tmp_path / "node1").exists() or not any((tmp_path / "node1").rglob("*"))
    assert "run folder:" in nodes[0].stdout and "run folder:" not in nodes[1].stdout


def _step_worker(method_name: str, backbone: str, out: str):
    "One process of the two-node step: its loss and weights after the step, to compare with one process."
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    try:
        loss, state = one_step(method_name, backbone)
        r, world = dist.get_rank(), dist.get_world_size()
        np.savez(Path(out) / f"rank{r}.npz", __loss__=np.array(loss), **state)
        (Path(out) / f"rank{r}.json").write_text(json.dumps(dict(rank=r, world=world)))
    finally:
        if dist.is_initialized(): dist.destroy_process_group()


if __name__ == "__main__" and sys.argv[1:2] == ["step"]:
    _step_worker(*sys.argv[2:5])
