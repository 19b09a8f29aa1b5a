//! A private ClickHouse server for tests: its own folder, loopback ports chosen per run,
//! killed when the handle drops (and, through the parent-death signal, when the test
//! process dies).
//!
//! Needs the Debian `clickhouse-server` and `clickhouse-client` packages (18.16 here).
//! The config listens on two ports only (HTTP and native TCP): no interserver, MySQL or
//! Prometheus port, so parallel tests never collide on a fixed port.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long a start may take before it is reported as failed.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running private `clickhouse-server`.
pub struct ClickHouse {
    /// Config, data and logs (deleted on drop, after the server is killed).
    pub dir: tempfile::TempDir,
    /// The HTTP interface port (what the store's URL names).
    pub http_port: u16,
    /// The native TCP port (what `clickhouse-client` uses).
    pub tcp_port: u16,
    child: Option<Child>,
}

impl ClickHouse {
    /// Starts a server in a new temporary folder and waits until `/ping` answers.
    ///
    /// The server gets the parent-death signal of the calling thread: call this from the
    /// test's own thread (the `#[tokio::test]` body), not from a short-lived helper thread.
    ///
    /// # Errors
    /// When the packages are missing or the server does not answer within 30 s.
    pub fn start() -> anyhow::Result<Self> {
        let mut dir = tempfile::tempdir()?;
        for sub in ["data", "tmp", "log"] {
            std::fs::create_dir_all(dir.path().join(sub))?;
        }
        // Another process may take a port between our check and the server's bind: retry
        // with new ports then.
        let mut last_error = None;
        for _ in 0..3 {
            let (http_port, tcp_port) = two_ports()?;
            let mut server = Self {
                dir,
                http_port,
                tcp_port,
                child: None,
            };
            server.write_config()?;
            match server.spawn_and_wait() {
                Ok(()) => return Ok(server),
                Err(e) => {
                    server.kill();
                    let log = server.log_text();
                    if !log.contains("Address already in use") {
                        return Err(e.context(format!("clickhouse-server log:\n{log}")));
                    }
                    last_error = Some(e);
                    dir = server.take_dir();
                }
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
            .context("clickhouse-server found its ports taken three times")
    }

    /// `http://127.0.0.1:PORT`, for `ClickHouseSettings::url`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Sends SIGTERM and waits for the exit; SIGKILL after 10 s.
    ///
    /// # Errors
    /// When signalling or waiting fails.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = rustix::process::Pid::from_raw(i32::try_from(child.id())?).context("pid 0")?;
        // The process may already be gone; the wait below settles it either way.
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait()?;
        Ok(())
    }

    /// Starts the server again on the same folder and ports: stored data is kept.
    ///
    /// # Errors
    /// When it does not answer within 30 s.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.spawn_and_wait()
            .with_context(|| format!("clickhouse-server log:\n{}", self.log_text()))
    }

