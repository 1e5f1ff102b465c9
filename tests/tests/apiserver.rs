//! The Kubernetes API stand-in driven by a real kube-rs 5 client: chunked lists,
//! the runtime watcher (initial list, file edits as events, 410 relist, bookmarks,
//! outages, streaming lists), selectors, errors, and a listener inside a test-bed
//! node's netns used by a client in that netns.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Config, ResourceExt};
use zt_testbed::{ApiServer, Verb};

const WAIT: Duration = Duration::from_secs(10);

fn pod(ns: &str, name: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec:\n  nodeName: n1\n  containers: [{{name: main, image: x}}]\nstatus:\n  podIPs: [{{ip: 10.1.0.1}}]\n"
    )
}

/// A private manifests dir with 5 pods in x, 2 in y, a Node, a NetworkPolicy, a
/// ZeroTrustPolicy and a ConfigMap (ignored), served by a stand-in.
struct Cluster {
    api: ApiServer,
    addr: std::net::SocketAddr,
    kubeconfig: PathBuf,
    dir: PathBuf,
    // Dropped after `api` (fields drop in order), so the server never sees it vanish.
    _cleanup: RemoveDir,
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Cluster {
    fn new(name: &str) -> Cluster {
        let dir =
            std::env::temp_dir().join(format!("zt-apiserver-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut docs = vec![];
        for i in 1..=5 {
            docs.push(pod("x", &format!("a{i}"), &format!("app: a{i}, tier: web")));
        }
        docs.push(pod("y", "b1", "app: b1"));
        docs.push(pod("y", "b2", "app: b2"));
        std::fs::write(dir.join("pods.yaml"), docs.join("---\n")).unwrap();
        std::fs::write(
            dir.join("other.yml"),
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n---\n\
             apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, namespace: x}\nspec: {podSelector: {}}\n---\n\
             apiVersion: zt.dev/v1alpha1\nkind: ZeroTrustPolicy\nmetadata: {name: z, namespace: y}\nspec: {}\n---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata: {name: s}\n",
        )
        .unwrap();
        let api = ApiServer::start(&dir).unwrap();
        let l = api.listen_in(None).unwrap();
        let kubeconfig = api.kubeconfig(&l).unwrap();
        Cluster {
            api,
            addr: l.addr,
            kubeconfig,
            _cleanup: RemoveDir(dir.clone()),
            dir,
        }
    }

    /// Replace a manifest atomically (a hidden temp file is not read).
    fn write(&self, name: &str, text: &str) {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.join(name)).unwrap();
    }

    fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.join(name)).unwrap();
    }

    async fn client(&self) -> Client {
        client_from(&self.kubeconfig).await
    }
}

async fn config_from(kubeconfig: &Path) -> Config {
    let kc = Kubeconfig::read_from(kubeconfig).unwrap();
    Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap()
}

async fn client_from(kubeconfig: &Path) -> Client {
    Client::try_from(config_from(kubeconfig).await).unwrap()
}

fn api_code(e: &kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn describe(ev: &Result<watcher::Event<Pod>, watcher::Error>) -> String {
    let key = |p: &Pod| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
    match ev {
        Ok(watcher::Event::Init) => "Init".into(),
        Ok(watcher::Event::InitApply(p)) => format!("InitApply {}", key(p)),
        Ok(watcher::Event::InitDone) => "InitDone".into(),
        Ok(watcher::Event::Apply(p)) => format!("Apply {} {:?}", key(p), p.labels().get("app")),
        Ok(watcher::Event::Delete(p)) => format!("Delete {}", key(p)),
        Err(e) => format!("Err {e}"),
    }
}

/// Read watcher events until one described as `want` (prefix) arrives; returns all
/// descriptions seen. Panics with them after `WAIT`.
async fn until<S>(s: &mut S, want: &str) -> Vec<String>
where
    S: Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Unpin,
{
    let deadline = Instant::now() + WAIT;
    let mut seen = vec![];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.next()).await {
            Ok(Some(ev)) => {
                let d = describe(&ev);
                seen.push(d.clone());
                if d.starts_with(want) {
                    return seen;
                }
            }
            Ok(None) => panic!("watcher ended; seen {seen:#?}"),
            Err(_) => panic!("no {want:?} within {WAIT:?}; seen {seen:#?}"),
        }
    }
}

