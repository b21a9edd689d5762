"""README.md is what nbs/index.ipynb renders to; the HTML docs build offline and link every notebook."""
import re
import socket
from pathlib import Path

import nbformat
import pytest

from sewer_ssl import docs

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"


def _notebooks():
    return [p.relative_to(NBS).as_posix() for p in docs.notebook_paths(NBS)]


def test_readme_in_sync_with_index():
    assert (ROOT / "README.md").read_text(encoding="utf-8") == docs.render_readme(root=ROOT), \
        "README.md is not what nbs/index.ipynb renders to; run: python -m sewer_ssl.docs readme"


def test_readme_keeps_ci_test_command():
    # .ci/run takes the first line of the first ```bash block after the line "**The tests**"
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("**The tests**"))
    fence = next(i for i in range(start, len(lines)) if lines[i].startswith("```bash"))
    command = lines[fence + 1]
    assert "nbdev_test" in command and "pytest -q tests" in command and 'pip install -e ".[dev]"' in command


def test_index_links_every_notebook():
    nb = nbformat.read(NBS / "index.ipynb", as_version=4)
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    targets = set(re.findall(r"\]\(([^)#\s]+)", text))
    missing = [n for n in _notebooks() if n != "index.ipynb" and n not in targets]
    assert not missing, f"nbs/index.ipynb does not link {missing}; add them to its chapter or study list"
    broken = sorted(t for t in targets if t.endswith(".ipynb") and not (NBS / t).is_file())
    assert not broken, f"nbs/index.ipynb links notebooks that do not exist: {broken}"
    assert (ROOT / "outputs/figures/mae_released_defect.png").is_file()   # the home page's figure


@pytest.fixture
def offline(monkeypatch):
    def refuse(*args, **kwargs): raise OSError("network access during the docs build")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_build_offline_links_every_notebook(tmp_path, offline):
    some = ["index.ipynb", "04a_distributed.ipynb", "studies/mae_released_defect.ipynb"]
    site = docs.build_docs(tmp_path / "site", nbs=NBS, notebooks=some, progress=False)
    assert not site["failed"] and len(site["pages"]) == 3
    home = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    for name in _notebooks():   # the contents list every chapter and study, rendered or not
        assert f'href="{name[:-len(".ipynb")]}.html"' in home, name
    assert "data:image/png;base64" in home                                   # the figure is embedded
    assert 'href="04a_distributed.ipynb"' not in home and 'href="04a_distributed.html"' in home
    study = (tmp_path / "site/studies/mae_released_defect.html").read_text(encoding="utf-8")
    chapter = (tmp_path / "site/04a_distributed.html").read_text(encoding="utf-8")
    assert 'href="../index.html"' in study and 'href="index.html"' in chapter    # every page links home
    assert "#| export" not in chapter and "init_distributed" in chapter


def test_build_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="was not written by this command"):
        docs.build_docs(tmp_path, nbs=NBS, notebooks=["index.ipynb"], progress=False)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_build_execute_index(tmp_path):
    site = docs.build_docs(tmp_path / "site", execute=True, nbs=NBS, notebooks=["index.ipynb"], progress=False)
    assert not site["failed"], site["failed"]
    assert "byol-vit_tiny-synthetic-p0.01-224px-s42" in (tmp_path / "site/index.html").read_text()   # the cell's output


def test_cli_readme_check(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert docs.main(["readme", "--check"]) == 0 and "up to date" in capsys.readouterr().out


def test_the_papers_views_are_typed_once():
    """The paper's min_scale 0.395 and t_val 0.275 live in config.py only; everything else imports the names."""
    hits = [f"{p.name}:{n}" for p in sorted((ROOT / "sewer_ssl").glob("*.py")) if p.name != "_modidx.py"
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if re.search(r"(?<![\d.])0\.(395|275)(?!\d)", line)]
    assert len(hits) == 2 and all(h.startswith("config.py:") for h in hits), hits


def test_repository_basics_are_present():
    """The licence the README names, the facts file the chapters cite, and no placeholder URLs."""
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")
    cited = {m for p in NBS.rglob("*.ipynb") for m in re.findall(r"PAPER\.md`?,? section (\d)", p.read_text(encoding="utf-8"))}
    paper = (ROOT / "PAPER.md").read_text(encoding="utf-8")
    assert cited and all(re.search(rf"^## {n}\. ", paper, re.M) for n in cited), cited
    assert not re.search(r"^(doc_host|git_url) *= *\S", (ROOT / "settings.ini").read_text(encoding="utf-8"), re.M)


def test_every_notebook_is_committed_with_outputs_of_its_current_code():
    """A reader on a Git web view sees results: every notebook has outputs, every numbered chapter a figure or
    table, and no notebook's outputs predate its code (`python -m sewer_ssl.docs execute NOTEBOOK` re-runs one)."""
    from sewer_ssl.docs import nbs_dir, notebook_paths, output_problems
    nbs = nbs_dir()
    problems = [m for p in notebook_paths(nbs) for m in output_problems(p, nbs)]
    assert not problems, "\n".join(problems)
