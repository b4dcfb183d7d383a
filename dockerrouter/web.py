"""
What the router serves over HTTP (metrics, control) has no access log.
"""

from twisted.web.server import Request, Site


class QuietSite(Site):
    """A site that writes no log line per request (a scrape every 15 s)."""

    noisy = False

    def log(self, request: Request) -> None:
        pass
