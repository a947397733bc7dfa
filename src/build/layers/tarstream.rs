//! Reading a tar stream entry by entry, with bounded memory.
//!
//! The `tar` crate decodes the fields of each 512-byte header; the framing (extension headers,
//! content, padding) is done here rather than by `tar::Archive` for two reasons:
//!
//! - its pax parser splits records on `'\n'`, so a binary xattr value containing that byte
//!   (a `security.capability` often does) makes the whole pax header unreadable, when the record
//!   length prefix says exactly where each record ends;
//! - it reads pax and GNU long-name extension data with `read_to_end`, unbounded: a
//!   decompression bomb there would exhaust memory. Here every extension is capped.
//!
//! Content is never buffered: the caller reads it in pieces through [`TarStream::read_content`].

use std::collections::BTreeMap;
use std::io::{self, Read};

use tar::{EntryType, Header};

use crate::format::{MAX_XATTR_NAME_LEN, MAX_XATTR_VALUE_LEN};

/// Tar block size.
const BLOCK: u64 = 512;

/// Largest pax extended header or GNU long name accepted, in bytes. Generous for any real path
/// or set of xattrs (each value is at most 64 KiB), small enough that a hostile one costs
/// nothing.
const MAX_EXTENSION_BYTES: u64 = 1 << 20;

/// Pax key prefix of an extended attribute (as written by GNU tar, Go's archive/tar, Docker).
const PAX_XATTR: &[u8] = b"SCHILY.xattr.";

/// What an entry is, from its type flag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A regular file; its content follows.
    File,
    /// A directory.
    Dir,
    /// A symbolic link to the target.
    Symlink(Vec<u8>),
    /// A hard link to an earlier path (as written in the tar, not normalised).
    HardLink(Vec<u8>),
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A named pipe.
    Fifo,
}

/// One entry, with its extensions (pax records, GNU long names) already merged in.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The path as written in the archive (not normalised).
    pub path: Vec<u8>,
    /// What it is.
    pub kind: Kind,
    /// Permission bits, including setuid, setgid and sticky (no file-type bits).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number (devices only).
    pub rdev: u64,
    /// Modification time: seconds, nanoseconds.
    pub mtime: (i64, u32),
    /// Change time: pax `ctime` if present, else the modification time.
    pub ctime: (i64, u32),
    /// Extended attributes from `SCHILY.xattr.*` records.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Bytes of content that follow (0 for anything but regular files).
    pub size: u64,
}

/// A tar stream read entry by entry.
pub struct TarStream<R> {
    inner: R,
    /// Bytes consumed from `inner`, for messages.
    offset: u64,
    /// Content of the current entry not yet read.
    remaining: u64,
    /// Padding after the current entry's content.
    padding: u64,
    /// The current entry's path, for messages.
    current: Vec<u8>,
}

/// Why reading the stream failed; the message names the entry when one is known.
pub type TarError = String;

fn io_msg(what: &str, e: &io::Error) -> TarError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        format!("{what}: archive truncated")
    } else {
        format!("{what}: {e}")
    }
}

/// `bytes` quoted and escaped for a one-line message.
pub fn show(bytes: &[u8]) -> String {
    const MAX: usize = 200;
    let s = String::from_utf8_lossy(bytes);
    let mut out: String = s
        .chars()
        .take(MAX)
        .collect::<String>()
        .escape_debug()
        .collect();
    if s.chars().count() > MAX {
        out.push_str("...");
    }
    format!("\"{out}\"")
}

/// Extension data gathered for the next real entry.
#[derive(Default)]
struct Pending {
    pax: Vec<PaxRecord>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    any: bool,
}