    /// Kills the server with SIGKILL (no shutdown of any kind: an INSERT in flight is cut
    /// wherever it is) and starts it again on the same folder and ports.
    ///
    /// # Errors
    /// When it does not answer within 30 s.
    pub fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn_and_wait()
            .with_context(|| format!("clickhouse-server log:\n{}", self.log_text()))
    }

    /// Runs `sql` (several statements separated by `;` allowed) with `clickhouse-client`
    /// and returns its standard output (TabSeparated).
    ///
    /// # Errors
    /// When the client fails; the message carries its standard error.
    pub fn query(&self, sql: &str) -> anyhow::Result<String> {
        let output = Command::new("clickhouse-client")
            .args(["--host", "127.0.0.1", "--port"])
            .arg(self.tcp_port.to_string())
            .arg("--multiquery")
            .arg("--query")
            .arg(sql)
            .stdin(Stdio::null())
            .output()
            .context("clickhouse-client is missing: apt-get install clickhouse-client")?;
        if !output.status.success() {
            bail!(
                "clickhouse-client failed on {sql:?}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8(output.stdout)?)
    }

    /// The server's error log so far.
    pub fn log_text(&self) -> String {
        let log =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("{}{}", log("log/err.log"), log("stderr.log"))
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.xml")
    }

    fn write_config(&self) -> anyhow::Result<()> {
        let dir = self.dir.path().display();
        // No <interserver_http_port> (9009 only when configured): two ports in all.
        // keep_alive_timeout: 18.16 defaults to 10 s and waits for idle keep-alive
        // connections at shutdown; 3 s (the modern default) keeps restarts quick.
        let config = format!(
            "<yandex>\n\
             <logger><level>warning</level><log>{dir}/log/server.log</log><errorlog>{dir}/log/err.log</errorlog></logger>\n\
             <http_port>{http}</http_port><tcp_port>{tcp}</tcp_port>\n\
             <listen_host>127.0.0.1</listen_host>\n\
             <path>{dir}/data/</path><tmp_path>{dir}/tmp/</tmp_path>\n\
             <users_config>/etc/clickhouse-server/users.xml</users_config>\n\
             <default_profile>default</default_profile><default_database>default</default_database>\n\
             <mark_cache_size>67108864</mark_cache_size>\n\
             <keep_alive_timeout>3</keep_alive_timeout>\n\
             </yandex>\n",
            http = self.http_port,
            tcp = self.tcp_port,
        );
        std::fs::write(self.config_path(), config)?;
        Ok(())
    }

    fn spawn_and_wait(&mut self) -> anyhow::Result<()> {
        let server = ["/usr/bin/clickhouse-server", "/usr/sbin/clickhouse-server"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists())
            .context("clickhouse-server is missing: apt-get install clickhouse-server")?;
        let config = format!("--config-file={}", self.config_path().display());
        let stderr = std::fs::File::create(self.dir.path().join("stderr.log"))?;
        // setpriv (util-linux) sets the parent-death signal and execs the server, so a
        // test that dies without unwinding still takes its server with it.
        let mut command = if Path::new("/usr/bin/setpriv").exists() {
            let mut c = Command::new("/usr/bin/setpriv");
            c.args(["--pdeathsig", "KILL", "--"]).arg(server);
            c
        } else {
            Command::new(server)
        };
        let child = command
            .arg(config)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ping(self.http_port) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!("clickhouse-server exited with {status} before answering /ping");
            }
            if Instant::now() > deadline {
                bail!("clickhouse-server did not answer /ping within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Moves the folder out (for a retry), leaving an empty placeholder.
    fn take_dir(&mut self) -> tempfile::TempDir {
        let placeholder = tempfile::tempdir().unwrap_or_else(|_| {
            // Only reached when /tmp is unusable, where nothing else works either.
            tempfile::TempDir::new_in(".").unwrap_or_else(|e| panic!("no temporary folder: {e}"))
        });
        std::mem::replace(&mut self.dir, placeholder)
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `GET /ping` answered `Ok.`.
fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    ) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /ping HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.") && answer.contains(" 200 ") && answer.ends_with("Ok.\n")
}

/// Two distinct ports free on 127.0.0.1 now, below the kernel's ephemeral range (so no
/// outgoing connection takes them while a test restarts the server), spread by process id
/// so that parallel test processes start their search at different places.
fn two_ports() -> anyhow::Result<(u16, u16)> {
    let span = 12_000u32;
    let start = (std::process::id().wrapping_mul(7919)) % span;
    let mut held: Vec<TcpListener> = Vec::new();
    for offset in 0..span {
        let port = u16::try_from(20_000 + (start + offset) % span)?;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            held.push(listener);
            if held.len() == 2 {
                let a = held[0].local_addr()?.port();
                let b = held[1].local_addr()?.port();
                return Ok((a, b));
            }
        }
    }
    bail!("no two free ports in 20000..32000")
}
