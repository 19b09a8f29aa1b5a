//! The web page's HTML, rendered on the server: every table is complete without JavaScript;
//! the one script (`/static/app.js`) only keeps them live from the event stream. Everything
//! that comes from a node or the ledger is escaped.

use std::fmt::Write as _;

use guardian_proto::v1::{AuditEntry, CommandRecord, FindingRecord, GpuSample, Node};
use serde::Serialize;

use crate::analysis::phase_rank;
use crate::batch::values::ChainValues;

/// `text` with `& < > " '` escaped for HTML text and attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A value with its unit, for people: bytes in binary units, milliseconds as seconds once
/// large, few decimals.
pub fn human(value: f64, unit: &str) -> String {
    if !value.is_finite() {
        return "—".into();
    }
    match unit {
        "bytes" | "bytes/s" => {
            let suffix = if unit == "bytes/s" { "/s" } else { "" };
            let mut v = value;
            for name in ["B", "KiB", "MiB", "GiB", "TiB"] {
                if v.abs() < 1024.0 || name == "TiB" {
                    return if name == "B" {
                        format!("{v:.0} B{suffix}")
                    } else {
                        format!("{v:.1} {name}{suffix}")
                    };
                }
                v /= 1024.0;
            }
            unreachable!("the loop returns at TiB")
        }
        "ms" if value.abs() >= 10_000.0 => format!("{:.0} s", value / 1000.0),
        "%" => format!("{value:.0} %"),
        "" | "0/1" | "ratio" | "bitmask" => trim(value),
        unit => format!("{} {unit}", trim(value)),
    }
}

fn trim(value: f64) -> String {
    if (value - value.round()).abs() < 1e-9 || value.abs() >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

/// `YYYY-MM-DD HH:MM:SSZ`, or an em dash for 0.
pub fn when(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        "—".into()
    } else {
        format!("{}Z", crate::utc(unix_ms))
    }
}

/// How long ago, for people ("4 s", "3 min", "2 h", "5 d").
pub fn age(now_ms: i64, unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "never".into();
    }
    let s = (now_ms - unix_ms).max(0) / 1000;
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86_400 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// One node as a row of the fleet table: the same figures in the HTML and in each event of
/// the live stream, so the page looks the same reloaded or live.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FleetRow {
    /// Node id.
    pub node: String,
    /// Network.
    pub network: String,
    /// Reconciler phase (`pending` before the first evaluation).
    pub phase: String,
    /// Rank of the phase, worse is higher.
    pub phase_rank: usize,
    /// Composite risk 0..1.
    pub risk: f64,
    /// The risk the table sorts by: a node whose agent is away counts as 1 (its health is
    /// not known).
    pub sort_risk: f64,
    /// Risk as shown.
    pub risk_text: String,
    /// An agent stream is open.
    pub connected: bool,
    /// Block lag as shown ("3", "RPC down", "—").
    pub lag: String,
    /// Peers as shown.
    pub peers: String,
    /// GPU state as shown.
    pub gpu: String,
    /// The GPU needs a look (unavailable, hot, Xid or uncorrected ECC errors).
    pub gpu_alert: bool,
    /// Newest sample observed, Unix ms (0 = none).
    pub last_sample_unix_ms: i64,
    /// Open findings.
    pub open_findings: u32,
}

impl FleetRow {
    /// The row of `node`, with its newest GPU sample.
    pub fn of(node: &Node, gpu: Option<&GpuSample>) -> Self {
        let phase = if node.phase.is_empty() {
            "pending".to_owned()
        } else {
            node.phase.clone()
        };
        let (lag, peers) = match &node.last_chain {
            Some(chain) if chain.responsive => (
                ChainValues::of(chain).block_lag.to_string(),
                chain.peers.to_string(),
            ),
            Some(_) => ("RPC down".to_owned(), "—".to_owned()),
            None => ("—".to_owned(), "—".to_owned()),
        };
        let (gpu, gpu_alert) = gpu_summary(gpu);
        let last_sample_unix_ms = node
            .last_host_observed_unix_ms
            .max(node.last_chain_observed_unix_ms);
        Self {
            node: node.node_id.clone(),
            network: node.network.clone(),
            phase_rank: phase_rank(&phase),
            phase,
            risk: node.risk,
            sort_risk: if node.connected { node.risk } else { 1.0 },
            risk_text: format!("{:.2}", node.risk),
            connected: node.connected,
            lag,
            peers,
            gpu,
            gpu_alert,
            last_sample_unix_ms,
            open_findings: node.open_findings,
        }
    }

