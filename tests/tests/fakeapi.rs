//! The fake API server against kube-rs's real client, watcher and patch code: what the
//! agent's Kubernetes source relies on must behave here as it does against a real API
//! server.

use std::collections::BTreeSet;
use std::future::Future;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{
    Api, ApiResource, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams, WatchEvent,
    WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Client, Config};
use mycel_tests::fakeapi::FakeApiServer;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// How long any single expectation may take before the test fails. Generous: a re-watch
/// after a cut stream goes through kube's backoff (jittered, growing per failure), and
/// the whole suite shares two cores; passing runs take milliseconds.
const WAIT: Duration = Duration::from_secs(30);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime for the test")
}

/// A kube client built the way the agent builds one: from a kubeconfig file.
async fn client(api: &FakeApiServer) -> (Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("kubeconfig");
    api.write_kubeconfig(&path);
    let kubeconfig = Kubeconfig::read_from(&path).expect("kube reads the written kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube accepts the written kubeconfig");
    assert_eq!(config.default_namespace, "default");
    let client = Client::try_from(config).expect("a client from the kubeconfig");
    (client, dir)
}

fn service(ns: &str, name: &str, port: i32) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": port}]},
    }))
    .expect("a Service")
}

fn pod(ns: &str, name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"node": node}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
    })
}

fn policy_resource() -> ApiResource {
    ApiResource {
        group: "mycel.dev".into(),
        version: "v1alpha1".into(),
        api_version: "mycel.dev/v1alpha1".into(),
        kind: "AuthorizationPolicy".into(),
        plural: "authorizationpolicies".into(),
    }
}

fn names<'a>(objects: impl IntoIterator<Item = &'a ObjectMeta>) -> Vec<String> {
    objects
        .into_iter()
        .map(|m| m.name.clone().unwrap_or_default())
        .collect()
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
}

/// Runs kube's default watcher on all Services, forwarding its events.
fn spawn_service_watcher(client: Client) -> mpsc::UnboundedReceiver<watcher::Event<Service>> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut events = watcher(Api::<Service>::all(client), watcher::Config::default()).boxed();
        while let Some(event) = events.next().await {
            // Errors (the 410, a cut stream) are part of what the tests provoke; the
            // watcher recovers from them by itself.
            if let Ok(event) = event
                && tx.send(event).is_err()
            {
                return;
            }
        }
    });
    rx
}

/// Receives watcher events until one for which `want` returns Some.
async fn next_event<T>(
    rx: &mut mpsc::UnboundedReceiver<watcher::Event<Service>>,
    what: &str,
    mut want: impl FnMut(&watcher::Event<Service>) -> Option<T>,
) -> T {
    within(what, async {
        loop {
            let event = rx
                .recv()
                .await
                .unwrap_or_else(|| panic!("watcher ended while waiting for {what}"));
            if let Some(v) = want(&event) {
                return v;
            }
        }
    })
    .await
}

/// Collects one whole initial listing (Init … InitDone) and returns the names listed.
async fn next_init(
    rx: &mut mpsc::UnboundedReceiver<watcher::Event<Service>>,
    what: &str,
) -> BTreeSet<String> {
    next_event(rx, what, |e| {
        matches!(e, watcher::Event::Init).then_some(())
    })
    .await;
    let mut listed = BTreeSet::new();
    loop {
        match next_event(rx, what, |e| Some(e.clone())).await {
            watcher::Event::InitApply(s) => {
                listed.insert(s.metadata.name.unwrap_or_default());
            }
            watcher::Event::InitDone => return listed,
            other => panic!("unexpected {other:?} during the initial list ({what})"),
        }
    }
}

