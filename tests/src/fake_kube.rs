//! A fake Kubernetes API server on 127.0.0.1 (plain HTTP, no authentication) that the real
//! `kube` client can be pointed at through [`FakeKube::kubeconfig`]. It keeps one in-memory
//! store of JSON objects keyed by collection path and name, serves the generic REST verbs over
//! it (list with label and field selectors, watch with real events, get, create with
//! `generateName`, replace and patch with optimistic concurrency, delete with preconditions and
//! finalizers, pod eviction), answers `SelfSubjectAccessReview`s and `/version`, records every
//! request, and fails on demand: injected error statuses ([`FakeKube::fail`]), slow answers
//! ([`FakeKube::delay`]), denied permissions ([`FakeKube::deny`]) and a server that is gone
//! ([`FakeKube::down`], [`FakeKube::up`]).
//!
//! Paths it understands, for any plural and API group:
//! `/api/v1/{plural}[/{name}[/{sub}]]`, `/api/v1/namespaces/{ns}/{plural}[/{name}[/{sub}]]` and
//! the same under `/apis/{group}/{version}`. Any plural is accepted (an unknown one is an empty
//! collection); scope is not known, so a list of `/api/v1/pods` (no namespace) is the list of
//! pods in every namespace.
//!
//! Simplifications, all on purpose: strategic merge patches and server-side apply are JSON merge
//! patches (RFC 7386: lists are replaced, there are no field managers); a patch or replace of
//! the object itself may also change its `status`; deletion is immediate unless the object has
//! finalizers (no grace periods, no garbage collection of dependents); eviction knows nothing of
//! disruption budgets (inject a 429 with [`FakeKube::fail`] for that); there is no discovery,
//! no pagination (`limit` is ignored, everything comes in one page) and no watch bookmarks other
//! than the end of `sendInitialEvents`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::Rng;
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{broadcast, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// Changes kept for watches that resume from a resourceVersion; older ones get 410 Expired.
const HISTORY: usize = 10_000;
/// The longest a watch stays open (its `timeoutSeconds` is capped to this).
const WATCH_CAP: Duration = Duration::from_secs(30);

type Body = BoxBody<Bytes, Infallible>;

/// One request as the fake received it (recorded before it is answered, injected failures
/// included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// `GET`, `POST`, `PUT`, `PATCH`, `DELETE`, ...
    pub method: String,
    /// The URL path as sent (not percent-decoded).
    pub path: String,
    /// The raw query string, without `?` (empty when there is none).
    pub query: String,
    /// The `Content-Type` header (empty when there is none).
    pub content_type: String,
    /// The body as UTF-8 (lossy; empty when there is none).
    pub body: String,
}

impl Recorded {
    /// The body parsed as JSON (`None` when it is empty or not JSON).
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.body).ok()
    }

    /// The query parameter `key`, percent-decoded (`None` when absent).
    pub fn param(&self, key: &str) -> Option<String> {
        param(&parse_query(&self.query), key).map(str::to_owned)
    }
}

