"""The fake `python -m mlc_llm.cli.worker WORKER_ID NUM_WORKERS NUM_GROUPS READ_FD WRITE_FD`, one of
the TP > 1 workers TVM's disco process pool starts (plain Popen, no parent-death signal): it serves
its pipe from the engine and exits when that pipe closes. With FAKE_MLC_WORKER_HANGS=1 it is one
stuck in a collective: it never reads the pipe and ignores SIGTERM, so only SIGKILL ends it."""
import os
import signal
import sys
import threading


def main() -> None:
    read_fd = int(sys.argv[4])
    if os.environ.get("FAKE_MLC_WORKER_HANGS") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        threading.Event().wait()
    while os.read(read_fd, 4096):
        pass


if __name__ == "__main__":
    main()
