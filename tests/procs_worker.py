"""A child for tests of overlap.procs.EngineProcesses: replies to "echo"; on "peer-killed", process 0
reports an error at once (as a rank whose collective lost its peer does) while process 1 is killed by
SIGKILL a moment later, the order in which a real rank crash is often seen."""
import os
import signal
import time

from llm_bench.procs import connect, report

conn, index, count, spec = connect("tests.procs_worker")
conn.send(("ready", {"index": index}))
while True:
    msg = conn.recv()
    if msg[0] == "stop":
        os._exit(0)
    if msg[0] == "echo":
        conn.send(("ok", msg[1]))
    elif msg[0] == "peer-killed":
        if index == 0:
            report(conn, RuntimeError("Connection reset by peer"))
            os._exit(1)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGKILL)
