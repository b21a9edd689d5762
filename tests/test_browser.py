"""The explorers in a live JupyterLab and the HTML docs site, in headless Chromium.

`pytest -m browser tests/test_browser.py`; needs Chromium and the playwright package
(`bash .ci/install_browser.sh` installs both). Playwright drives the system's Chromium: nothing is
downloaded, and the docs pages' remote scripts (MathJax, require.js) are blocked, not fetched.
"""
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed; run: bash .ci/install_browser.sh")

ROOT = Path(__file__).resolve().parents[1]


def _chromium() -> str | None:
    "The Chromium to drive: $SEWER_SSL_CHROMIUM, else the first one on PATH."
    if os.environ.get("SEWER_SSL_CHROMIUM"): return os.environ["SEWER_SSL_CHROMIUM"]
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chrome"))), None)


CHROMIUM = _chromium()
if CHROMIUM is None:
    pytest.skip("no Chromium on PATH (or $SEWER_SSL_CHROMIUM); run: bash .ci/install_browser.sh", allow_module_level=True)
if importlib.util.find_spec("jupyterlab") is None:
    pytest.skip("JupyterLab is not installed in this environment (pip install jupyterlab)", allow_module_level=True)


# ---------------------------------------------------------------------------------------------
# the browser, and what it reports


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        # --no-sandbox: Chromium's sandbox refuses to start as root, which CI is
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


class PageErrors:
    "JavaScript exceptions, console errors and failed requests of a page; `external` requests are ignored."
    def __init__(self, page, external=lambda url: False):
        self.errors, self.external = [], external
        page.on("pageerror", lambda e: self.errors.append(f"JavaScript error: {e}"))
        page.on("console", self._console)
        page.on("requestfailed", self._failed)

    def _console(self, msg):
        url = (msg.location or {}).get("url", "")
        if msg.type == "error" and not self.external(url):
            self.errors.append(f"console error: {msg.text} ({url or 'no location'})")

    def _failed(self, request):
        if not self.external(request.url):
            self.errors.append(f"request failed: {request.url} ({request.failure})")


# ---------------------------------------------------------------------------------------------
# JupyterLab, headless, for the length of this module

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, token: str, path: str, method: str = "GET"):
    req = urllib.request.Request(f"{base}/api/{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        body = r.read()
    return json.loads(body) if body else None


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    "A JupyterLab server on a free localhost port: (base URL, token, its root folder)."
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "root"; root.mkdir()
    port, token = _free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items()
           if k not in ("IN_TEST", "SEWER_SSL_STATIC", "SEWER_SSL_WIDGETS")}   # the explorers must detect the front end
    env.update(JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), JUPYTER_CONFIG_DIR=str(tmp / "config"),
               JUPYTER_DATA_DIR=str(tmp / "data"), IPYTHONDIR=str(tmp / "ipython"),
               HF_HUB_OFFLINE="1", MPLBACKEND="Agg", PYDEVD_DISABLE_FILE_VALIDATION="1")
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True",                         # window.jupyterapp: run cells by command
           f"--LabApp.workspaces_dir={tmp / 'workspaces'}", f"--LabApp.user_settings_dir={tmp / 'settings'}",
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def log_tail():
        return (tmp / "server.log").read_text(errors="replace")[-3000:]

    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None: pytest.fail(f"JupyterLab exited with status {proc.returncode}:\n{log_tail()}")
            try:
                _api(base, token, "status"); break
            except OSError:
                if time.monotonic() > deadline: pytest.fail(f"JupyterLab did not answer on {base} in 90 s:\n{log_tail()}")
                time.sleep(0.5)
        yield base, token, root, log_tail
    finally:
        try:   # the kernels run in their own sessions: shut them down before the server
            for k in _api(base, token, "kernels"): _api(base, token, f"kernels/{k['id']}", "DELETE")
        except OSError:
            pass
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL); proc.wait()
        log.close()