/// A running fake API server on 127.0.0.1. Everything it started stops when it is dropped.
pub struct FakeKube {
    name: String,
    addr: SocketAddr,
    shared: Arc<Shared>,
    serving: Mutex<Option<Serving>>,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

/// The accept loop while the server is up.
struct Serving {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl FakeKube {
    /// Starts listening on a free port of 127.0.0.1 and serving on tokio tasks (call it inside
    /// a tokio runtime), and writes a kubeconfig whose cluster, context and user are all called
    /// `name`.
    ///
    /// # Errors
    /// When no port can be bound or the kubeconfig cannot be written.
    pub async fn start(name: &str) -> anyhow::Result<FakeKube> {
        let listener = listen(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let addr = listener.local_addr()?;
        let dir = tempfile::tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            kubeconfig_yaml(name, &format!("http://{addr}")),
        )
        .with_context(|| format!("writing {}", kubeconfig.display()))?;
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                objects: BTreeMap::new(),
                rv: 0,
                history: VecDeque::new(),
                floor: 0,
                kinds: HashMap::new(),
                events,
            }),
            requests: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
            delay: Mutex::new(Duration::ZERO),
            denied: Mutex::new(HashSet::new()),
            stop: CancellationToken::new(),
        });
        let serving = serve(&shared, listener);
        Ok(FakeKube {
            name: name.to_owned(),
            addr,
            shared,
            serving: Mutex::new(Some(serving)),
            kubeconfig,
            _dir: dir,
        })
    }

    /// The name given to [`FakeKube::start`] (the kubeconfig's context).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it listens (the port stays the same across [`FakeKube::down`] and
    /// [`FakeKube::up`]).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig (YAML) with one cluster, context and user, all named after
    /// [`FakeKube::name`], pointing at [`FakeKube::url`] without credentials; it is its
    /// current context. The file lives in a folder deleted with the fake.
    pub fn kubeconfig(&self) -> PathBuf {
        self.kubeconfig.clone()
    }

    /// Inserts or replaces an object of any kind in `collection` (a collection path such as
    /// `/api/v1/namespaces/val/pods`, `/apis/guardian.taonode.io/v1alpha1/namespaces/val/taonodes`
    /// or `/api/v1/nodes`), as an administrator would, and returns it as stored. Watchers see
    /// the change. `metadata.name` names it; `metadata.namespace` is taken from the path;
    /// `metadata.resourceVersion` is always set afresh; `metadata.uid`,
    /// `metadata.creationTimestamp` and `metadata.generation` are filled when absent (kept
    /// from the object it replaces, the generation bumped when `spec` changed, or new), and so
    /// is `apiVersion`.
    ///
    /// # Panics
    /// When `collection` is not a collection path, or `object` is not a JSON object with a
    /// `metadata.name`.
    pub fn put(&self, collection: &str, mut object: Value) -> Value {
        let coll = collection_of(collection);
        assert!(
            object.is_object(),
            "FakeKube::put: {object} is not a JSON object"
        );
        let name = meta_str(&object, "name")
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| panic!("FakeKube::put: {object} has no metadata.name"))
            .to_owned();
        let mut store = lock(&self.shared.store);
        let existing = store.get(&coll, &name).cloned();
        fill_meta(&coll, &mut object, existing.as_ref());
        store.write(&coll, &name, Some(object))
    }

    /// The object `name` in `collection`, as stored.
    ///
    /// # Panics
    /// When `collection` is not a collection path.
    pub fn get(&self, collection: &str, name: &str) -> Option<Value> {
        let coll = collection_of(collection);
        lock(&self.shared.store).get(&coll, name).cloned()
    }

    /// Every object in `collection`, ordered by namespace and name. A collection path without a
    /// namespace (`/api/v1/pods`) lists that plural in every namespace.
    ///
    /// # Panics
    /// When `collection` is not a collection path.
    pub fn list(&self, collection: &str) -> Vec<Value> {
        let coll = collection_of(collection);
        lock(&self.shared.store)
            .list(&coll)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Removes the object `name` from `collection` at once (finalizers notwithstanding) and
    /// returns it; watchers see it deleted.
    ///
    /// # Panics
    /// When `collection` is not a collection path.
    pub fn remove(&self, collection: &str, name: &str) -> Option<Value> {
        let coll = collection_of(collection);
        let mut store = lock(&self.shared.store);
        store.get(&coll, name)?;
        Some(store.write(&coll, name, None))
    }

    /// The current resourceVersion (the global counter every write bumps).
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.store).rv
    }

    /// Every request so far, in order of arrival.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.requests).clone()
    }

    /// The requests so far that ask for a change of state (`POST`, `PUT`, `PATCH`, `DELETE`),
    /// whether or not they succeeded, leaving out `POST`s of `SelfSubjectAccessReview`s.
    pub fn writes(&self) -> Vec<Recorded> {
        lock(&self.shared.requests)
            .iter()
            .filter(|r| is_write(r))
            .cloned()
            .collect()
    }

    /// Forgets the requests recorded so far.
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// Fault injection: the next `times` requests (`u32::MAX`: all, until
    /// [`FakeKube::clear_faults`]) whose path starts with `path_prefix` and whose method is
    /// `method` (any when `None`; case-insensitive) are answered with `status` and a
    /// Kubernetes `Status` body whose reason follows the code (403 `Forbidden`, 404
    /// `NotFound`, 409 `Conflict`, 410 `Expired`, 422 `Invalid`, 429 `TooManyRequests`, 500
    /// `InternalError`, 503 `ServiceUnavailable`, 504 `Timeout`, ...). The store is not
    /// touched by such a request. Rules are tried in the order they were added. A status that
    /// is not a valid HTTP code is sent as 500.
    pub fn fail(&self, method: Option<&str>, path_prefix: &str, status: u16, times: u32) {
        if times == 0 {
            return;
        }
        lock(&self.shared.faults).push(Fault {
            method: method.map(str::to_ascii_uppercase),
            prefix: path_prefix.to_owned(),
            status,
            remaining: times,
        });
    }

    /// Delays every answer (injected failures and the start of watches included) by `delay`;
    /// `Duration::ZERO` stops delaying.
    pub fn delay(&self, delay: Duration) {
        *lock(&self.shared.delay) = delay;
    }

    /// Makes `SelfSubjectAccessReview`s for `verb` (`"*"`: any verb) on `resource` of API
    /// `group` (`""` for the core group) answer `allowed: false`. A subresource is named
    /// `resource/subresource`, e.g. `deny("create", "", "pods/eviction")`. Only the review
    /// answers change: the requests themselves are still served.
    pub fn deny(&self, verb: &str, group: &str, resource: &str) {
        lock(&self.shared.denied).insert((verb.to_owned(), group.to_owned(), resource.to_owned()));
    }

    /// Undoes one [`FakeKube::deny`].
    pub fn allow(&self, verb: &str, group: &str, resource: &str) {
        lock(&self.shared.denied).remove(&(verb.to_owned(), group.to_owned(), resource.to_owned()));
    }

    /// Stops answering entirely: the listener is closed and every open connection (watches
    /// included) is dropped before this returns, so clients see their connections reset and
    /// new ones refused. The store is kept. Doing it twice is harmless.
    pub async fn down(&self) {
        let serving = lock(&self.serving).take();
        if let Some(serving) = serving {
            serving.stop.cancel();
            // The task only ends (or was aborted): nothing to report either way.
            let _ = serving.task.await;
        }
    }

    /// Listens again on the same port after [`FakeKube::down`] (nothing happens when it is
    /// up), with the store as it was.
    ///
    /// # Errors
    /// When the port cannot be bound again (something else took it).
    pub fn up(&self) -> anyhow::Result<()> {
        let mut serving = lock(&self.serving);
        if serving.is_none() {
            let listener =
                listen(self.addr).with_context(|| format!("listening on {} again", self.addr))?;
            *serving = Some(serve(&self.shared, listener));
        }
        Ok(())
    }

    /// Whether it is listening (between [`FakeKube::down`] and [`FakeKube::up`] it is not).
    pub fn is_up(&self) -> bool {
        lock(&self.serving).is_some()
    }

    /// Clears every injected fault: the [`FakeKube::fail`] rules, the [`FakeKube::delay`] and
    /// the [`FakeKube::deny`] set. (A server that is down stays down: see [`FakeKube::up`].)
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
        *lock(&self.shared.delay) = Duration::ZERO;
        lock(&self.shared.denied).clear();
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.shared.stop.cancel();
        let serving = lock(&self.serving).take();
        if let Some(serving) = serving {
            // Dropping the accept loop drops its connection tasks (the JoinSet aborts them).
            serving.task.abort();
        }
    }
}

/// What the connection tasks share with the handle.
struct Shared {
    store: Mutex<Store>,
    requests: Mutex<Vec<Recorded>>,
    faults: Mutex<Vec<Fault>>,
    delay: Mutex<Duration>,
    /// (verb, group, resource[/subresource]) answered `allowed: false`.
    denied: Mutex<HashSet<(String, String, String)>>,
    /// Cancelled when the fake is dropped: every task ends.
    stop: CancellationToken,
}

/// One [`FakeKube::fail`] rule.
struct Fault {
    method: Option<String>,
    prefix: String,
    status: u16,
    remaining: u32,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn is_write(r: &Recorded) -> bool {
    matches!(r.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE")
        && !(r.method == "POST"
            && r.path
                .trim_end_matches('/')
                .ends_with("/selfsubjectaccessreviews"))
}

fn kubeconfig_yaml(name: &str, server: &str) -> String {
    // JSON strings are valid YAML scalars: any name is quoted safely.
    let n = Value::String(name.to_owned()).to_string();
    let s = Value::String(server.to_owned()).to_string();
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {n}\n  cluster:\n    server: {s}\n\
         contexts:\n- name: {n}\n  context:\n    cluster: {n}\n    user: {n}\n\
         current-context: {n}\nusers:\n- name: {n}\n  user: {{}}\npreferences: {{}}\n"
    )
}

// ---------------------------------------------------------------------------------------------
// Listening

/// A listener with SO_REUSEADDR, so that [`FakeKube::up`] can take the same port again while
/// connections of the last life linger in TIME_WAIT.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

fn serve(shared: &Arc<Shared>, listener: TcpListener) -> Serving {
    let stop = shared.stop.child_token();
    let task = tokio::spawn(accept_loop(shared.clone(), listener, stop.clone()));
    Serving { stop, task }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, stop: CancellationToken) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of descriptors or the like: try again shortly, not in a hot loop.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let shared = shared.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| handle(shared.clone(), req));
                    // A connection that breaks is the client's business.
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
    drop(listener);
    connections.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Requests

