//! What confinement shows from outside: each thread's `/proc/<pid>/task/<tid>/status`.

use std::fs;

/// One thread of a process, as `/proc/<pid>/task/<tid>/status` shows it.
#[derive(Debug)]
pub struct ThreadStatus {
    /// The thread's name (`comm`).
    pub name: String,
    /// `NoNewPrivs`.
    pub no_new_privs: String,
    /// `Seccomp` (2: filter mode).
    pub seccomp: String,
    /// `CapEff`, as a mask.
    pub cap_eff: u64,
}

/// Every thread of process `pid`.
pub fn threads_of(pid: u32) -> Vec<ThreadStatus> {
    let mut out = Vec::new();
    for t in fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/<pid>/task") {
        let t = t.expect("task entry").path();
        let Ok(status) = fs::read_to_string(t.join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        out.push(ThreadStatus {
            name: field("Name:"),
            no_new_privs: field("NoNewPrivs:"),
            seccomp: field("Seccomp:"),
            cap_eff: u64::from_str_radix(&field("CapEff:"), 16).expect("CapEff"),
        });
    }
    out
}

/// The capabilities `skiff virtiofs` keeps (docs/kata.md#the-sandbox): chown, dac_override,
/// fowner, fsetid, setgid, setuid, mknod, sys_admin, setfcap.
pub const VIRTIOFS_CAPS: u64 = 0x8820_00db;

/// Asserts that every thread of `pid` runs with no_new_privs, a seccomp filter and exactly
/// `caps`, and that threads whose names start with each of `kinds` are among them; returns
/// the names.
pub fn assert_confined(pid: u32, caps: u64, kinds: &[&str]) -> Vec<String> {
    let threads = threads_of(pid);
    for t in &threads {
        assert_eq!(t.no_new_privs, "1", "thread {t:?} of {pid}");
        assert_eq!(t.seccomp, "2", "thread {t:?} of {pid}");
        assert_eq!(
            t.cap_eff, caps,
            "thread {t:?} of {pid}: CapEff {:#x}",
            t.cap_eff
        );
    }
    let names: Vec<String> = threads.iter().map(|t| t.name.clone()).collect();
    for k in kinds {
        assert!(
            names.iter().any(|n| n.starts_with(k)),
            "no {k}* thread among {names:?}"
        );
    }
    names
}

/// The capabilities `skiff fuse` keeps (docs/kata.md, "The host daemon's sandbox"):
/// sys_admin, to unmount at the end.
pub const HOST_FUSE_CAPS: u64 = 1 << 21;
