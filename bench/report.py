"""The bench's tables: one per part, then the issue's targets, each met or not."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rich import box
from rich.table import Table

from bench import latency as lat
from bench.attributes import AttributeListing
from bench.common import POOL_LABELS, console, median
from bench.dbos_steps import Dbos
from bench.latency import Counts, Samples
from bench.replay import Replay
from bench.throughput import BULK, CPU_PARTS, START_THREADS, Starts, Throughput
from bench.timers import Lateness


@dataclass
class Results:
    """Whatever parts ran; a part that did not run is None or empty."""

    latency: dict[str, Samples] = field(default_factory=dict)
    counts: Counts | None = None
    throughput: Throughput | None = None
    throughput_pool: str = ""
    starts: Starts | None = None
    timers: list[Lateness] = field(default_factory=list)
    replay: Replay | None = None
    local_inprocess: list[float] = field(default_factory=list)
    dbos: Dbos | None = None
    attributes: AttributeListing | None = None


def _table(title: str, *headers: str) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right")
    return table


def _x(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def report(results: Results) -> None:
    """Print every table of the parts that ran, then the targets."""
    if results.latency:
        report_latency(results.latency)
    if results.counts is not None:
        report_counts(results.counts)
    if results.throughput is not None:
        report_throughput(results.throughput, results.throughput_pool)
    if results.starts is not None:
        report_starts(results.starts)
    if results.timers:
        report_timers(results.timers)
    if results.replay is not None:
        report_replay(results.replay)
    if results.local_inprocess or results.dbos is not None:
        report_dbos(results.local_inprocess, results.dbos)
    if results.attributes is not None:
        report_attributes(results.attributes)
    report_targets(results)


def report_latency(results: dict[str, Samples]) -> None:
    table = _table(
        "(a) Latency, ms per step (median total / N)",
        "worker",
        "N",
        "plain\nno backend",
        "plain\n+backend",
        "durable\nlast step",
        "durable\ncommitted",
        "durable\nresult()",
        "activation\nstart\ncommitted",
        "last step\n÷ plain",
        "result()\n÷ +backend",
    )
    for pool, samples in results.items():
        for n, _ in lat.SIZES:
            if n not in samples.durable_done:
                continue
            plain, backend = samples.ms_per_step("plain", n), samples.ms_per_step("backend", n)
            last = samples.ms_per_step("durable_last", n)
            done = samples.ms_per_step("durable_done", n)
            returned = samples.ms_per_step("durable_result", n)
            activated = (
                samples.ms_per_step("activated_done", n)
                if n in samples.activated_done
                else math.nan
            )
            table.add_row(
                POOL_LABELS[pool],
                str(n),
                f"{plain:.2f}",
                f"{backend:.2f}",
                f"{last:.2f}",
                f"{done:.2f}",
                f"{returned:.2f}",
                f"{activated:.2f}",
                _x(last / plain),
                _x(returned / backend),
            )
    console.print(table)
    console.print(
        "Each run is timed from just before apply_async() / start() until: the last link /"
        " step (the same task)\npushed its time to a Redis list (plain no backend, durable last"
        " step); .get() returned (plain +backend);\nthe transaction committing the run's result"
        " read the server's clock (durable committed, started eagerly, the default; activation"
        " start:\nthe same workflow started with eager_start off); run.result(), waiting from"
        " the start, returned (durable result())."
    )
    added = _table(
        "(a) Each added remote step, ms: (total at N=100 - at N=10) / 90",
        "worker",
        "plain hop\nno backend",
        "durable step\n(last step ran)",
        "ratio",
        "target",
    )
    for pool, samples in results.items():
        if 100 in samples.durable_last and 10 in samples.durable_last:
            plain = samples.ms_per_added_step("plain")
            step = samples.ms_per_added_step("durable_last")
            added.add_row(
                POOL_LABELS[pool], f"{plain:.2f}", f"{step:.2f}", _x(step / plain), "≤ 1.15x"
            )
    console.print(added)
    limited = _table(
        "(i) A step under a concurrency limit, ms per step (durable committed, median total / N)",
        "worker",
        "N",
        "durable\nunlimited",
        "durable\nlimited",
        "limited\n÷ unlimited",
    )
    for pool, samples in results.items():
        for n, _ in lat.SIZES:
            if n in samples.limited_done and n in samples.durable_done:
                free = samples.ms_per_step("durable_done", n)
                held = samples.ms_per_step("limited_done", n)
                cells = (f"{free:.2f}", f"{held:.2f}", _x(held / free))
                limited.add_row(POOL_LABELS[pool], str(n), *cells)
    console.print(limited)
    console.print(
        "A limited step is written queued, then admitted (the key's advisory lock and one"
        " statement) and sent after\nthe commit; its settle admits the next of its key, and it"
        " never runs unclaimed. The limit never binds here."
    )
    local = _table(
        f"Local steps ({lat.LOCAL_STEPS} in one workflow, on the worker)", "worker", "ms/step"
    )
    for pool, samples in results.items():
        if samples.local:
            local.add_row(
                POOL_LABELS[pool], f"{median(samples.local) / lat.LOCAL_STEPS * 1000:.3f}"
            )
    console.print(local)
    console.print("(median of runs, from start() to the NOTIFY of the committed result, / steps)")


def report_counts(counts: Counts) -> None:
    per_step = counts.transactions / lat.COUNT_STEPS
    n = lat.COUNT_STEPS
    console.print(
        f"(f) PostgreSQL per durable step: {counts.rows / n:.2f} rows written (inserted,"
        f" updated or deleted in durable's tables), {counts.wal_bytes / n:,.0f} bytes of WAL,"
        f" {counts.backend_cpu / n * 1000:.2f} ms of CPU in the backends serving the bench"
        f" database ({counts.server_cpu / n * 1000:.2f} ms in all of the server's processes,"
        " whatever else they served; psutil)."
    )
    console.print(
        f"(f) PostgreSQL per durable step: {per_step:.2f} transactions: xact_commit of the bench"
        f" database before and after\none {lat.COUNT_STEPS}-step run on the solo worker, divided"
        f" by {lat.COUNT_STEPS} (start() and the run's end included). durable runs each\nstatement"
        " in autocommit: one statement is one transaction, one round trip."
    )
    table = _table(
        f"(f) Worker statements, one {lat.COUNT_STEPS}-step run",
        "statement",
        "count",
        "per step",
        "ms each\n(worker)",
    )
    for label, number in sorted(counts.statements.items(), key=lambda item: -item[1]):
        ms = counts.seconds.get(label, 0.0) / number * 1000
        table.add_row(label, str(number), f"{number / lat.COUNT_STEPS:.2f}", f"{ms:.2f}")
    console.print(table)
    report_table_writes(counts)
    if counts.round_trips:
        trips = ", ".join(
            f"{ms * 1000:.2f} ms after {idle * 1000:g} ms idle"
            for idle, ms in counts.round_trips.items()
        )
        console.print(
            f"(f) One statement's round trip (the result read, one row by its key, prepared,"
            f" from the caller; median of {lat.IDLE_READS}): {trips}. Every statement of a"
            " step, a start or a result wait meets a connection and a server process that"
            " sat idle."
        )


def report_table_writes(counts: Counts) -> None:
    """Rows written per step, table by table, and the share of updates that were HOT."""
    n = lat.COUNT_STEPS
    table = _table(
        f"(f) Rows written per step, one {n}-step run",
        "table",
        "inserted",
        "updated",
        "of which HOT",
        "deleted",
    )
    for name, writes in sorted(counts.tables.items()):
        table.add_row(
            name,
            f"{writes.inserted / n:.2f}",
            f"{writes.updated / n:.2f}",
            f"{writes.hot / n:.2f}",
            f"{writes.deleted / n:.2f}",
        )
    console.print(table)
    share = counts.hot_updates / counts.updates if counts.updates else 0.0
    console.print(
        f"(f) {share:.0%} of the updates were HOT (a new row version on the same page, no"
        " index entry written): n_tup_hot_upd over n_tup_upd of pg_stat_user_tables."
    )


def report_throughput(result: Throughput, pool: str) -> None:
    from bench.throughput import FLOWS, STEPS

    plain = median(result.plain)
    last, done = median(result.durable_last), median(result.durable_done)
    table = _table(
        f"(b) Throughput, steps/s: {FLOWS} concurrent {STEPS}-step runs"
        f" ({POOL_LABELS.get(pool, pool)}, median of {len(result.plain)})",
        "plain chains\nno backend",
        "durable\nlast step ran",
        "durable\ncommitted",
        "last step\n÷ plain",
        "committed\n÷ plain",
    )
    table.add_row(f"{plain:.0f}", f"{last:.0f}", f"{done:.0f}", _x(last / plain), _x(done / plain))
    console.print(table)
    if not result.cpu_plain or not result.cpu_durable:
        return
    table = _table(
        "(b) CPU per step by process, ms (median of the same batches)",
        "process",
        "plain chains",
        "durable",
        "durable\n- plain",
    )
    totals = [0.0, 0.0]
    for part in CPU_PARTS:
        cpu = [result.cpu_ms_per_step(kind, part) for kind in ("plain", "durable")]
        totals = [t + c for t, c in zip(totals, cpu, strict=True)]
        table.add_row(part, f"{cpu[0]:.2f}", f"{cpu[1]:.2f}", f"{cpu[1] - cpu[0]:+.2f}")
    table.add_row("all", f"{totals[0]:.2f}", f"{totals[1]:.2f}", f"{totals[1] - totals[0]:+.2f}")
    console.print(table)
    console.print(
        "(user + system CPU of each process over the batch / its 2,000 steps; PostgreSQL is"
        " all of the server's processes, Redis every redis-server; on 2 cores, a batch cannot"
        " run faster than its total CPU / 2)"
    )


def report_starts(result: Starts) -> None:
    table = _table(
        "(c) Starts per second (median; no worker consuming)",
        "caller threads",
        "plain\napply_async",
        "durable\nstart()",
        "durable\n÷ plain",
    )
    for threads in START_THREADS:
        plain, durable = result.rate("plain", threads), result.rate("durable", threads)
        table.add_row(str(threads), f"{plain:.0f}", f"{durable:.0f}", _x(durable / plain))
    console.print(table)
    if result.many:
        many, plain = median(result.many), median(result.bulk_plain)
        console.print(
            f"(c) {BULK:,} runs in one durable.start_many call: {many:.0f} starts/s; {BULK:,}"
            f" apply_async calls in a row: {plain:.0f} sends/s; {_x(many / plain)}"
        )


def report_timers(results: list[Lateness]) -> None:
    table = _table(
        "(d) Timer lateness, ms (durable beat)",
        "pending timers",
        "fired",
        "p50",
        "p99",
        "max",
    )
    for each in results:
        table.add_row(
            f"{each.pending:,}",
            str(len(each.seconds)),
            f"{each.ms(0.5):.1f}",
            f"{each.ms(0.99):.1f}",
            f"{each.ms(1.0):.1f}",
        )
    console.print(table)
    console.print("(PostgreSQL's now() - fire_at in the statement that fired each timer)")


def report_replay(result: Replay) -> None:
    table = _table(
        f"(e) One activation replaying {result.steps:,} steps (median of {len(result.seconds)})",
        "activation, ms",
        "statements",
        "in SQL, ms",
        "of which acquire\n+ history, ms",
        "history size",
    )
    table.add_row(
        f"{result.ms:.2f}",
        f"{median(result.statements):.0f}",
        f"{median(result.sql_seconds) * 1000:.2f}",
        f"{median(result.acquire_seconds) * 1000:.2f}",
        f"{result.history_bytes / 1024:.0f} KiB",
    )
    console.print(table)
    console.print(
        f"Recording that history (first activation, {result.steps:,} local steps, one statement"
        f" each): {result.record_seconds / result.steps * 1000:.3f} ms/step."
    )


def report_dbos(durable_seconds: list[float], dbos: Dbos | None) -> None:
    from bench.replay import LOCAL_STEPS

    ours = median(durable_seconds) / LOCAL_STEPS * 1000 if durable_seconds else math.nan
    if dbos is None or dbos.missing:
        why = dbos.missing if dbos is not None else "not measured"
        line = f"(g) durable local step in-process: {ours:.3f} ms/step; DBOS: {why}"
        console.print(line, markup=False)  # "[bench]" in the hint is not rich markup
        return
    theirs = median(dbos.seconds) / dbos.steps * 1000
    table = _table(
        f"(g) ms per local step against DBOS {dbos.version}",
        "durable\nlocal=True",
        "DBOS\n@DBOS.step",
        "durable\n÷ DBOS",
    )
    table.add_row(f"{ours:.3f}", f"{theirs:.3f}", _x(ours / theirs))
    console.print(table)
    console.print(
        f"(median of runs of a {LOCAL_STEPS}-step workflow in the caller's process, from start to"
        " the commit of its result)"
    )


def report_attributes(found: AttributeListing) -> None:
    table = _table(
        f"(h) durable list --attr customer=42 --status running, {found.runs:,} runs",
        "runs listed",
        "median ms",
        "p95 ms",
        "GIN index",
    )
    table.add_row(
        str(found.matched),
        f"{found.ms():.2f}",
        f"{found.ms(0.95):.2f}",
        "used" if found.uses_index else "not used",
    )
    console.print(table)
    console.print("(admin.list_runs as the command calls it, on one connection; the plan:)")
    console.print(found.plan, markup=False, highlight=False)


def _targets(results: Results) -> list[tuple[str, str, bool | None]]:
    rows: list[tuple[str, str, bool | None]] = []
    for pool, samples in results.latency.items():
        if 100 in samples.durable_last and 10 in samples.durable_last:
            ratio = samples.ms_per_added_step("durable_last") / samples.ms_per_added_step("plain")
            rows.append(
                (f"added remote step ≤ 1.15x a plain hop ({pool})", _x(ratio), ratio <= 1.15)
            )
    for pool, samples in results.latency.items():
        for n, most in ((1, 2.0), (10, 1.3)):
            if n in samples.durable_result:
                ratio = samples.total("durable_result", n) / samples.total("backend", n)
                what = "a task's" if n == 1 else "the chain's"
                rows.append(
                    (
                        f"{n}-step start()→result() ≤ {most}x {what} .get() ({pool})",
                        _x(ratio),
                        ratio <= most,
                    )
                )
        if samples.result_wait_acked:
            ms = median(samples.result_wait_acked) * 1000
            rows.append(
                (f"result() ≤ 1 ms after the ending commit ({pool})", f"{ms:.2f} ms", ms <= 1.0)
            )
        if samples.result_wait:
            ms = median(samples.result_wait) * 1000
            rows.append(
                (
                    f"result() after the ending transaction's clock, flush included ({pool})",
                    f"{ms:.2f} ms",
                    None,
                )
            )
    if results.starts is not None and results.starts.many:
        ratio = median(results.starts.many) / median(results.starts.bulk_plain)
        rows.append(
            (f"{BULK:,} starts in bulk ≥ 0.8x {BULK:,} apply_async", _x(ratio), ratio >= 0.8)
        )
    if results.throughput is not None:
        ratio = median(results.throughput.durable_done) / median(results.throughput.plain)
        rows.append(("throughput ≥ 0.7x plain Celery (issue 19)", _x(ratio), ratio >= 0.7))
        rows.append(("throughput ≥ 0.8x plain Celery (committed)", _x(ratio), ratio >= 0.8))
    if results.counts is not None:
        n = lat.COUNT_STEPS
        cpu = results.counts.backend_cpu / n * 1000
        rows.append(("PostgreSQL CPU per step ≤ 0.6 ms (backends)", f"{cpu:.2f} ms", cpu <= 0.6))
        written = results.counts.rows / n
        rows.append(("rows written per step ≤ 3", f"{written:.2f}", written <= 3))
        wal = results.counts.wal_bytes / n
        rows.append(("WAL per step (no target)", f"{wal:,.0f} bytes", None))
        updates = results.counts.updates
        hot = results.counts.hot_updates / updates if updates else 0.0
        rows.append(("HOT share of updates (no target)", f"{hot:.0%}", None))
    for pool, samples in results.latency.items():
        if samples.local:
            ms = median(samples.local) / lat.LOCAL_STEPS * 1000
            rows.append((f"local step ≤ 1 ms (worker, {pool})", f"{ms:.3f} ms", ms <= 1.0))
    if results.local_inprocess:
        from bench.replay import LOCAL_STEPS

        ms = median(results.local_inprocess) / LOCAL_STEPS * 1000
        rows.append(("local step ≤ 1 ms (in-process)", f"{ms:.3f} ms", ms <= 1.0))
    for each in results.timers:
        if each.pending >= 100_000:
            p99 = each.ms(0.99)
            rows.append(
                (f"timer p99 ≤ 100 ms, {each.pending:,} pending", f"{p99:.1f} ms", p99 <= 100)
            )
    if results.replay is not None:
        ms = results.replay.ms
        rows.append((f"{results.replay.steps:,}-step replay ≤ 20 ms", f"{ms:.1f} ms", ms <= 20))
        reads = median(results.replay.statements)
        rows.append(("history loaded in one query", f"{reads:.0f} statements (1 read)", None))
    if results.attributes is not None:
        ms = results.attributes.ms()
        met = ms < 50 and results.attributes.uses_index
        rows.append((f"list --attr, {results.attributes.runs:,} runs < 50 ms", f"{ms:.2f} ms", met))
    return rows


def report_targets(results: Results) -> None:
    rows = _targets(results)
    if not rows:
        return
    table = _table(
        "Targets of the issue (ratios measured in this run)", "target", "measured", "met"
    )
    for name, value, met in rows:
        shown = "-" if met is None else ("[green]yes[/]" if met else "[red]no[/]")
        table.add_row(name, value, shown)
    console.print(table)
    console.print(
        "result() after the ending commit: from the worker's run-ending statement returning"
        " (its commit done and flushed) to run.result() returning in the caller."
    )
    console.print("Timings on a shared machine are noisy: compare ratios from one run.")
