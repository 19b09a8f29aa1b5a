//! The fleet web page in a real browser (Debian's headless Chromium over the DevTools
//! protocol) against a running server with real agents and fake subtensor nodes: sign-in,
//! the fleet table worst first, a node page with charts, findings, audit; a row changing
//! phase live when a node falls behind; and access by operator certificate or token only,
//! read-only. Screenshots go to `target/screenshots/`.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use guardian_proto::v1::{
    AgentFrame, GpuDevice, GpuSample, HostSample, Sample, SampleBatch, XidEvent, agent_frame,
    sample,
};
use guardian_tests::browser::{Browser, screenshot_dir, spki_sha256};
use guardian_tests::fake_node::{FakeNode, FakeNodeConfig};
use guardian_tests::{
    Proc, Scratch, Server, encode, hello_frame, raw_uplink, start_agent, wait_for_ack,
};

const TOKEN: &str = "web-test-token-5c2e";

fn sha256_hex(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A server with the web page on, quick detection and a lag policy of 5 blocks.
fn server(scratch: &Scratch) -> anyhow::Result<(Server, SocketAddr)> {
    let config = scratch.server_config(
        &scratch.sqlite_url(),
        &format!(
            "command_signing_key_file = \"{}\"\n[detect]\nfrozen_head_ms = 2500\n[reconcile]\nevaluate_interval_ms = 200\n\
             [reconcile.policy]\nmax_block_lag = 5\nrecovery_strategy = \"cordon-and-alert\"\nconfirm_samples = 2\n\
             [web]\nlisten = \"127.0.0.1:0\"\ntoken_sha256 = [\"{}\"]\n",
            scratch.pki.command_signing_key().display(),
            sha256_hex(TOKEN)
        ),
    )?;
    let server = Server::start(&config, scratch.path("server.log"))?;
    let web = server
        .web
        .ok_or_else(|| anyhow::anyhow!("the listening line names no web address"))?;
    Ok((server, web))
}

/// A real agent for `node` reading the fake subtensor node `chain`.
fn agent(
    scratch: &Scratch,
    node: &str,
    grpc: SocketAddr,
    chain: &FakeNode,
) -> anyhow::Result<Proc> {
    let extra = format!(
        "[chain]\nendpoint = \"{}\"\ncall_timeout_ms = 300\n[commands]\nenabled = true\nverify_key_file = \"{}\"\n",
        chain.ws_url(),
        scratch.pki.command_verify_key().display()
    );
    start_agent(
        &scratch.agent_config_with(node, grpc, 400, &extra)?,
        scratch.path(&format!("agent-{node}.log")),
    )
}

/// A batch with an hour of history, a sample a minute (host load and GPU temperature
/// rising and falling), ending now with two GPUs, one of them hot with an Xid.
fn gpu_batch(seq: u64) -> Vec<u8> {
    let now = guardian_server::unix_ms();
    let device = |index: u32, temperature_celsius: f64, xid: bool| GpuDevice {
        index,
        uuid: format!("GPU-{index}"),
        name: "NVIDIA H100 80GB HBM3".into(),
        utilisation_gpu_percent: 91.0,
        memory_used_bytes: 60 << 30,
        memory_total_bytes: 80 << 30,
        temperature_celsius,
        power_draw_watts: 500.0,
        xid_events: if xid {
            vec![XidEvent {
                xid: 79,
                observed_at_unix_ms: now,
            }]
        } else {
            vec![]
        },
        ..GpuDevice::default()
    };
    let mut samples = Vec::new();
    for minute in (0..=60).rev() {
        let at = now - minute * 60_000;
        let wave = (f64::from(u32::try_from(minute).unwrap_or(0)) / 6.0).sin();
        let hot = 64.0 + 20.0 * wave.abs();
        samples.push(Sample {
            observed_at_unix_ms: at,
            kind: Some(sample::Kind::Host(HostSample {
                cpu_busy_percent: 40.0 + 30.0 * wave,
                mem_total_bytes: 64 << 30,
                mem_available_bytes: 40 << 30,
                ..HostSample::default()
            })),
        });
        samples.push(Sample {
            observed_at_unix_ms: at,
            kind: Some(sample::Kind::Gpu(GpuSample {
                available: true,
                driver_version: "550.54".into(),
                devices: if minute == 0 {
                    vec![device(0, 64.0, false), device(1, 88.0, true)]
                } else {
                    vec![device(0, hot - 4.0, false), device(1, hot, false)]
                },
                ..GpuSample::default()
            })),
        });
    }
    encode(&AgentFrame {
        frame: Some(agent_frame::Frame::Batch(SampleBatch {
            seq,
            samples,
            spool_dropped_batches_total: 0,
        })),
    })
}

/// Opens the page, is sent to the sign-in form, is refused a wrong token, and signs in.
async fn sign_in(browser: &mut Browser, base: &str) -> anyhow::Result<()> {
    browser.goto(&format!("{base}/")).await?;
    browser
        .wait_for(
            "!!document.querySelector('form#login')",
            Duration::from_secs(10),
            "the sign-in form",
        )
        .await?;
    for (token, what) in [("not-the-token", "the refusal"), (TOKEN, "the fleet table")] {
        browser
            .eval(&format!(
                "document.getElementById('token').value = {}; document.getElementById('login').submit(); true",
                serde_json::Value::from(token)
            ))
            .await?;
        let expect = if token == TOKEN {
            "document.readyState === 'complete' && !!document.querySelector('table#fleet')"
        } else {
            "!!document.getElementById('problem')"
        };
        browser
            .wait_for(expect, Duration::from_secs(10), what)
            .await?;
    }
    Ok(())
}

/// The fleet rows as `[node, phase, lag, gpu, class, sortRisk, phaseRank]`, in page order.
const ROWS: &str = "Array.from(document.querySelectorAll('#fleet tbody tr')).map(r => [\
    r.dataset.node, r.querySelector('[data-k=phase]').textContent, r.querySelector('[data-k=lag]').textContent,\
    r.querySelector('[data-k=gpu]').textContent + (r.querySelector('[data-k=gpu]').className === 'alert' ? ' !' : ''),\
    r.className, Number(r.dataset.sortRisk), Number(r.dataset.phaseRank)])";

fn row<'a>(rows: &'a serde_json::Value, node: &str) -> &'a serde_json::Value {
    rows.as_array()
        .and_then(|rows| rows.iter().find(|r| r[0] == node))
        .unwrap_or(&serde_json::Value::Null)
}

