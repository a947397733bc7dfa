//! Target `fuse`: the FUSE request path of `skiff serve`, from the guest's side of the queue.
//!
//! Two daemons (`skiff::vhost::serve_until`, two request queues each, the worker pool) serve
//! seed images, one in Skiff's format and one built by nydus-image, and a guest
//! (`tests/vhost_guest`, the vhost crate's real frontend: negotiation, shared memory, split
//! virtqueues, kick and call eventfds) stays connected to each across iterations. Every input is
//! a batch of descriptor chains the harness lays out in guest memory as a hostile guest driver
//! would: FUSE messages of any opcode, node, body and header (lengths and uniques fixed up
//! unless the input says not to), split over several readable and writable descriptors, direct
//! or indirect, on any queue, and *edited*: descriptors pointing outside guest memory or across
//! its end, huge or zero lengths, flags flipped, `next` anywhere, indirect tables of any length,
//! heads outside the queue. Each input starts with a fresh FUSE INIT, so that what one input
//! negotiates does not leak into the next.
//!
//! What must hold: the daemon never panics or stops serving; every chain whose head is in the
//! queue is returned (used) within the deadline, with a used length that fits its writable
//! buffers; and in a batch with no edited chain, every reply is framed right (its header's
//! length is the used length, its unique the request's, its error a negative errno with no
//! body), and every successful READ of a file returns exactly the image's bytes at that offset
//! (as read and verified through the filesystem layer at start).

#[allow(dead_code, unused_imports)]
#[path = "../../../tests/vhost_guest/mod.rs"]
mod guest;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use skiff::format::v6::Defaults;
use skiff::format::Bootstrap;
use skiff::runtime::{ExitEvent, ExitReason};
use skiff::vhost::{serve_until, ServeOptions, VhostError};
use vm_memory::{Bytes, GuestAddress};

use self::guest::{
    publish, write_desc, Guest, DATA_BASE, DATA_END, HIPRIO_QUEUE, MEM_BASE, QUEUE_SIZE,
    VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};
use super::input::{Input, Output};
use super::mem::MemBlobs;
use super::serve::{self, Content, Limits};
use super::Outcome;

/// The images served: one per format.
const IMAGES: [&str; 2] = ["skiff-lz4-4k", "v6-zstd-sha256-4k"];
/// Request queues per daemon (worker pool threads alike).
const REQUEST_QUEUES: usize = 2;
/// Chains per input at most.
const MAX_CHAINS: usize = 48;
/// Descriptors one chain may take in the descriptor table (or its indirect table).
const MAX_DESCS: usize = 8;
/// How long a batch may take before it counts as a hang. Generous: the machine may be loaded,
/// and a hang is a chain that never comes back, not a slow one.
const BATCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Size of the FUSE request header.
const IN_HEADER: usize = 40;
/// Size of the FUSE reply header.
const OUT_HEADER: usize = 16;

/// FUSE opcodes (Linux, protocol 7.31) by name, for seeds and for reading replies.
mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const GETLK: u32 = 31;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const BMAP: u32 = 37;
    pub const DESTROY: u32 = 38;
    pub const IOCTL: u32 = 39;
    pub const POLL: u32 = 40;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;
    pub const SETUPMAPPING: u32 = 48;
    pub const REMOVEMAPPING: u32 = 49;
}

/// One daemon serving one image, and the guest connected to it.
struct Session {
    guest: Mutex<Guest>,
    /// Regular files by FUSE inode number: their bytes, as the filesystem layer serves them.
    files: HashMap<u64, Vec<u8>>,
    /// Every inode number of the image, by path, for the seeds.
    inodes: Vec<(Vec<u8>, u64, u32)>,
    exit: ExitEvent,
    thread: Mutex<Option<JoinHandle<Result<(), VhostError>>>>,
    _dir: tempfile::TempDir,
}

/// The daemons and guests every iteration shares.
pub struct Fixture {
    sessions: Vec<Session>,
    unique: std::sync::atomic::AtomicU64,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for s in &self.sessions {
            s.exit.notify(ExitReason::Requested);
        }
    }
}

