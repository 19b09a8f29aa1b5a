//! The one test harness: a throwaway PKI, the real `guardian-server` and `guardian-agent`
//! processes on 127.0.0.1, a private PostgreSQL cluster, and raw gRPC clients for
//! protocol-abuse tests.
//!
//! Binaries are taken from the workspace's target folder; the README's test command builds
//! them first (`cargo build --workspace --bins`).

pub mod browser;
pub mod clickhouse;
pub mod fake_kube;
pub mod fake_node;
pub mod prometheus;
pub mod proxy;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Buf, BufMut};
use guardian_proto::v1::fleet_client::FleetClient;
use guardian_proto::v1::{AgentFrame, ServerFrame};
use guardian_server::pki::{self, PkiFiles, PkiRequest};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Path of a workspace binary built next to the running test.
///
/// # Errors
/// When the binary has not been built.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test-binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test binary has no target/<profile> folder")?;
    let path = profile_dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: build the binaries first with `cargo build --workspace --bins`",
            path.display()
        );
    }
    Ok(path)
}

/// A scratch folder with a fresh PKI for the given nodes.
pub struct Scratch {
    /// The folder (deleted on drop).
    pub dir: tempfile::TempDir,
    /// The certificates in `dir/pki`.
    pub pki: PkiFiles,
}

impl Scratch {
    /// A new folder and PKI.
    ///
    /// # Errors
    /// On I/O or certificate errors.
    pub fn new(nodes: &[&str]) -> anyhow::Result<Self> {
        Self::with_network(nodes, None)
    }

    /// A new folder and PKI whose node certificates are bound to `network` (when given).
    ///
    /// # Errors
    /// On I/O or certificate errors.
    pub fn with_network(nodes: &[&str], network: Option<&str>) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let pki = pki::init(
            &dir.path().join("pki"),
            &PkiRequest {
                nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
                operator: "tester".into(),
                server_names: vec![],
                force: false,
                network: network.map(str::to_owned),
            },
        )?;
        Ok(Self { dir, pki })
    }

    /// `dir/NAME`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The default SQLite ledger URL in this folder.
    pub fn sqlite_url(&self) -> String {
        format!("sqlite://{}", self.path("data/guardian.db").display())
    }

    /// Writes a server config (ports 0) and returns its path. `extra` is appended TOML.
    ///
    /// # Errors
    /// On I/O errors.
    pub fn server_config(&self, ledger_url: &str, extra: &str) -> anyhow::Result<PathBuf> {
        let (cert, key) = self.pki.server();
        let text = format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nledger_url = \"{ledger_url}\"\n{extra}\n\
             [tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            self.pki.ca().display(),
            cert.display(),
            key.display()
        );
        let path = self.path("server.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Writes an agent config for `node` pointed at `server` and returns its path.
    ///
    /// # Errors
    /// On I/O errors.
    pub fn agent_config(
        &self,
        node: &str,
        server: SocketAddr,
        interval_ms: u64,
    ) -> anyhow::Result<PathBuf> {
        self.agent_config_with(node, server, interval_ms, "")
    }

    /// Like [`Scratch::agent_config`], with `extra` TOML appended after the top-level keys
    /// (top-level keys first, then tables such as `[chain]`).
    ///
    /// # Errors
    /// On I/O errors.
    pub fn agent_config_with(
        &self,
        node: &str,
        server: SocketAddr,
        interval_ms: u64,
        extra: &str,
    ) -> anyhow::Result<PathBuf> {
        let (cert, key) = self.pki.node(node);
        let chain = self.path(&format!("chain-{node}"));
        std::fs::create_dir_all(&chain)?;
        // No subtensor node unless the test brings one (in `extra`, as a [chain] table).
        let chain_off = if extra.contains("[chain]") {
            ""
        } else {
            "[chain]\nenabled = false\n"
        };
        // Each node's spool lives in the scratch folder (one per node: the spool is locked).
        let spool = if extra.contains("spool_dir") {
            String::new()
        } else {
            format!(
                "spool_dir = \"{}\"\n",
                self.path(&format!("spool-{node}")).display()
            )
        };
        let text = format!(
            "node_id = \"{node}\"\nnetwork = \"local\"\nserver_url = \"https://{server}\"\nsample_interval_ms = {interval_ms}\n\
             chain_data_path = \"{}\"\n{spool}{extra}\n{chain_off}[reconnect]\ninitial_ms = 100\nmax_ms = 1000\n\
             [tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            chain.display(),
            self.pki.ca().display(),
            cert.display(),
            key.display()
        );
        let path = self.path(&format!("agent-{node}.toml"));
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// A Fleet API client with the operator certificate.
    ///
    /// # Errors
    /// When the connection fails.
    pub async fn operator(&self, server: SocketAddr) -> anyhow::Result<FleetClient<Channel>> {
        let (cert, key) = self.pki.operator();
        Ok(FleetClient::new(self.channel(server, &cert, &key).await?))
    }

    /// An mTLS channel presenting `cert`/`key` and trusting this PKI's CA.
    ///
    /// # Errors
    /// When files cannot be read or the connection fails.
    pub async fn channel(
        &self,
        server: SocketAddr,
        cert: &Path,
        key: &Path,
    ) -> anyhow::Result<Channel> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(self.pki.ca())?))
            .identity(Identity::from_pem(
                std::fs::read(cert)?,
                std::fs::read(key)?,
            ))
            .domain_name("localhost");
        Ok(Endpoint::from_shared(format!("https://{server}"))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?)
    }
}

