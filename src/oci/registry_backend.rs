//! [`RegistryBackend`]: Skiff blobs read by range from the layers of an image in a registry.
//!
//! A blob is a layer of the image. A blob whose id is its sha256 (images converted for
//! registries, and Nydus images) is the layer `sha256:<id>`: no manifest is needed to find it,
//! which is how a daemon given only host, repository and bootstrap reads it
//! ([`RegistryBackend::for_bootstrap`]). A blob named by its blake3 (earlier converts) is
//! found through the layers' `io.skiff.rafs.blob-id` annotations, checked against the
//! bootstrap's blob table (id and size) when the image is opened.

use std::collections::HashMap;
use std::sync::Arc;

use super::manifest::{
    ImageManifest, ANN_BLOB_ID, ANN_NYDUS_BOOTSTRAP, ANN_ROOT_DIGEST, SKIFF_BLOB, SKIFF_BOOTSTRAP,
    SKIFF_BOOTSTRAP_ZSTD,
};

/// OCI layer media types a Nydus bootstrap layer may have.
const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
use super::{OciError, RegistryClient};
use crate::format::{digest_hex, Bootstrap, DIGEST_LEN};
use crate::storage::cache::BootstrapCache;
use crate::storage::{BackendError, BlobBackend, Deadline};

/// Largest bootstrap fetched (the format's own limit).
pub const MAX_BOOTSTRAP_BYTES: u64 = 4 << 30;

/// Where a Skiff blob is in the registry.
#[derive(Clone, Debug)]
struct LayerLoc {
    digest: String,
    size: u64,
}

/// Reads Skiff blobs from a registry, one range request per read. Unverified, like every
/// backend: [`crate::storage::CachedChunkSource`] checks each chunk.
pub struct RegistryBackend {
    client: Arc<RegistryClient>,
    layers: HashMap<[u8; DIGEST_LEN], LayerLoc>,
}

impl RegistryBackend {
    /// A backend for the blobs of `bootstrap` in `client`'s repository, each the layer named
    /// by its id: every blob must be named by its sha256 (a blob named by its blake3 can only
    /// be found through the manifest's annotations: use [`open_image`]).
    pub fn for_bootstrap(
        client: Arc<RegistryClient>,
        bootstrap: &Bootstrap,
    ) -> Result<Self, OciError> {
        let mut layers = HashMap::new();
        for b in bootstrap.blobs() {
            let Some(digest) = b.layer_digest() else {
                return Err(OciError::Invalid(format!(
                    "blob {} is named by its blake3, so the registry layer holding it cannot                      be found without the image's manifest: convert the image again with                      `skiff convert` (which names blobs by their sha256), or mount it with                      --image",
                    digest_hex(&b.id)
                )));
            };
            layers.insert(
                b.id,
                LayerLoc {
                    digest,
                    size: b.size.get(),
                },
            );
        }
        Ok(Self { client, layers })
    }

    /// The client, to renew its credentials.
    pub fn client(&self) -> &Arc<RegistryClient> {
        &self.client
    }

    /// The layer digest holding blob `id`, if the image has it.
    pub fn layer_digest(&self, id: &[u8; DIGEST_LEN]) -> Option<&str> {
        self.layers.get(id).map(|l| l.digest.as_str())
    }
}

/// The backend error for a failed registry read, in the class that decides whether it is
/// retried (`BackendError::is_retryable`):
///
/// - an HTTP status keeps its code: 400, 403 and 404 are final, and so is a 401, which the
///   client answers with one token refresh (or its basic credentials) before it gives up;
///   5xx, 408 and 429 are retried;
/// - a transport failure (connect, reset, timeout, body cut off) is retried, and so is a reply
///   that breaks the protocol (a wrong `Content-Range`, a short body);
/// - failed authentication (the token server refused or could not be reached), a passed
///   deadline and anything local are final.
fn classify(what: String, e: OciError) -> BackendError {
    match e {
        OciError::Status { status, .. } => BackendError::Http {
            what: crate::util::error_chain(&e),
            status,
        },
        OciError::Http { source, what: w } => BackendError::from_reqwest(w, source),
        OciError::Invalid(m) => BackendError::BadReply(m),
        OciError::Auth(m) => BackendError::Auth(format!("{what}: {m}")),
        OciError::DeadlinePassed(w) => BackendError::DeadlineExceeded {
            what: w,
            waiting: "about to send the request",
        },
        other => BackendError::Config(format!("{what}: {}", crate::util::error_chain(&other))),
    }
}

