//! Reading requests from `/dev/fuse` and answering them without head-of-line blocking.
//!
//! A reader thread reads one request at a time from its descriptor. What can be answered from
//! memory at once (every request of a read-only image but a READ, and a READ whose chunks the
//! memory cache holds, see [`ReadReadiness`]) it answers itself: one wake-up per request, as
//! with a thread per channel. A READ that may wait (on a disk, on the network) goes to the
//! worker pool with its own copy of the request, and the reader goes straight back to the
//! device: so a stalled read holds up nothing but itself, up to the pool's size of them at
//! once, as on the vhost-user transport.
//!
//! Replies are written to a descriptor of the same open file the request was read from: the
//! kernel matches a reply to the request it answers by the request's id within that file, so
//! workers can answer in any order.
//!
//! Only one reader per descriptor is needed, and one is the default: readers of one descriptor
//! all wake for every request (the device is polled level-triggered), and all but one find
//! nothing to read.

use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode, OutHeader};
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FuseBuf, FuseDevWriter, Reader};
use vmm_sys_util::eventfd::EventFd;

use crate::fs::ReadReadiness;
use crate::runtime::pool::WorkerPool;

/// Why a reader stopped.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReaderEnd {
    /// Its stop event was set.
    Stopped,
    /// The filesystem was unmounted, or the connection aborted.
    Unmounted,
    /// Reading or polling the device failed.
    Failed(String),
}

/// What a reader needs: the filesystem, the pool, the device and its stop event.
pub(crate) struct ChannelReader<F: FileSystem + Send + Sync + 'static> {
    /// The filesystem the server serves (a handle to it: asked whether reads are ready).
    pub(crate) fs: F,
    /// A descriptor of the open `/dev/fuse` file (shared with the workers replying on it).
    pub(crate) file: Arc<File>,
    /// Set to stop the reader.
    pub(crate) stop: Arc<EventFd>,
    pub(crate) server: Arc<Server<F>>,
    pub(crate) pool: Arc<WorkerPool>,
    /// The largest request the kernel sends (and reply buffer for answers made here).
    pub(crate) bufsize: usize,
}

/// The parts of a request's header the reader looks at, read from its raw bytes.
struct Peek {
    opcode: u32,
    nodeid: u64,
    /// For a READ: offset and size.
    read: Option<(u64, u32)>,
}

fn peek(req: &[u8]) -> Option<Peek> {
    let u32_at =
        |o: usize| -> Option<u32> { Some(u32::from_ne_bytes(req.get(o..o + 4)?.try_into().ok()?)) };
    let u64_at =
        |o: usize| -> Option<u64> { Some(u64::from_ne_bytes(req.get(o..o + 8)?.try_into().ok()?)) };
    // InHeader: len u32, opcode u32, unique u64, nodeid u64, ...
    let opcode = u32_at(4)?;
    let nodeid = u64_at(16)?;
    let h = size_of::<InHeader>();
    let read = if opcode == Opcode::Read as u32 {
        // ReadIn: fh u64, offset u64, size u32, ...
        Some((u64_at(h + 8)?, u32_at(h + 16)?))
    } else {
        None
    };
    Some(Peek {
        opcode,
        nodeid,
        read,
    })
}

/// Answers the request in `req` with `server`, writing the reply to `fd` through `reply`
/// (which must hold the largest reply the request can have). Returns whether the connection
/// is gone.
fn answer<F: FileSystem + Sync>(
    server: &Server<F>,
    fd: RawFd,
    req: &mut [u8],
    reply: &mut [u8],
) -> bool {
    let reader = match Reader::<()>::from_fuse_buffer(FuseBuf::new(req)) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "FUSE request not readable");
            return false;
        }
    };
    let writer = match FuseDevWriter::<()>::new(fd, reply) {
        Ok(w) => w,
        Err(e) => {
            tracing::debug!(error = %e, "FUSE reply buffer");
            return false;
        }
    };
    match server.handle_message(reader, writer.into(), None, None) {
        Ok(_) => false,
        Err(fuse_backend_rs::Error::EncodeMessage(ref io))
            if matches!(io.raw_os_error(), Some(libc::EBADF) | Some(libc::ENODEV)) =>
        {
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, "FUSE request failed");
            false
        }
    }
}