impl Fixture {
    /// Starts a daemon per image of [`IMAGES`] and connects a guest to each.
    pub fn start() -> Self {
        let blobs = Arc::new(
            MemBlobs::load_dir(&super::seeds_dir().join("blobs")).expect("the seed blobs"),
        );
        let defaults = Defaults {
            uid: 0,
            gid: 0,
            now: 1_700_000_000,
        };
        let sessions = IMAGES
            .iter()
            .map(|name| {
                let path = super::seeds_dir().join("bootstrap").join(name);
                let bytes = std::fs::read(&path).expect("a seed bootstrap");
                let bootstrap =
                    Arc::new(Bootstrap::from_bytes_with(bytes, defaults).expect("seed loads"));
                Session::start(bootstrap, blobs.clone())
            })
            .collect();
        Self {
            sessions,
            unique: std::sync::atomic::AtomicU64::new(1),
        }
    }
}

impl Session {
    fn start(bootstrap: Arc<Bootstrap>, blobs: Arc<MemBlobs>) -> Self {
        // What the files hold, read and checked once through the filesystem layer.
        let direct = serve::filesystem(bootstrap.clone(), blobs.clone());
        let tree = serve::serve_all(&direct, Limits::default());
        let mut files = HashMap::new();
        let mut inodes = Vec::new();
        for (path, s) in &tree {
            if let Some(Content::Read(bytes)) = &s.content {
                files.insert(s.ino, bytes.clone());
            }
            inodes.push((path.clone(), s.ino, s.attr.st_mode & libc::S_IFMT));
        }
        let fs = Arc::new(serve::filesystem(bootstrap, blobs));
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("vfs.sock");
        let mut opts = ServeOptions::new(&socket, "skiff-fuzz");
        opts.threads = REQUEST_QUEUES;
        opts.queue_size = QUEUE_SIZE;
        let exit = ExitEvent::new().expect("exit event");
        let exit2 = exit.clone();
        let thread = std::thread::spawn(move || serve_until(fs, &opts, &exit2));
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                started.elapsed() < BATCH_TIMEOUT,
                "the daemon did not listen"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let guest = Guest::connect(&socket, REQUEST_QUEUES, true);
        Self {
            guest: Mutex::new(guest),
            files,
            inodes,
            exit,
            thread: Mutex::new(Some(thread)),
            _dir: dir,
        }
    }

    /// Fails when the daemon has stopped.
    fn assert_serving(&self) {
        let mut t = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if t.as_ref().is_some_and(JoinHandle::is_finished) {
            let r = t.take().map(|t| t.join());
            panic!("the daemon stopped: {r:?} ({:?})", self.exit.reason());
        }
    }
}

/// A descriptor: guest address, length, flags, next.
#[derive(Clone, Copy, Debug)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// One chain as laid out, and what is needed to check its reply.
struct Laid {
    queue: usize,
    head: u16,
    /// Whether the head is inside the queue (else the device cannot return it).
    valid_head: bool,
    /// The request's header was fixed up: its unique and length are the harness's.
    fixed_header: bool,
    unique: u64,
    opcode: u32,
    nodeid: u64,
    body: Vec<u8>,
    /// The writable buffers, in order.
    outs: Vec<(u64, u32)>,
}

/// Allocates buffers in one queue's share of the data area.
struct Area {
    next: u64,
    end: u64,
}

impl Area {
    fn alloc(&mut self, len: u64) -> Option<u64> {
        let at = self.next;
        let end = at.checked_add(len)?.checked_add(7)? & !7;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(at)
    }
}

/// The opcode an input byte picks: every Linux opcode and some that are not.
fn opcode(input: &mut Input<'_>) -> u32 {
    match input.u8() {
        255 => input.u32(),
        b => u32::from(b % 52),
    }
}

/// An address for an edited descriptor: outside guest memory, across its end, unaligned,
/// below it, or anything.
fn hostile_addr(input: &mut Input<'_>) -> u64 {
    match input.u8() % 6 {
        0 => 0,
        1 => MEM_BASE - 8,
        2 => DATA_END - 8,
        3 => DATA_END,
        4 => u64::MAX - 7,
        _ => input.u64(),
    }
}

