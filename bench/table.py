"""The benchmarks' figures in one table: each figure, its baseline from the same run, the ratio,
the goal and whether it is met, and CPU per operation per process where the module measures it.

``bench.run_all`` prints it after the JSON lines; ``python -m bench.table < figures.jsonl``
prints it again from saved lines (each module's object names it in ``bench``).

A module run with ``--replicas N`` (N > 1) says so in ``replicas``, and bench.checkout run on
a cluster (``--nats-nodes 3``) in ``nats_nodes``; such a run's figures are kept as
``<module>@<what sets it apart>`` and shown again below the single-process ones, each figure
marked so ("[2 replicas]", "[3 nats nodes]").
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class Row:
    figure: str
    value: float
    unit: str  # "/s", "ms", "s" or "" (a count)
    baseline: float | None = None
    baseline_name: str = ""
    goal: str = ""  # as the issue states it; empty: no goal, the figure is for reading
    met: bool | None = None
    ratio: float | None = None  # value / baseline unless given
    cpu: str = ""

    @property
    def shown_ratio(self) -> float | None:
        if self.ratio is not None:
            return self.ratio
        if self.baseline:
            return self.value / self.baseline
        return None


def _cpu(per_process_us: dict[str, float]) -> str:
    return _cpu_ms({name: us / 1000 for name, us in per_process_us.items()})


def _cpu_ms(per_process_ms: dict[str, float] | None) -> str:
    if not per_process_ms:
        return ""
    # three decimals below 0.1 ms: the error-sink's 0.025 and PostgreSQL's 0.017 ms a report
    # both read "0.02" with two
    return " · ".join(f"{name} {ms:.3f}" if ms < 0.1 else f"{name} {ms:.2f}"
                      for name, ms in per_process_ms.items()) + " ms"


def webhooks(f: dict[str, Any]) -> list[Row]:
    rows = []
    for key, label in (("fsync_always", "sync_interval always"),
                       ("fsync_default", "default fsync")):
        if key not in f:  # bench.webhooks --apply-only
            continue
        r = f[key]
        ing, bare = r["ingress"], r["plain_aiohttp_awaiting_publish"]
        ratio = ing["per_second"] / bare["per_second"]
        always = key == "fsync_always"
        rows.append(Row(f"webhooks accepted ({label})", ing["per_second"], "/s",
                        bare["per_second"], "bare aiohttp awaiting the same publish",
                        "≥ 0.8" if always else "", ratio >= 0.8 if always else None,
                        cpu=_cpu_ms(ing.get("cpu_ms_per_request"))))
        rows.append(Row(f"webhooks accepted p99 ({label})", ing["p99_ms"], "ms",
                        bare["p99_ms"], "bare aiohttp awaiting the same publish, p99",
                        "≤ 50 ms" if always else "", ing["p99_ms"] <= 50 if always else None))
    # the goal is the applied events' with nats-server as boxoffice runs it (sync_interval
    # always); older output measured them with the default fsync only
    rounds = [("apply_sync_always", " (sync_interval always)", True),
              ("apply", " (default fsync)", False)] if "apply_sync_always" in f else [
              ("apply", "", True)]
    for key, label, goal in rounds:
        a = f[key]
        inserts = a["plain_insert_transactions_16_connections"]["per_second"]
        applied = a["webhook_applied"]["per_second"]
        bracketed = "rounds_per_s" in a["plain_insert_transactions_16_connections"]
        rows.append(Row(f"webhook events applied{label}", applied, "/s", inserts,
                        "plain single-row insert transactions"
                        + (", before and after" if bracketed else ""), "≥ 1.0" if goal else "",
                        applied / inserts >= 1.0 if goal else None,
                        cpu=_cpu_ms(a["webhook_applied"].get("cpu_ms_per_event"))))
        rows.append(Row(f"webhook events only recorded{label}",
                        a["webhook_recorded_only"]["per_second"], "/s", inserts,
                        "plain single-row insert transactions"))
    return rows


def errors(f: dict[str, Any]) -> list[Row]:
    # each sink run's baseline: the mean of the COPYs before and after it (older output: one)
    copy = f.get("sink_1_replica_plain_copy_per_s", f["plain_copy_per_s"])
    around = ", before and after" if "sink_1_replica_plain_copy_per_s" in f else ""
    one = f["sink_1_replica_persisted_per_s"]
    rows = [Row("error reports persisted (1 sink, sealed by ingress)", one, "/s", copy,
                "plain COPY, 10,000 rows each" + around, "≥ 0.5",
                one / copy >= 0.5 and f["sink_1_replica_lost"] == 0,
                cpu=_cpu_ms(f.get("sink_1_replica_cpu_ms_per_report")))]
    if "plain_consume_per_s" in f:  # what nats-py hands one process at most, nothing done
        rows.append(Row("error reports persisted (1 sink), against taking them off the bus alone",
                        one, "/s", f["plain_consume_per_s"],
                        "plain JetStream consume: fetch and ack, the sink's lanes",
                        cpu=f"plain consume {f['plain_consume_cpu_us_per_message'] / 1000:.3f} ms"))
    if "sink_2_replicas_persisted_per_s" in f:
        copy2 = f.get("sink_2_replicas_plain_copy_per_s", f["plain_copy_per_s"])
        rows.append(Row("error reports persisted (2 sinks)", f["sink_2_replicas_persisted_per_s"],
                        "/s", copy2, "plain COPY, 10,000 rows each" + around,
                        cpu=_cpu_ms(f.get("sink_2_replicas_cpu_ms_per_report"))))
    if "sink_1_replica_unsealed_persisted_per_s" in f:
        rows.append(Row("error reports persisted (1 sink, not sealed: scrubbed by the sink)",
                        f["sink_1_replica_unsealed_persisted_per_s"], "/s",
                        f["sink_1_replica_unsealed_plain_copy_per_s"],
                        "plain COPY, 10,000 rows each" + around,
                        cpu=_cpu_ms(f.get("sink_1_replica_unsealed_cpu_ms_per_report"))))
    rows.append(Row("error reports accepted over HTTP"
                    + (" (default fsync)" if "ingress_accepted_sync_always_per_s" in f else ""),
                    f["ingress_accepted_per_s"], "/s", f["bare_aiohttp_per_s"],
                    "bare aiohttp answering 202"))
    if "ingress_accepted_sync_always_per_s" in f:
        rows.append(Row("error reports accepted over HTTP (sync_interval always)",
                        f["ingress_accepted_sync_always_per_s"], "/s", f["bare_aiohttp_per_s"],
                        "bare aiohttp answering 202"))
    return rows


def checkout(f: dict[str, Any]) -> list[Row]:
    pi, db, http = f["payment_intents"], f["holds_hot_event_db"], f["holds_hot_event_http"]
    plain = db["plain_update_per_s"]
    # measured in rounds alternated with the holds' (older output: the SQL phase's)
    http_plain = http.get("plain_update_per_s", plain)
    cpu = {k: v for k, v in http["cpu_us_per_hold"].items()
           if k not in ("bench_client", "load_generator")}
    cpu_ms = sum(cpu.values()) / 1000
    return [
        Row("PaymentIntent overhead over a direct Stripe call, p50", pi["overhead_p50_ms"], "ms",
            pi["direct_sdk_p50_ms"], "direct stripe-python call, p50", "≤ 3 ms",
            pi["overhead_p50_ms"] <= 3.0, ratio=pi["ingress_p50_ms"] / pi["direct_sdk_p50_ms"],
            # boxoffice's processes only (the direct call of each pair does not reach them;
            # localstripe and the client serve both)
            cpu=_cpu({k: v for k, v in pi.get("cpu_us_per_pair", {}).items()
                      if k in ("ingress", "payment", "postgres", "nats-server")})),
        Row("holds on one hot event, through ingress", http["per_s"], "/s", http_plain,
            "plain single-row UPDATE" + (", rounds alternated" if "plain_update_per_s" in http
                                         else ""), "≥ 2.0", http["per_s"] / http_plain >= 2.0,
            cpu=_cpu(http["cpu_us_per_hold"])),
        Row("CPU per hold, servers together", cpu_ms, "ms", goal="≤ 0.7 ms", met=cpu_ms <= 0.7,
            cpu=_cpu(cpu)),
        Row("hold_tickets on one hot event, SQL", db["hold_tickets_per_s"], "/s", plain,
            "plain single-row UPDATE", "≥ 2.0", db["hold_tickets_per_s"] / plain >= 2.0),
        *([Row("checkouts (hold + PaymentIntent), 16 buyers at a time", f["checkouts"]["per_s"],
               "/s", f["checkouts"]["direct_payment_intents_per_s"],
               "PaymentIntents created directly at the emulator")]
          if "checkouts" in f else []),
        Row("replays of a stored Idempotency-Key", f["replays"]["per_s"], "/s", goal="≥ 3,000/s",
            met=f["replays"]["per_s"] >= 3000),
        Row("tickets oversold in a sell-out race", f["sell_out_race"]["oversold"], "", goal="0",
            met=f["goals"]["zero_oversell"]),
    ]


def reaper(f: dict[str, Any]) -> list[Row]:
    m, s = f["mass"], f["spread"]
    plain = m["baseline_plain_update"]
    plain_cpu = plain.get("cpu_us_per_hold", {}).get("postgres")
    return [
        Row(f"{m['holds']:,} holds expiring at once (committed, tickets back, events in outbox)",
            m["expire_all_s"], "s", plain["seconds"],
            "plain UPDATE of the same rows" + (f" (postgres {plain_cpu:.1f} µs per row)"
                                               if plain_cpu is not None else ""),
            "≤ 2×", m["expire_all_s"] / plain["seconds"] <= 2.0,
            cpu=" · ".join(f"{name} {us:.1f}" for name, us in m.get("cpu_us_per_hold", {}).items())
            + " µs" if m.get("cpu_us_per_hold") else ""),
        Row(f"{m['holds']:,} expiry events on JetStream"
            + (f" ({f['nats_fsync']})" if "nats_fsync" in f else ""),
            m["all_events_on_jetstream_s"], "s",
            *((m["plain_jetstream"]["seconds"],
               f"plain JetStream, as many messages in batches of {m['plain_jetstream']['batch']}")
              if "plain_jetstream" in m else ())),
        Row("new holds on the same event during the expiry, p99",
            m["new_holds_meanwhile"]["p99_ms"] or 0.0, "ms"),
        Row("expiry lag p99, holds spread over 10 s", s["lag_p99_s"], "s",
            s["original_pg_cron_every_5_min"]["lag_p99_s"], "pg_cron every 5 min (computed)",
            "≤ 1 s", s["lag_p99_s"] <= 1.0),
    ]


def bus(f: dict[str, Any]) -> list[Row]:
    """Plain JetStream: each setup against one node with nats-server's default fsync."""
    rows = []
    for way, label in (("batches", f"batches of {f['batch']}"),
                       ("atomic", f"atomic batches of {f['batch']}"),
                       ("concurrent", f"{f['concurrency']} publishers awaiting each")):
        base = f["one_node_default_fsync"][way]["per_s"]
        for setup, name in (("one_node_sync_always", "1 node, sync always"),
                            ("three_nodes_sync_always", "3 nodes (R3), sync always")):
            r = f[setup][way]
            rows.append(Row(f"plain JetStream, {name}, {label}", r["per_s"], "/s", base,
                            "1 node, default fsync, the same way",
                            cpu=f"nats {r['nats_cpu_us_per_message'] / 1000:.3f} ms"))
    return rows


