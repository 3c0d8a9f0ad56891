"""CPU time of a process tree, with psutil: what the benchmarks' server and linger decisions
rest on, so it has to be whole.

A process's own `utime + stime` misses its descendants; `/proc/PID/task/PID/children` lists
only the children of the main thread (not those another thread forked: multiprocessing's
spawners, a supervisor's restarts), and misses every child that already exited. Here a tree's
CPU is the sum, over the root and every live descendant (psutil.Process.children, built from
every process's parent pid), of user + system + children_user + children_system: the last two
are what the kernel added to a parent when it reaped a child, so the CPU of descendants that
exited during a run stays counted (once: a reaped child is no longer listed).

A descendant reaped between two reads is never counted twice (the tree is read from the root
down, so its time is either in its parent's children_* or read from the child itself, never
both); at worst it is missed in that one sample and back in the next. A child whose parent
died before it is re-parented to init and leaves the tree: not a case of the gateway's (uvicorn
reaps its workers) nor of Locust's.
"""

from __future__ import annotations

import psutil


def process_cpu_s(proc: psutil.Process) -> float:
    """One process's CPU seconds, with its reaped children's."""
    t = proc.cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


def tree_cpu_s(pid: int) -> float | None:
    """CPU seconds used so far by a process and all its descendants, those that exited
    included; None when the process is gone (or can't be read)."""
    try:
        root = psutil.Process(pid)
        total = process_cpu_s(root)  # the root first: see the module's docstring
        pending = root.children()
    except psutil.Error:
        return None
    while pending:
        proc = pending.pop(0)
        try:
            total += process_cpu_s(proc)
            pending.extend(proc.children())
        except psutil.Error:  # exited since it was listed: its time is in its parent's
            continue  # children_* from the next sample on
    return total


def roots_by_name(names: dict[str, str], since: float) -> dict[str, int]:
    """{"<group>:<pid>": pid} of the processes whose name is in `names` (name -> group) that
    were created at or after `since` (epoch seconds), and whose parent is not one of them
    (a PostgreSQL postmaster, not its backends; a Redis server, not its fork for a save):
    each is measured with its tree by tree_cpu_s."""
    found: dict[int, tuple[str, int]] = {}
    for proc in psutil.process_iter(["name", "ppid", "create_time"]):
        info = proc.info
        group = names.get(info.get("name") or "")
        created = info.get("create_time")
        if group is not None and created is not None and created >= since:
            found[proc.pid] = (group, int(info.get("ppid") or 0))
    return {
        f"{group}:{pid}": pid
        for pid, (group, ppid) in found.items()
        if found.get(ppid, ("", 0))[0] != group
    }
