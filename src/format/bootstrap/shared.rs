//! A validated bootstrap in sealed memory, for the other daemons of the node to map, and taking
//! one that another daemon made without trusting it.
//!
//! The sealed region is a 4 KiB header followed by the Skiff tables (for a v6 bootstrap, the
//! tables it was transcoded into). The header names what the tables are the tables *of* (a
//! [`ShareKey`]), so that a daemon asking for its own bootstrap can tell. A daemon taking a
//! region checks the header, then validates the tables in place, as it would its own file
//! (which hashes every byte), and checks that they are the ones its own bootstrap names:
//!
//! - a Skiff bootstrap names its tables by their digest (the superblock's `file_digest`), so
//!   tables that validate with that digest are its tables, byte for byte;
//! - a v6 bootstrap does not: the daemon transcodes its own v6 bytes (with the owner and time
//!   stand-ins the header records, see [`v6::Defaults`]) and the result must have the shared
//!   tables' digest. It keeps the shared copy and drops its own.
//!
//! The region is sealed ([`SealedBytes`]): once validated it cannot change.

use zerocopy::little_endian::{I64, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{Bootstrap, Bytes};
use crate::format::sealed::{SealError, SealedBytes};
use crate::format::{v6, FormatError, Preserved, SourceFormat, DIGEST_LEN, MAGIC, SUPERBLOCK_SIZE};

/// Bytes before the tables in a sealed bootstrap: one page, so that the tables start on a page
/// of their own.
pub const SHARE_HEADER_LEN: usize = 4096;

const SHARE_MAGIC: [u8; 8] = *b"SKIFFSHR";
const SHARE_VERSION: u32 = 1;
const FORMAT_SKIFF: u8 = 1;
const FORMAT_V6: u8 = 2;

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ShareHeader {
    magic: [u8; 8],
    version: U32,
    /// [`FORMAT_SKIFF`] or [`FORMAT_V6`]: what the tables were loaded from.
    format: u8,
    /// [`Preserved`] as bits: directory sizes, root mtime, owners.
    preserved: u8,
    reserved0: [u8; 2],
    /// Bytes of tables after the header.
    tables_len: U64,
    /// [`ShareKey::id`] of the bootstrap the tables are of.
    key: [u8; DIGEST_LEN],
    /// The tables' `file_digest`.
    file_digest: [u8; DIGEST_LEN],
    /// The v6 stand-ins the tables were transcoded with (zero for a Skiff bootstrap).
    uid: U32,
    gid: U32,
    now: I64,
}

/// What a shared bootstrap is the bootstrap of: what a daemon computes from its own bootstrap
/// to ask for a shared copy, and what the copy's header must name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShareKey {
    /// A Skiff bootstrap, named by its tables' digest.
    Skiff {
        /// The superblock's `file_digest`.
        file_digest: [u8; DIGEST_LEN],
    },
    /// A Nydus RAFS v6 bootstrap, named by the blake3 of its bytes, as transcoded for an owner
    /// (a v6 image without owners reports the loading process's).
    V6 {
        /// blake3 of the v6 bootstrap's bytes.
        source_digest: [u8; DIGEST_LEN],
        /// The effective uid it is transcoded for.
        uid: u32,
        /// The effective gid it is transcoded for.
        gid: u32,
    },
}

impl ShareKey {
    /// The key of the bootstrap whose first bytes are `prefix`, if a Skiff superblock tells it
    /// (a Skiff bootstrap needs no more than its superblock).
    pub fn of_skiff_prefix(prefix: &[u8]) -> Option<Self> {
        let (sb, _) = crate::format::Superblock::read_from_prefix(prefix).ok()?;
        (sb.magic == MAGIC).then_some(ShareKey::Skiff {
            file_digest: sb.file_digest,
        })
    }