    /// Worst first: higher sort risk, then worse phase, then the node id.
    pub fn worst_first(a: &Self, b: &Self) -> std::cmp::Ordering {
        b.sort_risk
            .total_cmp(&a.sort_risk)
            .then(b.phase_rank.cmp(&a.phase_rank))
            .then(a.node.cmp(&b.node))
    }

    fn render(&self, now_ms: i64) -> String {
        let mut out = String::new();
        let _ = write!(
            out,
            "<tr id=\"n-{id}\" data-node=\"{id}\" data-sort-risk=\"{}\" data-phase-rank=\"{}\" class=\"{}\">\
             <td data-k=\"node\"><a href=\"/nodes/{id}\">{id}</a></td>\
             <td data-k=\"network\">{}</td>\
             <td data-k=\"phase\"><span class=\"phase phase-{}\">{}</span></td>\
             <td data-k=\"risk\" class=\"num\">{}</td>\
             <td data-k=\"lag\" class=\"num\">{}</td>\
             <td data-k=\"peers\" class=\"num\">{}</td>\
             <td data-k=\"gpu\" class=\"{}\">{}</td>\
             <td data-k=\"last\" data-ms=\"{}\">{}</td>\
             <td data-k=\"findings\" class=\"num\">{}</td></tr>",
            self.sort_risk,
            self.phase_rank,
            if self.connected { "" } else { "away" },
            esc(&self.network),
            esc(&self.phase),
            esc(&self.phase),
            esc(&self.risk_text),
            esc(&self.lag),
            esc(&self.peers),
            if self.gpu_alert { "alert" } else { "" },
            esc(&self.gpu),
            self.last_sample_unix_ms,
            esc(&age(now_ms, self.last_sample_unix_ms)),
            self.open_findings,
            id = esc(&self.node),
        );
        out
    }
}

/// The GPU column: count, hottest temperature and busiest utilisation; flagged when NVML is
/// unavailable or a device is hot or reports Xid or uncorrected ECC errors.
fn gpu_summary(gpu: Option<&GpuSample>) -> (String, bool) {
    let Some(gpu) = gpu else {
        return ("—".into(), false);
    };
    if !gpu.available {
        return ("unavailable".into(), true);
    }
    if gpu.devices.is_empty() {
        return ("no GPU".into(), false);
    }
    let hottest = gpu
        .devices
        .iter()
        .map(|d| d.temperature_celsius)
        .fold(f64::NEG_INFINITY, f64::max);
    let busiest = gpu
        .devices
        .iter()
        .map(|d| d.utilisation_gpu_percent)
        .fold(f64::NEG_INFINITY, f64::max);
    let alert = hottest >= 85.0
        || gpu
            .devices
            .iter()
            .any(|d| !d.xid_events.is_empty() || d.ecc_uncorrected_total > 0);
    (
        format!("{}× · {hottest:.0} °C · {busiest:.0} %", gpu.devices.len()),
        alert,
    )
}

/// The page frame: head, header with the live indicator, `body`, and the script.
pub fn layout(title: &str, live: Option<&str>, body: &str) -> String {
    let live_attr = match live {
        Some(node) => format!(" data-live-node=\"{}\"", esc(node)),
        None => String::new(),
    };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · TaoNode Guardian</title><link rel=\"stylesheet\" href=\"/static/style.css\">\
         <script src=\"/static/app.js\" defer></script></head>\
         <body{live_attr}><header><a class=\"brand\" href=\"/\">TaoNode Guardian</a>\
         <span id=\"live\" data-state=\"static\" title=\"live updates\">static</span>\
         <form method=\"post\" action=\"/logout\"><button type=\"submit\">Sign out</button></form></header>\
         <main>{body}</main></body></html>",
        esc(title)
    )
}