/// A JSON answer.
struct Answer {
    code: u16,
    body: Value,
}

impl Answer {
    fn ok(body: Value) -> Self {
        Answer { code: 200, body }
    }

    fn created(body: Value) -> Self {
        Answer { code: 201, body }
    }

    fn into_response(self) -> Response<Body> {
        let bytes = Bytes::from(self.body.to_string());
        let mut response = Response::new(Full::new(bytes).boxed());
        *response.status_mut() =
            StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    }
}

/// A Kubernetes `Status` failure.
fn failure(code: u16, reason: &str, message: impl Into<String>, details: Value) -> Answer {
    Answer {
        code,
        body: json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message.into(),
            "reason": reason,
            "details": details,
            "code": code,
        }),
    }
}

fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        406 => "NotAcceptable",
        409 => "Conflict",
        410 => "Expired",
        413 => "RequestEntityTooLarge",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

fn bad_request(message: impl Into<String>) -> Answer {
    failure(400, "BadRequest", message, json!({}))
}

fn not_found(t: &Target, name: &str) -> Answer {
    failure(
        404,
        "NotFound",
        format!("{} \"{name}\" not found", t.coll.plural),
        json!({"name": name, "kind": t.coll.plural}),
    )
}

fn conflict(t: &Target, name: &str, message: String) -> Answer {
    failure(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": {message}",
            t.coll.plural
        ),
        json!({"name": name, "kind": t.coll.plural}),
    )
}

fn stale(t: &Target, name: &str) -> Answer {
    conflict(
        t,
        name,
        "the object has been modified; please apply your changes to the latest version and try \
         again"
            .to_owned(),
    )
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let method = parts.method.as_str().to_owned();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or("").to_owned();
    let content_type = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    lock(&shared.requests).push(Recorded {
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
        content_type: content_type.clone(),
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    let delay = *lock(&shared.delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let injected = injected(&shared, &method, &path);
    if let Some(answer) = injected {
        return Ok(answer.into_response());
    }
    Ok(route(&shared, &method, &path, &query, &content_type, &body))
}

fn injected(shared: &Shared, method: &str, path: &str) -> Option<Answer> {
    let mut faults = lock(&shared.faults);
    let fault = faults.iter_mut().find(|f| {
        f.remaining > 0
            && path.starts_with(&f.prefix)
            && f.method.as_deref().is_none_or(|m| m == method)
    })?;
    if fault.remaining != u32::MAX {
        fault.remaining -= 1;
    }
    let status = fault.status;
    faults.retain(|f| f.remaining > 0);
    Some(failure(
        status,
        reason_for(status),
        format!("fake-kube: injected {status} for {method} {path}"),
        json!({}),
    ))
}

fn route(
    shared: &Arc<Shared>,
    method: &str,
    path: &str,
    query: &str,
    content_type: &str,
    body: &[u8],
) -> Response<Body> {
    let params = parse_query(query);
    if path.trim_end_matches('/') == "/version" {
        return match method {
            "GET" => Answer::ok(version()).into_response(),
            _ => method_not_allowed(method, path).into_response(),
        };
    }
    if path.trim_end_matches('/') == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews" {
        return match method {
            "POST" => access_review(shared, body).into_response(),
            _ => method_not_allowed(method, path).into_response(),
        };
    }
    let Some(t) = parse_path(path) else {
        return failure(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
            json!({}),
        )
        .into_response();
    };
    let selectors = match Selectors::parse(&params) {
        Ok(s) => s,
        Err(e) => return bad_request(e).into_response(),
    };
    if method == "GET" && t.name.is_none() && is_watch(&params) {
        return watch(shared, t.coll, selectors, &params);
    }
    let mut store = lock(&shared.store);
    let answer = match (method, t.name.as_deref(), t.sub.as_deref()) {
        ("GET", None, None) => store.list_answer(&t.coll, &selectors),
        ("GET", Some(name), None | Some("status")) => match store.get(&t.coll, name) {
            Some(obj) => Answer::ok(obj.clone()),
            None => not_found(&t, name),
        },
        ("POST", None, None) => match parse_object(body) {
            Ok(obj) => store.create(&t, obj),
            Err(e) => e,
        },
        ("POST", Some(name), Some("eviction")) if t.coll.plural == "pods" => {
            store.evict(&t, name, body)
        }
        ("PUT", Some(name), None | Some("status")) => match parse_object(body) {
            Ok(obj) => store.update(&t, name, obj),
            Err(e) => e,
        },
        ("PATCH", Some(name), None | Some("status")) => {
            store.patch(&t, name, content_type, &params, body)
        }
        ("DELETE", Some(name), None) => store.delete(&t, name, body),
        ("DELETE", None, None) => store.delete_collection(&t, &selectors),
        (_, Some(_), Some(sub)) if !matches!(sub, "status" | "eviction") => failure(
            404,
            "NotFound",
            format!(
                "the server could not find the requested resource ({path}): no subresource {sub}"
            ),
            json!({}),
        ),
        _ => method_not_allowed(method, path),
    };
    drop(store);
    answer.into_response()
}

fn method_not_allowed(method: &str, path: &str) -> Answer {
    failure(
        405,
        "MethodNotAllowed",
        format!(
            "the server does not allow this method on the requested resource ({method} {path})"
        ),
        json!({}),
    )
}

fn parse_object(body: &[u8]) -> Result<Value, Answer> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err(bad_request("the request body is not a JSON object")),
        Err(e) => Err(bad_request(format!("the request body is not JSON: {e}"))),
    }
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "30",
        "gitVersion": "v1.30.0",
        "gitCommit": "7c48c2bd72b9bf5c44d21d7338cc7bea77d0ad2a",
        "gitTreeState": "clean",
        "buildDate": "2024-04-17T17:27:03Z",
        "goVersion": "go1.22.2",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn access_review(shared: &Shared, body: &[u8]) -> Answer {
    let mut review = match parse_object(body) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let attrs = &review["spec"]["resourceAttributes"];
    let denied = if attrs.is_object() {
        let field = |k: &str| attrs[k].as_str().unwrap_or("").to_owned();
        let (verb, group, resource, sub) = (
            field("verb"),
            field("group"),
            field("resource"),
            field("subresource"),
        );
        let resource = if sub.is_empty() {
            resource
        } else {
            format!("{resource}/{sub}")
        };
        lock(&shared.denied)
            .iter()
            .any(|(v, g, r)| (*v == verb || v == "*") && *g == group && *r == resource)
    } else {
        false
    };
    review["status"] = if denied {
        json!({"allowed": false, "denied": true, "reason": "denied by FakeKube::deny"})
    } else {
        json!({"allowed": true, "reason": "allowed by FakeKube"})
    };
    if review.get("apiVersion").is_none() {
        review["apiVersion"] = json!("authorization.k8s.io/v1");
    }
    if review.get("kind").is_none() {
        review["kind"] = json!("SelfSubjectAccessReview");
    }
    Answer::created(review)
}

// ---------------------------------------------------------------------------------------------
// Paths

/// A collection: `/api/v1[/namespaces/{ns}]/{plural}` or the same under `/apis/{group}/{version}`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Coll {
    /// `/api/v1` or `/apis/{group}/{version}`.
    base: String,
    ns: Option<String>,
    plural: String,
}