/// A child process killed (SIGKILL) on drop.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// Its stderr log file.
    pub log: PathBuf,
}

impl Proc {
    /// Sends SIGTERM and waits up to 10 s for the exit code.
    ///
    /// # Errors
    /// When the process does not exit.
    pub fn terminate(&mut self) -> anyhow::Result<Option<i32>> {
        self.terminate_within(Duration::from_secs(10))
    }

    /// Like [`Proc::terminate`], waiting up to `deadline` (a server drains its streams for
    /// up to 10 s before it cuts them).
    ///
    /// # Errors
    /// When the signal cannot be sent or the process outlives `deadline`.
    pub fn terminate_within(&mut self, deadline: Duration) -> anyhow::Result<Option<i32>> {
        let pid = self.child.id();
        let raw = rustix::process::Pid::from_raw(i32::try_from(pid)?).context("pid 0")?;
        rustix::process::kill_process(raw, rustix::process::Signal::TERM)?;
        let until = Instant::now() + deadline;
        while Instant::now() < until {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "process {pid} ignored SIGTERM for {deadline:?}; log: {}",
            self.log_text()
        )
    }

    /// The stderr log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `guardian-server`.
pub struct Server {
    /// The process.
    pub proc: Proc,
    /// Its mTLS gRPC address.
    pub grpc: SocketAddr,
    /// Its admin HTTP address.
    pub admin: SocketAddr,
    /// Its HTTPS analysis endpoint, when `[analysis] listen` is set.
    pub analysis: Option<SocketAddr>,
    /// Its HTTPS fleet web page, when `[web] listen` is set.
    pub web: Option<SocketAddr>,
}

impl Server {
    /// Starts the server with `config` and waits for its "listening" line.
    ///
    /// # Errors
    /// When it exits or does not report its ports within 20 s.
    pub fn start(config: &Path, log: PathBuf) -> anyhow::Result<Self> {
        Self::start_command(Command::new(binary("guardian-server")?), config, log)
    }

    /// Like [`Server::start`], with the server's descriptor limit (soft and hard) set to
    /// `nofile` (through util-linux `prlimit`), as under systemd's default of 1 024.
    ///
    /// # Errors
    /// When it exits or does not report its ports within 20 s.
    pub fn start_with_nofile(config: &Path, log: PathBuf, nofile: u64) -> anyhow::Result<Self> {
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(binary("guardian-server")?);
        Self::start_command(command, config, log)
    }

    /// Like [`Server::start`], with `env` added to the server's environment.
    ///
    /// # Errors
    /// When it exits or does not report its ports within 20 s.
    pub fn start_with_env(
        config: &Path,
        log: PathBuf,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(binary("guardian-server")?);
        command.envs(env.iter().copied());
        Self::start_command(command, config, log)
    }