impl BlobBackend for RegistryBackend {
    fn read_range(
        &self,
        id: &[u8; DIGEST_LEN],
        offset: u64,
        len: usize,
        deadline: &Deadline,
    ) -> Result<Vec<u8>, BackendError> {
        let path = || format!("{}@{}", self.client.reference(), digest_hex(id));
        let Some(layer) = self.layers.get(id) else {
            return Err(BackendError::Io {
                op: "finding the registry layer of blob",
                path: path(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such layer"),
            });
        };
        let end = offset.saturating_add(len as u64);
        if end > layer.size {
            return Err(BackendError::ShortBlob { path: path(), end });
        }
        let t = std::time::Instant::now();
        let bytes = self
            .client
            .get_blob_range(&layer.digest, offset, len, deadline.instant())
            .map_err(|e| classify(format!("{}@{}", self.client.reference(), layer.digest), e))?;
        tracing::debug!(
            layer = %layer.digest,
            offset,
            len,
            ms = t.elapsed().as_millis() as u64,
            "registry range read"
        );
        Ok(bytes)
    }

    fn read_range_streaming(
        &self,
        id: &[u8; DIGEST_LEN],
        offset: u64,
        len: usize,
        deadline: &Deadline,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(), BackendError> {
        let path = || format!("{}@{}", self.client.reference(), digest_hex(id));
        let Some(layer) = self.layers.get(id) else {
            return Err(BackendError::Io {
                op: "finding the registry layer of blob",
                path: path(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such layer"),
            });
        };
        let end = offset.saturating_add(len as u64);
        if end > layer.size {
            return Err(BackendError::ShortBlob { path: path(), end });
        }
        let t = std::time::Instant::now();
        self.client
            .get_blob_range_streaming(&layer.digest, offset, len, deadline.instant(), sink)
            .map_err(|e| classify(format!("{}@{}", self.client.reference(), layer.digest), e))?;
        tracing::debug!(
            layer = %layer.digest,
            offset,
            len,
            ms = t.elapsed().as_millis() as u64,
            "registry range read, streamed"
        );
        Ok(())
    }

    fn name(&self) -> &'static str {
        "registry"
    }
}

/// A Skiff image opened from a registry: its verified bootstrap and a backend for its blobs.
pub struct RemoteImage {
    /// The loaded, validated bootstrap.
    pub bootstrap: Arc<Bootstrap>,
    /// The backend serving its blobs.
    pub backend: RegistryBackend,
    /// The manifest's digest.
    pub manifest_digest: String,
}

/// Fetches the manifest of `client`'s reference, then the bootstrap layer (checked against its
/// sha256 digest, then validated), and maps every blob of the bootstrap to its layer.
///
/// With `cache`, the bootstrap comes from there when an earlier process kept it, and is kept
/// there after a fetch; processes starting the same image together fetch it once. With
/// `share`, the loaded tables are those of another daemon of the node when it has them
/// (checked, see [`crate::share`]), and offered to the others otherwise.
pub fn open_image(
    client: RegistryClient,
    cache: Option<&BootstrapCache>,
    share: Option<&crate::share::BootstrapShare>,
) -> Result<RemoteImage, OciError> {
    let (manifest, _, manifest_digest) = client.get_manifest()?;
    let (boot, kind) = bootstrap_layer(&manifest).ok_or_else(|| {
        OciError::Invalid(format!(
            "{} is neither a Skiff nor a Nydus image: its last layer is not of type \
             {SKIFF_BOOTSTRAP_ZSTD} or {SKIFF_BOOTSTRAP}, nor a tar layer annotated \
             {ANN_NYDUS_BOOTSTRAP}=true",
            client.reference()
        ))
    })?;
    let want_root = boot.annotations.get(ANN_ROOT_DIGEST);
    let load = |layer: &[u8]| -> Result<Arc<Bootstrap>, OciError> {
        let bytes = match kind {
            BootstrapLayer::SkiffZstd => decompress_bootstrap(layer, MAX_BOOTSTRAP_BYTES)?,
            BootstrapLayer::Skiff => layer.to_vec(),
            BootstrapLayer::NydusTar { gzip } => {
                extract_nydus_bootstrap(layer, gzip, MAX_BOOTSTRAP_BYTES)?
            }
        };
        let bootstrap = crate::share::load_bytes(bytes, share)?;
        if let Some(want) = want_root {
            let got = digest_hex(bootstrap.root_digest());
            if &got != want {
                return Err(OciError::Invalid(format!(
                    "bootstrap root digest {got} differs from the annotation's {want}"
                )));
            }
        }
        Ok(bootstrap)
    };
    let bootstrap = match cache {
        None => load(&client.get_blob_bytes(&boot.digest, boot.size, MAX_BOOTSTRAP_BYTES)?)?,
        Some(cache) => {
            // Whoever holds the lock is fetching this bootstrap; wait, then take theirs.
            let lock = cache.lock(&boot.digest).unwrap_or_else(|e| {
                tracing::warn!(error = %crate::util::error_chain(&e), "cannot lock the cached bootstrap");
                None
            });
            let cached = cache
                .get(&boot.digest)
                .and_then(|bytes| cached_bootstrap(bytes, &boot.digest, boot.size))
                .and_then(|bytes| match load(&bytes) {
                    Ok(b) => Some(b),
                    Err(e) => {
                        tracing::warn!(bootstrap = %boot.digest, error = %crate::util::error_chain(&e), "cached bootstrap is invalid; fetching it again");
                        None
                    }
                });
            let bootstrap = match cached {
                Some(b) => {
                    tracing::info!(bootstrap = %boot.digest, "bootstrap from the cache");
                    b
                }
                None => {
                    cache.remove(&boot.digest);
                    let bytes =
                        client.get_blob_bytes(&boot.digest, boot.size, MAX_BOOTSTRAP_BYTES)?;
                    let b = load(&bytes)?;
                    cache.put(&boot.digest, &bytes);
                    b
                }
            };
            if let Some(l) = lock {
                l.done();
            }
            bootstrap
        }
    };
    let mut by_id = HashMap::new();
    let mut by_sha256 = HashMap::new();
    for l in manifest
        .layers
        .iter()
        .filter(|l| l.media_type == SKIFF_BLOB)
    {
        let Some(hexid) = l.annotations.get(ANN_BLOB_ID) else {
            return Err(OciError::Invalid(format!(
                "blob layer {} has no {ANN_BLOB_ID} annotation",
                l.digest
            )));
        };
        let mut id = [0u8; DIGEST_LEN];
        hex::decode_to_slice(hexid, &mut id).map_err(|_| {
            OciError::Invalid(format!("blob layer {}: bad blob id {hexid:?}", l.digest))
        })?;
        by_id.insert(
            id,
            LayerLoc {
                digest: l.digest.clone(),
                size: l.size,
            },
        );
    }
    // A blob named by its sha256 (Nydus blobs) is the layer of that digest: no annotation is
    // needed to find it.
    for l in &manifest.layers {
        if let Some(hexid) = l.digest.strip_prefix("sha256:") {
            let mut id = [0u8; DIGEST_LEN];
            if hex::decode_to_slice(hexid, &mut id).is_ok() {
                by_sha256.entry(id).or_insert(LayerLoc {
                    digest: l.digest.clone(),
                    size: l.size,
                });
            }
        }
    }
    let mut layers = HashMap::new();
    for b in bootstrap.blobs() {
        let sha256_id = b.id_algo() == crate::format::DigestAlgo::Sha256;
        let found = by_id
            .get(&b.id)
            .or_else(|| sha256_id.then(|| by_sha256.get(&b.id)).flatten())
            .cloned()
            .or_else(|| {
                // Not a layer of this manifest (a chunk dictionary's blob, say): the registry
                // still serves it by digest from the repository.
                sha256_id.then(|| LayerLoc {
                    digest: format!("sha256:{}", digest_hex(&b.id)),
                    size: b.size.get(),
                })
            });
        let Some(loc) = found else {
            return Err(OciError::Invalid(format!(
                "the bootstrap refers to blob {} that no layer holds",
                digest_hex(&b.id)
            )));
        };
        if loc.size != b.size.get() {
            return Err(OciError::Invalid(format!(
                "blob {}: layer {} is {} bytes, the bootstrap says {}",
                digest_hex(&b.id),
                loc.digest,
                loc.size,
                b.size.get()
            )));
        }
        layers.insert(b.id, loc);
    }
    tracing::info!(
        image = %client.reference(),
        manifest = %manifest_digest,
        bootstrap = %boot.digest,
        bootstrap_bytes = boot.size,
        blobs = layers.len(),
        root = %digest_hex(bootstrap.root_digest()),
        "image opened from registry"
    );
    Ok(RemoteImage {
        bootstrap,
        backend: RegistryBackend {
            client: Arc::new(client),
            layers,
        },
        manifest_digest,
    })
}

/// The bootstrap of a zstd bootstrap layer, at most `limit` bytes of it: a layer that expands
/// beyond is refused, not decompressed into memory.
pub fn decompress_bootstrap(layer: &[u8], limit: u64) -> Result<Vec<u8>, OciError> {
    let bad = |e: std::io::Error| OciError::Invalid(format!("bootstrap layer: zstd: {e}"));
    let decoder = zstd::stream::read::Decoder::new(layer).map_err(bad)?;
    let mut out = Vec::with_capacity(layer.len().saturating_mul(3));
    std::io::Read::read_to_end(&mut std::io::Read::take(decoder, limit + 1), &mut out)
        .map_err(bad)?;
    if out.len() as u64 > limit {
        return Err(OciError::Invalid(format!(
            "bootstrap layer expands beyond {limit} bytes"
        )));
    }
    Ok(out)
}

/// What the bootstrap layer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BootstrapLayer {
    /// A Skiff bootstrap, raw.
    Skiff,
    /// A Skiff bootstrap, zstd-compressed.
    SkiffZstd,
    /// A Nydus image's bootstrap layer: a tar (gzip-compressed as nydusify writes it) holding
    /// `image/image.boot`.
    NydusTar {
        /// Whether the tar is gzip-compressed.
        gzip: bool,
    },
}

/// The bootstrap layer: the last layer, of one of Skiff's bootstrap types, or (a Nydus image) a
/// tar layer annotated as Nydus's bootstrap. The annotation alone does not make a Skiff
/// bootstrap, nor a Skiff media type a Nydus one.
fn bootstrap_layer(m: &ImageManifest) -> Option<(&super::manifest::Descriptor, BootstrapLayer)> {
    let l = m.layers.last()?;
    let nydus = l.annotations.get(ANN_NYDUS_BOOTSTRAP).map(String::as_str);
    let kind = match l.media_type.as_str() {
        SKIFF_BOOTSTRAP if nydus != Some("false") => BootstrapLayer::Skiff,
        SKIFF_BOOTSTRAP_ZSTD if nydus != Some("false") => BootstrapLayer::SkiffZstd,
        OCI_LAYER_GZIP | DOCKER_LAYER_GZIP if nydus == Some("true") => {
            BootstrapLayer::NydusTar { gzip: true }
        }
        OCI_LAYER_TAR if nydus == Some("true") => BootstrapLayer::NydusTar { gzip: false },
        _ => return None,
    };
    Some((l, kind))
}

/// Where nydusify puts the bootstrap in its bootstrap layer.
const NYDUS_BOOTSTRAP_PATH: &str = "image/image.boot";

/// The bootstrap inside a Nydus bootstrap layer (a tar, gzip-compressed if `gzip`), read as a
/// stream: the entry `image/image.boot`, at most `limit` bytes of it, after at most `limit`
/// bytes of other entries (a layer that would expand without bound is refused, not read on).
pub fn extract_nydus_bootstrap(layer: &[u8], gzip: bool, limit: u64) -> Result<Vec<u8>, OciError> {
    let bad = |what: String| OciError::Invalid(format!("Nydus bootstrap layer: {what}"));
    let reader: Box<dyn std::io::Read + '_> = if gzip {
        Box::new(flate2::read::GzDecoder::new(layer))
    } else {
        Box::new(layer)
    };
    // Everything read from the decompressor, entries skipped included, is bounded.
    let bounded = std::io::Read::take(reader, limit.saturating_mul(2).saturating_add(1 << 20));
    let mut archive = tar::Archive::new(bounded);
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("not a tar: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("reading the tar: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| bad(format!("an entry's name: {e}")))?
            .into_owned();
        let name = path.to_string_lossy();
        if name.trim_start_matches("./") != NYDUS_BOOTSTRAP_PATH {
            continue;
        }
        if !entry.header().entry_type().is_file() {
            return Err(bad(format!("{NYDUS_BOOTSTRAP_PATH} is not a regular file")));
        }
        let size = entry.size();
        if size > limit {
            return Err(bad(format!(
                "{NYDUS_BOOTSTRAP_PATH} is {size} bytes, more than the {limit} allowed"
            )));
        }
        // The header's size is the layer's word, not a fact: the buffer grows with the bytes
        // that actually arrive.
        let mut out = Vec::with_capacity(size.min(64 << 20) as usize);
        std::io::Read::read_to_end(&mut std::io::Read::take(&mut entry, size), &mut out)
            .map_err(|e| bad(format!("reading {NYDUS_BOOTSTRAP_PATH}: {e}")))?;
        if out.len() as u64 != size {
            return Err(bad(format!("{NYDUS_BOOTSTRAP_PATH} is cut short")));
        }
        return Ok(out);
    }
    Err(bad(format!("no {NYDUS_BOOTSTRAP_PATH} in the layer")))
}