/// The fleet page: a summary line and the table, worst first.
pub fn fleet(rows: &mut [FleetRow], fleet_risk: f64, now_ms: i64) -> String {
    rows.sort_by(FleetRow::worst_first);
    let connected = rows.iter().filter(|r| r.connected).count();
    let mut phases: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for row in rows.iter() {
        *phases.entry(row.phase.as_str()).or_default() += 1;
    }
    let phases: Vec<String> = phases.iter().map(|(p, n)| format!("{p} {n}")).collect();
    let mut body = format!(
        "<h1>Fleet</h1><p id=\"summary\">Nodes <span data-k=\"nodes\">{}</span> · \
         connected <span data-k=\"connected\">{connected}</span> · fleet risk \
         <span data-k=\"fleet-risk\">{fleet_risk:.2}</span> · <span data-k=\"phases\">{}</span></p>",
        rows.len(),
        esc(&phases.join(", "))
    );
    body.push_str(
        "<table id=\"fleet\"><thead><tr><th>Node</th><th>Network</th><th>Phase</th><th>Risk</th>\
         <th>Lag (blocks)</th><th>Peers</th><th>GPU</th><th>Last sample</th><th>Findings</th></tr></thead><tbody>",
    );
    for row in rows.iter() {
        body.push_str(&row.render(now_ms));
    }
    body.push_str("</tbody></table>");
    if rows.is_empty() {
        body.push_str("<p class=\"muted\" id=\"empty\">No agent has connected yet.</p>");
    }
    body.push_str(
        "<noscript><p class=\"muted\">Without JavaScript this page shows the fleet as it was when loaded: reload for fresh figures.</p></noscript>",
    );
    layout("Fleet", None, &body)
}

/// What the node page shows besides the node itself; each part may have failed on its own.
#[derive(Debug)]
pub struct NodeDetail {
    /// The node's newest GPU sample.
    pub gpu: Option<GpuSample>,
    /// Rendered charts.
    pub charts: Vec<String>,
    /// The range shown (`1h`, `24h`, `7d`).
    pub range: &'static str,
    /// Open and recent findings, or why they could not be read.
    pub findings: Result<Vec<FindingRecord>, String>,
    /// Recent commands, or why they could not be read.
    pub commands: Result<Vec<CommandRecord>, String>,
    /// Recent audit entries, or why they could not be read.
    pub audit: Result<Vec<AuditEntry>, String>,
}

fn kv(out: &mut String, key: &str, live: Option<&str>, value: &str) {
    let live = live.map(|k| format!(" data-k=\"{k}\"")).unwrap_or_default();
    let _ = write!(
        out,
        "<tr><th>{}</th><td{live}>{}</td></tr>",
        esc(key),
        esc(value)
    );
}

