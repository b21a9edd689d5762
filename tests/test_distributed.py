"""Two gloo processes on CPU take exactly the optimisation step of one process holding the combined batch."""
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from sewer_ssl.augment import normalize
from sewer_ssl.config import ExperimentConfig
from sewer_ssl.distributed import free_port
from sewer_ssl.methods import build_method
from sewer_ssl.train import train

N, SIZE = 8, 32


class Images(torch.utils.data.Dataset):
    "A fixed set of random uint8 images with alternating labels."
    def __init__(self):
        self.x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (N, 3, SIZE, SIZE), dtype=np.uint8))

    def __len__(self): return N

    def __getitem__(self, i): return self.x[i], float(i % 2)


def two_views(x):
    "Deterministic views, so that only the splitting of the batch differs between the runs."
    norm = normalize()
    return [norm(x), norm(x.flip(-1))]


def one_step(method_name: str, backbone: str):
    cfg = ExperimentConfig(method=method_name, backbone=backbone, img_size=SIZE, epochs=1, batch_size=N,
                           device="cpu", lr=0.5, method_kwargs=dict(proj_hidden=64, proj_dim=32),
                           precision="fp32")  # the split of the batch is compared, not bf16's rounding
    torch.manual_seed(0)
    method = build_method(cfg, pos_weight=1.0)
    hist = train(method, Images(), cfg, progress=False, augment=two_views)
    return float(hist.loss.iloc[0]), {k: v.detach().numpy().copy() for k, v in method.state_dict().items()}


def _worker(rank, port, method_name, backbone, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        loss, state = one_step(method_name, backbone)
        queue.put((rank, loss, state))
    finally:
        import torch.distributed as dist
        if dist.is_initialized(): dist.destroy_process_group()


@pytest.mark.parametrize("method_name, backbone", [("simclr", "resnet18"), ("barlow", "resnet18")])
def test_two_processes_equal_one_process_with_the_combined_batch(method_name, backbone):
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, method_name, backbone, queue)) for r in range(2)]
    for p in procs: p.start()
    results = sorted([queue.get(timeout=300) for _ in procs], key=lambda t: t[0])
    for p in procs: p.join(timeout=60)
    loss_1, state_1 = one_step(method_name, backbone)
    (_, loss_a, state_a), (_, loss_b, state_b) = results
    assert loss_a == pytest.approx(loss_1, rel=1e-5) and loss_b == pytest.approx(loss_1, rel=1e-5)
    moved = 0
    for k, ref in state_1.items():
        for got in (state_a[k], state_b[k]):
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5, err_msg=k)
    # the step really changed the weights (so the comparison is not of two untouched models)
    torch.manual_seed(0)
    init = build_method(ExperimentConfig(method=method_name, backbone=backbone, img_size=SIZE, device="cpu",
                                         method_kwargs=dict(proj_hidden=64, proj_dim=32))).state_dict()
    moved = sum(not np.allclose(init[k].numpy(), v) for k, v in state_1.items() if v.dtype.kind == "f")
    assert moved > 10