fn hostile_len(input: &mut Input<'_>) -> u32 {
    match input.u8() % 5 {
        0 => 0,
        1 => 1,
        2 => u32::MAX,
        3 => 1 << 20,
        _ => input.u32(),
    }
}

/// One iteration: see the module doc.
pub fn run(fixture: &Fixture, data: &[u8]) -> Outcome {
    let mut input = Input::new(data);
    let session = &fixture.sessions[usize::from(input.u8()) % fixture.sessions.len()];
    session.assert_serving();
    let mut guard = session.guest.lock().unwrap_or_else(|p| p.into_inner());
    let g: &mut Guest = &mut guard;
    // The same negotiated state for every input.
    let init = g.init();
    assert_eq!(init.major, 7, "INIT");

    let queues = 1 + REQUEST_QUEUES;
    let share = (DATA_END - DATA_BASE) / queues as u64;
    let mut areas: Vec<Area> = (0..queues as u64)
        .map(|q| Area {
            next: DATA_BASE + q * share,
            // A gap at the end of each share, so that a descriptor edited to run past a
            // buffer of one queue does not land in the next queue's buffers.
            end: DATA_BASE + (q + 1) * share - 4096,
        })
        .collect();
    let mut next_desc = vec![0u16; queues];
    let mut laid: Vec<Laid> = Vec::new();
    let mut heads: Vec<Vec<u16>> = vec![Vec::new(); queues];
    let mut any_edit = false;

    while !input.is_empty() && laid.len() < MAX_CHAINS {
        let ctl = input.u8();
        let queue = match ctl & 3 {
            2 => HIPRIO_QUEUE,
            1 => 2,
            _ => 1,
        };
        let indirect = ctl & 4 != 0;
        let edits = ctl & 8 != 0;
        let raw_header = ctl & 16 != 0;
        let in_splits = usize::from((ctl >> 5) & 3) + 1;
        let out_splits = usize::from(ctl >> 7) + 1;
        let opcode = opcode(&mut input);
        let nodeid = match input.u8() {
            255 => input.u64(),
            b => u64::from(b),
        };
        let body = input.blob().to_vec();
        let reply = u32::from(input.u16());
        let unique = fixture.unique.fetch_add(1, Ordering::Relaxed);
        let mut req = Vec::with_capacity(IN_HEADER + body.len());
        let (len, uniq, uid, gid, pid) = if raw_header {
            (
                input.u32(),
                input.u64(),
                input.u32(),
                input.u32(),
                input.u32(),
            )
        } else {
            ((IN_HEADER + body.len()) as u32, unique, 0, 0, 1)
        };
        req.extend_from_slice(&len.to_le_bytes());
        req.extend_from_slice(&opcode.to_le_bytes());
        req.extend_from_slice(&uniq.to_le_bytes());
        req.extend_from_slice(&nodeid.to_le_bytes());
        req.extend_from_slice(&uid.to_le_bytes());
        req.extend_from_slice(&gid.to_le_bytes());
        req.extend_from_slice(&pid.to_le_bytes());
        req.extend_from_slice(&0u32.to_le_bytes());
        req.extend_from_slice(&body);

        // The descriptors: the request cut at points the input gives, then the reply buffer.
        let area = &mut areas[queue];
        let mut descs: Vec<RawDesc> = Vec::new();
        let mut cuts: Vec<usize> = (1..in_splits)
            .map(|_| usize::from(input.u16()) % (req.len() + 1))
            .collect();
        cuts.sort_unstable();
        cuts.push(req.len());
        let mut from = 0;
        let mut room = true;
        for cut in cuts {
            let piece = &req[from..cut.max(from)];
            from = cut.max(from);
            let Some(at) = area.alloc(piece.len() as u64) else {
                room = false;
                break;
            };
            g.mem
                .write_slice(piece, GuestAddress(at))
                .expect("write a request into guest memory");
            descs.push(RawDesc {
                addr: at,
                len: piece.len() as u32,
                flags: 0,
                next: 0,
            });
        }
        let mut outs = Vec::new();
        if reply > 0 {
            let per = reply.div_ceil(out_splits as u32);
            let mut left = reply;
            while left > 0 && room {
                let n = per.min(left);
                let Some(at) = area.alloc(u64::from(n)) else {
                    room = false;
                    break;
                };
                // Garbage, so that bytes the device did not write show.
                g.mem
                    .write_slice(&vec![0xa5; n as usize], GuestAddress(at))
                    .expect("fill a reply buffer");
                descs.push(RawDesc {
                    addr: at,
                    len: n,
                    flags: VIRTQ_DESC_F_WRITE,
                    next: 0,
                });
                outs.push((at, n));
                left -= n;
            }
        }
        if !room || descs.is_empty() {
            break;
        }
        descs.truncate(MAX_DESCS);
        // Chain them: within the descriptor table from the chain's first slot, or in an
        // indirect table.
        let base = if indirect { 0 } else { next_desc[queue] };
        if usize::from(base) + descs.len() + 1 > usize::from(QUEUE_SIZE) {
            break;
        }
        let n = descs.len();
        for (i, d) in descs.iter_mut().enumerate() {
            if i + 1 < n {
                d.flags |= VIRTQ_DESC_F_NEXT;
                d.next = base + i as u16 + 1;
            }
        }
        let mut head = next_desc[queue];
        let mut valid_head = true;
        let mut table_len = 16 * n as u32;
        if edits {
            any_edit = true;
            for _ in 0..(input.u8() % 4) + 1 {
                let which = usize::from(input.u8()) % n;
                match input.u8() % 7 {
                    0 => descs[which].addr = hostile_addr(&mut input),
                    1 => descs[which].len = hostile_len(&mut input),
                    2 => {
                        let bits = [VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT];
                        descs[which].flags ^= bits[usize::from(input.u8()) % 3];
                    }
                    3 => descs[which].next = input.u16(),
                    4 => table_len = hostile_len(&mut input),
                    5 => {
                        // A head outside the queue: not returned, and not waited for.
                        head = QUEUE_SIZE + input.u16() % 1024;
                        valid_head = false;
                    }
                    _ => {
                        // A head naming another chain's descriptor, or the middle of this one.
                        head = input.u16() % QUEUE_SIZE;
                        valid_head = true;
                    }
                }
            }
            // Writable descriptors must never point at the rings: a guest that lets the
            // device write its own rings breaks only itself, and this harness's bookkeeping.
            for d in &mut descs {
                let end = d.addr.saturating_add(u64::from(d.len));
                if d.flags & VIRTQ_DESC_F_WRITE != 0 && d.addr < DATA_BASE && end > MEM_BASE {
                    d.addr = DATA_END;
                }
            }
        }
        let q = &g.queues[queue];
        if indirect {
            let Some(table) = areas[queue].alloc(16 * n as u64) else {
                break;
            };
            for (i, d) in descs.iter().enumerate() {
                write_desc(
                    &g.mem,
                    table + 16 * i as u64,
                    d.addr,
                    d.len,
                    d.flags,
                    d.next,
                );
            }
            let slot = next_desc[queue];
            write_desc(
                &g.mem,
                q.desc + 16 * u64::from(slot),
                table,
                table_len,
                VIRTQ_DESC_F_INDIRECT,
                0,
            );
            if !edits || head == next_desc[queue] {
                head = slot;
            }
            next_desc[queue] += 1;
        } else {
            for (i, d) in descs.iter().enumerate() {
                let at = q.desc + 16 * u64::from(base + i as u16);
                write_desc(&g.mem, at, d.addr, d.len, d.flags, d.next);
            }
            next_desc[queue] += n as u16;
        }
        heads[queue].push(head);
        laid.push(Laid {
            queue,
            head,
            valid_head,
            fixed_header: !raw_header,
            unique,
            opcode,
            nodeid,
            body,
            outs,
        });
    }

    // Make every batch available and kick, then wait until all of them are used.
    let mut want = vec![0u16; queues];
    for (qi, hs) in heads.iter().enumerate() {
        if hs.is_empty() {
            continue;
        }
        want[qi] = laid
            .iter()
            .filter(|l| l.queue == qi && l.valid_head)
            .count() as u16;
        let q = &mut g.queues[qi];
        publish(&g.mem, q, hs);
    }
    let started = Instant::now();
    let mut used: Vec<Vec<(u16, u32)>> = vec![Vec::new(); queues];
    for qi in 0..queues {
        let q = &g.queues[qi];
        loop {
            let idx: u16 = g
                .mem
                .load(GuestAddress(q.used + 2), Ordering::Acquire)
                .expect("used idx");
            let done = idx.wrapping_sub(q.last_used);
            if done > want[qi] {
                let ids: Vec<(u32, u32)> = (0..done)
                    .map(|i| {
                        let elem =
                            q.used + 4 + 8 * u64::from(q.last_used.wrapping_add(i) % QUEUE_SIZE);
                        let id: u32 = g.mem.read_obj(GuestAddress(elem)).unwrap_or(u32::MAX);
                        let len: u32 = g.mem.read_obj(GuestAddress(elem + 4)).unwrap_or(u32::MAX);
                        (id, len)
                    })
                    .collect();
                panic!(
                    "queue {qi}: the device used {done} chains of {} it could: made available \
                     {:?}, used (id, len) {ids:?}",
                    want[qi], heads[qi]
                );
            }
            if done == want[qi] {
                break;
            }
            if started.elapsed() > BATCH_TIMEOUT {
                session.assert_serving();
                panic!(
                    "queue {qi}: {done} of {} chains used after {BATCH_TIMEOUT:?}: a hang",
                    want[qi]
                );
            }
            guest::pause(started);
        }
        fence(Ordering::SeqCst);
        for i in 0..want[qi] {
            let slot = u64::from(q.last_used.wrapping_add(i) % QUEUE_SIZE);
            let elem = q.used + 4 + 8 * slot;
            let id: u32 = g.mem.read_obj(GuestAddress(elem)).expect("used id");
            let len: u32 = g.mem.read_obj(GuestAddress(elem + 4)).expect("used len");
            used[qi].push((id as u16, len));
        }
    }
    for (q, n) in g.queues.iter_mut().zip(&want) {
        q.last_used = q.last_used.wrapping_add(*n);
        // The call for this batch, if any: the next INIT waits for its own.
        let _ = q.call.read();
    }

    // Every used element names a chain that was made available there, once per time it was.
    for (qi, done) in used.iter().enumerate() {
        let mut expect: Vec<u16> = laid
            .iter()
            .filter(|l| l.queue == qi && l.valid_head)
            .map(|l| l.head)
            .collect();
        let mut got: Vec<u16> = done.iter().map(|u| u.0).collect();
        expect.sort_unstable();
        got.sort_unstable();
        assert_eq!(
            got, expect,
            "queue {qi}: used chains differ from those made available"
        );
    }
    if any_edit {
        return Outcome::Rejected;
    }
    let mut read = 0;
    for l in &laid {
        let Some(&(_, used_len)) = used[l.queue].iter().find(|u| u.0 == l.head) else {
            continue;
        };
        read += check_reply(g, session, l, used_len);
    }
    Outcome::Served(read)
}

