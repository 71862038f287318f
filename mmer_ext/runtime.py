"""How many CPU threads torch should use here, and a warning when the machine is oversubscribed.

On a CPU shared with other jobs, torch's default (one OpenMP thread per core) is the wrong choice: every small op
is a parallel region whose barrier waits for *all* its threads, and under oversubscription the kernel has usually
descheduled one of them. With libgomp's default wait policy the waiting thread spins away the time slice the
awaited one needs, and each op costs a scheduler time slice instead of microseconds (README, "Performance notes",
measured by ``benchmarks/shared_cpu_study.py``). The command line therefore makes the threads sleep at once
(``OMP_WAIT_POLICY=PASSIVE``, :func:`prefer_passive_wait`) and uses one thread per usable CPU; where the threads
spin anyway (a user's explicit policy) and the load average says the CPUs are taken, a single thread, which has no
barrier and slows down only by its share of the CPU.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ThreadChoice", "choose_threads", "configure_threads", "load_average", "oversubscribed",
           "prefer_passive_wait", "usable_cpus"]

# Load average (runnable + uninterruptible tasks, 1-minute mean) per usable CPU above which the machine counts as
# oversubscribed: 1.5 leaves room for the odd short job without flipping a quiet workstation to one thread.
OVERSUBSCRIBED_LOAD_PER_CPU = 1.5


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup's CPU quota (v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``), or None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus(*, affinity: int | None = None, cgroup_limit: float | None = None) -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (rounded up), at least 1.

    ``affinity`` / ``cgroup_limit`` replace what the system reports (for tests).
    """
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            affinity = os.cpu_count() or 1
    limit = _cgroup_cpu_limit() if cgroup_limit is None else cgroup_limit
    cpus = affinity if limit is None else min(affinity, math.ceil(limit))
    return max(1, cpus)


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def oversubscribed(load: float | None, cpus: int) -> bool:
    """True when the load average exceeds ``OVERSUBSCRIBED_LOAD_PER_CPU`` runnable tasks per usable CPU."""
    return load is not None and load > OVERSUBSCRIBED_LOAD_PER_CPU * cpus


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str  # "requested", "OMP_NUM_THREADS", "oversubscribed" or "usable CPUs"
    cpus: int
    load: float | None
    warning: str | None  # one line to show the user, or None


def choose_threads(requested: int | None = None, *, cpus: int | None = None, load: float | None = None,
                   environ: dict[str, str] | None = None) -> ThreadChoice:
    """The thread count for torch's intra-op pool. Pure: ``cpus`` / ``load`` / ``environ`` default to this machine's.

    ``requested`` (``--threads``) wins; then a valid ``OMP_NUM_THREADS`` (the user's explicit choice); then, on an
    oversubscribed machine whose OpenMP threads spin (``OMP_WAIT_POLICY`` not PASSIVE), one thread; else the usable
    CPUs (with PASSIVE threads two threads beat one even on a busy machine in the study). The warning is set
    whenever the machine is oversubscribed, so an explicit choice is told too.
    """
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
        raise ValueError(f"--threads must be a positive integer, got {requested!r}")
    cpus = usable_cpus() if cpus is None else cpus
    load = load_average() if load is None else load
    environ = os.environ if environ is None else environ
    busy = oversubscribed(load, cpus)
    passive = environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
    env_threads = _positive_int(environ.get("OMP_NUM_THREADS"))
    if requested is not None:
        threads, reason = requested, "requested"
    elif env_threads is not None:
        threads, reason = env_threads, "OMP_NUM_THREADS"
    elif busy and not passive:
        threads, reason = 1, "oversubscribed"
    else:
        threads, reason = cpus, "usable CPUs"
    warning = None
    if busy:
        plural = "s" if threads != 1 else ""
        if reason == "oversubscribed":
            advice = "using 1 torch thread, as OpenMP threads spin here (OMP_WAIT_POLICY is not PASSIVE)"
        elif reason == "usable CPUs":
            advice = f"using {threads} torch thread{plural} with OMP_WAIT_POLICY=PASSIVE"
        else:
            advice = f"using {threads} torch thread{plural} as asked ({reason})"
            if threads > 1 and not passive:
                advice += "; without OMP_WAIT_POLICY=PASSIVE, 1 thread is much faster on a busy machine"
        warning = (f"the machine is oversubscribed (load average {load:.1f} on {cpus} usable CPU"
                   f"{'s' if cpus != 1 else ''}): expect slow training; {advice} (--threads N to override)")
    return ThreadChoice(threads, reason, cpus, load, warning)


def configure_threads(requested: int | None = None, **kwargs) -> ThreadChoice:
    """Apply :func:`choose_threads` to torch (``torch.set_num_threads``) and warn once if oversubscribed."""
    import torch

    choice = choose_threads(requested, **kwargs)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    if choice.warning:
        warnings.warn(choice.warning, RuntimeWarning, stacklevel=2)
    return choice


def prefer_passive_wait(environ: dict[str, str] | None = None, *, argv0: str | None = None,
                        orig_argv: list[str] | None = None, torch_loaded: bool | None = None) -> bool:
    """In the ``mmer-ext`` command, before torch loads, default ``OMP_WAIT_POLICY`` to PASSIVE; True if it did.

    libgomp (torch's OpenMP runtime on Linux) reads ``OMP_WAIT_POLICY`` once, when the library is loaded by
    ``import torch``, and offers no call to change it later, so this must run first (``mmer_ext/__init__.py``).
    Unset, a thread that reaches a barrier spins before it sleeps; on a busy CPU the spinning threads take the
    time slices the awaited thread needs, and small ops slow down by orders of magnitude (README, "Performance
    notes"). PASSIVE threads sleep at once. Only the command line gets it: a program importing the package keeps
    its own settings, and an explicit ``OMP_WAIT_POLICY`` is never overridden. Arguments replace the process's
    (for tests).
    """
    environ = os.environ if environ is None else environ
    torch_loaded = "torch" in sys.modules if torch_loaded is None else torch_loaded
    argv0 = (sys.argv[0] if sys.argv else "") if argv0 is None else argv0
    orig_argv = list(getattr(sys, "orig_argv", [])) if orig_argv is None else orig_argv
    # The same test as mmer_ext._build.started_as_cli, which cannot be imported before torch.
    cli = os.path.basename(argv0) in ("mmer-ext", "mmer-ext.exe") or any(
        a == "-m" and b in ("mmer_ext", "mmer_ext.cli") for a, b in zip(orig_argv, orig_argv[1:]))
    if not cli or torch_loaded or environ.get("OMP_WAIT_POLICY"):
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and value >= 1 else None
