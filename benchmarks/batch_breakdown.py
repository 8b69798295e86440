"""Where a streaming micro-batch's time and CPU go: the processor's steps and the JVM's threads.

The sustained runs (benchmarks.streaming) say how fast; this says where, for the next change to
aim at. Each of sessions 28-40 rebuilt the same probe in /tmp; this is that probe, kept.

The events are benchmarks.streaming's (the sample tables, plus `--tables` synthetic ones spread with
`--skew`), replayed as the Kinesis source hands them over (a partition per shard). `--warmup`
batches go to a scratch lake first (JIT and code generation), then `--batches` batches of
`--records` lines each go to a fresh lake, back to back (no arrival schedule: the batch's own cost;
`--gap` seconds of idle between them, as a trigger leaves, when asked).

Per batch:
- `seconds`, and `steps`: when each step of the processor started and ended (seconds into the
  batch) and its time summed over threads (`busy`: the apply steps run in the pool, side by side).
- `visible_s`: when the batch's records became visible in silver (their table's commit), seconds
  into the batch, median and 95th percentile over records: the batch's own share of freshness.
- `cpu_s`: CPU seconds of this Python process and of the driver JVM by thread group, from
  /proc/<pid>/task/*/stat (Linux): Spark's tasks, the C2 and C1 JIT compilers, GC, the py4j
  threads that run the driver's calls (analysis, planning, Delta commits through Spark), the rest.
- `cores_busy_every_0.25_s`, and each step's `cores`: how many cores both processes kept busy, from
  /proc/<pid>/stat sampled every 0.1 s (CpuTimeline): where the batch leaves a core idle.
- `classes_compiled`: how many generated classes Spark compiled (Janino) in the batch, from its
  CodegenMetrics: a class whose source text is new (a per-batch literal, or a plan the codegen cache
  no longer holds), which the JIT compilers then compile again.
Results: benchmarks/results/batch_breakdown.json, one entry per `--key` (default from the shape).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pyspark.sql import DataFrame

from benchmarks import save_result
from benchmarks.streaming import _project, replay_lines, replay_records

RESULTS = Path(__file__).resolve().parent / "results" / "batch_breakdown.json"

# (module, attribute path, step): the processor's steps, timed where they are looked up at run time.
STEPS = [
    ("streaming.processor", "materialize", "parse (into the local checkpoint)"),
    ("cdcflow.cdc.multi_table", "materialize", "shared plan: checked rows (local checkpoint)"),
    ("cdcflow.cdc.multi_table", "to_arrow", "shared plan: collect"),
    ("cdcflow.cdc.apply", "merge_rows", "shared plan: delta-rs commits"),
    ("streaming.processor", "BatchProcessor._apply_table", "own plans: typed, collected, committed"),
    ("streaming.processor", "BatchProcessor._append_bronze", "bronze"),
    ("streaming.processor", "BatchProcessor._append_quarantine", "quarantine"),
]

# JVM thread name (as /proc shows it, 15 characters) -> group
THREAD_GROUPS = [
    (re.compile(r"^Executor task"), "jvm_tasks"),
    (re.compile(r"^C2 Compiler"), "jvm_c2_jit"),
    (re.compile(r"^C1 Compiler"), "jvm_c1_jit"),
    (re.compile(r"^(GC Thread|G1 )"), "jvm_gc"),
    (re.compile(r"^Thread-\d+$"), "jvm_py4j"),
]


def _resolve(module: str, path: str) -> tuple[object, str]:
    """(the object holding the attribute, its name) for `path` in `module`."""
    owner: object = importlib.import_module(module)
    *parents, attr = path.split(".")
    for name in parents:
        owner = getattr(owner, name)
    return owner, attr


class StepClock:
    """Times the STEPS while installed (`with clock.installed():`); `take()` gives and clears them."""

    def __init__(self):
        self._events: list[tuple[str, float, float]] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        saved = []
        for module, path, step in STEPS:
            owner, attr = _resolve(module, path)
            original = getattr(owner, attr)
            setattr(owner, attr, self._timed(original, step))
            saved.append((owner, attr, original))
        try:
            yield
        finally:
            for owner, attr, original in saved:
                setattr(owner, attr, original)

    def _timed(self, f, step: str):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                with self._lock:
                    self._events.append((step, start, time.perf_counter()))

        return timed

    def take(self, batch_start: float) -> dict[str, dict]:
        with self._lock:
            events, self._events = self._events, []
        steps: dict[str, dict] = {}
        for step, start, end in events:
            s = steps.setdefault(step, {"calls": 0, "start": start, "end": end, "busy": 0.0})
            s["calls"] += 1
            s["start"], s["end"] = min(s["start"], start), max(s["end"], end)
            s["busy"] += end - start
        return {step: {"calls": s["calls"], "start": round(s["start"] - batch_start, 2),
                       "end": round(s["end"] - batch_start, 2), "busy": round(s["busy"], 2)}
                for step, s in sorted(steps.items(), key=lambda kv: kv[1]["start"])}  # fmt: skip


def _ticks(stat: str) -> int:
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _process_ticks(pid: int | str) -> int:
    return _ticks(Path(f"/proc/{pid}/stat").read_text())


def classes_compiled(spark) -> int:
    """Generated classes Spark has compiled in this JVM so far (CodegenMetrics' compilation-time count)."""
    return int(spark._jvm.org.apache.spark.metrics.source.CodegenMetrics.METRIC_COMPILATION_TIME().getCount())


def cpu_ticks(jvm_pid: int) -> Counter:
    """CPU clock ticks so far: this process (`python`) and the JVM's threads by THREAD_GROUPS."""
    out = Counter({"python": _process_ticks("self")})
    for task in Path(f"/proc/{jvm_pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        group = next((g for pattern, g in THREAD_GROUPS if pattern.search(name)), "jvm_other")
        out[group] += _ticks(stat)
    return out


class CpuTimeline:
    """Cores busy over time (this process and the JVM, all their threads), sampled every `every` seconds
    from /proc by a thread while installed: where a batch leaves a core idle, which the per-batch CPU
    totals cannot say."""

    def __init__(self, jvm_pid: int, every: float = 0.1):
        self.jvm_pid, self.every = jvm_pid, every
        self.hz = os.sysconf("SC_CLK_TCK")
        self._samples: list[tuple[float, int]] = []
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._samples.append((time.perf_counter(), _process_ticks("self") + _process_ticks(self.jvm_pid)))
            self._stop.wait(self.every)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        thread = threading.Thread(target=self._sample, name="cpu-timeline", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()

    def cores(self, start: float, end: float) -> float | None:
        """Mean cores busy from `start` to `end` (perf_counter times), between the samples nearest them."""
        inside = [(t, ticks) for t, ticks in self._samples if start - self.every / 2 <= t <= end + self.every / 2]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return round((c1 - c0) / self.hz / (t1 - t0), 2)

    def series(self, start: float, end: float, step: float = 0.25) -> list[float | None]:
        """Cores busy in each `step` seconds from `start` to `end`."""
        edges = [start + k * step for k in range(int((end - start) / step) + 1)] + [end]
        return [self.cores(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]


def visible(outcomes, start: float) -> dict[str, float | None]:
    """When the batch's records became visible in silver, seconds into the batch: the median and the
    95th percentile over records (each record at its table's commit): the batch's share of freshness."""
    done = [(o.visible_at - start, o.read) for o in outcomes if o.visible_at is not None and o.read]
    if not done:
        return {"p50": None, "p95": None}
    at, weight = (np.array(x, dtype=float) for x in zip(*sorted(done), strict=True))
    share = np.cumsum(weight) / weight.sum()
    return {p: round(float(at[np.searchsorted(share, q)]), 2) for p, q in (("p50", 0.5), ("p95", 0.95))}


def breakdown(spark, tables: int, skew: float, records: int, batches: int, warmup: int, gap: float = 0.0,
              from_start: bool = False) -> dict:
    from streaming.processor import BatchProcessor

    with tempfile.TemporaryDirectory(prefix="cdcflow-breakdown-") as tmp:
        work = Path(tmp)
        config_dir, n, _, shard_lines = replay_lines(spark, work, tables, records * (warmup + batches), skew)
        t0 = time.time()

        # Arrival times (line i at t0 + i s) only fill bronze's `arrival_ts` here: no arrival schedule.
        def lines(b: int) -> DataFrame:
            return replay_records(shard_lines, b * records, min(n, (b + 1) * records), t0, 1.0)

        scratch = BatchProcessor(spark, _project(work / "warmup", config_dir))
        for b in range(warmup):
            scratch.process(lines(b), b)
        processor = BatchProcessor(spark, _project(work, config_dir))
        jvm_pid = int(spark._jvm.java.lang.ProcessHandle.current().pid())
        hz = os.sysconf("SC_CLK_TCK")
        clock, timeline, out = StepClock(), CpuTimeline(jvm_pid), []
        with clock.installed(), timeline.installed():
            for b in range(warmup, warmup + batches):
                before, compiled, start = cpu_ticks(jvm_pid), classes_compiled(spark), time.perf_counter()
                wall_start = time.time()
                outcomes = processor.process(lines(b - warmup if from_start else b), b - warmup)
                end = time.perf_counter()
                seconds = end - start
                used = cpu_ticks(jvm_pid) - before
                compiled = classes_compiled(spark) - compiled
                time.sleep(max(2 * timeline.every, gap))  # a sample after the batch's end, then the next batch
                steps = clock.take(start)
                for step in steps.values():
                    step["cores"] = timeline.cores(start + step["start"], start + step["end"])
                out.append({
                    "records": sum(o.read for o in outcomes), "tables": len(outcomes), "seconds": round(seconds, 2),
                    "cpu_s": {"total": round(sum(used.values()) / hz, 2),
                              **{k: round(v / hz, 2) for k, v in sorted(used.items())}},
                    "classes_compiled": compiled, "steps": steps, "visible_s": visible(outcomes, wall_start),
                    "cores_busy_every_0.25_s": timeline.series(start, end),
                })  # fmt: skip
                print(f"batch {b - warmup}: {seconds:.2f} s, {sum(used.values()) / hz:.2f} CPU-s, "
                      f"C2 {used['jvm_c2_jit'] / hz:.2f}, {compiled} classes compiled", flush=True)
    steady = out[1:] or out
    mean = lambda xs: round(sum(xs) / len(xs), 2)  # noqa: E731
    groups = sorted({k for b in steady for k in b["cpu_s"]})
    return {
        "tables": 4 + tables, "table_skew": skew, "records_per_batch": records, "warmup_batches": warmup,
        "measured_from_start": from_start,
        "mean_after_first": {"seconds": mean([b["seconds"] for b in steady]),
                             "cpu_s": {k: mean([b["cpu_s"].get(k, 0.0) for b in steady]) for k in groups},
                             "visible_p95_s": mean([b["visible_s"]["p95"] or 0.0 for b in steady])},
        "batches": out, "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tables", type=int, default=0, help="synthetic tables beside the 4 sample ones")
    ap.add_argument("--skew", type=float, default=0.0, help="their share ~ 1/rank^skew (0: uniform)")
    ap.add_argument("--records", type=int, default=50_000, help="lines per micro-batch")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="batches on a scratch lake first, not measured")
    ap.add_argument("--gap", type=float, default=0.0, help="idle seconds between measured batches (as a trigger leaves)")
    ap.add_argument("--from-start", action="store_true",
                    help="the measured batches take the history from its start again, as the streaming benchmark's "
                         "measured run does (default: the records after the warm-up's)")
    ap.add_argument("--key", help="the entry's name in the results (default: from the shape)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    from cdcflow.runtime import get_spark

    spark = get_spark("cdcflow-bench")
    key = args.key or f"tables_{4 + args.tables}_skew_{args.skew:g}_{args.records}_records"
    result = breakdown(spark, args.tables, args.skew, args.records, args.batches, args.warmup, args.gap,
                       args.from_start)
    stored = json.loads(args.out.read_text()) if args.out.exists() else {}
    stored[key] = result
    save_result(args.out, stored)


if __name__ == "__main__":
    main()