impl<R: Read> TarStream<R> {
    /// A stream over decompressed tar bytes.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            offset: 0,
            remaining: 0,
            padding: 0,
            current: Vec::new(),
        }
    }

    /// Reads a whole block; `Ok(false)` on a clean end of stream before any byte.
    fn read_block(&mut self, buf: &mut [u8; BLOCK as usize]) -> io::Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.offset += BLOCK;
        Ok(true)
    }

    fn skip(&mut self, n: u64) -> io::Result<()> {
        let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
        self.offset += copied;
        if copied != n {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// Reads the content of an extension header, refusing more than the cap.
    fn read_extension(&mut self, size: u64, what: &str) -> Result<Vec<u8>, TarError> {
        if size > MAX_EXTENSION_BYTES {
            return Err(format!(
                "{what} of {size} bytes is larger than the {MAX_EXTENSION_BYTES}-byte limit"
            ));
        }
        // At most 1 MiB, checked above.
        let mut data = vec![0u8; size as usize];
        self.inner
            .read_exact(&mut data)
            .map_err(|e| io_msg(what, &e))?;
        self.offset += size;
        self.skip(pad(size)).map_err(|e| io_msg(what, &e))?;
        Ok(data)
    }

    /// Reads what is left of the stream after the end-of-archive marker (padding, further
    /// records), so that a reader that checks a digest at its end gets to check it.
    pub fn drain(&mut self) -> io::Result<u64> {
        let n = io::copy(&mut self.inner, &mut io::sink())?;
        self.offset += n;
        Ok(n)
    }

    /// Reads content of the current entry into all of `buf`; fails if the entry has fewer bytes
    /// left or the stream ends early.
    pub fn read_content(&mut self, buf: &mut [u8]) -> io::Result<()> {
        if buf.len() as u64 > self.remaining {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read past the end of the entry",
            ));
        }
        self.inner.read_exact(buf)?;
        self.remaining -= buf.len() as u64;
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// The next entry, or `None` at the end of the archive. Content of the previous entry that
    /// was not read is skipped.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, TarError> {
        // Saturating: a hostile size near 2^64 then just runs into the end of the stream.
        let rest = self.remaining.saturating_add(self.padding);
        self.remaining = 0;
        self.padding = 0;
        self.skip(rest).map_err(|e| {
            io_msg(
                &format!("entry {}: skipping content", show(&self.current)),
                &e,
            )
        })?;
        let mut pending = Pending::default();
        loop {
            let at = self.offset;
            let mut header = Header::new_old();
            let read = self
                .read_block(header.as_mut_bytes())
                .map_err(|e| io_msg(&format!("header at offset {at}"), &e))?;
            // End of archive: end of stream, or a zero block (normally two; what follows the
            // first is padding and is not read).
            if !read || header.as_bytes().iter().all(|&b| b == 0) {
                if pending.any {
                    return Err(format!(
                        "extension header at the end of the archive, before offset {at}"
                    ));
                }
                return Ok(None);
            }
            check_sum(&header).map_err(|e| format!("header at offset {at}: {e}"))?;
            let size = header
                .entry_size()
                .map_err(|e| format!("header at offset {at}: bad size field: {e}"))?;
            match header.entry_type() {
                EntryType::XHeader => {
                    let data = self.read_extension(size, "pax header")?;
                    let records =
                        parse_pax(&data).map_err(|e| format!("pax header at offset {at}: {e}"))?;
                    pending.pax.extend(records);
                    pending.any = true;
                }
                EntryType::GNULongName => {
                    pending.long_name = Some(c_string(self.read_extension(size, "GNU long name")?));
                    pending.any = true;
                }
                EntryType::GNULongLink => {
                    pending.long_link =
                        Some(c_string(self.read_extension(size, "GNU long link name")?));
                    pending.any = true;
                }
                _ if is_ignored(&header) => {
                    self.skip(size.checked_add(pad(size)).ok_or("size overflow")?)
                        .map_err(|e| io_msg(&format!("extension at offset {at}"), &e))?;
                }
                _ => return self.finish_entry(&header, size, pending).map(Some),
            }
        }
    }

    /// Builds the entry from its header and the extensions before it.
    fn finish_entry(&mut self, header: &Header, size: u64, p: Pending) -> Result<Entry, TarError> {
        // A bad record is reported once the path (which may itself come from a record) is known.
        let mut pax = PaxFields::default();
        let mut pax_err = None;
        for (k, v) in &p.pax {
            if let Err(e) = pax.add(k, v) {
                pax_err.get_or_insert(e);
            }
        }
        let path = pax
            .path
            .clone()
            .or(p.long_name)
            .unwrap_or_else(|| header.path_bytes().into_owned());
        let name = show(&path);
        let err = |what: String| format!("entry {name}: {what}");
        if let Some(e) = pax_err {
            return Err(err(e));
        }
        let link = pax
            .linkpath
            .clone()
            .or(p.long_link)
            .or_else(|| header.link_name_bytes().map(|l| l.into_owned()));
        let size = pax.size.unwrap_or(size);
        let type_byte = header.as_old().linkflag[0];
        let link_target = || {
            link.clone()
                .filter(|l| !l.is_empty())
                .ok_or_else(|| err("link without a target".into()))
        };
        let kind = match header.entry_type() {
            // Old-style tars mark directories with a trailing slash on a plain-file type.
            EntryType::Regular if type_byte == 0 && path.ends_with(b"/") => Kind::Dir,
            EntryType::Regular | EntryType::Continuous => Kind::File,
            EntryType::Directory => Kind::Dir,
            EntryType::Symlink => Kind::Symlink(link_target()?),
            EntryType::Link => Kind::HardLink(link_target()?),
            EntryType::Char => Kind::Char,
            EntryType::Block => Kind::Block,
            EntryType::Fifo => Kind::Fifo,
            EntryType::GNUSparse => return Err(err("GNU sparse files are not supported".into())),
            _ => {
                return Err(err(format!(
                    "unsupported entry type {:?}",
                    char::from(type_byte)
                )))
            }
        };
        if pax.sparse {
            return Err(err("GNU sparse files are not supported".into()));
        }
        let perm = header
            .mode()
            .map_err(|e| err(format!("bad mode field: {e}")))?
            & 0o7777;
        let uid = match pax.uid {
            Some(u) => u,
            None => header
                .uid()
                .map_err(|e| err(format!("bad uid field: {e}")))?,
        };
        let gid = match pax.gid {
            Some(g) => g,
            None => header
                .gid()
                .map_err(|e| err(format!("bad gid field: {e}")))?,
        };
        let uid =
            u32::try_from(uid).map_err(|_| err(format!("uid {uid} does not fit in 32 bits")))?;
        let gid =
            u32::try_from(gid).map_err(|_| err(format!("gid {gid} does not fit in 32 bits")))?;
        let mtime = match pax.mtime {
            Some(t) => t,
            // A 12-byte base-256 field holds a two's-complement value: its low 64 bits read as
            // u64 and reinterpreted give negative times right; octal fields are at most 2^33.
            None => (
                header
                    .mtime()
                    .map_err(|e| err(format!("bad mtime field: {e}")))? as i64,
                0,
            ),
        };
        let ctime = pax.ctime.unwrap_or(mtime);
        let rdev = if matches!(kind, Kind::Char | Kind::Block) {
            let major = header
                .device_major()
                .map_err(|e| err(format!("bad device major: {e}")))?
                .unwrap_or(0);
            let minor = header
                .device_minor()
                .map_err(|e| err(format!("bad device minor: {e}")))?
                .unwrap_or(0);
            libc::makedev(major, minor)
        } else {
            0
        };
        // As in Go's archive/tar (which wrote most layers): only regular files carry data; the
        // size field of links, directories and devices is ignored.
        let data = if kind == Kind::File { size } else { 0 };
        self.remaining = data;
        self.padding = pad(data);
        self.current.clone_from(&path);
        Ok(Entry {
            path,
            kind,
            perm,
            uid,
            gid,
            rdev,
            mtime,
            ctime,
            xattrs: pax.xattrs,
            size: data,
        })
    }
}