impl<F> ChannelReader<F>
where
    F: FileSystem + ReadReadiness + Send + Sync + 'static,
{
    /// Reads and answers requests until stopped or unmounted.
    pub(crate) fn run(&self) -> ReaderEnd {
        let fd = self.file.as_raw_fd();
        let mut req = vec![0u8; self.bufsize];
        let mut reply = vec![0u8; self.bufsize];
        loop {
            match self.wait_readable(fd) {
                Ok(true) => {}
                Ok(false) => return ReaderEnd::Stopped,
                Err(e) => return ReaderEnd::Failed(format!("polling /dev/fuse: {e}")),
            }
            // SAFETY: `req` is a live, writable buffer of `req.len()` bytes; the kernel writes
            // at most that many.
            let n = unsafe { libc::read(fd, req.as_mut_ptr().cast(), req.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    // Nothing there after all (another reader took it), an interrupted
                    // request, or a signal: read again.
                    Some(libc::EAGAIN) | Some(libc::ENOENT) | Some(libc::EINTR) => continue,
                    Some(libc::ENODEV) => return ReaderEnd::Unmounted,
                    _ => return ReaderEnd::Failed(format!("reading /dev/fuse: {e}")),
                }
            }
            let n = n as usize;
            let Some(request) = req.get_mut(..n) else {
                continue;
            };
            if self.dispatch(request) {
                continue;
            }
            if answer(&self.server, fd, request, &mut reply) {
                return ReaderEnd::Unmounted;
            }
        }
    }

    /// Hands `request` to a worker if it may wait; says whether it did.
    fn dispatch(&self, request: &[u8]) -> bool {
        let Some(p) = peek(request) else {
            return false;
        };
        let Some((offset, size)) = p.read else {
            return false;
        };
        debug_assert_eq!(p.opcode, Opcode::Read as u32);
        if self.fs.read_ready(p.nodeid, offset, size) {
            return false;
        }
        let mut owned = request.to_vec();
        // The reply: its header and at most `size` bytes (the kernel asks for no more than
        // its buffers hold, and never more than a reader's buffer here).
        let reply_len = size_of::<OutHeader>() + (size as usize).min(self.bufsize);
        let (server, file) = (self.server.clone(), self.file.clone());
        self.pool.submit(move || {
            let mut reply = vec![0u8; reply_len];
            // A connection gone is noticed by the reader, which stops the service.
            let _ = answer(&server, file.as_raw_fd(), &mut owned, &mut reply);
        });
        true
    }

    /// Waits until the device has a request (`true`) or the stop event is set (`false`).
    fn wait_readable(&self, fd: RawFd) -> io::Result<bool> {
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: `fds` is a live array of two pollfd structures, as the count says.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds[1].revents != 0 {
                return Ok(false);
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
                && fds[0].revents & libc::POLLIN == 0
            {
                return Err(io::Error::from_raw_os_error(libc::ENODEV));
            }
            if fds[0].revents & libc::POLLIN != 0 {
                return Ok(true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuse_backend_rs::abi::fuse_abi::ReadIn;

    #[test]
    fn peek_reads_the_header_and_the_read_arguments() {
        let mut req = vec![0u8; size_of::<InHeader>() + size_of::<ReadIn>()];
        req[4..8].copy_from_slice(&(Opcode::Read as u32).to_ne_bytes());
        req[16..24].copy_from_slice(&42u64.to_ne_bytes());
        let h = size_of::<InHeader>();
        req[h + 8..h + 16].copy_from_slice(&4096u64.to_ne_bytes());
        req[h + 16..h + 20].copy_from_slice(&131_072u32.to_ne_bytes());
        let p = peek(&req).expect("peek");
        assert_eq!(
            (p.opcode, p.nodeid, p.read),
            (15, 42, Some((4096, 131_072)))
        );
        // Another opcode: no read arguments; a short request: nothing.
        req[4..8].copy_from_slice(&(Opcode::Getattr as u32).to_ne_bytes());
        assert_eq!(peek(&req).expect("peek").read, None);
        assert!(peek(&req[..10]).is_none());
        // A READ cut short is not dispatched on garbage: no read arguments, no peek.
        req[4..8].copy_from_slice(&(Opcode::Read as u32).to_ne_bytes());
        assert!(peek(&req[..h + 4]).is_none());
    }
}
