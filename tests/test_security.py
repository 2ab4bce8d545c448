"""Nothing an engine runs listens beyond loopback; stray local connections to the start-up listener
are dropped and the start goes on; engine log folders are removed on a clean close, and kept and
named in the error after a failure."""
import ipaddress
import json
import os
import re
import shutil
import socket
import tempfile
import threading
from multiprocessing.connection import Connection, Listener, answer_challenge

import pytest

from llm_bench import procs
from llm_bench.engine import ConfigError, EngineError
from overlap.config import EngineConfig, from_hf_config
from overlap.engine import TPEngine
from tests.helpers import alive


def _address(hexaddr: str):
    """An address of /proc/net/tcp{,6}: hex host in 32-bit little-endian words, hex port."""
    host, port = hexaddr.split(":")
    raw = bytes.fromhex(host)
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))), int(port, 16)


def listening(pids) -> list[tuple[int, object, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state that one of `pids` holds."""
    owner = {}
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
            if m:
                owner[m.group(1)] = pid
    found = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/net/{table}") as f:
            for cols in (line.split() for line in list(f)[1:]):
                if cols[3] == "0A" and cols[9] in owner:  # 0A: LISTEN
                    found.append((owner[cols[9]], *_address(cols[1])))
    return found


def loopback(addr) -> bool:
    return addr.is_loopback or bool(getattr(addr, "ipv4_mapped", None) and addr.ipv4_mapped.is_loopback)


def environment(pid: int) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(v.decode().split("=", 1) for v in f.read().split(b"\0") if b"=" in v)


def test_nothing_listens_beyond_loopback_while_a_tp2_engine_runs():
    """Every listening socket of the engine's processes is on loopback (a TCP rendezvous store
    listened on all interfaces). Where the host name resolves to loopback, as here, gloo binds there
    anyway: the interface the ranks are told to use is checked too."""
    with TPEngine(EngineConfig(model="tiny", tp=2, max_seq=16, engine_timeout=120)) as eng:
        eng.generate([[1, 2, 3]], 4)
        socks = listening([os.getpid(), *eng.procs.pids])
        envs = [environment(pid) for pid in eng.procs.pids]
    assert socks, "gloo's ranks listen for their pairs: finding no socket means this scan is broken"
    assert [s for s in socks if not loopback(s[1])] == [], socks
    for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        assert [e.get(k) for e in envs] == [os.environ.get(k, "lo")] * 2, k


def test_stray_connections_at_start_up_are_dropped(monkeypatch):
    """Before any process connects, the start-up listener holds a silent connection, one closed at
    once, one that sends garbage and one that answers with the wrong key: each is dropped and the
    start goes on."""
    strays, wrong_key = [], []

    def answer_with_wrong_key(sock):
        sock.settimeout(None)  # a Connection reads its descriptor blocking
        try:
            answer_challenge(Connection(sock.detach()), b"not the key")
        except Exception as e:  # noqa: BLE001 - what this client saw is the result
            wrong_key.append(type(e).__name__)

    class StraysFirst(Listener):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            connect = [socket.create_connection(self.address, timeout=10) for _ in range(4)]
            connect[1].close()
            connect[2].sendall(b"\x00\x00\x00\x05hello")
            threading.Thread(target=answer_with_wrong_key, args=(connect[3],), daemon=True).start()
            strays.extend(connect[:3:2])  # connect[0] stays open and says nothing

    monkeypatch.setattr(procs, "Listener", StraysFirst)
    started = []
    t = threading.Thread(target=lambda: started.append(procs.EngineProcesses(
        "tests.procs_worker", 2, {}, tempfile.mkdtemp(prefix="procs-test-"), start_timeout=60)), daemon=True)
    t.start()
    t.join(60)
    hung = t.is_alive()
    for s in strays:
        s.close()  # frees a start-up stuck on the silent one, so nothing is left behind
    t.join(90)
    pids = [x for p in started for x in p.pids]
    try:
        assert not hung, "a silent stray connection held the start-up"
        assert started, "start-up failed"
        assert started[0].ready == [{"index": 0}, {"index": 1}]
        assert wrong_key == ["AuthenticationError"]
    finally:
        for p in started:
            p.close()
    assert not any(alive(x) for x in pids)


def test_the_log_folder_goes_with_a_clean_close():
    eng = TPEngine(EngineConfig(model="tiny", tp=2, max_seq=16, engine_timeout=120))
    logdir = eng.logdir
    assert os.path.isfile(os.path.join(logdir, "rank1.log"))
    eng.generate([[1, 2, 3]], 2)
    eng.close()
    assert not os.path.exists(logdir)


def test_the_log_folder_is_kept_and_named_after_a_crash():
    eng = TPEngine(EngineConfig(model="tiny", tp=2, max_seq=16, engine_timeout=120))
    logdir = eng.logdir
    try:
        with pytest.raises(EngineError) as e:
            eng.crash_rank(1)
        assert f"logs kept in {logdir}" in str(e.value)
        assert os.path.isfile(os.path.join(logdir, "rank1.log"))
    finally:
        eng.close()
        shutil.rmtree(logdir, ignore_errors=True)


def test_a_rank_that_refuses_at_start_up_leaves_no_folder(tmp_path, monkeypatch):
    """A refusal (ConfigError) from a rank is no crash: its one line says all, no folder is left."""
    from tests.test_refusals import GOOD, checkpoint

    ckpt = checkpoint(tmp_path)
    cfg = from_hf_config(ckpt)
    (ckpt / "config.json").write_text(json.dumps(dict(GOOD, num_key_value_heads=3)))  # after the parent's check
    monkeypatch.setattr("overlap.engine.resolve_model", lambda model: cfg)
    made = []
    real_mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: made.append(real_mkdtemp(**kw)) or made[-1])
    with pytest.raises(ConfigError, match="num_attention_heads 4 is not a multiple of num_key_value_heads 3"):
        TPEngine(EngineConfig(model=str(ckpt), tp=1, max_seq=16, engine_timeout=120))
    assert made and not os.path.exists(made[0])


def test_many_silent_strays_do_not_hold_the_start_up(monkeypatch):
    """14 silent connections held a one-at-a-time handshake for 14 x 5 s: past the 60 s deadline, and
    the error blamed the ranks. Handshakes now run side by side: the start goes on at once."""
    strays = []

    class SilentStraysFirst(Listener):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            strays.extend(socket.create_connection(self.address, timeout=10) for _ in range(14))

    monkeypatch.setattr(procs, "Listener", SilentStraysFirst)
    p = None
    try:
        p = procs.EngineProcesses("tests.procs_worker", 2, {}, tempfile.mkdtemp(prefix="procs-test-"),
                                  start_timeout=60)
        assert p.ready == [{"index": 0}, {"index": 1}]
    finally:
        for s in strays:
            s.close()
        if p is not None:
            p.close()


SLOW_WORKER = "import time\ntime.sleep(60)\n"  # started, never connects back


def test_ranks_that_do_not_connect_are_named_with_the_strays_seen(monkeypatch, tmp_path):
    (tmp_path / "never_connects").mkdir()  # a package: its folder goes on the processes' PYTHONPATH
    (tmp_path / "never_connects" / "__init__.py").write_text("")
    (tmp_path / "never_connects" / "__main__.py").write_text(SLOW_WORKER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(procs, "CONNECT_S", 2.0)
    strays = []

    class StraysFirst(Listener):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            strays.extend(socket.create_connection(self.address, timeout=10) for _ in range(2))
            strays[0].sendall(b"\x00\x00\x00\x05hello")  # a wrong answer; strays[1] stays silent

    monkeypatch.setattr(procs, "Listener", StraysFirst)
    logdir = tempfile.mkdtemp(prefix="procs-test-")
    try:
        with pytest.raises(EngineError) as e:
            procs.EngineProcesses("never_connects", 2, {}, logdir, start_timeout=60)
    finally:
        for s in strays:
            s.close()
        shutil.rmtree(logdir, ignore_errors=True)
    first = str(e.value).splitlines()[0]
    # The silent one is still in its 5 s handshake; the wrong answer was dropped at once (or, on a box
    # too busy to get to it within 2 s, is still in its handshake too).
    assert re.fullmatch(r"rank\(s\) \[0, 1\] did not connect within 2 s; meanwhile the start-up listener "
                        r"(dropped 1 local connection\(s\) that were not the ranks \(failed authentication from "
                        r"127\.0\.0\.1:\d+\) and had 1|had 2) connection\(s\) still authenticating \(another "
                        r"local process connecting to this port\?\)", first), first
