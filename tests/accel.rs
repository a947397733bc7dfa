//! `skiff accel`: convert on push, with Debian's docker-registry (htpasswd) configured to send
//! its notifications to the service, images pushed by skopeo:
//!
//! - a push produces the `-skiff` tag, which mounts and equals the source (against the same
//!   layers built locally), and `skiff check` passes on it;
//! - pushing the `-skiff` tag (the service's own push) starts no task;
//! - the same notification sent again makes no second conversion;
//! - a wrong webhook auth header gets 401 and queues nothing;
//! - a source with a corrupt layer ends as a failed task whose error names the layer;
//! - `kill -9` of the service mid-conversion, then a restart, finishes the task, and the tag
//!   never shows a partial image;
//! - `/metrics` and `skiff accel task list` show it.
//!
//! Prerequisites (root and /dev/fuse for the mount, docker-registry, skopeo) go through
//! `require`: with `CI=true` a missing one fails the test.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::middlebox::{Action, Middlebox};
use common::oci::*;
use common::registry::{free_port, Registry};
use common::*;
use skiff::oci::auth::Credentials;
use skiff::oci::manifest::{ImageManifest, OCI_MANIFEST};
use skiff::oci::{Reference, RegistryClient, RegistryOptions};

const USER: &str = "pusher";
const PASS: &str = "pu:sh";
const WEBHOOK_AUTH: &str = "Bearer harbor-secret";
const NOTIFY_AUTH: &str = "Bearer registry-secret";

fn creds() -> String {
    format!("{USER}:{PASS}")
}

fn client(reference: &str, auth: bool) -> RegistryClient {
    let r = Reference::parse(reference).expect("reference");
    RegistryClient::new(
        &r,
        &RegistryOptions {
            credentials: auth.then(|| Credentials {
                username: USER.into(),
                password: PASS.into(),
            }),
            ..RegistryOptions::default()
        },
    )
    .expect("client")
}

fn tag_exists(reference: &str, auth: bool) -> bool {
    let r = Reference::parse(reference).expect("reference");
    client(reference, auth)
        .get_manifest_ref(r.manifest_ref())
        .is_ok()
}

/// A running `skiff accel`, killed on drop.
struct Service {
    child: Option<Child>,
    addr: String,
    log: PathBuf,
}

