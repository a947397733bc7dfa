//! The capabilities a confined daemon keeps: the passthrough's, each for a reason
//! ([`PASSTHROUGH`]), or none. Every other capability leaves the effective, permitted,
//! inheritable, ambient and bounding sets, so that it cannot come back.

use std::fmt;

use caps::{CapSet, Capability, CapsHashSet};

/// What the passthrough of the host's shared directory needs, and why (as virtiofsd's
/// default set; docs/kata.md has the same table).
pub const PASSTHROUGH: &[(Capability, &str)] = &[
    (
        Capability::CAP_CHOWN,
        "files the guest creates get the guest caller's owner (fchownat), and chown(2) from the guest",
    ),
    (
        Capability::CAP_DAC_OVERRIDE,
        "the daemon acts for every guest user: opens files whatever their mode, as the guest's kernel already checked",
    ),
    (
        Capability::CAP_FOWNER,
        "chmod, utimens and xattrs on files the daemon's uid does not own, on behalf of their guest owner",
    ),
    (
        Capability::CAP_FSETID,
        "keeps set-user/group-ID bits where the guest's kernel said so (chmod, writes by the owner)",
    ),
    (
        Capability::CAP_SETUID,
        "each request that creates a file runs with the guest caller's uid (setresuid on that thread)",
    ),
    (
        Capability::CAP_SETGID,
        "likewise for the caller's gid, and set-group-ID directories",
    ),
    (
        Capability::CAP_MKNOD,
        "mknod from the guest: device nodes, FIFOs and the 0/0 character devices overlayfs uses as whiteouts",
    ),
    (
        Capability::CAP_SYS_ADMIN,
        "trusted.* xattrs: the guest's overlayfs keeps its upper layer's state (opaque directories, redirects) in trusted.overlay.* on the share, and the kernel refuses an upper layer without them; every other use of the capability (mount, namespaces, bpf, ...) is refused by the seccomp lists",
    ),
    (
        Capability::CAP_SETFCAP,
        "setting security.capability xattrs (file capabilities in container images built in the guest)",
    ),
];

/// A set of capabilities to keep.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CapabilitySet(Vec<Capability>);

impl CapabilitySet {
    /// No capability at all (`skiff serve`: it only reads its image and caches).
    pub fn none() -> Self {
        CapabilitySet(Vec::new())
    }

    /// The passthrough's ([`PASSTHROUGH`]).
    pub fn passthrough() -> Self {
        CapabilitySet(PASSTHROUGH.iter().map(|(c, _)| *c).collect())
    }

    /// The capabilities, in the order above.
    pub fn capabilities(&self) -> &[Capability] {
        &self.0
    }

    /// The bit mask `/proc/<pid>/status` shows as `CapEff`.
    pub fn mask(&self) -> u64 {
        self.0.iter().fold(0, |m, c| m | c.bitmask())
    }
}

impl fmt::Display for CapabilitySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let names: Vec<String> = self.0.iter().map(|c| c.to_string()).collect();
        f.write_str(&names.join(","))
    }
}

/// Drops every capability but `keep`, from every set of the calling thread (threads
/// started later inherit this).
pub(super) fn drop_to(keep: &CapabilitySet) -> Result<(), caps::errors::CapsError> {
    let keep: CapsHashSet = keep.0.iter().copied().collect();
    // The bounding set first, while CAP_SETPCAP is still held.
    for c in caps::all() {
        if !keep.contains(&c) && caps::has_cap(None, CapSet::Bounding, c).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, c)?;
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    caps::set(None, CapSet::Effective, &keep)?;
    caps::set(None, CapSet::Permitted, &keep)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passthrough_mask_matches_its_table() {
        let set = CapabilitySet::passthrough();
        assert_eq!(set.capabilities().len(), PASSTHROUGH.len());
        // chown 0, dac_override 1, fowner 3, fsetid 4, setgid 6, setuid 7, mknod 27,
        // sys_admin 21, setfcap 31.
        assert_eq!(set.mask(), 0x8820_00db);
        assert_eq!(CapabilitySet::none().mask(), 0);
        assert_eq!(CapabilitySet::none().to_string(), "none");
    }
}