# ---------------------------------------------------------------------------------------------
# the explorers, live

# One cell per explorer on tiny data (as tests/test_explorers.py builds them); each panel gets a CSS
# class so that the test can find it. `static=None` everywhere: the explorers must see JupyterLab.
SETUP = """\
import numpy as np, pandas as pd, torch
from sewer_ssl.config import CODES, ExperimentConfig
from sewer_ssl.explorers import (Explorer, augmentation_explorer, code_examples, error_gallery, mae_explorer,
                                 saliency_explorer, static_mode, threshold_explorer)
from sewer_ssl.methods import build_method
assert not static_mode(), "the explorers do not see the JupyterLab front end: they would draw static figures"
examples = code_examples(codes=("normal", "RB", "AF"), size=32)
torch.manual_seed(0)
mae = build_method(ExperimentConfig(method="mae", backbone="vit_tiny", img_size=32,
                                    method_kwargs=dict(decoder_depth=1, decoder_dim=32, decoder_heads=2)))
rng = np.random.default_rng(0)
y = (rng.random(300) < 0.2).astype(int)
scores = rng.normal(size=300) + 1.5 * y - 0.5
rows = []
for i in range(12):
    codes = {c: 0 for c in CODES}
    code = ("RB", "AF", None)[i % 3]
    if code: codes[code] = 1
    rows.append({"Filename": f"{i}.png", **codes, "Defect": int(code is not None), "pred": i % 2, "score": i / 12})
table = pd.DataFrame(rows)
load = lambda name: examples[("RB", "AF", "normal")[int(name.split(".")[0]) % 3]][0]

def show(panel, name):
    assert isinstance(panel, Explorer), f"{name}: got {type(panel).__name__}, not a widget panel"
    panel.add_class(f"sewer-{name}")
    return panel
"""

EXPLORERS = {
    "augmentation": 'augmentation_explorer(examples, code="RB", n_views=3)',
    "threshold": "threshold_explorer(y, scores)",
    "gallery": 'error_gallery(table, load, score="score", per_row=3)',
    "mae": "mae_explorer(mae, [examples['RB'][0], examples['AF'][0]], mask_ratio=0.5)",
    "saliency": "saliency_explorer(mae, [examples['RB'][0], examples['normal'][0]])",
}
DONE = "all explorers built"


def _explorer_notebook() -> nbformat.NotebookNode:
    cells = [nbformat.v4.new_code_cell(SETUP)]
    cells += [nbformat.v4.new_code_cell(f'show({call}, "{name}")') for name, call in EXPLORERS.items()]
    cells.append(nbformat.v4.new_code_cell(f"print({DONE!r})"))
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


