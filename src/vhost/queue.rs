//! Processing one virtqueue: descriptor chains in, FUSE replies out.
//!
//! The queue thread only moves chains: [`process_queue`] pops every available chain and hands
//! it on (to a worker, see `pool`); [`answer`] then runs the request and returns the chain to
//! the guest, in whatever order requests finish. Completing takes the ring's lock for the used
//! ring entry and the notification decision together, which is what EVENT_IDX needs when
//! several workers complete at once.
//!
//! Everything here handles guest-controlled data. A malformed chain or request never stops
//! the queue: the chain is answered with a FUSE error when its header could be read, or
//! returned to the guest with a used length of 0 when not, and processing goes on with the
//! next chain.

use std::io;
use std::mem::size_of;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode, OutHeader};
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryLoadGuard, GuestMemoryMmap};

/// The guest memory as mapped when a chain was popped; a chain keeps it mapped until it is
/// answered, even if the VMM replaces the memory table meanwhile.
pub(crate) type GuestMem = GuestMemoryLoadGuard<GuestMemoryMmap>;

/// A descriptor chain that owns its view of guest memory, so that it can go to a worker.
pub(crate) type Chain = DescriptorChain<GuestMem>;

/// Which ring a chain was popped from: the queue's state at that moment. A chain answered
/// after the ring was stopped (`GET_VRING_BASE`, a device reset) or set up again elsewhere is
/// not written to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RingId {
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl RingId {
    fn of(state: &VringState<vm_memory::GuestMemoryAtomic<GuestMemoryMmap>>) -> Self {
        let q = state.get_queue();
        RingId {
            ready: q.ready(),
            desc: q.desc_table(),
            avail: q.avail_ring(),
            used: q.used_ring(),
        }
    }
}

/// Pops every available descriptor chain of `vring` and hands each to `dispatch`, with the
/// identity of the ring it came from.
///
/// With `event_idx`, guest notifications are suppressed while the queue is drained and
/// re-enabled afterwards, re-checking for chains that arrived in between so none is missed.
/// Errors are returned only for failures to access the ring itself (which the guest can
/// cause by pointing it at unmapped memory); they are logged by the caller.
pub(crate) fn process_queue(
    mem: &GuestMem,
    vring: &VringRwLock,
    event_idx: bool,
    mut dispatch: impl FnMut(Chain, RingId),
) -> io::Result<()> {
    loop {
        if event_idx {
            vring.disable_notification().map_err(io::Error::other)?;
        }
        let handled = drain(mem, vring, &mut dispatch);
        if !event_idx {
            return Ok(());
        }
        let more = vring.enable_notification().map_err(io::Error::other)?;
        if !more {
            return Ok(());
        }
        if handled == 0 {
            // The guest announced chains that cannot be popped (for instance an avail index
            // more than a queue size ahead): stop instead of spinning; its next kick retries.
            tracing::warn!("available ring index is inconsistent; waiting for the next kick");
            return Ok(());
        }
    }
}

/// Pops chains until the available ring is empty; returns how many were popped.
fn drain(mem: &GuestMem, vring: &VringRwLock, dispatch: &mut impl FnMut(Chain, RingId)) -> usize {
    let mut handled = 0;
    loop {
        // Hold the ring's lock only to pop, never while a request runs.
        let popped = {
            let mut state = vring.get_mut();
            let ring = RingId::of(&state);
            state
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone())
                .map(|chain| (chain, ring))
        };
        let Some((chain, ring)) = popped else {
            return handled;
        };
        handled += 1;
        dispatch(chain, ring);
    }
}

/// Runs the request in `chain` and returns the chain to the guest through `vring`, signalling
/// the guest if it asked to be.
pub(crate) fn answer<F>(server: &Server<Arc<F>>, chain: Chain, vring: &VringRwLock, ring: RingId)
where
    F: FileSystem + Send + Sync + 'static,
{
    let head = chain.head_index();
    let mem = chain.memory().clone();
    let used_len = handle_chain(server, &mem, chain);
    complete(vring, ring, head, used_len);
}

/// Puts `head` in the used ring and notifies the guest if needed, under one hold of the ring's
/// lock (the used index and the EVENT_IDX decision must agree).
fn complete(vring: &VringRwLock, ring: RingId, head: u16, used_len: u32) {
    let mut state = vring.get_mut();
    if RingId::of(&state) != ring {
        tracing::debug!(
            head,
            "the queue was stopped or set up again while the request ran; its answer is dropped"
        );
        return;
    }
    if let Err(e) = state.add_used(head, used_len) {
        // Only a head index outside the queue or an unmapped used ring get here.
        tracing::warn!(head, error = %e, "cannot return descriptor chain to the guest");
        return;
    }
    match state.needs_notification() {
        Ok(true) => {
            if let Err(e) = state.signal_used_queue() {
                tracing::warn!(head, error = %e, "cannot notify the guest");
            }
        }
        Ok(false) => {}
        Err(e) => tracing::warn!(head, error = %e, "cannot read the guest's used event index"),
    }
}

