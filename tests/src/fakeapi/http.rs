//! The HTTP side: routing API paths to collections, lists with pagination and
//! selectors, single gets, status patches, and watch streams.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::select::{FieldSelector, Filter, LabelSelector};
use super::store::{Change, ChangeType, KINDS, Key, ResourceKind, index_by_path};
use super::{PatchRecord, Shared, lock};

pub(crate) type Body = BoxBody<Bytes, io::Error>;

/// The API server's limit on request bodies.
const MAX_BODY: usize = 3 * 1024 * 1024;

/// The API server's default watch length when the client sends no `timeoutSeconds`.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// Accepts connections until `stop` fires; each connection is served on its own task.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors and the like: wait instead of spinning.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = &mut stop => return,
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            // A client that goes away mid-request is not the server's problem.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let expected = format!("Bearer {}", shared.token);
    let authorized = req
        .headers()
        .get(AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == expected.as_bytes());
    if !authorized {
        return status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized".into(),
        );
    }
    let path = req.uri().path().to_string();
    let query = Query::parse(req.uri().query().unwrap_or_default());
    if path == "/version" {
        return json_response(
            StatusCode::OK,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-mycel-fake", "platform": "linux/amd64"}),
        );
    }
    if path == "/apis/authentication.k8s.io/v1/tokenreviews" && req.method() == Method::POST {
        return token_review(shared, req).await;
    }
    let Some(route) = Route::parse(&path) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        );
    };
    let method = req.method().clone();
    match (&method, route.name.as_deref(), route.status) {
        (&Method::GET, None, false) => {
            if matches!(query.get("watch"), Some("true" | "1")) {
                watch(shared, &route, &query)
            } else {
                list(shared, &route, &query)
            }
        }
        (&Method::GET, Some(name), _) => get(shared, &route, name),
        (&Method::PATCH, Some(name), true) => patch_status(shared, &route, name, &query, req).await,
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} is not supported on {path} by this server"),
        ),
    }
}

