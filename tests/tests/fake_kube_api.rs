//! The fake Kubernetes API server over plain HTTP: the store, selectors, preconditions,
//! patches, watches and every fault mode the scenario tests rely on.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use guardian_tests::fake_kube::FakeKube;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

const PODS: &str = "/api/v1/namespaces/a/pods";

/// Sends one request on a fresh connection and returns the response (body unread).
async fn send(
    kube: &FakeKube,
    method: &str,
    path: &str,
    content_type: &str,
    body: &Value,
) -> anyhow::Result<hyper::Response<Incoming>> {
    let client = Client::builder(TokioExecutor::new()).build_http();
    let bytes = if body.is_null() {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    let mut request = Request::builder()
        .method(method)
        .uri(format!("{}{path}", kube.url()))
        .header("accept", "application/json");
    if !content_type.is_empty() {
        request = request.header("content-type", content_type);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(3),
        client.request(request.body(Full::new(bytes))?),
    )
    .await
    .context("no answer in 3 s")??;
    Ok(response)
}

/// One request; the status code and the JSON body.
async fn call(
    kube: &FakeKube,
    method: &str,
    path: &str,
    content_type: &str,
    body: Value,
) -> anyhow::Result<(u16, Value)> {
    let response = send(kube, method, path, content_type, &body).await?;
    let code = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    let json = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{method} {path}: not JSON: {}",
            String::from_utf8_lossy(&bytes)
        )
    })?;
    Ok((code, json))
}

async fn get(kube: &FakeKube, path: &str) -> anyhow::Result<(u16, Value)> {
    call(kube, "GET", path, "", Value::Null).await
}

