//! The documented Python client (examples/python: grpcio, stubs generated from proto/) against
//! a running server over mTLS: it lists the fleet with an operator certificate, reads the
//! health service, gets NotFound for an unknown node, and is refused with a node's certificate.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use guardian_tests::{Scratch, Server, stream_two_day_batches};

fn client(
    server: std::net::SocketAddr,
    ca: &Path,
    cert: &Path,
    key: &Path,
    args: &[&str],
) -> anyhow::Result<Output> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    Ok(Command::new("bash")
        .arg(root.join("examples/python/run"))
        .arg(format!("--server={server}"))
        .arg(format!("--ca={}", ca.display()))
        .arg(format!("--cert={}", cert.display()))
        .arg(format!("--key={}", key.display()))
        .args(args)
        .output()?)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn the_python_example_lists_the_fleet_with_an_operator_certificate_only() -> anyhow::Result<()>
{
    let scratch = Scratch::new(&["val-a"])?;
    let config = scratch.server_config(&scratch.sqlite_url(), "")?;
    let server = Server::start(&config, scratch.path("server.log"))?;
    stream_two_day_batches(&scratch, server.grpc, "val-a", 1..=3).await?;
    let ca = scratch.pki.ca();
    let (cert, key) = scratch.pki.operator();

    let out = client(server.grpc, &ca, &cert, &key, &["nodes", "--json"])?;
    assert!(out.status.success(), "{}", text(&out));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let nodes = listed["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 1, "{listed}");
    assert_eq!(nodes[0]["node_id"], "val-a");
    assert_eq!(nodes[0]["last_stored_seq"], 3);
    assert_eq!(nodes[0]["network"], "local");

    let out = client(
        server.grpc,
        &ca,
        &cert,
        &key,
        &["health", "guardian.v1.Fleet"],
    )?;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SERVING");

    let out = client(server.grpc, &ca, &cert, &key, &["node", "val-zz"])?;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("NOT_FOUND"), "{}", text(&out));

    // A node's certificate is an agent's identity, not an operator's.
    let (node_cert, node_key) = scratch.pki.node("val-a");
    let out = client(server.grpc, &ca, &node_cert, &node_key, &["nodes"])?;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("PERMISSION_DENIED") || text(&out).contains("UNAUTHENTICATED"),
        "{}",
        text(&out)
    );
    Ok(())
}