def audit(f: dict[str, Any]) -> list[Row]:
    return [Row(f"incremental self-audit, {f['changes']:,} changes on {f['holds']:,} holds",
                f["incremental"]["seconds"], "s", f["full_after"]["seconds"],
                "full pass over the same history")]


EXTRACTORS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "webhooks": webhooks, "errors": errors, "checkout": checkout, "reaper": reaper,
    "audit": audit, "bus": bus}


def rows(figures: dict[str, dict[str, Any]], expected: Iterable[str] | None = None
         ) -> tuple[list[Row], list[str]]:
    """The table's rows from each module's figures, and the modules (of ``expected``, default
    all) that gave none usable."""
    out: list[Row] = []
    missing = []
    wanted = set(EXTRACTORS if expected is None else expected)
    for module, extract in EXTRACTORS.items():
        if module not in wanted:
            continue
        runs = [(module, "")] if module in figures else []
        runs += [(key, f" [{key.split('@', 1)[1]}]")
                 for key in sorted(figures) if key.startswith(f"{module}@")]
        if not runs:
            missing.append(module)
        for key, mark in runs:
            try:
                out += [replace(r, figure=r.figure + mark) for r in extract(figures[key])]
            except (KeyError, TypeError, ZeroDivisionError):
                missing.append(key)
    return out, missing