    fn start_command(mut command: Command, config: &Path, log: PathBuf) -> anyhow::Result<Self> {
        let mut child = command
            .arg("--config")
            .arg(config)
            .env("GUARDIAN_LOG", "info,guardian_server=debug")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let proc = Proc { child, log };
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .with_context(|| format!("server did not start; log: {}", proc.log_text()))?;
        let field = |name: &str| -> anyhow::Result<SocketAddr> {
            let value = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .with_context(|| format!("no {name}= in {line:?}; log: {}", proc.log_text()))?;
            Ok(value.parse()?)
        };
        Ok(Self {
            grpc: field("grpc")?,
            admin: field("admin")?,
            analysis: field("analysis").ok(),
            web: field("web").ok(),
            proc,
        })
    }
}

/// Starts `guardian-agent --config config`.
///
/// # Errors
/// When the binary is missing or cannot start.
pub fn start_agent(config: &Path, log: PathBuf) -> anyhow::Result<Proc> {
    start_agent_with_env(config, log, &[])
}

/// Starts `guardian-agent --config config` with `env` added to its environment (e.g. the
/// downward-API variables a DaemonSet sets).
///
/// # Errors
/// When the binary is missing or cannot start.
pub fn start_agent_with_env(
    config: &Path,
    log: PathBuf,
    env: &[(&str, &str)],
) -> anyhow::Result<Proc> {
    let child = Command::new(binary("guardian-agent")?)
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        .env("GUARDIAN_LOG", "info,guardian_agent=debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    Ok(Proc { child, log })
}

/// Polls `check` every 100 ms until it returns `Some`, or fails after `timeout`.
///
/// # Errors
/// With `what` when the time runs out.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `node` as the Fleet API at `server` shows it now (`None` when the call fails).
pub async fn fleet_node(
    scratch: &Scratch,
    server: SocketAddr,
    node: &str,
) -> Option<guardian_proto::v1::Node> {
    let mut client = scratch.operator(server).await.ok()?;
    client
        .get_node(guardian_proto::v1::GetNodeRequest {
            node_id: node.to_owned(),
        })
        .await
        .ok()
        .map(tonic::Response::into_inner)
}

/// Waits until the server at `server` has ended `node`'s stream and returns the node as the
/// Fleet API then shows it.
///
/// An agent may exit with its last batch still being committed. The server marks the node
/// disconnected only after its stream loop ends, and every commit is awaited inside that
/// loop, so from then on the store and `last_stored_seq` no longer change for this node.
///
/// # Errors
/// When the server still shows the node connected after 30 s.
pub async fn settled(
    scratch: &Scratch,
    server: SocketAddr,
    node: &str,
) -> anyhow::Result<guardian_proto::v1::Node> {
    let what = format!("the server to see agent {node} gone");
    eventually(Duration::from_secs(30), &what, || async {
        fleet_node(scratch, server, node)
            .await
            .filter(|n| !n.connected)
    })
    .await
}

/// Reads two values with `read` until they agree (every 100 ms, for up to `timeout`) and
/// returns the last read: for two views of the same rows that settle a moment apart (raw
/// rows and their rollups), so the caller's assertion reports what differed.
///
/// # Errors
/// When `read` itself fails after the time ran out.
pub async fn agreed_or_last<T: PartialEq>(
    timeout: Duration,
    what: &str,
    read: impl Fn() -> anyhow::Result<(T, T)>,
) -> anyhow::Result<(T, T)> {
    let agreed = eventually(timeout, what, || async {
        read().ok().filter(|(a, b)| a == b)
    })
    .await;
    match agreed {
        Ok(both) => Ok(both),
        Err(_) => read(),
    }
}

/// A private PostgreSQL cluster on 127.0.0.1 with trust auth, stopped on drop.
pub struct Postgres {
    /// Data and socket folder.
    pub dir: tempfile::TempDir,
    /// Its port.
    pub port: u16,
    bin: PathBuf,
}

impl Postgres {
    /// initdb + pg_ctl start (as the `postgres` user when running as root).
    ///
    /// # Errors
    /// When PostgreSQL is not installed (`apt-get install postgresql`) or fails to start.
    pub fn start() -> anyhow::Result<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL is not installed: apt-get install -y postgresql (scripts/setup does it)")?
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").is_file())
            .max()
            .context("no /usr/lib/postgresql/*/bin/initdb: apt-get install -y postgresql")?;
        let dir = tempfile::Builder::new().prefix("guardian-pg").tempdir()?;
        let port = stable_port()?;
        let is_root = Command::new("id")
            .arg("-u")
            .output()?
            .stdout
            .starts_with(b"0");
        if is_root {
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()?;
        }
        let data = dir.path().join("data");
        let run = |args: Vec<String>| -> anyhow::Result<()> {
            let mut command = if is_root {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]);
                c
            } else {
                Command::new("env")
            };
            let output = command.args(&args).output()?;
            if !output.status.success() {
                bail!(
                    "{args:?} failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            Ok(())
        };
        run(vec![
            bin.join("initdb").display().to_string(),
            "-D".into(),
            data.display().to_string(),
            "-U".into(),
            "postgres".into(),
            "--auth=trust".into(),
        ])?;
        run(vec![
            bin.join("pg_ctl").display().to_string(),
            "-D".into(),
            data.display().to_string(),
            "-o".into(),
            format!(
                "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off",
                dir.path().display()
            ),
            "-l".into(),
            dir.path().join("pg.log").display().to_string(),
            "-w".into(),
            "start".into(),
        ])?;
        Ok(Self { dir, port, bin })
    }

    /// A URL for the `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data").display().to_string();
        let pg_ctl = self.bin.join("pg_ctl").display().to_string();
        let args = ["-D", data.as_str(), "-m", "immediate", "stop"];
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0"));
        let _ = if is_root {
            Command::new("runuser")
                .args(["-u", "postgres", "--", &pg_ctl])
                .args(args)
                .output()
        } else {
            Command::new(&pg_ctl).args(args).output()
        };
    }
}

