"""The processes behind one engine, whatever the engine: the built-in engine's ranks and the MLC-LLM
engine process both run here.

Each is started as `python -m MODULE index count address` (a fresh interpreter: no CUDA state is
inherited and the caller's main module is not re-imported), connects back over an authenticated
socket (the child's side is `connect` below), and dies with its parent (PR_SET_PDEATHSIG).
Each leads its own session, so whatever it starts (MLC's TP workers, started by TVM with no death
signal of their own) is found by session id and ended with it. A process that crashes (seen at once
through a Linux pidfd) or hangs (no reply within the timeout) is reported with its exit status and
the tail of its log, and every process is reaped: none survives `close()`, an exception, or Ctrl-C.
"""
from __future__ import annotations

import atexit
import ctypes
import importlib.util
import os
import queue
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import weakref
from contextlib import contextmanager
from multiprocessing import AuthenticationError
from multiprocessing.connection import Listener, answer_challenge, deliver_challenge, wait

from .engine import ConfigError, EngineError, ModeNotApplicable

# NVLink multicast off unless the caller says otherwise (shared hosts: see the README's GPU section).
NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _import_roots(module: str) -> list[str]:
    """The folders a fresh interpreter needs on its path to import `module` and this package the way
    this process does (a repository checkout, an installed package, or both)."""
    roots = []
    for top in (module.split(".")[0], __name__.split(".")[0]):
        spec = importlib.util.find_spec(top)
        if spec is not None and spec.submodule_search_locations:
            root = os.path.dirname(os.path.abspath(list(spec.submodule_search_locations)[0]))
            if root not in roots:
                roots.append(root)
    return roots


