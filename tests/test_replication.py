"""The replication's fidelity fixes and controls: DINO's clipping, head and temperature, one backbone pass per
view, the generator over many seeds, BatchNorm recalibration, and the replication grid's cells."""
import numpy as np
import pytest
import torch

from sewer_ssl.backbones import create_backbone
from sewer_ssl.config import ExperimentConfig
from sewer_ssl.controls import StatisticsBaseline, image_statistics, recalibrate_batchnorm
from sewer_ssl.grid import GRIDS, STUDY_SEEDS, build_cells
from sewer_ssl.methods import build_method, clip_per_parameter
from sewer_ssl.synthetic import _render_chunk


def _small_dino():
    cfg = ExperimentConfig(method="dino", backbone="resnet18", img_size=32, epochs=45, batch_size=8,
                           method_kwargs=dict(head_hidden=64, bottleneck=16, prototypes=32))
    torch.manual_seed(0)
    return build_method(cfg)


def test_dino_clips_each_backbone_gradient_by_its_own_norm_and_leaves_the_head():
    m = _small_dino()
    for p in m.parameters(): p.grad = None
    conv, bn_w = m.backbone.conv1.weight, m.backbone.bn1.weight
    head_w = m.head.mlp[0].weight
    conv.grad = torch.full_like(conv, 3.0 / conv.numel() ** 0.5)       # norm 3 -> scaled to norm 1
    bn_w.grad = torch.full_like(bn_w, 0.5 / bn_w.numel() ** 0.5)       # norm 0.5 -> unchanged
    head_w.grad = torch.full_like(head_w, 5.0 / head_w.numel() ** 0.5)  # the head is never clipped
    before_bn = bn_w.grad.clone()
    m.on_step_start(step=100, steps_per_epoch=10, total_steps=450)     # past the frozen first epoch
    m.on_before_optimizer_step()
    assert abs(conv.grad.norm().item() - 3 / (3 + 1e-6)) < 1e-5
    assert torch.equal(bn_w.grad, before_bn)
    assert abs(head_w.grad.norm().item() - 5.0) < 1e-4
    # per parameter, not jointly: clip_grad_norm_ would have scaled bn_w's gradient too
    g = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))]
    g[0].grad, g[1].grad = torch.tensor([3.0, 0, 0, 0]), torch.tensor([0.5, 0, 0, 0])
    clip_per_parameter(g, 1.0)
    assert torch.allclose(g[0].grad, torch.tensor([1.0, 0, 0, 0]), atol=1e-5) and g[1].grad[0] == 0.5


def test_dino_head_is_relu_with_truncated_normal_init_and_the_temperature_rises_per_epoch():
    m = _small_dino()
    acts = [type(x).__name__ for x in m.head.mlp]
    assert "ReLU" in acts and "GELU" not in acts
    lin = [x for x in m.head.mlp if isinstance(x, torch.nn.Linear)]
    assert all(torch.all(l.bias == 0) for l in lin)
    # trunc_normal_(std=0.02) as the authors: cut at +-2 in absolute units, so in effect a plain N(0, 0.02)
    assert abs(lin[0].weight.std().item() - 0.02) < 0.004
    temps = []
    for step in (0, 9, 10, 25, 149, 150, 449):                                # 10 steps per epoch, 45 epochs
        m.on_step_start(step, 10, 450)
        temps.append(m.teacher_temp())
    warm = np.linspace(0.04, 0.07, 15)
    assert temps[:2] == [0.04, 0.04]                                          # constant within an epoch
    assert np.isclose(temps[2], warm[1]) and np.isclose(temps[3], warm[2]) and np.isclose(temps[4], warm[14])
    assert temps[5] == temps[6] == 0.07


@pytest.mark.parametrize("method", ["simclr", "byol", "barlow", "dino"])
def test_each_view_passes_the_backbone_on_its_own(method):
    cfg = ExperimentConfig(method=method, backbone="resnet18", img_size=32, epochs=1, batch_size=8,
                           method_kwargs=dict(proj_hidden=64) if method != "dino" else dict(head_hidden=64, prototypes=64))
    m = build_method(cfg)
    m.on_step_start(0, 1, 1)
    sizes = []
    hook = m.backbone.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[0]))
    views = [torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)]
    m(views, torch.zeros(6))
    hook.remove()
    assert sizes == [6, 6], sizes        # two passes of one view each, never one pass of 12


@pytest.mark.parametrize("size", [32, 64])
def test_the_generator_writes_valid_images_for_20_seeds(size, tmp_path):
    for seed in range(20):
        rows = _render_chunk((str(tmp_path), 1 + 40 * seed, [True, False] * 5, size, 0.0, 1.0, seed))
        assert len(rows) == 10
    from PIL import Image
    files = sorted(tmp_path.glob("*.png"))
    assert len(files) == 200
    for f in files[::7]:
        a = np.asarray(Image.open(f))
        assert a.shape == (size, size, 3) and a.dtype == np.uint8 and a.std() > 1


def test_a_connection_near_the_camera_no_longer_crashes_the_generator(tmp_path):
    # generate_dataset(seed=2, n_train=1000, n_val=1000, size=64) failed at image 1555 with
    # "ValueError: scale < 0": roots anchored on a branch-pipe hole got a negative depth
    from sewer_ssl.synthetic import _defect_flags
    flag = bool(_defect_flags(1000, 0.47, 2, 1)[1555 - 1001])
    rows = _render_chunk((str(tmp_path), 1555, [flag], 64, 0.0, 1.0, 2))
    assert len(rows) == 1 and (tmp_path / "00001555.png").is_file()


