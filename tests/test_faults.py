"""Fault injection: a run folder describes one run, damaged files are named, settings arrive as a user types them.
Run alone with `pytest -m faults`."""
import json

import pytest

from sewer_ssl.config import ConfigError, ExperimentConfig
from sewer_ssl.experiment import run_experiment
from sewer_ssl.train import TrainingError

pytestmark = pytest.mark.faults


def _cfg(tmp_path, **kw):
    return ExperimentConfig(**{**dict(method="simclr", img_size=16, epochs=1, batch_size=32, device="cpu",
                                      data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "runs"), run_id="r",
                                      test_ps=(0.15,), probe_epochs=20, data_kwargs=dict(n_train=160, n_val=240, size=16),
                                      method_kwargs=dict(proj_hidden=32, proj_dim=16)), **kw})


def test_a_run_folder_keeps_describing_its_own_run(tmp_path):
    first = run_experiment(_cfg(tmp_path), progress=False)
    run = first["run_dir"]
    assert first["summary"]["action"] == "trained"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.suffix in (".json", ".csv")}
    with pytest.raises(ConfigError, match=r"epochs: 1 there, 2 now.*another run_id, or set overwrite=True"):
        run_experiment(_cfg(tmp_path, epochs=2), progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.suffix in (".json", ".csv")} == before   # untouched
    again = run_experiment(_cfg(tmp_path, test_ps=(0.15, 0.05)), progress=False)   # evaluation-only change
    assert again["summary"]["action"] == "re-evaluated"
    assert again["summary"]["train_seconds"] == first["summary"]["train_seconds"]     # the recorded time is kept
    fresh = run_experiment(_cfg(tmp_path, epochs=2, overwrite=True), progress=False)
    assert fresh["summary"]["action"] == "trained"
    assert json.loads((run / "config.json").read_text())["epochs"] == 2


def test_a_damaged_checkpoint_is_named_with_the_fix(tmp_path):
    cfg = _cfg(tmp_path)
    run = cfg.run_dir
    run.mkdir(parents=True)
    (run / "config.json").write_text(cfg.replace(data_dir=str((tmp_path / "data").resolve())).to_json())
    for content in (b"", b"PK\x03\x04 truncated"):
        (run / "checkpoint.pt").write_bytes(content)
        with pytest.raises(TrainingError, match=r"checkpoint.pt is damaged.*delete it"):
            run_experiment(cfg, progress=False)
        assert (run / "checkpoint.pt").read_bytes() == content        # nothing is deleted behind the user's back


def test_a_damaged_config_is_named(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json is damaged"):
        run_experiment(cfg, progress=False)


@pytest.mark.parametrize("typed, parsed", [("[0.45, 0.01]", (0.45, 0.01)), ("0.45,0.01", (0.45, 0.01)), (0.05, (0.05,)),
                                           ([0.15], (0.15,))])
def test_list_settings_arrive_as_typed(typed, parsed):
    assert ExperimentConfig(test_ps=typed).test_ps == parsed


@pytest.mark.parametrize("bad, message", [
    (dict(test_ps="[0.45"), "write it as"), (dict(test_ps="a,b"), "write it as"), (dict(seed="42"), "seed must be"),
    (dict(batch_size=1), "at least 2"), (dict(run_id="../elsewhere"), "plain folder name"),
    (dict(data_kwargs="{n_train: 4"), "not a dict"), (dict(overwrite="yes"), "true or false")])
def test_bad_settings_name_the_setting_and_the_fix(bad, message):
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig(**bad)


def test_the_grid_reruns_a_cell_whose_metrics_are_damaged(tmp_path):
    from sewer_ssl.grid import build_cells, cell_state
    cell = build_cells("pilot", outputs=str(tmp_path))[0]
    cell.run_dir.mkdir(parents=True)
    (cell.run_dir / "config.json").write_text(cell.config().to_json())
    for damaged in ("", '{"rows": [', '{"rows": []}'):
        (cell.run_dir / "metrics.json").write_text(damaged)
        state, detail = cell_state(cell)
        assert state == "corrupt" and "runs again" in detail
    (cell.run_dir / "metrics.json").write_text(json.dumps({"rows": [{"f1": 0.5}]}))
    assert cell_state(cell)[0] == "done"


def test_the_image_cache_follows_the_images_not_only_the_csv(tmp_path):
    import os
    import numpy as np
    from PIL import Image
    from sewer_ssl.data import ImageCache, load_index, write_demo_folder
    write_demo_folder(tmp_path / "imgs", n=12, size=16, seed=0, csv_name="labels.csv")
    cfg = ExperimentConfig(dataset="folder", data_dir=str(tmp_path / "imgs"))
    index = load_index(cfg)
    first = ImageCache.for_index(index, 16, cache_dir=tmp_path / "cache")
    names = list(first.filenames)
    first.ensure(names, workers=1, progress=False)
    old = first.images[first.rows(names)].copy()
    for n in names:   # the case: every image overwritten with a black one, CSVs untouched
        p = index.image_dir / n
        st = os.stat(p)
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(p)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    second = ImageCache.for_index(load_index(cfg), 16, cache_dir=tmp_path / "cache")
    assert second.dir != first.dir
    second.ensure(names, workers=1, progress=False)
    assert old.any() and not second.images[second.rows(names)].any()


def test_a_dark_16_bit_image_keeps_its_scale():
    import numpy as np
    from PIL import Image
    from sewer_ssl.data import _to_rgb
    dark = Image.fromarray(np.full((4, 4), 200, np.uint16))          # 200 of 65535: almost black
    bright = Image.fromarray(np.full((4, 4), 51400, np.uint16))
    assert np.asarray(_to_rgb(dark)).max() == 0 and np.asarray(_to_rgb(bright)).min() == 200


def test_workers_end_when_their_parent_is_killed(tmp_path):
    """kill -9 of a process that holds a pool (the grid, or a cache build): its workers do not live on."""
    import os, signal, subprocess, sys, time
    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from sewer_ssl.data import die_with_parent\n"
        "if __name__ == '__main__':\n"
        "    with ProcessPoolExecutor(2, initializer=die_with_parent) as pool:\n"
        "        futs = [pool.submit(time.sleep, 60) for _ in range(2)]\n"
        "        time.sleep(1)\n"
        "        print(' '.join(str(p) for p in pool._processes), flush=True)\n"
        "        time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in parent.stdout.readline().split()]
    assert len(workers) == 2
    os.kill(parent.pid, signal.SIGKILL); parent.wait()
    deadline = time.time() + 10
    alive = lambda pid: os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    while time.time() < deadline and any(alive(p) for p in workers): time.sleep(0.2)
    assert not any(alive(p) for p in workers), "a worker outlived its killed parent"


def test_a_terminated_worker_takes_its_children_along(tmp_path):
    """SIGTERM to a grid worker also ends what it started (the papermill kernel), instead of orphaning it."""
    import os, signal, subprocess, sys, time
    script = tmp_path / "worker.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "from sewer_ssl.data import die_with_parent\n"
        "die_with_parent()\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n")
    worker = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(worker.stdout.readline())
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 128 + signal.SIGTERM
    deadline = time.time() + 10
    alive = lambda pid: os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    while time.time() < deadline and alive(child): time.sleep(0.2)
    assert not alive(child)


