"""
The metadata lives in pyproject.toml; this file keeps what setuptools'
pyproject tables say less plainly: the flat layout, where C{dockerrouter}
sits beside C{twisted/plugins} (a namespace: no C{__init__.py}, so that
Twisted's own plugins stay visible), and the man page.
"""

from setuptools import setup

setup(
    packages=["dockerrouter", "dockerrouter.base", "dockerrouter.routing", "dockerrouter.relay", "dockerrouter.service", "twisted.plugins"],
    # PREFIX/share/man/man8: see README ("Install and run") for how man finds
    # it when PREFIX is a virtual environment.
    data_files=[("share/man/man8", ["man/docker-router.8"])],
)
