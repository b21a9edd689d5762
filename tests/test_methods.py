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


# --- the fast step computes what the reference step computes ---------------------------------------------------

def _naive_ema(teacher, student, tau):
    "The textbook EMA, one parameter at a time."
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters()): t.copy_(tau * t + (1 - tau) * s)


def _naive_clip(params, clip):
    "DINO's per-parameter clipping as the authors write it, one parameter at a time."
    for p in params:
        if p.grad is not None: p.grad.mul_((clip / (p.grad.norm() + 1e-6)).clamp(max=1.0))


def test_multi_tensor_lars_matches_timm_lars_step_for_step():
    from timm.optim import Lars
    from sewer_ssl.train import MultiTensorLars
    torch.manual_seed(0)
    shapes = [(16, 8), (8,), (4, 4, 3, 3), (4,), (3, 5)]
    ref = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref[4].data.zero_()                                       # a zero weight: trust ratio 1, as timm
    new = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    groups = lambda ps: [{"params": [ps[0], ps[2], ps[4]], "weight_decay": 1e-4}, {"params": [ps[1], ps[3]], "weight_decay": 0.0}]
    a = Lars(groups(ref), lr=0.3, momentum=0.9, trust_coeff=0.001)
    b = MultiTensorLars(groups(new), lr=0.3, momentum=0.9, trust_coeff=0.001)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        for o in (a, b): o.param_groups[0]["lr"] = o.param_groups[1]["lr"] = 0.3 * (step + 1) / 6
        grads = [torch.randn(s, generator=g) for s in shapes]
        grads[1].zero_()                                      # a zero gradient: trust ratio 1
        for ps in (ref, new):
            for i, p in enumerate(ps): p.grad = None if (step == 2 and i == 3) else grads[i].clone()
        a.step(); b.step()
        for p, q in zip(ref, new): torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    for p, q in zip(ref, new):
        torch.testing.assert_close(b.state[q]["momentum_buffer"], a.state[p]["momentum_buffer"], rtol=1e-6, atol=1e-7)
    b.load_state_dict(a.state_dict())                        # a timm checkpoint resumes in the multi-tensor form
    assert set(b.state_dict()["param_groups"][0]) >= set(a.state_dict()["param_groups"][0]) - {"foreach"}


def test_ema_update_equals_the_textbook_update():
    from sewer_ssl.methods import ema_update
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    ref = torch.nn.Linear(6, 3); ref.load_state_dict(teacher.state_dict())
    for tau in (0.996, 0.9, 0.5):
        with torch.no_grad():
            for p in student.parameters(): p.add_(torch.randn_like(p))
        ema_update(teacher, student, tau); _naive_ema(ref, student, tau)
        for p, q in zip(teacher.parameters(), ref.parameters()): torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_clip_per_parameter_equals_the_loop():
    from sewer_ssl.methods import clip_per_parameter
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 4)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(3))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for p, q, scale in zip(ps, qs, (0.01, 10.0, 0.5, 3.0)):
        p.grad = torch.randn(p.shape) * scale; q.grad = p.grad.clone()
    qs[3].grad = ps[3].grad = None
    clip_per_parameter(ps, 1.0); _naive_clip(qs, 1.0)
    for p, q in zip(ps, qs[:3]): torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    assert any(float(q.grad.norm()) < 1.0 - 1e-3 for q in qs[:3]) and all(float(p.grad.norm()) <= 1 + 1e-5 for p in ps[:3])


def test_fused_adamw_matches_the_default_adamw():
    "What `build_optimizer` asks for on CUDA (fused AdamW), checked where PyTorch also has it: the CPU."
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(5))]
    new = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    a = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.05)
    b = torch.optim.AdamW(new, lr=1e-2, weight_decay=0.05, fused=True)
    for _ in range(5):
        grads = [torch.randn(p.shape) for p in ref]
        for p, q, gr in zip(ref, new, grads): p.grad, q.grad = gr.clone(), gr.clone()
        a.step(); b.step()
    for p, q in zip(ref, new): torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, backbone", [(m, "vit_tiny" if m == "mae" else "resnet18") for m in METHODS])
