#!/usr/bin/env python3
"""Bytes an embedded (SQLite) ledger writes per telemetry batch, for table layouts and
checkpoint settings, without the server: a model of its group commit.

Each simulated second, every node sends one batch (a `batches` row, one host and one chain
sample of about 300 bytes, and an upsert of its `nodes` row), in random node order, and
groups of 512 batches are committed in one transaction with WAL and `synchronous = FULL`,
as the server does. The figure is the process's `write_bytes` (WAL appends plus checkpoints)
per batch over the last two thirds of the run.

Layouts:
  rowid    what the server uses: rowid tables with a (node_id, seq, idx) primary key and a
           (node_id, observed_at) index.
  clustered-seq   WITHOUT ROWID, clustered by (node_id, seq, idx), plus the time index.
  clustered-time  WITHOUT ROWID, clustered by (node_id, observed_at, seq, idx), no index.
  time-index-only rowid tables with only the (node_id, observed_at) index: no primary key
           on the samples (the server's `batches` key and replay floor already refuse a
           batch stored twice).

Usage: python3 scripts/bench_sqlite_layout.py [--layout L] [--nodes N] [--seconds S]
           [--page-size B] [--autocheckpoint PAGES]
It writes a throwaway database under a temporary folder and removes it.
"""

import argparse
import os
import random
import sqlite3
import tempfile
import time

GROUP = 512
COLUMNS = (
    "cpu REAL, mem INTEGER, load REAL, a REAL, b REAL, c REAL, d REAL, e REAL, f REAL, "
    "g INTEGER, h INTEGER, sample BLOB"
)


def write_bytes() -> int:
    with open("/proc/self/io") as io:
        for line in io:
            if line.startswith("write_bytes"):
                return int(line.split()[1])
    raise SystemExit("no write_bytes in /proc/self/io: this needs Linux with task I/O accounting")


def create(db: sqlite3.Connection, layout: str) -> None:
    db.execute("CREATE TABLE nodes (node_id TEXT PRIMARY KEY, last_seq INTEGER, seen INTEGER, last_host BLOB)")
    db.execute(
        "CREATE TABLE batches (node_id TEXT, seq INTEGER, received INTEGER, n INTEGER, "
        "PRIMARY KEY (node_id, seq))"
    )
    for table in ("host", "chain"):
        head = f"CREATE TABLE {table} (node_id TEXT, seq INTEGER, idx INTEGER, t INTEGER, {COLUMNS}, "
        if layout == "rowid":
            db.execute(head + "PRIMARY KEY (node_id, seq, idx))")
            db.execute(f"CREATE INDEX {table}_node_time ON {table} (node_id, t)")
        elif layout == "clustered-seq":
            db.execute(head + "PRIMARY KEY (node_id, seq, idx)) WITHOUT ROWID")
            db.execute(f"CREATE INDEX {table}_node_time ON {table} (node_id, t)")
        elif layout == "clustered-time":
            db.execute(head + "PRIMARY KEY (node_id, t, seq, idx)) WITHOUT ROWID")
        else:
            db.execute(head.rstrip(", ") + ")")
            db.execute(f"CREATE INDEX {table}_node_time ON {table} (node_id, t)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=["rowid", "clustered-seq", "clustered-time", "time-index-only"], default="rowid")
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--page-size", type=int, default=4096)
    parser.add_argument("--autocheckpoint", type=int, default=1000, help="WAL pages between checkpoints")
    args = parser.parse_args()
    if args.nodes < GROUP or args.seconds < 3:
        parser.error(f"--nodes must be at least {GROUP} and --seconds at least 3")

    with tempfile.TemporaryDirectory(prefix="sqlite-layout-") as folder:
        db = sqlite3.connect(os.path.join(folder, "ledger.db"), isolation_level=None)
        db.execute(f"PRAGMA page_size = {args.page_size}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute(f"PRAGMA wal_autocheckpoint = {args.autocheckpoint}")
        create(db, args.layout)
        blob = os.urandom(200)
        nodes = [f"val-{i:05d}" for i in range(args.nodes)]
        pending: list[tuple[str, int, int]] = []
        committed = 0
        measured_from = None
        for second in range(args.seconds):
            if second == args.seconds // 3:
                measured_from = (committed, write_bytes(), time.monotonic())
            random.shuffle(nodes)
            for node in nodes:
                pending.append((node, second + 1, second * 1000))
                if len(pending) < GROUP:
                    continue
                db.execute("BEGIN")
                for node_id, seq, observed in pending:
                    db.execute("INSERT INTO batches VALUES (?, ?, ?, 2)", (node_id, seq, observed))
                    row = (node_id, seq, 0, observed, 1.0, 2, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10, 11, blob)
                    for table in ("host", "chain"):
                        db.execute(f"INSERT INTO {table} VALUES ({', '.join('?' * len(row))})", row)
                    db.execute(
                        "INSERT INTO nodes VALUES (?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET "
                        "last_seq = excluded.last_seq, seen = excluded.seen, last_host = excluded.last_host",
                        (node_id, seq, observed, blob),
                    )
                db.execute("COMMIT")
                committed += len(pending)
                pending.clear()
            print(f"\r  second {second + 1}/{args.seconds}, {committed} batches committed", end="", flush=True)
        print()
        first, written_before, started = measured_from
        batches = committed - first
        kib = (write_bytes() - written_before) / 1024 / batches
        rate = batches / (time.monotonic() - started)
        print(
            f"layout {args.layout}, {args.nodes} nodes, page {args.page_size} B, "
            f"checkpoint every {args.autocheckpoint} pages: {kib:.1f} KiB written a batch, "
            f"{rate:.0f} batches/s"
        )


if __name__ == "__main__":
    main()
