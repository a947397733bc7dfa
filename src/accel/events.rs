//! What arrives over HTTP: Harbor's webhook payload and Docker distribution's notification
//! envelope, reduced to the images pushed; and the rules that map a source image to its
//! target, or say why it is not converted.
//!
//! Both payloads are untrusted: they are parsed strictly enough to find what is needed
//! (unknown fields of these outside formats are let through, as their senders add fields over
//! time), references are parsed and validated, and the registry must be one the service is
//! configured for.

use serde::Deserialize;

use super::config::AccelConfig;
use crate::oci::manifest::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};
use crate::oci::Reference;

/// Harbor's event type for a push.
pub const HARBOR_PUSH_ARTIFACT: &str = "PUSH_ARTIFACT";
/// Docker distribution's envelope media types (v1: registry 2.x, as Debian ships; v2: 3.x).
pub const DISTRIBUTION_EVENTS: [&str; 2] = [
    "application/vnd.docker.distribution.events.v1+json",
    "application/vnd.docker.distribution.events.v2+json",
];

/// Who asked for a conversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Harbor's webhook (or `skiff accel task create`, which speaks it).
    Harbor,
    /// Docker distribution's notifications.
    Distribution,
}

/// One pushed image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pushed {
    /// The image, by tag.
    pub reference: Reference,
    /// Its manifest digest, when the sender says.
    pub digest: Option<String>,
}

#[derive(Deserialize)]
struct HarborPayload {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    event_data: Option<HarborEventData>,
}

#[derive(Deserialize)]
struct HarborEventData {
    #[serde(default)]
    resources: Vec<HarborResource>,
}

#[derive(Deserialize)]
struct HarborResource {
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    tag: Option<String>,
    resource_url: String,
}

/// The images a Harbor webhook payload pushed; `Ok(None)` for another event type (answered,
/// not acted on, as Harbor sends every type it is configured to).
pub fn parse_harbor(body: &[u8]) -> Result<Option<Vec<Pushed>>, String> {
    let p: HarborPayload =
        serde_json::from_slice(body).map_err(|e| format!("invalid webhook payload: {e}"))?;
    if p.kind != HARBOR_PUSH_ARTIFACT {
        return Ok(None);
    }
    let resources = p
        .event_data
        .map(|d| d.resources)
        .filter(|r| !r.is_empty())
        .ok_or("a PUSH_ARTIFACT payload without event_data.resources")?;
    let mut out = Vec::new();
    for r in resources {
        let mut reference = Reference::parse(&r.resource_url)
            .map_err(|e| format!("resource_url: {}", crate::util::error_chain(&e)))?;
        if let Some(t) = r.tag.filter(|t| !t.is_empty()) {
            if reference.tag.is_none() || reference.digest.is_some() {
                reference = Reference::parse(&format!(
                    "{}/{}:{t}",
                    reference.registry, reference.repository
                ))
                .map_err(|e| format!("tag: {}", crate::util::error_chain(&e)))?;
            }
        }
        let digest = r.digest.or_else(|| reference.digest.clone());
        if let Some(d) = &digest {
            crate::oci::reference::check_digest(d).map_err(|e| format!("digest: {e}"))?;
        }
        reference.digest = None;
        out.push(Pushed { reference, digest });
    }
    Ok(Some(out))
}

#[derive(Deserialize)]
struct Envelope {
    events: Vec<Event>,
}

#[derive(Deserialize)]
struct Event {
    action: String,
    target: EventTarget,
    #[serde(default)]
    request: Option<EventRequest>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventTarget {
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    digest: Option<String>,
    repository: String,
    #[serde(default)]
    tag: Option<String>,
}

#[derive(Deserialize)]
struct EventRequest {
    #[serde(default)]
    host: Option<String>,
}

/// The tagged manifest pushes of a distribution envelope (blob pushes, pulls, deletes and
/// untagged manifests, such as an index's children, are not conversions). `registry` is the
/// configured host the events come from, else each event's `request.host`.
pub fn parse_distribution(body: &[u8], registry: Option<&str>) -> Result<Vec<Pushed>, String> {
    let env: Envelope =
        serde_json::from_slice(body).map_err(|e| format!("invalid events envelope: {e}"))?;
    let mut out = Vec::new();
    for e in env.events {
        let manifest = matches!(
            e.target.media_type.as_str(),
            OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_MANIFEST_LIST
        );
        let Some(tag) = e.target.tag.filter(|t| !t.is_empty()) else {
            continue;
        };
        if e.action != "push" || !manifest {
            continue;
        }
        let host = registry
            .map(str::to_string)
            .or_else(|| e.request.and_then(|r| r.host))
            .ok_or("an event without request.host (set notifications.registry)")?;
        let reference = Reference::parse(&format!("{host}/{}:{tag}", e.target.repository))
            .map_err(|e| crate::util::error_chain(&e))?;
        if let Some(d) = &e.target.digest {
            crate::oci::reference::check_digest(d).map_err(|e| format!("digest: {e}"))?;
        }
        out.push(Pushed {
            reference,
            digest: e.target.digest,
        });
    }
    Ok(out)
}

/// What to do with a pushed image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Convert it into this target.
    Convert(Reference),
    /// Leave it: the reason.
    Skip(String),
}