#[tokio::test]
async fn the_fleet_and_a_node_page_render_in_a_real_browser() -> anyhow::Result<()> {
    let scratch = Scratch::new(&["val-a", "val-b", "val-gpu", "val-away"])?;
    let (server, web) = server(&scratch)?;
    let (healthy, lagging) = (
        FakeNode::start(FakeNodeConfig::default()).await?,
        FakeNode::start(FakeNodeConfig::default()).await?,
    );
    let _a = agent(&scratch, "val-a", server.grpc, &healthy)?;
    let _b = agent(&scratch, "val-b", server.grpc, &lagging)?;
    // A node with GPUs (one hot, with an Xid) that stays connected, and one that went away.
    let (cert, key) = scratch.pki.node("val-gpu");
    let channel = scratch.channel(server.grpc, &cert, &key).await?;
    let (gpu_tx, mut gpu_replies) = raw_uplink(channel, vec![hello_frame("val-gpu", "local")])
        .await
        .map_err(|s| anyhow::anyhow!("val-gpu refused: {s:?}"))?;
    gpu_tx.send(gpu_batch(1)).await?;
    wait_for_ack(&mut gpu_replies, 1).await?;
    let (cert, key) = scratch.pki.node("val-away");
    let channel = scratch.channel(server.grpc, &cert, &key).await?;
    let (away_tx, mut away_replies) = raw_uplink(channel, vec![hello_frame("val-away", "local")])
        .await
        .map_err(|s| anyhow::anyhow!("val-away refused: {s:?}"))?;
    away_tx.send(gpu_batch(1)).await?;
    wait_for_ack(&mut away_replies, 1).await?;
    drop((away_tx, away_replies));
    tokio::time::sleep(Duration::from_secs(2)).await;
    lagging.lag(40);

    let (cert, _) = scratch.pki.server();
    let mut browser = Browser::start(&[spki_sha256(&cert)?]).await?;
    let base = format!("https://localhost:{}", web.port());
    sign_in(&mut browser, &base).await?;

    // The table fills in and keeps up by itself: val-a synced, val-b behind by about 40.
    let wanted = "(() => { const rows = Object.fromEntries(Array.from(document.querySelectorAll('#fleet tbody tr'))\
        .map(r => [r.dataset.node, r])); const t = (n, k) => rows[n] && rows[n].querySelector('[data-k=' + k + ']').textContent;\
        return Object.keys(rows).length === 4 && t('val-a', 'phase') === 'synced' && t('val-b', 'phase') !== 'synced'\
        && Number(t('val-b', 'lag')) > 5 && rows['val-away'].className === 'away'; })()";
    browser
        .wait_for(
            wanted,
            Duration::from_secs(45),
            "four rows: val-a synced, val-b lagging, val-away away",
        )
        .await
        .map_err(|e| {
            e.context(std::fs::read_to_string(scratch.path("server.log")).unwrap_or_default())
        })?;
    let rows = browser.eval(ROWS).await?;
    assert!(
        row(&rows, "val-gpu")[3]
            .as_str()
            .is_some_and(|gpu| gpu.starts_with("2×")
                && gpu.contains("88 °C")
                && gpu.ends_with(" !")),
        "the GPU column shows both devices, the hottest, and flags the Xid: {rows}"
    );
    // Worst first: each row sorts at or after the one above it.
    let list = rows.as_array().expect("rows");
    for pair in list.windows(2) {
        let key = |r: &serde_json::Value| {
            (
                -r[5].as_f64().unwrap_or(0.0),
                -r[6].as_i64().unwrap_or(0),
                r[0].as_str().unwrap_or("").to_owned(),
            )
        };
        assert!(
            key(&pair[0]).partial_cmp(&key(&pair[1])) != Some(std::cmp::Ordering::Greater),
            "not worst first: {rows}"
        );
    }
    // An away agent counts as risk 1, as bad as the lagging node; the healthy one is last.
    let top: Vec<&str> = list[..2].iter().filter_map(|r| r[0].as_str()).collect();
    assert!(
        top.contains(&"val-away") && top.contains(&"val-b"),
        "{rows}"
    );
    assert_eq!(list[3][0], "val-a", "{rows}");
    browser
        .wait_for(
            "document.getElementById('live').dataset.state === 'live'",
            Duration::from_secs(10),
            "the event stream to be open",
        )
        .await?;
    let shots = screenshot_dir();
    let size = browser.screenshot(&shots.join("web-fleet.png")).await?;
    assert!(size > 10_000, "a blank fleet screenshot ({size} bytes)");

    // The lagging node's page: charts with points, the finding with its evidence, the audit.
    browser
        .eval("document.querySelector('a[href=\"/nodes/val-b\"]').click(); true")
        .await?;
    browser
        .wait_for(
            "location.pathname === '/nodes/val-b' && document.readyState === 'complete' && !!document.querySelector('.charts')",
            Duration::from_secs(10),
            "the node page",
        )
        .await?;
    // val-b left synced because of its finding, so the page, rendered after, lists it.
    let findings = browser
        .eval("(document.querySelector('#findings') || {}).textContent || ''")
        .await?;
    assert!(
        findings.as_str().is_some_and(|t| t.contains("block_lag")),
        "{findings}"
    );
    assert!(
        findings
            .as_str()
            .is_some_and(|t| t.contains("critical") || t.contains("warning")),
        "{findings}"
    );
    let evidence = browser
        .eval("document.querySelectorAll('#findings dl dt').length")
        .await?;
    assert!(
        evidence.as_u64().unwrap_or(0) > 0,
        "the finding shows its evidence"
    );
    let charts = browser
        .eval(
            "Object.fromEntries(Array.from(document.querySelectorAll('figure.chart')).map(f => \
             [f.dataset.metric, [Number(f.dataset.points), f.querySelectorAll('polyline.avg, circle.avg').length]]))",
        )
        .await?;
    for metric in ["block_lag", "peers", "cpu_busy_percent"] {
        let chart = &charts[metric];
        assert!(
            chart[0].as_u64().unwrap_or(0) > 0 && chart[1].as_u64().unwrap_or(0) > 0,
            "{metric} is drawn with points: {charts}"
        );
    }
    let audit = browser
        .eval("document.querySelectorAll('#audit tbody tr').length")
        .await?;
    assert!(
        audit.as_u64().unwrap_or(0) > 0,
        "the node's audit entries are listed"
    );
    let size = browser.screenshot(&shots.join("web-node.png")).await?;
    assert!(size > 10_000, "a blank node screenshot ({size} bytes)");

    // A node with an hour of history: its charts are lines through many buckets.
    browser.goto(&format!("{base}/nodes/val-gpu")).await?;
    let lines = browser
        .eval(
            "Object.fromEntries(Array.from(document.querySelectorAll('figure.chart')).map(f => \
             [f.dataset.metric, Math.max(0, ...Array.from(f.querySelectorAll('polyline.avg')).map(p => p.getAttribute('points').trim().split(' ').length))]))",
        )
        .await?;
    for metric in [
        "cpu_busy_percent",
        "temperature_celsius",
        "utilisation_gpu_percent",
    ] {
        assert!(
            lines[metric].as_u64().unwrap_or(0) >= 30,
            "{metric} is a line through the hour: {lines}"
        );
    }
    assert_eq!(
        browser
            .eval("document.querySelectorAll('#gpus tbody tr').length")
            .await?,
        2,
        "both GPUs are listed"
    );
    let size = browser.screenshot(&shots.join("web-node-gpu.png")).await?;
    assert!(size > 10_000, "a blank node screenshot ({size} bytes)");

    // The range links work, and the node of another page is not found.
    browser
        .goto(&format!("{base}/nodes/val-b?range=24h"))
        .await?;
    assert_eq!(
        browser
            .eval("document.querySelector('.ranges a[aria-current]').textContent")
            .await?,
        "24h"
    );
    browser.goto(&format!("{base}/nodes/val-nobody")).await?;
    assert!(
        browser
            .eval("document.body.textContent.includes('No node')")
            .await?
            .as_bool()
            .unwrap_or(false)
    );
    assert!(
        browser.exceptions().is_empty(),
        "the pages threw: {:?}",
        browser.exceptions()
    );
    browser.close().await;
    drop(gpu_tx);
    Ok(())
}

