use super::*;

/// nydus-snapshotter's `misc/snapshotter/nydusd-config.fusedev.json` as
/// `SupplementDaemonConfig` + `DumpString` write it for one image: Go's field order, the
/// fields its structs always emit (`readahead`, `proxy.fallback`, `disable_indexed_map`).
pub(crate) fn snapshotter_config(host: &str, repo: &str, auth: &str, work_dir: &str) -> String {
    format!(
        r#"{{"device":{{"id":"/42","backend":{{"type":"registry","config":{{"readahead":false,"host":"{host}","repo":"{repo}","auth":"{auth}","proxy":{{"fallback":false}},"timeout":5,"connect_timeout":5,"retry_limit":2}}}},"cache":{{"type":"blobcache","config":{{"work_dir":"{work_dir}","disable_indexed_map":false}}}}}},"mode":"direct","digest_validate":false,"enable_xattr":true,"amplify_io":1048576,"fs_prefetch":{{"enable":true,"prefetch_all":true,"threads_count":8,"merging_size":1048576}}}}"#
    )
}

fn unsupported_key(r: Result<NydusConfig, ConfigError>) -> String {
    match r {
        Err(ConfigError::Unsupported { key, .. }) => key,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn the_snapshotters_stock_config_is_honoured() {
    // "user:pa:ss"
    let cfg = snapshotter_config(
        "127.0.0.1:5000",
        "test/nginx",
        "dXNlcjpwYTpzcw==",
        "/var/lib/containerd/io.containerd.snapshotter.v1.nydus/cache",
    );
    let c = parse(&cfg).expect("stock config");
    let s = &c.spec;
    assert_eq!(s.id.as_deref(), Some("/42"));
    assert_eq!(
        s.work_dir.as_deref(),
        Some(std::path::Path::new(
            "/var/lib/containerd/io.containerd.snapshotter.v1.nydus/cache"
        ))
    );
    assert_eq!(
        s.prefetch,
        PrefetchSpec {
            enable: true,
            all: true,
            threads: Some(8),
            merging_size: Some(1 << 20),
            bandwidth: None,
        }
    );
    assert_eq!(s.amplify_io, Some(1 << 20));
    let BackendSpec::Registry(r) = &s.backend else {
        panic!("{:?}", s.backend)
    };
    assert_eq!(
        (r.host.as_str(), r.repo.as_str()),
        ("127.0.0.1:5000", "test/nginx")
    );
    let creds = r.credentials.as_ref().expect("auth");
    assert_eq!(
        (creds.username.as_str(), creds.password.as_str()),
        ("user", "pa:ss")
    );
    assert_eq!(r.timeout_secs, Some(5));
    assert_eq!(r.connect_timeout_secs, Some(5));
    assert_eq!(r.retry_limit, Some(2));
    assert!(
        r.mirrors.is_empty() && r.fallback_to_origin,
        "no proxy url: no proxy"
    );
    assert_eq!(r.scheme, None);
    // digest_validate=false and disable_indexed_map are Skiff's behaviour anyway: noted.
    assert!(
        c.notes.iter().any(|n| n.starts_with("digest_validate")),
        "{:?}",
        c.notes
    );
    assert!(
        c.notes.iter().any(|n| n.contains("disable_indexed_map")),
        "{:?}",
        c.notes
    );
}

#[test]
fn registry_keys_are_read() {
    let cfg = r#"{"device":{"backend":{"type":"registry","config":{
        "scheme":"https","host":"reg.example:443","repo":"a/b","registry_token":"tok",
        "skip_verify":true,"ca_cert_files":["/etc/ca.pem"],"timeout":0,"retry_limit":9,
        "blob_redirected_host":"cdn.example","blob_url_scheme":"http",
        "proxy":{"url":"http://127.0.0.1:65001","ping_url":"http://127.0.0.1:40901/server/ping",
                 "fallback":true,"check_interval":3,"use_http":false},
        "mirrors":[{"host":"https://mirror.example","headers":{"X-Dragonfly-Registry":"https://reg.example"},
                    "auth_through":true,"health_check_interval":7,"failure_limit":2}]}}}}"#;
    let s = parse(cfg).expect("config").spec;
    let BackendSpec::Registry(r) = s.backend else {
        panic!()
    };
    assert_eq!(r.scheme, Some(Scheme::Https));
    assert_eq!(r.registry_token.as_deref(), Some("tok"));
    assert!(r.skip_verify);
    assert_eq!(r.ca_cert_files, [PathBuf::from("/etc/ca.pem")]);
    assert_eq!(
        r.timeout_secs, None,
        "0 means the default, never no timeout"
    );
    assert_eq!(r.retry_limit, Some(9));
    assert_eq!(r.blob_redirected_host.as_deref(), Some("cdn.example"));
    assert_eq!(r.blob_url_scheme, Some(Scheme::Http));
    assert!(r.fallback_to_origin);
    assert_eq!(r.mirrors.len(), 2);
    let proxy = &r.mirrors[0];
    assert_eq!(
        (proxy.host.as_str(), proxy.scheme),
        ("127.0.0.1:65001", Scheme::Http)
    );
    assert_eq!(
        proxy.ping_url.as_deref(),
        Some("http://127.0.0.1:40901/server/ping")
    );
    assert_eq!(proxy.check_interval_secs, 3);
    let m = &r.mirrors[1];
    assert_eq!(
        (m.host.as_str(), m.scheme),
        ("mirror.example", Scheme::Https)
    );
    assert_eq!(
        m.headers,
        [(
            "X-Dragonfly-Registry".to_string(),
            "https://reg.example".to_string()
        )]
    );
    assert!(m.auth_through);
    assert_eq!((m.check_interval_secs, m.failure_limit), (7, 2));
    // A proxy without fallback: the registry itself is never used.
    let cfg = r#"{"device":{"backend":{"type":"registry","config":{"host":"h.example","repo":"r",
        "proxy":{"url":"p.example:8080","fallback":false}}}}}"#;
    let BackendSpec::Registry(r) = parse(cfg).expect("config").spec.backend else {
        panic!()
    };
    assert!(!r.fallback_to_origin);
}