fn pod(name: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": "Pending"},
    })
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i["metadata"]["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn store_lists_with_selectors_and_fills_metadata() -> anyhow::Result<()> {
    let kube = FakeKube::start("fake").await?;
    let p1 = kube.put(PODS, pod("p1", "x"));
    kube.put(PODS, pod("p2", "y"));
    kube.put("/api/v1/namespaces/b/pods", pod("p3", "x"));
    assert_eq!(p1["metadata"]["namespace"], "a");
    assert_eq!(p1["metadata"]["generation"], 1);
    assert!(
        p1["metadata"]["uid"]
            .as_str()
            .is_some_and(|u| u.len() == 36)
    );
    assert!(
        p1["metadata"]["creationTimestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );

    let (code, list) = get(&kube, &format!("{PODS}?labelSelector=app%3Dx")).await?;
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "PodList");
    assert_eq!(names(&list), ["p1"]);
    assert_eq!(
        list["metadata"]["resourceVersion"],
        kube.resource_version().to_string()
    );

    let (_, all) = get(&kube, "/api/v1/pods").await?;
    assert_eq!(
        names(&all),
        ["p1", "p2", "p3"],
        "a list without namespace spans them all"
    );
    let (_, set) = get(&kube, "/api/v1/pods?labelSelector=app+in+%28x%29%2C%21gone").await?;
    assert_eq!(names(&set), ["p1", "p3"]);
    let (_, by_name) = get(&kube, "/api/v1/pods?fieldSelector=metadata.name%3Dp2").await?;
    assert_eq!(names(&by_name), ["p2"]);
    let (_, by_node) = get(
        &kube,
        &format!("{PODS}?fieldSelector=spec.nodeName%3Dn1%2Cmetadata.name%21%3Dp1"),
    )
    .await?;
    assert_eq!(names(&by_node), ["p2"]);

    let (code, one) = get(&kube, &format!("{PODS}/p1")).await?;
    assert_eq!(
        (code, one["metadata"]["uid"].clone()),
        (200, p1["metadata"]["uid"].clone())
    );
    let (code, missing) = get(&kube, &format!("{PODS}/nope")).await?;
    assert_eq!((code, missing["reason"].as_str()), (404, Some("NotFound")));
    let (code, _) = get(&kube, "/nothing/here").await?;
    assert_eq!(code, 404);

    let (code, version) = get(&kube, "/version").await?;
    assert_eq!(
        (code, version["gitVersion"].as_str()),
        (200, Some("v1.30.0"))
    );
    let config = std::fs::read_to_string(kube.kubeconfig())?;
    assert!(config.contains(&kube.url()) && config.contains("current-context: \"fake\""));
    Ok(())
}

#[tokio::test]
async fn delete_preconditions_faults_and_eviction() -> anyhow::Result<()> {
    let kube = FakeKube::start("fake").await?;
    let p1 = kube.put(PODS, pod("p1", "x"));
    kube.put(PODS, pod("p2", "x"));
    let uid = p1["metadata"]["uid"].clone();

    let wrong =
        json!({"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": "wrong"}});
    let (code, status) = call(
        &kube,
        "DELETE",
        &format!("{PODS}/p1"),
        "application/json",
        wrong,
    )
    .await?;
    assert_eq!((code, status["reason"].as_str()), (409, Some("Conflict")));
    assert!(
        kube.get(PODS, "p1").is_some(),
        "a failed precondition deletes nothing"
    );

    let right = json!({"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": uid}});
    let (code, deleted) = call(
        &kube,
        "DELETE",
        &format!("{PODS}/p1"),
        "application/json",
        right,
    )
    .await?;
    assert_eq!(
        (code, deleted["metadata"]["name"].as_str()),
        (200, Some("p1"))
    );
    assert!(kube.get(PODS, "p1").is_none());
    let (code, _) = call(&kube, "DELETE", &format!("{PODS}/p1"), "", Value::Null).await?;
    assert_eq!(code, 404);

    kube.fail(Some("DELETE"), PODS, 500, 1);
    let (code, status) = call(&kube, "DELETE", &format!("{PODS}/p2"), "", Value::Null).await?;
    assert_eq!(
        (code, status["reason"].as_str()),
        (500, Some("InternalError"))
    );
    assert!(kube.get(PODS, "p2").is_some());
    let (code, _) = get(&kube, &format!("{PODS}/p2")).await?;
    assert_eq!(code, 200, "the rule is for DELETE only");
    let (code, _) = call(&kube, "DELETE", &format!("{PODS}/p2"), "", Value::Null).await?;
    assert_eq!(code, 200, "one failure, then normal");

    kube.fail(None, "/api/v1/namespaces/a", 403, u32::MAX);
    for _ in 0..2 {
        let (code, status) = get(&kube, PODS).await?;
        assert_eq!((code, status["reason"].as_str()), (403, Some("Forbidden")));
    }
    kube.clear_faults();
    assert_eq!(get(&kube, PODS).await?.0, 200);

    kube.put(PODS, pod("p3", "x"));
    let eviction =
        json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "p3"}});
    let path = format!("{PODS}/p3/eviction");
    let (code, status) = call(&kube, "POST", &path, "application/json", eviction.clone()).await?;
    assert_eq!((code, status["status"].as_str()), (201, Some("Success")));
    assert!(kube.get(PODS, "p3").is_none());
    let (code, _) = call(&kube, "POST", &path, "application/json", eviction).await?;
    assert_eq!(code, 404);

    // Finalizers hold a deletion until they are removed.
    let mut held = pod("p4", "x");
    held["metadata"]["finalizers"] = json!(["guardian.taonode.io/drain"]);
    kube.put(PODS, held);
    let (code, marked) = call(&kube, "DELETE", &format!("{PODS}/p4"), "", Value::Null).await?;
    assert_eq!(code, 200);
    assert!(marked["metadata"]["deletionTimestamp"].is_string());
    assert!(kube.get(PODS, "p4").is_some());
    let patch = json!({"metadata": {"finalizers": null}});
    let (code, _) = call(
        &kube,
        "PATCH",
        &format!("{PODS}/p4"),
        "application/merge-patch+json",
        patch,
    )
    .await?;
    assert_eq!(code, 200);
    assert!(
        kube.get(PODS, "p4").is_none(),
        "the last finalizer gone, the object goes"
    );
    Ok(())
}