/// Answers one chain and returns the number of bytes written into its writable part.
fn handle_chain<F>(server: &Server<Arc<F>>, mem: &GuestMemoryMmap, chain: Chain) -> u32
where
    F: FileSystem + Send + Sync + 'static,
{
    let head = chain.head_index();
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(head, error = %e, "invalid readable descriptors; dropping request");
            return 0;
        }
    };
    let writer = match VirtioFsWriter::new(mem, chain.clone()) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(head, error = %e, "invalid writable descriptors; dropping request");
            return 0;
        }
    };
    let capacity = writer.available_bytes();
    let header: Option<InHeader> = reader.clone().read_obj().ok();
    let reply_slot = ReplySlot::find(mem, &chain);
    if let Some(slot) = &reply_slot {
        slot.clear(mem);
    }

    match server.handle_message(reader, Writer::from(writer), None, None) {
        Ok(0) => match header {
            // The server sends nothing for DESTROY, but the guest waits for an answer.
            Some(h) if h.opcode == Opcode::Destroy as u32 => {
                write_reply_header(mem, chain, h.unique, 0)
            }
            _ => 0,
        },
        Ok(written) => clamp_len(written.min(capacity)),
        Err(e) => {
            let Some(h) = header else {
                tracing::warn!(head, error = %e, "request shorter than a FUSE header; dropping");
                return 0;
            };
            tracing::debug!(
                head,
                opcode = h.opcode,
                unique = h.unique,
                error = %e,
                "malformed FUSE request"
            );
            if !expects_reply(h.opcode) {
                return 0;
            }
            // Some error paths of the server have already answered before failing.
            if let Some(len) = reply_slot.and_then(|s| s.replied_len(mem, h.unique, capacity)) {
                return len;
            }
            write_reply_header(mem, chain, h.unique, -errno_for(&e))
        }
    }
}

/// Whether the guest waits for an answer to a request with this opcode.
fn expects_reply(opcode: u32) -> bool {
    opcode != Opcode::Forget as u32
        && opcode != Opcode::BatchForget as u32
        && opcode != Opcode::Interrupt as u32
}

/// The errno told to the guest for a request the server failed on.
fn errno_for(e: &fuse_backend_rs::Error) -> i32 {
    use fuse_backend_rs::Error as E;
    match e {
        E::DecodeMessage(_)
        | E::MissingParameter
        | E::InvalidCString(_)
        | E::InvalidHeaderLength
        | E::InvalidXattrSize(_)
        | E::InvalidMessage(_) => libc::EINVAL,
        E::FailedToRemapID(_) => libc::EPERM,
        E::EncodeMessage(_) | E::FailedToWrite(_) | E::FailedToSplitWriter(_) => libc::EIO,
    }
}

/// Writes a bare FUSE reply header (`error` is 0 or a negative errno) and returns its length,
/// or 0 when the chain has no room for it.
fn write_reply_header(mem: &GuestMemoryMmap, chain: Chain, unique: u64, error: i32) -> u32 {
    let out = OutHeader {
        len: size_of::<OutHeader>() as u32,
        error,
        unique,
    };
    let mut writer = match VirtioFsWriter::new(mem, chain) {
        Ok(w) => w,
        Err(_) => return 0,
    };
    if writer.available_bytes() < size_of::<OutHeader>() {
        tracing::debug!(
            unique,
            "no room for a reply header; returning the chain empty"
        );
        return 0;
    }
    match writer.write_obj(out) {
        Ok(()) => out.len,
        Err(e) => {
            tracing::debug!(unique, error = %e, "cannot write reply header");
            0
        }
    }
}

fn clamp_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// The first writable descriptor, when it is large enough to hold a reply header: used to
/// tell whether the server wrote a reply before it reported an error.
struct ReplySlot {
    addr: GuestAddress,
}

impl ReplySlot {
    fn find(mem: &GuestMemoryMmap, chain: &Chain) -> Option<Self> {
        let desc = chain.clone().writable().next()?;
        if (desc.len() as usize) < size_of::<OutHeader>() {
            return None;
        }
        // Only a slot the guest memory really holds is of use.
        mem.read_obj::<OutHeader>(desc.addr()).ok()?;
        Some(ReplySlot { addr: desc.addr() })
    }

    /// Zeroes the header area so that a stale reply is not mistaken for a fresh one.
    fn clear(&self, mem: &GuestMemoryMmap) {
        let _ = mem.write_obj(OutHeader::default(), self.addr);
    }

    /// The length of the reply the server wrote for `unique`, if it wrote one.
    fn replied_len(&self, mem: &GuestMemoryMmap, unique: u64, capacity: usize) -> Option<u32> {
        let out: OutHeader = mem.read_obj(self.addr).ok()?;
        let len = out.len as usize;
        (out.unique == unique && len >= size_of::<OutHeader>() && len <= capacity)
            .then_some(out.len)
    }
}