/// Events that arrive within `d` (for "nothing happens" checks).
async fn quiet<S>(s: &mut S, d: Duration) -> Vec<String>
where
    S: Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Unpin,
{
    let mut seen = vec![];
    let deadline = tokio::time::Instant::now() + d;
    while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, s.next()).await {
        seen.push(describe(&ev));
    }
    seen
}

#[tokio::test]
async fn lists_gets_selectors_and_errors() {
    let c = Cluster::new("lists");
    let client = c.client().await;
    let pods: Api<Pod> = Api::all(client.clone());

    // Chunked list: pages of 2 with continue tokens, in key order.
    let mut names = vec![];
    let mut lp = ListParams::default().limit(2);
    let mut pages = 0;
    let mut first_rv = None;
    loop {
        let page = pods.list(&lp).await.unwrap();
        pages += 1;
        assert!(page.items.len() <= 2);
        let rv = page.metadata.resource_version.clone().unwrap();
        assert_eq!(
            *first_rv.get_or_insert(rv.clone()),
            rv,
            "all pages are one snapshot"
        );
        names.extend(
            page.items
                .iter()
                .map(|p| format!("{}/{}", p.namespace().unwrap(), p.name_any())),
        );
        match page.metadata.continue_.filter(|t| !t.is_empty()) {
            Some(t) => lp = lp.continue_token(&t),
            None => break,
        }
    }
    assert_eq!(
        names,
        ["x/a1", "x/a2", "x/a3", "x/a4", "x/a5", "y/b1", "y/b2"]
    );
    assert_eq!(pages, 4);
    assert_eq!(c.api.requests("pods", Verb::List), 4);

    // Namespaced list, single get, server-filled fields.
    let y: Api<Pod> = Api::namespaced(client.clone(), "y");
    assert_eq!(y.list(&ListParams::default()).await.unwrap().items.len(), 2);
    let a1 = Api::<Pod>::namespaced(client.clone(), "x")
        .get("a1")
        .await
        .unwrap();
    assert_eq!(
        a1.metadata.uid.as_deref(),
        Some(zt_testbed::manifest::fake_uid("x", "a1").as_str())
    );
    assert!(a1.metadata.creation_timestamp.is_some());
    assert!(a1.metadata.resource_version.is_some());
    let e = Api::<Pod>::namespaced(client.clone(), "x")
        .get("nope")
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), 404);

    // Namespaces exist for every namespace in use, with the name label.
    let nss = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    let ns_names: Vec<String> = nss.items.iter().map(|n| n.name_any()).collect();
    assert_eq!(ns_names, ["default", "kube-system", "x", "y"]);
    for n in &nss.items {
        assert_eq!(
            n.labels().get("kubernetes.io/metadata.name"),
            Some(&n.name_any())
        );
    }
    assert_eq!(
        Api::<Node>::all(client.clone())
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    let nps = Api::<NetworkPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(nps.items[0].name_any(), "np");
    let ztp = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("zt.dev", "v1alpha1", "ZeroTrustPolicy"),
        "zerotrustpolicies",
    );
    let ztps: Api<DynamicObject> = Api::all_with(client.clone(), &ztp);
    let z = ztps.list(&ListParams::default()).await.unwrap();
    assert_eq!(z.items.len(), 1);
    assert_eq!(z.items[0].namespace().as_deref(), Some("y"));

    // rv=0 ("any") lists; /version; unknown paths are 404 Status.
    let any = pods.list(&ListParams::default().match_any()).await.unwrap();
    assert_eq!(any.items.len(), 7);
    assert_eq!(client.apiserver_version().await.unwrap().major, "1");
    // Discovery: the CRD's group is served.
    let d = kube::discovery::Discovery::new(client.clone())
        .run()
        .await
        .unwrap();
    let (ar, caps) = d
        .resolve_gvk(&GroupVersionKind::gvk(
            "zt.dev",
            "v1alpha1",
            "ZeroTrustPolicy",
        ))
        .unwrap();
    assert_eq!(
        (ar.plural.as_str(), caps.scope),
        ("zerotrustpolicies", kube::discovery::Scope::Namespaced)
    );
    assert!(d.has_group("networking.k8s.io"));
    let req = http::Request::get("/api/v1/configmaps").body(vec![]).unwrap();
    assert_eq!(api_code(&client.request_text(req).await.unwrap_err()), 404);
    let req = http::Request::get("/api/v1/namespaces/x/nodes")
        .body(vec![])
        .unwrap();
    assert_eq!(api_code(&client.request_text(req).await.unwrap_err()), 404);

    // Selectors: equality ones work, others are rejected naming the parameter.
    let web = pods
        .list(&ListParams::default().labels("tier=web,app!=a2"))
        .await
        .unwrap();
    assert_eq!(web.items.len(), 4);
    let on_n1 = pods
        .list(&ListParams::default().fields("spec.nodeName=n1"))
        .await
        .unwrap();
    assert_eq!(on_n1.items.len(), 7);
    let e = pods
        .list(&ListParams::default().labels("app in (a1)"))
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), 400);
    assert!(e.to_string().contains("labelSelector"), "{e}");
    let e = pods
        .list(&ListParams::default().fields("spec.hostname=x"))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("fieldSelector") && e.to_string().contains("spec.hostname"),
        "{e}"
    );

    // An expired continue token is 410 (after compaction), like etcd's.
    let page = pods.list(&ListParams::default().limit(3)).await.unwrap();
    c.api.compact();
    let e = pods
        .list(
            &ListParams::default()
                .limit(3)
                .continue_token(page.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), 410);

    // No token, a wrong token: 401.
    let mut cfg = config_from(&c.kubeconfig).await;
    cfg.auth_info.token = Some("wrong".to_string().into());
    let bad: Api<Pod> = Api::all(Client::try_from(cfg).unwrap());
    assert_eq!(
        api_code(&bad.list(&ListParams::default()).await.unwrap_err()),
        401
    );
    let before = c.api.request_log().len();
    let mut cfg = config_from(&c.kubeconfig).await;
    cfg.auth_info.token = None;
    let anon: Api<Pod> = Api::all(Client::try_from(cfg).unwrap());
    assert_eq!(
        api_code(&anon.list(&ListParams::default()).await.unwrap_err()),
        401
    );
    assert_eq!(c.api.request_log().len(), before + 1);
}

