//! Layering test: each stage of the workspace imports only what ARCHITECTURE.md section 8 allows.
//!
//! The rules (docs/architecture.md lists them with the stages they protect):
//! 1. `server/src/detect/**` and `server/src/reconcile/**` import nothing from `store`, `actuate`,
//!    `api`, `ingest`, `control` (nor `sink`, `live`, `alert`, `command`: old homes of those parts).
//! 2. `server/src/store/**` imports nothing from `ingest`, `api`, `control`, `actuate` (nor `live`,
//!    `alert`, `command`: old homes of actuate parts).
//! 3. `proto/` knows no server or agent: no `guardian_server` / `guardian_agent` in its code or manifest.
//! 4. `agent/src/sample/**` never reaches `crate::uplink`, `crate::spool` or `crate::command`.
//! 5. Only `server/src/actuate/**` names `CommandSigner` or `send_command`.
//! 6. `server/src/reconcile/**` does no I/O: no `tokio`, `sqlx`, `std::fs`, `std::net`, `reqwest`,
//!    `hyper`, `clickhouse` paths and no `.await`, outside `#[cfg(test)]` items.
//! 7. Only `server/src/actuate/kubernetes/**` uses `kube` or `k8s_openapi`.
//!
//! The checker is a lexer, not a parser: it blanks comments and literals (keeping line numbers),
//! splits the rest into identifiers, `::` and punctuation, expands every `use` tree into its leaf
//! paths, collects every other `a::b::c` path, and resolves `crate`, `self` and `super` against the
//! module the token sits in (the file's module path plus any inline `mod x { .. }` around it).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------------------------

/// Modules that `detect/` and `reconcile/` must not import (rule 1).
const PURE_STAGE_FORBIDDEN: &[&str] = &[
    "store", "actuate", "api", "ingest", "control", "sink", "live", "alert", "command",
];
/// Modules that `store/` must not import (rule 2).
const STORE_FORBIDDEN: &[&str] = &[
    "ingest", "api", "control", "actuate", "live", "alert", "command",
];
/// Agent modules that samplers must not reach (rule 4).
const SAMPLER_FORBIDDEN: &[&str] = &["uplink", "spool", "command"];
/// Identifiers of the signing and delivery API, reserved to `actuate/` (rule 5).
const ACTUATE_ONLY_IDENTS: &[&str] = &["CommandSigner", "send_command"];
/// External crates whose use is I/O (rule 6).
const IO_CRATES: &[&str] = &["tokio", "sqlx", "reqwest", "hyper", "clickhouse"];
/// `std` modules whose use is I/O (rule 6).
const IO_STD_MODULES: &[&str] = &["fs", "net"];
/// The Kubernetes client crates, reserved to `actuate/kubernetes/` (rule 7).
const KUBE_CRATES: &[&str] = &["kube", "k8s_openapi"];
/// Names proto must never mention (rule 3).
const SIDE_CRATES: &[&str] = &[
    "guardian_server",
    "guardian-server",
    "guardian_agent",
    "guardian-agent",
];

/// One rule of the layering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Rule {
    PureStages,
    StoreBelowActing,
    ProtoKnowsNoSide,
    SamplersKnowNoUplink,
    OnlyActuateSigns,
    ReconcileHasNoIo,
    KubeOnlyInActuate,
}

impl Rule {
    fn number(self) -> u8 {
        match self {
            Rule::PureStages => 1,
            Rule::StoreBelowActing => 2,
            Rule::ProtoKnowsNoSide => 3,
            Rule::SamplersKnowNoUplink => 4,
            Rule::OnlyActuateSigns => 5,
            Rule::ReconcileHasNoIo => 6,
            Rule::KubeOnlyInActuate => 7,
        }
    }