impl Coll {
    /// `v1` or `{group}/{version}`.
    fn api_version(&self) -> String {
        self.base
            .strip_prefix("/apis/")
            .or_else(|| self.base.strip_prefix("/api/"))
            .unwrap_or(&self.base)
            .to_owned()
    }

    /// Whether objects stored in `other` belong to this collection (a collection without a
    /// namespace holds that plural in every namespace).
    fn contains(&self, other: &Coll) -> bool {
        self.base == other.base
            && self.plural == other.plural
            && (self.ns.is_none() || self.ns == other.ns)
    }
}

/// A parsed request path.
struct Target {
    coll: Coll,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (base, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("/api/v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("/apis/{group}/{version}"), rest),
        _ => return None,
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [plural] => (plural, None, None),
        [plural, name] => (plural, Some(name), None),
        [plural, name, sub] => (plural, Some(name), Some(sub)),
        _ => return None,
    };
    Some(Target {
        coll: Coll {
            base,
            ns,
            plural: (*plural).to_owned(),
        },
        name: name.map(|n| (*n).to_owned()),
        sub: sub.map(|s| (*s).to_owned()),
    })
}

/// The collection of a test's call, or a panic naming the mistake.
fn collection_of(collection: &str) -> Coll {
    match parse_path(collection) {
        Some(Target {
            coll,
            name: None,
            sub: None,
        }) => coll,
        _ => panic!(
            "FakeKube: {collection:?} is not a collection path (/api/v1/[namespaces/NS/]PLURAL \
             or /apis/GROUP/VERSION/[namespaces/NS/]PLURAL)"
        ),
    }
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Decodes `%XX` escapes and `+` (a space, in query strings).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_watch(params: &[(String, String)]) -> bool {
    matches!(param(params, "watch"), Some("true" | "1"))
}

// ---------------------------------------------------------------------------------------------
// Selectors

/// One term of a label selector.
enum LabelTerm {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// One term of a field selector: (dotted path, value, negated).
struct FieldTerm {
    path: String,
    value: String,
    negated: bool,
}

/// The `labelSelector` and `fieldSelector` of a request.
#[derive(Default)]
struct Selectors {
    labels: Vec<LabelTerm>,
    fields: Vec<FieldTerm>,
}

impl Selectors {
    fn parse(params: &[(String, String)]) -> Result<Self, String> {
        let mut selectors = Selectors::default();
        if let Some(s) = param(params, "labelSelector") {
            for term in split_terms(s) {
                selectors.labels.push(parse_label_term(term)?);
            }
        }
        if let Some(s) = param(params, "fieldSelector") {
            for term in split_terms(s) {
                let (path, value, negated) = if let Some((p, v)) = term.split_once("!=") {
                    (p, v, true)
                } else if let Some((p, v)) = term.split_once("==") {
                    (p, v, false)
                } else if let Some((p, v)) = term.split_once('=') {
                    (p, v, false)
                } else {
                    return Err(format!("invalid field selector term {term:?}"));
                };
                selectors.fields.push(FieldTerm {
                    path: path.trim().to_owned(),
                    value: value.trim().to_owned(),
                    negated,
                });
            }
        }
        Ok(selectors)
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        let labels_match = self.labels.iter().all(|term| match term {
            LabelTerm::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelTerm::Ne(k, v) => label(k) != Some(v.as_str()),
            LabelTerm::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelTerm::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            LabelTerm::Exists(k) => label(k).is_some(),
            LabelTerm::NotExists(k) => label(k).is_none(),
        });
        labels_match
            && self.fields.iter().all(|term| {
                let mut at = obj;
                for key in term.path.split('.') {
                    at = &at[key];
                }
                let actual = match at {
                    Value::Null => String::new(),
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (actual == term.value) != term.negated
            })
    }
}

/// Splits a selector at the commas outside parentheses.
fn split_terms(s: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0_i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth <= 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    terms
        .into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_label_term(term: &str) -> Result<LabelTerm, String> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(LabelTerm::NotExists(key.trim().to_owned()));
    }
    if let Some((head, set)) = term.split_once('(') {
        let set = set
            .strip_suffix(')')
            .ok_or_else(|| format!("invalid label selector term {term:?}"))?;
        let values = set.split(',').map(|v| v.trim().to_owned()).collect();
        let mut words = head.split_whitespace();
        let (Some(key), Some(op), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!("invalid label selector term {term:?}"));
        };
        return match op {
            "in" => Ok(LabelTerm::In(key.to_owned(), values)),
            "notin" => Ok(LabelTerm::NotIn(key.to_owned(), values)),
            _ => Err(format!(
                "invalid label selector operator {op:?} in {term:?}"
            )),
        };
    }
    let pair = |k: &str, v: &str| (k.trim().to_owned(), v.trim().to_owned());
    if let Some((k, v)) = term.split_once("!=") {
        let (k, v) = pair(k, v);
        return Ok(LabelTerm::Ne(k, v));
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        let (k, v) = pair(k, v);
        return Ok(LabelTerm::Eq(k, v));
    }
    Ok(LabelTerm::Exists(term.trim().to_owned()))
}

// ---------------------------------------------------------------------------------------------
// The store

/// One write, as watches see it.
struct Change {
    rv: u64,
    coll: Coll,
    /// The object before the write (for a deletion: the deleted object, with the deletion's
    /// resourceVersion).
    old: Option<Value>,
    /// The object after the write (`None` for a deletion).
    new: Option<Value>,
}

struct Store {
    objects: BTreeMap<(Coll, String), Value>,
    /// The global resourceVersion counter.
    rv: u64,
    /// The latest changes, oldest first.
    history: VecDeque<Arc<Change>>,
    /// Every change after this resourceVersion is in `history`.
    floor: u64,
    /// Kind per (base, plural), from the objects stored so far.
    kinds: HashMap<(String, String), String>,
    events: broadcast::Sender<Arc<Change>>,
}

impl Store {
    fn get(&self, coll: &Coll, name: &str) -> Option<&Value> {
        self.objects.get(&(coll.clone(), name.to_owned()))
    }

    fn list<'a>(&'a self, coll: &'a Coll) -> impl Iterator<Item = (&'a Coll, &'a Value)> + 'a {
        self.objects
            .iter()
            .filter(move |((c, _), _)| coll.contains(c))
            .map(|((c, _), v)| (c, v))
    }

    /// Stores `new` (or removes the object when `None`) under a fresh resourceVersion, tells
    /// the watches, and returns the object as it now is (for a deletion: as it was deleted).
    /// An object that has a deletionTimestamp and no finalizers left is deleted.
    fn write(&mut self, coll: &Coll, name: &str, new: Option<Value>) -> Value {
        self.rv += 1;
        let rv = self.rv;
        let key = (coll.clone(), name.to_owned());
        let old = self.objects.remove(&key);
        let (old, new, result) = match new {
            Some(mut obj) => {
                set_meta(&mut obj, "resourceVersion", json!(rv.to_string()));
                if let Some(kind) = obj.get("kind").and_then(Value::as_str) {
                    self.kinds
                        .insert((coll.base.clone(), coll.plural.clone()), kind.to_owned());
                }
                if old.is_some() && finalized(&obj) {
                    (Some(obj.clone()), None, obj)
                } else {
                    self.objects.insert(key, obj.clone());
                    (old, Some(obj.clone()), obj)
                }
            }
            None => {
                let mut obj = old.unwrap_or(Value::Null);
                set_meta(&mut obj, "resourceVersion", json!(rv.to_string()));
                (Some(obj.clone()), None, obj)
            }
        };
        let change = Arc::new(Change {
            rv,
            coll: coll.clone(),
            old,
            new,
        });
        self.history.push_back(change.clone());
        while self.history.len() > HISTORY {
            if let Some(dropped) = self.history.pop_front() {
                self.floor = dropped.rv;
            }
        }
        // No watch listening is fine.
        let _ = self.events.send(change);
        result
    }

    /// The kind of the objects in `coll` (empty when unknown).
    fn kind(&self, coll: &Coll) -> String {
        if let Some(kind) = self.kinds.get(&(coll.base.clone(), coll.plural.clone())) {
            return kind.clone();
        }
        let known = match coll.plural.as_str() {
            "pods" => "Pod",
            "nodes" => "Node",
            "events" => "Event",
            "configmaps" => "ConfigMap",
            "secrets" => "Secret",
            "services" => "Service",
            "namespaces" => "Namespace",
            "persistentvolumeclaims" => "PersistentVolumeClaim",
            "persistentvolumes" => "PersistentVolume",
            "serviceaccounts" => "ServiceAccount",
            "endpoints" => "Endpoints",
            "leases" => "Lease",
            "deployments" => "Deployment",
            "statefulsets" => "StatefulSet",
            "daemonsets" => "DaemonSet",
            "replicasets" => "ReplicaSet",
            "jobs" => "Job",
            "poddisruptionbudgets" => "PodDisruptionBudget",
            "taonodes" => "TaoNode",
            _ => "",
        };
        known.to_owned()
    }

    fn list_answer(&self, coll: &Coll, selectors: &Selectors) -> Answer {
        let items: Vec<Value> = self
            .list(coll)
            .map(|(_, v)| v)
            .filter(|v| selectors.matches(v))
            .cloned()
            .collect();
        Answer::ok(json!({
            "apiVersion": coll.api_version(),
            "kind": format!("{}List", self.kind(coll)),
            "metadata": {"resourceVersion": self.rv.to_string()},
            "items": items,
        }))
    }

    fn create(&mut self, t: &Target, mut obj: Value) -> Answer {
        let given = meta_str(&obj, "name").filter(|n| !n.is_empty());
        let name = match given {
            Some(name) => name.to_owned(),
            None => {
                let Some(prefix) = meta_str(&obj, "generateName").filter(|n| !n.is_empty()) else {
                    return failure(
                        422,
                        "Invalid",
                        format!(
                            "{} is invalid: metadata.name: Required value: name or generateName \
                             is required",
                            t.coll.plural
                        ),
                        json!({"kind": t.coll.plural}),
                    );
                };
                let prefix = prefix.to_owned();
                let free = (0..100)
                    .map(|_| format!("{prefix}{}", random_suffix()))
                    .find(|n| self.get(&t.coll, n).is_none());
                let Some(name) = free else {
                    return failure(
                        409,
                        "AlreadyExists",
                        format!("no free name for generateName {prefix:?}"),
                        json!({"kind": t.coll.plural}),
                    );
                };
                set_meta(&mut obj, "name", json!(name));
                name
            }
        };
        if let (Some(given), Some(ns)) = (meta_str(&obj, "namespace"), &t.coll.ns)
            && given != ns
        {
            return bad_request(
                "the namespace of the provided object does not match the namespace sent on the \
                 request",
            );
        }
        if self.get(&t.coll, &name).is_some() {
            return failure(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", t.coll.plural),
                json!({"name": name, "kind": t.coll.plural}),
            );
        }
        if let Some(m) = meta_mut(&mut obj) {
            // Server-owned fields a client may not choose.
            m.remove("uid");
            m.remove("deletionTimestamp");
            m.remove("creationTimestamp");
            m.insert("generation".into(), json!(1));
        }
        fill_meta(&t.coll, &mut obj, None);
        Answer::created(self.write(&t.coll, &name, Some(obj)))
    }

    fn update(&mut self, t: &Target, name: &str, body: Value) -> Answer {
        let Some(existing) = self.get(&t.coll, name).cloned() else {
            return not_found(t, name);
        };
        if let Some(given) = meta_str(&body, "name")
            && given != name
        {
            return bad_request(format!(
                "the name of the object ({given}) does not match the name on the URL ({name})"
            ));
        }
        if let Some(rv) = meta_str(&body, "resourceVersion").filter(|rv| !rv.is_empty())
            && Some(rv) != meta_str(&existing, "resourceVersion")
        {
            return stale(t, name);
        }
        let new = if t.sub.as_deref() == Some("status") {
            with_status_of(&existing, &body)
        } else {
            body
        };
        self.finish_update(t, name, &existing, new)
    }

    fn patch(
        &mut self,
        t: &Target,
        name: &str,
        content_type: &str,
        params: &[(String, String)],
        body: &[u8],
    ) -> Answer {
        let media = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let apply = media == "application/apply-patch+yaml";
        if !matches!(
            media.as_str(),
            "application/merge-patch+json"
                | "application/strategic-merge-patch+json"
                | "application/apply-patch+yaml"
                | "application/json-patch+json"
        ) {
            return failure(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (not {content_type:?})"
                ),
                json!({}),
            );
        }
        if apply && param(params, "fieldManager").is_none_or(str::is_empty) {
            return bad_request(
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
            );
        }
        let patch: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                return bad_request(format!(
                    "the patch is not JSON (the fake takes JSON apply patches only): {e}"
                ));
            }
        };
        let status_only = t.sub.as_deref() == Some("status");
        let Some(existing) = self.get(&t.coll, name).cloned() else {
            if apply && !status_only && patch.is_object() {
                let mut obj = patch;
                set_meta(&mut obj, "name", json!(name));
                return self.create(t, obj);
            }
            return not_found(t, name);
        };
        let mut patched = existing.clone();
        if media == "application/json-patch+json" {
            if let Err(e) = json_patch(&mut patched, &patch) {
                return failure(
                    422,
                    "Invalid",
                    format!("the JSON patch failed: {e}"),
                    json!({}),
                );
            }
        } else {
            if !patch.is_object() {
                return bad_request("a merge patch must be a JSON object");
            }
            merge_patch(&mut patched, &patch);
        }
        if !patched.is_object() {
            return failure(422, "Invalid", "the patch leaves no object", json!({}));
        }
        if meta_str(&patched, "resourceVersion") != meta_str(&existing, "resourceVersion")
            && meta_str(&patched, "resourceVersion").is_some()
        {
            return stale(t, name);
        }
        let new = if status_only {
            with_status_of(&existing, &patched)
        } else {
            patched
        };
        self.finish_update(t, name, &existing, new)
    }

    /// Keeps the server-owned metadata of `existing` in `new`, bumps the generation when the
    /// spec changed, and stores it unless nothing changed.
    fn finish_update(
        &mut self,
        t: &Target,
        name: &str,
        existing: &Value,
        mut new: Value,
    ) -> Answer {
        let spec_changed = existing.get("spec") != new.get("spec");
        let generation =
            existing["metadata"]["generation"].as_u64().unwrap_or(1) + u64::from(spec_changed);
        if let Some(m) = meta_mut(&mut new) {
            m.insert("name".into(), json!(name));
            match &t.coll.ns {
                Some(ns) => m.insert("namespace".into(), json!(ns)),
                None => m.remove("namespace"),
            };
            for key in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "resourceVersion",
            ] {
                match existing["metadata"].get(key) {
                    Some(v) => m.insert(key.into(), v.clone()),
                    None => m.remove(key),
                };
            }
            m.insert("generation".into(), json!(generation));
        }
        if new.get("apiVersion").is_none() {
            new["apiVersion"] = json!(t.coll.api_version());
        }
        if new == *existing {
            return Answer::ok(new);
        }
        Answer::ok(self.write(&t.coll, name, Some(new)))
    }

    fn delete(&mut self, t: &Target, name: &str, body: &[u8]) -> Answer {
        let Some(existing) = self.get(&t.coll, name).cloned() else {
            return not_found(t, name);
        };
        let options: Value = if body.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => return bad_request(format!("the DeleteOptions are not JSON: {e}")),
            }
        };
        let options = options.get("deleteOptions").unwrap_or(&options);
        if let Err(answer) = check_preconditions(t, name, &existing, options) {
            return answer;
        }
        Answer::ok(self.delete_now(&t.coll, name, existing))
    }

    /// Deletes `existing`, or marks it for deletion when it has finalizers.
    fn delete_now(&mut self, coll: &Coll, name: &str, mut existing: Value) -> Value {
        let has_finalizers = existing["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if !has_finalizers {
            return self.write(coll, name, None);
        }
        if meta_str(&existing, "deletionTimestamp").is_some() {
            return existing;
        }
        set_meta(&mut existing, "deletionTimestamp", json!(now_rfc3339()));
        self.write(coll, name, Some(existing))
    }

    fn delete_collection(&mut self, t: &Target, selectors: &Selectors) -> Answer {
        let doomed: Vec<(Coll, String, Value)> = self
            .objects
            .iter()
            .filter(|((c, _), v)| t.coll.contains(c) && selectors.matches(v))
            .map(|((c, n), v)| (c.clone(), n.clone(), v.clone()))
            .collect();
        let items: Vec<Value> = doomed
            .into_iter()
            .map(|(c, n, v)| self.delete_now(&c, &n, v))
            .collect();
        Answer::ok(json!({
            "apiVersion": t.coll.api_version(),
            "kind": format!("{}List", self.kind(&t.coll)),
            "metadata": {"resourceVersion": self.rv.to_string()},
            "items": items,
        }))
    }

    fn evict(&mut self, t: &Target, name: &str, body: &[u8]) -> Answer {
        let pod = Target {
            coll: t.coll.clone(),
            name: Some(name.to_owned()),
            sub: None,
        };
        let answer = self.delete(&pod, name, body);
        if answer.code != 200 {
            return answer;
        }
        Answer::created(json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "code": 201,
        }))
    }
}