fn service(ns: &str, name: &str, cluster_ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  clusterIP: {cluster_ip}\n  selector: {{app: {name}}}\n  ports: [{{name: http, port: 8000, targetPort: http}}]\n"
    )
}

fn endpoint_slice(ns: &str, name: &str, service: &str, address: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}, namespace: {ns}, labels: {{kubernetes.io/service-name: {service}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 80}}]\n\
         endpoints: [{{addresses: [{address}], conditions: {{ready: true}}, nodeName: n1}}]\n"
    )
}

/// Services (v1) and EndpointSlices (discovery.k8s.io/v1) as zt-agent reads them: typed
/// lists with the API server's defaults, discovery, selectors, and the runtime watcher
/// following EndpointSlice edits.
#[tokio::test]
async fn services_and_endpoint_slices_list_and_watch() {
    let c = Cluster::new("services");
    c.write(
        "services.yaml",
        &[
            service("x", "web", "10.96.0.5"),
            service("y", "db", "10.96.0.6"),
            endpoint_slice("x", "web-abc", "web", "10.1.0.1"),
            endpoint_slice("y", "db-abc", "db", "10.1.0.2"),
        ]
        .join("---\n"),
    );
    c.api.sync_now().unwrap();
    let client = c.client().await;

    let svcs: Api<Service> = Api::all(client.clone());
    let list = svcs.list(&ListParams::default()).await.unwrap();
    let names: Vec<String> = list.items.iter().map(|s| format!("{}/{}", s.namespace().unwrap(), s.name_any())).collect();
    assert_eq!(names, ["x/web", "y/db"]);
    let spec = list.items[0].spec.as_ref().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(spec.cluster_ips.as_deref(), Some(&["10.96.0.5".to_string()][..]));
    let port = &spec.ports.as_ref().unwrap()[0];
    assert_eq!((port.port, port.protocol.as_deref()), (8000, Some("TCP")));
    assert_eq!(
        port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("http".into()))
    );
    let by_ip = svcs.list(&ListParams::default().fields("spec.clusterIP=10.96.0.6")).await.unwrap();
    assert_eq!(by_ip.items.iter().map(|s| s.name_any()).collect::<Vec<_>>(), ["db"]);
    assert_eq!(Api::<Service>::namespaced(client.clone(), "x").get("web").await.unwrap().name_any(), "web");

    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "x");
    let web = slices.list(&ListParams::default().labels("kubernetes.io/service-name=web")).await.unwrap();
    assert_eq!(web.items.len(), 1);
    assert_eq!(web.items[0].address_type, "IPv4");
    assert_eq!(web.items[0].endpoints[0].addresses, ["10.1.0.1"]);
    assert_eq!(web.items[0].ports.as_ref().unwrap()[0].protocol.as_deref(), Some("TCP"));

    // Discovery names both resources.
    let d = kube::discovery::Discovery::new(client.clone()).run().await.unwrap();
    let (ar, caps) = d.resolve_gvk(&GroupVersionKind::gvk("discovery.k8s.io", "v1", "EndpointSlice")).unwrap();
    assert_eq!((ar.plural.as_str(), caps.scope), ("endpointslices", kube::discovery::Scope::Namespaced));
    let (ar, _) = d.resolve_gvk(&GroupVersionKind::gvk("", "v1", "Service")).unwrap();
    assert_eq!(ar.plural, "services");

    // The runtime watcher, as the agent runs it: the list, then edits as events.
    let describe = |ev: watcher::Event<EndpointSlice>| match ev {
        watcher::Event::Init => "Init".to_string(),
        watcher::Event::InitApply(e) => format!("InitApply {}/{}", e.namespace().unwrap(), e.name_any()),
        watcher::Event::InitDone => "InitDone".to_string(),
        watcher::Event::Apply(e) => format!("Apply {}/{} {}", e.namespace().unwrap(), e.name_any(), e.endpoints[0].addresses[0]),
        watcher::Event::Delete(e) => format!("Delete {}/{}", e.namespace().unwrap(), e.name_any()),
    };
    let mut w = watcher(Api::<EndpointSlice>::all(client.clone()), watcher::Config::default()).default_backoff().boxed();
    let mut next = async || describe(tokio::time::timeout(WAIT, w.next()).await.unwrap().unwrap().unwrap());
    assert_eq!(
        [next().await, next().await, next().await, next().await],
        ["Init", "InitApply x/web-abc", "InitApply y/db-abc", "InitDone"]
    );
    c.write("moved.yaml", &endpoint_slice("x", "web-def", "web", "10.1.0.9"));
    assert_eq!(next().await, "Apply x/web-def 10.1.0.9");
    c.write("moved.yaml", &endpoint_slice("x", "web-def", "web", "10.1.0.10"));
    assert_eq!(next().await, "Apply x/web-def 10.1.0.10");
    c.remove("moved.yaml");
    assert_eq!(next().await, "Delete x/web-def");
    assert_eq!(c.api.requests("endpointslices", Verb::Watch), 1);
}

