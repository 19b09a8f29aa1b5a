//! A private Prometheus (Debian's `prometheus`, 2.42) on 127.0.0.1 for tests: it scrapes the
//! given targets every second and evaluates the given rule files every second.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::Proc;
use crate::clickhouse::{free_ports, with_parent_death_signal};

/// A running Prometheus.
pub struct Prometheus {
    /// The process.
    pub proc: Proc,
    /// Its HTTP port on 127.0.0.1.
    pub port: u16,
}

impl Prometheus {
    /// Starts Prometheus in `dir` scraping each `(job, address)` at `/metrics`, with `rules`.
    ///
    /// # Errors
    /// When `prometheus` is not installed or does not start.
    pub fn start(
        dir: &Path,
        targets: &[(&str, SocketAddr)],
        rules: &[PathBuf],
    ) -> anyhow::Result<Self> {
        let binary = Path::new("/usr/bin/prometheus");
        if !binary.exists() {
            bail!(
                "/usr/bin/prometheus is missing: bash scripts/setup installs Debian's prometheus"
            );
        }
        std::fs::create_dir_all(dir)?;
        let [port] = free_ports::<1>()?;
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nrule_files:\n",
        );
        for rule in rules {
            config.push_str(&format!("  - {}\n", rule.display()));
        }
        config.push_str("scrape_configs:\n");
        for (job, address) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{address}']\n"
            ));
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let log = dir.join("prometheus.log");
        let child = with_parent_death_signal(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting prometheus")?;
        Ok(Self {
            proc: Proc { child, log },
            port,
        })
    }

    /// The `data` of an instant query of `promql` (URL-encoded by curl).
    ///
    /// # Errors
    /// When Prometheus does not answer, or refuses the query (a parse error names itself).
    pub fn query(&self, promql: &str) -> anyhow::Result<serde_json::Value> {
        let url = format!("http://127.0.0.1:{}/api/v1/query", self.port);
        let encoded = format!("query={promql}");
        self.get(promql, &["-G", "--data-urlencode", &encoded, &url])
    }

    /// `GET /api/v1/{path}`'s `data`, once Prometheus answers with status "success".
    ///
    /// # Errors
    /// When Prometheus does not answer, or answers with an error.
    pub fn api(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let url = format!("http://127.0.0.1:{}/api/v1/{path}", self.port);
        self.get(path, &["-g", &url])
    }

    /// curl with `args`; the answer's `data` when its status is "success" (`what` names it).
    fn get(&self, what: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let out = Command::new("curl")
            .args(["-s", "-m", "5"])
            .args(args)
            .output()
            .context("curl is missing: bash scripts/setup installs it")?;
        let body: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "prometheus answered {what} with {:?}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        if body["status"] != "success" {
            bail!("prometheus answered {what} with {body}");
        }
        Ok(body["data"].clone())
    }
}