/// Global pax headers (git archive writes a comment there) apply to no field we use; a volume
/// label is not a file.
fn is_ignored(h: &Header) -> bool {
    h.entry_type() == EntryType::XGlobalHeader || h.as_old().linkflag[0] == b'V'
}

/// Padding after `size` bytes of content up to the next block.
fn pad(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

/// The bytes before the first NUL.
fn c_string(mut v: Vec<u8>) -> Vec<u8> {
    if let Some(i) = v.iter().position(|&b| b == 0) {
        v.truncate(i);
    }
    v
}

/// Checks the header checksum, accepting both the unsigned sum (the standard) and the signed
/// sum some old tars wrote.
fn check_sum(h: &Header) -> Result<(), String> {
    let stored = h.cksum().map_err(|e| format!("bad checksum field: {e}"))?;
    let bytes = h.as_bytes();
    let field = 148..156;
    let mut unsigned: u32 = 0;
    let mut signed: i32 = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let b = if field.contains(&i) { b' ' } else { b };
        unsigned += u32::from(b);
        signed += i32::from(b as i8);
    }
    if stored == unsigned || i64::from(stored) == i64::from(signed) {
        Ok(())
    } else {
        Err("checksum mismatch (not a tar archive, or damaged)".into())
    }
}

/// One pax record: key, value.
pub type PaxRecord = (Vec<u8>, Vec<u8>);

/// Splits pax extended header data into records. Each is `"LEN KEY=VALUE\n"` where `LEN` counts
/// the whole record, so a value may hold any byte, newlines included.
pub fn parse_pax(mut data: &[u8]) -> Result<Vec<PaxRecord>, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let space = data
            .iter()
            .take(20)
            .position(|&b| b == b' ')
            .ok_or("malformed pax record length")?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .ok_or("malformed pax record length")?;
        if len <= space + 1 || len > data.len() {
            return Err("pax record length out of range".into());
        }
        let (record, rest) = data.split_at(len);
        data = rest;
        let body = record[space + 1..]
            .strip_suffix(b"\n")
            .ok_or("pax record does not end with a newline")?;
        let eq = body
            .iter()
            .position(|&b| b == b'=')
            .ok_or("pax record without '='")?;
        if eq == 0 {
            return Err("pax record with an empty key".into());
        }
        out.push((body[..eq].to_vec(), body[eq + 1..].to_vec()));
    }
    Ok(out)
}

