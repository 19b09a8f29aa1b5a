//! A real browser for tests: Debian's headless Chromium, driven over the DevTools protocol on
//! `--remote-debugging-pipe` (NUL-separated JSON on fds 3 and 4; no WebSocket, no driver
//! download). It trusts exactly the server certificates it is given (by SPKI hash), loads
//! pages, evaluates JavaScript in them, and saves screenshots. Exceptions the page throws are
//! collected so a test can require a clean console.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::oneshot;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A headless Chromium with one page open.
pub struct Browser {
    child: Child,
    stdin: ChildStdin,
    pending: Pending,
    exceptions: Arc<Mutex<Vec<String>>>,
    next_id: u64,
    session: String,
    _profile: tempfile::TempDir,
}

/// The browser binary: `GUARDIAN_TEST_CHROMIUM`, else Debian's `chromium`.
fn executable() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("GUARDIAN_TEST_CHROMIUM") {
        return Ok(PathBuf::from(path));
    }
    for candidate in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(candidate).exists() {
            return Ok(PathBuf::from(candidate));
        }
    }
    bail!(
        "no Chromium: install Debian's chromium (scripts/setup does) or set GUARDIAN_TEST_CHROMIUM"
    )
}

/// base64 SHA-256 of a PEM certificate's SubjectPublicKeyInfo, as
/// `--ignore-certificate-errors-spki-list` takes it.
///
/// # Errors
/// When the file is not a PEM certificate.
pub fn spki_sha256(cert_pem: &Path) -> anyhow::Result<String> {
    let pem = std::fs::read(cert_pem)?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|e| anyhow::anyhow!("{}: {e}", cert_pem.display()))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| anyhow::anyhow!("{}: {e}", cert_pem.display()))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw);
    Ok(base64::engine::general_purpose::STANDARD.encode(digest.as_ref()))
}

