//! The VMM and guest-driver side of a vhost-user-fs connection, for tests and the fuzz target
//! that drive Skiff's device in-process (tests/vhost_device.rs, fuzz/src/harness/fuse.rs): the
//! vhost crate's real vhost-user frontend (feature and protocol negotiation, the memory table,
//! vring set-up), a shared guest memory (a temp file mapped by both sides), split virtqueues laid
//! out in it, kick and call eventfds, and FUSE requests written into guest memory as the guest's
//! virtio-fs driver writes them, their replies read back from the used ring.

use std::collections::HashMap;
use std::ffi::CString;
use std::mem::size_of;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, Dirent, EntryOut, FsOptions, GetattrIn, GetxattrIn, InHeader, InitIn, InitOut,
    Kstatfs, Opcode, OpenIn, OpenOut, OutHeader, ReadIn, StatfsOut,
};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{ByteValued, Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// How long the device may take to complete a batch before the guest gives up (a failure).
pub const COMPLETION_TIMEOUT: Duration = Duration::from_secs(10);

pub const MEM_BASE: u64 = 0x10_0000;
pub const MEM_SIZE: usize = 0x40_0000;
pub const QUEUE_SIZE: u16 = 256;
/// Guest memory reserved per queue for its descriptor table and rings.
pub const QUEUE_AREA: u64 = 0x1_0000;
/// Start of the area request and reply buffers are allocated from.
pub const DATA_BASE: u64 = MEM_BASE + 0x10_0000;
pub const DATA_END: u64 = MEM_BASE + MEM_SIZE as u64;
/// Most queues a test guest sets up: each gets its own slice of the data area.
pub const MAX_QUEUES: u64 = 16;

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

pub const HIPRIO_QUEUE: usize = 0;
pub const REQUEST_QUEUE: usize = 1;
pub const ROOT: u64 = 1;

/// One descriptor of a chain to submit.
#[derive(Clone, Debug)]
pub enum Desc {
    /// Device-readable, holding these bytes.
    In(Vec<u8>),
    /// Device-writable, of this many bytes.
    Out(u32),
    /// Device-readable at an arbitrary guest address.
    RawIn(u64, u32),
    /// Device-writable at an arbitrary guest address.
    RawOut(u64, u32),
}

/// A descriptor chain to submit.
#[derive(Clone, Debug)]
pub struct Chain {
    pub descs: Vec<Desc>,
    pub indirect: bool,
}

impl Chain {
    pub fn new(descs: Vec<Desc>) -> Self {
        Chain {
            descs,
            indirect: false,
        }
    }

    /// A request in one readable buffer and room for a reply of `reply` bytes.
    pub fn request(req: Vec<u8>, reply: u32) -> Self {
        Chain::new(vec![Desc::In(req), Desc::Out(reply)])
    }
}

/// A batch of chains made available but not yet waited for: their heads and the writable
/// buffers of each.
pub struct Pending {
    pub heads: Vec<u16>,
    pub outs: Vec<Vec<(u64, u32)>>,
}

/// A used descriptor chain, with the bytes the device wrote.
#[derive(Debug)]
pub struct Completion {
    pub used_len: u32,
    pub data: Vec<u8>,
}

pub struct GuestQueue {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub avail_idx: u16,
    pub last_used: u16,
    pub kick: EventFd,
    pub call: EventFd,
}

/// The VMM and guest driver side of one connection.
pub struct Guest {
    /// The vhost-user connection; dropping it disconnects the VMM.
    pub _frontend: Frontend,
    pub mem: GuestMemoryMmap,
    pub queues: Vec<GuestQueue>,
    pub next_unique: u64,
    pub event_idx: bool,
}

/// One step of a wait that began at `started`: a yield at first (the device usually answers
/// within microseconds), then naps of a millisecond.
pub fn pause(started: Instant) {
    if started.elapsed() < Duration::from_millis(2) {
        thread::yield_now();
    } else {
        thread::sleep(Duration::from_millis(1));
    }
}

pub fn write_desc(mem: &GuestMemoryMmap, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(at))
        .expect("write descriptor");
}