    fn text(self) -> &'static str {
        match self {
            Rule::PureStages => {
                "detect/ and reconcile/ import nothing from store, actuate, api, ingest, control \
                 (nor the old names sink, live, alert, command)"
            }
            Rule::StoreBelowActing => {
                "store/ imports nothing from ingest, api, control, actuate \
                 (nor the old actuate names live, alert, command)"
            }
            Rule::ProtoKnowsNoSide => {
                "proto/ knows no server or agent (no guardian_server / guardian_agent)"
            }
            Rule::SamplersKnowNoUplink => {
                "agent samplers know no uplink (no crate::uplink, crate::spool, crate::command \
                 in agent/src/sample/)"
            }
            Rule::OnlyActuateSigns => {
                "only server/src/actuate/ signs or sends commands (CommandSigner, send_command)"
            }
            Rule::ReconcileHasNoIo => {
                "reconcile/ does no I/O (tokio, sqlx, std::fs, std::net, reqwest, hyper, \
                 clickhouse, .await outside #[cfg(test)])"
            }
            Rule::KubeOnlyInActuate => {
                "only server/src/actuate/kubernetes/ uses the Kubernetes client (kube, k8s_openapi)"
            }
        }
    }

    fn fix(self) -> &'static str {
        match self {
            Rule::PureStages => {
                "move the type to a module both may use (batch/values, window, detect, reconcile), \
                 or pass it in as an argument from control/"
            }
            Rule::StoreBelowActing => {
                "move the type to a module both may use (batch/, detect, reconcile: store may \
                 persist domain types), or pass it in as an argument"
            }
            Rule::ProtoKnowsNoSide => {
                "move the code into the server or agent crate (they depend on proto, never the \
                 reverse), or pass the value in through a proto type"
            }
            Rule::SamplersKnowNoUplink => {
                "return the sample to the caller and let it hand batches to spool/uplink; move a \
                 shared type into sample/, or pass it in"
            }
            Rule::OnlyActuateSigns => {
                "hand actuate/ an Action (or call an actuate/ function) instead; if a signer or \
                 session is only passed through, pass an actuate handle in"
            }
            Rule::ReconcileHasNoIo => {
                "do the I/O in control/ or actuate/ and pass the result in; reconcile stays a pure \
                 function"
            }
            Rule::KubeOnlyInActuate => {
                "call a function of actuate::kubernetes (or add one) and pass plain types across; \
                 Kubernetes types stay inside actuate/kubernetes/"
            }
        }
    }
}

/// One forbidden reference.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Violation {
    /// Workspace-relative path, `/`-separated.
    file: String,
    /// 1-based line of the forbidden segment.
    line: usize,
    rule: Rule,
    /// What is forbidden here: a module (`store`), a crate (`tokio`), an identifier.
    target: String,
    /// The reference as written (a use-tree leaf, a path, an identifier).
    import: String,
}

/// Which rules apply to a Rust source file, from its workspace-relative path.
struct Scope {
    /// Module path of the file inside its crate (`reconcile/plan.rs` -> `reconcile::plan`).
    module: Vec<String>,
    /// Forbidden first segments of `crate::` paths, with the rule they break.
    forbidden_modules: Option<(Rule, &'static [&'static str])>,
    reserved_idents: bool,
    no_io: bool,
    proto: bool,
    /// Whether the file may use the Kubernetes client crates.
    kube_allowed: bool,
}

fn scope_of(path: &str) -> Option<Scope> {
    let (crate_dir, rest) = if let Some(rest) = path.strip_prefix("server/src/") {
        ("server", rest)
    } else if let Some(rest) = path.strip_prefix("agent/src/") {
        ("agent", rest)
    } else if let Some(rest) = path.strip_prefix("proto/src/") {
        ("proto", rest)
    } else if path == "proto/build.rs" {
        ("proto", "build.rs")
    } else {
        return None;
    };
    let module = module_path(rest);
    let stage = module.first().cloned();
    let stage = stage.as_deref();
    let mut scope = Scope {
        module,
        forbidden_modules: None,
        reserved_idents: false,
        no_io: false,
        proto: false,
        kube_allowed: false,
    };
    match crate_dir {
        "server" => {
            scope.forbidden_modules = match stage {
                Some("detect" | "reconcile") => Some((Rule::PureStages, PURE_STAGE_FORBIDDEN)),
                Some("store") => Some((Rule::StoreBelowActing, STORE_FORBIDDEN)),
                _ => None,
            };
            scope.reserved_idents = stage != Some("actuate");
            scope.no_io = stage == Some("reconcile");
            scope.kube_allowed = scope
                .module
                .starts_with(&["actuate".to_owned(), "kubernetes".to_owned()]);
        }
        "agent" => {
            if stage == Some("sample") {
                scope.forbidden_modules = Some((Rule::SamplersKnowNoUplink, SAMPLER_FORBIDDEN));
            }
        }
        _ => scope.proto = true,
    }
    Some(scope)
}

/// `lib.rs` / `main.rs` / `bin/x.rs` -> crate root; `foo/mod.rs` -> `foo`; `foo/bar.rs` -> `foo::bar`.
fn module_path(rel: &str) -> Vec<String> {
    if rel.starts_with("bin/") {
        return Vec::new();
    }
    let mut parts: Vec<String> = rel.split('/').map(str::to_owned).collect();
    if let Some(last) = parts.pop() {
        let stem = last.strip_suffix(".rs").unwrap_or(&last);
        let is_root = parts.is_empty() && matches!(stem, "lib" | "main" | "build");
        if stem != "mod" && !is_root {
            parts.push(stem.to_owned());
        }
    }
    parts
}

// ---------------------------------------------------------------------------------------------
// Checking one file
// ---------------------------------------------------------------------------------------------

