"""The named budgets: one table that the config, nbs/run.ipynb, the experiment command line and the grid read."""
import ast
import json
from pathlib import Path

import pytest

from sewer_ssl.config import BUDGETS, DEFAULT_BUDGET, ConfigError, ExperimentConfig

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("img_size", "epochs", "batch_size")


def _sizes(obj) -> dict:
    return {k: (obj[k] if isinstance(obj, dict) else getattr(obj, k)) for k in SIZES}


def test_every_budget_sets_the_same_sizes_and_is_valid():
    for name, budget in BUDGETS.items():
        assert set(budget) == set(SIZES), name
        assert _sizes(ExperimentConfig(budget=name)) == budget


def test_the_config_default_is_the_default_budget():
    cfg = ExperimentConfig()
    assert cfg.budget == DEFAULT_BUDGET == "cpu" and _sizes(cfg) == BUDGETS["cpu"]


def test_run_notebook_parameters_take_their_sizes_from_the_budget():
    """The parameters cell names the default budget and leaves the sizes to it (literal assignments only)."""
    nb = json.loads((ROOT / "nbs/run.ipynb").read_text())
    [cell] = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    values = {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse("".join(cell["source"])).body}
    assert values["budget"] == DEFAULT_BUDGET
    assert all(values[k] is None for k in SIZES), {k: values[k] for k in SIZES}


def test_the_grid_budgets_come_from_the_table():
    from sewer_ssl.grid import PAPER_BUDGET, STUDY_BUDGET, STUDY_EPOCHS, build_cells
    assert _sizes(PAPER_BUDGET) == BUDGETS["paper"]
    assert dict(STUDY_BUDGET, epochs=STUDY_EPOCHS).items() >= BUDGETS["study"].items()
    cells = build_cells("main", method=["simclr"], backbone=["resnet18"], train_p=[0.15])
    assert [c.settings["budget"] for c in cells] == ["paper"] and _sizes(cells[0].config()) == BUDGETS["paper"]
    cpu = build_cells("main", budget="cpu", method=["simclr"], backbone=["resnet18"], train_p=[0.15])
    assert _sizes(cpu[0].config()) == BUDGETS["cpu"] and cpu[0].run_id.endswith("-64px-s42")
    # a grid that fixes its own sizes keeps them under any budget
    assert {_sizes(c.config())["img_size"] for c in build_cells("replication", budget="paper")} == {32}


def test_the_grid_command_defaults_to_the_cpu_budget_without_a_gpu(monkeypatch, capsys, tmp_path):
    from sewer_ssl import grid
    monkeypatch.setattr(grid, "visible_gpus", lambda: [])
    args = ["run", "main", "--methods", "simclr", "--backbones", "resnet18", "--train-ps", "0.15", "--dry-run",
            "--outputs", str(tmp_path)]
    assert grid.main(args) == 0
    out, err = capsys.readouterr()
    assert "-64px-s42" in out and "224px" not in out and "--budget paper" in err
    assert grid.main([*args, "--budget", "paper"]) == 0
    assert "-224px-s42" in capsys.readouterr().out


def test_an_explicit_setting_beats_the_budget():
    from sewer_ssl.experiment import config_from, parse_overrides
    from sewer_ssl.grid import build_cells
    cfg = ExperimentConfig(budget="paper", epochs=3)
    assert (cfg.img_size, cfg.epochs, cfg.batch_size) == (224, 3, 256)
    # the command line types `budget=paper epochs=3 img_size=None` as a user does
    cli = config_from(parse_overrides(["budget=paper", "epochs=3", "img_size=None"]))
    assert (cli.img_size, cli.epochs, cli.batch_size) == (224, 3, 256)
    [cell] = build_cells("main", budget="paper", epochs=2, batch_size=16, img_size=[48], method=["simclr"],
                         backbone=["resnet18"], train_p=[0.15])
    assert _sizes(cell.config()) == dict(img_size=48, epochs=2, batch_size=16)
    # --set budget=... picks the budget as --budget does
    [cell] = build_cells("main", settings={"budget": "smoke"}, method=["simclr"], backbone=["resnet18"], train_p=[0.15])
    assert _sizes(cell.config()) == BUDGETS["smoke"]


def test_changing_the_budget_of_a_config_moves_only_what_the_old_budget_set():
    moved = ExperimentConfig(budget="cpu", img_size=96).replace(budget="paper")
    assert (moved.img_size, moved.epochs, moved.batch_size) == (96, 45, 256)
    assert ExperimentConfig().replace(budget="paper", epochs=5).epochs == 5


def test_the_budget_name_alone_does_not_make_a_run_differ():
    """A saved run is compared on the sizes, not on the name that set them."""
    saved = json.loads(ExperimentConfig(budget="cpu").to_json(resolved=False))
    same = ExperimentConfig(budget="paper", **BUDGETS["cpu"])
    assert same.differences(saved) == []
    assert ExperimentConfig(budget="paper").differences(saved) == [
        ("img_size", 64, 224), ("epochs", 12, 45), ("batch_size", 64, 256)]


def test_an_unknown_budget_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"unknown budget 'huge'; choose one of: smoke, study, cpu, gpu, paper"):
        ExperimentConfig(budget="huge")
    from sewer_ssl.grid import GridError, build_cells
    with pytest.raises(GridError, match="unknown budget 'huge'"):
        build_cells("main", budget="huge")
