"""Where the daemon listens, and who is on which host: the addressing contract of both sides.

Order: the explicit argument, then ``$STAGER_ENDPOINT``, then an ipc socket in the user's
runtime directory (``$XDG_RUNTIME_DIR/stager`` or ``/tmp/stager-<uid>``), a directory
created with mode 0700 and refused if another user owns it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import stat
from urllib.parse import urlsplit

from .errors import ErrorCode, StagerError

ENV_VAR = "STAGER_ENDPOINT"
HOST_ID_ENV = "STAGER_HOST_ID"  # a node identity other than the machine's: several simulated nodes on one host
AUTH_ENV = "STAGER_AUTH_DIR"  # clients: CURVE keys for tcp endpoints (made by `stager keygen`)


def runtime_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = os.path.join(base, "stager") if base and os.path.isdir(base) else f"/tmp/stager-{os.getuid()}"
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise StagerError(
            ErrorCode.UNAVAILABLE,
            f"{path} is not a directory owned by uid {os.getuid()}; remove it or set {ENV_VAR}",
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def resolve(endpoint: str | None = None) -> str:
    """The endpoint to use: ``endpoint``, else ``$STAGER_ENDPOINT``, else the default ipc socket."""
    endpoint = endpoint or os.environ.get(ENV_VAR) or f"ipc://{runtime_dir()}/stager.sock"
    scheme = endpoint.split("://", 1)[0]
    if scheme not in ("ipc", "tcp") or "://" not in endpoint:
        raise StagerError(
            ErrorCode.BAD_MESSAGE, f"endpoint {endpoint!r} must look like ipc:///path/to.sock or tcp://host:port"
        )
    return endpoint


def ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else None


def is_loopback(endpoint: str) -> bool:
    """True for ipc endpoints and tcp endpoints on a loopback address."""
    if endpoint.startswith("ipc://"):
        return True
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_ipv6_endpoint(endpoint: str) -> bool:
    """True for a tcp endpoint whose host is an IPv6 literal (``tcp://[::1]:7555``, a zone id too:
    ``tcp://[fe80::1%eth0]:7555``): ZeroMQ needs ``zmq.IPV6`` set on the socket before it binds or
    connects there, or it never does.

    >>> is_ipv6_endpoint("tcp://[::1]:0"), is_ipv6_endpoint("tcp://[fe80::1%eth0]:0"), is_ipv6_endpoint("ipc:///x")
    (True, True, False)
    >>> is_ipv6_endpoint("tcp://127.0.0.1:0"), is_ipv6_endpoint("tcp://node-a:7555")
    (False, False)
    """
    if not endpoint.startswith("tcp://"):
        return False
    try:
        host = urlsplit(endpoint).hostname or ""
        return ipaddress.ip_address(host.split("%", 1)[0]).version == 6
    except ValueError:
        return False


def lock_path(endpoint: str) -> str:
    digest = hashlib.sha1(endpoint.encode()).hexdigest()[:16]
    return os.path.join(runtime_dir(), f"daemon-{digest}.lock")


def host_id() -> str:
    """Identifies this node: peers with equal host ids share /dev/shm. ``$STAGER_HOST_ID`` when
    set (several daemons on one machine acting as separate nodes, each with its ranks), else
    this machine and boot."""
    override = os.environ.get(HOST_ID_ENV)
    if override:
        return override
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}:{boot}"


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_start_time(pid: int) -> float:
    """When process ``pid`` started, in seconds since boot: with the pid, what identifies a process
    (a reused pid has another start). Read from /proc/<pid>/stat, so a wall-clock jump (NTP, a VM
    snapshot restored) never makes a live process look like another one; raises OSError when the
    process does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    fields = stat[stat.rindex(b")") + 2 :].split()  # the command name may hold spaces and parentheses
    return int(fields[19]) / _CLK_TCK  # field 22 of stat(5): starttime, in clock ticks