/// Every violation in one Rust source file; `path` is workspace-relative (`server/src/api.rs`).
fn check_source(path: &str, source: &str) -> Vec<Violation> {
    let Some(scope) = scope_of(path) else {
        return Vec::new();
    };
    let code = strip_comments_and_literals(source);
    let tokens = tokenize(&code);
    let layout = Layout::of(&tokens, &scope.module);
    let mut violations = Vec::new();
    let mut report = |line: usize, rule: Rule, target: &str, import: String| {
        violations.push(Violation {
            file: path.to_owned(),
            line,
            rule,
            target: target.to_owned(),
            import,
        });
    };

    for path_ref in collect_paths(&tokens) {
        let base = &layout.modules[layout.module_of[path_ref.at]];
        let resolved = resolve(base, &path_ref);
        let written = path_ref.written();
        match &resolved {
            Resolved::Internal {
                path,
                first_written,
            } => {
                if let (Some((rule, forbidden)), Some(first)) =
                    (scope.forbidden_modules, path.first())
                    && forbidden.contains(&first.as_str())
                {
                    let line = first_written
                        .and_then(|i| path_ref.segments.get(i))
                        .map_or(path_ref.segments[0].line, |s| s.line);
                    let shown = if path_ref.segments[0].text == "crate" {
                        written
                    } else {
                        format!("{written} (= crate::{})", path.join("::"))
                    };
                    report(line, rule, first, shown);
                }
            }
            Resolved::External(path) => {
                let first = path.first().map(String::as_str).unwrap_or_default();
                let second = path.get(1).map(String::as_str).unwrap_or_default();
                let io = if IO_CRATES.contains(&first) {
                    Some(first.to_owned())
                } else if (first == "std" || first == "core") && IO_STD_MODULES.contains(&second) {
                    Some(format!("{first}::{second}"))
                } else {
                    None
                };
                if KUBE_CRATES.contains(&first) && !scope.kube_allowed {
                    let line = path_ref.segments[0].line;
                    report(line, Rule::KubeOnlyInActuate, first, written.clone());
                }
                if let Some(target) = io
                    && scope.no_io
                    && !layout.in_test[path_ref.at]
                {
                    let line = path_ref.segments[0].line;
                    report(line, Rule::ReconcileHasNoIo, &target, written);
                }
            }
        }
    }

    let lines: Vec<&str> = source.lines().collect();
    let source_line = |line: usize| lines.get(line - 1).map_or("", |l| l.trim()).to_owned();
    for (i, token) in tokens.iter().enumerate() {
        let Tok::Ident(name) = &token.tok else {
            continue;
        };
        if scope.reserved_idents && ACTUATE_ONLY_IDENTS.contains(&name.as_str()) {
            report(
                token.line,
                Rule::OnlyActuateSigns,
                name,
                source_line(token.line),
            );
        }
        if scope.proto && SIDE_CRATES.contains(&name.as_str()) {
            report(
                token.line,
                Rule::ProtoKnowsNoSide,
                name,
                source_line(token.line),
            );
        }
        if scope.no_io
            && name == "await"
            && !layout.in_test[i]
            && i > 0
            && tokens[i - 1].tok == Tok::Punct('.')
        {
            report(
                token.line,
                Rule::ReconcileHasNoIo,
                ".await",
                source_line(token.line),
            );
        }
    }
    violations
}