/// The node page.
pub fn node(node: &Node, detail: &NodeDetail) -> String {
    let row = FleetRow::of(node, detail.gpu.as_ref());
    let id = esc(&node.node_id);
    let mut body = format!(
        "<p><a href=\"/\">← Fleet</a></p><h1>{id} <span data-k=\"phase\" class=\"phase phase-{}\">{}</span></h1>",
        esc(&row.phase),
        esc(&row.phase)
    );
    body.push_str("<div class=\"cols\"><table class=\"facts\"><tbody>");
    kv(&mut body, "Risk", Some("risk"), &row.risk_text);
    kv(
        &mut body,
        "Agent",
        Some("connected"),
        if node.connected { "connected" } else { "away" },
    );
    kv(&mut body, "Network", None, &node.network);
    kv(
        &mut body,
        "Phase since",
        None,
        &when(node.phase_since_unix_ms),
    );
    kv(&mut body, "Block lag", Some("lag"), &row.lag);
    kv(&mut body, "Peers", Some("peers"), &row.peers);
    kv(&mut body, "GPU", Some("gpu"), &row.gpu);
    kv(
        &mut body,
        "Open findings",
        Some("findings"),
        &node.open_findings.to_string(),
    );
    kv(
        &mut body,
        "Remediations this budget",
        None,
        &node.remediation_attempts.to_string(),
    );
    kv(
        &mut body,
        "Automatic remediation",
        None,
        if node.paused { "paused" } else { "on" },
    );
    body.push_str("</tbody></table><table class=\"facts\"><tbody>");
    kv(&mut body, "Hostname", None, &node.hostname);
    kv(&mut body, "Agent version", None, &node.agent_version);
    if !node.kubernetes_node.is_empty() {
        kv(&mut body, "Kubernetes node", None, &node.kubernetes_node);
        kv(&mut body, "Agent pod", None, &node.agent_pod);
    }
    kv(
        &mut body,
        "First seen",
        None,
        &when(node.first_seen_unix_ms),
    );
    kv(&mut body, "Last seen", None, &when(node.last_seen_unix_ms));
    kv(
        &mut body,
        "Batches stored",
        None,
        &node.last_stored_seq.to_string(),
    );
    if let Some(chain) = &node.last_chain {
        kv(
            &mut body,
            "Best / finalized",
            None,
            &format!("{} / {}", chain.best_block, chain.finalized_block),
        );
        kv(
            &mut body,
            "Head age",
            None,
            &human(chain.head_age_ms as f64, "ms"),
        );
        if !chain.responsive {
            kv(&mut body, "RPC error", None, &chain.error);
        }
    }
    if let Some(host) = &node.last_host {
        kv(
            &mut body,
            "CPU busy",
            None,
            &human(host.cpu_busy_percent, "%"),
        );
        kv(
            &mut body,
            "Memory available",
            None,
            &format!(
                "{} of {}",
                human(host.mem_available_bytes as f64, "bytes"),
                human(host.mem_total_bytes as f64, "bytes")
            ),
        );
    }
    body.push_str("</tbody></table></div>");

    body.push_str("<h2>History</h2><nav class=\"ranges\">");
    for range in ["1h", "24h", "7d"] {
        let current = if range == detail.range {
            " aria-current=\"page\""
        } else {
            ""
        };
        let _ = write!(
            body,
            "<a href=\"/nodes/{id}?range={range}\"{current}>{range}</a>"
        );
    }
    body.push_str("</nav><div class=\"charts\">");
    for chart in &detail.charts {
        body.push_str(chart);
    }
    body.push_str("</div>");

    if let Some(gpu) = &detail.gpu
        && !gpu.devices.is_empty()
    {
        body.push_str(
            "<h2>GPUs</h2><table id=\"gpus\"><thead><tr><th>#</th><th>Name</th><th>Temp</th><th>Util</th>\
             <th>Memory</th><th>Power</th><th>Throttle</th><th>ECC uncorr.</th><th>Xid</th></tr></thead><tbody>",
        );
        for d in &gpu.devices {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td class=\"num\">{:.0} °C</td><td class=\"num\">{:.0} %</td>\
                 <td class=\"num\">{} / {}</td><td class=\"num\">{:.0} W</td><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                d.index,
                esc(&d.name),
                d.temperature_celsius,
                d.utilisation_gpu_percent,
                esc(&human(d.memory_used_bytes as f64, "bytes")),
                esc(&human(d.memory_total_bytes as f64, "bytes")),
                d.power_draw_watts,
                esc(&d.throttle_reasons.join(", ")),
                d.ecc_uncorrected_total,
                esc(&d
                    .xid_events
                    .iter()
                    .map(|x| x.xid.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")),
            );
        }
        body.push_str("</tbody></table>");
    }

    body.push_str("<h2>Findings</h2>");
    match &detail.findings {
        Err(e) => unavailable(&mut body, e),
        Ok(findings) if findings.is_empty() => {
            body.push_str("<p class=\"muted\">No findings.</p>");
        }
        Ok(findings) => {
            body.push_str(
                "<table id=\"findings\"><thead><tr><th>Kind</th><th>Severity</th><th>Score</th><th>Summary</th>\
                 <th>Raised</th><th>Cleared</th><th>Evidence</th></tr></thead><tbody>",
            );
            for f in findings {
                let mut evidence: Vec<(&String, &String)> = f.evidence.iter().collect();
                evidence.sort();
                let evidence: String = evidence
                    .iter()
                    .map(|(k, v)| format!("<dt>{}</dt><dd>{}</dd>", esc(k), esc(v)))
                    .collect();
                let _ = write!(
                    body,
                    "<tr class=\"{}\"><td>{}</td><td class=\"sev sev-{}\">{}</td><td class=\"num\">{:.2}</td><td>{}</td>\
                     <td>{}</td><td>{}</td><td><dl>{evidence}</dl></td></tr>",
                    if f.cleared_at_unix_ms == 0 {
                        "open"
                    } else {
                        "cleared"
                    },
                    esc(&f.kind),
                    esc(&f.severity),
                    esc(&f.severity),
                    f.score,
                    esc(&f.summary),
                    when(f.raised_at_unix_ms),
                    if f.cleared_at_unix_ms == 0 {
                        "open".to_owned()
                    } else {
                        when(f.cleared_at_unix_ms)
                    },
                );
            }
            body.push_str("</tbody></table>");
        }
    }

    body.push_str("<h2>Commands</h2>");
    match &detail.commands {
        Err(e) => unavailable(&mut body, e),
        Ok(commands) if commands.is_empty() => {
            body.push_str("<p class=\"muted\">No commands.</p>");
        }
        Ok(commands) => {
            body.push_str(
                "<table id=\"commands\"><thead><tr><th>Issued</th><th>Action</th><th>By</th><th>State</th>\
                 <th>Outcome</th><th>Detail</th><th>Command</th></tr></thead><tbody>",
            );
            for c in commands {
                let _ = write!(
                    body,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"state state-{}\">{}</td><td>{}</td><td>{}</td><td class=\"mono\">{}</td></tr>",
                    when(c.issued_at_unix_ms),
                    esc(&c.action),
                    esc(&c.issued_by),
                    esc(&c.state),
                    esc(&c.state),
                    when(c.outcome_at_unix_ms),
                    esc(&c.detail),
                    esc(&c.command_id),
                );
            }
            body.push_str("</tbody></table>");
        }
    }

    body.push_str("<h2>Audit</h2>");
    match &detail.audit {
        Err(e) => unavailable(&mut body, e),
        Ok(entries) if entries.is_empty() => {
            body.push_str("<p class=\"muted\">No audit entries.</p>");
        }
        Ok(entries) => {
            body.push_str(
                "<table id=\"audit\"><thead><tr><th>Seq</th><th>At</th><th>Kind</th><th>Entry</th><th>Hash</th></tr></thead><tbody>",
            );
            for e in entries {
                let mut text = e.body_json.clone();
                if text.chars().count() > 400 {
                    text = text.chars().take(400).collect::<String>() + "…";
                }
                let _ = write!(
                    body,
                    "<tr><td class=\"num\">{}</td><td>{}</td><td>{}</td><td class=\"mono\">{}</td><td class=\"mono\" title=\"{}\">{}</td></tr>",
                    e.seq,
                    when(e.at_unix_ms),
                    esc(&e.kind),
                    esc(&text),
                    esc(&e.hash),
                    esc(e.hash.get(..12).unwrap_or(&e.hash)),
                );
            }
            body.push_str("</tbody></table>");
        }
    }
    layout(&node.node_id, Some(&node.node_id), &body)
}

fn unavailable(body: &mut String, error: &str) {
    let _ = write!(
        body,
        "<p class=\"error\">Cannot be read now: {}. Reload to try again.</p>",
        esc(error)
    );
}

/// The sign-in page: a token form, and a note on client certificates.
pub fn sign_in(problem: Option<&str>, next: &str, certificates: bool) -> String {
    let problem = problem
        .map(|p| format!("<p class=\"error\" id=\"problem\">{}</p>", esc(p)))
        .unwrap_or_default();
    let certs = if certificates {
        "<p class=\"muted\">Or open this page with an operator client certificate from the fleet CA (guardianctl pki init writes operator.pem; import it into the browser as a PKCS #12 file).</p>"
    } else {
        ""
    };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Sign in · TaoNode Guardian</title>\
         <link rel=\"stylesheet\" href=\"/static/style.css\"></head><body><main class=\"narrow\">\
         <h1>TaoNode Guardian</h1>{problem}\
         <form method=\"post\" action=\"/login\" id=\"login\"><label for=\"token\">Access token</label>\
         <input type=\"password\" id=\"token\" name=\"token\" autocomplete=\"current-password\" required>\
         <input type=\"hidden\" name=\"next\" value=\"{}\"><button type=\"submit\">Sign in</button></form>{certs}\
         </main></body></html>",
        esc(next)
    )
}

