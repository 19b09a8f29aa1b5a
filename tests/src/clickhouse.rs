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
    /// Config for a cluster member (interserver port, `<remote_servers>`, `<zookeeper>`,
    /// `<macros>`); empty for a lone server.
    member_config: String,
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
            let [http_port, tcp_port] = free_ports::<2>()?;
            let mut server = Self {
                dir,
                http_port,
                tcp_port,
                member_config: String::new(),
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
             {member}\
             </yandex>\n",
            http = self.http_port,
            tcp = self.tcp_port,
            member = self.member_config,
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
        let child = with_parent_death_signal(server)
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

    /// Kills the server with SIGKILL (no shutdown of any kind); [`Self::start_again`]
    /// brings it back on the same folder and ports.
    pub fn kill(&mut self) {
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

/// Runs `sql` through the HTTP interface on `port` (no `clickhouse-client` process, no
/// borrow of the server's handle) and returns the body (TabSeparated).
///
/// # Errors
/// When the server cannot be reached or answers with an error.
pub fn http_query(port: u16, sql: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "POST / HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{sql}",
        sql.len()
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    if !head.contains(" 200 ") {
        bail!("ClickHouse answered {sql:?} with {}", answer.trim());
    }
    Ok(body.to_owned())
}

/// A command that runs `program` with the parent-death signal set: setpriv (util-linux)
/// sets it and execs the program, so a test that dies without unwinding still takes its
/// servers with it.
pub fn with_parent_death_signal(program: impl AsRef<std::ffi::OsStr>) -> Command {
    if Path::new("/usr/bin/setpriv").exists() {
        let mut command = Command::new("/usr/bin/setpriv");
        command.args(["--pdeathsig", "KILL", "--"]).arg(program);
        command
    } else {
        Command::new(program)
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

/// `N` distinct ports free on 127.0.0.1 now, below the kernel's ephemeral range (so no
/// outgoing connection takes them while a test restarts a server), spread by process id so
/// that parallel test processes start their search at different places.
pub fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let span = 12_000u32;
    let start = (std::process::id().wrapping_mul(7919)) % span;
    let mut held: Vec<TcpListener> = Vec::new();
    for offset in 0..span {
        let port = u16::try_from(20_000 + (start + offset) % span)?;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            held.push(listener);
            if held.len() == N {
                let mut ports = [0; N];
                for (port, listener) in ports.iter_mut().zip(&held) {
                    *port = listener.local_addr()?.port();
                }
                return Ok(ports);
            }
        }
    }
    bail!("no {N} free ports in 20000..32000")
}

// ------------------------------------------------------------------ cluster

/// Where Debian's `zookeeper` package puts the server and what it needs beside its own
/// manifest's class path (logging).
const ZOOKEEPER_CLASSPATH: &str =
    "/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-log4j12.jar:/usr/share/java/log4j-1.2.jar";

/// A private standalone ZooKeeper (Debian `zookeeper`, run with `java` directly): its own
/// folder and client port on 127.0.0.1, no admin server, killed on drop.
pub struct ZooKeeper {
    /// Config, data and log.
    pub dir: tempfile::TempDir,
    /// The client port.
    pub port: u16,
    child: Option<Child>,
}

impl ZooKeeper {
    /// Starts ZooKeeper on `port` and waits until it answers `ruok` with `imok`.
    ///
    /// # Errors
    /// When the package or `java` is missing, or it does not answer within 30 s.
    pub fn start(port: u16) -> anyhow::Result<Self> {
        if !Path::new("/usr/share/java/zookeeper.jar").exists() {
            bail!("ZooKeeper is missing: apt-get install zookeeper (Debian's package)");
        }
        let dir = tempfile::tempdir()?;
        let path = dir.path();
        std::fs::create_dir_all(path.join("data"))?;
        std::fs::write(
            path.join("zoo.cfg"),
            format!(
                "tickTime=2000\ndataDir={data}\nclientPort={port}\nclientPortAddress=127.0.0.1\n\
                 maxClientCnxns=0\nadmin.enableServer=false\n4lw.commands.whitelist=ruok,srvr\n",
                data = path.join("data").display()
            ),
        )?;
        std::fs::write(
            path.join("log4j.properties"),
            format!(
                "log4j.rootLogger=WARN,FILE\nlog4j.appender.FILE=org.apache.log4j.FileAppender\n\
                 log4j.appender.FILE.File={}\nlog4j.appender.FILE.layout=org.apache.log4j.PatternLayout\n\
                 log4j.appender.FILE.layout.ConversionPattern=%d %-5p %m%n\n",
                path.join("zookeeper.log").display()
            ),
        )?;
        let stderr = std::fs::File::create(path.join("stderr.log"))?;
        let child = with_parent_death_signal("java")
            .args(["-Xms32m", "-Xmx256m"])
            .arg(format!(
                "-Dlog4j.configuration=file:{}",
                path.join("log4j.properties").display()
            ))
            .args(["-cp", ZOOKEEPER_CLASSPATH])
            .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
            .arg(path.join("zoo.cfg"))
            .current_dir(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("cannot run java for ZooKeeper: apt-get install zookeeper")?;
        let mut zookeeper = Self {
            dir,
            port,
            child: Some(child),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while four_letters(port, "ruok").as_deref() != Some("imok") {
            if let Some(child) = zookeeper.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                zookeeper.child = None;
                bail!("ZooKeeper exited with {status}: {}", zookeeper.log_text());
            }
            if Instant::now() > deadline {
                bail!(
                    "ZooKeeper did not answer ruok within {START_TIMEOUT:?}: {}",
                    zookeeper.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(zookeeper)
    }

    /// Its log and standard error.
    pub fn log_text(&self) -> String {
        let log =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("{}{}", log("zookeeper.log"), log("stderr.log"))
    }
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends a ZooKeeper four-letter command; its answer, if any.
fn four_letters(port: u16, word: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(word.as_bytes()).ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    Some(answer)
}

/// A real ClickHouse cluster on loopback: ZooKeeper plus `shards` x `replicas` servers, each
/// with its own folder and ports, in cluster [`ClickHouseCluster::NAME`] (`internal_replication`
/// true, macros `{shard}` = `01`.. and `{replica}` = `r1`.. unique in the cluster).
pub struct ClickHouseCluster {
    /// Server `shard * replicas + replica` (0-based): `servers[0]` and `servers[1]` are
    /// shard 01's replicas when `replicas` is 2.
    pub servers: Vec<ClickHouse>,
    /// Dropped after the servers (field order).
    pub zookeeper: ZooKeeper,
    /// Replicas per shard.
    pub replicas: usize,
}

impl ClickHouseCluster {
    /// The cluster's name in `<remote_servers>`.
    pub const NAME: &'static str = "fleet";

    /// Starts ZooKeeper and every server, and waits until each answers `/ping`.
    ///
    /// # Errors
    /// When a package is missing or a process does not come up within 30 s.
    pub fn start(shards: usize, replicas: usize) -> anyhow::Result<Self> {
        let count = shards * replicas;
        // ZooKeeper, then http, tcp and interserver per server.
        let ports = free_ports::<13>()?;
        if count > 4 {
            bail!("at most 4 servers (2 x 2) in a test cluster");
        }
        let zookeeper = ZooKeeper::start(ports[0])?;
        let port = |server: usize, which: usize| ports[1 + server * 3 + which];
        let mut remote = String::new();
        for shard in 0..shards {
            remote.push_str("<shard><internal_replication>true</internal_replication>");
            for replica in 0..replicas {
                let tcp = port(shard * replicas + replica, 1);
                remote.push_str(&format!(
                    "<replica><host>127.0.0.1</host><port>{tcp}</port></replica>"
                ));
            }
            remote.push_str("</shard>");
        }
        let mut servers = Vec::with_capacity(count);
        for index in 0..count {
            let dir = tempfile::tempdir()?;
            for sub in ["data", "tmp", "log"] {
                std::fs::create_dir_all(dir.path().join(sub))?;
            }
            // session_timeout_ms 5 s: a replica killed with -9 and started again waits for
            // its old ZooKeeper session to expire before it rejoins (30 s by default).
            let member_config = format!(
                "<interserver_http_port>{interserver}</interserver_http_port>\
                 <interserver_http_host>127.0.0.1</interserver_http_host>\n\
                 <remote_servers><{name}>{remote}</{name}></remote_servers>\n\
                 <zookeeper><node><host>127.0.0.1</host><port>{zk}</port></node>\
                 <session_timeout_ms>5000</session_timeout_ms></zookeeper>\n\
                 <macros><shard>{shard:02}</shard><replica>r{replica}</replica></macros>\n\
                 <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>\n\
                 <timezone>UTC</timezone>\n",
                interserver = port(index, 2),
                name = Self::NAME,
                zk = zookeeper.port,
                shard = index / replicas + 1,
                replica = index + 1,
            );
            let server = ClickHouse {
                dir,
                http_port: port(index, 0),
                tcp_port: port(index, 1),
                member_config,
                child: None,
            };
            server.write_config()?;
            servers.push(server);
        }
        let mut cluster = Self {
            servers,
            zookeeper,
            replicas,
        };
        for server in &mut cluster.servers {
            server
                .spawn_and_wait()
                .with_context(|| format!("clickhouse-server log:\n{}", server.log_text()))?;
        }
        Ok(cluster)
    }

    /// Every server's `query(sql)` answer, in server order.
    ///
    /// # Errors
    /// When one fails.
    pub fn query_each(&self, sql: &str) -> anyhow::Result<Vec<String>> {
        self.servers.iter().map(|s| s.query(sql)).collect()
    }

    /// Every server's error log, labelled.
    pub fn log_text(&self) -> String {
        let mut text = String::new();
        for (i, server) in self.servers.iter().enumerate() {
            text.push_str(&format!("--- server {i}\n{}", server.log_text()));
        }
        text
    }
}
