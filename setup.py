"""Packaging for sewer-ssl; every setting is read from settings.ini (nbdev 2 convention)."""
from configparser import ConfigParser

import setuptools

cfg = ConfigParser(delimiters=["="])
cfg.read("settings.ini", encoding="utf-8")
cfg = cfg["DEFAULT"]


def reqs(key):
    return cfg.get(key, "").split()


extras = {"dev": reqs("dev_requirements"), "elpv": reqs("elpv_requirements"),
          "benchmark": reqs("benchmark_requirements"), "slurm": reqs("slurm_requirements"),
          "export": reqs("export_requirements")}
extras["all"] = sorted({r for v in extras.values() for r in v})

setuptools.setup(
    name=cfg["repo"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"] or None,
    license="Apache-2.0",
    url=cfg["git_url"] or None,
    packages=setuptools.find_packages(include=[cfg["lib_name"], cfg["lib_name"] + ".*"]),
    include_package_data=True,
    install_requires=reqs("requirements"),
    extras_require=extras,
    python_requires=">=" + cfg["min_python"],
    keywords=cfg["keywords"],
    entry_points={"nbdev": [f"{cfg['lib_name']}={cfg['lib_name']}._modidx:d"]},
    zip_safe=False,
)