#[tokio::test]
async fn access_reviews_follow_the_deny_set() -> anyhow::Result<()> {
    let kube = FakeKube::start("fake").await?;
    kube.deny("delete", "", "pods");
    kube.deny("create", "", "pods/eviction");
    let review = |verb: &str, resource: &str, sub: &str| {
        json!({
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": {
                "namespace": "a", "verb": verb, "group": "", "resource": resource, "subresource": sub,
            }},
        })
    };
    let path = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews";
    let ask = |verb: &'static str, resource: &'static str, sub: &'static str| {
        let kube = &kube;
        let body = review(verb, resource, sub);
        async move {
            let (code, answer) = call(kube, "POST", path, "application/json", body).await?;
            assert_eq!(code, 201);
            assert_eq!(
                answer["spec"]["resourceAttributes"]["verb"], verb,
                "the review is echoed"
            );
            answer["status"]["allowed"]
                .as_bool()
                .context("no status.allowed")
        }
    };
    assert!(!ask("delete", "pods", "").await?);
    assert!(ask("get", "pods", "").await?);
    assert!(!ask("create", "pods", "eviction").await?);
    assert!(ask("create", "pods", "").await?);
    kube.allow("delete", "", "pods");
    assert!(ask("delete", "pods", "").await?);
    assert!(kube.writes().is_empty(), "reviews are not writes");
    assert_eq!(kube.requests().len(), 5);
    Ok(())
}