    /// The key of the Skiff bootstrap file at `path`, if its bytes are the ones its superblock
    /// names: the file is read through once and hashed as the loader would, keeping nothing,
    /// so that a damaged file is never answered with another daemon's intact copy (it is
    /// loaded, and refused, as without sharing). `None` for anything else.
    pub fn of_skiff_file(path: &std::path::Path) -> Option<Self> {
        use std::io::Read;
        let mut f = std::fs::File::open(path).ok()?;
        if f.metadata().ok()?.len() > crate::format::MAX_BOOTSTRAP_SIZE {
            return None;
        }
        let mut prefix = [0u8; SUPERBLOCK_SIZE];
        f.read_exact(&mut prefix).ok()?;
        let (sb, _) = crate::format::Superblock::read_from_prefix(&prefix[..]).ok()?;
        if sb.magic != MAGIC {
            return None;
        }
        let mut zeroed = sb;
        zeroed.file_digest = [0; DIGEST_LEN];
        let mut h = blake3::Hasher::new();
        h.update(zeroed.as_bytes());
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    h.update(&buf[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
        (*h.finalize().as_bytes() == sb.file_digest).then_some(ShareKey::Skiff {
            file_digest: sb.file_digest,
        })
    }

    /// The key of the whole bootstrap `data` for this process: a Skiff or a v6 bootstrap
    /// (`None` for anything else, which no daemon could share).
    ///
    /// As for a file, a Skiff bootstrap has a key only if its bytes hash to the digest its
    /// superblock names: a damaged one is never given another daemon's intact copy.
    pub fn of_bytes(data: &[u8]) -> Option<Self> {
        if let Some(k) = Self::of_skiff_prefix(data.get(..SUPERBLOCK_SIZE)?) {
            let (sb, rest) = crate::format::Superblock::read_from_prefix(data).ok()?;
            let mut zeroed = sb;
            zeroed.file_digest = [0; DIGEST_LEN];
            let mut h = blake3::Hasher::new();
            h.update(zeroed.as_bytes());
            h.update(rest);
            return (*h.finalize().as_bytes() == sb.file_digest).then_some(k);
        }
        if !v6::is_v6(data) {
            return None;
        }
        let d = v6::Defaults::of_this_process();
        Some(ShareKey::V6 {
            source_digest: *blake3::hash(data).as_bytes(),
            uid: d.uid,
            gid: d.gid,
        })
    }

    /// A digest of everything the key says.
    pub fn id(&self) -> [u8; DIGEST_LEN] {
        let mut h = blake3::Hasher::new();
        h.update(b"skiff shared bootstrap v1\0");
        match self {
            ShareKey::Skiff { file_digest } => {
                h.update(&[FORMAT_SKIFF]);
                h.update(file_digest);
            }
            ShareKey::V6 {
                source_digest,
                uid,
                gid,
            } => {
                h.update(&[FORMAT_V6]);
                h.update(source_digest);
                h.update(&uid.to_le_bytes());
                h.update(&gid.to_le_bytes());
            }
        }
        *h.finalize().as_bytes()
    }

    /// A short name for file names and logs: the first 16 bytes of [`Self::id`] in hex. A
    /// name says which copy to ask for; what is taken is checked against the whole key.
    pub fn name(&self) -> String {
        hex::encode(&self.id()[..16])
    }
}

/// Why a shared bootstrap was not taken (the daemon then loads its own copy).
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// The region is not sealed memory.
    #[error("not sealed memory")]
    Seal(#[source] SealError),
    /// The header is not a share header of this version.
    #[error("bad share header: {0}")]
    Header(String),
    /// The header names another bootstrap.
    #[error("the shared tables are of another bootstrap")]
    OtherImage,
    /// The tables are invalid.
    #[error("the shared tables are invalid")]
    Invalid(#[source] FormatError),
    /// The daemon's own bootstrap is invalid (a v6 bootstrap it transcoded to compare).
    #[error("this daemon's own bootstrap is invalid")]
    Own(#[source] FormatError),
    /// The tables are valid but not the ones the daemon's own bootstrap gives.
    #[error("the shared tables differ from those of this daemon's bootstrap")]
    Differs,
}

fn preserved_bits(p: Preserved) -> u8 {
    u8::from(p.directory_sizes) | u8::from(p.root_mtime) << 1 | u8::from(p.owners) << 2
}

impl Bootstrap {
    /// Moves the tables into sealed memory whose header names `key` (with `defaults`, the
    /// stand-ins a v6 bootstrap was transcoded with), and keeps them there: the bootstrap then
    /// holds no copy of its own, and [`Self::sealed_fd`] can be handed to other daemons.
    ///
    /// `key` must be the key of the bootstrap these tables were loaded from: the loader's
    /// promise, which every taker checks. On failure the bootstrap comes back unchanged, with
    /// the error.
    pub fn into_shared(
        self,
        key: &ShareKey,
        defaults: Option<v6::Defaults>,
    ) -> Result<Self, Box<(Self, SealError)>> {
        if matches!(self.data, Bytes::Sealed(_)) {
            return Ok(self);
        }
        let d = defaults.unwrap_or(v6::Defaults {
            uid: 0,
            gid: 0,
            now: 0,
        });
        let header = ShareHeader {
            magic: SHARE_MAGIC,
            version: U32::new(SHARE_VERSION),
            format: match self.format {
                SourceFormat::Skiff => FORMAT_SKIFF,
                SourceFormat::NydusRafsV6 => FORMAT_V6,
            },
            preserved: preserved_bits(self.preserved),
            reserved0: [0; 2],
            tables_len: U64::new(self.data.len() as u64),
            key: key.id(),
            file_digest: self.file_digest,
            uid: U32::new(d.uid),
            gid: U32::new(d.gid),
            now: I64::new(d.now),
        };
        let mut page = vec![0u8; SHARE_HEADER_LEN];
        page[..size_of::<ShareHeader>()].copy_from_slice(header.as_bytes());
        let name = format!("skiff-bootstrap-{}", key.name());
        match SealedBytes::create(&name, &[&page, &self.data]) {
            Ok(sealed) => {
                // The same bytes, so the same table ranges: nothing to validate again.
                let mut b = self;
                b.data = Bytes::Sealed(sealed);
                Ok(b)
            }
            Err(e) => Err(Box::new((self, e))),
        }
    }

    /// The sealed memfd holding the tables, if they are in one.
    pub fn sealed_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        match &self.data {
            Bytes::Sealed(s) => Some(s.fd()),
            Bytes::Owned(_) => None,
        }
    }

    /// Takes the tables another daemon sealed, as the bootstrap `key` names: checks the
    /// header, validates the tables in place (no copy), and checks they are the ones `key`
    /// names. For a v6 key, `v6_source` is this daemon's own v6 bootstrap: it is transcoded
    /// here, and the result must be the shared tables (by digest); it is dropped at once.
    pub fn from_shared(
        sealed: SealedBytes,
        key: &ShareKey,
        v6_source: Option<&[u8]>,
    ) -> Result<Self, SharedError> {
        let bytes = sealed.bytes();
        let header = bytes
            .get(..SHARE_HEADER_LEN)
            .and_then(|h| ShareHeader::read_from_prefix(h).ok())
            .map(|(h, _)| h)
            .ok_or_else(|| SharedError::Header("shorter than the header".into()))?;
        if header.magic != SHARE_MAGIC || header.version.get() != SHARE_VERSION {
            return Err(SharedError::Header(
                "not a share header of version 1".into(),
            ));
        }
        if header.reserved0 != [0; 2]
            || bytes
                .get(size_of::<ShareHeader>()..SHARE_HEADER_LEN)
                .is_none_or(|pad| pad.iter().any(|&b| b != 0))
        {
            return Err(SharedError::Header("reserved bytes are not zero".into()));
        }
        if header.tables_len.get() != (bytes.len() - SHARE_HEADER_LEN) as u64 {
            return Err(SharedError::Header(format!(
                "{} bytes of tables announced, {} there",
                header.tables_len.get(),
                bytes.len() - SHARE_HEADER_LEN
            )));
        }
        if header.key != key.id() {
            return Err(SharedError::OtherImage);
        }
        let (format, own) = match key {
            ShareKey::Skiff { .. } if header.format == FORMAT_SKIFF => (SourceFormat::Skiff, None),
            ShareKey::V6 {
                source_digest,
                uid,
                gid,
            } if header.format == FORMAT_V6 => {
                let source = v6_source.ok_or(SharedError::Differs)?;
                if blake3::hash(source).as_bytes() != source_digest {
                    return Err(SharedError::OtherImage);
                }
                let defaults = v6::Defaults {
                    uid: *uid,
                    gid: *gid,
                    now: header.now.get(),
                };
                // This daemon's own transcoding, kept only for its digest and what it
                // preserves: equal digests mean the shared tables are these bytes.
                let (tables, preserved) = v6::transcode(source, defaults)
                    .map_err(|e| SharedError::Own(FormatError::V6(e)))?;
                let digest = crate::format::Superblock::read_from_prefix(&tables)
                    .map(|(sb, _)| sb.file_digest)
                    .map_err(|_| {
                        SharedError::Own(FormatError::Truncated {
                            len: tables.len() as u64,
                        })
                    })?;
                drop(tables);
                (SourceFormat::NydusRafsV6, Some((digest, preserved)))
            }
            _ => return Err(SharedError::OtherImage),
        };
        let mut b =
            Bootstrap::validated(Bytes::Sealed(sealed), format).map_err(SharedError::Invalid)?;
        if b.file_digest != header.file_digest {
            return Err(SharedError::Invalid(FormatError::FileDigestMismatch));
        }
        match (key, own) {
            (ShareKey::Skiff { file_digest }, _) => {
                if &b.file_digest != file_digest {
                    return Err(SharedError::Differs);
                }
            }
            (ShareKey::V6 { .. }, Some((digest, preserved))) => {
                if digest != b.file_digest || preserved_bits(preserved) != header.preserved {
                    return Err(SharedError::Differs);
                }
                b.preserved = preserved;
            }
            (ShareKey::V6 { .. }, None) => return Err(SharedError::Differs),
        }
        Ok(b)
    }
}