/// A page for a missing node or path.
pub fn not_found(what: &str) -> String {
    layout(
        "Not found",
        None,
        &format!(
            "<h1>Not found</h1><p>{}</p><p><a href=\"/\">Back to the fleet</a></p>",
            esc(what)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_nodes_is_escaped() {
        assert_eq!(
            esc("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
    }

    #[test]
    fn units_read_as_people_expect() {
        assert_eq!(human(1536.0, "bytes"), "1.5 KiB");
        assert_eq!(human(12.0, "blocks"), "12 blocks");
        assert_eq!(human(42.4, "%"), "42 %");
        assert_eq!(human(65_000.0, "ms"), "65 s");
        assert_eq!(human(f64::NAN, "ms"), "—");
    }

    #[test]
    fn the_worst_node_comes_first_and_an_away_agent_counts_as_risk_one() {
        let node = |id: &str, phase: &str, risk: f64, connected: bool| {
            FleetRow::of(
                &Node {
                    node_id: id.into(),
                    phase: phase.into(),
                    risk,
                    connected,
                    ..Node::default()
                },
                None,
            )
        };
        let mut rows = [
            node("a", "synced", 0.1, true),
            node("b", "degraded", 0.6, true),
            node("c", "synced", 0.0, false),
            node("d", "failed", 0.6, true),
        ];
        rows.sort_by(FleetRow::worst_first);
        let order: Vec<&str> = rows.iter().map(|r| r.node.as_str()).collect();
        assert_eq!(order, ["c", "d", "b", "a"]);
    }
}
