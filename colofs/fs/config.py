"""What a mount is started with, and the checks on it that need no daemon.

``mountctl mount`` and the daemon share these checks, so a mistyped address
or a missing key file is reported before anything is started.
``--listen`` (a secondary), ``--peer`` (a primary) and ``--key-file`` configure
replication; without a key only loopback addresses are accepted (the daemon's
replication engine refuses others at startup), and the key file itself is
read, and its permissions checked, by the daemon. ``--tls-cert``,
``--tls-key`` and ``--tls-ca`` (all three or none) add TLS under the frames.
``--nbd-socket`` serves NBD on a unix socket; ``--nbd-listen`` on TCP needs
``--key-file``, and off loopback the TLS files too (clients must use TLS).
Each VM is served by a process of its own (:mod:`colofs.workers`);
``--single-process`` serves every VM from the daemon's one process instead.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import stat
from dataclasses import dataclass

from colofs.core.state import PRIMARY, ROLES, SECONDARY
from colofs.repl.errors import ReplConfigError
from colofs.repl.tls import TlsConfig

LOG_NAME = ".colofs-mount.log"
LOCK_NAME = ".colofs-mount.lock"


class ConfigError(ValueError):
    """A mount option that cannot work; the message says which and why."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str, option: str) -> Endpoint:
    """``HOST:PORT`` or ``[IPV6]:PORT``."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"{option}: {text!r} is not [IPV6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ConfigError(f"{option}: {text!r} is not HOST:PORT (write IPv6 addresses as [ADDR]:PORT)")
    if not host:
        raise ConfigError(f"{option}: {text!r} has no host")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"{option}: port {port_text!r} is not a number from 1 to 65535")
    return Endpoint(host, int(port_text))


def check_key_file(path: str) -> str:
    """The absolute path of a usable shared-key file."""
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"--key-file {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"--key-file {path}: not a regular file")
    if st.st_size == 0:
        raise ConfigError(f"--key-file {path}: the file is empty")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"--key-file {path}: not readable")
    return path


def _maybe_loopback(host: str) -> bool:
    """False for an address that is certainly not loopback; names are resolved by the daemon."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


@dataclass(frozen=True)
class MountConfig:
    store: str
    mountpoint: str
    role: str
    log_file: str
    listen: Endpoint | None = None
    peer: Endpoint | None = None
    key_file: str | None = None
    allow_other: bool = False
    debug: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    nbd_socket: str | None = None
    nbd_listen: Endpoint | None = None
    metrics: Endpoint | None = None
    workers: bool = True
    """Serve each VM from its own worker process under a supervisor (:mod:`colofs.workers`); False: one process."""

    def tls(self) -> TlsConfig | None:
        """The TLS settings read from the files (raises ``ReplConfigError``), or None without TLS."""
        if self.tls_cert is None or self.tls_key is None or self.tls_ca is None:
            return None
        return TlsConfig.load(self.tls_cert, self.tls_key, self.tls_ca)

    @property
    def lock_file(self) -> str:
        return os.path.join(self.store, LOCK_NAME)

    def argv(self) -> list[str]:
        """These options as the daemon's command line (``add_mount_arguments`` parses it back)."""
        args = ["--role", self.role, "--store", self.store, "--log-file", self.log_file]
        for flag, value in (("--listen", self.listen), ("--peer", self.peer), ("--key-file", self.key_file),
                            ("--nbd-socket", self.nbd_socket), ("--nbd-listen", self.nbd_listen),
                            ("--metrics", self.metrics)):
            if value:
                args += [flag, str(value)]
        if self.tls_cert and self.tls_key and self.tls_ca:
            args += ["--tls-cert", self.tls_cert, "--tls-key", self.tls_key, "--tls-ca", self.tls_ca]
        for flag, on in (("--allow-other", self.allow_other), ("--debug", self.debug),
                         ("--single-process", not self.workers)):
            if on:
                args.append(flag)
        return [*args, self.mountpoint]

    def replication(self) -> dict[str, object]:
        """What status reports about the peer's configuration (the daemon adds what is running)."""
        if self.listen is None and self.peer is None:
            return {"state": "not configured"}
        return {
            "state": "configured",
            "listen": str(self.listen) if self.listen else None,
            "peer": str(self.peer) if self.peer else None,
            "key_file": self.key_file,
            "tls": self.tls_cert is not None,
        }