def test_the_fast_step_trains_every_method_as_the_reference_step(method, backbone, monkeypatch):
    """Two steps of `optimisation_step` with the views, probe and hooks of a run: the multi-tensor optimiser,
    EMA and clipping against timm's per-parameter LARS and the textbook EMA and clipping; same losses, same weights."""
    import sewer_ssl.methods as M
    from sewer_ssl.augment import device_views_for
    from sewer_ssl.train import build_optimizer, optimisation_step
    cfg = ExperimentConfig(method=method, backbone=backbone, img_size=32, batch_size=8, epochs=1,
                           method_kwargs={**SMALL[method], **({"decoder_depth": 1} if method == "mae" else {})})
    u8 = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    labels = (torch.arange(8) % 3 == 0).float()
    runs = []
    for reference in (True, False):
        with monkeypatch.context() as mp:
            if reference:
                mp.setattr(M, "ema_update", _naive_ema); mp.setattr(M, "clip_per_parameter", _naive_clip)
            torch.manual_seed(0)
            model = build_method(cfg).train()
            init = {k: v.detach().clone() for k, v in model.state_dict().items()}
            opt = build_optimizer(model, cfg, multi_tensor=not reference)
            probe_opt = torch.optim.AdamW(model.online_probe.parameters(), lr=1e-3, weight_decay=0.0)
            views_of = device_views_for(cfg, model.n_views)
            losses = []
            for step in range(2):
                torch.manual_seed(step)
                for g in opt.param_groups: g["lr"] = cfg.peak_lr   # the schedule's first steps would be ~0
                model.on_step_start(step, 1, 2)
                out, _ = optimisation_step(model, opt, views_of(u8), labels, probe_opt, dtype=None)
                losses.append(float(out["loss"]))
            runs.append((losses, {k: v.detach().clone() for k, v in model.state_dict().items()}))
            first_init = init if reference else first_init
    (l_ref, w_ref), (l_new, w_new) = runs
    init = first_init
    assert l_new == pytest.approx(l_ref, rel=1e-4, abs=1e-5)
    for k in w_ref:
        torch.testing.assert_close(w_new[k], w_ref[k], rtol=1e-3, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    moved = [k for k in w_ref if w_ref[k].is_floating_point() and not torch.allclose(w_ref[k], init[k])]
    assert len(moved) > len(w_ref) // 3, "the steps must move the weights for the comparison to mean anything"
    if method in ("byol", "dino"):   # the teacher moved by EMA, by the same amount in both
        assert any(k.startswith("teacher.") for k in moved)


_GROUP_SIGTERM = """
import os, signal, sys, threading, time
import numpy as np, torch
from sewer_ssl.augment import CachedImages, device_views_for
from sewer_ssl.config import ExperimentConfig
from sewer_ssl.methods import build_method
from sewer_ssl.train import TrainingInterrupted, train
torch.set_num_threads(1)

class Slow(CachedImages):
    def __getitem__(self, i):
        time.sleep(0.02); return super().__getitem__(i)

images = np.random.default_rng(0).integers(0, 256, (48, 16, 16, 3), dtype=np.uint8)
def run(epochs, run_dir):
    cfg = ExperimentConfig(method="simclr", backbone="resnet18", img_size=16, batch_size=8, epochs=epochs,
                           device="cpu", num_workers=2, method_kwargs=dict(proj_hidden=32, proj_dim=16))
    model = build_method(cfg)
    return train(model, Slow(images, np.arange(48), np.arange(48) % 5 == 0), cfg, run_dir=run_dir, progress=False,
                 log_every=1, augment=device_views_for(cfg, model.n_views))
run(1, None)                                   # a first training; its loader's workers shut down
print("second training", flush=True)
try:
    run(50, sys.argv[1]); print("not interrupted")
except TrainingInterrupted as e:
    print("interrupted:", e)
"""


def test_sigterm_to_the_process_group_stops_at_a_checkpoint_with_loader_workers(tmp_path):
    """A SIGTERM to the whole process group (a time limit, a scheduler) during the second training of a process,
    with loader workers: the run stops with a checkpoint, not with "DataLoader worker ... killed by signal"."""
    import os, signal, subprocess, sys, time
    p = subprocess.Popen([sys.executable, "-c", _GROUP_SIGTERM, str(tmp_path)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stdout.readline().startswith("second training")
        time.sleep(2)
        os.killpg(p.pid, signal.SIGTERM)   # from outside the group, as a time limit or scheduler sends it
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None: os.killpg(p.pid, signal.SIGKILL)
    assert "interrupted: SIGTERM" in out, (out[-1000:], err[-3000:])
    assert "killed by signal" not in err and (tmp_path / "checkpoint.pt").is_file()