fn check_preconditions(
    t: &Target,
    name: &str,
    existing: &Value,
    options: &Value,
) -> Result<(), Answer> {
    let preconditions = &options["preconditions"];
    for (key, label) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
        if let Some(wanted) = preconditions.get(key).and_then(Value::as_str) {
            let actual = meta_str(existing, key).unwrap_or("");
            if wanted != actual {
                return Err(conflict(
                    t,
                    name,
                    format!(
                        "Precondition failed: {label} in precondition: {wanted}, {label} in object \
                         meta: {actual}"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `existing` with the `status` of `source` (removed when `source` has none).
fn with_status_of(existing: &Value, source: &Value) -> Value {
    let mut new = existing.clone();
    if let Value::Object(m) = &mut new {
        match source.get("status") {
            Some(status) => m.insert("status".into(), status.clone()),
            None => m.remove("status"),
        };
    }
    new
}

/// Whether an object marked for deletion has no finalizers left.
fn finalized(obj: &Value) -> bool {
    meta_str(obj, "deletionTimestamp").is_some()
        && obj["metadata"]["finalizers"]
            .as_array()
            .is_none_or(Vec::is_empty)
}

fn meta_str<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(key)?.as_str()
}

/// The metadata map of `obj`, created when missing (`None` when `obj` is not an object).
fn meta_mut(obj: &mut Value) -> Option<&mut Map<String, Value>> {
    let metadata = obj
        .as_object_mut()?
        .entry("metadata")
        .or_insert_with(|| json!({}));
    if !metadata.is_object() {
        *metadata = json!({});
    }
    metadata.as_object_mut()
}

fn set_meta(obj: &mut Value, key: &str, value: Value) {
    if let Some(m) = meta_mut(obj) {
        m.insert(key.to_owned(), value);
    }
}

/// Fills what the server fills on a stored object: `apiVersion`, the namespace from the path,
/// and (when absent) uid, creationTimestamp and generation, kept from `existing` when there is
/// one.
fn fill_meta(coll: &Coll, obj: &mut Value, existing: Option<&Value>) {
    if obj.get("apiVersion").is_none()
        && let Value::Object(o) = obj
    {
        o.insert("apiVersion".into(), json!(coll.api_version()));
    }
    let old = |key: &str| existing.and_then(|e| e["metadata"].get(key)).cloned();
    let generation = match existing.and_then(|e| e["metadata"]["generation"].as_u64()) {
        Some(g) => g + u64::from(existing.is_some_and(|e| e.get("spec") != obj.get("spec"))),
        None => 1,
    };
    let (uid, created) = (old("uid"), old("creationTimestamp"));
    let Some(m) = meta_mut(obj) else { return };
    if let Some(ns) = &coll.ns {
        m.insert("namespace".into(), json!(ns));
    }
    if !m.contains_key("uid") {
        m.insert("uid".into(), uid.unwrap_or_else(|| json!(new_uid())));
    }
    if !m.contains_key("creationTimestamp") {
        m.insert(
            "creationTimestamp".into(),
            created.unwrap_or_else(|| json!(now_rfc3339())),
        );
    }
    if !m.contains_key("generation") {
        m.insert("generation".into(), json!(generation));
    }
}

fn now_rfc3339() -> String {
    format!(
        "{}Z",
        guardian_server::utc(guardian_server::unix_ms()).replace(' ', "T")
    )
}

/// A random version-4 UUID.
fn new_uid() -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Five characters as the API server appends to a generateName.
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Patches

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// RFC 6902 JSON patch: `add`, `remove`, `replace`, `move`, `copy` and `test`.
fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops.as_array().ok_or("a JSON patch must be an array")?;
    for op in ops {
        let kind = op["op"].as_str().ok_or("an operation has no \"op\"")?;
        let path = op["path"].as_str().ok_or("an operation has no \"path\"")?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or(format!("{kind} {path} has no value"))
        };
        let from = || {
            op["from"]
                .as_str()
                .ok_or(format!("{kind} {path} has no from"))
        };
        match kind {
            "add" => pointer_add(doc, path, value()?)?,
            "remove" => {
                pointer_remove(doc, path)?;
            }
            "replace" => {
                if path.is_empty() {
                    *doc = value()?;
                } else {
                    pointer_remove(doc, path)?;
                    pointer_add(doc, path, value()?)?;
                }
            }
            "move" => {
                let moved = pointer_remove(doc, from()?)?;
                pointer_add(doc, path, moved)?;
            }
            "copy" => {
                let copied = doc
                    .pointer(from()?)
                    .cloned()
                    .ok_or(format!("copy: {} does not exist", from()?))?;
                pointer_add(doc, path, copied)?;
            }
            "test" => {
                if doc.pointer(path) != Some(&value()?) {
                    return Err(format!("test of {path} failed"));
                }
            }
            other => return Err(format!("unknown operation {other:?}")),
        }
    }
    Ok(())
}

/// The parent pointer and the unescaped last token of a JSON pointer.
fn split_pointer(path: &str) -> Result<(&str, String), String> {
    let (parent, last) = path
        .rsplit_once('/')
        .ok_or(format!("{path:?} is not a JSON pointer"))?;
    Ok((parent, last.replace("~1", "/").replace("~0", "~")))
}

fn pointer_add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(parent) {
        Some(Value::Object(m)) => {
            m.insert(last, value);
            Ok(())
        }
        Some(Value::Array(a)) => {
            let index = if last == "-" {
                a.len()
            } else {
                last.parse::<usize>()
                    .ok()
                    .filter(|i| *i <= a.len())
                    .ok_or(format!("add: no index {last} in {parent}"))?
            };
            a.insert(index, value);
            Ok(())
        }
        _ => Err(format!("add: {parent:?} does not exist")),
    }
}

fn pointer_remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(parent) {
        Some(Value::Object(m)) => m.remove(&last).ok_or(format!("{path} does not exist")),
        Some(Value::Array(a)) => {
            let index = last
                .parse::<usize>()
                .ok()
                .filter(|i| *i < a.len())
                .ok_or(format!("{path} does not exist"))?;
            Ok(a.remove(index))
        }
        _ => Err(format!("{path} does not exist")),
    }
}

// ---------------------------------------------------------------------------------------------
// Watches

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// The event a watch of `coll` with `selectors` sees for `change`, if any (an object that stops
/// matching is DELETED for it, one that starts matching is ADDED).
fn event_for(coll: &Coll, selectors: &Selectors, change: &Change) -> Option<Bytes> {
    if !coll.contains(&change.coll) {
        return None;
    }
    let was = change.old.as_ref().is_some_and(|o| selectors.matches(o));
    let is = change.new.as_ref().is_some_and(|o| selectors.matches(o));
    match (was, is, &change.new, &change.old) {
        (false, true, Some(new), _) => Some(event_line("ADDED", new)),
        (true, true, Some(new), _) => Some(event_line("MODIFIED", new)),
        (true, false, Some(new), _) => Some(event_line("DELETED", new)),
        (true, false, None, Some(old)) => Some(event_line("DELETED", old)),
        _ => None,
    }
}

/// Answers a watch: 200 and a stream of one JSON event a line. Without a resourceVersion (or
/// with "0") the stream starts with ADDED for every current object; with one, it replays the
/// changes after it (410 Expired as an ERROR event when those are no longer kept); then it
/// follows the changes as they happen, until `timeoutSeconds` (at most 30 s).
fn watch(
    shared: &Arc<Shared>,
    coll: Coll,
    selectors: Selectors,
    params: &[(String, String)],
) -> Response<Body> {
    let timeout = param(params, "timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .map_or(WATCH_CAP, |t| Duration::from_secs(t).min(WATCH_CAP));
    let from = match param(params, "resourceVersion").filter(|rv| !rv.is_empty()) {
        None => None,
        Some(rv) => match rv.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => {
                return bad_request(format!("invalid resourceVersion {rv:?}")).into_response();
            }
        },
    };
    let initial_events = param(params, "sendInitialEvents") == Some("true");
    let (initial, changes, expired) = {
        let store = lock(&shared.store);
        // Subscribing under the lock: no change falls between the snapshot and the stream.
        let changes = store.events.subscribe();
        let mut initial = Vec::new();
        let mut expired = false;
        match from {
            _ if initial_events || from.unwrap_or(0) == 0 => {
                initial.extend(
                    store
                        .list(&coll)
                        .map(|(_, v)| v)
                        .filter(|v| selectors.matches(v))
                        .map(|v| event_line("ADDED", v)),
                );
                if initial_events {
                    initial.push(event_line(
                        "BOOKMARK",
                        &json!({
                            "apiVersion": coll.api_version(),
                            "kind": store.kind(&coll),
                            "metadata": {
                                "resourceVersion": store.rv.to_string(),
                                "annotations": {"k8s.io/initial-events-end": "true"},
                            },
                        }),
                    ));
                }
            }
            Some(rv) if rv < store.floor => {
                let gone = failure(
                    410,
                    "Expired",
                    format!("too old resource version: {rv} ({})", store.floor),
                    json!({}),
                );
                initial.push(event_line("ERROR", &gone.body));
                expired = true;
            }
            Some(rv) => initial.extend(
                store
                    .history
                    .iter()
                    .filter(|c| c.rv > rv)
                    .filter_map(|c| event_for(&coll, &selectors, c)),
            ),
            None => {}
        }
        (initial, changes, expired)
    };
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let stop = shared.stop.clone();
    let deadline = Instant::now() + timeout;
    tokio::spawn(follow(
        Follow {
            coll,
            selectors,
            tx,
            stop,
            deadline,
        },
        initial,
        changes,
        expired,
    ));
    let stream = ReceiverStream::new(rx).map(|line| Ok::<_, Infallible>(Frame::data(line)));
    let mut response = Response::new(StreamBody::new(stream).boxed());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// One watch's stream.
struct Follow {
    coll: Coll,
    selectors: Selectors,
    tx: mpsc::Sender<Bytes>,
    stop: CancellationToken,
    deadline: Instant,
}

impl Follow {
    /// Sends one line; false when the watch is over (client gone, timeout, fake dropped).
    async fn send(&self, line: Bytes) -> bool {
        tokio::select! {
            sent = self.tx.send(line) => sent.is_ok(),
            () = tokio::time::sleep_until(self.deadline) => false,
            () = self.stop.cancelled() => false,
        }
    }
}

async fn follow(
    watch: Follow,
    initial: Vec<Bytes>,
    mut changes: broadcast::Receiver<Arc<Change>>,
    expired: bool,
) {
    for line in initial {
        if !watch.send(line).await {
            return;
        }
    }
    if expired {
        return;
    }
    loop {
        let change = tokio::select! {
            change = changes.recv() => change,
            () = tokio::time::sleep_until(watch.deadline) => return,
            () = watch.stop.cancelled() => return,
            () = watch.tx.closed() => return,
        };
        // Lagging behind: end the stream; the client resumes from its last resourceVersion,
        // which the history replays.
        let Ok(change) = change else { return };
        if let Some(line) = event_for(&watch.coll, &watch.selectors, &change)
            && !watch.send(line).await
        {
            return;
        }
    }
}

/// Where the validator fixtures live: namespace `validators`.
pub mod validators {
    /// TaoNodes.
    pub const TAONODES: &str = "/apis/guardian.taonode.io/v1alpha1/namespaces/validators/taonodes";
    /// StatefulSets.
    pub const SETS: &str = "/apis/apps/v1/namespaces/validators/statefulsets";
    /// Pods.
    pub const PODS: &str = "/api/v1/namespaces/validators/pods";
}

impl FakeKube {
    /// A validator's workload in namespace `validators`: a TaoNode naming `node`, its
    /// StatefulSet `subtensor-NODE` (container `subtensor`, selector `app=subtensor-NODE`) and
    /// its pod (see [`FakeKube::put_validator_pod`]).
    pub fn put_validator(&self, node: &str) {
        let set = format!("subtensor-{node}");
        self.put(
            validators::TAONODES,
            json!({
                "apiVersion": "guardian.taonode.io/v1alpha1",
                "kind": "TaoNode",
                "metadata": { "name": node },
                "spec": {
                    "nodeId": node,
                    "network": "local",
                    "workload": { "kind": "StatefulSet", "name": set, "container": "subtensor" }
                }
            }),
        );
        self.put(
            validators::SETS,
            json!({
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": { "name": set },
                "spec": {
                    "selector": { "matchLabels": { "app": set } },
                    "serviceName": set,
                    "template": {
                        "metadata": { "labels": { "app": set } },
                        "spec": { "containers": [{ "name": "subtensor", "image": "subtensor" }] }
                    }
                }
            }),
        );
        self.put_validator_pod(node);
    }

    /// The validator's pod `subtensor-NODE-0` (a new uid each time, as its StatefulSet
    /// controller would make it).
    pub fn put_validator_pod(&self, node: &str) {
        let set = format!("subtensor-{node}");
        self.put(
            validators::PODS,
            json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": { "name": format!("{set}-0"), "labels": { "app": set } },
                "spec": { "containers": [{ "name": "subtensor", "image": "subtensor" }] }
            }),
        );
    }
}