#[tokio::test]
async fn a_row_changes_phase_live_when_its_node_falls_behind() -> anyhow::Result<()> {
    let scratch = Scratch::new(&["val-live"])?;
    let (server, web) = server(&scratch)?;
    let chain = FakeNode::start(FakeNodeConfig::default()).await?;
    let _agent = agent(&scratch, "val-live", server.grpc, &chain)?;
    let (cert, _) = scratch.pki.server();
    let mut browser = Browser::start(&[spki_sha256(&cert)?]).await?;
    let base = format!("https://localhost:{}", web.port());
    sign_in(&mut browser, &base).await?;
    let phase = "(document.querySelector('#n-val-live [data-k=phase]') || {}).textContent";
    browser
        .wait_for(
            &format!(
                "{phase} === 'synced' && document.getElementById('live').dataset.state === 'live'"
            ),
            Duration::from_secs(30),
            "val-live synced, with the event stream open",
        )
        .await?;
    let shots = screenshot_dir();
    browser
        .screenshot(&shots.join("web-live-before.png"))
        .await?;
    // A mark on this document: gone if the page were reloaded.
    browser.eval("window.__sameDocument = true").await?;

    chain.lag(40);
    let changed = browser
        .wait_for(
            &format!("{phase} !== 'synced' && Number(document.querySelector('#n-val-live [data-k=lag]').textContent) > 5 && {phase}"),
            Duration::from_secs(30),
            "the row to leave synced",
        )
        .await
        .map_err(|e| {
            e.context(std::fs::read_to_string(scratch.path("server.log")).unwrap_or_default())
        })?;
    assert!(
        browser
            .eval("window.__sameDocument === true")
            .await?
            .as_bool()
            == Some(true),
        "the row changed without a reload"
    );
    let size = browser
        .screenshot(&shots.join("web-live-after.png"))
        .await?;
    assert!(size > 10_000, "a blank screenshot ({size} bytes)");
    assert_ne!(changed, "synced");

    // Healed: the lag falls back, still without a reload.
    chain.heal();
    browser
        .wait_for(
            "Number(document.querySelector('#n-val-live [data-k=lag]').textContent) <= 1 && window.__sameDocument === true",
            Duration::from_secs(30),
            "the lag to fall back live",
        )
        .await?;

    // An operator's command and the agent's outcome show on the node's page.
    let mut operator = scratch.operator(server.grpc).await?;
    let command = operator
        .issue_command(guardian_proto::v1::IssueCommandRequest {
            node_id: "val-live".into(),
            action: "collect-diagnostics".into(),
            parameters: Default::default(),
            ttl_seconds: 60,
        })
        .await?
        .into_inner();
    browser.goto(&format!("{base}/nodes/val-live")).await?;
    let state = browser
        .wait_for(
            &format!(
                "(async () => {{ const row = Array.from(document.querySelectorAll('#commands tbody tr'))\
                 .find(r => r.textContent.includes('{}')); if (row && !row.querySelector('.state-issued')) \
                 return row.querySelector('.state').textContent; location.reload(); return ''; }})()",
                command.command_id
            ),
            Duration::from_secs(30),
            "the command's outcome on the node page",
        )
        .await?;
    assert!(
        ["succeeded", "failed", "refused"].contains(&state.as_str().unwrap_or("")),
        "{state}"
    );
    browser
        .wait_for(
            "document.readyState === 'complete'",
            Duration::from_secs(10),
            "the page",
        )
        .await?;
    browser
        .screenshot(&shots.join("web-node-command.png"))
        .await?;
    assert!(
        browser.exceptions().is_empty(),
        "{:?}",
        browser.exceptions()
    );
    browser.close().await;
    Ok(())
}

