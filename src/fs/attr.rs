//! Converting inode records into the attribute structures FUSE replies carry.

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64};

use crate::format::{Bootstrap, InodeKind, InodeRecord};

/// Block size reported in `stat` and `statfs`.
const BLOCK_SIZE: u64 = 4096;

/// The `stat` of inode record `rec`, numbered `ino`.
pub fn stat_of(ino: u64, rec: &InodeRecord) -> stat64 {
    // SAFETY: stat64 is a plain C struct of integers, for which all-zero bytes are valid.
    let mut st: stat64 = unsafe { std::mem::zeroed() };
    st.st_ino = ino;
    st.st_mode = rec.mode.get();
    st.st_nlink = u64::from(rec.nlink.get());
    st.st_uid = rec.uid.get();
    st.st_gid = rec.gid.get();
    st.st_rdev = rec.rdev.get();
    st.st_size = rec.size.get() as i64;
    st.st_blksize = BLOCK_SIZE as i64;
    st.st_blocks = if rec.kind() == Some(InodeKind::Regular) {
        rec.size.get().div_ceil(512) as i64
    } else {
        0
    };
    st.st_atime = rec.mtime.get();
    st.st_atime_nsec = i64::from(rec.mtime_nsec.get());
    st.st_mtime = rec.mtime.get();
    st.st_mtime_nsec = i64::from(rec.mtime_nsec.get());
    st.st_ctime = rec.ctime.get();
    st.st_ctime_nsec = i64::from(rec.ctime_nsec.get());
    st
}

/// The `statfs` of an image: its size in blocks, its inode count, nothing free.
pub fn statfs_of(b: &Bootstrap) -> statvfs64 {
    let t = b.tables();
    let bytes: u64 = t
        .inodes
        .iter()
        .filter(|r| r.kind() == Some(InodeKind::Regular))
        .map(|r| r.size.get().div_ceil(BLOCK_SIZE) * BLOCK_SIZE)
        .sum();
    // SAFETY: statvfs64 is a plain C struct of integers, for which all-zero bytes are valid.
    let mut st: statvfs64 = unsafe { std::mem::zeroed() };
    st.f_bsize = BLOCK_SIZE;
    st.f_frsize = BLOCK_SIZE;
    st.f_blocks = bytes / BLOCK_SIZE;
    st.f_files = t.inodes.len() as u64;
    st.f_namemax = crate::format::MAX_NAME_LEN as u64;
    st.f_flag = libc::ST_RDONLY;
    st
}