/// `TokenReview`: the tokens [`super::FakeApiServer::add_token`] registered, for the
/// audiences asked (the intersection is reported back, as the API server does).
async fn token_review(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    let mut review: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    let token = review["spec"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let asked: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let known = lock(&shared.tokens).get(&token).cloned();
    let result = match known {
        Some((audiences, user)) => {
            let common: Vec<String> = if asked.is_empty() {
                audiences.clone()
            } else {
                asked
                    .iter()
                    .filter(|a| audiences.contains(a))
                    .cloned()
                    .collect()
            };
            if common.is_empty() {
                json!({"authenticated": false, "error": "token audiences is invalid for the target audiences"})
            } else {
                json!({"authenticated": true, "user": user, "audiences": common})
            }
        }
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    review["status"] = result;
    json_response(StatusCode::CREATED, &review)
}

/// A parsed API path: `/api/v1[/namespaces/{ns}]/{plural}[/{name}[/status]]` or the same
/// under `/apis/{group}/{version}`.
#[derive(Debug)]
struct Route {
    kind: usize,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

impl Route {
    fn parse(path: &str) -> Option<Self> {
        let segments: Vec<String> = path
            .trim_matches('/')
            .split('/')
            .map(percent_decode)
            .collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let (group, version, rest) = match segments.as_slice() {
            ["api", version, rest @ ..] => ("", *version, rest),
            ["apis", group, version, rest @ ..] => (*group, *version, rest),
            _ => return None,
        };
        let kind_at = |plural: &str| index_by_path(group, version, plural);
        let (kind, namespace, tail) = match rest {
            // `namespaces/{ns}/{plural}…` unless this is the namespace object itself
            // (`namespaces/{name}` or `namespaces/{name}/status`).
            ["namespaces", ns, plural, tail @ ..] if kind_at(plural).is_some() => {
                let kind = kind_at(plural)?;
                if !KINDS[kind].namespaced {
                    return None;
                }
                (kind, Some((*ns).to_string()), tail)
            }
            [plural, tail @ ..] => {
                let kind = kind_at(plural)?;
                if KINDS[kind].namespaced && !tail.is_empty() {
                    // A namespaced object needs its namespace in the path.
                    return None;
                }
                (kind, None, tail)
            }
            [] => return None,
        };
        let (name, status) = match tail {
            [] => (None, false),
            [name] => (Some((*name).to_string()), false),
            [name, "status"] if KINDS[kind].has_status => (Some((*name).to_string()), true),
            _ => return None,
        };
        Some(Self {
            kind,
            namespace,
            name,
            status,
        })
    }

    fn key(&self, name: &str) -> Key {
        (self.namespace.clone().unwrap_or_default(), name.to_string())
    }
}

/// Query parameters, percent-decoded. kube sends `?&watch=true…`: empty pairs are skipped.
#[derive(Debug, Default)]
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: &str) -> Self {
        Self(
            query
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

/// Decodes `%XX` escapes and `+` (a space in form encoding); invalid escapes stay as
/// they are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn filter_for(route: &Route, query: &Query) -> Result<Filter, String> {
    let kind = &KINDS[route.kind];
    let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or_default())
        .map_err(|e| format!("unable to parse labelSelector: {e}"))?;
    let fields = FieldSelector::parse(query.get("fieldSelector").unwrap_or_default(), kind)
        .map_err(|e| format!("unable to parse fieldSelector: {e}"))?;
    Ok(Filter {
        namespace: route.namespace.clone(),
        labels,
        fields,
    })
}

fn parse_rv(query: &Query) -> Result<Option<u64>, String> {
    match query.get("resourceVersion") {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| format!("invalid resourceVersion {v:?}: not a number")),
    }
}

fn list(shared: &Shared, route: &Route, query: &Query) -> Response<Body> {
    let kind = &KINDS[route.kind];
    if super::lock(&shared.missing).contains(kind.plural) {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!(
                "the server could not find the requested resource ({})",
                kind.plural
            ),
        );
    }
    let filter = match filter_for(route, query) {
        Ok(f) => f,
        Err(e) => return bad_request(e),
    };
    let limit = match query.get("limit").map(str::parse::<usize>) {
        None | Some(Ok(0)) => usize::MAX,
        Some(Ok(n)) => n,
        Some(Err(_)) => return bad_request("invalid limit: not a number".into()),
    };
    let cont = match query.get("continue").filter(|c| !c.is_empty()) {
        None => None,
        Some(token) => match parse_continue(token) {
            Some(c) => Some(c),
            None => return bad_request(format!("continue key is not valid: {token:?}")),
        },
    };
    let rv = match parse_rv(query) {
        Ok(rv) => rv,
        Err(e) => return bad_request(e),
    };
    let rv_match = query.get("resourceVersionMatch").filter(|m| !m.is_empty());
    if let Some(m) = rv_match {
        if rv.is_none() {
            return bad_request(
                "resourceVersionMatch is forbidden unless resourceVersion is provided".into(),
            );
        }
        if !matches!(m, "NotOlderThan" | "Exact") {
            return bad_request(format!("invalid resourceVersionMatch {m:?}"));
        }
    }
    let (items, list_rv, next) = {
        let store = lock(&shared.store);
        let collection = &store.collections[route.kind];
        if let Some((token_rv, _)) = &cont
            && *token_rv < collection.oldest_rv
        {
            return status(
                StatusCode::GONE,
                "Expired",
                "The provided continue parameter is too old to display a consistent list result. \
                 You can start a new list without the continue parameter."
                    .into(),
            );
        }
        // Lists are served from the current state; an exact older snapshot is not kept.
        if cont.is_none()
            && rv_match == Some("Exact")
            && let Some(want) = rv
            && want != store.rv
        {
            return status(
                StatusCode::GONE,
                "Expired",
                format!("too old resource version: {want} ({})", store.rv),
            );
        }
        // Every page of one list reports the first page's version, so a watch from it
        // replays whatever changed while the client was paging.
        let list_rv = cont.as_ref().map_or(store.rv, |(rv, _)| *rv);
        let start = match (&cont, &route.namespace) {
            (Some((_, key)), _) => std::ops::Bound::Excluded(key.clone()),
            (None, Some(ns)) => std::ops::Bound::Included((ns.clone(), String::new())),
            (None, None) => std::ops::Bound::Unbounded,
        };
        let mut items = Vec::new();
        let mut next = None;
        for (key, object) in collection
            .objects
            .range((start, std::ops::Bound::Unbounded))
        {
            if route.namespace.as_ref().is_some_and(|ns| *ns != key.0) {
                break;
            }
            if items.len() == limit {
                next = items
                    .last()
                    .map(|(k, _): &(Key, _)| continue_token(list_rv, k));
                break;
            }
            if filter.matches(object) {
                items.push((key.clone(), Arc::clone(object)));
            }
        }
        (items, list_rv, next)
    };
    {
        let mut stats = lock(&shared.stats);
        stats[route.kind].list_pages += 1;
        if cont.is_none() {
            stats[route.kind].lists += 1;
        }
    }
    // Serialized outside the lock, straight into one buffer: linear in the page size.
    let mut body = Vec::with_capacity(256 + items.len() * 1024);
    body.extend_from_slice(b"{\"kind\":");
    write_json(&mut body, &format!("{}List", kind.kind));
    body.extend_from_slice(b",\"apiVersion\":");
    write_json(&mut body, &kind.api_version());
    body.extend_from_slice(b",\"metadata\":{\"resourceVersion\":");
    write_json(&mut body, &list_rv.to_string());
    if let Some(token) = &next {
        body.extend_from_slice(b",\"continue\":");
        write_json(&mut body, token);
    }
    body.extend_from_slice(b"},\"items\":[");
    for (i, (_, object)) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        write_json(&mut body, &**object);
    }
    body.extend_from_slice(b"]}");
    bytes_response(StatusCode::OK, body)
}