/// The checks of an unedited chain's reply; the file bytes it checked.
fn check_reply(g: &Guest, session: &Session, l: &Laid, used_len: u32) -> u64 {
    let capacity: u64 = l.outs.iter().map(|o| u64::from(o.1)).sum();
    assert!(
        u64::from(used_len) <= capacity,
        "opcode {}: used length {used_len} beyond the {capacity} writable bytes",
        l.opcode
    );
    if !l.fixed_header || (used_len as usize) < OUT_HEADER {
        return 0;
    }
    let mut reply = Vec::with_capacity(used_len as usize);
    let mut left = used_len as usize;
    for &(at, n) in &l.outs {
        let take = left.min(n as usize);
        let mut buf = vec![0; take];
        g.mem
            .read_slice(&mut buf, GuestAddress(at))
            .expect("read a reply");
        reply.extend_from_slice(&buf);
        left -= take;
    }
    let len = u32::from_le_bytes(reply[0..4].try_into().expect("4 bytes"));
    let error = i32::from_le_bytes(reply[4..8].try_into().expect("4 bytes"));
    let unique = u64::from_le_bytes(reply[8..16].try_into().expect("8 bytes"));
    let what = format!("opcode {} on node {}", l.opcode, l.nodeid);
    assert_eq!(len, used_len, "{what}: reply header length vs used length");
    assert_eq!(unique, l.unique, "{what}: reply to another request");
    assert!((-4095..=0).contains(&error), "{what}: error {error}");
    if error != 0 {
        assert_eq!(
            used_len as usize, OUT_HEADER,
            "{what}: error reply with a body"
        );
        return 0;
    }
    if l.opcode == op::READ && l.body.len() >= 40 {
        let offset = u64::from_le_bytes(l.body[8..16].try_into().expect("8 bytes"));
        let size = u32::from_le_bytes(l.body[16..20].try_into().expect("4 bytes"));
        let data = &reply[OUT_HEADER..];
        assert!(
            data.len() <= size as usize,
            "{what}: READ returned more than asked"
        );
        if let Some(content) = session.files.get(&l.nodeid) {
            let start = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .min(content.len());
            let end = start.saturating_add(data.len());
            assert!(
                end <= content.len() && data == &content[start..end],
                "{what}: READ of {size} at {offset} returned {} bytes that are not the file's",
                data.len()
            );
            return data.len() as u64;
        }
    }
    0
}