#[test]
fn kubeconfig_client_lists_and_gets_with_the_api_servers_errors() {
    let api = FakeApiServer::start();
    api.apply(&service("b", "web", 80));
    api.apply(&service("a", "db", 5432));
    api.apply(&service("a", "cache", 6379));
    runtime().block_on(async {
        let (client, _dir) = client(&api).await;
        let all = Api::<Service>::all(client.clone())
            .list(&ListParams::default())
            .await
            .expect("list all services");
        // The API server's key order: namespace, then name.
        assert_eq!(
            names(all.items.iter().map(|s| &s.metadata)),
            ["cache", "db", "web"]
        );
        assert_eq!(
            all.metadata.resource_version,
            Some(api.resource_version().to_string())
        );
        let in_a = Api::<Service>::namespaced(client.clone(), "a")
            .list(&ListParams::default())
            .await
            .expect("list services in a");
        assert_eq!(
            names(in_a.items.iter().map(|s| &s.metadata)),
            ["cache", "db"]
        );

        let web = Api::<Service>::namespaced(client.clone(), "b")
            .get("web")
            .await
            .expect("get b/web");
        let meta = &web.metadata;
        assert_eq!(meta.generation, Some(1));
        assert!(meta.uid.is_some() && meta.creation_timestamp.is_some());
        assert_eq!(web.spec.and_then(|s| s.ports).map(|p| p[0].port), Some(80));

        let missing = Api::<Service>::namespaced(client.clone(), "b")
            .get("nope")
            .await
            .expect_err("b/nope does not exist");
        assert!(
            matches!(&missing, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"),
            "{missing:?}"
        );

        // A client without the kubeconfig's token is turned away.
        let mut config = Config::new(api.url().parse().expect("the server's URL"));
        config.default_namespace = "default".into();
        let stranger = Client::try_from(config).expect("a client without credentials");
        let denied = Api::<Service>::all(stranger)
            .list(&ListParams::default())
            .await
            .expect_err("no token");
        assert!(
            matches!(&denied, kube::Error::Api(s) if s.code == 401),
            "{denied:?}"
        );
    });
    assert_eq!(api.stats("services").lists, 2);
    assert_eq!(api.stats("services").gets, 2);
}

#[test]
fn lists_paginate_and_selectors_filter() {
    let api = FakeApiServer::start();
    let pods: Vec<Value> = (0..1200)
        .map(|i| {
            pod(
                &format!("ns{}", i % 3),
                &format!("p{i:04}"),
                &format!("n{}", i % 4),
            )
        })
        .collect();
    api.apply_many_json(pods);
    assert_eq!(api.len("pods"), 1200);
    runtime().block_on(async {
        let (client, _dir) = client(&api).await;
        let pods = Api::<Pod>::all(client.clone());
        let mut seen = BTreeSet::new();
        let mut token: Option<String> = None;
        let mut page_rvs = BTreeSet::new();
        let mut pages = 0;
        loop {
            let mut lp = ListParams::default().limit(500);
            if let Some(t) = &token {
                lp = lp.continue_token(t);
            }
            let page = pods.list(&lp).await.expect("a page of pods");
            pages += 1;
            assert!(page.items.len() <= 500);
            for p in &page.items {
                assert!(
                    seen.insert(p.metadata.name.clone().unwrap_or_default()),
                    "listed twice"
                );
            }
            page_rvs.insert(page.metadata.resource_version.clone());
            // A change between pages must not change the list's version.
            if pages == 1 {
                api.apply_json(pod("ns0", "late", "n0"));
            }
            token = page.metadata.continue_.filter(|t| !t.is_empty());
            if token.is_none() {
                break;
            }
            assert!(pages < 10, "pagination does not end");
        }
        assert_eq!(pages, 3);
        assert_eq!(
            page_rvs.len(),
            1,
            "every page reports the first page's version"
        );
        assert!(seen.len() >= 1200);

        let on_n1 = pods
            .list(&ListParams::default().fields("spec.nodeName=n1"))
            .await
            .expect("pods on n1");
        assert_eq!(on_n1.items.len(), 300);
        let selected = Api::<Pod>::namespaced(client.clone(), "ns1")
            .list(
                &ListParams::default()
                    .labels("node in (n0,n2),node!=n2")
                    .fields("metadata.name!=p0004"),
            )
            .await
            .expect("pods by label");
        // ns1 holds i ≡ 1 (mod 3); node n0 means i ≡ 0 (mod 4): i ≡ 4 (mod 12), 100 of
        // them, less p0004.
        assert_eq!(selected.items.len(), 99);

        for (labels, fields) in [("", "spec.hostname=x"), ("node>1", ""), ("a in (b", "")] {
            let err = pods
                .list(&ListParams::default().labels(labels).fields(fields))
                .await
                .expect_err("an unsupported selector");
            assert!(
                matches!(&err, kube::Error::Api(s) if s.code == 400),
                "{labels:?} {fields:?}: {err:?}"
            );
        }
    });
    let stats = api.stats("pods");
    // Rejected requests are not counted as served.
    assert_eq!((stats.lists, stats.list_pages), (3, 5));
}

#[test]
fn watcher_sees_changes_bookmarks_and_timeouts() {
    let api = FakeApiServer::start();
    api.set_bookmark_interval(Duration::from_millis(100));
    api.apply(&service("a", "web", 80));
    runtime().block_on(async {
        let (client, _dir) = client(&api).await;
        let mut rx = spawn_service_watcher(client.clone());
        assert_eq!(
            next_init(&mut rx, "the first list").await,
            BTreeSet::from(["web".to_string()])
        );
        let applied = |name: &'static str, port: i32| {
            move |e: &watcher::Event<Service>| match e {
                watcher::Event::Apply(s)
                    if s.metadata.name.as_deref() == Some(name)
                        && s.spec
                            .as_ref()
                            .and_then(|s| s.ports.as_ref())
                            .map(|p| p[0].port)
                            == Some(port) =>
                {
                    Some(s.metadata.clone())
                }
                _ => None,
            }
        };
        api.apply(&service("a", "web", 8080));
        let meta = next_event(&mut rx, "web modified", applied("web", 8080)).await;
        assert_eq!(meta.generation, Some(2));
        api.apply(&service("b", "db", 5432));
        next_event(&mut rx, "db added", applied("db", 5432)).await;
        assert!(api.delete::<Service>("a", "web"));
        next_event(&mut rx, "web deleted", |e| {
            matches!(e, watcher::Event::Delete(s) if s.metadata.name.as_deref() == Some("web"))
                .then_some(())
        })
        .await;
        assert_eq!(api.stats("services").lists, 1, "no relist without a reason");

        // kube's watcher hides bookmarks; a raw watch shows them.
        let services = Api::<Service>::all(client.clone());
        let rv = api.resource_version().to_string();
        let mut stream = services
            .watch(&WatchParams::default().timeout(1), &rv)
            .await
            .expect("a watch")
            .boxed();
        // Nothing changes, so the first event is a bookmark.
        let bookmark = match within("a bookmark", stream.try_next())
            .await
            .expect("watch events")
        {
            Some(WatchEvent::Bookmark(b)) => b,
            Some(other) => panic!("unexpected {other:?} on an idle collection"),
            None => panic!("the watch ended before a bookmark"),
        };
        assert_eq!(bookmark.metadata.resource_version, rv);
        assert_eq!(bookmark.types.kind, "Service");
        // timeoutSeconds=1 ends the stream.
        within("the watch to time out", async {
            while let Some(event) = stream.try_next().await.expect("watch events") {
                assert!(matches!(event, WatchEvent::Bookmark(_)), "{event:?}");
            }
        })
        .await;
    });
}

