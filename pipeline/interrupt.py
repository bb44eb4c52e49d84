"""SIGTERM behaves like Ctrl-C, so a stopped job closes its runs as KILLED and exits non-zero."""

import signal


class Interrupted(KeyboardInterrupt):
    """SIGTERM turned into an exception."""


def install_sigterm() -> None:
    def handler(signum, frame):
        raise Interrupted(f"received signal {signum}")

    signal.signal(signal.SIGTERM, handler)
