"""The mount daemon's entry point: one process for the whole store, or a supervisor and a worker per VM.

``mountctl mount`` starts ``python -m colofs.mountd`` (``--foreground`` calls
:func:`run` in its own process). Without ``--workers`` the store is served by
:mod:`colofs.fs.daemon`; with it by :mod:`colofs.workers.supervisor`, which
forks a worker per VM (``docs/processes.md``). Both report readiness the same
way and take the same options. This module sits above both so that neither
imports the other.
"""

from __future__ import annotations

import sys

from colofs.fs import daemon
from colofs.fs.config import ConfigError, MountConfig, config_from_args
from colofs.workers import supervisor


def run(cfg: MountConfig, *, ready: daemon.Ready, foreground: bool) -> int:
    """The whole life of a mount in the process model ``cfg`` asks for; returns the exit status."""
    if cfg.workers:
        return supervisor.run(cfg, ready=ready, foreground=foreground)
    return daemon.run(cfg, ready=ready, foreground=foreground)


def main(argv: list[str] | None = None) -> int:
    p = daemon.parser()
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        p.error(str(e))
    return run(cfg, ready=daemon.ready_writer(args.ready_fd), foreground=args.ready_fd is None)


if __name__ == "__main__":
    sys.exit(main())
