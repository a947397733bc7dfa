//! OCI and Docker manifest, index and descriptor types (the fields Skiff uses; unknown fields
//! are kept where they must round-trip), media types, and Skiff's annotations.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::OciError;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Media types accepted when fetching a manifest, best first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// A Skiff blob stored as a registry layer (the raw blob bytes).
pub const SKIFF_BLOB: &str = "application/vnd.skiff.rafs.blob.v1";
/// A Skiff bootstrap stored as a registry layer (the raw bootstrap bytes).
pub const SKIFF_BOOTSTRAP: &str = "application/vnd.skiff.rafs.bootstrap.v1";
/// A Skiff bootstrap stored as a zstd-compressed registry layer: what `skiff convert` pushes,
/// because a bootstrap (names, digests, tables) shrinks to about 40 % and is fetched whole
/// before an image can start.
pub const SKIFF_BOOTSTRAP_ZSTD: &str = "application/vnd.skiff.rafs.bootstrap.v1+zstd";
/// Nydus's media type of a data-blob layer, which Skiff images in the node layout use too
/// (blobs named by their sha256: the layer digest is the blob id).
pub const NYDUS_BLOB: &str = "application/vnd.oci.image.layer.nydus.blob.v1";
/// The media type of the node layout's bootstrap layer (a gzip tar holding
/// `image/image.boot`, as Nydus images have it).
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Where the node layout's bootstrap layer holds the bootstrap.
pub const NODE_BOOTSTRAP_PATH: &str = "image/image.boot";
/// Annotation on the node layout's bootstrap layer: which bootstrap format `image/image.boot`
/// is (`skiff-v1`), since the layer's shape is Nydus's.
pub const ANN_BOOTSTRAP_FORMAT: &str = "io.skiff.rafs.bootstrap-format";
/// Annotation on a blob layer: the Skiff blob id (blake3, hex).
pub const ANN_BLOB_ID: &str = "io.skiff.rafs.blob-id";
/// Annotation on the bootstrap layer: the image's root Merkle digest (blake3, hex).
pub const ANN_ROOT_DIGEST: &str = "io.skiff.rafs.root-digest";
/// Annotation on a blob layer: `"true"` on the prefetch blob (`skiff convert
/// --prefetch-list`), which holds the listed files' chunks once more, in list order.
pub const ANN_PREFETCH_BLOB: &str = "io.skiff.rafs.prefetch-blob";
/// Nydus's marker of a data-blob layer (kept so Nydus-aware tools see the shape they expect).
pub const ANN_NYDUS_BLOB: &str = "containerd.io/snapshot/nydus-blob";
/// Nydus's marker of the bootstrap layer.
pub const ANN_NYDUS_BOOTSTRAP: &str = "containerd.io/snapshot/nydus-bootstrap";
/// Manifest annotation: the source image the Skiff image was converted from.
pub const ANN_SOURCE: &str = "io.skiff.rafs.source";

/// Largest manifest, index or config accepted.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// A content descriptor.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type.
    pub media_type: String,
    /// `sha256:…`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Platform (index entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

impl Descriptor {
    /// Checks the digest's form.
    pub fn validate(&self) -> Result<(), OciError> {
        super::reference::check_digest(&self.digest).map_err(OciError::Invalid)
    }
}

/// The platform of an index entry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Platform {
    /// `amd64`, `arm64`, …
    pub architecture: String,
    /// `linux`, …
    pub os: String,
    /// `v8`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image manifest (OCI or Docker schema 2; the fields are the same).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    /// Always 2.
    pub schema_version: u32,
    /// The manifest's media type, if it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// The layers, lowest first.
    pub layers: Vec<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image index or Docker manifest list.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    /// Always 2.
    pub schema_version: u32,
    /// The manifests.
    pub manifests: Vec<Descriptor>,
}

/// A manifest or an index, as fetched.
pub enum Fetched {
    /// An image manifest.
    Manifest(ImageManifest),
    /// An index; pick a platform.
    Index(ImageIndex),
}

/// Parses a manifest or index of media type `media_type` (from the `Content-Type` or the
/// document's own `mediaType`).
pub fn parse_manifest(bytes: &[u8], media_type: Option<&str>) -> Result<Fetched, OciError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        schema_version: Option<u32>,
    }
    let bad = |e: serde_json::Error| OciError::Invalid(format!("manifest: {e}"));
    let probe: Probe = serde_json::from_slice(bytes).map_err(bad)?;
    if probe.schema_version != Some(2) {
        return Err(OciError::Invalid(format!(
            "manifest schema version {:?} is not supported (only 2)",
            probe.schema_version
        )));
    }
    let mt = probe
        .media_type
        .as_deref()
        .or(media_type)
        .map(|m| m.split(';').next().unwrap_or(m).trim().to_string());
    let is_index = match mt.as_deref() {
        Some(OCI_INDEX | DOCKER_MANIFEST_LIST) => true,
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
        _ => probe.manifests.is_some(),
    };
    if is_index {
        let i: ImageIndex = serde_json::from_slice(bytes).map_err(bad)?;
        for d in &i.manifests {
            d.validate()?;
        }
        Ok(Fetched::Index(i))
    } else {
        let m: ImageManifest = serde_json::from_slice(bytes).map_err(bad)?;
        m.config.validate()?;
        for d in &m.layers {
            d.validate()?;
        }
        Ok(Fetched::Manifest(m))
    }
}

/// The linux/amd64 entry of an index.
pub fn pick_platform(index: &ImageIndex) -> Result<&Descriptor, OciError> {
    index
        .manifests
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .or_else(|| {
            // An index without platforms (as some OCI layouts have) with one manifest.
            match index.manifests.as_slice() {
                [only] if only.platform.is_none() => Some(only),
                _ => None,
            }
        })
        .ok_or_else(|| OciError::Invalid("the index has no linux/amd64 manifest".into()))
}

/// `sha256:HEX` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Checks that `bytes` have digest `want`.
pub fn verify_digest(what: &str, bytes: &[u8], want: &str) -> Result<(), OciError> {
    let got = sha256_digest(bytes);
    if got != want {
        return Err(OciError::Digest {
            what: what.to_string(),
            got,
            want: want.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn index_and_manifest() {
        let idx = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST_LIST}","manifests":[
            {{"mediaType":"{DOCKER_MANIFEST}","digest":"{D}","size":1,"platform":{{"architecture":"arm64","os":"linux"}}}},
            {{"mediaType":"{DOCKER_MANIFEST}","digest":"{D}","size":2,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        match parse_manifest(idx.as_bytes(), None) {
            Ok(Fetched::Index(i)) => assert_eq!(pick_platform(&i).map(|d| d.size).ok(), Some(2)),
            _ => panic!("not an index"),
        }
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{OCI_CONFIG}","digest":"{D}","size":3}},"layers":[]}}"#
        );
        assert!(matches!(
            parse_manifest(m.as_bytes(), Some(OCI_MANIFEST)),
            Ok(Fetched::Manifest(_))
        ));
        let bad = m.replace(D, "sha256:xyz");
        assert!(parse_manifest(bad.as_bytes(), None).is_err());
        assert!(parse_manifest(br#"{"schemaVersion":1}"#, None).is_err());
    }
}