impl Service {
    fn start(config: &Path, log: &Path) -> Service {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log");
        let child = Command::new(skiff())
            .args(["accel", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("spawn skiff accel");
        let cfg: serde_json::Value =
            serde_json::from_slice(&fs::read(config).expect("config")).expect("config JSON");
        let s = Service {
            child: Some(child),
            addr: cfg["listen"].as_str().unwrap_or_default().to_string(),
            log: log.to_path_buf(),
        };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if s.get("/api/v1/health").is_ok_and(|(c, _)| c == 200) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("skiff accel did not start\n{}", s.log_text());
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn http() -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client")
    }

    fn get(&self, path: &str) -> Result<(u16, String), reqwest::Error> {
        let r = Self::http()
            .get(format!("http://{}{path}", self.addr))
            .send()?;
        Ok((r.status().as_u16(), r.text()?))
    }

    fn post(&self, path: &str, auth: Option<&str>, ctype: &str, body: &str) -> (u16, String) {
        let mut req = Self::http()
            .post(format!("http://{}{path}", self.addr))
            .header("Content-Type", ctype)
            .body(body.to_string());
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let r = req.send().expect("POST");
        (r.status().as_u16(), r.text().unwrap_or_default())
    }

    fn tasks(&self) -> Vec<serde_json::Value> {
        let (code, text) = self.get("/api/v1/conversions").expect("task list");
        assert_eq!(code, 200, "{text}");
        serde_json::from_str(&text).expect("task list JSON")
    }

    fn tasks_for(&self, source: &str) -> Vec<serde_json::Value> {
        self.tasks()
            .into_iter()
            .filter(|t| t["source"] == source)
            .collect()
    }

    /// Waits until the task for `source` is in a final state; returns it.
    fn wait_final(&self, source: &str, timeout: Duration) -> serde_json::Value {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(t) = self.tasks_for(source).into_iter().find(|t| {
                matches!(
                    t["status"].as_str(),
                    Some("COMPLETED" | "FAILED" | "SKIPPED")
                )
            }) {
                return t;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "no finished task for {source}: {:#?}\n{}",
            self.tasks(),
            self.log_text()
        );
    }

    fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics").expect("metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn write_config(path: &Path, port: u16, work: &Path, registries: serde_json::Value) {
    let cfg = serde_json::json!({
        "listen": format!("127.0.0.1:{port}"),
        "work_dir": work,
        "workers": 2,
        "registries": registries,
        "notifications": {"auth_header": NOTIFY_AUTH},
    });
    fs::write(path, serde_json::to_vec_pretty(&cfg).expect("JSON")).expect("config");
}

fn events_envelope(registry: &str, repo: &str, tag: &str, digest: &str) -> String {
    serde_json::json!({"events": [{
        "id": "0f9c1a3e-6b56-4e0b-8f2b-test",
        "timestamp": "2026-12-01T00:00:00Z",
        "action": "push",
        "target": {"mediaType": OCI_MANIFEST, "digest": digest, "size": 1, "length": 1,
                   "repository": repo, "url": format!("http://{registry}/v2/{repo}/manifests/{digest}"), "tag": tag},
        "request": {"id": "r1", "addr": "127.0.0.1:1", "host": registry, "method": "PUT", "useragent": "test"},
        "actor": {"name": USER},
        "source": {"addr": "localhost:5000", "instanceID": "i1"},
    }]})
    .to_string()
}

fn harbor_payload(resource: &str) -> String {
    serde_json::json!({"type": "PUSH_ARTIFACT", "occur_at": 1, "operator": "admin",
        "event_data": {"resources": [{"resource_url": resource}],
                       "repository": {"name": "app", "namespace": "accel"}}})
    .to_string()
}

const EVENTS: &str = "application/vnd.docker.distribution.events.v1+json";

fn app_layers(seed: u64) -> Res<Vec<(Vec<u8>, &'static str)>> {
    let l1 = layer(
        &[
            Ent::Dir("etc", 0o755),
            Ent::File("etc/conf", 0o644, b"one\n".to_vec()),
            Ent::File("etc/data", 0o600, noise(300_000, seed)),
            Ent::Link("etc/data-link", "etc/data"),
            Ent::Dir("gone", 0o755),
            Ent::File("gone/x", 0o644, b"x".to_vec()),
        ],
        1_700_000_000,
    )?;
    let l2 = layer(
        &[
            Ent::File(".wh.gone", 0o644, Vec::new()),
            Ent::Dir("etc", 0o700),
            Ent::File("etc/.wh..wh..opq", 0o644, Vec::new()),
            Ent::File("etc/conf", 0o644, b"two\n".to_vec()),
            Ent::Symlink("conf", "etc/conf"),
        ],
        1_700_000_100,
    )?;
    Ok(vec![
        (gzip(&l1)?, "application/vnd.oci.image.layer.v1.tar+gzip"),
        (l2, "application/vnd.oci.image.layer.v1.tar"),
    ])
}

#[test]
fn convert_on_push_through_registry_notifications() -> Res {
    if !require_fuse() || require("skopeo", have("skopeo")).is_none() {
        return Ok(());
    }
    let tmp = scratch();
    let t = tmp.path();
    let port = free_port()?;
    let notify = format!("http://127.0.0.1:{port}/api/v1/notifications");
    let Some(reg) = require(
        "a local registry",
        Registry::start(
            "accel",
            &[
                "--htpasswd",
                &creds(),
                "--notify",
                &notify,
                "--notify-auth",
                NOTIFY_AUTH,
            ],
        ),
    ) else {
        return Ok(());
    };
    let config = t.join("accel.json");
    let auth_b64 = base64_encode(creds().as_bytes());
    write_config(
        &config,
        port,
        &t.join("work"),
        serde_json::json!({reg.addr.clone(): {"auth": auth_b64, "webhook_auth_header": WEBHOOK_AUTH}}),
    );
    let svc = Service::start(&config, &t.join("accel.log"));

    // A push converts.
    let layers = app_layers(1)?;
    let layout = t.join("layout");
    write_layout(&layout, &layers)?;
    let src = format!("{}/accel/app:v1", reg.addr);
    skopeo_push(&layout, &src, &creds(), false)?;
    let task = svc.wait_final(&src, Duration::from_secs(120));
    assert_eq!(task["status"], "COMPLETED", "{task:#}\n{}", svc.log_text());
    assert_eq!(task["origin"], "distribution", "{task:#}");
    let tgt = format!("{src}-skiff");
    assert_eq!(task["target"], tgt.as_str());
    assert!(
        task["target_size"].as_u64().unwrap_or(0) > 300_000,
        "{task:#}"
    );
    // The service's own push arrives as an event and is skipped: still one task in all.
    let start = Instant::now();
    while svc.metric("skiff_accel_skipped_events_total") < 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the -skiff push was not notified\n{}",
            svc.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(svc.tasks().len(), 1, "{:#?}", svc.tasks());
    assert!(svc.tasks_for(&tgt).is_empty());

    // The -skiff tag mounts and equals the same layers built locally; check agrees.
    let mut files = Vec::new();
    for (i, (bytes, _)) in layers.iter().enumerate() {
        let p = t.join(format!("l{i}"));
        fs::write(&p, bytes)?;
        files.push(p);
    }
    let boot = t.join("local.boot");
    let blobs = t.join("local-blobs");
    let mut args: Vec<&OsStr> = vec![OsStr::new("build")];
    args.extend(files.iter().map(|f| f.as_os_str()));
    args.extend([
        OsStr::new("--bootstrap"),
        boot.as_os_str(),
        OsStr::new("--blob-dir"),
        blobs.as_os_str(),
    ]);
    skiff_ok(&args);
    let local = Mount::new(&boot, &blobs, &t.join("local-mnt"));
    let auth = creds();
    let cache = t.join("cache");
    let remote = Mount::with_args(
        &[
            OsStr::new("--image"),
            OsStr::new(&tgt),
            OsStr::new("--registry-auth"),
            OsStr::new(&auth),
            OsStr::new("--cache-dir"),
            cache.as_os_str(),
        ],
        &t.join("remote-mnt"),
    );
    assert_no_diff(
        "converted on push vs local build",
        &snapshot(&local.dir),
        &snapshot(&remote.dir),
    );
    assert_eq!(fs::read(remote.dir.join("conf"))?, b"two\n");
    assert!(!remote.dir.join("gone").exists() && !remote.dir.join("etc/data").exists());
    remote.unmount();
    local.unmount();
    let out = run_skiff([
        "check",
        "--source",
        &src,
        "--target",
        &tgt,
        "--registry-auth",
        &auth,
    ]);
    assert!(out.status.success(), "{}", output_text(&out));

    // The same notification again (as the registry resends on a timeout): no new conversion.
    let digest = task["source_digest"]
        .as_str()
        .expect("source digest")
        .to_string();
    let env = events_envelope(&reg.addr, "accel/app", "v1", &digest);
    for _ in 0..2 {
        let (code, body) = svc.post("/api/v1/notifications", Some(NOTIFY_AUTH), EVENTS, &env);
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("\"duplicate\""), "{body}");
    }
    // A wrong auth header on either endpoint: 401, nothing queued.
    let (code, body) = svc.post("/api/v1/notifications", Some("Bearer nope"), EVENTS, &env);
    assert_eq!(code, 401, "{body}");
    let v2 = format!("{}/accel/app:v2", reg.addr);
    for bad in [Some("Bearer wrong"), None] {
        let (code, body) = svc.post(
            "/api/v1/conversions",
            bad,
            "application/json",
            &harbor_payload(&v2),
        );
        assert_eq!(code, 401, "{body}");
    }
    assert_eq!(svc.tasks().len(), 1, "{:#?}", svc.tasks());
    assert!(svc.metric("skiff_accel_unauthorized_total") >= 3.0);
    // The right header: Harbor's webhook queues (v2 does not exist: the task fails, saying so).
    let (code, body) = svc.post(
        "/api/v1/conversions?sync=true",
        Some(WEBHOOK_AUTH),
        "application/json",
        &harbor_payload(&v2),
    );
    assert_eq!(code, 200, "{body}");
    let t2 = svc.wait_final(&v2, Duration::from_secs(30));
    assert_eq!(t2["status"], "FAILED", "{t2:#}");
    assert!(
        t2["reason"].as_str().unwrap_or("").contains("404"),
        "{t2:#}"
    );

    // A corrupt source layer: blobs pushed, the layer damaged in storage, then the manifest
    // pushed (which notifies): the task fails and names the layer.
    let bad_dir = t.join("bad");
    write_layout(&bad_dir, &app_layers(2)?)?;
    let bad_src = format!("{}/accel/app:bad", reg.addr);
    let c = client(&bad_src, true);
    let index: serde_json::Value = serde_json::from_slice(&fs::read(bad_dir.join("index.json"))?)?;
    let mdigest = index["manifests"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    let mbytes = fs::read(bad_dir.join("blobs/sha256").join(&mdigest[7..]))?;
    let m: ImageManifest = serde_json::from_slice(&mbytes)?;
    for d in m.layers.iter().chain([&m.config]) {
        let b = fs::read(bad_dir.join("blobs/sha256").join(&d.digest[7..]))?;
        c.push_blob_bytes(&b, t).map_err(|e| e.to_string())?;
    }
    let bad_layer = m.layers[0].digest.clone();
    flip_byte(&stored_blob(&reg, &bad_layer), 100)?;
    c.push_manifest("bad", &mbytes, OCI_MANIFEST)
        .map_err(|e| e.to_string())?;
    let tb = svc.wait_final(&bad_src, Duration::from_secs(60));
    assert_eq!(tb["status"], "FAILED", "{tb:#}");
    assert!(
        tb["reason"].as_str().unwrap_or("").contains(&bad_layer),
        "{tb:#}"
    );
    assert!(!tag_exists(&format!("{bad_src}-skiff"), true));

    // The CLI and the metrics.
    let out = run_skiff(["accel", "task", "list", "--addr", &svc.addr]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("COMPLETED") && text.contains("FAILED") && text.contains(&src),
        "{text}"
    );
    assert_eq!(
        svc.metric("skiff_accel_conversions_total{outcome=\"completed\"}"),
        1.0
    );
    assert!(svc.metric("skiff_accel_conversion_duration_seconds_count") >= 1.0);
    Ok(())
}

#[test]
fn kill9_mid_conversion_then_restart_finishes_the_task() -> Res {
    if require("skopeo", have("skopeo")).is_none() {
        return Ok(());
    }
    let Some(reg) = require("a local registry", Registry::start("accel-kill", &[])) else {
        return Ok(());
    };
    let tmp = scratch();
    let t = tmp.path();
    let layers = vec![(
        gzip(&layer(
            &[
                Ent::File("big", 0o644, noise(8 << 20, 7)),
                Ent::File("small", 0o644, b"s".to_vec()),
            ],
            1_700_000_000,
        )?)?,
        "application/vnd.oci.image.layer.v1.tar+gzip",
    )];
    let layout = t.join("layout");
    write_layout(&layout, &layers)?;
    let layer_digest = sha256(&layers[0].0);
    skopeo_push(&layout, &format!("{}/kill/app:v1", reg.addr), "x:y", false)?;
    // Between the service and the registry: the first fetch of the layer stalls for 5 s.
    let stalled = Arc::new(AtomicBool::new(false));
    let s2 = stalled.clone();
    let want = format!("GET /v2/kill/app/blobs/{layer_digest}");
    let mb = Middlebox::start(
        reg.port,
        Arc::new(move |_, head: &str| {
            if head.starts_with(&want) && !s2.swap(true, Ordering::SeqCst) {
                Action::Stall(Duration::from_secs(5))
            } else {
                Action::Pass
            }
        }),
    );
    let host = mb.addr();
    let port = free_port()?;
    let config = t.join("accel.json");
    write_config(
        &config,
        port,
        &t.join("work"),
        serde_json::json!({host.clone(): {"webhook_auth_header": WEBHOOK_AUTH}}),
    );
    let mut svc = Service::start(&config, &t.join("accel.log"));
    let src = format!("{host}/kill/app:v1");
    let tgt_direct = format!("{}/kill/app:v1-skiff", reg.addr);
    let out = run_skiff([
        "accel",
        "task",
        "create",
        &src,
        "--addr",
        &svc.addr,
        "--auth-header",
        WEBHOOK_AUTH,
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    let start = Instant::now();
    while !stalled.load(Ordering::SeqCst) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the layer was never fetched\n{}",
            svc.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let running = svc.tasks_for(&src);
    assert_eq!(running[0]["status"], "PROCESSING", "{running:#?}");
    svc.kill9();
    assert!(
        !tag_exists(&tgt_direct, false),
        "a partial image under the tag"
    );

    // Restarted: the task is resumed and finishes; only then does the tag appear, whole.
    let svc = Service::start(&config, &t.join("accel.log"));
    let task = svc.wait_final(&src, Duration::from_secs(120));
    assert_eq!(task["status"], "COMPLETED", "{task:#}\n{}", svc.log_text());
    assert_eq!(task["attempts"], 2, "{task:#}");
    let out = run_skiff([
        "check",
        "--source",
        &format!("{}/kill/app:v1", reg.addr),
        "--target",
        &tgt_direct,
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    Ok(())
}