/// Cached bootstrap bytes fit to load: the right size and sha256 (the layer digest the manifest
/// names), so that a cached copy is exactly what a fetch would give.
fn cached_bootstrap(bytes: Vec<u8>, digest: &str, size: u64) -> Option<Vec<u8>> {
    if bytes.len() as u64 != size {
        return None;
    }
    super::manifest::verify_digest("cached bootstrap", &bytes, digest).ok()?;
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_errors_keep_their_class() {
        let status = |status| OciError::Status {
            what: "GET /v2/r/blobs/sha256:x".into(),
            status,
            detail: String::new(),
        };
        for final_status in [400, 401, 403, 404] {
            let e = classify("r@x".into(), status(final_status));
            assert!(!e.is_retryable(), "{final_status} is final: {e}");
            assert!(matches!(e, BackendError::Http { status, .. } if status == final_status));
        }
        for transient in [408, 429, 500, 502, 503] {
            assert!(classify("r@x".into(), status(transient)).is_retryable());
        }
        assert!(classify("r@x".into(), OciError::Invalid("Content-Range".into())).is_retryable());
        assert!(!classify("r@x".into(), OciError::Auth("token: HTTP 403".into())).is_retryable());
        let late = classify("r@x".into(), OciError::DeadlinePassed("GET".into()));
        assert!(matches!(late, BackendError::DeadlineExceeded { .. }) && !late.is_retryable());
        let local = OciError::Io {
            op: "reading",
            path: "/x".into(),
            source: std::io::Error::other("disk"),
        };
        assert!(!classify("r@x".into(), local).is_retryable());
    }

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, *data).expect("tar");
        }
        b.into_inner().expect("tar")
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut g = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut g, data).expect("gzip");
        g.finish().expect("gzip")
    }

    #[test]
    fn nydus_bootstrap_layers_are_read_bounded() {
        let boot = vec![9u8; 10_000];
        let reg = tar::EntryType::Regular;
        let layer = tar_of(&[
            ("image", tar::EntryType::Directory, &[]),
            ("image/other", reg, &[1; 300]),
            ("image/image.boot", reg, &boot),
        ]);
        assert_eq!(
            extract_nydus_bootstrap(&gzip(&layer), true, 1 << 20).expect("found"),
            boot
        );
        assert_eq!(
            extract_nydus_bootstrap(&layer, false, 1 << 20).expect("plain tar"),
            boot
        );
        // Larger than the limit, missing, not a regular file, not a tar, cut short: refused.
        assert!(extract_nydus_bootstrap(&gzip(&layer), true, 9_999).is_err());
        let missing = tar_of(&[("image/other", reg, &[1; 10])]);
        assert!(extract_nydus_bootstrap(&gzip(&missing), true, 1 << 20).is_err());
        let dir = tar_of(&[("image/image.boot", tar::EntryType::Directory, &[])]);
        assert!(extract_nydus_bootstrap(&gzip(&dir), true, 1 << 20).is_err());
        assert!(extract_nydus_bootstrap(&boot, true, 1 << 20).is_err());
        let z = gzip(&layer);
        assert!(extract_nydus_bootstrap(&z[..z.len() / 2], true, 1 << 20).is_err());
        // Many bytes of other entries before it: reading stops at the bound.
        let big = vec![0u8; 3 << 20];
        let padded = tar_of(&[("junk", reg, &big), ("image/image.boot", reg, &boot)]);
        assert!(extract_nydus_bootstrap(&gzip(&padded), true, 1 << 20).is_err());
    }

    #[test]
    fn zstd_bootstrap_layers_are_bounded() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let z = zstd::bulk::compress(&data, 3).expect("compress");
        assert_eq!(decompress_bootstrap(&z, 100_000).expect("fits"), data);
        // One byte over the limit: refused.
        assert!(decompress_bootstrap(&z, 99_999).is_err());
        // Not zstd, or cut short: refused.
        assert!(decompress_bootstrap(&data, 1 << 20).is_err());
        assert!(decompress_bootstrap(&z[..z.len() / 2], 1 << 20).is_err());
    }
}