fn continue_token(rv: u64, key: &Key) -> String {
    format!("{rv}/{}/{}", key.0, key.1)
}

fn parse_continue(token: &str) -> Option<(u64, Key)> {
    let mut parts = token.splitn(3, '/');
    let rv = parts.next()?.parse().ok()?;
    let ns = parts.next()?.to_string();
    let name = parts.next()?.to_string();
    Some((rv, (ns, name)))
}

fn get(shared: &Shared, route: &Route, name: &str) -> Response<Body> {
    let object = lock(&shared.store).collections[route.kind]
        .objects
        .get(&route.key(name))
        .cloned();
    lock(&shared.stats)[route.kind].gets += 1;
    match object {
        Some(object) => {
            let mut body = Vec::new();
            write_json(&mut body, &*object);
            bytes_response(StatusCode::OK, body)
        }
        None => not_found(&KINDS[route.kind], name),
    }
}

async fn patch_status(
    shared: &Shared,
    route: &Route,
    name: &str,
    query: &Query,
    req: Request<Incoming>,
) -> Response<Body> {
    let kind = &KINDS[route.kind];
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim().to_string())
        .unwrap_or_default();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return bad_request(format!("cannot read the request body: {e}")),
    };
    lock(&shared.stats)[route.kind].patches += 1;
    let parsed: Result<Value, String> = match content_type.as_str() {
        "application/merge-patch+json" => {
            serde_json::from_slice(&body).map_err(|e| format!("invalid merge patch JSON: {e}"))
        }
        // YAML is a superset of JSON; kube sends apply patches as JSON.
        "application/apply-patch+yaml" => {
            serde_yaml_ng::from_slice(&body).map_err(|e| format!("invalid apply patch YAML: {e}"))
        }
        other => {
            return status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format: {other:?} \
                     (this server accepts application/merge-patch+json and application/apply-patch+yaml)"
                ),
            );
        }
    };
    let patch = match parsed {
        Ok(p) => p,
        Err(e) => return bad_request(e),
    };
    lock(&shared.patch_log).push(PatchRecord {
        collection: kind.plural.to_string(),
        namespace: route.namespace.clone().unwrap_or_default(),
        name: name.to_string(),
        content_type: content_type.clone(),
        field_manager: query.get("fieldManager").map(str::to_string),
        body: patch.clone(),
    });
    let apply = content_type == "application/apply-patch+yaml";
    if apply && query.get("fieldManager").is_none_or(str::is_empty) {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "PatchOptions.meta.k8s.io is invalid: fieldManager: Required value: is required for apply patch".into(),
        );
    }
    if !patch.is_object() {
        return bad_request("the patch must be a JSON object".into());
    }
    let key = route.key(name);
    let updated = {
        let mut store = lock(&shared.store);
        let Some(current) = store.collections[route.kind].objects.get(&key).cloned() else {
            drop(store);
            return not_found(kind, name);
        };
        let new_status = if apply {
            // Server-side apply of the status subresource, simplified: the applied
            // status replaces the stored one (no field ownership).
            patch.get("status").cloned()
        } else {
            // RFC 7386 on the whole object, of which the status subresource keeps only
            // `status`, as the API server ignores other changes there.
            let mut merged = (*current).clone();
            merge_patch(&mut merged, &patch);
            merged.get("status").cloned()
        };
        store.set_status(route.kind, &key, new_status)
    };
    shared.notify_change();
    match updated {
        Some(object) => {
            let mut body = Vec::new();
            write_json(&mut body, &*object);
            bytes_response(StatusCode::OK, body)
        }
        None => not_found(kind, name),
    }
}

