//! Sampler scenarios end to end: what the agent reads reaches the store, and key material
//! never does.

use std::process::Command;
use std::time::Duration;

use guardian_proto::v1::{Sample, sample};
use guardian_server::identity::NodeId;
use guardian_server::store::Ledger;
use guardian_tests::{Scratch, Server, eventually, start_agent};
use prost::Message;

const SECRET_PHRASE: &str =
    "abandon ability able about above absent absorb abstract absurd abuse access accident";
const SECRET_SEED: &str = "0x4f3edf983ac636a65a842ce7c78d9aa706d3b113bce9c46f30d7d21715b23b1d";
const SS58: &str = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY";

/// Unmounts on drop, so a failed assertion leaves no mount behind.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    })
}

#[tokio::test]
async fn keystore_facts_reach_the_store_and_key_bytes_never_do() -> anyhow::Result<()> {
    let scratch = Scratch::new(&["val-1"])?;
    let keystore = scratch.path("keystore");
    std::fs::create_dir_all(&keystore)?;
    // A real tmpfs where we can mount one (root); a plain folder otherwise.
    let _mount = if is_root() {
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                "size=1m,mode=0700,nosuid,nodev,noexec",
                "tmpfs",
            ])
            .arg(&keystore)
            .status()?;
        anyhow::ensure!(status.success(), "mount -t tmpfs failed");
        Some(Mount(keystore.clone()))
    } else {
        None
    };
    let hotkey = keystore.join("hotkeys").join("default");
    std::fs::create_dir_all(hotkey.parent().unwrap_or(&keystore))?;
    std::fs::write(
        &hotkey,
        format!(
            r#"{{"accountId": "0xd43593c715fdd31c61141abd04a99fd6822c8558854ccde39a5684e7a56da27d", "publicKey": "0xd43593c715fdd31c61141abd04a99fd6822c8558854ccde39a5684e7a56da27d", "secretPhrase": "{SECRET_PHRASE}", "secretSeed": "{SECRET_SEED}", "ss58Address": "{SS58}"}}"#
        ),
    )?;
    // On the file itself (the umask's 0644 would otherwise stay), so the mode reported below
    // is the one set here.
    std::fs::set_permissions(
        &hotkey,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )?;

    let server = Server::start(
        &scratch.server_config(&scratch.sqlite_url(), "")?,
        scratch.path("server.log"),
    )?;
    let extra = format!("keystore_path = \"{}\"", keystore.display());
    let mut agent = start_agent(
        &scratch.agent_config_with("val-1", server.grpc, 200, &extra)?,
        scratch.path("agent.log"),
    )?;
    let ledger = Ledger::open(&scratch.sqlite_url()).await?;
    let node = NodeId::parse("val-1")?;
    eventually(Duration::from_secs(20), "three batches", || async {
        ledger.counts(&node).await.ok().filter(|(b, _, _)| *b >= 3)
    })
    .await?;

    let stored = ledger.kind_samples(&node, "keystore").await?;
    let keystore_sample = stored
        .iter()
        .filter_map(|bytes| Sample::decode(bytes.as_slice()).ok())
        .find_map(|s| match s.kind {
            Some(sample::Kind::Keystore(k)) => Some(k),
            _ => None,
        })
        .ok_or_else(|| anyhow::anyhow!("no keystore sample stored"))?;
    assert!(keystore_sample.present);
    assert_eq!(keystore_sample.on_tmpfs, is_root(), "{keystore_sample:?}");
    assert_eq!(keystore_sample.file_count, 1);
    assert_eq!(keystore_sample.files[0].ss58_address, SS58);
    assert_eq!(keystore_sample.files[0].mode, 0o600, "{keystore_sample:?}");
    assert_eq!(keystore_sample.files[0].sha256_fingerprint.len(), 64);
    // GPU: this host has no NVIDIA driver in CI; the sampler says so instead of failing.
    assert!(!ledger.kind_samples(&node, "gpu").await?.is_empty());
    drop(ledger);
    // Stopped, so its spool and log are complete and no file vanishes mid-scan.
    assert_eq!(agent.terminate()?, Some(0), "{}", agent.log_text());

    // Scan every byte the server stored (database, WAL), both logs and the agent's spool
    // (batches waiting for an ack are written there) for the secret.
    let mut needles: Vec<Vec<u8>> = vec![
        SECRET_PHRASE.into(),
        SECRET_SEED.into(),
        SECRET_SEED[2..].into(),
    ];
    needles.push(
        SECRET_PHRASE
            .split(' ')
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
            .into_bytes(),
    );
    let mut files = Vec::new();
    for root in ["data", "server.log", "agent.log", "spool-val-1"] {
        files_under(&scratch.path(root), &mut files)?;
    }
    for name in ["server.log", "agent.log", "spool-val-1/state"] {
        assert!(
            files.contains(&scratch.path(name)),
            "{name} is scanned: {files:?}"
        );
    }
    for path in files {
        let bytes = std::fs::read(&path)?;
        for needle in &needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
                "{} holds key material",
                path.display()
            );
        }
    }
    Ok(())
}

/// Appends `path` (a file) or every file below it (a folder) to `files`.
fn files_under(path: &std::path::Path, files: &mut Vec<std::path::PathBuf>) -> anyhow::Result<()> {
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            files_under(&entry?.path(), files)?;
        }
    } else {
        files.push(path.to_path_buf());
    }
    Ok(())
}
