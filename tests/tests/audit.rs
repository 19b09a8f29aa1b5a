//! Audit ledger scenarios: the hash chain verifies on SQLite and PostgreSQL, stays one
//! contiguous chain under concurrent appends, and `guardianctl audit verify` names the row an
//! outsider altered or removed (exit 3), going around the append-only triggers to do it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, bail, ensure};
use guardian_server::store::Ledger;
use guardian_server::store::audit::{AuditKind, BreakReason, BrokenLink, GENESIS_PREV_HASH};
use guardian_tests::{Postgres, binary};
use serde_json::json;
use tokio::task::JoinSet;

type TestResult = anyhow::Result<()>;

/// One entry of every kind; seq 3's body carries a marker the file-editing test looks for.
async fn append_every_kind(ledger: &Ledger) -> anyhow::Result<()> {
    let bodies = [
        (
            AuditKind::Finding,
            "val-1",
            json!({"rule": "block_lag", "lag": 40}),
        ),
        (AuditKind::Decision, "val-1", json!({"action": "restart"})),
        (
            AuditKind::Command,
            "val-1",
            json!({"command_id": "c-1", "action": "restart", "marker": "MARKER-ORIGINAL"}),
        ),
        (
            AuditKind::Outcome,
            "val-1",
            json!({"command_id": "c-1", "ok": true}),
        ),
        (
            AuditKind::Operator,
            "",
            json!({"operator": "admin", "act": "ack"}),
        ),
    ];
    for (i, (kind, node, body)) in bodies.iter().enumerate() {
        let entry = ledger
            .audit_append(*kind, node, body, 1_700_000_000_000 + i as i64)
            .await?;
        ensure!(entry.seq == i as u64 + 1, "appended at seq {}", entry.seq);
    }
    Ok(())
}

