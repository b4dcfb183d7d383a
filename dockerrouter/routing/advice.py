"""
What the router tells this host's users to do about a problem: the setup
command of this host (looked for once, at start) and the site's own text.
"""

import os
import shutil
from typing import Callable, Optional

from attrs import frozen

from dockerrouter.defaults import SETUP_TOOL
from dockerrouter.routing.reasons import BackendUnusable

# Where Debian's docker.io puts it (not on PATH).
SETUP_TOOL_DIRECTORIES = ("/usr/share/docker.io/contrib",)


def locateSetupTool(
    which: Callable[[str], Optional[str]] = shutil.which,
    directories: tuple[str, ...] = SETUP_TOOL_DIRECTORIES,
) -> Optional[str]:
    """Where the setup tool is: on PATH, or where the distribution put it."""
    found = which(SETUP_TOOL)
    if found is not None:
        return found
    for directory in directories:
        candidate = os.path.join(directory, SETUP_TOOL)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def findSetupTool(
    which: Callable[[str], Optional[str]] = shutil.which,
    directories: tuple[str, ...] = SETUP_TOOL_DIRECTORIES,
) -> str:
    """
    The command that sets up a rootless daemon on this host: its bare name
    when it is on PATH (or nowhere to be found), else the name with its
    directory put on PATH: the tool runs C{dockerd-rootless.sh}, which the
    distribution keeps beside it, by name.  Looked for once, at start.
    """
    if which(SETUP_TOOL) is None:
        found = locateSetupTool(lambda name: None, directories)
        if found is not None:
            return f"PATH={os.path.dirname(found)}:$PATH {SETUP_TOOL}"
    return SETUP_TOOL


@frozen
class Advice:
    """
    What the router tells this host's users to do about a problem.

    @ivar setupTool: the command that sets up a rootless daemon here.
    @ivar site: an administrator's text (a sentence, a URL) that replaces
        the router's own advice, or extends it where it says C{{advice}}.
    """

    setupTool: str = SETUP_TOOL
    site: Optional[str] = None

    def render(self, reason: BackendUnusable) -> str:
        """The whole message of C{reason}: what is wrong, then what to do."""
        return reason.render(self.setupTool, self.site)