#[test]
fn version_2_is_read() {
    let cfg = r#"{"version":2,"id":"/7","backend":{"type":"registry","registry":{"host":"r.example","repo":"x/y"}},
        "cache":{"type":"filecache","filecache":{"work_dir":"/var/cache/n"},
                 "prefetch":{"enable":true,"threads":2,"batch_size":65536,"bandwidth_limit":1000}},
        "rafs":{"mode":"direct","batch_size":131072,"validate":false,"enable_xattr":true,
                "prefetch":{"enable":false}}}"#;
    let s = parse(cfg).expect("v2").spec;
    assert_eq!(s.id.as_deref(), Some("/7"));
    assert_eq!(s.work_dir, Some(PathBuf::from("/var/cache/n")));
    assert_eq!(
        s.prefetch,
        PrefetchSpec {
            enable: true,
            all: false,
            threads: Some(2),
            merging_size: Some(65536),
            bandwidth: Some(1000),
        }
    );
    assert_eq!(s.amplify_io, Some(131072));
    let cfg = r#"{"version":2,"backend":{"type":"localfs","localfs":{"dir":"/b"}},
        "rafs":{"mode":"cached","validate":true}}"#;
    assert_eq!(
        parse(cfg).expect("v2 localfs").spec.backend,
        BackendSpec::Localfs(BlobLocation::Dir("/b".into()))
    );
}

#[test]
fn localfs_and_s3_and_oss() {
    let cfg = r#"{"device":{"backend":{"type":"localfs","config":{"dir":"/var/lib/blobs","readahead":true}},
        "cache":{"type":"blobcache","config":{"work_dir":"/var/cache"}}},
        "mode":"direct","digest_validate":false,"iostats_files":false,
        "fs_prefetch":{"enable":false,"threads_count":4}}"#;
    let c = parse(cfg).expect("localfs");
    assert_eq!(
        c.spec.backend,
        BackendSpec::Localfs(BlobLocation::Dir("/var/lib/blobs".into()))
    );
    assert_eq!(
        c.spec.work_dir, None,
        "local blobs are not copied into a cache"
    );
    assert!(!c.spec.prefetch.enable);
    let cfg = r#"{"device":{"backend":{"type":"s3","config":{"scheme":"http","endpoint":"127.0.0.1:9000",
        "region":"us-east-1","bucket_name":"b","object_prefix":"blobs/","access_key_id":"k",
        "access_key_secret":"s","retry_limit":1}}}}"#;
    let BackendSpec::S3(s3) = parse(cfg).expect("s3").spec.backend else {
        panic!()
    };
    assert_eq!(s3.endpoint, "http://127.0.0.1:9000");
    assert!(s3.path_style);
    assert_eq!((s3.bucket.as_str(), s3.prefix.as_str()), ("b", "blobs/"));
    assert_eq!(s3.secret_access_key.as_deref(), Some("s"));
    let cfg = r#"{"device":{"backend":{"type":"oss","config":{"endpoint":"oss-cn-hangzhou.aliyuncs.com",
        "bucket_name":"b"}}}}"#;
    let BackendSpec::S3(oss) = parse(cfg).expect("oss").spec.backend else {
        panic!()
    };
    assert_eq!(oss.region, "oss-cn-hangzhou");
    assert!(!oss.path_style);
    assert_eq!(oss.endpoint, "https://oss-cn-hangzhou.aliyuncs.com");
    let cfg = r#"{"device":{"backend":{"type":"oss","config":{"endpoint":"127.0.0.1:9000","bucket_name":"b"}}}}"#;
    assert_eq!(
        unsupported_key(parse(cfg)),
        "device.backend.config.endpoint"
    );
}