#[test]
fn compaction_and_a_cut_stream_make_the_watcher_relist() {
    let api = FakeApiServer::start();
    api.apply(&service("a", "one", 80));
    api.apply(&service("a", "two", 80));
    runtime().block_on(async {
        let (client, _dir) = client(&api).await;
        let mut rx = spawn_service_watcher(client);
        let first = next_init(&mut rx, "the first list").await;
        assert_eq!(first, BTreeSet::from(["one".into(), "two".into()]));
        within("the watch to open", async {
            while api.stats("services").open_watches == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;

        // A cut stream alone: the watcher resumes from its version without relisting.
        api.disconnect_watches();
        within("the watch to reopen", async {
            while api.stats("services").watches < 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        api.apply(&service("a", "three", 80));
        next_event(&mut rx, "three after the cut", |e| {
            matches!(e, watcher::Event::Apply(s) if s.metadata.name.as_deref() == Some("three"))
                .then_some(())
        })
        .await;
        assert_eq!(api.stats("services").lists, 1);
        assert_eq!(api.stats("services").watches, 2);

        // Changes the watcher has not seen, then history forgotten and the stream cut:
        // its next watch gets 410 Expired and it must list again.
        api.pause_watches(true);
        api.delete::<Service>("a", "one");
        api.apply(&service("b", "four", 80));
        api.compact();
        api.disconnect_watches();
        api.pause_watches(false);
        let relisted = next_init(&mut rx, "the relist").await;
        assert_eq!(
            relisted,
            BTreeSet::from(["two".into(), "three".into(), "four".into()])
        );
        assert_eq!(api.stats("services").lists, 2);

        // And it keeps watching after the relist.
        api.apply(&service("b", "five", 80));
        next_event(&mut rx, "five after the relist", |e| {
            matches!(e, watcher::Event::Apply(s) if s.metadata.name.as_deref() == Some("five"))
                .then_some(())
        })
        .await;
    });
}

#[test]
fn raw_watch_from_an_expired_version_gets_a_410_error_event() {
    let api = FakeApiServer::start();
    let old = api.apply(&service("a", "one", 80));
    api.apply(&service("a", "two", 80));
    api.compact();
    runtime().block_on(async {
        let (client, _dir) = client(&api).await;
        let mut stream = Api::<Service>::all(client)
            .watch(&WatchParams::default(), &old.to_string())
            .await
            .expect("the watch request itself succeeds, as with the API server")
            .boxed();
        match within("the error event", stream.try_next()).await {
            Ok(Some(WatchEvent::Error(status))) => {
                assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            }
            other => panic!("expected a 410 ERROR event, got {other:?}"),
        }
        assert!(
            within("the end", stream.try_next())
                .await
                .expect("clean end")
                .is_none()
        );
    });
}

#[test]
fn watch_with_a_field_selector_sees_objects_move_in_and_out() {
    let api = FakeApiServer::start();
    api.apply_json(pod("a", "p", "n2"));
    runtime().block_on(async {
        let (client, _dir) = client(&api).await;
        let rv = api.resource_version().to_string();
        let mut stream = Api::<Pod>::all(client)
            .watch(
                &WatchParams::default()
                    .fields("spec.nodeName=n1")
                    .disable_bookmarks(),
                &rv,
            )
            .await
            .expect("a watch")
            .boxed();
        api.apply_json(pod("a", "p", "n1"));
        api.apply_json(pod("a", "other", "n2"));
        api.apply_json(pod("a", "p", "n3"));
        let mut kinds = Vec::new();
        for _ in 0..2 {
            match within("a pod event", stream.try_next())
                .await
                .expect("events")
            {
                Some(WatchEvent::Added(p)) => kinds.push(("ADDED", p.metadata.name)),
                Some(WatchEvent::Deleted(p)) => kinds.push(("DELETED", p.metadata.name)),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            kinds,
            [("ADDED", Some("p".into())), ("DELETED", Some("p".into()))]
        );
    });
}

#[test]
fn patch_status_changes_only_status_and_is_counted() {
    let api = FakeApiServer::start();
    api.apply_json(json!({
        "apiVersion": "mycel.dev/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "allow-web", "namespace": "shop"},
        "spec": {"action": "ALLOW", "rules": []},
    }));
    let before = api
        .get_json("authorizationpolicies", "shop", "allow-web")
        .expect("the policy");
    runtime().block_on(async {
        let (client, _dir) = client(&api).await;
        let policies: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), "shop", &policy_resource());
        let accepted =
            json!({"conditions": [{"type": "Accepted", "status": "True", "reason": "Valid"}]});
        let patched = policies
            .patch_status(
                "allow-web",
                &PatchParams::default(),
                // The spec part must be ignored on the status subresource.
                &Patch::Merge(json!({"status": accepted, "spec": {"action": "DENY"}})),
            )
            .await
            .expect("merge-patch the status");
        assert_eq!(patched.data["status"], accepted);
        assert_eq!(patched.data["spec"]["action"], "ALLOW");

        // The same status again is no change: no new version.
        let rv = api.resource_version();
        policies
            .patch_status(
                "allow-web",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": accepted})),
            )
            .await
            .expect("the same status again");
        assert_eq!(api.resource_version(), rv);

        let rejected =
            json!({"conditions": [{"type": "Accepted", "status": "False", "reason": "BadRule"}]});
        let applied = policies
            .patch_status(
                "allow-web",
                &PatchParams::apply("mycel-agent"),
                &Patch::Apply(json!({
                    "apiVersion": "mycel.dev/v1alpha1", "kind": "AuthorizationPolicy",
                    "status": rejected,
                })),
            )
            .await
            .expect("server-side apply of the status");
        assert_eq!(applied.data["status"], rejected);

        let missing = policies
            .patch_status(
                "nope",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {}})),
            )
            .await
            .expect_err("no such policy");
        assert!(
            matches!(&missing, kube::Error::Api(s) if s.code == 404),
            "{missing:?}"
        );
    });
    let after = api
        .get_json("authorizationpolicies", "shop", "allow-web")
        .expect("the policy");
    assert_eq!(after["status"]["conditions"][0]["reason"], "BadRule");
    assert_eq!(after["spec"], before["spec"]);
    assert_eq!(
        after["metadata"]["generation"],
        before["metadata"]["generation"]
    );
    assert_ne!(
        after["metadata"]["resourceVersion"],
        before["metadata"]["resourceVersion"]
    );
    assert_eq!(api.stats("authorizationpolicies").patches, 4);
    let log = api.patch_log();
    assert_eq!(log.len(), 4);
    assert_eq!(log[0].content_type, "application/merge-patch+json");
    assert_eq!(log[2].content_type, "application/apply-patch+yaml");
    assert_eq!(log[2].field_manager.as_deref(), Some("mycel-agent"));
    assert_eq!(log[0].body["spec"]["action"], "DENY");
}