# The notebook panel's state, read through JupyterLab's own objects
NOTEBOOK_STATE = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  if (!w || !w.sessionContext || !w.model) return null;
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  const cells = [];
  for (let i = 0; i < w.model.cells.length; i++) {
    const c = w.model.cells.get(i);
    cells.push({count: c.executionCount === undefined ? null : c.executionCount,
                outputs: c.outputs ? c.outputs.toJSON() : []});
  }
  return {kernel: kernel ? kernel.status : null, cells};
}"""


def _errors_in_outputs(cells) -> list:
    out = []
    for i, c in enumerate(cells):
        for o in c["outputs"]:
            if o["output_type"] == "error":
                out.append(f"cell {i}: {o['ename']}: {o['evalue']}")
            elif o.get("name") == "stderr" and "Traceback" in "".join(o.get("text", "")):
                out.append(f"cell {i} stderr: {''.join(o['text'])[-800:]}")
    return out


def _image_src(panel) -> str:
    return panel.locator(".widget-image").first.get_attribute("src") or ""


def _wait_redraw(page, panel, before: str, what: str, errors: PageErrors):
    "Wait until the panel's picture is a new one (a new PNG came from the kernel); fail with what went wrong."
    try:
        page.wait_for_function("([el, before]) => { const img = el.querySelector('.widget-image');"
                               " return img && img.src && img.src !== before; }",
                               arg=[panel.element_handle(), before], timeout=60_000)
    except sync_api.TimeoutError:
        message = panel.locator(".widget-html").first.inner_text()
        pytest.fail(f"{what}: the picture did not change in 60 s; panel message: {message!r}; {errors.errors}")
    message = panel.locator(".widget-html").first.inner_text()
    assert message.strip() == "", f"{what}: {message}"


def _move_slider(page, panel, description: str, key: str, errors: PageErrors) -> tuple[str, str]:
    "Press `key` on the handle of the slider labelled `description`; the readout before and after."
    slider = panel.locator(".widget-slider", has=page.locator(".widget-label", has_text=description))
    readout = slider.locator(".widget-readout")
    old, before = readout.inner_text(), _image_src(panel)
    slider.locator(".noUi-handle").focus()
    page.keyboard.press(key)
    _wait_redraw(page, panel, before, f"slider {description!r} ({old} + {key})", errors)
    return old, readout.inner_text()


def _choose(page, panel, description: str, label: str, errors: PageErrors):
    "Pick `label` in the dropdown labelled `description`."
    select = panel.locator(".widget-dropdown", has=page.locator(".widget-label", has_text=description)).locator("select")
    before = _image_src(panel)
    select.select_option(label=label)
    _wait_redraw(page, panel, before, f"dropdown {description!r} -> {label!r}", errors)


def test_explorers_live_in_jupyterlab(lab, browser):
    base, token, root, log_tail = lab
    nbformat.write(_explorer_notebook(), root / "explorers.ipynb")
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors = PageErrors(page)
    try:
        page.goto(f"{base}/lab/tree/explorers.ipynb?token={token}", timeout=60_000)
        page.wait_for_function(f"() => {{ const s = ({NOTEBOOK_STATE})(); return s && s.kernel === 'idle'; }}",
                               timeout=90_000)
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        try:   # the last cell prints DONE once every explorer is built
            page.wait_for_function(
                f"() => {{ const s = ({NOTEBOOK_STATE})(); return s && s.kernel === 'idle' &&"
                f" s.cells.every(c => c.count !== null); }}", timeout=150_000)
        except sync_api.TimeoutError:
            pytest.fail(f"the notebook did not finish in 150 s; {errors.errors}\nserver log:\n{log_tail()}")
        state = page.evaluate(NOTEBOOK_STATE)
        assert not _errors_in_outputs(state["cells"]), _errors_in_outputs(state["cells"])
        assert DONE in json.dumps(state["cells"][-1]["outputs"])

        assert not errors.errors, errors.errors
        shown = page.locator(".jp-OutputArea-output").all_inner_texts()
        broken = [t for t in shown if "Error displaying widget" in t or "model not found" in t]
        assert not broken, f"widgets failed to display: {broken}"
        as_text = [t for t in shown if t.startswith("Explorer(children=")]   # no widget renderer: the repr instead
        assert not as_text, f"widgets shown as text (the widget manager extension is not loaded): {as_text}"
        panels = {name: page.locator(f".sewer-{name}") for name in EXPLORERS}
        for name, panel in panels.items():
            try:
                panel.wait_for(state="visible", timeout=30_000)
            except sync_api.TimeoutError:
                pytest.fail(f"explorer {name!r}: no widget view in the page (widget manager missing?); "
                            f"output texts: {shown}; {errors.errors}")
            assert _image_src(panel).startswith("blob:"), f"explorer {name!r} shows no picture"

        p = panels["augmentation"]
        _choose(page, p, "code", "AF", errors)
        old, new = _move_slider(page, p, "min_scale", "Home", errors)
        assert (old, new) == ("0.395", "0.050"), (old, new)

        old, new = _move_slider(page, panels["threshold"], "threshold", "End", errors)
        assert float(new) > float(old), (old, new)

        _choose(page, panels["gallery"], "show", "false alarms", errors)
        _move_slider(page, panels["gallery"], "page", "ArrowRight", errors)

        old, new = _move_slider(page, panels["mae"], "mask ratio", "End", errors)
        assert (old, new) == ("0.50", "0.95"), (old, new)

        _choose(page, panels["saliency"], "image", "1", errors)
        _move_slider(page, panels["saliency"], "overlay", "Home", errors)

        state = page.evaluate(NOTEBOOK_STATE)
        assert not _errors_in_outputs(state["cells"]), _errors_in_outputs(state["cells"])
        assert not errors.errors, errors.errors
    finally:
        context.close()


# ---------------------------------------------------------------------------------------------
# the docs site

def _external(url: str) -> bool:
    return urlsplit(url).scheme in ("http", "https")


# Everything a page links to or shows, as the browser resolves it, and the ids anchors can point at
PAGE_REFS = """() => ({
  links: [...document.querySelectorAll('a[href]')].map(a => [a.getAttribute('href'), a.href]),
  images: [...document.images].map(i => [(i.getAttribute('src') || '').slice(0, 80), i.src.slice(0, 300),
                                          i.complete && i.naturalWidth > 0]),
  ids: [...document.querySelectorAll('[id]')].map(e => e.id).concat(
       [...document.querySelectorAll('a[name]')].map(e => e.name)),
})"""


def test_docs_site_links_and_images(tmp_path, browser):
    out = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "sewer_ssl.docs", "build", "--out", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    context = browser.new_context()
    external = set()

    def route(r):   # no network: remote scripts are refused, and listed
        if _external(r.request.url):
            external.add(r.request.url); return r.abort()
        return r.continue_()

    context.route("**/*", route)
    page = context.new_page()
    errors = PageErrors(page, external=_external)
    ids, anchors, broken, todo, seen = {}, [], [], [out / "index.html"], set()
    n_links = n_images = 0
    try:
        while todo:
            path = todo.pop()
            if path in seen: continue
            seen.add(path)
            page.goto(path.as_uri(), wait_until="load")
            refs = page.evaluate(PAGE_REFS)
            here = f'{path.relative_to(out).as_posix()} (from nbs/{path.relative_to(out).with_suffix(".ipynb").as_posix()})'
            ids[path] = set(refs["ids"])
            n_links += len(refs["links"]); n_images += len(refs["images"])
            for raw, url in refs["links"]:
                u = urlsplit(url)
                if u.scheme in ("http", "https", "mailto"):
                    external.add(url); continue
                if u.scheme != "file":
                    broken.append(f"{here}: link {raw!r} ({u.scheme}: is not a file)"); continue
                target = Path(unquote(u.path))
                if not target.exists():
                    broken.append(f"{here}: link {raw!r} -> {target} does not exist"); continue
                if target.suffix == ".html" and target.is_relative_to(out):
                    todo.append(target)
                    if u.fragment: anchors.append((here, raw, target, u.fragment))
            for raw, src, loaded in refs["images"]:
                if not loaded: broken.append(f"{here}: image {raw!r} does not load")
    finally:
        context.close()
    for here, raw, target, fragment in anchors:   # as browsers match a fragment: raw, then decoded
        if fragment not in ids[target] and unquote(fragment) not in ids[target]:
            broken.append(f"{here}: link {raw!r}: no element with id {unquote(fragment)!r}")
    pages = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.html"))
    unreached = sorted(set(pages) - {p.relative_to(out).as_posix() for p in seen})
    print(f"\n{len(seen)} pages, {n_links} links, {n_images} images checked; external links and scripts, not fetched:",
          *sorted(external), sep="\n  ")
    assert not broken, "broken links or images in the docs site:\n" + "\n".join(broken)
    assert n_images, "no image in the whole site: the home page's figure should be embedded"
    assert not unreached, f"pages no link leads to: {unreached}"
    assert not errors.errors, errors.errors