// ---------------------------------------------------------------------------------------------
// Seeds: batches of well-formed requests of every kind, against the images' real inodes.

fn le(parts: &[u64], widths: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    for (v, w) in parts.iter().zip(widths) {
        out.extend_from_slice(&v.to_le_bytes()[..*w]);
    }
    out
}

/// One chain of a seed: queue selector and flags (the `ctl` byte), request, reply room.
fn chain(o: &mut Output, ctl: u8, opcode: u32, nodeid: u64, body: &[u8], reply: u16) {
    o.u8(ctl);
    if opcode < 52 {
        o.u8(opcode as u8);
    } else {
        o.u8(255).u32(opcode);
    }
    if nodeid < 255 {
        o.u8(nodeid as u8);
    } else {
        o.u8(255).u64(nodeid);
    }
    o.blob(body).u16(reply);
    // Split points, for the extra readable descriptors the ctl byte asks for.
    for _ in 0..(ctl >> 5) & 3 {
        o.u16(20);
    }
}

fn cstr(s: &[u8]) -> Vec<u8> {
    let mut v = s.to_vec();
    v.push(0);
    v
}

/// Seeds for the libFuzzer corpus and the smoke test: for each image, batches that exercise
/// every opcode on its real inodes, split and indirect descriptors, and a few edited chains.
pub fn seeds(fixture: &Fixture) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (si, s) in fixture.sessions.iter().enumerate() {
        let mut by_kind: HashMap<u32, Vec<(Vec<u8>, u64)>> = HashMap::new();
        for (path, ino, kind) in &s.inodes {
            by_kind.entry(*kind).or_default().push((path.clone(), *ino));
        }
        let first = |k: u32| by_kind.get(&k).and_then(|v| v.first()).map_or(1, |e| e.1);
        let file = s
            .files
            .iter()
            .max_by_key(|(_, c)| c.len())
            .map_or(1, |(i, _)| *i);
        let dir = first(libc::S_IFDIR);
        let link = first(libc::S_IFLNK);
        let read_in = |off: u64, size: u64| le(&[0, off, size, 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]);
        let sel = si as u8;

        // Lookups of every name, getattr of every inode.
        let mut o = Output::default();
        o.u8(sel);
        for (path, ino, _) in s.inodes.iter().take(24) {
            let name = path.rsplit(|&b| b == b'/').next().unwrap_or(b"");
            if !name.is_empty() {
                chain(&mut o, 0, op::LOOKUP, 1, &cstr(name), 256);
            }
            chain(
                &mut o,
                1,
                op::GETATTR,
                *ino,
                &le(&[0, 0, 0], &[4, 4, 8]),
                256,
            );
        }
        out.push(o.bytes);

        // Reads of the biggest file: whole, across chunks, past the end, split replies.
        let mut o = Output::default();
        o.u8(sel);
        chain(&mut o, 0, op::OPEN, file, &le(&[0, 0], &[4, 4]), 64);
        for (off, size, ctl) in [
            (0, 4096, 0u8),
            (100, 8000, 0x80),
            (4000, 200, 4),
            (0, 65536, 0x61),
            (1 << 20, 4096, 1),
        ] {
            chain(
                &mut o,
                ctl,
                op::READ,
                file,
                &read_in(off, size),
                (size + 16) as u16,
            );
        }
        chain(
            &mut o,
            0,
            op::FLUSH,
            file,
            &le(&[0, 0, 0, 0], &[8, 4, 4, 8]),
            64,
        );
        chain(
            &mut o,
            0,
            op::RELEASE,
            file,
            &le(&[0, 0, 0, 0], &[8, 4, 4, 8]),
            64,
        );
        chain(
            &mut o,
            0,
            op::LSEEK,
            file,
            &le(&[0, 10, 3, 0], &[8, 8, 4, 4]),
            64,
        );
        out.push(o.bytes);

        // Directories, links and xattrs.
        let mut o = Output::default();
        o.u8(sel);
        chain(&mut o, 0, op::OPENDIR, dir, &le(&[0, 0], &[4, 4]), 64);
        chain(&mut o, 0, op::READDIR, dir, &read_in(0, 4096), 4112);
        chain(&mut o, 1, op::READDIRPLUS, 1, &read_in(0, 8192), 8208);
        chain(&mut o, 0, op::READDIRPLUS, 1, &read_in(3, 300), 316);
        chain(
            &mut o,
            0,
            op::RELEASEDIR,
            dir,
            &le(&[0, 0, 0, 0], &[8, 4, 4, 8]),
            64,
        );
        chain(&mut o, 0, op::READLINK, link, &[], 4096);
        for ino in s.inodes.iter().map(|i| i.1).take(8) {
            chain(&mut o, 0, op::LISTXATTR, ino, &le(&[0, 0], &[4, 4]), 64);
            chain(&mut o, 0, op::LISTXATTR, ino, &le(&[256, 0], &[4, 4]), 300);
            let mut g = le(&[0, 0], &[4, 4]);
            g.extend_from_slice(&cstr(b"user.skiff"));
            chain(&mut o, 1, op::GETXATTR, ino, &g, 64);
            let mut g = le(&[64, 0], &[4, 4]);
            g.extend_from_slice(&cstr(b"security.capability"));
            chain(&mut o, 0, op::GETXATTR, ino, &g, 100);
        }
        chain(&mut o, 0, op::STATFS, 1, &[], 128);
        chain(&mut o, 0, op::ACCESS, file, &le(&[4, 0], &[4, 4]), 64);
        out.push(o.bytes);

        // Everything a read-only filesystem refuses, and the rest of the opcodes.
        let mut o = Output::default();
        o.u8(sel);
        let mut w = le(&[0, 0, 5, 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]);
        w.extend_from_slice(b"hello");
        chain(&mut o, 0, op::WRITE, file, &w, 64);
        let mut m = le(&[0o755, 0], &[4, 4]);
        m.extend_from_slice(&cstr(b"newdir"));
        chain(&mut o, 0, op::MKDIR, 1, &m, 160);
        let mut m = le(&[0o644 | 0o100000, 0, 0, 0], &[4, 4, 4, 4]);
        m.extend_from_slice(&cstr(b"node"));
        chain(&mut o, 0, op::MKNOD, 1, &m, 160);
        chain(
            &mut o,
            0,
            op::CREATE,
            1,
            &[le(&[2, 0o644, 0, 0], &[4, 4, 4, 4]), cstr(b"new")].concat(),
            200,
        );
        chain(&mut o, 0, op::UNLINK, 1, &cstr(b"hello.txt"), 64);
        chain(
            &mut o,
            0,
            op::SYMLINK,
            1,
            &[cstr(b"l"), cstr(b"t")].concat(),
            160,
        );
        chain(
            &mut o,
            0,
            op::LINK,
            1,
            &[le(&[file], &[8]), cstr(b"h2")].concat(),
            160,
        );
        chain(
            &mut o,
            0,
            op::RENAME,
            1,
            &[le(&[1], &[8]), cstr(b"a"), cstr(b"b")].concat(),
            64,
        );
        chain(
            &mut o,
            0,
            op::RENAME2,
            1,
            &[le(&[1, 0, 0], &[8, 4, 4]), cstr(b"a"), cstr(b"b")].concat(),
            64,
        );
        chain(&mut o, 0, op::SETATTR, file, &[0; 88], 128);
        chain(
            &mut o,
            0,
            op::SETXATTR,
            file,
            &[le(&[1, 0], &[4, 4]), cstr(b"user.x"), b"v".to_vec()].concat(),
            64,
        );
        chain(&mut o, 0, op::REMOVEXATTR, file, &cstr(b"user.skiff"), 64);
        chain(&mut o, 0, op::FSYNC, file, &le(&[0, 0, 0], &[8, 4, 4]), 64);
        chain(&mut o, 0, op::GETLK, file, &[0; 48], 64);
        chain(
            &mut o,
            0,
            op::BMAP,
            file,
            &le(&[0, 4096, 0], &[8, 4, 4]),
            64,
        );
        chain(&mut o, 0, op::IOCTL, file, &[0; 32], 64);
        chain(&mut o, 0, op::POLL, file, &[0; 24], 64);
        chain(
            &mut o,
            0,
            op::FALLOCATE,
            file,
            &le(&[0, 0, 4096, 0, 0], &[8, 8, 8, 4, 4]),
            64,
        );
        chain(&mut o, 0, op::COPY_FILE_RANGE, file, &[0; 56], 64);
        chain(&mut o, 0, op::SETUPMAPPING, file, &[0; 40], 64);
        chain(
            &mut o,
            0,
            op::REMOVEMAPPING,
            file,
            &le(&[1, 0, 0, 0], &[4, 8, 8, 4]),
            64,
        );
        chain(&mut o, 0, 9999, 1, &[0; 16], 64);
        out.push(o.bytes);

        // The high-priority queue, and a DESTROY (the next input's INIT starts again).
        let mut o = Output::default();
        o.u8(sel);
        chain(&mut o, 2, op::FORGET, file, &le(&[1], &[8]), 0);
        chain(
            &mut o,
            2,
            op::BATCH_FORGET,
            0,
            &le(&[2, 0, file, 1, dir, 1], &[4, 4, 8, 8, 8, 8]),
            0,
        );
        chain(&mut o, 2, op::INTERRUPT, 0, &le(&[12345], &[8]), 0);
        chain(
            &mut o,
            0,
            op::INIT,
            0,
            &le(&[7, 31, 131072, 0], &[4, 4, 4, 4]),
            128,
        );
        chain(&mut o, 0, op::DESTROY, 0, &[], 64);
        out.push(o.bytes);

        // Edited chains: a descriptor outside memory, a loop, a head outside the queue.
        let mut o = Output::default();
        o.u8(sel);
        chain(&mut o, 8, op::GETATTR, 1, &[0; 16], 256);
        o.u8(1).u8(0).u8(0).u8(5);
        chain(&mut o, 8, op::GETATTR, 1, &[0; 16], 256);
        o.u8(1).u8(0).u8(3).u16(0);
        chain(&mut o, 12, op::READ, file, &read_in(0, 4096), 4112);
        o.u8(1).u8(1).u8(4).u8(1);
        chain(&mut o, 8, op::LOOKUP, 1, &cstr(b"x"), 256);
        o.u8(1).u8(0).u8(5).u16(9);
        out.push(o.bytes);
    }
    out
}

/// Writes [`seeds`] as files into `dir` (for a libFuzzer corpus).
pub fn write_seeds(fixture: &Fixture, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (i, s) in seeds(fixture).iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:02}")), s)?;
    }
    Ok(())
}
