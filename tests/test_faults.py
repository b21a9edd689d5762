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


@pytest.mark.parametrize("signame, said", [("SIGTERM", "SIGTERM while building the image cache"),
                                            ("SIGINT", "Ctrl-C while building the image cache")])
def test_a_stop_signal_during_the_cache_build_says_what_is_kept_and_a_rerun_continues(tmp_path, signame, said):
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
    p.send_signal(getattr(signal, signame))
    out, err = p.communicate(timeout=60)
    assert p.returncode != 0 and said in err and "run the same command again" in err
    assert not _processes_running(str(script))          # no decoder outlives the build
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert 0 < int(again.stdout.split()[-1]) < 4000          # only what the first build had not decoded


def test_a_damaged_cache_is_named_with_the_fix(tmp_path):
    from sewer_ssl.data import DataError, ImageCache
    cache = ImageCache(tmp_path, ["a.png"], 8, cache_dir=tmp_path / "cache")
    (cache.dir / "meta.json").write_text("{trunc")
    with pytest.raises(DataError, match=r"damaged meta.json; delete that folder"):
        ImageCache(tmp_path, ["a.png"], 8, cache_dir=tmp_path / "cache")


def _processes_running(marker: str) -> list[int]:
    "Pids whose command line mentions `marker` (decoder-pool workers carry their parent's script path)."
    import os, pathlib, time
    time.sleep(0.5)   # a terminated worker needs a moment to be reaped
    found = []
    for cmd in pathlib.Path("/proc").glob("[0-9]*/cmdline"):
        try: text = cmd.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError: continue
        if marker in text and int(cmd.parent.name) != os.getpid(): found.append(int(cmd.parent.name))
    return found


def test_a_first_ctrl_c_stops_training_at_the_next_step_with_a_checkpoint(tmp_path):
    import os, signal
    import numpy as np
    import torch
    from sewer_ssl.methods import build_method
    from sewer_ssl.train import TrainingInterrupted, train

    class Cached(torch.utils.data.Dataset):
        def __init__(self, interrupt_at=None):
            self.x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (64, 3, 16, 16), dtype=np.uint8))
            self.interrupt_at, self.seen = interrupt_at, 0
        def __len__(self): return len(self.x)
        def __getitem__(self, i):
            self.seen += 1
            if self.seen == self.interrupt_at: os.kill(os.getpid(), signal.SIGINT)
            return self.x[i], float(i % 2)

    def views(x):
        x = x.float() / 255
        return [(x + 0.1 * torch.randn_like(x) - 0.5) / 0.25 for _ in range(2)]

    cfg = ExperimentConfig(img_size=16, epochs=2, batch_size=16, device="cpu", method_kwargs=dict(proj_hidden=32, proj_dim=16))
    torch.manual_seed(cfg.seed)
    with pytest.raises(TrainingInterrupted, match=r"SIGINT at step \d+: checkpoint written.*run the same command again"):
        train(build_method(cfg), Cached(interrupt_at=20), cfg, tmp_path / "run", progress=False, log_every=1, augment=views)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler     # the handler is given back
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 0 and state["batch"] > 0
    resumed = train(build_method(cfg), Cached(), cfg, tmp_path / "run", progress=False, log_every=1, augment=views)
    assert resumed.epoch.max() == 1 and resumed.step.max() == 2 * (64 // 16) - 1


def test_leftovers_of_killed_writes_are_swept_and_live_ones_kept(tmp_path):
    import subprocess, sys
    from sewer_ssl.files import sweep_temporaries, temporary_sibling
    cfg = _cfg(tmp_path)
    run = cfg.run_dir
    run.mkdir(parents=True)
    # a checkpoint write killed by kill -9: a temporary sibling named for a process that no longer exists
    script = ("import sys; from sewer_ssl.files import temporary_sibling; p = temporary_sibling(sys.argv[1]); "
              "p.write_bytes(b'half a checkpoint'); print(p)")
    dead = subprocess.run([sys.executable, "-c", script, str(run / "checkpoint.pt")], capture_output=True, text=True,
                          check=True).stdout.strip()
    live = temporary_sibling(run / "history.csv"); live.write_text("being written")   # this process: alive
    assert sweep_temporaries(run) == [type(run)(dead)] and live.exists()
    live.unlink()
    subprocess.run([sys.executable, "-c", script, str(run / "checkpoint.pt")], check=True, capture_output=True)
    result = run_experiment(cfg, progress=False)                # a run sweeps its folder before writing
    assert result["summary"]["action"] == "trained"
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_a_test_proportion_the_test_pool_cannot_supply_names_test_ps(tmp_path):
    from sewer_ssl.data import DataError
    with pytest.raises(DataError, match=r"test_ps holds 0.001, which the test pool cannot supply.*train_p plays no part"):
        run_experiment(_cfg(tmp_path, test_ps=(0.15, 0.001)), progress=False)
    assert not (tmp_path / "runs" / "r").exists()               # refused before anything was written


def test_a_cell_whose_worker_on_another_host_went_silent_is_taken_over(tmp_path):
    import os, time
    from sewer_ssl.grid import STALE_AFTER_S, Cell, cell_state
    cell = Cell("g", {"method": "simclr"}, dict(method="simclr", epochs=1, run_id="c", out_dir=str(tmp_path / "runs")),
                str(tmp_path / "grids" / "g"))
    cell.run_dir.mkdir(parents=True)
    status = cell.run_dir / "cell_status.json"
    status.write_text(json.dumps(dict(status="running", host="node-elsewhere", pid=1, started="then")))
    assert cell_state(cell)[0] == "running"                     # heartbeat fresh: another host is working on it
    old = time.time() - STALE_AFTER_S - 60
    os.utime(status, (old, old))
    state, detail = cell_state(cell)
    assert state == "interrupted" and "no heartbeat" in detail and "node-elsewhere" in detail