/// The target of `source` under the configured rules, or why there is none: the service's own
/// output (a suffixed tag, the target repository) is never converted again.
pub fn decide(config: &AccelConfig, source: &Reference) -> Decision {
    let Some(tag) = source.tag.as_deref() else {
        return Decision::Skip("no tag: only tagged images are converted".into());
    };
    let make = |repo: &str, tag: &str| {
        Reference::parse(&format!("{}/{repo}:{tag}", source.registry))
            .map(Decision::Convert)
            .unwrap_or_else(|e| Decision::Skip(crate::util::error_chain(&e)))
    };
    match &config.rules.target_repository {
        Some(repo) if repo == &source.repository => {
            Decision::Skip(format!("already in the target repository {repo}"))
        }
        Some(repo) => make(repo, tag),
        None => {
            let suffix = config.tag_suffix();
            if tag.ends_with(suffix) {
                return Decision::Skip(format!("the tag already ends with {suffix}"));
            }
            let target_tag = format!("{tag}{suffix}");
            if target_tag.len() > 128 {
                return Decision::Skip("the suffixed tag would be longer than 128".into());
            }
            make(&source.repository, &target_tag)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn config(rules: &str) -> AccelConfig {
        serde_json::from_str(&format!(
            r#"{{"listen":"x","work_dir":"/a","registries":{{"h:5000":{{}}}},"rules":{rules}}}"#
        ))
        .expect("config")
    }

    #[test]
    fn harbor_payloads() {
        let body = format!(
            r#"{{"type":"PUSH_ARTIFACT","occur_at":1,"operator":"admin","event_data":{{"resources":[{{"digest":"{D}","tag":"v1","resource_url":"h:5000/lib/app:v1"}}],"repository":{{"name":"app"}}}}}}"#
        );
        let got = parse_harbor(body.as_bytes())
            .expect("parses")
            .expect("a push");
        assert_eq!(got[0].reference.to_string(), "h:5000/lib/app:v1");
        assert_eq!(got[0].digest.as_deref(), Some(D));
        assert_eq!(
            parse_harbor(br#"{"type":"DELETE_ARTIFACT","event_data":{}}"#),
            Ok(None)
        );
        for bad in [
            &b"{}"[..],
            b"[1]",
            br#"{"type":"PUSH_ARTIFACT"}"#,
            br#"{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"resource_url":"h/Upper Case"}]}}"#,
            br#"{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"resource_url":"h/x:1","digest":"md5:1"}]}}"#,
        ] {
            assert!(parse_harbor(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn distribution_envelopes() {
        let body = format!(
            r#"{{"events":[
              {{"action":"push","target":{{"mediaType":"application/octet-stream","digest":"{D}","repository":"a/b"}},"request":{{"host":"h:5000"}}}},
              {{"action":"push","target":{{"mediaType":"{OCI_MANIFEST}","digest":"{D}","repository":"a/b"}},"request":{{"host":"h:5000"}}}},
              {{"action":"pull","target":{{"mediaType":"{OCI_MANIFEST}","digest":"{D}","repository":"a/b","tag":"v1"}},"request":{{"host":"h:5000"}}}},
              {{"action":"push","target":{{"mediaType":"{DOCKER_MANIFEST}","digest":"{D}","repository":"a/b","tag":"v1"}},"request":{{"host":"h:5000"}}}}
            ]}}"#
        );
        let got = parse_distribution(body.as_bytes(), None).expect("parses");
        assert_eq!(got.len(), 1, "only the tagged manifest push");
        assert_eq!(got[0].reference.to_string(), "h:5000/a/b:v1");
        let got = parse_distribution(body.as_bytes(), Some("reg:1")).expect("parses");
        assert_eq!(got[0].reference.registry, "reg:1");
        assert!(parse_distribution(b"{\"events\":3}", None).is_err());
    }

    #[test]
    fn rules_never_convert_their_own_output() {
        let c = config("{}");
        let r = |s: &str| Reference::parse(s).expect("reference");
        assert_eq!(
            decide(&c, &r("h:5000/a:v1")),
            Decision::Convert(r("h:5000/a:v1-skiff"))
        );
        assert!(matches!(
            decide(&c, &r("h:5000/a:v1-skiff")),
            Decision::Skip(_)
        ));
        let c = config(r#"{"target_repository":"fast/a"}"#);
        assert_eq!(
            decide(&c, &r("h:5000/a:v1")),
            Decision::Convert(r("h:5000/fast/a:v1"))
        );
        assert!(matches!(
            decide(&c, &r("h:5000/fast/a:v1")),
            Decision::Skip(_)
        ));
        assert!(matches!(
            decide(&c, &r(&format!("h:5000/a@{D}"))),
            Decision::Skip(_)
        ));
    }
}
