//! `skiff-tree-lister DIR`: prints one line per entry under DIR with every field an image must
//! preserve, in a form two runs can be compared with `diff`: the same program runs on the host
//! over the source and in the microVM over the virtio-fs mount.
//!
//! Line: `path type mode uid gid size mtime rdev nlink link-group target sha256 xattrs`, tab
//! separated; bytes outside printable ASCII (and `\`, tab) are written as `\xNN`.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

mod handles;

fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_graphic() && b != b'\\' || b == b' ' {
            s.push(b as char);
        } else {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s
}

fn xattrs(path: &Path) -> String {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else { return "?".into() };
    let mut names = vec![0u8; 65536];
    // SAFETY: `c` is a valid C string and `names` a writable buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        return String::new();
    }
    let mut out = BTreeMap::new();
    for name in names[..n as usize].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let Ok(cn) = CString::new(name) else { continue };
        let mut value = vec![0u8; 65536];
        // SAFETY: both strings are valid C strings and `value` a writable buffer of its length.
        let v = unsafe {
            libc::lgetxattr(c.as_ptr(), cn.as_ptr(), value.as_mut_ptr().cast(), value.len())
        };
        let v = if v < 0 { "?".to_string() } else { value[..v as usize].iter().map(|b| format!("{b:02x}")).collect() };
        out.insert(escape(name), v);
    }
    out.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";")
}

fn sha256(path: &Path) -> String {
    let Ok(mut f) = std::fs::File::open(path) else { return "unreadable".into() };
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) => return format!("error-{}", e.raw_os_error().unwrap_or(0)),
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn main() {
    if std::env::args_os().nth(1).is_some_and(|a| a == "--handles") {
        let Some(file) = std::env::args_os().nth(2).map(PathBuf::from) else {
            eprintln!("usage: skiff-tree-lister --handles FILE");
            std::process::exit(2);
        };
        handles::probe(&file);
        return;
    }
    let Some(root) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: skiff-tree-lister DIR");
        std::process::exit(2);
    };
    // First pass: every path with its metadata; hard-link groups need all paths first.
    let mut entries: Vec<(Vec<u8>, PathBuf, std::fs::Metadata)> = Vec::new();
    let mut stack = vec![(b"/".to_vec(), root.clone())];
    while let Some((rel, host)) = stack.pop() {
        let m = match std::fs::symlink_metadata(&host) {
            Ok(m) => m,
            Err(e) => {
                println!("{}\tERROR {e}", escape(&rel));
                continue;
            }
        };
        if m.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&host) {
                for e in rd.flatten() {
                    let name = e.file_name();
                    let mut r = rel.clone();
                    if r.len() > 1 {
                        r.push(b'/');
                    }
                    r.extend_from_slice(name.as_bytes());
                    stack.push((r, host.join(OsStr::from_bytes(name.as_bytes()))));
                }
            } else {
                println!("{}\tERROR unreadable directory", escape(&rel));
            }
        }
        entries.push((rel, host, m));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut group: BTreeMap<(u64, u64), Vec<u8>> = BTreeMap::new();
    for (rel, _, m) in &entries {
        if !m.is_dir() {
            group.entry((m.dev(), m.ino())).or_insert_with(|| rel.clone());
        }
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for (rel, host, m) in &entries {
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_char_device() {
            "chr"
        } else if ft.is_block_device() {
            "blk"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "sock"
        };
        let rdev = if ft.is_char_device() || ft.is_block_device() {
            format!("{}:{}", libc::major(m.rdev()), libc::minor(m.rdev()))
        } else {
            "-".into()
        };
        let target = if ft.is_symlink() {
            std::fs::read_link(host).map(|t| escape(t.as_os_str().as_bytes())).unwrap_or_else(|_| "?".into())
        } else {
            "-".into()
        };
        let digest = if ft.is_file() { sha256(host) } else { "-".into() };
        let link_group = if ft.is_dir() {
            "-".to_string()
        } else {
            group.get(&(m.dev(), m.ino())).map(|g| escape(g)).unwrap_or_default()
        };
        let _ = writeln!(
            out,
            "{}\t{kind}\t{:o}\t{}\t{}\t{}\t{}.{:09}\t{rdev}\t{}\t{link_group}\t{target}\t{digest}\t{}",
            escape(rel),
            m.mode(),
            m.uid(),
            m.gid(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.nlink(),
            xattrs(host),
        );
    }
}
