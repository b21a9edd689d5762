"""Every trained configuration of the paper (5 methods + supervised; MAE on ViT-Tiny only) runs end to end."""
import math

import pytest
import torch

from sewer_ssl.config import BACKBONE_ONLY, BACKBONES, METHODS, ExperimentConfig
from sewer_ssl.experiment import run_experiment
from sewer_ssl.methods import build_method

COMBOS = [(m, b) for m in METHODS for b in BACKBONES if b in BACKBONE_ONLY.get(m, BACKBONES)]
SMALL = {"simclr": dict(proj_hidden=256), "byol": dict(proj_hidden=256, pred_hidden=256),
         "barlow": dict(proj_hidden=256), "dino": dict(head_hidden=256, prototypes=1024),
         "mae": dict(decoder_depth=2), "supervised": {}}


def test_the_grid_has_eleven_configurations():
    assert len(COMBOS) == 11 and ("mae", "resnet18") not in COMBOS


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("method, backbone", COMBOS)
def test_each_configuration_trains_and_evaluates(method, backbone, data_dir, tmp_path):
    cfg = ExperimentConfig(method=method, backbone=backbone, img_size=32, epochs=2, batch_size=32, device="cpu",
                           data_dir=data_dir, out_dir=str(tmp_path), test_ps=(0.15,), probe_epochs=50,
                           data_kwargs=dict(n_train=300, n_val=600, size=32), method_kwargs=SMALL[method])
    res = run_experiment(cfg, progress=False)
    h = res["history"]
    assert len(h) > 0 and all(math.isfinite(x) for x in h.loss)
    assert h.feat_std.iloc[-1] > 0.005, "features collapsed to one point"
    if method in ("byol", "dino"):
        assert h.tau.iloc[-1] > h.tau.iloc[0] >= 0.996  # EMA momentum rises along its schedule
    assert (res["run_dir"] / "metrics.json").is_file() and len(res["metrics"]) >= 1


def test_dino_trains_with_local_crops():
    """Multi-crop: 2 global views at img_size and 2 local ones at local_size, one backbone pass per size."""
    import numpy as np
    import torch
    from sewer_ssl.augment import CachedImages, device_views_for
    from sewer_ssl.methods import build_method
    from sewer_ssl.train import train
    cfg = ExperimentConfig(method="dino", img_size=32, epochs=1, batch_size=8, device="cpu",
                           method_kwargs=dict(SMALL["dino"], n_local_crops=2, local_size=16))
    augment = device_views_for(cfg, n_views=2)
    views = augment(torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8))
    assert [v.shape[-1] for v in views] == [32, 32, 16, 16]
    imgs = np.random.default_rng(0).integers(0, 256, (16, 40, 40, 3), dtype=np.uint8)
    torch.manual_seed(0)
    method = build_method(cfg)
    h = train(method, CachedImages(imgs, range(16), [0, 1] * 8), cfg, progress=False, augment=augment)
    assert len(h) == 2 and all(math.isfinite(x) for x in h.loss)
    # with 4 crops, each of the 2 teacher crops is compared with the 3 other student crops
    out = method(views, torch.zeros(3))
    assert math.isfinite(float(out["loss"].detach()))


def test_channels_last_step_matches_the_default_layout():
    """`train` runs convolutional backbones in channels_last on CPU (`memory_format_for`): one LARS step
    of SimCLR on ResNet-18 gives the same loss and the same updated weights as the default layout."""
    from sewer_ssl.train import build_optimizer, optimisation_step
    cfg = ExperimentConfig(method="simclr", backbone="resnet18", img_size=16, batch_size=8,
                           method_kwargs={"proj_hidden": 64, "proj_dim": 32})
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)]
    labels = torch.tensor([0., 1.] * 4)
    out = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        m = build_method(cfg).train().to(memory_format=fmt)
        opt = build_optimizer(m, cfg)
        m.on_step_start(0, 1, 1)
        res, _ = optimisation_step(m, opt, [v.contiguous(memory_format=fmt) for v in views], labels)
        out[fmt] = (float(res["loss"]), {k: v.detach().clone() for k, v in m.state_dict().items()})
    (l0, w0), (l1, w1) = out.values()
    assert l0 == pytest.approx(l1, rel=1e-5)
    for k in w0: torch.testing.assert_close(w1[k].contiguous(), w0[k].contiguous(), rtol=1e-4, atol=1e-5, msg=k)


# settings of METHOD_DEFAULTS read outside the method's constructor, and by whom
_READ_ELSEWHERE = {"betas": "train.build_optimizer", "n_local_crops": "augment.device_views_for",
                   "local_size": "augment.device_views_for", "local_min_scale": "augment.device_views_for"}


def test_every_method_setting_is_read_by_someone():
    """A setting in METHOD_DEFAULTS reaches the method's constructor or a named reader; none does nothing."""
    import inspect
    from sewer_ssl.config import METHOD_DEFAULTS
    from sewer_ssl.methods import METHOD_REGISTRY
    for m, d in METHOD_DEFAULTS.items():
        params = set(inspect.signature(METHOD_REGISTRY[m].__init__).parameters)
        assert set(d.extra) - params <= set(_READ_ELSEWHERE), (m, sorted(set(d.extra) - params))


def test_the_supervised_betas_reach_the_optimiser():
    from sewer_ssl.train import build_optimizer
    cfg = ExperimentConfig(method="supervised", img_size=16, device="cpu", method_kwargs={"betas": [0.8, 0.95]})
    opt = build_optimizer(build_method(cfg), cfg)
    assert all(tuple(g["betas"]) == (0.8, 0.95) for g in opt.param_groups)
    default = ExperimentConfig(method="supervised", img_size=16, device="cpu")
    assert all(tuple(g["betas"]) == (0.9, 0.999) for g in build_optimizer(build_method(default), default).param_groups)


def test_an_unknown_method_setting_is_refused():
    from sewer_ssl.config import ConfigError
    with pytest.raises(ConfigError, match=r"method_kwargs \['tau'\] are not settings of 'simclr'"):
        ExperimentConfig(method="simclr", method_kwargs={"tau": 0.1})
