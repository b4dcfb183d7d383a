from setuptools import setup

setup(
    name="docker-router",
    version="0.1.0",
    description=(
        "Give every user of a shared host /var/run/docker.sock, routed to "
        "their own rootless Docker daemon."
    ),
    python_requires=">=3.11",
    packages=["dockerrouter", "twisted.plugins"],
    install_requires=["twisted>=23.8", "zope.interface", "attrs", "prometheus_client"],
    entry_points={"console_scripts": ["docker-router = dockerrouter.cli:main"]},
    extras_require={
        "test": ["pytest", "pytest-twisted", "docker", "hypothesis"],
    },
)