/// The pax records this reader uses, decoded.
#[derive(Default)]
struct PaxFields {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<(i64, u32)>,
    ctime: Option<(i64, u32)>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    sparse: bool,
}

impl PaxFields {
    fn add(&mut self, key: &[u8], value: &[u8]) -> Result<(), String> {
        let bad = || format!("bad pax {} value {}", show(key), show(value));
        if let Some(name) = key.strip_prefix(PAX_XATTR) {
            if name.is_empty() || name.len() > MAX_XATTR_NAME_LEN || name.contains(&0) {
                return Err(format!("invalid xattr name {}", show(name)));
            }
            if value.len() > MAX_XATTR_VALUE_LEN {
                return Err(format!(
                    "xattr {} value of {} bytes is too large",
                    show(name),
                    value.len()
                ));
            }
            self.xattrs.insert(name.to_vec(), value.to_vec());
            return Ok(());
        }
        if key.starts_with(b"GNU.sparse.") {
            self.sparse = true;
            return Ok(());
        }
        // An empty value removes a keyword set by a global header: for us, it is as if absent.
        if value.is_empty() {
            return Ok(());
        }
        match key {
            b"path" => self.path = Some(value.to_vec()),
            b"linkpath" => self.linkpath = Some(value.to_vec()),
            b"size" => self.size = Some(parse_decimal(value).ok_or_else(bad)?),
            b"uid" => self.uid = Some(parse_decimal(value).ok_or_else(bad)?),
            b"gid" => self.gid = Some(parse_decimal(value).ok_or_else(bad)?),
            b"mtime" => self.mtime = Some(parse_time(value).ok_or_else(bad)?),
            b"ctime" => self.ctime = Some(parse_time(value).ok_or_else(bad)?),
            // atime, uname, gname, comment, charset and vendor keys do not go into an image.
            _ => {}
        }
        Ok(())
    }
}

fn parse_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Parses a pax time, `[-]SECONDS[.FRACTION]`, exactly: digits beyond nanoseconds are
/// truncated, and a negative time keeps a non-negative nanosecond part (-1.25 is -2 s + 0.75 s).
pub fn parse_time(v: &[u8]) -> Option<(i64, u32)> {
    let (neg, v) = match v.strip_prefix(b"-") {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let (int, frac) = match v.iter().position(|&b| b == b'.') {
        Some(i) => (&v[..i], Some(&v[i + 1..])),
        None => (v, None),
    };
    if int.is_empty() || !int.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let secs: i64 = std::str::from_utf8(int).ok()?.parse().ok()?;
    let mut nsec: u32 = 0;
    if let Some(f) = frac {
        if f.is_empty() || !f.iter().all(u8::is_ascii_digit) {
            return None;
        }
        for i in 0..9 {
            nsec = nsec * 10 + f.get(i).map_or(0, |d| u32::from(d - b'0'));
        }
    }
    if !neg {
        return Some((secs, nsec));
    }
    if nsec == 0 {
        Some((secs.checked_neg()?, 0))
    } else {
        Some((secs.checked_neg()?.checked_sub(1)?, 1_000_000_000 - nsec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_time(b"1700000000.123456789"),
            Some((1_700_000_000, 123_456_789))
        );
        assert_eq!(
            parse_time(b"1700000000.1234567891234"),
            Some((1_700_000_000, 123_456_789))
        );
        assert_eq!(
            parse_time(b"1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(parse_time(b"42"), Some((42, 0)));
        assert_eq!(parse_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_time(b"-3"), Some((-3, 0)));
        for bad in [
            &b""[..],
            b"-",
            b".5",
            b"1.",
            b"1.2.3",
            b"1e9",
            b" 1",
            b"99999999999999999999",
        ] {
            assert_eq!(parse_time(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn pax_records_with_binary_values() {
        let value = b"a\nb=c\0";
        let key = b"SCHILY.xattr.security.capability";
        let body_len = key.len() + 1 + value.len() + 1;
        // The length counts itself: find the fixed point.
        let mut len = body_len + 2;
        while format!("{len} ").len() + body_len != len {
            len += 1;
        }
        let mut data = format!("{len} ").into_bytes();
        data.extend_from_slice(key);
        data.push(b'=');
        data.extend_from_slice(value);
        data.push(b'\n');
        data.extend_from_slice(b"12 path=abc\n");
        let r = parse_pax(&data).expect("parses");
        assert_eq!(
            r,
            vec![
                (key.to_vec(), value.to_vec()),
                (b"path".to_vec(), b"abc".to_vec())
            ]
        );
        assert!(parse_pax(b"99 path=abc\n").is_err());
        assert!(parse_pax(b"11 path=abc").is_err());
        assert!(parse_pax(b"x path=abc\n").is_err());
        assert!(parse_pax(b"3 =\n").is_err());
    }
}