#[tokio::test]
async fn watcher_follows_manifest_edits() {
    let c = Cluster::new("edits");
    let pods: Api<Pod> = Api::all(c.client().await);
    let mut w = watcher(pods, watcher::Config::default().page_size(3))
        .default_backoff()
        .boxed();
    let init = until(&mut w, "InitDone").await;
    assert_eq!(init.len(), 1 + 7 + 1, "{init:#?}");
    assert_eq!(init[0], "Init");
    // 7 pods in pages of 3.
    assert_eq!(c.api.requests("pods", Verb::List), 3);

    c.write("new.yaml", &pod("y", "b3", "app: b3"));
    let seen = until(&mut w, "Apply y/b3").await;
    assert_eq!(seen, [r#"Apply y/b3 Some("b3")"#]);
    c.write("new.yaml", &pod("y", "b3", "app: changed"));
    let seen = until(&mut w, "Apply y/b3").await;
    assert_eq!(seen, [r#"Apply y/b3 Some("changed")"#]);
    c.remove("new.yaml");
    assert_eq!(until(&mut w, "Delete").await, ["Delete y/b3"]);

    // Rewriting identical content is not a change; a broken file changes nothing.
    let text = std::fs::read_to_string(c.dir.join("pods.yaml")).unwrap();
    c.write("pods.yaml", &text);
    c.write("broken.yaml", "apiVersion: v1\nkind: Pod\nmetadata: [\n");
    assert_eq!(
        quiet(&mut w, Duration::from_millis(400)).await,
        Vec::<String>::new()
    );
    assert!(c
        .api
        .last_load_error()
        .unwrap()
        .contains("broken.yaml doc 1"));
    c.remove("broken.yaml");
    c.api.sync_now().unwrap();

    // One list, one watch: the client watched, it did not poll.
    assert_eq!(c.api.requests("pods", Verb::List), 3);
    assert_eq!(c.api.requests("pods", Verb::Watch), 1);
    assert_eq!(c.api.open_watches(), 1);
}

/// A watch with a label selector sees an object enter (ADDED) and leave (DELETED)
/// the selection when its labels change, as the real server reports it.
#[tokio::test]
async fn selector_watch_sees_objects_enter_and_leave() {
    let c = Cluster::new("selector");
    let pods: Api<Pod> = Api::all(c.client().await);
    let rv = c.api.resource_version().to_string();
    let wp = WatchParams::default().labels("tier=db").disable_bookmarks();
    let mut s = pods.watch(&wp, &rv).await.unwrap().boxed();
    let mut next = async || match tokio::time::timeout(WAIT, s.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        WatchEvent::Added(p) => format!("ADDED {} {:?}", p.name_any(), p.labels().get("app")),
        WatchEvent::Modified(p) => format!("MODIFIED {} {:?}", p.name_any(), p.labels().get("app")),
        WatchEvent::Deleted(p) => format!("DELETED {} {:?}", p.name_any(), p.labels().get("app")),
        other => format!("{other:?}"),
    };
    c.write("db.yaml", &pod("x", "d", "app: other, tier: web"));
    c.api.sync_now().unwrap();
    c.write("db.yaml", &pod("x", "d", "app: d1, tier: db"));
    assert_eq!(next().await, r#"ADDED d Some("d1")"#);
    c.write("db.yaml", &pod("x", "d", "app: d2, tier: db"));
    assert_eq!(next().await, r#"MODIFIED d Some("d2")"#);
    c.write("db.yaml", &pod("x", "d", "app: d3, tier: web"));
    assert_eq!(next().await, r#"DELETED d Some("d3")"#);
    c.write("db.yaml", &pod("x", "d", "app: d4, tier: db"));
    assert_eq!(next().await, r#"ADDED d Some("d4")"#);
    c.remove("db.yaml");
    assert_eq!(next().await, r#"DELETED d Some("d4")"#);
    assert!(c
        .api
        .request_log()
        .last()
        .unwrap()
        .contains("labelSelector=tier%3Ddb"));
}

#[tokio::test]
async fn watcher_relists_after_compaction() {
    let c = Cluster::new("compact");
    c.api.set_bookmark_interval(Duration::from_secs(3600));
    let pods: Api<Pod> = Api::all(c.client().await);
    // Short server-side watch timeout, so the watcher resumes soon.
    let cfg = watcher::Config::default().timeout(1);
    let mut w = watcher(pods, cfg).default_backoff().boxed();
    until(&mut w, "InitDone").await;
    assert_eq!(c.api.requests("pods", Verb::List), 1);

    // Resuming without compaction: no relist. (The watcher only works while polled.)
    assert_eq!(
        quiet(&mut w, Duration::from_millis(2500)).await,
        Vec::<String>::new()
    );
    assert!(c.api.requests("pods", Verb::Watch) >= 2);
    assert_eq!(c.api.requests("pods", Verb::List), 1);

    // An outage long enough for the history to be compacted: the resume gets 410
    // Expired and the watcher relists (and sees what changed meanwhile).
    c.api.set_available(false).unwrap();
    c.api.compact();
    c.write("new.yaml", &pod("x", "late", "app: late"));
    c.api.sync_now().unwrap();
    c.api.set_available(true).unwrap();
    let seen = until(&mut w, "InitDone").await;
    assert!(
        seen.iter()
            .any(|s| s.contains("410") || s.contains("Expired")),
        "{seen:#?}"
    );
    assert!(seen.contains(&"InitApply x/late".to_string()), "{seen:#?}");
    assert_eq!(c.api.requests("pods", Verb::List), 2);

    // Same without an outage: compaction, then the watch ends (as on its timeout).
    assert_eq!(
        quiet(&mut w, Duration::from_millis(300)).await,
        Vec::<String>::new()
    );
    c.api.compact();
    c.api.end_watches();
    let seen = until(&mut w, "InitDone").await;
    assert!(seen[0].contains("Expired"), "{seen:#?}");
    assert_eq!(c.api.requests("pods", Verb::List), 3);
}

#[tokio::test]
async fn bookmarks_and_streaming_lists() {
    let c = Cluster::new("bookmarks");
    c.api.set_bookmark_interval(Duration::from_millis(200));
    let client = c.client().await;
    let pods: Api<Pod> = Api::all(client.clone());

    // Raw watch from the current rv: bookmarks carry the current rv.
    let rv = c.api.resource_version().to_string();
    let mut s = pods
        .watch(&WatchParams::default().timeout(5), &rv)
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(WAIT, s.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        WatchEvent::Bookmark(b) => assert_eq!(b.metadata.resource_version, rv),
        other => panic!("expected a bookmark, got {other:?}"),
    }
    drop(s);
    assert!(c
        .api
        .request_log()
        .last()
        .unwrap()
        .contains("allowWatchBookmarks=true"));

    // A watch from an rv older than the history gets an in-stream 410.
    c.api.compact();
    let mut s = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(WAIT, s.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        WatchEvent::Error(e) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected 410, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(WAIT, s.next())
            .await
            .unwrap()
            .is_none(),
        "the stream ends after the error"
    );
    drop(s);

    // With bookmarks, a watcher resumes after compaction without relisting.
    let cfg = watcher::Config::default().timeout(1);
    let mut w = watcher(pods.clone(), cfg).default_backoff().boxed();
    until(&mut w, "InitDone").await;
    // Let the watch start (after InitDone), then compact under it.
    assert_eq!(
        quiet(&mut w, Duration::from_millis(300)).await,
        Vec::<String>::new()
    );
    assert_eq!(c.api.open_watches(), 1);
    c.api.compact();
    let seen = quiet(&mut w, Duration::from_millis(2500)).await;
    assert!(seen.is_empty(), "{seen:#?}");
    assert_eq!(c.api.requests("pods", Verb::List), 1);
    assert!(c.api.requests("pods", Verb::Watch) >= 3);

    // Streaming lists: the initial state comes from the watch, ended by the
    // initial-events-end bookmark; no list call.
    let nodes_lists = c.api.requests("nodes", Verb::List);
    let nodes: Api<Node> = Api::all(client.clone());
    let mut w = watcher(nodes, watcher::Config::default().streaming_lists()).boxed();
    let mut seen = vec![];
    while let Some(ev) = tokio::time::timeout(WAIT, w.next()).await.unwrap() {
        let done = matches!(ev, Ok(watcher::Event::InitDone));
        seen.push(format!(
            "{:?}",
            ev.map(|e| matches!(e, watcher::Event::InitApply(_)))
        ));
        if done {
            break;
        }
    }
    assert_eq!(seen, ["Ok(false)", "Ok(true)", "Ok(false)"]);
    assert_eq!(c.api.requests("nodes", Verb::List), nodes_lists);
}

#[tokio::test]
async fn watcher_recovers_after_outage() {
    let c = Cluster::new("outage");
    let pods: Api<Pod> = Api::all(c.client().await);
    let mut w = watcher(pods.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    until(&mut w, "InitDone").await;
    assert_eq!(
        quiet(&mut w, Duration::from_millis(300)).await,
        Vec::<String>::new()
    );
    assert_eq!(c.api.open_watches(), 1);

    // Down: connections are refused, the open watch is cut.
    c.api.set_available(false).unwrap();
    let e = std::net::TcpStream::connect(c.addr).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    let e = pods.list(&ListParams::default()).await.unwrap_err();
    assert!(!matches!(e, kube::Error::Api(_)), "{e:?}");
    c.write("new.yaml", &pod("x", "during", "app: during"));
    c.api.sync_now().unwrap();
    let seen = quiet(&mut w, Duration::from_millis(1500)).await;
    assert!(seen.iter().all(|s| s.starts_with("Err")), "{seen:#?}");
    assert!(!seen.is_empty(), "the cut watch is reported");
    assert_eq!(c.api.open_watches(), 0);

    let served = c.api.requests("pods", Verb::Watch);
    c.api.set_available(true).unwrap();
    // The watcher resumes from its resourceVersion and sees the change made while down.
    let seen = until(&mut w, "Apply x/during").await;
    assert!(!seen.iter().any(|s| s.starts_with("Init")), "{seen:#?}");
    assert!(c.api.requests("pods", Verb::Watch) > served);
}

/// The agent's way: a listener in a test-bed node's netns, reached by a client in
/// that netns (and not from outside), through `Testbed::start_agent_kube`.
#[test]
fn listener_in_node_netns() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "listener_in_node_netns needs root (network namespaces)");
    let lab = Path::new(env!("CARGO_MANIFEST_DIR")).join("labs/two-nodes");
    let opts = zt_testbed::TestbedOptions::default().serve_bin(env!("CARGO_BIN_EXE_zt-testbed"));
    let tb = zt_testbed::Testbed::up(&lab, opts).unwrap();
    let api = ApiServer::start(&lab).unwrap();

    // A stand-in "agent" that records its arguments and reports ready.
    let fake = tb.tmp_dir().join("fake-agent.sh");
    std::fs::write(
        &fake,
        "#!/bin/sh\nprev=\nfor a in \"$@\"; do [ \"$prev\" = --state-dir ] && state=$a; prev=$a; done\n\
         echo \"$@\" > \"$state/args\"\ntouch \"$state/ready\"\nexec sleep 60\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let agent = tb.start_agent_kube("node1", &fake, &api, &[]).unwrap();
    agent.wait_ready(WAIT).unwrap();
    let args = std::fs::read_to_string(agent.state_dir.join("args")).unwrap();
    assert!(!args.contains("--manifests"), "{args}");
    let kubeconfig = args
        .split_whitespace()
        .skip_while(|a| *a != "--kubeconfig")
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no --kubeconfig in {args}"));
    let kc = Kubeconfig::read_from(&kubeconfig).unwrap();
    let server = kc.clusters[0]
        .cluster
        .as_ref()
        .unwrap()
        .server
        .clone()
        .unwrap();
    let addr: std::net::SocketAddr = server.trim_start_matches("https://").parse().unwrap();

    // Not reachable from the test process's netns.
    assert!(std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err());

    // A kube client in the node netns lists and watches.
    let netns = tb.node("node1").unwrap().netns_path();
    let (nodes, pods) = zt_testbed::sys::in_netns(&netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let client = client_from(&kubeconfig).await;
            let nodes = Api::<Node>::all(client.clone())
                .list(&ListParams::default())
                .await
                .unwrap();
            let pods: Api<Pod> = Api::all(client);
            let mut w = watcher(pods, watcher::Config::default()).boxed();
            let seen = until(&mut w, "InitDone").await;
            // The watch starts when the stream is polled after InitDone.
            assert_eq!(
                quiet(&mut w, Duration::from_millis(300)).await,
                Vec::<String>::new()
            );
            (nodes.items.len(), seen.len() - 2)
        })
    })
    .unwrap();
    assert_eq!((nodes, pods), (2, 3));
    assert_eq!(api.requests("pods", Verb::Watch), 1);
    agent.stop();
}
