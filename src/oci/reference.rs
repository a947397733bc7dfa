//! Image references: `[host[:port]/]repo[:tag][@sha256:HEX]`, with Docker's defaults.

use super::OciError;

/// The registry a reference without a host names.
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's API actually lives.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// Whether `host` is a registry host as references name it: `name[:port]`, where the name is
/// dot-separated labels of letters, digits and inner `-` (so never `..` or an empty label), or
/// a bracketed IPv6 address, and the port is 1-65535; at most 255 bytes.
pub fn valid_host(host: &str) -> bool {
    if host.is_empty() || host.len() > 255 {
        return false;
    }
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        // `[v6]` or `[v6]:port`: the address must parse, so nothing else hides in the brackets.
        let Some((addr, after)) = rest.split_once(']') else {
            return false;
        };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            _ => match after.strip_prefix(':') {
                Some(port) => ("", Some(port)),
                None => return false,
            },
        }
    } else {
        match host.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        }
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let name_ok = host.starts_with('[') || name.split('.').all(label_ok);
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_digit())
            && matches!(p.parse::<u16>(), Ok(1..))
    });
    name_ok && port_ok
}

/// Checks a repository path (`library/debian`): components of lower-case letters, digits, `.`,
/// `_` and `-`, each starting and ending with a letter or digit.
pub fn check_repository(repo: &str) -> Result<(), String> {
    if repo.is_empty() || repo.len() > 2048 {
        return Err("no repository, or one too long".into());
    }
    for comp in repo.split('/') {
        let ok = !comp.is_empty()
            && comp
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && comp.starts_with(|c: char| c.is_ascii_alphanumeric())
            && comp.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !ok {
            return Err(format!("invalid repository component {comp:?}"));
        }
    }
    Ok(())
}

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// Registry host, with its port if any (`docker.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// Repository path (`library/debian`).
    pub repository: String,
    /// Tag, if given; `latest` is assumed when neither tag nor digest is.
    pub tag: Option<String>,
    /// Manifest digest (`sha256:…`), if given.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses `s` the way Docker does: the first component is a host if it contains `.` or `:`
    /// or is `localhost`; Docker Hub names of one component get `library/`.
    pub fn parse(s: &str) -> Result<Self, OciError> {
        let bad = |why: &str| OciError::Reference {
            reference: s.to_string(),
            why: why.to_string(),
        };
        if s.is_empty() || s.len() > 4096 {
            return Err(bad("empty or too long"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                check_digest(d).map_err(|w| bad(&w))?;
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let (host, path) = match rest.split_once('/') {
            Some((first, p))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), p)
            }
            _ => (DOCKER_HUB.to_string(), rest),
        };
        // A tag is after the last ':' of the last component.
        let last_slash = path.rfind('/').map_or(0, |i| i + 1);
        let (repo, tag) = match path[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&path[..at], Some(path[at + 1..].to_string()))
            }
            None => (path, None),
        };
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
                && !t.starts_with(['.', '-']);
            if !ok {
                return Err(bad("invalid tag"));
            }
        }
        check_repository(repo).map_err(|w| bad(&w))?;
        if !valid_host(&host) {
            return Err(bad("invalid registry host"));
        }
        let repository = if host == DOCKER_HUB && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo.to_string()
        };
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(Self {
            registry: host,
            repository,
            tag,
            digest,
        })
    }

    /// The repository `repo` of registry `host`, as nydusd's config names them (no tag, no
    /// digest), validated as [`Self::parse`] validates them.
    pub fn from_parts(host: &str, repo: &str) -> Result<Self, OciError> {
        let bad = |why: String| OciError::Reference {
            reference: format!("{host}/{repo}"),
            why,
        };
        if !valid_host(host) {
            return Err(bad("invalid registry host".into()));
        }
        check_repository(repo).map_err(bad)?;
        Ok(Self {
            registry: host.to_string(),
            repository: repo.to_string(),
            tag: None,
            digest: None,
        })
    }

    /// What to put after `/manifests/`: the digest if there is one, else the tag.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The host to talk to (Docker Hub's API host for `docker.io`).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// The host name without its port.
    pub fn hostname(&self) -> &str {
        host_without_port(&self.registry)
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// `host` without a `:port` suffix (IPv6 literals in brackets keep their colons).
pub fn host_without_port(host: &str) -> &str {
    if let Some(end) = host.strip_prefix('[').and_then(|h| h.find(']')) {
        return &host[1..=end];
    }
    host.split(':').next().unwrap_or(host)
}

/// Checks that `d` is `sha256:` and 64 lower-case hex digits.
pub fn check_digest(d: &str) -> Result<(), String> {
    let hex = d
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("digest {d:?} is not sha256"))?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!("digest {d:?} is not 64 lower-case hex digits"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn p(s: &str) -> Reference {
        match Reference::parse(s) {
            Ok(r) => r,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[test]
    fn docker_hub_defaults() {
        let r = p("debian");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/debian");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.api_host(), "registry-1.docker.io");
        let r = p("someone/app:1.2");
        assert_eq!(r.repository, "someone/app");
        assert_eq!(r.tag.as_deref(), Some("1.2"));
    }

    #[test]
    fn host_forms() {
        for h in [
            "localhost",
            "127.0.0.1:5000",
            "registry-1.docker.io",
            "[::1]",
            "[::1]:5000",
            "a.b.c:443",
        ] {
            assert!(valid_host(h), "{h:?} refused");
        }
        let r = p("[::1]:5000/a/b:v1");
        assert_eq!(r.registry, "[::1]:5000");
        assert_eq!(r.repository, "a/b");
    }

    #[test]
    fn hosts_ports_tags_digests() {
        let r = p("127.0.0.1:5000/a/b:v1");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.hostname(), "127.0.0.1");
        assert_eq!(r.repository, "a/b");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        let r = p(&format!("localhost/x@{D}"));
        assert_eq!(r.registry, "localhost");
        assert_eq!(r.tag, None);
        assert_eq!(r.manifest_ref(), D);
        let r = p(&format!("ghcr.io/o/r:t@{D}"));
        assert_eq!(r.tag.as_deref(), Some("t"));
        assert_eq!(r.manifest_ref(), D);
        assert_eq!(r.to_string(), format!("ghcr.io/o/r:t@{D}"));
        // A first component without '.' or ':' is a path, not a host.
        assert_eq!(p("foo/bar").registry, "docker.io");
        assert_eq!(p("foo/bar").repository, "foo/bar");
        assert_eq!(host_without_port("[::1]:5000"), "::1");
    }

    #[test]
    fn refuses_bad_references() {
        for s in [
            "",
            "Upper/case",
            "a:",
            "host:5000/",
            "x@sha256:1234",
            "x@md5:0123",
            "a//b",
            "a/b:-tag",
            "a/b:t/c",
            "a b",
            "../x",
            "./x",
            "a..b/x",
            ".example.com/x",
            "host-.com/x",
            "host:0/x",
            "host:65536/x",
            "host:5000:1/x",
            "[not-v6]/x",
            "[::1]x/y",
        ] {
            assert!(Reference::parse(s).is_err(), "{s:?} accepted");
        }
    }
}