@pytest.mark.parametrize("change, message", [
    (dict(backbone="vit_tiny", img_size=20), "not a multiple of the ViT's 8 px patches; choose 16 or 24"),
    (dict(out_dir="/proc/not-writable"), "out_dir /proc/not-writable is not writable")])
def test_settings_that_cannot_work_fail_before_the_cache_is_built(tmp_path, change, message, monkeypatch):
    import sewer_ssl.experiment as experiment
    def no_cache(*a, **k): raise AssertionError("the image cache was built before the settings were checked")
    monkeypatch.setattr(experiment.ImageCache, "for_index", no_cache)
    cfg = _cfg(tmp_path, **change)
    with pytest.raises(ConfigError, match=message):
        run_experiment(cfg, progress=False)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_an_image_size_beyond_reason_is_refused():
    with pytest.raises(ConfigError, match="at most 1024"):
        ExperimentConfig(img_size=4096)


def test_sigterm_during_the_cache_build_says_what_is_kept_and_a_rerun_continues(tmp_path):
    import os, signal, subprocess, sys, time
    from sewer_ssl.data import write_demo_folder
    write_demo_folder(tmp_path / "imgs", n=4000, size=64, seed=0, csv_name="labels.csv")
    script = tmp_path / "build.py"
    script.write_text(
        "import sys\n"
        "from sewer_ssl.config import ExperimentConfig\n"
        "from sewer_ssl.data import ImageCache, load_index\n"
        "index = load_index(ExperimentConfig(dataset='folder', data_dir=sys.argv[1]))\n"
        "cache = ImageCache.for_index(index, 64, cache_dir=sys.argv[2])\n"
        "print('ready', flush=True)\n"
        "print(cache.ensure(list(cache.filenames), workers=2, progress=False), flush=True)\n")
    args = [sys.executable, str(script), str(tmp_path / "imgs"), str(tmp_path / "cache")]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    deadline = time.time() + 60   # signal once decoding has begun (the handler is in place by then)
    while time.time() < deadline and not any(f.read_bytes().count(1) for f in (tmp_path / "cache").glob("*/filled.u8")):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "SIGTERM while building the image cache" in err and "run the same command again" in err
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert 0 < int(again.stdout.split()[-1]) < 4000          # only what the first build had not decoded


def test_a_damaged_cache_is_named_with_the_fix(tmp_path):
    from sewer_ssl.data import DataError, ImageCache
    cache = ImageCache(tmp_path, ["a.png"], 8, cache_dir=tmp_path / "cache")
    (cache.dir / "meta.json").write_text("{trunc")
    with pytest.raises(DataError, match=r"damaged meta.json; delete that folder"):
        ImageCache(tmp_path, ["a.png"], 8, cache_dir=tmp_path / "cache")