/// Sends one raw HTTP/1.1 request and returns the status line.
fn raw_status_line(stream: &mut TcpStream, request: &str) -> String {
    stream
        .write_all(request.as_bytes())
        .expect("send a request");
    stream
        .set_read_timeout(Some(WAIT))
        .expect("set a read timeout");
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).expect("read the response");
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn unsupported_methods_and_paths_get_status_errors_and_drop_closes_everything() {
    let api = FakeApiServer::start();
    let addr = api.addr();
    let auth = format!("Authorization: Bearer {}\r\n", api.token());
    let connect = || TcpStream::connect(addr).expect("connect");
    let line = raw_status_line(
        &mut connect(),
        &format!("DELETE /api/v1/namespaces/a/services/x HTTP/1.1\r\nHost: x\r\n{auth}\r\n"),
    );
    assert!(line.contains(" 405 "), "{line}");
    let line = raw_status_line(
        &mut connect(),
        &format!("GET /api/v1/configmaps HTTP/1.1\r\nHost: x\r\n{auth}\r\n"),
    );
    assert!(line.contains(" 404 "), "{line}");
    let line = raw_status_line(
        &mut connect(),
        &format!(
            "PATCH /apis/mycel.dev/v1alpha1/namespaces/a/authorizationpolicies/p/status HTTP/1.1\r\n\
             Host: x\r\n{auth}Content-Type: application/json-patch+json\r\nContent-Length: 2\r\n\r\n[]"
        ),
    );
    assert!(line.contains(" 415 "), "{line}");

    // An open watch ends when the server is dropped, and the port closes.
    let mut watch = TcpStream::connect(addr).expect("connect");
    let line = raw_status_line(
        &mut watch,
        &format!("GET /api/v1/pods?watch=1 HTTP/1.1\r\nHost: x\r\n{auth}\r\n"),
    );
    assert!(line.contains(" 200 "), "{line}");
    drop(api);
    let mut rest = Vec::new();
    // Ends (EOF or reset) instead of hanging until the read timeout.
    let _ = watch.read_to_end(&mut rest);
    assert!(
        TcpStream::connect(addr).is_err(),
        "{addr} still accepts connections after drop"
    );
}