/// RFC 7386 JSON merge patch.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(target) = target {
        for (k, v) in patch {
            if v.is_null() {
                target.remove(k);
            } else {
                merge_patch(target.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Where a watch starts.
enum WatchStart {
    /// `resourceVersion` unset or "0": the current objects as ADDED events, then changes.
    Current,
    /// Changes after this version.
    After(u64),
}

struct WatchSpec {
    kind: usize,
    filter: Filter,
    start: WatchStart,
    bookmarks: bool,
    /// `sendInitialEvents=true`: a BOOKMARK annotated `k8s.io/initial-events-end` follows
    /// the initial objects (kube's streaming-list watcher waits for it).
    initial_events_end: bool,
    timeout: Duration,
}

fn watch(shared: &Arc<Shared>, route: &Route, query: &Query) -> Response<Body> {
    let filter = match filter_for(route, query) {
        Ok(f) => f,
        Err(e) => return bad_request(e),
    };
    let rv = match parse_rv(query) {
        Ok(rv) => rv,
        Err(e) => return bad_request(e),
    };
    let timeout = match query.get("timeoutSeconds").map(str::parse::<u64>) {
        None => DEFAULT_WATCH_TIMEOUT,
        Some(Ok(s)) => Duration::from_secs(s),
        Some(Err(_)) => return bad_request("invalid timeoutSeconds: not a number".into()),
    };
    let send_initial = query.flag("sendInitialEvents");
    if send_initial && query.get("resourceVersionMatch") != Some("NotOlderThan") {
        return bad_request("sendInitialEvents requires resourceVersionMatch=NotOlderThan".into());
    }
    let start = match rv {
        None | Some(0) => WatchStart::Current,
        Some(_) if send_initial => WatchStart::Current,
        Some(rv) => WatchStart::After(rv),
    };
    let spec = WatchSpec {
        kind: route.kind,
        filter,
        start,
        bookmarks: query.flag("allowWatchBookmarks"),
        initial_events_end: send_initial,
        timeout,
    };
    {
        let mut stats = lock(&shared.stats);
        stats[route.kind].watches += 1;
        stats[route.kind].open_watches += 1;
    }
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(64);
    tokio::spawn(run_watch(Arc::clone(shared), spec, tx));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item.map(Frame::data), rx))
    });
    let body = http_body_util::BodyExt::boxed(StreamBody::new(stream));
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Decrements the open-watch gauge however the watch ends.
struct OpenWatch<'a> {
    shared: &'a Shared,
    kind: usize,
}

impl Drop for OpenWatch<'_> {
    fn drop(&mut self) {
        lock(&self.shared.stats)[self.kind].open_watches -= 1;
    }
}

