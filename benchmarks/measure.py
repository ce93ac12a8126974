"""Run a command and measure it: wall time, peak RSS, and its split into anonymous and
file-backed pages (mapped weight files count in RSS while resident, but are clean and
reclaimable: the kernel drops them under memory pressure instead of killing the process).

    run_measured(cmd, memory_limit=None) -> dict

peak_rss_mb: the child's ru_maxrss (wait4), exact, in MiB (the _mb keys are MiB throughout). peak_anon_mb / peak_file_mb: sampled from
/proc/PID/status every 50 ms (RssAnon, RssFile), so a peak shorter than that can be missed.
memory_limit (bytes): run the child in a fresh memory cgroup with that limit (cgroup v1
memory.limit_in_bytes, or v2 memory.max); the result then has the cgroup's peak usage
(page cache included, which the kernel reclaims at the limit), its failcnt and OOM kills.
drop_caches(): `sync; echo 3 > /proc/sys/vm/drop_caches` (root only) so that the next command
reads from disk.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Cgroup:
    """A memory cgroup with a limit, for one child process (v1 if mounted, else v2)."""

    def __init__(self, limit: int, name: str):
        self.limit = limit
        if (V1 / "memory.limit_in_bytes").exists():
            self.v = 1
            self.dir = V1 / name
            self.dir.mkdir()
            (self.dir / "memory.limit_in_bytes").write_text(str(limit))
            try:  # no swap to fall back on
                (self.dir / "memory.memsw.limit_in_bytes").write_text(str(limit))
            except OSError:
                pass
        elif (V2 / "cgroup.controllers").exists():
            self.v = 2
            self.dir = V2 / name
            self.dir.mkdir()
            (self.dir / "memory.max").write_text(str(limit))
        else:
            raise RuntimeError("no memory cgroup hierarchy at /sys/fs/cgroup (v1 memory/ or v2)")

    def enter(self) -> None:
        """In the child, before exec: join the cgroup."""
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def figures(self) -> dict:
        stat = {}
        for line in (self.dir / "memory.stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            stat[k] = int(v)
        if self.v == 1:
            peak = int((self.dir / "memory.max_usage_in_bytes").read_text())
            failcnt = int((self.dir / "memory.failcnt").read_text())
            oom = {}
            for line in (self.dir / "memory.oom_control").read_text().splitlines():
                k, _, v = line.partition(" ")
                oom[k] = int(v)
            return {"cgroup": "v1", "limit_mb": self.limit / 2**20, "peak_usage_mb": peak / 2**20,
                    "failcnt": failcnt, "oom_kills": oom.get("oom_kill", 0),
                    "max_rss_mb": stat.get("total_rss", stat.get("rss", 0)) / 2**20,
                    "note": "peak usage counts page cache, which the kernel reclaims at the limit"}
        peak_file = self.dir / "memory.peak"
        events = {}
        for line in (self.dir / "memory.events").read_text().splitlines():
            k, _, v = line.partition(" ")
            events[k] = int(v)
        return {"cgroup": "v2", "limit_mb": self.limit / 2**20,
                "peak_usage_mb": int(peak_file.read_text()) / 2**20 if peak_file.exists() else None,
                "oom_kills": events.get("oom_kill", 0), "max_events": events.get("max", 0),
                "note": "peak usage counts page cache, which the kernel reclaims at the limit"}

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def run_measured(cmd: list[str], *, env=None, cwd=None, memory_limit: int | None = None) -> dict:
    cg = Cgroup(memory_limit, f"kvtrace-bench-{os.getpid()}") if memory_limit else None
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=cg.enter if cg else None)
    peaks = {"anon": 0.0, "file": 0.0, "total": 0.0}
    done = threading.Event()

    def sample():
        status = Path(f"/proc/{p.pid}/status")
        while not done.is_set():
            try:
                vals = {}
                for line in status.read_text().splitlines():
                    k, _, v = line.partition(":")
                    if k in ("RssAnon", "RssFile", "VmRSS"):
                        vals[k] = int(v.split()[0]) / 1024
                if vals:
                    peaks["anon"] = max(peaks["anon"], vals.get("RssAnon", 0))
                    peaks["file"] = max(peaks["file"], vals.get("RssFile", 0))
                    peaks["total"] = max(peaks["total"], vals.get("VmRSS", 0))
            except (OSError, ValueError):
                pass
            done.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    err = []
    for line in p.stderr:  # read while it runs (a full pipe would stall the child)
        err.append(line)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    r = {"cmd": " ".join(map(str, cmd)), "wall_s": round(wall, 1), "rc": os.waitstatus_to_exitcode(status),
         "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "peak_anon_mb_sampled": round(peaks["anon"], 1),
         "peak_file_mb_sampled": round(peaks["file"], 1), "stderr_tail": "".join(err)[-3000:]}
    if cg:
        try:
            r["cgroup"] = cg.figures()
        finally:
            cg.remove()
    return r