#[test]
fn start_in_netns_listens_inside_the_namespace() {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var("MYCEL_REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
            "start_in_netns needs root"
        );
        eprintln!("skipping start_in_netns_listens_inside_the_namespace: needs root");
        return;
    }
    /// Removes the namespace also when the test fails.
    struct Netns(String);
    impl Drop for Netns {
        fn drop(&mut self) {
            mycel_tests::netns::delete(&self.0);
        }
    }
    let ns = Netns(format!("mycel-fakeapi-{}", std::process::id()));
    mycel_tests::netns::add(&ns.0);
    let api = FakeApiServer::start_in_netns(&ns.0);
    let addr = api.addr();
    let token = api.token().to_string();
    let line = mycel_tests::netns::run_in(&ns.0, move || {
        let mut conn = TcpStream::connect(addr).expect("connect inside the namespace");
        raw_status_line(
            &mut conn,
            &format!("GET /version HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"),
        )
    });
    assert!(line.contains(" 200 "), "{line}");
    // The host's loopback is another one: nothing listens there on that port (unless
    // something unrelated happens to, which a refused connection rules out here).
    if let Ok(mut conn) = TcpStream::connect(addr) {
        let line = raw_status_line(&mut conn, "GET /version HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(
            !line.contains(" 200 "),
            "the server answered on the host: {line}"
        );
    }
    drop(api);
}
