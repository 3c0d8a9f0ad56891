"""bench/cpu.py: a process tree's CPU counts every descendant, whichever thread forked it and
whether or not it already exited (what /proc/PID/task/PID/children missed)."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from bench.cpu import process_cpu_s, roots_by_name, tree_cpu_s

# A parent that forks from a second thread (not the main one, and alive): child A burns 0.4 s
# of CPU and exits (reaped by the parent), child B burns 0.4 s and stays alive.
PARENT = """
import subprocess, sys, threading, time
BURN = "import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.4: pass\\n"
kids = []
def fork():
    subprocess.run([sys.executable, "-c", BURN], check=True)
    kids.append(subprocess.Popen([sys.executable, "-c", BURN + "print('burnt', flush=True)\\n"
                                  "time.sleep(60)"], stdout=subprocess.PIPE, text=True))
    kids[0].stdout.readline()
    ready.set()
    time.sleep(60)  # the forking thread lives on: its children stay its own
ready = threading.Event()
threading.Thread(target=fork, daemon=True).start()
ready.wait()
print("ready", flush=True)
time.sleep(60)
"""


def test_tree_cpu_counts_exited_children_and_those_forked_by_threads() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
        own = psutil.Process(parent.pid).cpu_times()
        assert own.user + own.system < 0.35  # the parent itself hardly worked
        assert process_cpu_s(psutil.Process(parent.pid)) >= 0.38  # + child A, reaped
        total = tree_cpu_s(parent.pid)
        assert total is not None and total >= 0.76  # + child B, alive
        # The old reading: the main thread's children only, and none of them is.
        path = f"/proc/{parent.pid}/task/{parent.pid}/children"
        with open(path) as f:
            assert f.read().split() == []
    finally:
        for child in psutil.Process(parent.pid).children(recursive=True):
            child.kill()
        parent.kill()
        parent.wait(5)
        if parent.stdout is not None:
            parent.stdout.close()
    assert tree_cpu_s(parent.pid) is None  # gone (reaped)


def test_roots_by_name_finds_servers_started_since() -> None:
    since = time.time() - 1
    proc = subprocess.Popen(["sleep", "30"])
    try:
        found = roots_by_name({"sleep": "sleeper"}, since)
        assert found.get(f"sleeper:{proc.pid}") == proc.pid
        assert not roots_by_name({"sleep": "sleeper"}, time.time() + 60)  # started before
    finally:
        proc.kill()
        proc.wait(5)
