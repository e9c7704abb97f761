"""Package discovery for setuptools (everything else is in pyproject.toml).

Every package under ``mtnlg/`` is found, never listed by hand, so a new room ships the day it
is added. The kfp side lives beside the library in the checkout (``components/``,
``pipelines/``) and installs inside it as ``mtnlg.components`` and ``mtnlg.pipelines``.
``tests/test_packaging.py`` builds the sdist and the wheel and checks that every module and
data file is inside.
"""

from setuptools import find_packages, setup

KFP_SIDE = {"mtnlg.components": "components", "mtnlg.pipelines": "pipelines"}


def packages() -> list[str]:
    found = find_packages(include=["mtnlg", "mtnlg.*"])
    for name, folder in KFP_SIDE.items():
        found += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]
    return found


setup(packages=packages(), package_dir={"mtnlg": "mtnlg", **KFP_SIDE})