def _num(value: float, unit: str) -> str:
    if unit == "/s" or (unit == "" and float(value).is_integer()):
        return f"{value:,.0f}{unit}"
    return f"{value:,.3g} {unit}".rstrip() if value < 100 else f"{value:,.0f} {unit}".rstrip()


def render(figures: dict[str, dict[str, Any]], expected: Iterable[str] | None = None,
           console: Console | None = None) -> None:
    table = Table(title="boxoffice benchmarks: figure against its baseline from the same run")
    for name, kw in (("figure", {}), ("value", {"justify": "right"}),
                     ("baseline (same run)", {}), ("ratio", {"justify": "right"}),
                     ("goal", {}), ("met", {}), ("CPU per operation, per process", {})):
        table.add_column(name, **kw)  # type: ignore[arg-type]
    found, missing = rows(figures, expected)
    for r in found:
        ratio = r.shown_ratio
        baseline = "—" if r.baseline is None else f"{_num(r.baseline, r.unit)} {r.baseline_name}"
        met = "—" if r.met is None else ("[green]yes[/]" if r.met else "[red]NO[/]")
        shown = "—" if ratio is None else f"{ratio:.3g}"
        table.add_row(r.figure, _num(r.value, r.unit), baseline, shown, r.goal or "—", met,
                      r.cpu or "—")
    for module in missing:
        table.add_row(f"[red]bench.{module}: no figures[/]", "", "", "", "", "", "")
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    console.print(table)


def read(lines: Iterable[str]) -> dict[str, dict[str, Any]]:
    figures = {}
    for line in lines:
        if line.strip().startswith("{"):
            obj = json.loads(line)
            name = obj.get("bench") or obj.get("benchmark")
            marks = []  # what sets the run apart from the one-process, one-node run
            if (obj.get("replicas") or 1) > 1:
                marks.append(f"{obj['replicas']} replicas")
            if (obj.get("nats_nodes") or 1) > 1:
                marks.append(f"{obj['nats_nodes']} nats nodes")
            if marks:
                name = f"{name}@{', '.join(marks)}"
            figures[name] = obj
    return figures


if __name__ == "__main__":
    given = read(sys.stdin)
    render(given, {name.split("@")[0] for name in given})