/// Violations in `proto/Cargo.toml` (rule 3): any non-comment line naming a server or agent crate.
fn check_proto_manifest(path: &str, manifest: &str) -> Vec<Violation> {
    let mut found = Vec::new();
    for (i, line) in manifest.lines().enumerate() {
        let data = line.split('#').next().unwrap_or_default();
        for name in SIDE_CRATES {
            if data.contains(name) {
                found.push(Violation {
                    file: path.to_owned(),
                    line: i + 1,
                    rule: Rule::ProtoKnowsNoSide,
                    target: (*name).to_owned(),
                    import: line.trim().to_owned(),
                });
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// Lexing
// ---------------------------------------------------------------------------------------------

/// The source with every comment, string, byte string, raw string and char literal replaced by
/// spaces; newlines are kept so that line numbers stay right. Lifetimes (`'a`) are kept.
fn strip_comments_and_literals(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let blank = |out: &mut String, span: &[char]| {
        for &c in span {
            out.push(if c == '\n' { '\n' } else { ' ' });
        }
    };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            let end = chars[i..]
                .iter()
                .position(|&c| c == '\n')
                .map_or(chars.len(), |p| i + p);
            blank(&mut out, &chars[i..end]);
            i = end;
        } else if c == '/' && next == Some('*') {
            let mut depth = 0usize;
            let mut j = i;
            while j < chars.len() {
                if chars[j] == '/' && chars.get(j + 1) == Some(&'*') {
                    depth += 1;
                    j += 2;
                } else if chars[j] == '*' && chars.get(j + 1) == Some(&'/') {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            let end = j.min(chars.len());
            blank(&mut out, &chars[i..end]);
            i = end;
        } else if c == '"' {
            let end = end_of_string(&chars, i + 1);
            blank(&mut out, &chars[i..end]);
            i = end;
        } else if c == '\'' {
            // A char literal is `'x'` or `'\..'`; anything else (`'a`, `'static`) is a lifetime.
            if next == Some('\\') {
                let mut j = i + 3;
                while j < chars.len() && chars[j] != '\'' {
                    j += 1;
                }
                let end = (j + 1).min(chars.len());
                blank(&mut out, &chars[i..end]);
                i = end;
            } else if chars.get(i + 2) == Some(&'\'') {
                blank(&mut out, &chars[i..i + 3]);
                i += 3;
            } else {
                out.push(c);
                i += 1;
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident_continue(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            // Raw strings: r"..", r#".."#, br"..", cr#".."#.
            let mut hashes = 0;
            while chars.get(i + hashes) == Some(&'#') {
                hashes += 1;
            }
            if matches!(word.as_str(), "r" | "br" | "cr") && chars.get(i + hashes) == Some(&'"') {
                let end = end_of_raw_string(&chars, i + hashes + 1, hashes);
                out.push_str(&word);
                blank(&mut out, &chars[i..end]);
                i = end;
            } else {
                out.push_str(&word);
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Index just past the closing quote of a string whose body starts at `from`.
fn end_of_string(chars: &[char], from: usize) -> usize {
    let mut j = from;
    while j < chars.len() {
        match chars[j] {
            '\\' => j += 2,
            '"' => return j + 1,
            _ => j += 1,
        }
    }
    chars.len()
}

/// Index just past `"` followed by `hashes` `#`, for a raw string whose body starts at `from`.
fn end_of_raw_string(chars: &[char], from: usize, hashes: usize) -> usize {
    let mut j = from;
    while j < chars.len() {
        if chars[j] == '"' && (1..=hashes).all(|k| chars.get(j + k) == Some(&'#')) {
            return j + 1 + hashes;
        }
        j += 1;
    }
    chars.len()
}

fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_'
}

fn is_ident_continue(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    line: usize,
}

/// Identifiers (raw identifiers lose their `r#`), `::` and single punctuation characters.
/// Numbers become identifiers too; they never start a path, so that is harmless.
fn tokenize(code: &str) -> Vec<Token> {
    let chars: Vec<char> = code.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if is_ident_continue(c) {
            if c == 'r'
                && chars.get(i + 1) == Some(&'#')
                && chars.get(i + 2).is_some_and(|&c| is_ident_start(c))
            {
                i += 2;
            }
            let start = i;
            while i < chars.len() && is_ident_continue(chars[i]) {
                i += 1;
            }
            tokens.push(Token {
                tok: Tok::Ident(chars[start..i].iter().collect()),
                line,
            });
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            tokens.push(Token {
                tok: Tok::PathSep,
                line,
            });
            i += 2;
        } else {
            tokens.push(Token {
                tok: Tok::Punct(c),
                line,
            });
            i += 1;
        }
    }
    tokens
}

fn is_ident(token: Option<&Token>, name: &str) -> bool {
    matches!(token, Some(Token { tok: Tok::Ident(n), .. }) if n == name)
}

fn is_punct(token: Option<&Token>, c: char) -> bool {
    matches!(token, Some(Token { tok: Tok::Punct(p), .. }) if *p == c)
}

/// Index of the token that closes the bracket opened at `open` (or the last token).
fn matching_close(tokens: &[Token], open: usize) -> usize {
    let (o, c) = match tokens[open].tok {
        Tok::Punct('(') => ('(', ')'),
        Tok::Punct('[') => ('[', ']'),
        _ => ('{', '}'),
    };
    let mut depth = 0usize;
    for (j, token) in tokens.iter().enumerate().skip(open) {
        if token.tok == Tok::Punct(o) {
            depth += 1;
        } else if token.tok == Tok::Punct(c) {
            depth -= 1;
            if depth == 0 {
                return j;
            }
        }
    }
    tokens.len() - 1
}

/// For every token: the module it sits in (file module plus inline `mod x { .. }`), and whether it
/// belongs to an item marked `#[cfg(test)]`.
struct Layout {
    modules: Vec<Vec<String>>,
    module_of: Vec<usize>,
    in_test: Vec<bool>,
}

impl Layout {
    fn of(tokens: &[Token], file_module: &[String]) -> Layout {
        let mut modules = vec![file_module.to_vec()];
        let mut module_of = Vec::with_capacity(tokens.len());
        // (index into `modules` of the enclosing module, brace depth its body opened at)
        let mut stack: Vec<(usize, usize)> = Vec::new();
        let mut current = 0;
        let mut depth = 0usize;
        for (i, token) in tokens.iter().enumerate() {
            module_of.push(current);
            match token.tok {
                Tok::Punct('{') => {
                    depth += 1;
                    if i >= 2
                        && is_ident(tokens.get(i - 2), "mod")
                        && let Tok::Ident(name) = &tokens[i - 1].tok
                    {
                        let mut path = modules[current].clone();
                        path.push(name.clone());
                        modules.push(path);
                        stack.push((current, depth));
                        current = modules.len() - 1;
                    }
                }
                Tok::Punct('}') => {
                    if let Some(&(outer, opened)) = stack.last()
                        && opened == depth
                    {
                        stack.pop();
                        current = outer;
                    }
                    depth = depth.saturating_sub(1);
                }
                _ => {}
            }
        }

        let mut in_test = vec![false; tokens.len()];
        let mut i = 0;
        while i < tokens.len() {
            if is_cfg_test(tokens, i) {
                let mut j = i + 7;
                while is_punct(tokens.get(j), '#') && is_punct(tokens.get(j + 1), '[') {
                    j = matching_close(tokens, j + 1) + 1;
                }
                let mut end = tokens.len().saturating_sub(1);
                while j < tokens.len() {
                    match tokens[j].tok {
                        Tok::Punct(';') => {
                            end = j;
                            break;
                        }
                        Tok::Punct('{') => {
                            end = matching_close(tokens, j);
                            break;
                        }
                        Tok::Punct('(' | '[') => j = matching_close(tokens, j) + 1,
                        _ => j += 1,
                    }
                }
                for flag in &mut in_test[i..=end] {
                    *flag = true;
                }
                i = end + 1;
            } else {
                i += 1;
            }
        }
        Layout {
            modules,
            module_of,
            in_test,
        }
    }
}

/// `#[cfg(test)]` starts at `i`.
fn is_cfg_test(tokens: &[Token], i: usize) -> bool {
    is_punct(tokens.get(i), '#')
        && is_punct(tokens.get(i + 1), '[')
        && is_ident(tokens.get(i + 2), "cfg")
        && is_punct(tokens.get(i + 3), '(')
        && is_ident(tokens.get(i + 4), "test")
        && is_punct(tokens.get(i + 5), ')')
        && is_punct(tokens.get(i + 6), ']')
}

// ---------------------------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Segment {
    text: String,
    line: usize,
}

/// One path as written: a use-tree leaf or an `a::b::c` path in code.
#[derive(Clone, Debug)]
struct PathRef {
    segments: Vec<Segment>,
    /// Written with a leading `::` (always an external crate).
    global: bool,
    /// Token index the path belongs to (its `use`, or its first segment).
    at: usize,
}

impl PathRef {
    fn written(&self) -> String {
        let joined: Vec<&str> = self.segments.iter().map(|s| s.text.as_str()).collect();
        let lead = if self.global { "::" } else { "" };
        format!("{lead}{}", joined.join("::"))
    }
}

/// Every use-tree leaf and every multi-segment path in code.
fn collect_paths(tokens: &[Token]) -> Vec<PathRef> {
    let mut paths = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let preceded_by_sep = i > 0 && tokens[i - 1].tok == Tok::PathSep;
        match &tokens[i].tok {
            Tok::Ident(word) if word == "use" => {
                let mut leaves = Vec::new();
                let mut j = i + 1;
                let global = tokens.get(j).is_some_and(|t| t.tok == Tok::PathSep);
                use_tree(tokens, &mut j, Vec::new(), &mut leaves);
                for segments in leaves {
                    if !segments.is_empty() {
                        paths.push(PathRef {
                            segments,
                            global,
                            at: i,
                        });
                    }
                }
                i = j.max(i + 1);
            }
            Tok::Ident(_)
                if !preceded_by_sep && tokens.get(i + 1).map(|t| &t.tok) == Some(&Tok::PathSep) =>
            {
                let (segments, next) = code_path(tokens, i);
                paths.push(PathRef {
                    segments,
                    global: false,
                    at: i,
                });
                i = next;
            }
            Tok::PathSep
                if !matches!(
                    tokens.get(i.wrapping_sub(1)).map(|t| &t.tok),
                    Some(Tok::Ident(_))
                ) && matches!(tokens.get(i + 1).map(|t| &t.tok), Some(Tok::Ident(_))) =>
            {
                let (segments, next) = code_path(tokens, i + 1);
                paths.push(PathRef {
                    segments,
                    global: true,
                    at: i + 1,
                });
                i = next;
            }
            _ => i += 1,
        }
    }
    paths
}

/// `a::b::c` starting at the identifier `start`; returns the segments and the index after them.
fn code_path(tokens: &[Token], start: usize) -> (Vec<Segment>, usize) {
    let mut segments = Vec::new();
    let mut i = start;
    while let Some(Token {
        tok: Tok::Ident(name),
        line,
    }) = tokens.get(i)
    {
        segments.push(Segment {
            text: name.clone(),
            line: *line,
        });
        if tokens.get(i + 1).map(|t| &t.tok) == Some(&Tok::PathSep) {
            i += 2;
        } else {
            i += 1;
            break;
        }
    }
    (segments, i)
}

/// Expands the use tree at `*i` into its leaf paths (`prefix` + tree), nested groups and
/// multi-line trees included; `*i` ends after the tree.
fn use_tree(
    tokens: &[Token],
    i: &mut usize,
    mut prefix: Vec<Segment>,
    out: &mut Vec<Vec<Segment>>,
) {
    loop {
        let Some(token) = tokens.get(*i) else {
            out.push(prefix);
            return;
        };
        match &token.tok {
            Tok::PathSep => *i += 1,
            Tok::Ident(name) => {
                prefix.push(Segment {
                    text: name.clone(),
                    line: token.line,
                });
                *i += 1;
                if tokens.get(*i).map(|t| &t.tok) == Some(&Tok::PathSep) {
                    *i += 1;
                    continue;
                }
                if is_ident(tokens.get(*i), "as") {
                    *i += 2;
                }
                out.push(prefix);
                return;
            }
            Tok::Punct('*') => {
                *i += 1;
                prefix.push(Segment {
                    text: "*".to_owned(),
                    line: token.line,
                });
                out.push(prefix);
                return;
            }
            Tok::Punct('{') => {
                *i += 1;
                while *i < tokens.len() {
                    if is_punct(tokens.get(*i), '}') {
                        *i += 1;
                        break;
                    }
                    let before = *i;
                    use_tree(tokens, i, prefix.clone(), out);
                    if is_punct(tokens.get(*i), ',') {
                        *i += 1;
                    } else if *i == before {
                        // Not a use tree after all: step over the token rather than loop.
                        *i += 1;
                    }
                }
                return;
            }
            _ => {
                out.push(prefix);
                return;
            }
        }
    }
}

/// Where a path points.
#[derive(Debug, PartialEq, Eq)]
enum Resolved {
    /// A path inside this crate, from its root; `first_written` is the index of the written
    /// segment that became the path's first element (`None` if it came from the file's module).
    Internal {
        path: Vec<String>,
        first_written: Option<usize>,
    },
    /// Anything else: an external crate, `std`, or a name in scope.
    External(Vec<String>),
}

/// Resolves `crate::`, `self::` and `super::` against `base`, the module the path sits in.
fn resolve(base: &[String], path: &PathRef) -> Resolved {
    let texts: Vec<&str> = path.segments.iter().map(|s| s.text.as_str()).collect();
    let rest = |from: usize| -> Vec<String> {
        texts[from..]
            .iter()
            .filter(|t| **t != "self")
            .map(|t| (*t).to_owned())
            .collect()
    };
    match texts.first() {
        Some(&"crate") if !path.global => Resolved::Internal {
            path: rest(1),
            first_written: Some(1),
        },
        Some(&("super" | "self")) if !path.global => {
            let mut module = base.to_vec();
            let mut k = 0;
            while let Some(&word) = texts.get(k) {
                match word {
                    "super" => {
                        module.pop();
                    }
                    "self" => {}
                    _ => break,
                }
                k += 1;
            }
            let first_written = module.is_empty().then_some(k);
            module.extend(rest(k));
            Resolved::Internal {
                path: module,
                first_written,
            }
        }
        _ => Resolved::External(rest(0)),
    }
}

// ---------------------------------------------------------------------------------------------
// The tree
// ---------------------------------------------------------------------------------------------

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("server/ has a parent: the workspace root")
        .to_path_buf()
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn relative(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Checks the whole workspace; returns the violations and how many files each area had.
fn check_tree(root: &Path) -> (Vec<Violation>, Vec<(&'static str, usize)>) {
    let mut violations = Vec::new();
    let mut counts = Vec::new();
    for area in ["server/src", "agent/src", "proto/src"] {
        let files = rust_files(&root.join(area));
        counts.push((area, files.len()));
        for file in files {
            let source = fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
            violations.extend(check_source(&relative(root, &file), &source));
        }
    }
    let build = root.join("proto/build.rs");
    if let Ok(source) = fs::read_to_string(&build) {
        violations.extend(check_source("proto/build.rs", &source));
    }
    let manifest =
        fs::read_to_string(root.join("proto/Cargo.toml")).expect("read proto/Cargo.toml");
    violations.extend(check_proto_manifest("proto/Cargo.toml", &manifest));
    (violations, counts)
}

/// Violations with the same file, line, rule and target become one entry listing each import.
fn render(violations: &[Violation]) -> String {
    let mut sorted = violations.to_vec();
    sorted.sort();
    sorted.dedup();
    let mut groups: Vec<(Violation, Vec<String>)> = Vec::new();
    for v in sorted {
        match groups.last_mut() {
            Some((head, imports))
                if head.file == v.file
                    && head.line == v.line
                    && head.rule == v.rule
                    && head.target == v.target =>
            {
                if !imports.contains(&v.import) {
                    imports.push(v.import);
                }
            }
            _ => {
                let import = v.import.clone();
                groups.push((v, vec![import]));
            }
        }
    }
    let mut text = format!(
        "{} layering violation(s) (ARCHITECTURE.md section 8, docs/architecture.md):\n",
        groups.len()
    );
    for (v, imports) in &groups {
        let imports: Vec<String> = imports.iter().map(|i| format!("`{i}`")).collect();
        let _ = write!(
            text,
            "\n{}:{}: {} -> `{}`\n    breaks rule {}: {}\n    fix: {}\n",
            v.file,
            v.line,
            imports.join(", "),
            v.target,
            v.rule.number(),
            v.rule.text(),
            v.rule.fix(),
        );
    }
    text
}

#[test]
fn workspace_follows_the_layering_rules() {
    let root = workspace_root();
    let (violations, counts) = check_tree(&root);
    for (area, count) in &counts {
        assert!(
            *count > 0,
            "no .rs files found under {area}: is the workspace root right?"
        );
    }
    assert!(violations.is_empty(), "{}", render(&violations));
}

// ---------------------------------------------------------------------------------------------
// The checker on synthetic sources: each rule can fail, and comments do not trip it.
// ---------------------------------------------------------------------------------------------

/// (line, rule, target) of each violation, sorted.
fn found(path: &str, source: &str) -> Vec<(usize, Rule, String)> {
    let mut found: Vec<_> = check_source(path, source)
        .into_iter()
        .map(|v| (v.line, v.rule, v.target))
        .collect();
    found.sort();
    found.dedup();
    found
}

fn one(line: usize, rule: Rule, target: &str) -> Vec<(usize, Rule, String)> {
    vec![(line, rule, target.to_owned())]
}

#[test]
fn detect_importing_the_ledger_is_reported() {
    let source = "//! A detector.\nuse crate::window::Window;\nuse crate::store::Ledger;\n";
    assert_eq!(
        found("server/src/detect/x.rs", source),
        one(3, Rule::PureStages, "store")
    );
}

#[test]
fn multi_line_use_tree_in_reconcile_is_reported_at_the_store_line() {
    let source = "use crate::{\n    detect::X,\n    store::Y,\n};\n";
    assert_eq!(
        found("server/src/reconcile/plan.rs", source),
        one(3, Rule::PureStages, "store")
    );
}

#[test]
fn nested_use_groups_are_expanded() {
    let source = "use crate::{detect::{self, Finding}, actuate::{sign::{CommandSigner as S}}};\n";
    assert_eq!(
        found("server/src/detect/fleet.rs", source),
        vec![
            (1, Rule::PureStages, "actuate".to_owned()),
            (1, Rule::OnlyActuateSigns, "CommandSigner".to_owned()),
        ]
    );
}

#[test]
fn super_chain_leaving_the_stage_is_reported() {
    let source = "fn f() {\n    let _ = super::super::api::Z;\n    let _ = super::action::Action::Wait;\n}\n";
    assert_eq!(
        found("server/src/reconcile/plan.rs", source),
        one(2, Rule::PureStages, "api")
    );
    // From `detect/mod.rs` (module `detect`) one `super` is the crate root.
    assert_eq!(
        found("server/src/detect/mod.rs", "use super::store::Ledger;\n"),
        one(1, Rule::PureStages, "store")
    );
    // `super` inside an inline `mod tests` counts the inline module too.
    let source = "mod tests {\n    use super::super::Window;\n    use super::super::super::ingest::Session;\n}\n";
    assert_eq!(
        found("server/src/detect/p2p.rs", source),
        one(3, Rule::PureStages, "ingest")
    );
}

#[test]
fn paths_in_code_are_reported() {
    let source = "fn f<'a>(x: &'a str) -> crate::alert::Alert {\n    crate::store::open(x);\n}\n";
    assert_eq!(
        found("server/src/reconcile/mod.rs", source),
        vec![
            (1, Rule::PureStages, "alert".to_owned()),
            (2, Rule::PureStages, "store".to_owned()),
        ]
    );
}

#[test]
fn store_importing_actuation_is_reported() {
    let source = "use crate::batch::values::HostValues;\nuse crate::actuate::sign::Signed;\nfn f(_: crate::api::Commands) {}\n";
    assert_eq!(
        found("server/src/store/outbox/sink.rs", source),
        vec![
            (2, Rule::StoreBelowActing, "actuate".to_owned()),
            (3, Rule::StoreBelowActing, "api".to_owned()),
        ]
    );
}

#[test]
fn io_in_reconcile_is_reported_outside_tests() {
    let source = "\
use std::{collections::HashMap, fs};
fn plan() {
    tokio::spawn(async {});
    let _ = ::sqlx::query(\"SELECT 1\");
    ledger.load().await;
}
#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn t() { std::net::TcpListener::bind(\"x\"); f().await; }
}
";
    assert_eq!(
        found("server/src/reconcile/observe.rs", source),
        vec![
            (1, Rule::ReconcileHasNoIo, "std::fs".to_owned()),
            (3, Rule::ReconcileHasNoIo, "tokio".to_owned()),
            (4, Rule::ReconcileHasNoIo, "sqlx".to_owned()),
            (5, Rule::ReconcileHasNoIo, ".await".to_owned()),
        ]
    );
}

#[test]
fn signing_outside_actuate_is_reported() {
    let source = "fn f(s: &Sessions) {\n    s.send_command(&node, cmd);\n}\n";
    assert_eq!(
        found("server/src/api.rs", source),
        one(2, Rule::OnlyActuateSigns, "send_command")
    );
    assert_eq!(
        found(
            "server/src/control.rs",
            "use crate::actuate::CommandSigner;\n"
        ),
        one(1, Rule::OnlyActuateSigns, "CommandSigner")
    );
    assert!(found("server/src/actuate/deliver.rs", source).is_empty());
}

#[test]
fn proto_naming_a_side_is_reported() {
    assert_eq!(
        found("proto/src/lib.rs", "use guardian_server::store::Ledger;\n"),
        one(1, Rule::ProtoKnowsNoSide, "guardian_server")
    );
    let manifest = "[dependencies]\n# not guardian-agent\nprost.workspace = true\nguardian-server = { path = \"../server\" }\n";
    let violations: Vec<_> = check_proto_manifest("proto/Cargo.toml", manifest)
        .into_iter()
        .map(|v| (v.line, v.rule, v.target))
        .collect();
    assert_eq!(
        violations,
        one(4, Rule::ProtoKnowsNoSide, "guardian-server")
    );
}

#[test]
fn samplers_reaching_the_uplink_are_reported() {
    let source =
        "use crate::spool::Spool;\nuse super::Sampler;\nfn f() { super::super::uplink::send(); }\n";
    assert_eq!(
        found("agent/src/sample/host.rs", source),
        vec![
            (1, Rule::SamplersKnowNoUplink, "spool".to_owned()),
            (3, Rule::SamplersKnowNoUplink, "uplink".to_owned()),
        ]
    );
    // The rule is about samplers: the uplink itself may use the spool.
    assert!(found("agent/src/uplink.rs", source).is_empty());
}

#[test]
fn comments_and_literals_are_not_imports() {
    let source = r##"//! Reads windows; never [`crate::store::Ledger`] (crate::store is below).
/// See [`crate::store::telemetry::HostValues`] and `use crate::api::X;`.
/* block: use crate::ingest::Session; /* nested: crate::control::Loop */ still comment */
fn f() -> &'static str {
    let q = '"';
    let s = "use crate::store::Ledger; tokio::spawn";
    let r = r#"crate::actuate::sign "quoted" CommandSigner"#;
    let b = b"crate::store";
    let c = '\'';
    "send_command"
}
"##;
    assert_eq!(found("server/src/reconcile/mod.rs", source), Vec::new());
    // And a real import after all of that is still seen, on its own line.
    let source = format!("{source}use crate::store::Ledger;\n");
    assert_eq!(
        found("server/src/reconcile/mod.rs", &source),
        one(12, Rule::PureStages, "store")
    );
}

#[test]
fn report_lists_place_import_rule_and_fix() {
    let violations = check_source(
        "server/src/reconcile/runner.rs",
        "use crate::store::reconcile::{ClearedFinding, DecisionWrite};\n",
    );
    let text = render(&violations);
    assert!(text.starts_with("1 layering violation(s)"), "{text}");
    assert!(
        text.contains(
            "server/src/reconcile/runner.rs:1: `crate::store::reconcile::ClearedFinding`, \
             `crate::store::reconcile::DecisionWrite` -> `store`"
        ),
        "{text}"
    );
    assert!(
        text.contains("breaks rule 1: detect/ and reconcile/"),
        "{text}"
    );
    assert!(
        text.contains("fix: move the type to a module both may use"),
        "{text}"
    );
}

#[test]
fn only_actuate_kubernetes_uses_the_kubernetes_client() {
    let outside = check_source(
        "server/src/control.rs",
        "use kube::Api;\nfn f() { let _ = k8s_openapi::api::core::v1::Pod::default(); }\n",
    );
    assert_eq!(
        outside.iter().map(|v| (v.line, v.rule)).collect::<Vec<_>>(),
        [(1, Rule::KubeOnlyInActuate), (2, Rule::KubeOnlyInActuate)],
        "{outside:?}"
    );
    assert!(render(&outside).contains("breaks rule 7"));
    let inside = check_source(
        "server/src/actuate/kubernetes/cluster.rs",
        "use kube::Api;\nuse k8s_openapi::api::core::v1::Pod;\n",
    );
    assert!(inside.is_empty(), "{inside:?}");
    let beside = check_source("server/src/actuate/mod.rs", "use kube::Client;\n");
    assert_eq!(beside.len(), 1, "{beside:?}");
}

#[test]
fn module_paths_follow_the_file_layout() {
    assert_eq!(module_path("lib.rs"), Vec::<String>::new());
    assert_eq!(module_path("reconcile/mod.rs"), ["reconcile"]);
    assert_eq!(module_path("reconcile/plan.rs"), ["reconcile", "plan"]);
    assert_eq!(module_path("store/outbox/mod.rs"), ["store", "outbox"]);
    assert_eq!(module_path("bin/guardianctl.rs"), Vec::<String>::new());
}