async fn run_watch(shared: Arc<Shared>, spec: WatchSpec, tx: mpsc::Sender<io::Result<Bytes>>) {
    let _open = OpenWatch {
        shared: &shared,
        kind: spec.kind,
    };
    let kind = &KINDS[spec.kind];
    let mut changes = shared.changes.subscribe();
    let mut disconnects = shared.disconnects.subscribe();
    let mut paused = shared.paused.subscribe();
    changes.borrow_and_update();
    disconnects.borrow_and_update();
    let deadline = Instant::now() + spec.timeout;

    let start: Result<(u64, Vec<Bytes>), Bytes> = {
        let store = lock(&shared.store);
        let collection = &store.collections[spec.kind];
        match spec.start {
            WatchStart::Current => {
                let mut lines = Vec::new();
                for object in collection.objects.values() {
                    if spec.filter.matches(object) {
                        lines.push(event_line("ADDED", object));
                    }
                }
                if spec.initial_events_end {
                    lines.push(bookmark_line(kind, store.rv, true));
                }
                Ok((store.rv, lines))
            }
            WatchStart::After(rv) if rv < collection.oldest_rv => {
                Err(expired_line(rv, collection.oldest_rv))
            }
            WatchStart::After(rv) => Ok((rv, Vec::new())),
        }
    };
    let (mut cursor, initial) = match start {
        Ok(start) => start,
        Err(expired) => {
            let _ = tx.send(Ok(expired)).await;
            return;
        }
    };
    for line in initial {
        if tx.send(Ok(line)).await.is_err() {
            return;
        }
    }

    let mut next_bookmark = Instant::now() + shared.bookmark_interval();
    loop {
        let is_paused = *paused.borrow_and_update();
        if !is_paused {
            changes.borrow_and_update();
            let batch: Result<Vec<Change>, Bytes> = {
                let store = lock(&shared.store);
                let collection = &store.collections[spec.kind];
                if cursor < collection.oldest_rv {
                    // History this watch had not sent yet was forgotten (compaction or
                    // the history limit): the client must relist, as with a real API
                    // server whose watch cache has moved on.
                    Err(expired_line(cursor, collection.oldest_rv))
                } else {
                    let from = collection.history.partition_point(|c| c.rv <= cursor);
                    let batch = collection.history.range(from..).cloned().collect();
                    cursor = cursor.max(store.rv);
                    Ok(batch)
                }
            };
            match batch {
                Ok(batch) => {
                    for change in &batch {
                        if let Some(kind) = visible_as(change, &spec.filter)
                            && tx.send(Ok(event_line(kind, &change.object))).await.is_err()
                        {
                            return;
                        }
                    }
                }
                Err(expired) => {
                    let _ = tx.send(Ok(expired)).await;
                    return;
                }
            }
        }
        let bookmark_due = async {
            if spec.bookmarks && !is_paused {
                tokio::time::sleep_until(next_bookmark).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = paused.changed() => {}
            _ = disconnects.changed() => {
                // An error from the body makes hyper drop the connection without the
                // final chunk: the client sees the stream cut, not a clean end.
                let _ = tx.send(Err(io::Error::other("watch stream cut by disconnect_watches()"))).await;
                return;
            }
            () = bookmark_due => {
                if tx.send(Ok(bookmark_line(kind, cursor, false))).await.is_err() {
                    return;
                }
                next_bookmark = Instant::now() + shared.bookmark_interval();
            }
            () = tokio::time::sleep_until(deadline) => return,
            () = tx.closed() => return,
        }
    }
}

/// How a change looks through the watch's filter: a modification that makes an object
/// match (or stop matching) is ADDED (or DELETED), as the API server reports it.
fn visible_as(change: &Change, filter: &Filter) -> Option<&'static str> {
    let now = filter.matches(&change.object);
    match change.kind {
        ChangeType::Added => now.then_some("ADDED"),
        ChangeType::Deleted => now.then_some("DELETED"),
        ChangeType::Modified => {
            let before = change.previous.as_ref().is_some_and(|p| filter.matches(p));
            match (before, now) {
                (true, true) => Some("MODIFIED"),
                (false, true) => Some("ADDED"),
                (true, false) => Some("DELETED"),
                (false, false) => None,
            }
        }
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = Vec::with_capacity(1024);
    line.extend_from_slice(b"{\"type\":\"");
    line.extend_from_slice(kind.as_bytes());
    line.extend_from_slice(b"\",\"object\":");
    write_json(&mut line, object);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

fn bookmark_line(kind: &ResourceKind, rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": kind.kind, "apiVersion": kind.api_version(), "metadata": metadata}),
    )
}

/// The API server's answer to a watch from a version it no longer has: HTTP 200 and one
/// ERROR event carrying a 410 `Status`. (kube's watcher relists on exactly this; an HTTP
/// 410 response to the watch request would make it retry the same version instead.)
fn expired_line(rv: u64, oldest: u64) -> Bytes {
    event_line(
        "ERROR",
        &status_json(
            StatusCode::GONE,
            "Expired",
            &format!("too old resource version: {rv} ({oldest})"),
        ),
    )
}

fn write_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Serializing a `Value` or a string into memory cannot fail.
    if let Err(e) = serde_json::to_writer(&mut *out, value) {
        unreachable!("serializing JSON into memory failed: {e}");
    }
}