#[test]
fn what_cannot_be_honoured_is_refused_naming_the_key() {
    let reg = r#""backend":{"type":"registry","config":{"host":"h.example","repo":"r"}}"#;
    for (cfg, key) in [
        (
            r#"{"device":{"backend":{"type":"localdisk","config":{}}}}"#.to_string(),
            "device.backend.type",
        ),
        (
            r#"{"device":{"backend":{"type":"http-proxy","config":{}}}}"#.into(),
            "device.backend.type",
        ),
        (
            r#"{"device":{"backend":{"type":"ftp","config":{}}}}"#.into(),
            "device.backend.type",
        ),
        (
            format!(r#"{{"device":{{{reg},"cache":{{"type":"fscache"}}}}}}"#),
            "device.cache.type",
        ),
        (format!(r#"{{"device":{{{reg}}},"enable_xattr":false}}"#), "enable_xattr"),
        (format!(r#"{{"device":{{{reg}}},"iostats_files":true}}"#), "iostats_files"),
        (format!(r#"{{"device":{{{reg}}},"access_pattern":true}}"#), "access_pattern"),
        (format!(r#"{{"device":{{{reg}}},"latest_read_files":true}}"#), "latest_read_files"),
        (format!(r#"{{"device":{{{reg}}},"mode":"fast"}}"#), "mode"),
        (format!(r#"{{"device":{{{reg}}},"warmup":5}}"#), "warmup"),
        (format!(r#"{{"device":{{{reg}}},"id_mapping":[0,1000,65536]}}"#), "id_mapping"),
        (format!(r#"{{"device":{{{reg}}},"not_a_key":1}}"#), "not_a_key"),
        (
            format!(r#"{{"device":{{{reg}}},"fs_prefetch":{{"enable":true,"stream_prefetch":true}}}}"#),
            "fs_prefetch.stream_prefetch",
        ),
        (
            format!(r#"{{"device":{{{reg}}},"fs_prefetch":{{"enable":true}}}}"#),
            "fs_prefetch.enable",
        ),
        (
            r#"{"device":{"backend":{"type":"registry","config":{"host":"h.x","repo":"r","readahead":true}}}}"#.into(),
            "device.backend.config.readahead",
        ),
        (
            r#"{"device":{"backend":{"type":"registry","config":{"host":"h.x","repo":"r","hots":"x"}}}}"#.into(),
            "device.backend.config.hots",
        ),
        (
            r#"{"device":{"backend":{"type":"localfs","config":{"dir":"/b","alt_dirs":["/c"]}}}}"#.into(),
            "device.backend.config.alt_dirs",
        ),
        (
            r#"{"device":{"backend":{"type":"s3","config":{"region":"r","bucket_name":"b","proxy":{"url":"p.x"}}}}}"#.into(),
            "device.backend.config.proxy",
        ),
        (
            format!(r#"{{"device":{{{reg},"cache":{{"type":"blobcache","config":{{"work_dir":"/c","enable_encryption":true}}}}}}}}"#),
            "device.cache.config.enable_encryption",
        ),
        (
            r#"{"version":2,"backend":{"type":"registry","registry":{"host":"h.x","repo":"r"},"oss":{}}}"#.into(),
            "backend.oss",
        ),
        (
            r#"{"version":2,"backend":{"type":"localfs","localfs":{"dir":"/b"}},"cache":{"type":"fscache","fscache":{"work_dir":"/x"}}}"#.into(),
            "cache.fscache",
        ),
        (r#"{"version":3}"#.into(), "version"),
    ] {
        let got = unsupported_key(parse(&cfg));
        assert_eq!(got, key, "{cfg}");
        // Every refusal says why.
        if let Err(e) = parse(&cfg) {
            assert!(e.to_string().len() > key.len() + 40, "{e}");
        }
    }
}

#[test]
fn malformed_configs_are_invalid() {
    for cfg in [
        "",
        "{",
        "[]",
        "null",
        r#"{"device":{}}"#,
        r#"{"device":{"backend":{"type":"localfs"}}}"#,
        r#"{"device":{"backend":{"type":"localfs","config":{"dir":"rel"}}}}"#,
        r#"{"device":{"backend":{"type":7}}}"#,
        r#"{"device":{"backend":{"type":"localfs","config":{"dir":"/b","blob_file":"/b/x"}}}}"#,
        r#"{"device":{"backend":{"type":"registry","config":{"host":"h.x"}}}}"#,
        r#"{"device":{"backend":{"type":"registry","config":{"host":"h x","repo":"r"}}}}"#,
        r#"{"device":{"backend":{"type":"registry","config":{"host":"h.x","repo":"UPPER"}}}}"#,
        r#"{"device":{"backend":{"type":"registry","config":{"host":"h.x","repo":"r","auth":"!!"}}}}"#,
        r#"{"device":{"backend":{"type":"registry","config":{"host":"h.x","repo":"r","auth":"bm9jb2xvbg=="}}}}"#,
        r#"{"device":{"backend":{"type":"registry","config":{"host":"h.x","repo":"r","timeout":-1}}}}"#,
        r#"{"device":{"backend":{"type":"registry","config":{"host":"h.x","repo":"r","timeout":"5"}}}}"#,
        r#"{"device":{"backend":{"type":"registry","config":{"host":"h.x","repo":"r","ca_cert_files":"/x"}}}}"#,
        r#"{"device":{"backend":{"type":"registry","config":{"host":"h.x","repo":"r","ca_cert_files":["rel"]}}}}"#,
        r#"{"device":{"backend":{"type":"registry","config":{"host":"h.x","repo":"r","proxy":{"url":"ftp://p"}}}}}"#,
        r#"{"device":{"backend":{"type":"registry","config":{"host":"h.x","repo":"r","mirrors":[{"host":"m.x","headers":{"a b":"c"}}]}}}}"#,
        r#"{"device":{"backend":{"type":"registry","config":{"host":"h.x","repo":"r"}},"cache":{"type":"blobcache"}}}"#,
        r#"{"device":{"backend":{"type":"registry","config":{"host":"h.x","repo":"r"}},"cache":{"type":"blobcache","config":{"work_dir":"cache"}}}}"#,
        r#"{"device":{"backend":{"type":"registry","config":{"host":"h.x","repo":"r"}}},"fs_prefetch":{"enable":true,"threads_count":0}}"#,
        r#"{"device":{"backend":{"type":"registry","config":{"host":"h.x","repo":"r"}}},"amplify_io":1e3}"#,
        r#"{"device":{"backend":{"type":"registry","config":{"host":"h.x","repo":"r"}}},"amplify_io":4294967296000}"#,
        r#"{"device":{"backend":{"type":"s3","config":{"bucket_name":"b"}}}}"#,
    ] {
        assert!(
            matches!(
                parse(cfg),
                Err(ConfigError::Invalid(_) | ConfigError::Json(_))
            ),
            "{cfg}: {:?}",
            parse(cfg)
        );
    }
}

#[test]
fn hostile_input_never_panics() {
    // Deep nesting, huge numbers, odd types in every position of the stock config.
    let deep = format!("{}{}", "{\"device\":".repeat(2000), "}".repeat(2000));
    let _ = parse(&deep);
    let stock = snapshotter_config("h.example", "r", "dTpw", "/c");
    let bytes = stock.as_bytes();
    for i in 0..bytes.len() {
        for b in [b'"', b'{', b'1', b'-', b'\\', 0xff] {
            let mut m = bytes.to_vec();
            m[i] = b;
            if let Ok(s) = std::str::from_utf8(&m) {
                let _ = parse(s);
            }
        }
        let _ = parse(&stock[..i]);
    }
}

/// docs/kata.md shows the key table as `keys::markdown` writes it, between two markers.
/// `SKIFF_UPDATE_DOCS=1 cargo test --lib key_table` rewrites it.
#[test]
fn key_table_in_docs_kata_md_is_the_parsers() {
    const BEGIN: &str = "<!-- nydusd-config-keys: generated by keys::markdown -->\n";
    const END: &str = "<!-- end of nydusd-config-keys -->";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/kata.md");
    let text = std::fs::read_to_string(&path).expect("docs/kata.md");
    let (Some(a), Some(b)) = (text.find(BEGIN), text.find(END)) else {
        panic!("docs/kata.md lacks the markers {BEGIN:?} ... {END:?}");
    };
    let start = a + BEGIN.len();
    let want = super::keys::markdown();
    if text[start..b] != want {
        if std::env::var_os("SKIFF_UPDATE_DOCS").is_some() {
            let new = format!("{}{want}{}", &text[..start], &text[b..]);
            std::fs::write(&path, new).expect("writing docs/kata.md");
            return;
        }
        panic!(
            "docs/kata.md's key table is not the parser's: run \
             SKIFF_UPDATE_DOCS=1 cargo test --lib key_table\n{want}"
        );
    }
}

/// A value of type `ty` that `allowed` refuses.
fn refused_value(allowed: keys::Allowed, ty: keys::Ty) -> Value {
    use keys::{Allowed, Ty};
    match allowed {
        Allowed::False => Value::Bool(true),
        Allowed::True => Value::Bool(false),
        Allowed::Zero => serde_json::json!(1),
        Allowed::RafsMode => serde_json::json!("fast"),
        Allowed::Scheme => serde_json::json!("ftp"),
        Allowed::NoProxyUrl => serde_json::json!({"url": "proxy.example:8080"}),
        Allowed::Empty => match ty {
            Ty::Str => serde_json::json!("x"),
            Ty::StrList => serde_json::json!(["/x"]),
            Ty::UintList => serde_json::json!([0, 1000, 65536]),
            Ty::ObjectList(_) => serde_json::json!([{"host": "mirror.example"}]),
            _ => serde_json::json!({"work_dir": "/x"}),
        },
    }
}

/// Every [`keys::Treatment::Only`] key under `at` in `table` (through honoured objects).
fn only_keys(table: &[keys::Key], at: &str, out: &mut Vec<(String, keys::Allowed, keys::Ty)>) {
    for k in table {
        let path = keys::join(at, k.name);
        match (k.treatment, k.ty) {
            (keys::Treatment::Only(allowed, _), ty) => out.push((path, allowed, ty)),
            (keys::Treatment::Honoured(_), keys::Ty::Object(t)) => only_keys(t, &path, out),
            _ => {}
        }
    }
}

fn set_path(v: &mut Value, path: &str, value: Value) {
    let mut cur = v;
    let mut parts = path.split('.').peekable();
    while let Some(p) = parts.next() {
        let obj = cur.as_object_mut().expect("an object on the way");
        if parts.peek().is_none() {
            obj.insert(p.to_owned(), value);
            return;
        }
        cur = obj
            .entry(p.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

/// Every key the table accepts only with some values is refused, naming it with a reason,
/// for each other value: in both versions, under every backend.
#[test]
fn every_refusal_of_the_table_names_its_key() {
    let required = |kind: &str| match kind {
        "registry" => serde_json::json!({"host": "h.example", "repo": "r"}),
        "localfs" => serde_json::json!({"dir": "/b"}),
        "s3" => serde_json::json!({"region": "r", "bucket_name": "b"}),
        "oss" => serde_json::json!({"endpoint": "oss-cn-x.aliyuncs.com", "bucket_name": "b"}),
        k => panic!("no base config for {k}"),
    };
    let mut cases: Vec<(Value, String, keys::Allowed, keys::Ty)> = Vec::new();
    for (kind, table) in keys::BACKENDS {
        let v1 =
            serde_json::json!({"device": {"backend": {"type": kind, "config": required(kind)}}});
        let v2 =
            serde_json::json!({"version": 2, "backend": {"type": kind, *kind: required(kind)}});
        let mut found = Vec::new();
        only_keys(table, "device.backend.config", &mut found);
        cases.extend(found.into_iter().map(|(p, a, t)| (v1.clone(), p, a, t)));
        let mut found = Vec::new();
        only_keys(table, &format!("backend.{kind}"), &mut found);
        cases.extend(found.into_iter().map(|(p, a, t)| (v2.clone(), p, a, t)));
        if *kind == "registry" {
            let mut found = Vec::new();
            only_keys(keys::V1_ROOT, "", &mut found);
            cases.extend(found.into_iter().map(|(p, a, t)| (v1.clone(), p, a, t)));
            let mut found = Vec::new();
            only_keys(keys::V2_ROOT, "", &mut found);
            cases.extend(found.into_iter().map(|(p, a, t)| (v2.clone(), p, a, t)));
        }
    }
    assert!(cases.len() > 40, "{} cases", cases.len());
    for (base, path, allowed, ty) in cases {
        let mut cfg = base;
        set_path(&mut cfg, &path, refused_value(allowed, ty));
        let text = cfg.to_string();
        match parse(&text) {
            Err(ConfigError::Unsupported { key, reason }) => {
                assert_eq!(key, path, "{text}");
                assert!(reason.len() > 20, "{key}: {reason}");
            }
            other => panic!("{path}: expected a refusal of {text}, got {other:?}"),
        }
    }
}