/// `guardianctl audit verify --ledger-url URL`.
fn ctl_verify(url: &str) -> anyhow::Result<Output> {
    Ok(Command::new(binary("guardianctl")?)
        .args(["audit", "verify", "--ledger-url", url])
        .env_remove("GUARDIAN_SERVER_LEDGER_URL")
        .output()?)
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The cluster's `psql`, next to the `initdb` the harness used.
fn psql(postgres: &Postgres, db: &str, sql: &str) -> anyhow::Result<Output> {
    let bin = std::fs::read_dir("/usr/lib/postgresql")?
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin/psql"))
        .filter(|p| p.is_file())
        .max()
        .context("no /usr/lib/postgresql/*/bin/psql")?;
    Ok(Command::new(bin)
        .args(["-h", "127.0.0.1", "-U", "postgres", "-v", "ON_ERROR_STOP=1"])
        .args(["-p", &postgres.port.to_string(), "-d", db, "-c", sql])
        .output()?)
}

fn psql_ok(postgres: &Postgres, db: &str, sql: &str) -> anyhow::Result<()> {
    let output = psql(postgres, db, sql)?;
    ensure!(
        output.status.success(),
        "psql {sql:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Appends from `tasks` tasks at once, `each` entries per task, and checks the result is one
/// chain 1..=N in which every task's every entry appears exactly once.
async fn concurrent_appends_stay_one_chain(
    ledger: &Ledger,
    tasks: u64,
    each: u64,
) -> anyhow::Result<()> {
    let before = ledger.audit_verify().await?.entries;
    let mut set = JoinSet::new();
    for task in 0..tasks {
        let ledger = ledger.clone();
        set.spawn(async move {
            for i in 0..each {
                ledger
                    .audit_append(
                        AuditKind::Finding,
                        &format!("val-{task}"),
                        &json!({"task": task, "i": i}),
                        guardian_server::unix_ms(),
                    )
                    .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(joined) = set.join_next().await {
        joined??;
    }
    let entries = ledger.audit_entries(0, usize::MAX).await?;
    ensure!(entries.len() as u64 == before + tasks * each);
    let mut seen = std::collections::HashSet::new();
    let mut prev_hash = GENESIS_PREV_HASH.to_owned();
    for (i, entry) in entries.iter().enumerate() {
        ensure!(entry.seq == i as u64 + 1, "seq {} at {i}", entry.seq);
        ensure!(entry.prev_hash == prev_hash, "fork at seq {}", entry.seq);
        prev_hash.clone_from(&entry.hash);
        if entry.body.get("task").is_some() {
            ensure!(seen.insert(entry.body.to_string()), "{} twice", entry.body);
        }
    }
    ensure!(seen.len() as u64 == tasks * each);
    let report = ledger.audit_verify().await?;
    ensure!(report.is_intact(), "{report:?}");
    ensure!(report.entries == before + tasks * each);
    Ok(())
}

/// Replaces every occurrence of `from` with `to` (same length) in a closed SQLite file: an
/// edit no trigger can see.
fn edit_sqlite_file(db: &Path, from: &[u8], to: &[u8]) -> anyhow::Result<()> {
    ensure!(from.len() == to.len());
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    ensure!(
        std::fs::metadata(&wal).map_or(true, |m| m.len() == 0),
        "the WAL was not checkpointed at close"
    );
    let mut bytes = std::fs::read(db)?;
    let mut found = 0;
    let mut at = 0;
    while let Some(offset) = bytes[at..].windows(from.len()).position(|w| w == from) {
        let start = at + offset;
        bytes[start..start + to.len()].copy_from_slice(to);
        found += 1;
        at = start + to.len();
    }
    if found == 0 {
        bail!("{} does not contain the marker", db.display());
    }
    std::fs::write(db, bytes)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_audit_chain_verifies_on_sqlite_and_survives_concurrent_appends() -> TestResult {
    let dir = tempfile::tempdir()?;
    let ledger = Ledger::open(&format!("sqlite://{}/g.db", dir.path().display())).await?;
    let empty = ledger.audit_verify().await?;
    assert_eq!((empty.entries, empty.first_broken), (0, None));
    append_every_kind(&ledger).await?;
    let entries = ledger.audit_entries(0, 10).await?;
    assert_eq!(
        entries.iter().map(|e| e.kind).collect::<Vec<_>>(),
        AuditKind::ALL
    );
    assert_eq!(entries[4].node_id, "");
    assert_eq!(entries[1].body, json!({"action": "restart"}));
    assert!(ledger.audit_verify().await?.is_intact());
    concurrent_appends_stay_one_chain(&ledger, 6, 15).await?;
    ledger.close().await;
    Ok(())
}

#[tokio::test]
async fn an_audit_row_edited_in_the_sqlite_file_is_named_by_guardianctl() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("data/guardian.db");
    let url = format!("sqlite://{}", db.display());
    let ledger = Ledger::open(&url).await?;
    append_every_kind(&ledger).await?;
    ledger.close().await;

    let ok = ctl_verify(&url)?;
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    assert_eq!(stdout(&ok).trim(), "audit chain OK: 5 entries");
    let list = Command::new(binary("guardianctl")?)
        .args(["audit", "list", "--ledger-url", &url, "--after", "1"])
        .args(["--limit", "2", "-o", "json"])
        .output()?;
    assert!(list.status.success(), "{list:?}");
    let rows: serde_json::Value = serde_json::from_slice(&list.stdout)?;
    assert_eq!(rows[0]["seq"], 2);
    assert_eq!(rows[1]["kind"], "command");
    assert_eq!(rows.as_array().map(Vec::len), Some(2));

    // Around the triggers: rewrite seq 3's body in the file itself.
    edit_sqlite_file(&db, b"MARKER-ORIGINAL", b"MARKER-FORGERY!")?;
    let broken = ctl_verify(&url)?;
    assert_eq!(broken.status.code(), Some(3), "{broken:?}");
    assert!(
        stdout(&broken).starts_with("audit chain BROKEN at seq 3: hash mismatch"),
        "{}",
        stdout(&broken)
    );
    let ledger = Ledger::open(&url).await?;
    let report = ledger.audit_verify().await?;
    assert_eq!(report.entries, 5);
    let link = report.first_broken.context("chain reported intact")?;
    assert_eq!(link.seq, 3);
    assert!(matches!(link.reason, BreakReason::HashMismatch { .. }));
    ledger.close().await;

    // A missing ledger file is an error (exit 1), not an empty chain that verifies.
    let missing = ctl_verify(&format!("sqlite://{}/nothing.db", dir.path().display()))?;
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_audit_chain_holds_on_postgresql_and_names_altered_and_removed_rows() -> TestResult {
    let postgres = Postgres::start()?;
    let url = postgres.url();
    let ledger = Ledger::open(&url).await?;
    append_every_kind(&ledger).await?;
    assert!(ledger.audit_verify().await?.is_intact());
    concurrent_appends_stay_one_chain(&ledger, 8, 10).await?;
    let ok = ctl_verify(&url)?;
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    assert_eq!(stdout(&ok).trim(), "audit chain OK: 85 entries");

    // The triggers refuse changes...
    for sql in [
        "UPDATE audit_log SET body = '{}' WHERE seq = 3",
        "DELETE FROM audit_log WHERE seq = 3",
        "TRUNCATE audit_log",
    ] {
        let refused = psql(&postgres, "postgres", sql)?;
        assert!(!refused.status.success(), "{sql} was allowed");
        assert!(String::from_utf8_lossy(&refused.stderr).contains("append-only"));
    }
    // ...until someone drops them.
    psql_ok(
        &postgres,
        "postgres",
        "DROP TRIGGER audit_log_no_update_or_delete ON audit_log; \
         UPDATE audit_log SET body = '{\"action\": \"nothing\"}' WHERE seq = 2",
    )?;
    let report = ledger.audit_verify().await?;
    assert_eq!(report.entries, 85);
    let link = report
        .first_broken
        .context("altered chain reported intact")?;
    assert_eq!(link.seq, 2);
    assert_eq!(link.reason.kind(), "hash_mismatch");
    let broken = ctl_verify(&url)?;
    assert_eq!(broken.status.code(), Some(3), "{broken:?}");
    assert!(stdout(&broken).starts_with("audit chain BROKEN at seq 2: hash mismatch"));
    ledger.close().await;

    // A removed middle row, in a second database of the same cluster.
    psql_ok(&postgres, "postgres", "CREATE DATABASE removed")?;
    let removed_url = format!("postgres://postgres@127.0.0.1:{}/removed", postgres.port);
    let ledger = Ledger::open(&removed_url).await?;
    append_every_kind(&ledger).await?;
    psql_ok(
        &postgres,
        "removed",
        "DROP TRIGGER audit_log_no_update_or_delete ON audit_log; \
         DELETE FROM audit_log WHERE seq = 3",
    )?;
    let report = ledger.audit_verify().await?;
    assert_eq!(report.entries, 4);
    assert_eq!(
        report.first_broken,
        Some(BrokenLink {
            seq: 4,
            reason: BreakReason::SeqGap { expected: 3 }
        })
    );
    let broken = ctl_verify(&removed_url)?;
    assert_eq!(broken.status.code(), Some(3), "{broken:?}");
    assert!(stdout(&broken).starts_with("audit chain BROKEN at seq 4: seq gap"));
    ledger.close().await;
    Ok(())
}

/// Anchors the ledger's head now, as the server's anchor task does.
async fn anchor_head(ledger: &Ledger, url: &str) -> anyhow::Result<PathBuf> {
    use guardian_server::store::anchor;
    let path = anchor::default_file(url).context("a SQLite ledger has an anchor file")?;
    let (seq, hash) = ledger.audit_head().await?.context("an empty chain")?;
    anchor::append(
        &path,
        &anchor::Anchor {
            seq,
            hash,
            at_unix_ms: guardian_server::unix_ms(),
        },
    )?;
    Ok(path)
}

/// A connection to the SQLite file as a tool would open it (no pragmas of the server's).
async fn raw_sqlite(url: &str) -> anyhow::Result<sqlx::SqliteConnection> {
    use sqlx::Connection;
    Ok(sqlx::SqliteConnection::connect(url).await?)
}

#[tokio::test]
async fn removed_newest_entries_are_caught_by_the_anchor() -> TestResult {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}/ledger.db", dir.path().display());
    let ledger = Ledger::open(&url).await?;
    append_every_kind(&ledger).await?;
    anchor_head(&ledger, &url).await?;
    ledger.close().await;
    let ok = ctl_verify(&url)?;
    assert_eq!(ok.status.code(), Some(0), "{}", stdout(&ok));
    assert!(
        stdout(&ok).contains("anchored: the newest of 1 anchors (seq 5) matches"),
        "{}",
        stdout(&ok)
    );

    // Around the triggers, the two newest entries go: the shorter chain is still a chain.
    let mut raw = raw_sqlite(&url).await?;
    sqlx::query("DROP TRIGGER audit_log_no_delete")
        .execute(&mut raw)
        .await?;
    sqlx::query("DELETE FROM audit_log WHERE seq > 3")
        .execute(&mut raw)
        .await?;
    drop(raw);
    let broken = ctl_verify(&url)?;
    assert_eq!(broken.status.code(), Some(3), "{}", stdout(&broken));
    assert!(
        stdout(&broken).contains("saw the chain at seq 5, but the ledger ends at seq 3"),
        "{}",
        stdout(&broken)
    );
    Ok(())
}

#[tokio::test]
async fn a_rewritten_last_entry_is_caught_by_the_anchor() -> TestResult {
    use guardian_server::store::audit::entry_hash;
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}/ledger.db", dir.path().display());
    let ledger = Ledger::open(&url).await?;
    append_every_kind(&ledger).await?;
    anchor_head(&ledger, &url).await?;
    let last = ledger.audit_entries(4, 1).await?.pop().context("entry 5")?;
    let body = r#"{"act":"nothing happened","operator":"admin"}"#;
    let hash = entry_hash(5, last.at_unix_ms, "operator", "", body, &last.prev_hash);
    let replace = format!(
        "INSERT OR REPLACE INTO audit_log (seq, at_unix_ms, kind, node_id, body, prev_hash, hash) \
         VALUES (5, {}, 'operator', '', '{body}', '{}', '{hash}')",
        last.at_unix_ms, last.prev_hash
    );
    ledger.close().await;
    // A tool that leaves recursive triggers off rewrites the last row with a recomputed hash:
    // the chain itself still holds, the anchor does not.
    let mut raw = raw_sqlite(&url).await?;
    sqlx::query(sqlx::AssertSqlSafe(replace))
        .execute(&mut raw)
        .await?;
    drop(raw);
    let broken = ctl_verify(&url)?;
    assert_eq!(broken.status.code(), Some(3), "{}", stdout(&broken));
    assert!(
        stdout(&broken).contains("saw seq 5 with hash") && stdout(&broken).contains("rewritten"),
        "{}",
        stdout(&broken)
    );
    Ok(())
}

/// `guardianctl audit ARGS` through the Fleet API of the server at `grpc`, with the
/// operator certificate of `scratch`.
fn ctl_over_api(
    scratch: &guardian_tests::Scratch,
    grpc: std::net::SocketAddr,
    args: &[&str],
) -> anyhow::Result<Output> {
    let pki = scratch.pki.ca().parent().context("pki dir")?.to_owned();
    Ok(Command::new(binary("guardianctl")?)
        .arg("audit")
        .args(args)
        .arg(format!("--server=https://{grpc}"))
        .arg(format!("--pki-dir={}", pki.display()))
        .env_remove("GUARDIAN_SERVER_LEDGER_URL")
        .output()?)
}

#[tokio::test]
async fn guardianctl_lists_and_verifies_the_audit_through_the_fleet_api() -> TestResult {
    let scratch = guardian_tests::Scratch::new(&["val-1"])?;
    let url = scratch.sqlite_url();
    let db = PathBuf::from(url.trim_start_matches("sqlite://"));
    let ledger = Ledger::open(&url).await?;
    append_every_kind(&ledger).await?;
    ledger.close().await;
    let config = scratch.server_config(&url, "")?;
    let mut server = guardian_tests::Server::start(&config, scratch.path("server.log"))?;

    // Listed by the server, filtered by kind and by node, as JSON.
    let list = |args: &[&str]| -> anyhow::Result<serde_json::Value> {
        let out = ctl_over_api(
            &scratch,
            server.grpc,
            &[&["list", "-o", "json"], args].concat(),
        )?;
        ensure!(out.status.success(), "{out:?}");
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let all = list(&[])?;
    assert!(all.as_array().is_some_and(|a| a.len() >= 5), "{all}");
    assert_eq!(all[2]["body"]["marker"], "MARKER-ORIGINAL");
    let commands = list(&["--kind", "command"])?;
    assert_eq!(commands.as_array().map(Vec::len), Some(1), "{commands}");
    assert_eq!(commands[0]["seq"], 3);
    let node = list(&["--node", "val-1", "--after", "1", "--limit", "2"])?;
    assert_eq!(
        node.as_array()
            .map(|a| a.iter().map(|e| e["seq"].clone()).collect::<Vec<_>>()),
        Some(vec![json!(2), json!(3)])
    );

    // Verified by the server.
    let ok = ctl_over_api(&scratch, server.grpc, &["verify"])?;
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    assert!(
        stdout(&ok).starts_with("audit chain OK: "),
        "{}",
        stdout(&ok)
    );
    // A bad filter is refused by the server with the reason.
    let bad = ctl_over_api(&scratch, server.grpc, &["list", "--node", "Not A Node"])?;
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");

    // A row rewritten in the file while the server is down: the server names it.
    server.proc.terminate()?;
    edit_sqlite_file(&db, b"MARKER-ORIGINAL", b"MARKER-FORGERY!")?;
    let server = guardian_tests::Server::start(&config, scratch.path("server2.log"))?;
    let broken = ctl_over_api(&scratch, server.grpc, &["verify"])?;
    assert_eq!(broken.status.code(), Some(3), "{broken:?}");
    assert!(
        stdout(&broken).starts_with("audit chain BROKEN at seq 3: hash mismatch"),
        "{}",
        stdout(&broken)
    );

    // An agent's certificate may not read the audit.
    let (cert, key) = scratch.pki.node("val-1");
    let mut client = guardian_proto::v1::fleet_client::FleetClient::new(
        scratch.channel(server.grpc, &cert, &key).await?,
    );
    let refused = client
        .list_audit(guardian_proto::v1::ListAuditRequest::default())
        .await
        .expect_err("an agent certificate is refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    Ok(())
}