/// A port free on 127.0.0.1 now, below the kernel's ephemeral range (32768 and up on
/// Linux), so no outgoing connection takes it while a test restarts a server on it.
///
/// # Errors
/// When no port in 20000..32000 can be bound.
pub fn stable_port() -> anyhow::Result<u16> {
    let start = 20_000 + (std::process::id() % 6000) as u16 * 2;
    for offset in 0..12_000u16 {
        let port = 20_000 + (start - 20_000 + offset) % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port in 20000..32000")
}

/// A port free on 127.0.0.1 right now.
///
/// # Errors
/// When no port can be bound.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A gRPC codec that sends raw bytes as request messages (to forge malformed frames) and
/// decodes `ServerFrame`s.
#[derive(Debug, Default, Clone, Copy)]
pub struct RawFrames;

/// Encoder half of [`RawFrames`].
#[derive(Debug, Default)]
pub struct RawEncoder;

/// Decoder half of [`RawFrames`].
#[derive(Debug, Default)]
pub struct FrameDecoder;

impl Codec for RawFrames {
    type Encode = Vec<u8>;
    type Decode = ServerFrame;
    type Encoder = RawEncoder;
    type Decoder = FrameDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> FrameDecoder {
        FrameDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for FrameDecoder {
    type Item = ServerFrame;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<ServerFrame>, tonic::Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        ServerFrame::decode(bytes)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

/// Opens `Uplink/Connect` on `channel` and sends `frames` (raw bytes each) in order.
/// Returns the sender (keep it to hold the request stream open) and the server's reply
/// stream, or the status the call failed with.
pub async fn raw_uplink(
    channel: Channel,
    frames: Vec<Vec<u8>>,
) -> Result<
    (
        tokio::sync::mpsc::Sender<Vec<u8>>,
        tonic::Streaming<ServerFrame>,
    ),
    tonic::Status,
> {
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(usize::MAX);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    for frame in frames {
        let _ = tx.try_send(frame);
    }
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/guardian.v1.Uplink/Connect");
    let response = grpc
        .streaming(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            path,
            RawFrames,
        )
        .await?;
    Ok((tx, response.into_inner()))
}

/// Reads `replies` (a raw uplink's answers) until an ack covers batch `seq`.
///
/// # Errors
/// When the stream fails or ends first.
pub async fn wait_for_ack(
    replies: &mut tonic::Streaming<ServerFrame>,
    seq: u64,
) -> anyhow::Result<()> {
    loop {
        let frame = replies
            .message()
            .await?
            .ok_or_else(|| anyhow::anyhow!("the stream ended before batch {seq} was acked"))?;
        if let Some(guardian_proto::v1::server_frame::Frame::Ack(ack)) = frame.frame
            && ack.through_seq >= seq
        {
            return Ok(());
        }
    }
}

/// Encodes an agent frame.
pub fn encode(frame: &AgentFrame) -> Vec<u8> {
    frame.encode_to_vec()
}

/// A one-sample batch `(node, seq)` as a group-commit job (a `gpu` sampler-unavailable
/// sample naming the node and seq).
///
/// # Errors
/// When `node` is not a valid node id.
pub fn unavailable_job(
    node: &str,
    seq: u64,
) -> anyhow::Result<guardian_server::store::commit::Job> {
    use guardian_proto::v1::{Sample, SampleBatch, SamplerUnavailable, sample};
    let batch = SampleBatch {
        seq,
        spool_dropped_batches_total: 0,
        samples: vec![Sample {
            observed_at_unix_ms: 1_000 + i64::try_from(seq)?,
            kind: Some(sample::Kind::Unavailable(SamplerUnavailable {
                sampler: "gpu".into(),
                reason: format!("{node} batch {seq}"),
            })),
        }],
    };
    Ok(guardian_server::store::commit::Job {
        node: guardian_server::identity::NodeId::parse(node)?,
        network: "finney".into(),
        batch: std::sync::Arc::new(guardian_server::batch::Batch::from(&batch)),
    })
}

/// An encoded Hello for `node` on `network` (agent version `raw-test`), for raw streams.
pub fn hello_frame(node: &str, network: &str) -> Vec<u8> {
    use guardian_proto::v1::{Hello, NodeDescriptor, agent_frame};
    encode(&AgentFrame {
        frame: Some(agent_frame::Frame::Hello(Hello {
            agent_version: "raw-test".into(),
            node: Some(NodeDescriptor {
                node_id: node.into(),
                network: network.into(),
                ..NodeDescriptor::default()
            }),
            capabilities: vec![],
            last_acked_seq: 0,
        })),
    })
}

/// An encoded batch `seq` of one host sample observed at `observed_at_unix_ms`.
pub fn host_batch_frame(seq: u64, observed_at_unix_ms: i64) -> Vec<u8> {
    use guardian_proto::v1::{HostSample, Sample, SampleBatch, agent_frame, sample};
    encode(&AgentFrame {
        frame: Some(agent_frame::Frame::Batch(SampleBatch {
            seq,
            samples: vec![Sample {
                observed_at_unix_ms,
                kind: Some(sample::Kind::Host(HostSample {
                    cpu_busy_percent: 1.0,
                    ..HostSample::default()
                })),
            }],
            spool_dropped_batches_total: 0,
        })),
    })
}

/// The server's `/metrics` text from its admin port (empty when it does not answer).
///
/// # Errors
/// When `curl` cannot be run.
pub fn admin_metrics(admin: SocketAddr) -> anyhow::Result<String> {
    let out = Command::new("curl")
        .args(["-s", "-m", "5", &format!("http://{admin}/metrics")])
        .output()
        .context("curl is missing: bash scripts/setup installs it")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value of the unlabelled sample `name` in a `/metrics` text, if it is there.
pub fn metric_value(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// Batch `seq`: two host samples observed two days ago and two observed now, so each batch
/// (and each chunk the sink inserts) has rows in two day partitions.
///
/// # Errors
/// Only when `seq` does not fit an `i64`.
pub fn two_day_batch(seq: u64) -> anyhow::Result<Vec<u8>> {
    use guardian_proto::v1::{AgentFrame, HostSample, Sample, SampleBatch, agent_frame, sample};
    let now = guardian_server::unix_ms();
    let host = |observed_at_unix_ms: i64, cpu: f64| Sample {
        observed_at_unix_ms,
        kind: Some(sample::Kind::Host(HostSample {
            cpu_busy_percent: cpu,
            ..HostSample::default()
        })),
    };
    let old = now - 2 * 86_400_000 + i64::try_from(seq)? * 10;
    Ok(encode(&AgentFrame {
        frame: Some(agent_frame::Frame::Batch(SampleBatch {
            seq,
            samples: vec![
                host(old, 1.0),
                host(old + 1, 2.0),
                host(now, 3.0),
                host(now, 4.0),
            ],
            spool_dropped_batches_total: 0,
        })),
    }))
}

/// Streams batches `seqs` of [`two_day_batch`] as `node` on a new connection, 10 ms apart,
/// each acked before the next is sent (the batches before `seqs` must have been acked).
///
/// # Errors
/// When the node is refused, a send fails or an ack does not come.
pub async fn stream_two_day_batches(
    scratch: &Scratch,
    server: SocketAddr,
    node: &str,
    seqs: std::ops::RangeInclusive<u64>,
) -> anyhow::Result<()> {
    let (cert, key) = scratch.pki.node(node);
    let channel = scratch.channel(server, &cert, &key).await?;
    let (tx, mut replies) = raw_uplink(channel, vec![hello_frame(node, "local")])
        .await
        .map_err(|s| anyhow::anyhow!("{node} refused: {s:?}"))?;
    for seq in seqs {
        tx.send(two_day_batch(seq)?).await?;
        wait_for_ack(&mut replies, seq).await?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
