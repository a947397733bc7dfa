//! `skiff-tree-lister --handles FILE`: what `open_by_handle_at(2)` reaches from FILE's
//! mount. Prints FILE's own handle and what opening it gives, then tries handles forged from
//! it (other node ids and generations, as a hostile guest would) and prints, for each that
//! opens, the first bytes of what it opened. The host checks that nothing outside the shared
//! directory ever shows up.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const MAX_HANDLE: usize = 128;

#[repr(C)]
struct Handle {
    bytes: u32,
    kind: i32,
    f: [u8; MAX_HANDLE],
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Opens `h` against `mount_fd`; returns the first bytes read (escaped), or the errno.
fn open_and_read(mount_fd: i32, h: &mut Handle) -> Result<String, i32> {
    // SAFETY: `h` is a valid file_handle of MAX_HANDLE bytes; the flags ask for a read-only fd.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_fd,
            h as *mut Handle,
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    } as i32;
    if fd < 0 {
        return Err(errno());
    }
    let mut buf = [0u8; 64];
    // SAFETY: `fd` is ours, `buf` is writable for its length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    Ok(if n < 0 {
        format!("(a directory or unreadable: errno {})", errno())
    } else {
        super::escape(&buf[..n as usize])
    })
}

pub fn probe(file: &Path) {
    let Ok(c) = CString::new(file.as_os_str().as_bytes()) else { return };
    let mut h = Handle { bytes: MAX_HANDLE as u32, kind: 0, f: [0; MAX_HANDLE] };
    let mut mount_id = 0i32;
    // SAFETY: `c` is a valid C string; `h` and `mount_id` are writable and live for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            c.as_ptr(),
            &mut h as *mut Handle,
            &mut mount_id as *mut i32,
            0,
        )
    };
    if r < 0 {
        println!("HANDLE name_to_handle_at errno {}", errno());
        return;
    }
    println!("HANDLE type {} bytes {}", h.kind, h.bytes);
    let dir = file.parent().unwrap_or(Path::new("/"));
    let Ok(d) = CString::new(dir.as_os_str().as_bytes()) else { return };
    // SAFETY: `d` is a valid C string.
    let mount_fd = unsafe { libc::open(d.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
    if mount_fd < 0 {
        println!("HANDLE open mount dir errno {}", errno());
        return;
    }
    match open_and_read(mount_fd, &mut h) {
        Ok(s) => println!("HANDLE own opened: {s}"),
        Err(e) => println!("HANDLE own errno {e}"),
    }
    // FUSE's handles are (node id high, node id low, generation) in 32-bit words: try the
    // node ids a daemon hands out first and some far away, with the generation kept and 0.
    let original = h.f;
    let mut opened = 0;
    let mut refused = 0;
    let ids = (1u64..=256).chain([1 << 20, 1 << 32, (1 << 56) + 1, u64::MAX]);
    for id in ids {
        for gen in [None, Some(0u32)] {
            h.f = original;
            h.f[0..4].copy_from_slice(&((id >> 32) as u32).to_ne_bytes());
            h.f[4..8].copy_from_slice(&(id as u32).to_ne_bytes());
            if let Some(g) = gen {
                h.f[8..12].copy_from_slice(&g.to_ne_bytes());
            }
            match open_and_read(mount_fd, &mut h) {
                Ok(s) => {
                    opened += 1;
                    println!("HANDLE forged {id} opened: {s}");
                }
                Err(_) => refused += 1,
            }
        }
    }
    println!("HANDLE forged opened {opened} refused {refused}");
}
