//! `guardianctl`: the operator's CLI. Writes a throwaway PKI, shows the fleet as a table or
//! JSON, and follows it live, over the Fleet API with an operator certificate.

#![recursion_limit = "256"]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use guardian_proto::v1::fleet_client::FleetClient;
use guardian_proto::v1::{
    CancelCommandRequest, GetCommandRequest, HistoryRequest, IssueCommandRequest,
    ListFindingsRequest, ListNodesRequest, Node, PauseNodeRequest, ResumeNodeRequest,
    WatchNodesRequest,
};
use guardian_server::pki::{self, PkiRequest};
use guardian_server::store::Ledger;
use guardian_server::unix_ms;
use guardian_server::utc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Operator CLI for TaoNode Guardian.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Certificates for trials and tests.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Print the fleet: node, connection, last sample age and key host figures.
    Status {
        #[command(flatten)]
        connection: Connection,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Signed remote commands: issue one to a connected node, or show one with its outcome.
    #[command(name = "command")]
    Remote {
        #[command(subcommand)]
        command: CommandCommand,
    },
    /// One node's metric over time, bucketed (from ClickHouse rollups when the range is long).
    History {
        #[command(flatten)]
        connection: Connection,
        /// The node.
        #[arg(long)]
        node: String,
        /// The metric (cpu_busy_percent, block_lag, head_age_ms, peers, ...; a wrong name lists them).
        #[arg(long)]
        metric: String,
        /// How far back: 90s, 30m, 6h, 7d.
        #[arg(long, default_value = "1h")]
        since: String,
        /// Bucket width in seconds (default: chosen from the range).
        #[arg(long)]
        resolution: Option<u32>,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Follow the fleet live: one line per node change, until Ctrl-C.
    Watch {
        #[command(flatten)]
        connection: Connection,
        /// Stop after this many events (default: never).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Findings: open ones (or all with --all), newest first, with the fleet's risk.
    Findings {
        #[command(flatten)]
        connection: Connection,
        /// Only this node's (default: every node's and the fleet's).
        #[arg(long)]
        node: Option<String>,
        /// Include cleared findings.
        #[arg(long)]
        all: bool,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Stop automatic remediation of a node (phase paused) until `resume`.
    Pause {
        #[command(flatten)]
        connection: Connection,
        /// The node.
        node: String,
        /// Why (kept in the audit ledger).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Hand a paused or cordoned node back to the reconciler.
    Resume {
        #[command(flatten)]
        connection: Connection,
        /// The node.
        node: String,
    },
    /// The audit ledger (findings, decisions, commands, outcomes, operator acts), read from
    /// the ledger database directly: run it on the server host or against PostgreSQL.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The Kubernetes clusters the server may act in: name, reachable, missing
    /// permissions, TaoNodes, last error.
    Clusters {
        #[command(flatten)]
        connection: Connection,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Kubernetes: the TaoNode custom resource definition.
    Kube {
        #[command(subcommand)]
        command: KubeCommand,
    },
}

#[derive(Debug, Subcommand)]
enum KubeCommand {
    /// Print the TaoNode CRD (YAML) generated from the server's types: what
    /// `deploy/crds/taonodes.yaml` and the Helm chart hold. `kubectl apply -f -` it.
    Crd,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chain and name the first broken link.
    ///
    /// Prints `audit chain OK: N entries` and exits 0, or `audit chain BROKEN at seq S:
    /// REASON` and exits 3. Any other failure (server or database unreachable, no ledger at
    /// the URL) exits 1. The server checks its own ledger and anchor file (Fleet API
    /// `VerifyAudit`); `--direct` reads a ledger database itself, for forensics.
    Verify {
        #[command(flatten)]
        connection: Connection,
        /// Read the ledger database at --ledger-url directly instead of asking the server.
        #[arg(long)]
        direct: bool,
        #[command(flatten)]
        ledger: LedgerArgs,
        /// With --direct: the server's audit anchor file (default: `<ledger file>.audit-anchor`
        /// for SQLite). Its newest anchor must match the ledger: entries removed from the end,
        /// or the last ones rewritten with recomputed hashes, are reported as a broken chain.
        #[arg(long)]
        anchor_file: Option<PathBuf>,
    },
    /// Print audit entries, oldest first (Fleet API `ListAudit`; `--direct` reads a ledger
    /// database itself).
    List {
        #[command(flatten)]
        connection: Connection,
        /// Read the ledger database at --ledger-url directly instead of asking the server.
        #[arg(long)]
        direct: bool,
        #[command(flatten)]
        ledger: LedgerArgs,
        /// Only entries after this seq.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many entries.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Only this node's entries.
        #[arg(long)]
        node: Option<String>,
        /// Only this kind: finding, decision, command, outcome or operator.
        #[arg(long)]
        kind: Option<guardian_server::store::audit::AuditKind>,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// Which ledger database to read.
#[derive(Debug, Args)]
struct LedgerArgs {
    /// Ledger URL: sqlite://PATH or postgres://USER@HOST:PORT/DB (default
    /// sqlite://guardian-data/guardian.db with --direct). Given, it implies --direct.
    #[arg(long, env = "GUARDIAN_SERVER_LEDGER_URL")]
    ledger_url: Option<String>,
}

impl LedgerArgs {
    /// Whether the ledger is read directly: asked for, or a ledger URL given.
    fn direct(&self, asked: bool) -> bool {
        asked || self.ledger_url.is_some()
    }

    fn url(&self) -> &str {
        self.ledger_url
            .as_deref()
            .unwrap_or("sqlite://guardian-data/guardian.db")
    }

    /// Opens the ledger; a SQLite file must exist already (opening would create an empty one,
    /// whose empty chain would verify).
    async fn open(&self) -> anyhow::Result<Ledger> {
        if let Some(rest) = self
            .url()
            .strip_prefix("sqlite://")
            .or_else(|| self.url().strip_prefix("sqlite:"))
        {
            let path = rest.split_once('?').map_or(rest, |(path, _)| path);
            if path != ":memory:" && !std::path::Path::new(path).is_file() {
                bail!("no ledger at {path} (set --ledger-url or GUARDIAN_SERVER_LEDGER_URL)");
            }
        }
        Ok(Ledger::open(self.url()).await?)
    }
}

#[derive(Debug, Subcommand)]
enum CommandCommand {
    /// Sign and send a command; the agent runs it only if its own [commands] config allows it.
    Issue {
        #[command(flatten)]
        connection: Connection,
        /// The node.
        #[arg(long)]
        node: String,
        /// restart-unit, restart-container, run-hook or collect-diagnostics.
        #[arg(long)]
        action: String,
        /// KEY=VALUE (repeatable): unit=NAME, container=NAME, hook=NAME, or hook parameters.
        #[arg(long = "param")]
        params: Vec<String>,
        /// Validity in seconds (default 300, at most 3600).
        #[arg(long, default_value_t = 300)]
        ttl: u32,
        /// Wait up to this many seconds for the outcome (0 = do not wait).
        #[arg(long, default_value_t = 30)]
        wait: u64,
    },
    /// Cancel a command that has no outcome yet (a live agent is told never to run it and
    /// to stop it if it is running).
    Cancel {
        #[command(flatten)]
        connection: Connection,
        /// The command id.
        id: String,
        /// Why (kept in the audit ledger).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Show a command and its outcome.
    Show {
        #[command(flatten)]
        connection: Connection,
        /// The command id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Write a throwaway CA, a server certificate for localhost/127.0.0.1, an operator
    /// certificate and one agent certificate per node, as PEM files.
    Init {
        /// Folder to write into (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Node id to issue an agent certificate for (repeat for several).
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
        /// Name in the operator certificate.
        #[arg(long, default_value = "admin")]
        operator: String,
        /// Extra DNS name or IP for the server certificate (repeatable).
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        /// Replace an existing PKI in DIR.
        #[arg(long)]
        force: bool,
        /// Bind every node certificate to this chain network (e.g. finney): the server then
        /// refuses a Hello that names another one.
        #[arg(long)]
        network: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

/// Where the server is and which operator certificate to present.
#[derive(Debug, Args)]
struct Connection {
    /// Server gRPC URL.
    #[arg(
        long,
        env = "GUARDIAN_SERVER_URL",
        default_value = "https://127.0.0.1:7443"
    )]
    server: String,
    /// Folder holding ca.pem, operator.pem and operator-key.pem.
    #[arg(long, env = "GUARDIAN_PKI_DIR", default_value = "pki")]
    pki_dir: PathBuf,
    /// Name the server certificate must carry.
    #[arg(long, default_value = "localhost")]
    server_name: String,
}

impl Connection {
    async fn client(&self) -> anyhow::Result<FleetClient<Channel>> {
        let read = |name: &str| {
            let path = self.pki_dir.join(name);
            std::fs::read(&path).with_context(|| {
                format!(
                    "cannot read {} (set --pki-dir or GUARDIAN_PKI_DIR)",
                    path.display()
                )
            })
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.pem")?))
            .identity(Identity::from_pem(
                read("operator.pem")?,
                read("operator-key.pem")?,
            ))
            .domain_name(&self.server_name);
        let channel = Endpoint::from_shared(self.server.clone())
            .with_context(|| format!("invalid --server URL {:?}", self.server))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("cannot connect to {}", self.server))?;
        Ok(FleetClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("guardianctl: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("guardianctl: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Pki {
            command:
                PkiCommand::Init {
                    dir,
                    nodes,
                    operator,
                    server_names,
                    force,
                    network,
                },
        } => {
            let files = pki::init(
                &dir,
                &PkiRequest {
                    nodes,
                    operator,
                    server_names,
                    force,
                    network,
                },
            )?;
            println!("wrote a throwaway fleet PKI (not for production):");
            for path in files.written {
                println!("  {}", path.display());
            }
            Ok(())
        }
        Command::Status { connection, output } => {
            let mut client = connection.client().await?;
            let answer = client
                .list_nodes(ListNodesRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            // Long work in progress on the server: a banner on stderr (stdout stays the table
            // or the JSON).
            for work in &answer.work {
                eprintln!("{}", work_banner(work));
            }
            let nodes = answer.nodes;
            let now = unix_ms();
            match output {
                Output::Table => print!("{}", table(&nodes, now)),
                Output::Json => {
                    let rows: Vec<_> = nodes.iter().map(|n| json(n, now)).collect();
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                }
            }
            Ok(())
        }
        Command::Remote {
            command:
                CommandCommand::Issue {
                    connection,
                    node,
                    action,
                    params,
                    ttl,
                    wait,
                },
        } => {
            let mut parameters = std::collections::HashMap::new();
            for param in params {
                let (key, value) = param
                    .split_once('=')
                    .with_context(|| format!("--param {param:?}: expected KEY=VALUE"))?;
                parameters.insert(key.to_owned(), value.to_owned());
            }
            let mut client = connection.client().await?;
            let mut record = client
                .issue_command(IssueCommandRequest {
                    node_id: node,
                    action,
                    parameters,
                    ttl_seconds: ttl,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("issued {} to {}", record.command_id, record.node_id);
            let deadline = std::time::Instant::now() + Duration::from_secs(wait);
            while record.state == "issued" && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                record = client
                    .get_command(GetCommandRequest {
                        command_id: record.command_id.clone(),
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
            }
            print_command(&record);
            if record.state == "succeeded" || (wait == 0 && record.state == "issued") {
                Ok(())
            } else {
                bail!("command {} ended {}", record.command_id, record.state)
            }
        }
        Command::Remote {
            command:
                CommandCommand::Cancel {
                    connection,
                    id,
                    reason,
                },
        } => {
            let mut client = connection.client().await?;
            let record = client
                .cancel_command(CancelCommandRequest {
                    command_id: id,
                    reason,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_command(&record);
            Ok(())
        }
        Command::Findings {
            connection,
            node,
            all,
            limit,
            output,
        } => {
            let mut client = connection.client().await?;
            let response = client
                .list_findings(ListFindingsRequest {
                    node_id: node.unwrap_or_default(),
                    include_cleared: all,
                    limit,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            match output {
                Output::Table => print!("{}", findings_table(&response)),
                Output::Json => {
                    let findings: Vec<serde_json::Value> = response
                        .findings
                        .iter()
                        .map(|f| {
                            serde_json::json!({
                                "finding_id": f.finding_id,
                                "node_id": f.node_id,
                                "network": f.network,
                                "kind": f.kind,
                                "severity": f.severity,
                                "score": f.score,
                                "summary": f.summary,
                                "evidence": f.evidence,
                                "raised_at_unix_ms": f.raised_at_unix_ms,
                                "cleared_at_unix_ms": f.cleared_at_unix_ms,
                            })
                        })
                        .collect();
                    println!(
                        "{}",
                        serde_json::json!({"fleet_risk": response.fleet_risk, "findings": findings})
                    );
                }
            }
            Ok(())
        }
        Command::Pause {
            connection,
            node,
            reason,
        } => {
            let mut client = connection.client().await?;
            let node = client
                .pause_node(PauseNodeRequest {
                    node_id: node,
                    reason,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{} is {}", node.node_id, node.phase);
            Ok(())
        }
        Command::Resume { connection, node } => {
            let mut client = connection.client().await?;
            let node = client
                .resume_node(ResumeNodeRequest { node_id: node })
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "{} is {} (handed back to the reconciler)",
                node.node_id, node.phase
            );
            Ok(())
        }
        Command::Remote {
            command: CommandCommand::Show { connection, id },
        } => {
            let mut client = connection.client().await?;
            let record = client
                .get_command(GetCommandRequest { command_id: id })
                .await
                .map_err(status_error)?
                .into_inner();
            print_command(&record);
            Ok(())
        }
        Command::History {
            connection,
            node,
            metric,
            since,
            resolution,
            output,
        } => {
            let span_ms = parse_span(&since)?;
            let to = unix_ms();
            let mut client = connection.client().await?;
            let history = client
                .get_history(HistoryRequest {
                    node_id: node,
                    metric,
                    from_unix_ms: to - span_ms,
                    to_unix_ms: to,
                    resolution_seconds: resolution.unwrap_or(0),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            match output {
                Output::Table => {
                    println!(
                        "# {} {} ({}) every {} s from {}: {} buckets",
                        history.node_id,
                        history.metric,
                        history.unit,
                        history.resolution_seconds,
                        history.source,
                        history.points.len()
                    );
                    println!(
                        "{:<20} {:>14} {:>14} {:>14} {:>7}",
                        "TIME (UTC)", "AVG", "MIN", "MAX", "COUNT"
                    );
                    for p in &history.points {
                        println!(
                            "{:<20} {:>14.3} {:>14.3} {:>14.3} {:>7}",
                            utc(p.start_unix_ms),
                            p.avg,
                            p.min,
                            p.max,
                            p.count
                        );
                    }
                }
                Output::Json => {
                    let points: Vec<_> = history
                        .points
                        .iter()
                        .map(|p| {
                            serde_json::json!({
                                "start_unix_ms": p.start_unix_ms, "avg": p.avg,
                                "min": p.min, "max": p.max, "count": p.count,
                            })
                        })
                        .collect();
                    let doc = serde_json::json!({
                        "node_id": history.node_id, "metric": history.metric,
                        "unit": history.unit, "resolution_seconds": history.resolution_seconds,
                        "source": history.source, "points": points,
                    });
                    println!("{}", serde_json::to_string_pretty(&doc)?);
                }
            }
            Ok(())
        }
        Command::Watch { connection, count } => {
            let mut client = connection.client().await?;
            let mut events = client
                .watch_nodes(WatchNodesRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            let mut seen = 0u64;
            while count.is_none_or(|limit| seen < limit) {
                let Some(event) = events.message().await.map_err(status_error)? else {
                    bail!("the server ended the watch");
                };
                if let Some(node) = event.node {
                    println!("{}", watch_line(&node, unix_ms()));
                }
                seen += 1;
            }
            Ok(())
        }
        Command::Clusters { connection, output } => {
            let mut client = connection.client().await?;
            let clusters = client
                .list_clusters(guardian_proto::v1::ListClustersRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .clusters;
            match output {
                Output::Table => print!("{}", clusters_table(&clusters)),
                Output::Json => {
                    let rows: Vec<_> = clusters
                        .iter()
                        .map(|c| {
                            serde_json::json!({
                                "name": c.name,
                                "reachable": c.reachable,
                                "missing_permissions": c.missing_permissions,
                                "taonodes": c.taonodes,
                                "last_error": c.last_error,
                                "checked_unix_ms": c.checked_unix_ms,
                            })
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                }
            }
            Ok(())
        }
        Command::Kube {
            command: KubeCommand::Crd,
        } => {
            print!("{}", guardian_server::actuate::kubernetes::crd::crd_yaml());
            Ok(())
        }
        Command::Audit {
            command:
                AuditCommand::Verify {
                    connection,
                    direct,
                    ledger,
                    ..
                },
        } if !ledger.direct(direct) => {
            let answer = connection
                .client()
                .await?
                .verify_audit(guardian_proto::v1::VerifyAuditRequest {})
                .await
                .map_err(|s| anyhow::anyhow!("the server refused VerifyAudit: {}", s.message()))?
                .into_inner();
            if !answer.intact {
                if answer.broken_seq > 0 {
                    println!(
                        "audit chain BROKEN at seq {}: {}",
                        answer.broken_seq, answer.reason
                    );
                } else {
                    println!("audit chain BROKEN: {}", answer.reason);
                }
                std::process::exit(3);
            }
            println!("audit chain OK: {} entries", answer.entries);
            if answer.anchors > 0 {
                println!(
                    "anchored: the newest of {} anchors (seq {}) matches",
                    answer.anchors, answer.anchored_seq
                );
            } else {
                eprintln!(
                    "note: the server has no audit anchors: removed or rewritten newest entries cannot be told"
                );
            }
            Ok(())
        }
        Command::Audit {
            command:
                AuditCommand::Verify {
                    ledger: args,
                    anchor_file,
                    ..
                },
        } => {
            let ledger = args.open().await?;
            let report = ledger.audit_verify().await?;
            let anchor_file =
                anchor_file.or_else(|| guardian_server::store::anchor::default_file(args.url()));
            let anchors = match &anchor_file {
                Some(path) => guardian_server::store::anchor::read(path)
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
                None => Vec::new(),
            };
            let mismatch = ledger.audit_check_anchor(&anchors).await?;
            ledger.close().await;
            if let Some(mismatch) = mismatch {
                println!("audit chain BROKEN: {mismatch}");
                std::process::exit(3);
            }
            match report.first_broken {
                None => {
                    println!("audit chain OK: {} entries", report.entries);
                    match anchors.iter().max_by_key(|a| a.seq) {
                        Some(newest) => println!(
                            "anchored: the newest of {} anchors (seq {}) matches",
                            anchors.len(),
                            newest.seq
                        ),
                        None => eprintln!(
                            "note: no audit anchors{}: removed or rewritten newest entries cannot be told",
                            anchor_file
                                .as_ref()
                                .map(|p| format!(" in {}", p.display()))
                                .unwrap_or_default()
                        ),
                    }
                    Ok(())
                }
                Some(broken) => {
                    println!(
                        "audit chain BROKEN at seq {}: {}",
                        broken.seq, broken.reason
                    );
                    // The documented exit status for a broken chain (1 is any other error).
                    std::process::exit(3);
                }
            }
        }
        Command::Audit {
            command:
                AuditCommand::List {
                    connection,
                    direct,
                    ledger,
                    after,
                    limit,
                    node,
                    kind,
                    output,
                },
        } => {
            let filter = guardian_server::store::audit::AuditFilter {
                node_id: node.unwrap_or_default(),
                kind,
                ..Default::default()
            };
            let entries = if ledger.direct(direct) {
                let ledger = ledger.open().await?;
                let entries = ledger.audit_entries_matching(after, limit, &filter).await?;
                ledger.close().await;
                entries
            } else {
                audit_entries_from_server(&connection, after, limit, &filter).await?
            };
            match output {
                Output::Table => {
                    println!(
                        "{:>8}  {:<23}  {:<8}  {:<16}  {:<12}  BODY",
                        "SEQ", "TIME (UTC)", "KIND", "NODE", "HASH"
                    );
                    for e in &entries {
                        println!(
                            "{:>8}  {:<19}.{:03}  {:<8}  {:<16}  {:<12}  {}",
                            e.seq,
                            utc(e.at_unix_ms),
                            e.at_unix_ms.rem_euclid(1000),
                            e.kind.as_str(),
                            if e.node_id.is_empty() {
                                "-"
                            } else {
                                &e.node_id
                            },
                            e.hash.get(..12).unwrap_or(&e.hash),
                            e.body
                        );
                    }
                    if entries.is_empty() {
                        println!("(no audit entry after seq {after})");
                    }
                }
                Output::Json => {
                    let rows: Vec<_> = entries
                        .iter()
                        .map(|e| {
                            serde_json::json!({
                                "seq": e.seq, "at_unix_ms": e.at_unix_ms, "kind": e.kind.as_str(),
                                "node_id": e.node_id, "body": e.body,
                                "prev_hash": e.prev_hash, "hash": e.hash,
                            })
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                }
            }
            Ok(())
        }
    }
}

/// Up to `limit` audit entries after `after` through the Fleet API (`ListAudit`, paged).
async fn audit_entries_from_server(
    connection: &Connection,
    after: u64,
    limit: usize,
    filter: &guardian_server::store::audit::AuditFilter,
) -> anyhow::Result<Vec<guardian_server::store::audit::AuditEntry>> {
    let mut client = connection.client().await?;
    let mut entries = Vec::new();
    let mut after_seq = after;
    while entries.len() < limit {
        let page = client
            .list_audit(guardian_proto::v1::ListAuditRequest {
                after_seq,
                limit: u32::try_from(limit - entries.len())
                    .unwrap_or(10_000)
                    .min(10_000),
                node_id: filter.node_id.clone(),
                kind: filter
                    .kind
                    .map(|k| k.as_str().to_owned())
                    .unwrap_or_default(),
                since_unix_ms: 0,
                until_unix_ms: 0,
            })
            .await
            .map_err(|s| anyhow::anyhow!("the server refused ListAudit: {}", s.message()))?
            .into_inner();
        for e in page.entries {
            entries.push(guardian_server::store::audit::AuditEntry {
                seq: e.seq,
                at_unix_ms: e.at_unix_ms,
                kind: e.kind.parse().map_err(|err| anyhow::anyhow!("{err}"))?,
                node_id: e.node_id,
                body: serde_json::from_str(&e.body_json).with_context(|| {
                    format!("audit entry {} has a body that is not JSON", e.seq)
                })?,
                prev_hash: e.prev_hash,
                hash: e.hash,
            });
        }
        if page.next_after_seq == 0 {
            break;
        }
        after_seq = page.next_after_seq;
    }
    Ok(entries)
}

/// `server busy: replaying the ClickHouse outbox: 1200 / 5000 batches (24 %), 310/s, ETA 12 s`.
fn work_banner(work: &guardian_proto::v1::ServerWork) -> String {
    let line = guardian_server::progress::describe(
        &work.what,
        &work.unit,
        work.done,
        work.total,
        work.rate_per_second,
        (work.eta_seconds >= 0.0).then_some(work.eta_seconds),
    );
    format!("server busy: {line}")
}

fn print_command(record: &guardian_proto::v1::CommandRecord) {
    println!(
        "{} node={} action={} state={} issued_by={}",
        record.command_id, record.node_id, record.action, record.state, record.issued_by
    );
    if !record.detail.is_empty() {
        println!("{}", record.detail.trim_end());
    }
}

/// `90s`, `30m`, `6h`, `7d` in milliseconds.
fn parse_span(text: &str) -> anyhow::Result<i64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: i64 = number.parse().with_context(|| {
        format!("--since {text:?}: expected a number and a unit, e.g. 30m, 6h, 7d")
    })?;
    let unit_ms = match unit {
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => bail!("--since {text:?}: unit must be s, m, h or d (e.g. 30m, 6h, 7d)"),
    };
    if number <= 0 {
        bail!("--since {text:?}: must be more than zero");
    }
    Ok(number.saturating_mul(unit_ms))
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("server refused: {:?}: {}", status.code(), status.message())
}

fn age(now: i64, then: i64) -> String {
    if then <= 0 {
        return "never".to_owned();
    }
    let ms = (now - then).max(0);
    if ms < 1000 {
        format!("{ms}ms ago")
    } else if ms < 120_000 {
        format!("{:.1}s ago", ms as f64 / 1000.0)
    } else if ms < 7_200_000 {
        format!("{}m ago", ms / 60_000)
    } else {
        format!("{}h ago", ms / 3_600_000)
    }
}

fn mem_used_percent(node: &Node) -> Option<f64> {
    let host = node.last_host.as_ref()?;
    (host.mem_total_bytes > 0).then(|| {
        100.0 * (host.mem_total_bytes - host.mem_available_bytes.min(host.mem_total_bytes)) as f64
            / host.mem_total_bytes as f64
    })
}

fn table(nodes: &[Node], now: i64) -> String {
    let mut rows: Vec<Vec<String>> = vec![
        [
            "NODE",
            "STATE",
            "PHASE",
            "RISK",
            "LAST SAMPLE",
            "SEQ",
            "CPU%",
            "MEM%",
            "LOAD1",
            "DISK%",
            "IO-LAT-MS",
            "NET-RX/s",
            "NET-TX/s",
            "BEST",
            "LAG",
            "PEERS",
            "HEAD-AGE",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for node in nodes {
        let host = node.last_host.as_ref();
        let fmt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
        let latency = host.map(|h| {
            h.disks
                .iter()
                .map(|d| d.read_latency_ms.max(d.write_latency_ms))
                .fold(0.0, f64::max)
        });
        let rx = host.map(|h| {
            h.networks
                .iter()
                .map(|n| n.rx_bytes_per_second)
                .sum::<f64>()
        });
        let tx = host.map(|h| {
            h.networks
                .iter()
                .map(|n| n.tx_bytes_per_second)
                .sum::<f64>()
        });
        rows.push(
            [
                node.node_id.clone(),
                if node.connected {
                    "connected"
                } else {
                    "offline"
                }
                .to_owned(),
                if node.phase.is_empty() {
                    "-".to_owned()
                } else {
                    node.phase.clone()
                },
                format!("{:.2}", node.risk),
                age(now, node.last_host_observed_unix_ms),
                node.last_stored_seq.to_string(),
                fmt(host.map(|h| h.cpu_busy_percent)),
                fmt(mem_used_percent(node)),
                fmt(host.map(|h| h.load_avg_1m)),
                fmt(host
                    .and_then(|h| h.chain_data.as_ref())
                    .map(|f| f.used_percent)),
                fmt(latency),
                rx.map_or("-".to_owned(), bytes),
                tx.map_or("-".to_owned(), bytes),
            ]
            .into_iter()
            .chain(chain_cells(node))
            .collect::<Vec<_>>(),
        );
    }
    let mut widths = vec![0usize; rows[0].len()];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths.iter().copied())
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if nodes.is_empty() {
        out.push_str("(no node has connected yet)\n");
    }
    out
}

/// Blocks the node is behind: its own sync view, or the best reference endpoint's tip.
fn chain_lag(chain: &guardian_proto::v1::ChainSample) -> u64 {
    let own = chain
        .sync_highest_block
        .saturating_sub(chain.sync_current_block);
    let reference = chain
        .references
        .iter()
        .filter(|r| r.responsive)
        .map(|r| r.best_block.saturating_sub(chain.best_block))
        .max()
        .unwrap_or(0);
    own.max(reference)
}

/// BEST, LAG, PEERS, HEAD-AGE cells.
fn chain_cells(node: &Node) -> [String; 4] {
    match node.last_chain.as_ref() {
        None => ["-", "-", "-", "-"].map(str::to_owned),
        Some(chain) if !chain.responsive => [
            "down".to_owned(),
            "-".to_owned(),
            "-".to_owned(),
            format!("{:.1}s", chain.head_age_ms as f64 / 1000.0),
        ],
        Some(chain) => [
            chain.best_block.to_string(),
            chain_lag(chain).to_string(),
            chain.peers.to_string(),
            format!("{:.1}s", chain.head_age_ms as f64 / 1000.0),
        ],
    }
}

fn bytes(per_second: f64) -> String {
    match per_second {
        v if v >= 1e9 => format!("{:.1}G", v / 1e9),
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

fn json(node: &Node, now: i64) -> serde_json::Value {
    let host = node.last_host.as_ref();
    serde_json::json!({
        "node_id": node.node_id,
        "connected": node.connected,
        "hostname": node.hostname,
        "network": node.network,
        "agent_version": node.agent_version,
        "first_seen_unix_ms": node.first_seen_unix_ms,
        "last_seen_unix_ms": node.last_seen_unix_ms,
        "last_stored_seq": node.last_stored_seq,
        "phase": node.phase,
        "phase_since_unix_ms": node.phase_since_unix_ms,
        "risk": node.risk,
        "open_findings": node.open_findings,
        "remediation_attempts": node.remediation_attempts,
        "paused": node.paused,
        "kubernetes_node": node.kubernetes_node,
        "agent_pod": node.agent_pod,
        "last_sample_unix_ms": node.last_host_observed_unix_ms,
        "last_sample_age_ms": (node.last_host_observed_unix_ms > 0).then(|| now - node.last_host_observed_unix_ms),
        "chain": node.last_chain.as_ref().map(|c| serde_json::json!({
            "observed_at_unix_ms": node.last_chain_observed_unix_ms,
            "endpoint": c.endpoint,
            "responsive": c.responsive,
            "error": c.error,
            "best_block": c.best_block,
            "finalized_block": c.finalized_block,
            "sync_current_block": c.sync_current_block,
            "sync_highest_block": c.sync_highest_block,
            "lag_blocks": chain_lag(c),
            "peers": c.peers,
            "is_syncing": c.is_syncing,
            "head_age_ms": c.head_age_ms,
            "rpc_latency_ms": c.rpc_latency_ms,
            "spec_version": c.spec_version,
            "standing": c.standing.as_ref().map(|s| serde_json::json!({
                "hotkey_ss58": s.hotkey_ss58,
                "netuid": s.netuid,
                "registered": s.registered,
                "uid": s.uid,
                "last_update_block": s.last_update_block,
                "blocks_since_last_update": s.blocks_since_last_update,
                "validator_permit": s.validator_permit,
                "validator_trust_ratio": s.validator_trust_ratio,
                "emission_rao": s.emission_rao,
                "active": s.active,
            })),
        })),
        "host": host.map(|h| serde_json::json!({
            "cpu_busy_percent": h.cpu_busy_percent,
            "cpu_count": h.cpu_count,
            "mem_total_bytes": h.mem_total_bytes,
            "mem_available_bytes": h.mem_available_bytes,
            "mem_used_percent": mem_used_percent(node),
            "load_avg_1m": h.load_avg_1m,
            "chain_data_used_percent": h.chain_data.as_ref().map(|f| f.used_percent),
            "chain_data_available_bytes": h.chain_data.as_ref().map(|f| f.available_bytes),
            "io_pressure_full_avg10_percent": h.io_pressure.as_ref().map(|p| p.full_avg10_percent),
            "oom_kills_total": h.oom_kills_total,
            "net_rx_bytes_per_second": h.networks.iter().map(|n| n.rx_bytes_per_second).sum::<f64>(),
            "net_tx_bytes_per_second": h.networks.iter().map(|n| n.tx_bytes_per_second).sum::<f64>(),
        })),
    })
}

fn findings_table(response: &guardian_proto::v1::ListFindingsResponse) -> String {
    let mut out = format!("# fleet risk {:.2}\n", response.fleet_risk);
    if response.findings.is_empty() {
        out.push_str("(no findings)\n");
        return out;
    }
    for f in &response.findings {
        let subject = if f.node_id.is_empty() {
            format!("network {}", f.network)
        } else {
            f.node_id.clone()
        };
        let state = if f.cleared_at_unix_ms == 0 {
            "open".to_owned()
        } else {
            format!("cleared {}", utc(f.cleared_at_unix_ms))
        };
        out.push_str(&format!(
            "{} {} {} {} score={:.2} [{}] {}\n",
            utc(f.raised_at_unix_ms),
            subject,
            f.severity,
            f.kind,
            f.score,
            state,
            f.summary
        ));
    }
    out
}

fn watch_line(node: &Node, now: i64) -> String {
    let host = node.last_host.as_ref();
    format!(
        "{} {} {} phase={} risk={:.2} seq={} cpu={} mem={} sample={}",
        chrono_like(now),
        node.node_id,
        if node.connected {
            "connected"
        } else {
            "offline"
        },
        if node.phase.is_empty() {
            "-"
        } else {
            &node.phase
        },
        node.risk,
        node.last_stored_seq,
        host.map_or("-".to_owned(), |h| format!("{:.1}%", h.cpu_busy_percent)),
        mem_used_percent(node).map_or("-".to_owned(), |m| format!("{m:.1}%")),
        age(now, node.last_host_observed_unix_ms),
    )
}

/// `HH:MM:SS.mmm` UTC, enough for a live feed.
fn chrono_like(unix_ms: i64) -> String {
    let day_ms = unix_ms.rem_euclid(86_400_000);
    format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

/// `guardianctl clusters` as a table.
fn clusters_table(clusters: &[guardian_proto::v1::ClusterHealth]) -> String {
    if clusters.is_empty() {
        return "no Kubernetes clusters configured ([kubernetes.clusters.NAME] in the server config)\n"
            .to_owned();
    }
    let mut out = format!(
        "{:<20} {:<10} {:>8}  {:<40} {}\n",
        "CLUSTER", "REACHABLE", "TAONODES", "MISSING PERMISSIONS", "LAST ERROR"
    );
    for c in clusters {
        let missing = if c.missing_permissions.is_empty() {
            "-".to_owned()
        } else {
            c.missing_permissions.join(", ")
        };
        let error = if c.last_error.is_empty() {
            "-"
        } else {
            &c.last_error
        };
        out.push_str(&format!(
            "{:<20} {:<10} {:>8}  {:<40} {}\n",
            c.name,
            if c.reachable { "yes" } else { "NO" },
            c.taonodes,
            missing,
            error
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_utc_times_read_as_operators_write_them() {
        assert_eq!(parse_span("90s").ok(), Some(90_000));
        assert_eq!(parse_span("7d").ok(), Some(604_800_000));
        assert!(parse_span("5w").is_err());
        assert!(parse_span("h").is_err());
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_796_000_000_000), "2026-11-30 00:53:20");
    }
}