fn status_json(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    json_response(code, &status_json(code, reason, &message))
}

fn bad_request(message: String) -> Response<Body> {
    status(StatusCode::BAD_REQUEST, "BadRequest", message)
}

fn not_found(kind: &ResourceKind, name: &str) -> Response<Body> {
    let resource = if kind.group.is_empty() {
        kind.plural.to_string()
    } else {
        format!("{}.{}", kind.plural, kind.group)
    };
    let mut body = status_json(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{resource} \"{name}\" not found"),
    );
    body["details"] = json!({"name": name, "group": kind.group, "kind": kind.plural});
    json_response(StatusCode::NOT_FOUND, &body)
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let mut body = Vec::new();
    write_json(&mut body, value);
    bytes_response(code, body)
}

fn bytes_response(code: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

impl Shared {
    fn bookmark_interval(&self) -> Duration {
        Duration::from_millis(self.bookmark_interval_ms.load(Ordering::Relaxed).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = Route::parse("/api/v1/services").expect("all services");
        assert_eq!(
            (KINDS[r.kind].plural, r.namespace, r.name),
            ("services", None, None)
        );
        let r = Route::parse("/apis/discovery.k8s.io/v1/namespaces/a/endpointslices/x")
            .expect("one slice");
        assert_eq!(
            (
                KINDS[r.kind].plural,
                r.namespace.as_deref(),
                r.name.as_deref()
            ),
            ("endpointslices", Some("a"), Some("x"))
        );
        let r = Route::parse("/api/v1/namespaces/kube-system").expect("a namespace");
        assert_eq!(
            (KINDS[r.kind].plural, r.name.as_deref()),
            ("namespaces", Some("kube-system"))
        );
        let r = Route::parse("/api/v1/namespaces/kube-system/status").expect("namespace status");
        assert!(r.status);
        let r =
            Route::parse("/apis/mycel.dev/v1alpha1/namespaces/n/authorizationpolicies/p/status")
                .expect("policy status");
        assert!(r.status);
        for bad in [
            "/api/v1/configmaps",
            "/api/v1/services/x",
            "/api/v2/services",
            "/apis/discovery.k8s.io/v1/namespaces/a/endpointslices/x/status",
            "/api/v1/namespaces/a/namespaces",
            "/healthz",
        ] {
            assert!(Route::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn query_decoding() {
        let q = Query::parse(
            "&watch=true&fieldSelector=spec.nodeName%3Dn1&labelSelector=a+in+%28x%2Cy%29&bad=%zz",
        );
        assert_eq!(q.get("fieldSelector"), Some("spec.nodeName=n1"));
        assert_eq!(q.get("labelSelector"), Some("a in (x,y)"));
        assert_eq!(q.get("bad"), Some("%zz"));
        assert!(q.flag("watch"));
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
    }

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut target = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut target, &json!({"a": "z", "c": {"f": null}, "n": [1]}));
        assert_eq!(target, json!({"a": "z", "c": {"d": "e"}, "n": [1]}));
    }
}