#[tokio::test]
async fn patches_creates_and_replaces() -> anyhow::Result<()> {
    let kube = FakeKube::start("fake").await?;
    let before = kube.put(PODS, pod("p1", "x"));
    let rv = |v: &Value| {
        v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };

    // A merge patch of /status touches only the status.
    let patch = json!({"status": {"phase": "Running"}, "spec": {"nodeName": "elsewhere"}});
    let (code, after) = call(
        &kube,
        "PATCH",
        &format!("{PODS}/p1/status"),
        "application/merge-patch+json",
        patch,
    )
    .await?;
    assert_eq!(code, 200);
    assert_eq!(after["status"]["phase"], "Running");
    assert_eq!(after["spec"], before["spec"]);
    assert_eq!(after["metadata"]["generation"], 1);
    assert_ne!(rv(&after), rv(&before));
    assert_eq!(kube.get(PODS, "p1"), Some(after.clone()));

    // A spec change through the object bumps the generation; a stale resourceVersion conflicts.
    let patch = json!({"spec": {"nodeName": "n2"}});
    let (code, moved) = call(
        &kube,
        "PATCH",
        &format!("{PODS}/p1"),
        "application/strategic-merge-patch+json",
        patch,
    )
    .await?;
    assert_eq!(
        (code, moved["metadata"]["generation"].as_u64()),
        (200, Some(2))
    );
    let stale =
        json!({"metadata": {"resourceVersion": rv(&before)}, "status": {"phase": "Failed"}});
    let (code, status) = call(
        &kube,
        "PATCH",
        &format!("{PODS}/p1/status"),
        "application/merge-patch+json",
        stale,
    )
    .await?;
    assert_eq!((code, status["reason"].as_str()), (409, Some("Conflict")));

    // JSON patch with test, add, replace and remove.
    let ops = json!([
        {"op": "test", "path": "/spec/nodeName", "value": "n2"},
        {"op": "add", "path": "/metadata/labels/tier", "value": "gpu"},
        {"op": "replace", "path": "/metadata/labels/app", "value": "z"},
        {"op": "remove", "path": "/status/phase"},
    ]);
    let (code, patched) = call(
        &kube,
        "PATCH",
        &format!("{PODS}/p1"),
        "application/json-patch+json",
        ops,
    )
    .await?;
    assert_eq!(code, 200);
    assert_eq!(
        patched["metadata"]["labels"],
        json!({"app": "z", "tier": "gpu"})
    );
    assert_eq!(patched["status"], json!({}));
    let failing = json!([{"op": "test", "path": "/spec/nodeName", "value": "n1"}]);
    let (code, _) = call(
        &kube,
        "PATCH",
        &format!("{PODS}/p1"),
        "application/json-patch+json",
        failing,
    )
    .await?;
    assert_eq!(code, 422);

    // Server-side apply creates what is missing and merges into what exists.
    let applied = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"k": "v"}});
    let cm = "/api/v1/namespaces/a/configmaps/cm?fieldManager=guardian&force=true";
    let (code, created) = call(&kube, "PATCH", cm, "application/apply-patch+yaml", applied).await?;
    assert_eq!((code, created["data"]["k"].as_str()), (201, Some("v")));
    let again = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"k2": "v2"}});
    let (code, merged) = call(&kube, "PATCH", cm, "application/apply-patch+yaml", again).await?;
    assert_eq!(
        (code, merged["data"].clone()),
        (200, json!({"k": "v", "k2": "v2"}))
    );
    let (code, _) = call(
        &kube,
        "PATCH",
        &format!("{PODS}/gone"),
        "application/merge-patch+json",
        json!({}),
    )
    .await?;
    assert_eq!(code, 404);

    // Create: AlreadyExists, generateName.
    let (code, status) = call(&kube, "POST", PODS, "application/json", pod("p1", "x")).await?;
    assert_eq!(
        (code, status["reason"].as_str()),
        (409, Some("AlreadyExists"))
    );
    let event = json!({"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": "guardian-"}, "reason": "Drained"});
    let events = "/api/v1/namespaces/a/events";
    let (code, first) = call(&kube, "POST", events, "application/json", event.clone()).await?;
    let (_, second) = call(&kube, "POST", events, "application/json", event).await?;
    assert_eq!(code, 201);
    let name = first["metadata"]["name"].as_str().context("no name")?;
    assert!(
        name.starts_with("guardian-") && name.len() == "guardian-".len() + 5,
        "{name}"
    );
    assert_ne!(first["metadata"]["name"], second["metadata"]["name"]);
    assert_eq!(kube.list(events).len(), 2);

    // Replace: a stale resourceVersion conflicts, the current one wins.
    let mut current = kube.get(PODS, "p1").context("p1")?;
    current["metadata"]["labels"]["app"] = json!("replaced");
    let mut old = current.clone();
    old["metadata"]["resourceVersion"] = json!(rv(&before));
    let (code, _) = call(&kube, "PUT", &format!("{PODS}/p1"), "application/json", old).await?;
    assert_eq!(code, 409);
    let (code, replaced) = call(
        &kube,
        "PUT",
        &format!("{PODS}/p1"),
        "application/json",
        current,
    )
    .await?;
    assert_eq!(
        (code, replaced["metadata"]["labels"]["app"].as_str()),
        (200, Some("replaced"))
    );

    // What was written is on record, in order; reads are not writes.
    let writes = kube.writes();
    let methods: Vec<&str> = writes.iter().map(|w| w.method.as_str()).collect();
    assert_eq!(
        methods,
        [
            "PATCH", "PATCH", "PATCH", "PATCH", "PATCH", "PATCH", "PATCH", "PATCH", "POST", "POST",
            "POST", "PUT", "PUT"
        ]
    );
    assert_eq!(writes[0].path, format!("{PODS}/p1/status"));
    assert_eq!(writes[0].content_type, "application/merge-patch+json");
    assert_eq!(
        writes[0].json(),
        Some(json!({"status": {"phase": "Running"}, "spec": {"nodeName": "elsewhere"}}))
    );
    assert_eq!(writes[5].param("fieldManager").as_deref(), Some("guardian"));
    assert_eq!(kube.requests().len(), writes.len());
    get(&kube, PODS).await?;
    assert_eq!(kube.requests().len(), writes.len() + 1);
    kube.clear_requests();
    assert!(kube.requests().is_empty());
    Ok(())
}

/// The next watch event, within `within`.
async fn next_event(
    body: &mut Incoming,
    buffer: &mut String,
    within: Duration,
) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some((line, rest)) = buffer.split_once('\n') {
            let event = serde_json::from_str(line)?;
            *buffer = rest.to_owned();
            return Ok(event);
        }
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .context("no watch event in time")?;
        let Some(frame) = frame else {
            bail!("the watch ended")
        };
        if let Ok(data) = frame?.into_data() {
            buffer.push_str(&String::from_utf8_lossy(&data));
        }
    }
}