def make_config(
    *,
    store: str,
    mountpoint: str,
    role: str,
    listen: str | None = None,
    peer: str | None = None,
    key_file: str | None = None,
    log_file: str | None = None,
    allow_other: bool = False,
    debug: bool = False,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
    nbd_socket: str | None = None,
    nbd_listen: str | None = None,
    metrics: str | None = None,
    workers: bool = True,
) -> MountConfig:
    """Validate the options of a mount; raises :class:`ConfigError`."""
    if workers and nbd_listen is not None and (tls_cert or tls_key or tls_ca):
        raise ConfigError("--nbd-listen with TLS needs --single-process: with a process per VM the supervisor "
                          "runs the NBD handshake, and a TLS session cannot be handed over to a VM's worker "
                          "process (use --nbd-socket, or mount with --single-process)")
    if role not in ROLES:
        raise ConfigError(f"--role must be one of {', '.join(ROLES)}, not {role!r}")
    if listen is not None and role != SECONDARY:
        raise ConfigError("--listen is for a secondary (it waits for its primary); a primary uses --peer")
    if peer is not None and role != PRIMARY:
        raise ConfigError("--peer is for a primary (it connects to its secondary); a secondary uses --listen")
    ep_listen = parse_endpoint(listen, "--listen") if listen is not None else None
    ep_peer = parse_endpoint(peer, "--peer") if peer is not None else None
    ep_nbd = parse_endpoint(nbd_listen, "--nbd-listen") if nbd_listen is not None else None
    if key_file is not None and ep_listen is None and ep_peer is None and ep_nbd is None:
        raise ConfigError("--key-file is only used with --listen or --peer (or --nbd-listen)")
    if ep_nbd is not None and key_file is None:
        raise ConfigError(f"--nbd-listen {ep_nbd}: NBD over TCP has no authentication of its own; it is "
                          "served only on a host set up with --key-file (use --nbd-socket for local clients)")
    if ep_nbd is not None and not _maybe_loopback(ep_nbd.host) and not (tls_cert or tls_key or tls_ca):
        raise ConfigError(f"--nbd-listen {ep_nbd}: a non-loopback address needs TLS (--tls-cert, --tls-key, "
                          "--tls-ca): clients must show a certificate from that CA")
    for ep, option in ((ep_listen, "--listen"), (ep_peer, "--peer")):
        if ep is not None and key_file is None and not _maybe_loopback(ep.host):
            raise ConfigError(f"{option} {ep}: a non-loopback address needs --key-file "
                              "(peers authenticate with a shared key)")
    key = check_key_file(key_file) if key_file is not None else None
    tls = _check_tls(tls_cert, tls_key, tls_ca,
                     replicating=ep_listen is not None or ep_peer is not None or ep_nbd is not None)
    store = os.path.abspath(store)
    return MountConfig(
        store=store,
        mountpoint=os.path.abspath(mountpoint),
        role=role,
        log_file=os.path.abspath(log_file) if log_file else os.path.join(store, LOG_NAME),
        listen=ep_listen,
        peer=ep_peer,
        key_file=key,
        allow_other=allow_other,
        debug=debug,
        tls_cert=tls[0],
        tls_key=tls[1],
        tls_ca=tls[2],
        nbd_socket=os.path.abspath(nbd_socket) if nbd_socket else None,
        nbd_listen=ep_nbd,
        metrics=parse_endpoint(metrics, "--metrics") if metrics is not None else None,
        workers=workers,
    )


def _check_tls(cert: str | None, key: str | None, ca: str | None,
               *, replicating: bool) -> tuple[str | None, str | None, str | None]:
    """Absolute paths of the three TLS files, read once here so a bad one is named before the start."""
    given = {"--tls-cert": cert, "--tls-key": key, "--tls-ca": ca}
    if not any(given.values()):
        return None, None, None
    missing = [name for name, v in given.items() if not v]
    if missing:
        raise ConfigError(f"TLS needs --tls-cert, --tls-key and --tls-ca together; missing {', '.join(missing)}")
    if not replicating:
        raise ConfigError("--tls-cert, --tls-key and --tls-ca are only used with --listen or --peer")
    paths = tuple(os.path.abspath(p) for p in (cert, key, ca))
    try:
        TlsConfig.load(*paths)
    except ReplConfigError as e:
        raise ConfigError(str(e)) from None
    return paths  # type: ignore[return-value]


def add_mount_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a mount, shared with ``mountctl mount``."""
    p.add_argument("--role", required=True, choices=("primary", "secondary"),
                   help="role of VMs created in this store (existing VMs keep theirs)")
    p.add_argument("--store", required=True, help="store directory (created if new)")
    p.add_argument("--listen", metavar="HOST:PORT", help="secondary: where to wait for the primary")
    p.add_argument("--peer", metavar="HOST:PORT", help="primary: where the secondary listens")
    p.add_argument("--key-file", metavar="FILE", help="shared key authenticating the peers")
    p.add_argument("--tls-cert", metavar="FILE", help="TLS: this node's certificate (PEM; with --tls-key, --tls-ca)")
    p.add_argument("--tls-key", metavar="FILE", help="TLS: the private key of --tls-cert (PEM)")
    p.add_argument("--tls-ca", metavar="FILE",
                   help="TLS: the CA the peer's certificate must come from (both nodes verify each other)")
    p.add_argument("--nbd-socket", metavar="PATH",
                   help="serve the disks, snapshots and clones over NBD on this unix socket (mode 0600)")
    p.add_argument("--nbd-listen", metavar="HOST:PORT",
                   help="serve NBD on TCP too (needs --key-file; NBD itself does not authenticate)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics")
    p.add_argument("--log-file", metavar="FILE", help="log file (default: STORE/.colofs-mount.log)")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users (e.g. the QEMU user) access the mount")
    p.add_argument("--debug", action="store_true", help="debug logging, pyfuse3's included")
    p.add_argument("--workers", dest="workers", action="store_true", default=True,
                   help="serve each VM from its own process, so a crash or hang stays within that VM (the default)")
    p.add_argument("--single-process", dest="workers", action="store_false",
                   help="serve every VM from the daemon's one process (needed for --nbd-listen with TLS)")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")


def config_from_args(args: argparse.Namespace) -> MountConfig:
    return make_config(
        store=args.store, mountpoint=args.mountpoint, role=args.role, listen=args.listen,
        peer=args.peer, key_file=args.key_file, log_file=args.log_file,
        allow_other=args.allow_other, debug=args.debug,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca,
        nbd_socket=args.nbd_socket, nbd_listen=args.nbd_listen,
        metrics=getattr(args, "metrics", None),
        workers=getattr(args, "workers", True),
    )
