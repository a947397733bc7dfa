//! Target `nydus_config`: nydusd's JSON configuration (`api::nydus_config::parse`), versions 1
//! and 2, as nydus-snapshotter and Kata hand it to `POST /api/v1/mount`.
//!
//! The seeds are configurations as the snapshotter writes them (registry, localfs, s3 and oss
//! backends, blob and file caches, prefetch), the dictionary every key name of the table.
//! A refusal must render as an error. What must hold: parsing never panics; it is a function of
//! the JSON value alone (the same text re-serialised parses to the same result, so neither
//! formatting nor key order changes what a configuration means); and an accepted
//! configuration is internally sane (timeouts and limits in range, a registry with a host and
//! a repository, every mirror with a host).

use serde_json::Value;
use skiff::api::nydus_config::{self, NydusConfig};
use skiff::daemon::spec::BackendSpec;

use super::Outcome;

/// One iteration: see the module doc.
pub fn run(data: &[u8]) -> Outcome {
    // The parser takes text; bytes that are not UTF-8 are read as the API would never pass
    // them, and lossily, so that the rest of the input still counts.
    let text = String::from_utf8_lossy(data);
    let parsed = nydus_config::parse(&text);
    if let Ok(value) = serde_json::from_str::<Value>(&text) {
        let again = nydus_config::parse(&value.to_string());
        match (&parsed, &again) {
            (Ok(a), Ok(b)) => assert_eq!(
                a, b,
                "the same JSON value, re-serialised, means something else"
            ),
            (Err(_), Err(_)) => {}
            (a, b) => panic!(
                "the same JSON value, re-serialised, is {} then {}",
                verdict(a),
                verdict(b)
            ),
        }
    }
    match parsed {
        Ok(c) => {
            check(&c);
            Outcome::Served(0)
        }
        Err(e) => {
            let _ = super::render(&e);
            Outcome::Rejected
        }
    }
}

fn verdict(r: &Result<NydusConfig, nydus_config::ConfigError>) -> String {
    match r {
        Ok(_) => "accepted".into(),
        Err(e) => format!("refused ({})", super::render(e)),
    }
}

/// What an accepted configuration must look like.
fn check(c: &NydusConfig) {
    let s = &c.spec;
    match &s.backend {
        BackendSpec::Registry(r) => {
            assert!(
                !r.host.is_empty() && !r.repo.is_empty(),
                "registry without host or repo: {r:?}"
            );
            assert_ne!(r.timeout_secs, Some(0), "a zero timeout is no timeout");
            assert_ne!(
                r.connect_timeout_secs,
                Some(0),
                "a zero connect timeout is no timeout"
            );
            for m in &r.mirrors {
                assert!(!m.host.is_empty(), "a mirror without a host: {m:?}");
            }
        }
        BackendSpec::S3(s3) => {
            assert!(
                !s3.bucket.is_empty() && !s3.endpoint.is_empty(),
                "s3 without bucket or endpoint: {s3:?}"
            );
        }
        BackendSpec::Localfs(_) => {}
    }
    if let Some(t) = s.prefetch.threads {
        assert!(t > 0, "zero prefetch threads accepted");
    }
}