#[tokio::test]
async fn watch_streams_changes() -> anyhow::Result<()> {
    let kube = FakeKube::start("fake").await?;
    kube.put(PODS, pod("p1", "x"));
    kube.put(PODS, pod("p2", "y"));
    let (_, list) = get(&kube, PODS).await?;
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .context("no rv")?
        .to_owned();

    // Changes made between the list and the watch are replayed from the resourceVersion.
    kube.put(PODS, pod("p3", "x"));
    let path =
        format!("{PODS}?watch=true&labelSelector=app%3Dx&resourceVersion={rv}&timeoutSeconds=5");
    let response = send(&kube, "GET", &path, "", &Value::Null).await?;
    assert_eq!(response.status().as_u16(), 200);
    let mut body = response.into_body();
    let mut buffer = String::new();
    let within = Duration::from_secs(2);
    let added = next_event(&mut body, &mut buffer, within).await?;
    assert_eq!(
        (
            added["type"].as_str(),
            added["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("p3"))
    );

    let patch = json!({"status": {"phase": "Running"}});
    let (code, _) = call(
        &kube,
        "PATCH",
        &format!("{PODS}/p1/status"),
        "application/merge-patch+json",
        patch,
    )
    .await?;
    assert_eq!(code, 200);
    let modified = next_event(&mut body, &mut buffer, within).await?;
    assert_eq!(modified["type"], "MODIFIED");
    assert_eq!(modified["object"]["status"]["phase"], "Running");
    assert_eq!(
        modified["object"]["metadata"]["resourceVersion"],
        kube.resource_version().to_string()
    );

    // p2 does not match the selector; relabelled to match it is ADDED, relabelled away DELETED.
    kube.put(PODS, pod("p2", "y2"));
    kube.put(PODS, pod("p2", "x"));
    let event = next_event(&mut body, &mut buffer, within).await?;
    assert_eq!(
        (
            event["type"].as_str(),
            event["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("p2"))
    );
    kube.put(PODS, pod("p2", "y"));
    assert_eq!(
        next_event(&mut body, &mut buffer, within).await?["type"],
        "DELETED"
    );
    kube.remove(PODS, "p1");
    let gone = next_event(&mut body, &mut buffer, within).await?;
    assert_eq!(
        (
            gone["type"].as_str(),
            gone["object"]["metadata"]["name"].as_str()
        ),
        (Some("DELETED"), Some("p1"))
    );

    // Without a resourceVersion a watch starts with the current objects.
    let response = send(
        &kube,
        "GET",
        &format!("{PODS}?watch=1&timeoutSeconds=1"),
        "",
        &Value::Null,
    )
    .await?;
    let mut body = response.into_body();
    let mut buffer = String::new();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let event = next_event(&mut body, &mut buffer, within).await?;
        assert_eq!(event["type"], "ADDED");
        seen.push(
            event["object"]["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        );
    }
    assert_eq!(seen, ["p2", "p3"]);
    let end = next_event(&mut body, &mut buffer, within).await;
    assert!(
        end.is_err_and(|e| e.to_string().contains("ended")),
        "the watch ends at its timeout"
    );
    Ok(())
}

#[tokio::test]
async fn down_refuses_and_up_serves_the_same_store() -> anyhow::Result<()> {
    let kube = FakeKube::start("fake").await?;
    kube.put(PODS, pod("p1", "x"));
    let watch = send(
        &kube,
        "GET",
        &format!("{PODS}?watch=true&timeoutSeconds=10"),
        "",
        &Value::Null,
    )
    .await?;
    let mut watch = watch.into_body();
    let mut buffer = String::new();
    next_event(&mut watch, &mut buffer, Duration::from_secs(2)).await?;

    kube.down().await;
    assert!(!kube.is_up());
    assert!(
        tokio::net::TcpStream::connect(kube.addr()).await.is_err(),
        "connections are refused"
    );
    assert!(get(&kube, PODS).await.is_err());
    let cut = next_event(&mut watch, &mut buffer, Duration::from_secs(2)).await;
    assert!(cut.is_err(), "open watches are cut");

    kube.up()?;
    kube.up()?;
    let (code, list) = get(&kube, PODS).await?;
    assert_eq!((code, names(&list)), (200, vec!["p1".to_owned()]));

    // A delay holds every answer back.
    kube.delay(Duration::from_millis(300));
    let started = std::time::Instant::now();
    get(&kube, PODS).await?;
    assert!(started.elapsed() >= Duration::from_millis(300));
    kube.delay(Duration::ZERO);
    Ok(())
}