/// Makes `heads` available on `q` and kicks the device, without waiting.
pub fn publish(mem: &GuestMemoryMmap, q: &mut GuestQueue, heads: &[u16]) {
    for head in heads {
        let slot = u64::from(q.avail_idx % QUEUE_SIZE);
        mem.write_obj(*head, GuestAddress(q.avail + 4 + 2 * slot))
            .expect("avail ring");
        q.avail_idx = q.avail_idx.wrapping_add(1);
    }
    // used_event: ask for a call as soon as the next chain is used.
    let used_event = q.avail + 4 + 2 * u64::from(QUEUE_SIZE);
    mem.write_obj(q.last_used, GuestAddress(used_event))
        .expect("used_event");
    fence(Ordering::SeqCst);
    mem.store(q.avail_idx, GuestAddress(q.avail + 2), Ordering::Release)
        .expect("avail idx");
    q.kick.write(1).expect("kick");
}

impl Guest {
    pub fn connect(socket: &Path, request_queues: usize, event_idx: bool) -> Self {
        let num_queues = 1 + request_queues;
        let mut frontend = Frontend::connect(socket, num_queues as u64).expect("connect");

        frontend.set_owner().expect("set_owner");
        let features = frontend.get_features().expect("get_features");
        let mut acked = features;
        if !event_idx {
            acked &= !(1 << virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);
        }
        frontend.set_features(acked).expect("set_features");
        let proto = frontend.get_protocol_features().expect("protocol features");
        frontend
            .set_protocol_features(proto)
            .expect("set_protocol_features");
        if proto.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every set-up message is then acknowledged before the next one is sent.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        assert_eq!(
            frontend.get_queue_num().expect("get_queue_num"),
            num_queues as u64
        );

        let file = tempfile::tempfile().expect("memory file");
        file.set_len(MEM_SIZE as u64).expect("size memory file");
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(MEM_BASE),
            MEM_SIZE,
            Some(FileOffset::new(file, 0)),
        )])
        .expect("guest memory");
        let region = mem.find_region(GuestAddress(MEM_BASE)).expect("region");
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).expect("region info");
        frontend.set_mem_table(&[info]).expect("set_mem_table");

        let mut queues = Vec::new();
        for index in 0..num_queues {
            let desc = MEM_BASE + index as u64 * QUEUE_AREA;
            let q = GuestQueue {
                desc,
                avail: desc + 0x1000,
                used: desc + 0x2000,
                avail_idx: 0,
                last_used: 0,
                kick: EventFd::new(libc::EFD_NONBLOCK).expect("kick eventfd"),
                call: EventFd::new(libc::EFD_NONBLOCK).expect("call eventfd"),
            };
            let host = |gpa: u64| {
                mem.get_host_address(GuestAddress(gpa))
                    .expect("host address") as u64
            };
            let config = VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: host(q.desc),
                used_ring_addr: host(q.used),
                avail_ring_addr: host(q.avail),
                log_addr: None,
            };
            frontend
                .set_vring_num(index, QUEUE_SIZE)
                .expect("set_vring_num");
            frontend.set_vring_base(index, 0).expect("set_vring_base");
            frontend
                .set_vring_addr(index, &config)
                .expect("set_vring_addr");
            frontend
                .set_vring_call(index, &q.call)
                .expect("set_vring_call");
            frontend
                .set_vring_kick(index, &q.kick)
                .expect("set_vring_kick");
            frontend
                .set_vring_enable(index, true)
                .expect("set_vring_enable");
            queues.push(q);
        }

        Guest {
            _frontend: frontend,
            mem,
            queues,
            next_unique: 1,
            event_idx,
        }
    }

    /// Submits `chains` on queue `qi` and returns their completions in submission order,
    /// and whether the device signalled the queue.
    pub fn submit_many(&mut self, qi: usize, chains: &[Chain]) -> (Vec<Completion>, bool) {
        let pending = self.start(qi, chains);
        self.finish(qi, pending)
    }

    /// Lays `chains` out in queue `qi`'s descriptor table and data area, makes them available
    /// and kicks the device, without waiting. At most one batch per queue may be in flight.
    pub fn start(&mut self, qi: usize, chains: &[Chain]) -> Pending {
        self.start_in(qi, chains, 0)
    }

    /// Like [`Guest::start`], using half `half` (0 or 1) of the queue's descriptors and data
    /// area: two batches may then be in flight on one queue at once.
    pub fn start_in(&mut self, qi: usize, chains: &[Chain], half: u16) -> Pending {
        let mut next_desc: u16 = half * (QUEUE_SIZE / 2);
        let area = (DATA_END - DATA_BASE) / MAX_QUEUES / 2;
        let mut data = DATA_BASE + (qi as u64 * 2 + u64::from(half)) * area;
        let data_end = data + area;
        let mut alloc = |len: u64| {
            let at = data;
            data = (data + len + 7) & !7;
            assert!(data <= data_end, "test data area exhausted");
            at
        };
        let mem = &self.mem;
        let mut heads = Vec::new();
        let mut outs: Vec<Vec<(u64, u32)>> = Vec::new();
        for chain in chains {
            let mut list = Vec::new();
            let mut out = Vec::new();
            for d in &chain.descs {
                match d {
                    Desc::In(bytes) => {
                        let at = alloc(bytes.len() as u64);
                        mem.write_slice(bytes, GuestAddress(at))
                            .expect("write request");
                        list.push((at, bytes.len() as u32, 0));
                    }
                    Desc::Out(len) => {
                        let at = alloc(u64::from(*len));
                        // Garbage, so that a reply the device did not write is noticed.
                        mem.write_slice(&vec![0xa5; *len as usize], GuestAddress(at))
                            .expect("fill reply buffer");
                        list.push((at, *len, VIRTQ_DESC_F_WRITE));
                        out.push((at, *len));
                    }
                    Desc::RawIn(addr, len) => list.push((*addr, *len, 0)),
                    Desc::RawOut(addr, len) => list.push((*addr, *len, VIRTQ_DESC_F_WRITE)),
                }
            }
            let q = &self.queues[qi];
            let head = next_desc;
            if chain.indirect {
                let table = alloc(16 * list.len() as u64);
                for (i, (addr, len, flags)) in list.iter().enumerate() {
                    let last = i + 1 == list.len();
                    let flags = if last {
                        *flags
                    } else {
                        flags | VIRTQ_DESC_F_NEXT
                    };
                    let at = table + 16 * i as u64;
                    write_desc(mem, at, *addr, *len, flags, (i + 1) as u16);
                }
                let at = q.desc + 16 * u64::from(head);
                write_desc(
                    mem,
                    at,
                    table,
                    16 * list.len() as u32,
                    VIRTQ_DESC_F_INDIRECT,
                    0,
                );
                next_desc += 1;
            } else {
                for (i, (addr, len, flags)) in list.iter().enumerate() {
                    let idx = head + i as u16;
                    let last = i + 1 == list.len();
                    let flags = if last {
                        *flags
                    } else {
                        flags | VIRTQ_DESC_F_NEXT
                    };
                    write_desc(
                        mem,
                        q.desc + 16 * u64::from(idx),
                        *addr,
                        *len,
                        flags,
                        idx + 1,
                    );
                }
                next_desc += list.len() as u16;
            }
            assert!(next_desc <= QUEUE_SIZE, "too many descriptors");
            heads.push(head);
            outs.push(out);
        }

        publish(mem, &mut self.queues[qi], &heads);
        Pending { heads, outs }
    }

    /// Waits until the batch started by [`Guest::start`] on queue `qi` is used.
    pub fn finish(&mut self, qi: usize, pending: Pending) -> (Vec<Completion>, bool) {
        self.finish_with(qi, pending, Duration::from_secs(2))
    }

    /// Like [`Guest::finish`], waiting at most `for_signal` for the device's call (after the
    /// batch is used). A batch that completes after a later one may get none: the used event
    /// index the guest published is behind by then, as a guest driver that did not re-arm.
    pub fn finish_with(
        &mut self,
        qi: usize,
        pending: Pending,
        for_signal: Duration,
    ) -> (Vec<Completion>, bool) {
        let Pending { heads, outs } = pending;
        let mem = &self.mem;
        let q = &mut self.queues[qi];
        let target = q.last_used.wrapping_add(heads.len() as u16);
        let started = Instant::now();
        let deadline = started + COMPLETION_TIMEOUT;
        loop {
            let used_idx: u16 = mem
                .load(GuestAddress(q.used + 2), Ordering::Acquire)
                .expect("used idx");
            // At least: another batch in flight on the queue may complete first, or after.
            if used_idx.wrapping_sub(q.last_used) >= heads.len() as u16 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "device did not complete the requests (used idx {used_idx}, want {target})"
            );
            pause(started);
        }

        let mut by_head = HashMap::new();
        for i in 0..heads.len() as u16 {
            let slot = u64::from(q.last_used.wrapping_add(i) % QUEUE_SIZE);
            let elem = q.used + 4 + 8 * slot;
            let id: u32 = mem.read_obj(GuestAddress(elem)).expect("used id");
            let len: u32 = mem.read_obj(GuestAddress(elem + 4)).expect("used len");
            by_head.insert(id as u16, len);
        }
        q.last_used = target;

        let mut signalled = false;
        let started = Instant::now();
        let deadline = started + for_signal;
        while !signalled && Instant::now() < deadline {
            signalled = q.call.read().is_ok();
            if !signalled {
                pause(started);
            }
        }

        let completions = heads
            .iter()
            .zip(outs)
            .map(|(head, out)| {
                let used_len = *by_head.get(head).expect("every chain is used");
                let mut data = Vec::new();
                let mut left = used_len as usize;
                for (addr, len) in out {
                    let n = left.min(len as usize);
                    let mut buf = vec![0; n];
                    mem.read_slice(&mut buf, GuestAddress(addr))
                        .expect("read reply");
                    data.extend_from_slice(&buf);
                    left -= n;
                }
                Completion { used_len, data }
            })
            .collect();
        (completions, signalled)
    }

    /// Makes `heads` available on queue `qi` and kicks the device, without waiting.
    pub fn publish(&mut self, qi: usize, heads: &[u16]) {
        publish(&self.mem, &mut self.queues[qi], heads);
    }

    pub fn submit(&mut self, qi: usize, chain: Chain) -> Completion {
        let (mut done, signalled) = self.submit_many(qi, &[chain]);
        assert!(signalled, "device did not signal the used queue");
        done.pop().expect("one completion")
    }

    pub fn unique(&mut self) -> u64 {
        self.next_unique += 1;
        self.next_unique
    }

    /// Sends one FUSE request on the request queue and checks the reply's framing.
    pub fn fuse(&mut self, opcode: Opcode, nodeid: u64, body: &[u8], reply: u32) -> Reply {
        self.fuse_on(REQUEST_QUEUE, opcode, nodeid, body, reply)
    }

    /// The same on queue `qi` (a hostile guest may send any request on any queue).
    pub fn fuse_on(
        &mut self,
        qi: usize,
        opcode: Opcode,
        nodeid: u64,
        body: &[u8],
        reply: u32,
    ) -> Reply {
        let unique = self.unique();
        let req = fuse_request(opcode as u32, nodeid, unique, body);
        let done = self.submit(qi, Chain::request(req, reply));
        Reply::parse(done, unique)
    }

    pub fn init(&mut self) -> InitOut {
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 128 * 1024,
            flags: FsOptions::DO_READDIRPLUS.bits() as u32,
        };
        self.fuse(Opcode::Init, 0, init.as_slice(), 4096).ok_obj()
    }

    pub fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        let name = CString::new(name).expect("name");
        self.fuse(Opcode::Lookup, parent, name.as_bytes_with_nul(), 4096)
            .obj()
    }

    pub fn getattr(&mut self, nodeid: u64) -> Result<AttrOut, i32> {
        let body = GetattrIn::default();
        self.fuse(Opcode::Getattr, nodeid, body.as_slice(), 4096)
            .obj()
    }

    pub fn open(&mut self, nodeid: u64, opcode: Opcode) -> Result<OpenOut, i32> {
        let body = OpenIn {
            flags: libc::O_RDONLY as u32,
            fuse_flags: 0,
        };
        self.fuse(opcode, nodeid, body.as_slice(), 4096).obj()
    }

    pub fn read_in(fh: u64, offset: u64, size: u32) -> ReadIn {
        ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        }
    }

    pub fn read(&mut self, nodeid: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let body = Self::read_in(fh, offset, size);
        self.fuse(Opcode::Read, nodeid, body.as_slice(), 16 + size)
            .bytes()
    }

    pub fn readdirplus(&mut self, nodeid: u64, fh: u64) -> Result<Vec<(String, EntryOut)>, i32> {
        let body = Self::read_in(fh, 0, 8192);
        let data = self
            .fuse(Opcode::Readdirplus, nodeid, body.as_slice(), 16 + 8192)
            .bytes()?;
        Ok(parse_direntplus(&data))
    }

    pub fn readlink(&mut self, nodeid: u64) -> Result<Vec<u8>, i32> {
        self.fuse(Opcode::Readlink, nodeid, &[], 4096).bytes()
    }

    pub fn getxattr(&mut self, nodeid: u64, name: &str, size: u32) -> Result<Vec<u8>, i32> {
        let mut body = GetxattrIn { size, padding: 0 }.as_slice().to_vec();
        body.extend_from_slice(CString::new(name).expect("name").as_bytes_with_nul());
        self.fuse(Opcode::Getxattr, nodeid, &body, 4096).bytes()
    }

    pub fn statfs(&mut self, nodeid: u64) -> Result<Kstatfs, i32> {
        self.fuse(Opcode::Statfs, nodeid, &[], 4096)
            .obj::<StatfsOut>()
            .map(|s| s.st)
    }

    /// A request that must succeed: the daemon still serves after what came before.
    pub fn assert_alive(&mut self) {
        let attr = self
            .getattr(ROOT)
            .expect("GETATTR of the root after a bad request");
        assert_eq!(attr.attr.mode & libc::S_IFMT, libc::S_IFDIR);
    }
}

