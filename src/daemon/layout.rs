//! Where each kind of daemon mounts what, as its callers spell it.

use super::MountError;

/// Where Kata mounts the host's shared directory.
pub const PASSTHROUGH_MOUNTPOINT: &str = "/containers";

/// Longest name component accepted in a mountpoint (a container or snapshot id).
const MAX_ID_LEN: usize = 255;

/// The mountpoint rules of a daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Kata's sandbox daemon: the passthrough at `/containers`, images at
    /// `/rafs/<cid>/lowerdir`.
    Kata,
    /// nydus-snapshotter's host daemon: images at `/` (dedicated) or `/<snapshot id>` (shared).
    Host,
}

impl Layout {
    /// Checks where a passthrough may go.
    pub fn check_passthrough(self, mountpoint: &str) -> Result<(), MountError> {
        match self {
            Layout::Kata if mountpoint == PASSTHROUGH_MOUNTPOINT => Ok(()),
            Layout::Kata => Err(MountError::InvalidMountpoint {
                mountpoint: mountpoint.to_owned(),
                reason: "a passthrough_fs mount goes at /containers",
            }),
            Layout::Host => Err(MountError::InvalidMountpoint {
                mountpoint: mountpoint.to_owned(),
                reason: "a FUSE host daemon serves RAFS images only, not passthrough_fs",
            }),
        }
    }

    /// Checks where a RAFS image may go.
    pub fn check_rafs(self, mountpoint: &str) -> Result<(), MountError> {
        match self {
            Layout::Kata => check_rafs_mountpoint(mountpoint),
            Layout::Host => {
                if mountpoint == "/" {
                    return Ok(());
                }
                let id = mountpoint
                    .strip_prefix('/')
                    .ok_or(MountError::InvalidMountpoint {
                        mountpoint: mountpoint.to_owned(),
                        reason: "a host daemon mounts images at / or /<snapshot id>",
                    })?;
                check_id(mountpoint, id)
            }
        }
    }
}

/// Checks that `mountpoint` is exactly `/rafs/<cid>/lowerdir`, `<cid>` a name made of
/// letters, digits, `_`, `+`, `-` and `.` (as Kata checks it), other than `.` and `..`.
pub fn check_rafs_mountpoint(mountpoint: &str) -> Result<(), MountError> {
    let cid = mountpoint
        .strip_prefix("/rafs/")
        .and_then(|rest| rest.strip_suffix("/lowerdir"))
        .ok_or(MountError::InvalidMountpoint {
            mountpoint: mountpoint.to_owned(),
            reason: "a rafs mount goes at /rafs/<container id>/lowerdir",
        })?;
    check_id(mountpoint, cid)
}

/// Checks one name component: 1 to 255 of `A-Za-z0-9_+-.`, not `.` or `..`.
fn check_id(mountpoint: &str, id: &str) -> Result<(), MountError> {
    let invalid = |reason| MountError::InvalidMountpoint {
        mountpoint: mountpoint.to_owned(),
        reason,
    };
    if id.is_empty() || id.len() > MAX_ID_LEN || id == "." || id == ".." {
        return Err(invalid("the id must be 1 to 255 characters, not . or .."));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.');
    if !id.chars().all(allowed) {
        return Err(invalid(
            "the id may only contain letters, digits, _ + - and .",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rafs_mountpoints_follow_kata_form() {
        for ok in [
            "/rafs/abc/lowerdir",
            "/rafs/a.b-c_d+e/lowerdir",
            "/rafs/0/lowerdir",
        ] {
            assert!(check_rafs_mountpoint(ok).is_ok(), "{ok}");
        }
        for bad in [
            "/rafs//lowerdir",
            "/rafs/../lowerdir",
            "/rafs/./lowerdir",
            "/rafs/a/b/lowerdir",
            "/rafs/a/lowerdir/",
            "/rafs/a/upperdir",
            "rafs/a/lowerdir",
            "/containers",
            "/",
            "/rafs/a b/lowerdir",
        ] {
            assert!(check_rafs_mountpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_mountpoints_are_root_or_one_id() {
        for ok in ["/", "/42", "/sha256-abc.def"] {
            assert!(Layout::Host.check_rafs(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "42",
            "/a/b",
            "/..",
            "/.",
            "//",
            "/a b",
            "/rafs/x/lowerdir",
        ] {
            assert!(Layout::Host.check_rafs(bad).is_err(), "{bad}");
        }
    }
}