impl Browser {
    /// Starts Chromium trusting the certificates whose SPKI hashes are given (see
    /// [`spki_sha256`]), with a 1400x1000 window, and opens a blank page.
    ///
    /// # Errors
    /// When Chromium is missing or does not answer.
    pub async fn start(trusted_spki: &[String]) -> anyhow::Result<Self> {
        let profile = tempfile::tempdir()?;
        let chromium = executable()?;
        // The shell hands our pipes to Chromium as fds 3 (commands in) and 4 (replies out).
        let script = format!(
            "exec \"$0\" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run \
             --disable-extensions --disable-background-networking --disable-component-update \
             --disable-sync --mute-audio --window-size=1400,1000 --user-data-dir={} \
             --ignore-certificate-errors-spki-list={} --remote-debugging-pipe about:blank \
             3<&0 4>&1 0</dev/null 1>&2",
            profile.path().display(),
            trusted_spki.join(",")
        );
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(&chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", chromium.display()))?;
        let stdin = child.stdin.take().context("no stdin")?;
        let mut stdout = child.stdout.take().context("no stdout")?;
        let pending: Pending = Arc::default();
        let exceptions: Arc<Mutex<Vec<String>>> = Arc::default();
        let (replies, seen) = (Arc::clone(&pending), Arc::clone(&exceptions));
        tokio::spawn(async move {
            let mut buffer = Vec::new();
            let mut chunk = vec![0u8; 1 << 16];
            loop {
                let Ok(n) = stdout.read(&mut chunk).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                buffer.extend_from_slice(&chunk[..n]);
                while let Some(end) = buffer.iter().position(|b| *b == 0) {
                    let message: Vec<u8> = buffer.drain(..=end).collect();
                    let Ok(message) = serde_json::from_slice::<Value>(&message[..end]) else {
                        continue;
                    };
                    if let Some(id) = message["id"].as_u64() {
                        if let Some(tx) = replies.lock().expect("lock").remove(&id) {
                            let _ = tx.send(message);
                        }
                    } else if message["method"] == "Runtime.exceptionThrown" {
                        seen.lock()
                            .expect("lock")
                            .push(message["params"]["exceptionDetails"].to_string());
                    }
                }
            }
        });
        let mut browser = Self {
            child,
            stdin,
            pending,
            exceptions,
            next_id: 0,
            session: String::new(),
            _profile: profile,
        };
        let target = browser
            .send(None, "Target.createTarget", json!({ "url": "about:blank" }))
            .await?;
        let target_id = target["targetId"]
            .as_str()
            .context("no targetId")?
            .to_owned();
        let attached = browser
            .send(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await?;
        browser.session = attached["sessionId"]
            .as_str()
            .context("no sessionId")?
            .to_owned();
        browser.call("Page.enable", json!({})).await?;
        browser.call("Runtime.enable", json!({})).await?;
        Ok(browser)
    }

    async fn send(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("lock").insert(id, tx);
        let mut bytes = serde_json::to_vec(&message)?;
        bytes.push(0);
        self.stdin.write_all(&bytes).await?;
        self.stdin.flush().await?;
        let reply = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .with_context(|| format!("Chromium did not answer {method} in 30 s"))?
            .with_context(|| format!("Chromium went away during {method}"))?;
        if let Some(error) = reply.get("error") {
            bail!("{method}: {error}");
        }
        Ok(reply["result"].clone())
    }

    /// A DevTools command on the page.
    ///
    /// # Errors
    /// When Chromium answers with an error or not at all.
    pub async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let session = self.session.clone();
        self.send(Some(&session), method, params).await
    }

    /// Navigates to `url` and waits for the document to finish loading.
    ///
    /// # Errors
    /// When the navigation fails or the page does not load in 30 s.
    pub async fn goto(&mut self, url: &str) -> anyhow::Result<()> {
        let answer = self.call("Page.navigate", json!({ "url": url })).await?;
        if let Some(error) = answer["errorText"].as_str() {
            bail!("cannot load {url}: {error}");
        }
        self.wait_for(
            "document.readyState === 'complete' && location.href !== 'about:blank'",
            Duration::from_secs(30),
            "the page to load",
        )
        .await?;
        Ok(())
    }

    /// Evaluates `expression` in the page (promises awaited) and returns its value.
    ///
    /// # Errors
    /// When the expression throws.
    pub async fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let answer = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(details) = answer.get("exceptionDetails") {
            bail!("{expression}: {details}");
        }
        Ok(answer["result"]["value"].clone())
    }

    /// Polls `expression` every 100 ms until it is truthy; returns its value.
    ///
    /// # Errors
    /// When it is not truthy within `timeout`; the error names `what`.
    pub async fn wait_for(
        &mut self,
        expression: &str,
        timeout: Duration,
        what: &str,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            // A navigation can destroy the context mid-evaluation: try again.
            if let Ok(value) = self.eval(expression).await {
                let truthy = match &value {
                    Value::Null => false,
                    Value::Bool(b) => *b,
                    Value::Number(n) => n.as_f64().is_some_and(|n| n != 0.0),
                    Value::String(s) => !s.is_empty(),
                    _ => true,
                };
                if truthy {
                    return Ok(value);
                }
            }
            if Instant::now() > deadline {
                let text = self
                    .eval("document.body ? document.body.innerText.slice(0, 2000) : ''")
                    .await
                    .unwrap_or_default();
                bail!("waited {timeout:?} for {what}; the page reads: {text}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a PNG of the whole page to `path` and returns its size in bytes.
    ///
    /// # Errors
    /// When the capture or the write fails.
    pub async fn screenshot(&mut self, path: &Path) -> anyhow::Result<usize> {
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().context("no image data")?)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, &png)?;
        Ok(png.len())
    }

    /// The exceptions pages have thrown so far.
    pub fn exceptions(&self) -> Vec<String> {
        self.exceptions.lock().expect("lock").clone()
    }

    /// Closes the browser.
    pub async fn close(mut self) {
        let _ = self.send(None, "Browser.close", json!({})).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// Where tests save screenshots: `target/screenshots/` of the workspace (kept after the run
/// so a person can look at them).
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    target.join("screenshots")
}
