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


def _reader(path: str):
    "`module.name[.attr]` inside sewer_ssl -> the object."
    import importlib
    module, *names = path.split(".")
    obj = importlib.import_module(f"sewer_ssl.{module}")
    for n in names: obj = getattr(obj, n)
    return obj


def test_every_method_setting_is_read_by_someone():
    """Each setting a method declares reaches its constructor as a keyword without a default, or the reader
    its declaration names (whose code reads it by name); the constructor takes nothing undeclared."""
    import inspect
    from sewer_ssl.config import METHOD_DEFAULTS
    from sewer_ssl.methods import METHOD_REGISTRY
    assert set(METHOD_DEFAULTS) == set(METHOD_REGISTRY)
    for m, d in METHOD_DEFAULTS.items():
        params = inspect.signature(METHOD_REGISTRY[m].__init__).parameters
        keywords = {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY}
        assert keywords == set(d.extra) - set(d.read_by), (m, sorted(keywords ^ (set(d.extra) - set(d.read_by))))
        assert all(params[k].default is inspect.Parameter.empty for k in keywords), m   # values live in `extra` only
        for setting, reader in d.read_by.items():
            assert f'"{setting}"' in inspect.getsource(_reader(reader)), (m, setting, reader)


def test_a_method_class_that_disagrees_with_its_declaration_is_not_registered():
    from sewer_ssl.config import MethodDefaults
    from sewer_ssl.methods import METHOD_REGISTRY, Method, register_method

    class Declared(Method):
        defaults = MethodDefaults("adamw", 1e-3, 0.0, 1e-4, extra=dict(width=8))
        def __init__(self, backbone, feat_dim, pos_weight=1.0, *, width=8): super().__init__(backbone, feat_dim)

    with pytest.raises(TypeError, match=r"\['width'\] have defaults"):
        register_method("declared")(Declared)

    class Undeclared(Method):
        defaults = MethodDefaults("adamw", 1e-3, 0.0, 1e-4, extra=dict(width=8))
        def __init__(self, backbone, feat_dim, pos_weight=1.0, *, width, depth): super().__init__(backbone, feat_dim)

    with pytest.raises(TypeError, match=r"takes \['depth', 'width'\], but its defaults declare \['width'\]"):
        register_method("undeclared")(Undeclared)
    assert "declared" not in METHOD_REGISTRY and "undeclared" not in METHOD_REGISTRY


def test_constructors_take_no_stray_keywords():
    """Without a catch-all `**kwargs`, a setting the constructor does not know fails instead of vanishing."""
    from sewer_ssl.backbones import create_backbone
    from sewer_ssl.methods import SimCLR
    backbone, dim = create_backbone("resnet18", 16)
    with pytest.raises(TypeError, match="tau"):
        SimCLR(backbone, dim, **SimCLR.defaults.extra, tau=0.1)


def test_each_default_value_is_written_once():
    """The methods' own settings are written in their declarations only: no signature in the library repeats
    one of them as a default (e.g. a temperature of 0.2 or an EMA start of 0.996 in a loss or a helper)."""
    import inspect
    from sewer_ssl import backbones, losses, methods
    from sewer_ssl.config import METHOD_DEFAULTS
    names = {k for d in METHOD_DEFAULTS.values() for k in d.extra} | {"base", "end", "hidden", "dim", "depth", "heads",
                                                                      "scale", "mask_ratio"}
    for module in (methods, losses, backbones):
        for fname, f in inspect.getmembers(module, lambda o: inspect.isfunction(o) or inspect.isclass(o)):
            if getattr(f, "__module__", None) != module.__name__: continue
            init = f.__init__ if inspect.isclass(f) else f
            try: params = inspect.signature(init).parameters
            except (TypeError, ValueError): continue
            repeated = [k for k, p in params.items() if k in names and p.default is not inspect.Parameter.empty]
            assert not repeated, f"{module.__name__}.{fname} repeats the default of {repeated}"


def test_the_supervised_betas_reach_the_optimiser():
    from sewer_ssl.train import build_optimizer
    cfg = ExperimentConfig(method="supervised", img_size=16, device="cpu", method_kwargs={"betas": [0.8, 0.95]})
    opt = build_optimizer(build_method(cfg), cfg)
    assert all(tuple(g["betas"]) == (0.8, 0.95) for g in opt.param_groups)
    default = ExperimentConfig(method="supervised", img_size=16, device="cpu")
    assert all(tuple(g["betas"]) == (0.9, 0.999) for g in build_optimizer(build_method(default), default).param_groups)


@pytest.mark.parametrize("method, setting", [("simclr", "tau"),            # nobody's
                                             ("simclr", "ema_start"),      # BYOL's and DINO's, unused by SimCLR
                                             ("supervised", "temperature")])
def test_an_unknown_or_unused_method_setting_is_refused(method, setting):
    """Refused when the config is made, naming the setting, the method and the settings it accepts."""
    from sewer_ssl.config import METHOD_DEFAULTS, ConfigError
    with pytest.raises(ConfigError, match=rf"method_kwargs \['{setting}'\] are not settings of '{method}'") as err:
        ExperimentConfig(method=method, method_kwargs={setting: 0.1})
    assert f"'{method}' accepts: {', '.join(sorted(METHOD_DEFAULTS[method].extra))}" in str(err.value)
