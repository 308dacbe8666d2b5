"""Soak test, short form for CI: five jobs back to back in ONE engine process (``batch``, with the
body model and the detector loaded once), through the real pipeline. Every result must be a
complete bundle, and memory and open files must not grow after the first job (the warm-up).
The long form, with its figures in docs/BENCHMARKS.md, is ``python -m tests.benchmarks.bench_soak``.

The batch collects garbage and trims the heap after each job before it records the figures, so
they follow live memory: over five jobs they moved by about 1 MB here. The tolerance, 20 MB,
catches what a long batch would die of (a photo, texture or model kept per job: 3 to 50 MB each,
times four jobs) and any file handle left open per job; a slow leak of a few hundred kB a job is
the long form's business (its trend over 50 jobs).
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.benchmarks.bench_soak import growth, make_photos, run_soak

JOBS = 5
RSS_RISE_MB = 20  # the largest rise of VmRSS over its value after the first job
FD_RISE = 0  # open file descriptors after the first job


def listening_sockets() -> list[str]:
    """TCP sockets in LISTEN and bound UDP sockets that this process holds (Linux /proc)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        path = Path("/proc/self/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if inode in inodes and (state == "0A" or table.startswith("udp")):
                found.append(f"{table} {local}")
    return found


def test_jobs_back_to_back_complete_without_leaking(tmp_path):
    assert Path("/proc/self/status").exists(), "the soak test reads /proc (Linux); it cannot measure here"
    photos = make_photos(tmp_path / "photos", JOBS, subjects=("standing_f", "walking_m"))
    code, samples = run_soak(photos, tmp_path / "jobs")
    for s in samples:
        print(f"job {s.index}: code {s.code}, {s.seconds:.1f} s, RSS {s.rss_mb:.1f} MB, {s.open_fds} fds")
    assert code == 0
    assert len(samples) == JOBS
    incomplete = [f"{s.job}: {s.problem}" for s in samples if not s.complete]
    assert not incomplete, incomplete
    stats = growth(samples)
    print(stats)
    assert all(s.rss_mb > 100 and s.open_fds > 0 for s in samples)  # really measured
    assert stats["rss_growth_mb"] <= RSS_RISE_MB, stats
    assert stats["fd_growth"] <= FD_RISE, stats
    assert listening_sockets() == []  # nothing listens on a network port, even after five jobs


def test_the_socket_check_sees_a_listener():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert len(listening_sockets()) == 1
    assert listening_sockets() == []


def test_growth_sees_a_leak_and_ignores_the_warm_up():
    from tests.benchmarks.bench_soak import JobSample

    def samples(rss: list[float], fds: list[int]) -> list[JobSample]:
        return [JobSample(i, f"j{i}", 0, 1.0, r, f, True) for i, (r, f) in enumerate(zip(rss, fds))]

    steady = growth(samples([1200, 900, 901, 899, 900], [9, 7, 7, 7, 7]))  # the first job loads models
    assert steady["rss_growth_mb"] <= 1 and steady["fd_growth"] <= 0
    leak = growth(samples([900, 905, 917, 929, 941], [7, 7, 8, 9, 10]))  # 12 MB and one file a job
    assert leak["rss_growth_mb"] > RSS_RISE_MB and leak["rss_slope_mb_per_job"] > 10 and leak["fd_growth"] == 3