/// `(status, headers and body)` of an HTTPS request with curl, trusting the fleet CA.
fn curl<A: AsRef<std::ffi::OsStr>>(
    scratch: &Scratch,
    web: SocketAddr,
    args: &[A],
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let out = Command::new("curl")
        .args(["-s", "-i", "-m", "10", "-w", "\n%{http_code}", "--cacert"])
        .arg(scratch.pki.ca())
        .args(["--resolve", &format!("localhost:{}:127.0.0.1", web.port())])
        .args(args)
        .arg(format!("https://localhost:{}{path}", web.port()))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
}

/// curl's arguments for a client certificate.
fn cert_args(cert: &std::path::Path, key: &std::path::Path) -> [String; 4] {
    [
        "--cert".into(),
        cert.display().to_string(),
        "--key".into(),
        key.display().to_string(),
    ]
}

#[tokio::test]
async fn only_operators_get_in_and_the_page_is_read_only() -> anyhow::Result<()> {
    let scratch = Scratch::new(&["val-x"])?;
    let (server, web) = server(&scratch)?;
    let (cert, key) = scratch.pki.node("val-x");
    let channel = scratch.channel(server.grpc, &cert, &key).await?;
    let (tx, mut replies) = raw_uplink(channel, vec![hello_frame("val-x", "local")])
        .await
        .map_err(|s| anyhow::anyhow!("val-x refused: {s:?}"))?;
    tx.send(gpu_batch(1)).await?;
    wait_for_ack(&mut replies, 1).await?;
    let bearer = format!("Authorization: Bearer {TOKEN}");

    let (status, page) = curl::<&str>(&scratch, web, &[], "/")?;
    assert_eq!(status, 401, "{page}");
    assert!(
        page.contains("form method=\"post\" action=\"/login\""),
        "{page}"
    );
    let (status, _) = curl(&scratch, web, &["-H", "Authorization: Bearer wrong"], "/")?;
    assert_eq!(status, 401);
    // An agent's certificate is not an operator's.
    let (cert, key) = scratch.pki.node("val-x");
    let (status, _) = curl(&scratch, web, &cert_args(&cert, &key), "/")?;
    assert_eq!(status, 401);

    // The table is complete without JavaScript, for a token or an operator certificate.
    let (status, page) = curl(&scratch, web, &["-H", &bearer], "/")?;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("<tr id=\"n-val-x\""), "{page}");
    let lower = page.to_ascii_lowercase();
    assert!(
        lower.contains("content-security-policy: default-src 'none'"),
        "{page}"
    );
    let (cert, key) = scratch.pki.operator();
    let (status, page) = curl(&scratch, web, &cert_args(&cert, &key), "/nodes/val-x")?;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("NVIDIA H100 80GB HBM3"), "{page}");

    // Read-only: nothing but GET.
    let (status, _) = curl(&scratch, web, &["-H", &bearer, "-X", "POST"], "/")?;
    assert_eq!(status, 405);
    let (status, _) = curl(
        &scratch,
        web,
        &["-H", &bearer, "-X", "DELETE"],
        "/nodes/val-x",
    )?;
    assert_eq!(status, 405);

    // The sign-in form sets a cookie the browser cannot read or send elsewhere.
    let (status, page) = curl(&scratch, web, &["--data", "token=wrong&next=/"], "/login")?;
    assert_eq!(status, 401, "{page}");
    let (status, page) = curl(
        &scratch,
        web,
        &[
            "--data-urlencode",
            &format!("token={TOKEN}"),
            "--data",
            "next=//elsewhere.example/",
        ],
        "/login",
    )?;
    assert_eq!(status, 303, "{page}");
    let cookie = page
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .ok_or_else(|| anyhow::anyhow!("no cookie: {page}"))?
        .trim()
        .to_owned();
    for attribute in ["Secure", "HttpOnly", "SameSite=Strict"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(
        page.lines().any(|l| l.trim() == "location: /"),
        "a foreign next= is not followed: {page}"
    );
    let pair = cookie.split(';').next().unwrap_or_default();
    let (status, page) = curl(&scratch, web, &["-H", &format!("Cookie: {pair}")], "/")?;
    assert_eq!(status, 200, "{page}");

    // The event stream: the fleet now, as rows.
    let (_, stream) = curl(&scratch, web, &["-N", "-m", "3", "-H", &bearer], "/events")?;
    assert!(
        stream.contains("content-type: text/event-stream"),
        "{stream}"
    );
    let data = stream
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .ok_or_else(|| anyhow::anyhow!("no event: {stream}"))?;
    let row: serde_json::Value = serde_json::from_str(data)?;
    assert_eq!(row["node"], "val-x", "{row}");
    assert!(row["connected"].as_bool() == Some(true), "{row}");
    let (status, _) = curl(&scratch, web, &["-m", "3"], "/events")?;
    assert_eq!(status, 401);

    // Guessing tokens is slowed: after 10 wrong ones in a minute (two were above: a form and
    // a bearer header), this address waits, even with the right token, by form or header;
    // an operator certificate still gets in.
    for _ in 0..8 {
        let (status, _) = curl(&scratch, web, &["--data", "token=guess&next=/"], "/login")?;
        assert_eq!(status, 401);
    }
    let (status, page) = curl(
        &scratch,
        web,
        &["--data-urlencode", &format!("token={TOKEN}")],
        "/login",
    )?;
    assert_eq!(status, 429, "{page}");
    assert!(
        page.to_ascii_lowercase().contains("retry-after: 60"),
        "{page}"
    );
    let (status, _) = curl(&scratch, web, &["-H", &bearer], "/")?;
    assert_eq!(status, 429);
    let (cert, key) = scratch.pki.operator();
    let (status, _) = curl(&scratch, web, &cert_args(&cert, &key), "/")?;
    assert_eq!(status, 200);
    drop(tx);
    Ok(())
}