@contextmanager
def _recv_timeout(conn, seconds: float):
    """Reads on `conn` (a blocking socket connection) fail with an OSError after `seconds` of silence."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))
        yield
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))
        sock.close()


def _exit_waitable(proc: subprocess.Popen):
    """A file descriptor that becomes readable when `proc` exits (Linux pidfd), or None."""
    try:
        return os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        return None


CONNECT_S = 60.0      # for the processes to connect back at start-up
HANDSHAKE_S = 5.0     # for one connection to authenticate (each in its own thread)
MAX_HANDSHAKES = 64   # connections authenticating at once; more are dropped unread


def _peer(conn) -> str:
    """Where connection `conn` comes from (host:port), for naming a stray."""
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "an unknown address"


def _handshake(conn, key: bytes, done: "queue.Queue") -> None:
    """Authenticate one connection both ways and read the index it says it is: put (conn, index, None)
    on `done`, or close it and put (None, None, why it was dropped and where it came from)."""
    peer = _peer(conn)
    try:
        with _recv_timeout(conn, HANDSHAKE_S):
            deliver_challenge(conn, key)
            answer_challenge(conn, key)
            index = conn.recv()
        done.put((conn, index, None))  # with no read deadline left on it
        return
    except AuthenticationError:
        why = "failed authentication"
    except (EOFError, ConnectionError):
        why = "closed before authenticating"
    except BlockingIOError:  # SO_RCVTIMEO ran out
        why = f"silent for {HANDSHAKE_S:.0f} s"
    except Exception as e:  # noqa: BLE001 - whatever a stray sent, it is dropped and said
        why = f"{type(e).__name__}: {e}"
    conn.close()
    done.put((None, None, f"{why} from {peer}"))


def _strays_said(strays: list[str], pending: int) -> str:
    """What the start-up error says of other connections to the listener: the ranks may be blameless."""
    said = []
    if strays:
        shown = "; ".join(strays[:3]) + (f"; and {len(strays) - 3} more" if len(strays) > 3 else "")
        said.append(f"dropped {len(strays)} local connection(s) that were not the {{name}}s ({shown})")
    if pending:
        said.append(f"had {pending} connection(s) still authenticating")
    return ("; meanwhile the start-up listener " + " and ".join(said) + " (another local process connecting "
            "to this port?)") if said else ""


_LIVE: "weakref.WeakSet[EngineProcesses]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for p in list(_LIVE):
        p.close()


class EngineProcesses:
    """`count` processes of `module`, each sent `spec` once connected; `ready` holds their start-up
    replies. Replies are `("ok"|"ready", value)` or `("error", kind, text, traceback)`, where kind
    "config"/"mode"/"oom" become ConfigError/ModeNotApplicable/out-of-memory errors here."""

    def __init__(self, module: str, count: int, spec: dict, logdir: str, start_timeout: float,
                 name: str = "rank", stop_timeout: float = 10, env: dict | None = None):
        """`logdir` (the processes' logs) becomes this object's: removed on a clean close, kept on a
        failure, whose error names it."""
        self.module, self.count, self.logdir, self.name = module, count, logdir, name
        self.stop_timeout = stop_timeout
        self.env_defaults = {**NCCL_SAFE_ENV, **(env or {})}  # the caller's environment wins over these
        self.procs: list[subprocess.Popen] = []
        self.conns: list = []
        self._sentinels: list = []
        self.dead: str | None = None
        _LIVE.add(self)
        try:
            self._spawn(spec)
            self.ready = [r[1] for r in self.collect("start-up", start_timeout)]
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _spawn(self, spec: dict) -> None:
        spec = {**spec, "parent_pid": os.getpid()}  # a child whose parent is already gone exits at once
        key = secrets.token_bytes(16)
        # Each connection is authenticated in a thread of its own with a deadline (HANDSHAKE_S), so
        # stray local connections (silent, garbage, a wrong key) are dropped side by side while the
        # processes connect; they are counted and named if the processes still do not connect in time.
        with Listener(("127.0.0.1", 0), backlog=self.count + 64) as lst:
            env = {**self.env_defaults, **os.environ, "LLM_BENCH_AUTHKEY": key.hex(), "PYTHONPATH": os.pathsep.join(
                _import_roots(self.module) + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
            for r in range(self.count):
                log = open(self.log(r), "w")
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", self.module, str(r), str(self.count), f"{lst.address[0]}:{lst.address[1]}"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True))
                log.close()
            conns: dict[int, object] = {}
            strays: list[str] = []             # why each dropped connection was dropped, and from where
            done: queue.Queue = queue.Queue()  # (connection, index or None, why dropped)
            pending = 0
            lst._listener._socket.settimeout(0.1)  # so handshakes, dead children and the deadline are seen
            deadline = time.monotonic() + CONNECT_S
            while len(conns) < self.count:
                dead = [r for r, p in enumerate(self.procs) if p.poll() is not None]
                if dead:
                    self._fail(f"{self.name} {dead[0]} exited with code {self.procs[dead[0]].returncode} "
                               "at start-up", dead)
                if time.monotonic() > deadline:
                    missing = [r for r in range(self.count) if r not in conns]
                    self._fail(f"{self.name}(s) {missing} did not connect within {CONNECT_S:.0f} s"
                               + _strays_said(strays, pending).format(name=self.name), missing)
                try:
                    conn = lst.accept()  # no key given to the Listener: authenticated by _handshake
                except OSError:  # the 0.1 s timeout (or a transient accept error): look around again
                    conn = None
                if conn is not None:
                    if pending >= MAX_HANDSHAKES:
                        strays.append(f"more than {MAX_HANDSHAKES} at once, from {_peer(conn)}")
                        conn.close()
                    else:
                        pending += 1
                        threading.Thread(target=_handshake, args=(conn, key, done), daemon=True).start()
                while not done.empty():
                    conn, r, why = done.get()
                    pending -= 1
                    if conn is not None and (not isinstance(r, int) or not 0 <= r < self.count or r in conns):
                        why = f"index {r!r}, which is not awaited, from {_peer(conn)}"
                        conn.close()
                    if why is not None:
                        strays.append(why)
                        continue
                    conn.send(spec)
                    conns[r] = conn
            self.conns = [conns[r] for r in range(self.count)]
        self._sentinels = [_exit_waitable(p) for p in self.procs]

    def log(self, r: int) -> str:
        return os.path.join(self.logdir, f"{self.name.replace(' ', '-')}{r}.log")

    def _log_tail(self, r: int, n: int = 15) -> str:
        try:
            with open(self.log(r)) as f:
                lines = f.read().splitlines()[-n:]
            return "\n".join("    " + ln for ln in lines)
        except OSError:
            return ""

    def send(self, msg) -> None:
        if self.dead:
            raise EngineError(f"engine is dead: {self.dead}")
        for conn in self.conns:
            try:
                conn.send(msg)
            except (BrokenPipeError, OSError):
                pass  # the process is gone; collect() reports it

    def collect(self, what: str, timeout: float) -> list:
        """Wait for one reply per process; raise with the cause if one errs, dies or hangs."""
        deadline = time.monotonic() + timeout
        replies: dict[int, tuple] = {}
        while len(replies) < len(self.conns):
            waiting = {self.conns[r]: r for r in range(len(self.conns)) if r not in replies}
            sentinels = {self._sentinels[r]: r for r in waiting.values() if self._sentinels[r] is not None}
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(f"no reply to {what} within {timeout:g} s from {self.name}(s) "
                           f"{sorted(waiting.values())} (hung; raise --llm-engine-timeout if this is a slow build)",
                           sorted(waiting.values()))
            ready = wait(list(waiting) + list(sentinels), timeout=min(left, 1.0 if sentinels else 0.2))
            for obj in ready:
                if obj in waiting:
                    r = waiting[obj]
                    try:
                        msg = obj.recv()
                    except (EOFError, OSError):
                        continue  # the sentinel tells how it died
                    if msg[0] == "error":
                        _, kind, text, tb = msg
                        killed = self._killed_peer(r) if kind == "error" else None
                        if killed is not None:  # the peer's death is the cause; r's error is its echo
                            self._fail(f"{self._death(killed)} during {what} (then {self.name} {r} failed: "
                                       f"{text.splitlines()[0][:200]})", [killed, r])
                        self._fail(f"{self.name} {r} failed during {what}: {text}", [r], kind=kind, tb=tb)
                    replies[r] = msg
            for r in list(waiting.values()):
                if r in replies or self.procs[r].poll() is None:
                    continue
                if self.conns[r].poll():  # a reply (or EOF) may still be readable
                    try:
                        replies[r] = self.conns[r].recv()
                        if replies[r][0] != "error":
                            continue
                    except (EOFError, OSError):
                        pass
                self._fail(f"{self._death(r)} during {what}", [r])
        return [replies[r] for r in range(len(self.conns))]

    def _death(self, r: int) -> str:
        code = self.procs[r].returncode
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        return f"{self.name} {r} (pid {self.procs[r].pid}) died with {how}"

    def _killed_peer(self, r: int, grace: float = 1.0) -> int | None:
        """A process other than `r` killed by a signal (now or within `grace` s): when one rank is
        killed, its peers' collectives fail at once (gloo: connection reset), often before the kill
        is seen; the report should name the killed one. A peer that exits with a code after its own
        error report is not a cause."""
        deadline = time.monotonic() + grace
        while True:
            for q, p in enumerate(self.procs):
                if q != r and p.poll() is not None and p.returncode < 0:
                    return q
            left = deadline - time.monotonic()
            running = [fd for q, fd in enumerate(self._sentinels) if q != r and fd is not None
                       and self.procs[q].returncode is None]
            if left <= 0 or not running:
                return None
            wait(running, timeout=left)  # wakes when a peer exits (pidfd), not on a timer

    def _fail(self, why: str, which: list[int], kind: str = "error", tb: str | None = None):
        logs = "\n".join(f"  {self.name} {r} log ({self.log(r)}):\n{self._log_tail(r)}" for r in which)
        self.dead = why
        try:
            self.close(keep_logs=kind not in ("config", "mode"))  # a refusal is no crash: its line says all
        except EngineError as e:  # a process that outlived SIGKILL: said beside the cause
            why = f"{why}; then {e}"
        where = ""
        if tb:  # the process's own traceback, last frames: where it failed
            frames = [ln for ln in tb.splitlines() if ln.startswith("  File ")][-4:]
            where = f"\n  {self.name} traceback (last frames):\n" + "\n".join("  " + f.strip() for f in frames)
        msg = why + where + (f"\n{logs}" if logs.strip() else "") + f"\n  logs kept in {self.logdir}"
        if kind == "config":
            raise ConfigError(why)
        if kind == "mode":
            raise ModeNotApplicable(why)
        if kind == "oom":
            raise EngineError(f"out of memory: {why}\n{logs}")
        raise EngineError(msg)

    def close(self, keep_logs: bool | None = None) -> None:
        """Stop every process: ask, wait briefly, then SIGTERM and SIGKILL; then end what each one
        started (its session), and raise if anything outlives SIGKILL. Safe to call twice. The log
        folder is removed unless `keep_logs` (default: kept after a failure, which names it)."""
        for conn in self.conns:
            try:
                conn.send(("stop",))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + self.stop_timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        left = [pid for p in self.procs for pid in end_session(p.pid, grace=0 if self.dead else 2.0)]
        for fd in self._sentinels:
            if fd is not None:
                os.close(fd)
        self._sentinels = []
        for conn in self.conns:
            conn.close()
        self.conns = []
        if not self.dead:
            self.dead = "closed"
        if not (self.dead != "closed" if keep_logs is None else keep_logs):
            shutil.rmtree(self.logdir, ignore_errors=True)  # a clean close: the logs hold nothing anyone needs
        _LIVE.discard(self)
        if left:
            raise EngineError(f"processes {left} started by the {self.name}(s) still run after SIGKILL "
                              "(stuck in the kernel or driver?): the next engine may find their GPUs busy")


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (state ppid pgrp session ...); None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None


def session_members(sid: int) -> list[int]:
    """Live processes (zombies excluded) in session `sid` (Linux /proc; [] elsewhere)."""
    try:
        pids = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    return [pid for pid in pids if (st := _stat(pid)) is not None and st[0] != "Z" and int(st[3]) == sid]


def end_session(sid: int, grace: float) -> list[int]:
    """End session `sid`: what an engine process that led it started (e.g. TVM's TP workers, which
    exit when their pipe from it closes) gets `grace` seconds to exit, then SIGKILL. Returns what
    still runs. Signals go through pidfds opened and then checked to be in the session, so a pid
    reused by another process in between is never hit."""
    def wait_exit(fds, timeout: float) -> None:
        deadline, fds = time.monotonic() + timeout, list(fds)
        while fds and time.monotonic() < deadline:
            done = wait(fds, timeout=max(0.0, deadline - time.monotonic()))  # a pidfd reads when it exits
            fds = [fd for fd in fds if fd not in done]

    for attempt in range(3):  # again for anything a dying member started meanwhile
        fds = []
        for pid in session_members(sid):
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            st = _stat(pid)
            if st is not None and int(st[3]) == sid:
                fds.append(fd)
            else:
                os.close(fd)
        if not fds:
            break
        try:
            if attempt == 0 and grace > 0:
                wait_exit(fds, grace)
            for fd in fds:
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # it exited
            wait_exit(fds, 10.0)
        finally:
            for fd in fds:
                os.close(fd)
    return session_members(sid)


# -- the child's side ----------------------------------------------------------------------------------
def die_with_parent() -> None:
    """Linux: get SIGKILL when the engine's owner dies, so no child outlives it (Ctrl-C, crash)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def connect(module: str) -> tuple[object, int, int, dict]:
    """In a child started by EngineProcesses: arm the death signal, leave Ctrl-C to the parent (it
    stops us in order), connect back, and return (connection, index, count, spec)."""
    if len(sys.argv) != 4 or "LLM_BENCH_AUTHKEY" not in os.environ:
        sys.exit(f"{module} is started by llm_bench.procs.EngineProcesses, not by hand")
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from multiprocessing.connection import Client

    index, count, address = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    host, port = address.rsplit(":", 1)
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ.pop("LLM_BENCH_AUTHKEY")))
    conn.send(index)
    spec = conn.recv()
    if os.getppid() != spec["parent_pid"]:
        os._exit(1)  # the parent died before the death signal was armed
    return conn, index, count, spec


def report(conn, e: BaseException) -> None:
    """Send an exception to the parent as ("error", kind, text, traceback); see EngineProcesses."""
    kind = "error"
    if isinstance(e, ModeNotApplicable):
        kind = "mode"
    elif isinstance(e, ConfigError):
        kind = "config"
    elif "out of memory" in str(e).lower():
        kind = "oom"
    try:
        conn.send(("error", kind, f"{type(e).__name__}: {e}", traceback.format_exc()))
    except (OSError, EOFError):
        pass