def test_recalibration_changes_batchnorm_statistics_and_nothing_else():
    torch.manual_seed(0)
    net, _ = create_backbone("resnet18", 32)
    imgs = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    recalibrate_batchnorm(net, imgs, np.arange(24), batch_size=12)
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    stats = {k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert changed and changed <= stats
    assert {k for k in stats if not k.endswith("num_batches_tracked")} <= changed


def test_statistics_baseline_scores_like_a_probe():
    g = np.random.default_rng(0)
    imgs = g.integers(40, 80, (200, 16, 16, 3), dtype=np.uint8)
    y = (np.arange(200) % 5 == 0).astype(int)
    imgs[y == 1] += 100                                  # defects are brighter
    s = image_statistics(imgs)
    assert s.shape == (200, 36)
    z = StatisticsBaseline().fit(s[:150], y[:150]).logits(s[150:])
    assert ((z > 0) == y[150:].astype(bool)).all()        # threshold 0, like the probes
    with pytest.raises(ValueError, match="both classes"):
        StatisticsBaseline().fit(s[:10], np.zeros(10))


def test_replication_grid_runs_its_priority_groups_first_and_filters_by_method():
    cells = build_cells("replication", outputs="/tmp/none")
    ids = [c.run_id for c in cells]
    assert len(ids) == len(set(ids)) == GRIDS["replication"].size
    first = cells[:3 * len(STUDY_SEEDS) * 2]              # JE vs MAE: 3 methods x 2 proportions x 3 seeds
    assert {c.coords["method"] for c in first} == {"simclr", "barlow", "mae"}
    assert {c.coords["backbone"] for c in first} == {"vit_tiny"} and {c.coords["seed"] for c in first} == set(STUDY_SEEDS)
    assert all(c.settings["epochs"] == cells[0].settings["epochs"] and c.settings["img_size"] == 32 for c in cells)
    only = build_cells("replication", outputs="/tmp/none", method=["byol"], seed=[42])
    assert {(c.coords["method"], c.coords["seed"]) for c in only} == {("byol", 42)}
    assert {c.coords["backbone"] for c in only} == {"resnet18", "vit_tiny"}
    assert build_cells("replication", outputs="/tmp/none", epochs=2)[0].settings["epochs"] == 2   # the command line wins


def test_a_local_grid_skips_a_cell_another_process_finished_or_started_meanwhile(tmp_path):
    import json, os, socket
    from sewer_ssl.grid import _run_local
    cells = build_cells("pilot", outputs=str(tmp_path))[:2]
    done, running = cells
    done.run_dir.mkdir(parents=True)
    (done.run_dir / "config.json").write_text(done.config().to_json())
    (done.run_dir / "metrics.json").write_text(json.dumps({"rows": [{"f1": 0.5}]}))
    running.run_dir.mkdir(parents=True)
    (running.run_dir / "cell_status.json").write_text(json.dumps(
        dict(status="running", host=socket.gethostname(), pid=os.getpid(), started="now")))
    seen, logs = {}, []
    _run_local(cells, None, 1, [], lambda c, r: seen.update({c.run_id: r["status"]}), logs.append)
    assert seen == {done.run_id: "done", running.run_id: "skipped"}      # no worker was started for either
    assert all(line.startswith("skip") for line in logs), logs


def _verdict_outputs():
    "The reproduction study's printed verdict lines and README table, its verdict CSV and the README's table."
    import json
    from pathlib import Path

    import pandas as pd
    from sewer_ssl.docs import FULL_BUDGET, STAMP_KEY
    root = Path(__file__).resolve().parents[1]
    nb = json.loads((root / "nbs" / "studies" / "reproduction.ipynb").read_text(encoding="utf-8"))
    assert nb["metadata"].get(STAMP_KEY, {}).get("executed") == FULL_BUDGET, \
        "the committed study must be executed at its full settings: python -m sewer_ssl.docs execute --full studies/reproduction.ipynb"
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code" and "README_HEADER" in "".join(c["source"]))
    printed = "".join("".join(o.get("text", "")) for o in cell["outputs"] if o.get("output_type") == "stream").splitlines()
    sentences = [l for l in printed if l.startswith("- **")]
    table = [l for l in printed if l.startswith("| ") and not l.startswith("| finding |")]
    readme = (root / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, l in enumerate(readme) if l.startswith("| finding | data | claim tested |"))
    readme_table = []
    for l in readme[start + 2:]:
        if not l.startswith("|"): break
        readme_table.append(l)
    csv = pd.read_csv(root / "outputs" / "results" / "replication_verdicts.csv", keep_default_na=False, na_values=[""])
    return sentences, table, readme_table, csv


def test_the_printed_verdicts_the_csv_and_the_readme_table_agree():
    sentences, table, readme_table, csv = _verdict_outputs()
    assert len(csv) == len(sentences) == len(table) > 0
    assert readme_table == table, "README.md's verdict table differs from the study's; paste the study's table into nbs/index.ipynb and run python -m sewer_ssl.docs readme"
    for row, line, sentence in zip(csv.itertuples(), table, sentences):
        cols = [c.strip() for c in line.strip("|").split(" | ")]
        finding, dataset, estimate, verdict_text = cols[0], cols[1], cols[4], cols[7]
        assert (finding, dataset) == (row.finding, row.dataset)
        why = row.why if isinstance(row.why, str) else ""
        assert verdict_text == row.verdict + (f" ({why})" if why else ""), (line, row)
        assert sentence.startswith(f"- **{row.finding}** ({row.dataset}): **{row.verdict}**"), (sentence, row)
        est, lo, hi = (float(x) for x in estimate.replace("[", "").replace("]", "").replace(",", "").split())
        assert np.allclose([est, lo, hi], [row.estimate, row.ci_low, row.ci_high], atol=6e-4), (line, row)
