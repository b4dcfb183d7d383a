"""
The README's shell blocks, as the system tests run them: a test that installs
"as README.md says" reads the commands from README.md, so it breaks when the
README changes in a way that no longer works.
"""

import re
from pathlib import Path

EACH_USER = "Each user: a rootless Docker daemon"
README = Path(__file__).resolve().parents[2] / "README.md"


def shellBlocks(section):
    """
    The C{```sh} blocks of the README section headed C{section}, in order.
    """
    text = README.read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if match is None:
        raise LookupError(f"README.md has no section {section!r}")
    return re.findall(r"^```sh\n(.*?)^```$", match.group(1), re.M | re.S)


def installRouter():
    """
    The install section's one command (as root, in the repository).
    """
    return shellBlocks("Install and run")[0]


def upgradeRouter():
    """
    The upgrade section's one command (as root, in the repository).
    """
    return shellBlocks("Upgrade")[0]


def installDocker():
    """
    The per-host rootless Docker packages (as root).
    """
    return shellBlocks(EACH_USER)[0]


def userSetup():
    """
    What each user runs once, logged in.
    """
    return shellBlocks(EACH_USER)[1]


def linger(name):
    """
    The admin's linger of user C{name} (as root).
    """
    return shellBlocks(EACH_USER)[2].replace("NAME", name)
