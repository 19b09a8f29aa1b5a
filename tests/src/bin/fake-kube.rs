//! `fake-kube`: runs several fake Kubernetes API servers (`guardian_tests::fake_kube`) in one
//! process, for benchmarks. Each cluster gets a kubeconfig `DIR/kubeconfig-cN` and, for every
//! node `PREFIX0001..` assigned to it (round robin), a TaoNode, a StatefulSet and its pod in
//! namespace `validators`; a deleted pod comes back (a new uid) as its StatefulSet would make
//! it. Prints `fake-kube ready N` on stdout when serving; on SIGTERM or Ctrl-C prints one JSON
//! line per cluster with its request and deletion counts, and exits.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use guardian_tests::fake_kube::FakeKube;
use serde_json::json;

use guardian_tests::fake_kube::validators::PODS;

/// Fake Kubernetes API servers with one TaoNode per node.
#[derive(Debug, Parser)]
#[command(name = "fake-kube", version)]
struct Args {
    /// Clusters to serve.
    #[arg(long, default_value_t = 4)]
    clusters: usize,
    /// Nodes (TaoNodes) spread round robin over the clusters.
    #[arg(long)]
    agents: u32,
    /// Node id prefix (as guardian-loadgen's --prefix).
    #[arg(long, default_value = "load")]
    prefix: String,
    /// Folder for the kubeconfigs.
    #[arg(long)]
    dir: PathBuf,
}

fn node_name(prefix: &str, index: u32, agents: u32) -> String {
    let width = agents.to_string().len().max(4);
    format!("{prefix}{index:0width$}")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fake-kube: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.clusters == 0 || args.agents == 0 {
        anyhow::bail!("--clusters and --agents must be at least 1");
    }
    std::fs::create_dir_all(&args.dir)?;
    let mut clusters = Vec::new();
    for c in 1..=args.clusters {
        let kube = FakeKube::start(&format!("c{c}")).await?;
        std::fs::copy(kube.kubeconfig(), args.dir.join(format!("kubeconfig-c{c}")))?;
        clusters.push(kube);
    }
    let mut assigned: BTreeMap<String, usize> = BTreeMap::new();
    for i in 1..=args.agents {
        let node = node_name(&args.prefix, i, args.agents);
        let c = (i as usize - 1) % args.clusters;
        let kube = &clusters[c];
        kube.put_validator(&node);
        assigned.insert(node, c);
    }
    println!("fake-kube ready {}", args.clusters);
    std::io::stdout().flush()?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                // The StatefulSet controller: a deleted pod is made again.
                for (node, c) in &assigned {
                    if clusters[*c].get(PODS, &format!("subtensor-{node}-0")).is_none() {
                        clusters[*c].put_validator_pod(node);
                    }
                }
            }
        }
    }
    for (i, kube) in clusters.iter().enumerate() {
        let requests = kube.requests();
        let deletions = requests.iter().filter(|r| r.method == "DELETE").count();
        let writes = kube.writes().len();
        println!(
            "{}",
            json!({ "cluster": format!("c{}", i + 1), "requests": requests.len(), "writes": writes, "pod_deletions": deletions })
        );
    }
    Ok(())
}