pub fn fuse_request(opcode: u32, nodeid: u64, unique: u64, body: &[u8]) -> Vec<u8> {
    let header = InHeader {
        len: (size_of::<InHeader>() + body.len()) as u32,
        opcode,
        unique,
        nodeid,
        uid: 0,
        gid: 0,
        pid: 1,
        padding: 0,
    };
    let mut req = header.as_slice().to_vec();
    req.extend_from_slice(body);
    req
}

/// Decodes a plain-old-data FUSE structure from the front of `bytes`.
pub fn decode<T: ByteValued + Default>(bytes: &[u8]) -> T {
    assert!(
        bytes.len() >= size_of::<T>(),
        "reply of {} bytes is too short for {}",
        bytes.len(),
        std::any::type_name::<T>()
    );
    let mut value = T::default();
    value
        .as_mut_slice()
        .copy_from_slice(&bytes[..size_of::<T>()]);
    value
}

pub fn parse_direntplus(mut data: &[u8]) -> Vec<(String, EntryOut)> {
    let fixed = size_of::<EntryOut>() + size_of::<Dirent>();
    let mut entries = Vec::new();
    while data.len() >= fixed {
        let entry: EntryOut = decode(data);
        let dirent: Dirent = decode(&data[size_of::<EntryOut>()..]);
        let namelen = dirent.namelen as usize;
        let name = &data[fixed..fixed + namelen];
        entries.push((String::from_utf8_lossy(name).into_owned(), entry));
        let padded = (fixed + namelen + 7) & !7;
        data = &data[padded.min(data.len())..];
    }
    entries
}

/// A FUSE reply: its header and body.
pub struct Reply {
    pub header: OutHeader,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn parse(done: Completion, unique: u64) -> Self {
        assert!(
            done.used_len as usize >= size_of::<OutHeader>(),
            "reply too short: used len {}",
            done.used_len
        );
        let header: OutHeader = decode(&done.data);
        assert_eq!(header.unique, unique, "reply to another request");
        assert_eq!(header.len, done.used_len, "header len vs used len");
        Reply {
            header,
            body: done.data[size_of::<OutHeader>()..].to_vec(),
        }
    }

    /// The body, or the positive errno of an error reply.
    pub fn bytes(self) -> Result<Vec<u8>, i32> {
        if self.header.error != 0 {
            assert!(self.body.is_empty(), "error reply with a body");
            return Err(-self.header.error);
        }
        Ok(self.body)
    }

    pub fn obj<T: ByteValued + Default>(self) -> Result<T, i32> {
        self.bytes().map(|b| decode(&b))
    }

    pub fn ok_obj<T: ByteValued + Default>(self) -> T {
        match self.obj() {
            Ok(v) => v,
            Err(errno) => panic!("request failed with errno {errno}"),
        }
    }
}
