"""Why training slows down far more than its CPU share on a shared, oversubscribed CPU (issue 17, deliverable 3).

Times a short, representative workload in a fresh subprocess per measurement (the OpenMP runtime reads
``OMP_*`` only when it starts, so every setting needs its own process) under each combination of

* torch threads (``OMP_NUM_THREADS`` and ``torch.set_num_threads``), e.g. 1 and 2;
* ``OMP_WAIT_POLICY``: unset (libgomp's default: spin ~300k iterations, then sleep), PASSIVE (sleep at once),
  ACTIVE (spin);
* a competing load: N busy-loop processes this script starts before the measurement and kills (by pid) after it.

Workloads (``--workloads``):

* ``micro``: IF-MMIN-sized training steps (batch 64, three 128-d branches, Linear/ReLU encoders, ``cmd_pairwise``,
  a classifier, Adam): many small ops, each a parallel region when torch has more than one thread.
* ``ifmmin``, ``nmer``: ``mmer_ext.train.fit`` of that recipe on the small synthetic preset (1 epoch of teacher and
  student, a few hundred utterances): the real training loop.

Conditions are interleaved (repeat r runs every condition once, in the same order, before repeat r+1), so a change
in the background load hits all conditions alike; every measurement records the 1-minute load average before and
after it. The report gives medians (and min-max) over the repeats. Writes ``OUT.md`` and ``OUT.json``::

    python benchmarks/shared_cpu_study.py --out benchmarks/results/shared_cpu_study-<host>-<date>
    python benchmarks/shared_cpu_study.py --workloads micro --threads 1 2 --policies unset PASSIVE --loads 0 4

Run it with the package importable (``PYTHONPATH=.`` in a source tree with the compiled library, or installed).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLICIES = ("unset", "PASSIVE", "ACTIVE")


# --------------------------------------------------------------------------------------------------------------
# Worker side: one measurement in this (fresh) process


def _micro(steps: int) -> None:
    import torch

    from mmer_ext.ops import cmd_pairwise

    torch.manual_seed(0)
    batch, dim, n_cls = 64, 128, 4
    encoders = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(), torch.nn.Linear(dim, dim)) for _ in range(3)
    )
    head = torch.nn.Linear(3 * dim, n_cls)
    params = list(encoders.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    xs = [torch.randn(batch, dim) for _ in range(3)]
    y = torch.randint(0, n_cls, (batch,))
    for _ in range(steps):
        hs = [enc(x) for enc, x in zip(encoders, xs)]
        loss = torch.nn.functional.cross_entropy(head(torch.cat(hs, 1)), y) + 0.1 * cmd_pairwise(hs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _fit(model: str, n_train: int) -> None:
    from mmer_ext.train import fit, load_config

    with tempfile.TemporaryDirectory(prefix="shared_cpu_study-") as out:
        cfg = load_config(
            None,
            ["data_options.preset=small", f"data_options.n_train={n_train}", "data_options.n_val=48",
             "data_options.n_test=64"],
            model=model, data="synthetic", epochs=1, out_dir=out, progress=False, resume=False,
            tensorboard=False,
        )
        fit(cfg, log=lambda _msg: None)


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    # Warm-up outside the timing: imports, first allocations, the op library's first dispatch.
    _micro(5)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if spec["workload"] == "micro":
        _micro(spec["steps"])
    else:
        _fit(spec["workload"], spec["n_train"])
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall_s": wall,
        "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
        "sys_s": r1.ru_stime - r0.ru_stime,
        "invol_ctx": r1.ru_nivcsw - r0.ru_nivcsw,
        "vol_ctx": r1.ru_nvcsw - r0.ru_nvcsw,
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------------------------
# Driver side


def _start_load(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def measure(workload: str, threads: int, policy: str, load: int, args: argparse.Namespace) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    spec = {"workload": workload, "threads": threads, "steps": args.steps, "n_train": args.n_train}
    procs = _start_load(load)
    try:
        time.sleep(0.3 if load else 0.0)  # let the busy loops get scheduled
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        try:
            out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, check=True,
                                 capture_output=True, text=True, timeout=args.timeout)
            result = json.loads(out.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            # Recorded as a lower bound: the median of a condition that times out is at least the timeout.
            result = {"wall_s": args.timeout, "cpu_s": float("nan"), "sys_s": float("nan"), "invol_ctx": 0,
                      "vol_ctx": 0, "torch_threads": threads, "timed_out": True}
        total = time.perf_counter() - t0
        load_after = os.getloadavg()[0]
    finally:
        _stop_load(procs)
    result.update(workload=workload, threads=threads, policy=policy, load=load, process_s=total,
                  load1_before=load_before, load1_after=load_after,
                  time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    return result


def summarise(rows: list[dict]) -> list[dict]:
    keyed: dict[tuple, list[dict]] = {}
    for r in rows:
        keyed.setdefault((r["workload"], r["threads"], r["policy"], r["load"]), []).append(r)
    quiet = {k[:3]: statistics.median(x["wall_s"] for x in v) for k, v in keyed.items() if k[3] == 0}
    out = []
    for (workload, threads, policy, load), rs in keyed.items():
        walls = [r["wall_s"] for r in rs]
        med = statistics.median(walls)
        base = quiet.get((workload, threads, policy))
        best_quiet = min((v for k, v in quiet.items() if k[0] == workload), default=None)
        out.append({
            "workload": workload, "threads": threads, "policy": policy, "load": load, "n": len(rs),
            "wall_median_s": med, "wall_min_s": min(walls), "wall_max_s": max(walls),
            "cpu_over_wall": statistics.median(r["cpu_s"] / r["wall_s"] for r in rs),
            "timeouts": sum(bool(r.get("timed_out")) for r in rs),
            "invol_ctx_median": statistics.median(r["invol_ctx"] for r in rs),
            "load1_median": statistics.median((r["load1_before"] + r["load1_after"]) / 2 for r in rs),
            "slowdown_vs_same_quiet": None if base is None or load == 0 else med / base,
            "vs_best_quiet": None if best_quiet is None else med / best_quiet,
        })
    return out


def render(meta: dict, summary: list[dict]) -> str:
    lines = [
        f"# Shared-CPU study ({meta['host']}, {meta['date']})",
        "",
        f"Machine: {meta['host']}, {meta['machine']}, {meta['cpu_count']} CPUs ({meta['usable_cpus']} usable by this "
        f"process), torch {meta['torch']} ({meta['parallel_backend']}), Python {meta['python']}. Workloads: "
        f"micro = {meta['steps']} IF-MMIN-sized training steps; ifmmin / nmer = `fit` 1 epoch per stage, "
        f"n_train {meta['n_train']}. Load = busy-loop processes started by the study, on top of whatever else ran; "
        "'load1' = median 1-minute load average during the measurements. Medians over "
        f"{meta['repeats']} interleaved repeats (min-max in brackets).",
        "",
        "| workload | threads | OMP_WAIT_POLICY | busy loops | load1 | wall median [min-max] | CPU/wall | "
        "vs same setting, no extra load | vs best without extra load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sorted(summary, key=lambda s: (s["workload"], s["load"], s["threads"], s["policy"])):
        rel = "-" if s["slowdown_vs_same_quiet"] is None else f"{s['slowdown_vs_same_quiet']:.2f}x"
        best = "-" if s["vs_best_quiet"] is None else f"{s['vs_best_quiet']:.2f}x"
        lines.append(
            f"| {s['workload']} | {s['threads']} | {s['policy']} | {s['load']} | {s['load1_median']:.1f} | "
            f"{'>= ' if s['timeouts'] * 2 > s['n'] else ''}{s['wall_median_s']:.2f} s "
            f"[{s['wall_min_s']:.2f}-{s['wall_max_s']:.2f}{' incl. timeouts' if s['timeouts'] else ''}] | "
            f"{s['cpu_over_wall']:.2f} | "
            f"{rel} | {best} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workloads", nargs="+", default=["micro", "ifmmin", "nmer"],
                   choices=("micro", "ifmmin", "nmer"))
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--loads", nargs="+", type=int, default=[0, 4],
                   help="busy-loop processes to start for a measurement (default 0 and 4)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=300, help="micro: training steps (default 300)")
    p.add_argument("--n-train", type=int, default=192, help="ifmmin / nmer: training utterances (default 192)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement before giving up")
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json (default: print the table only)")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import torch

    from mmer_ext.runtime import usable_cpus

    conditions = list(itertools.product(args.workloads, args.threads, args.policies, args.loads))
    rows: list[dict] = []
    for rep in range(args.repeats):
        for workload, threads, policy, load in conditions:
            r = measure(workload, threads, policy, load, args)
            r["repeat"] = rep
            rows.append(r)
            print(f"[{rep}] {workload:6} threads={threads} policy={policy:7} busy={load} wall={r['wall_s']:.2f}s "
                  f"cpu/wall={r['cpu_s'] / r['wall_s']:.2f} load1={r['load1_before']:.1f}->{r['load1_after']:.1f}",
                  flush=True)
    backend = next((line.split(":", 1)[1].strip() for line in torch.__config__.parallel_info().splitlines()
                    if line.startswith("ATen parallel backend")), "?")
    meta = {
        "host": socket.gethostname(), "date": datetime.date.today().isoformat(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "usable_cpus": usable_cpus(), "torch": torch.__version__,
        "parallel_backend": backend, "python": platform.python_version(), "repeats": args.repeats,
        "steps": args.steps, "n_train": args.n_train,
    }
    summary = summarise(rows)
    text = render(meta, summary)
    print(text)
    if args.out:
        from mmer_ext._atomic import atomic_write_text

        atomic_write_text(Path(args.out + ".md"), text)
        atomic_write_text(Path(args.out + ".json"),
                          json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
