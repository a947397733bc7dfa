//! End-to-end tests of the vhost-user-fs device, without a VM.
//!
//! Each test runs the daemon (`skiff::vhost::serve_until`) on a socket in a temp directory and
//! drives it with the vhost crate's real vhost-user frontend, the way a VMM does: feature and
//! protocol negotiation, the config space, a memfd-like shared guest memory (a temp file mapped
//! by both sides), split virtqueues laid out in that memory, kick and call eventfds. FUSE
//! requests are then written into guest memory exactly as the guest's virtio-fs driver writes
//! them, and the replies are read back from the used ring.
//!
//! The filesystem under test is built by [`filesystem_under_test`]: switching from the
//! passthrough filesystem to another one (e.g. `skiff::fs::RafsFs` over an image built from the
//! same tree) only changes that function and the `FsUnderTest` alias.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::mem::size_of;
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, Dirent, EntryOut, FsOptions, GetattrIn, GetxattrIn, GetxattrOut, InHeader, InitIn,
    InitOut, Kstatfs, Opcode, OpenIn, OpenOut, OutHeader, ReadIn, StatfsOut,
};
use skiff::build::{build, BuildOptions, BuildSource, Compressor};
use skiff::format::Bootstrap;
use skiff::fs::{RafsFs, RafsFsOptions};
use skiff::runtime::{ExitEvent, ExitReason, SocketError};
use skiff::storage::backend::fault::FaultyBackend;
use skiff::storage::{
    CachedChunkSource, ChunkDiskCache, ChunkSource, LocalFsBackend, Metrics, RetryPolicy,
    RetryingBackend,
};
use skiff::vhost::{serve, serve_until, ServeOptions, VhostError};
use tempfile::TempDir;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{ByteValued, Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

// ---------------------------------------------------------------------------------------------
// The filesystem under test.

/// The filesystem the device serves in these tests: Skiff's own, over an image of the tree.
type FsUnderTest = RafsFs;

/// Builds an image of the tree made by [`make_tree`] at `root` (next to it) and returns the
/// filesystem serving it.
fn filesystem_under_test(root: &Path) -> Arc<FsUnderTest> {
    filesystem_over(root, RafsFsOptions::default(), |blobs, _| {
        Arc::new(CachedChunkSource::in_memory(
            LocalFsBackend::new(blobs),
            1 << 20,
        ))
    })
}

/// Like [`filesystem_under_test`], reading chunks through the source `source` makes (given
/// the blob directory and the image).
fn filesystem_over(
    root: &Path,
    fs_opts: RafsFsOptions,
    source: impl FnOnce(&Path, &Bootstrap) -> Arc<dyn ChunkSource>,
) -> Arc<FsUnderTest> {
    let out = root.with_file_name("image");
    let opts = BuildOptions {
        bootstrap: out.join("bootstrap"),
        blob_dir: out.join("blobs"),
        chunk_size: 16 * 1024,
        compressor: Compressor::Lz4,
        chunk_dicts: Vec::new(),
        progress: false,
        io_threads: 0,
    };
    build(&BuildSource::Dir(root.to_path_buf()), &opts).expect("build image");
    let bootstrap = Bootstrap::load(&opts.bootstrap).expect("load image");
    let source = source(&opts.blob_dir, &bootstrap);
    Arc::new(RafsFs::new(Arc::new(bootstrap), source, fs_opts))
}

const HELLO: &[u8] = b"Hello from skiff, over vhost-user and virtio-fs!\n";
const BIG_LEN: usize = 64 * 1024;
const XATTR_NAME: &str = "user.skiff.test";
const XATTR_VALUE: &[u8] = b"rafs-v6";

/// Content of `big.bin`: a pattern that shows misplaced bytes.
fn big_content() -> Vec<u8> {
    (0..BIG_LEN).map(|i| (i % 251) as u8).collect()
}

/// Creates the test tree: a file with an xattr, a larger file, a symlink and a directory.
fn make_tree(root: &Path) {
    fs::write(root.join("hello.txt"), HELLO).expect("write hello.txt");
    fs::write(root.join("big.bin"), big_content()).expect("write big.bin");
    symlink("hello.txt", root.join("link")).expect("symlink");
    fs::create_dir(root.join("subdir")).expect("mkdir");
    fs::write(root.join("subdir/nested.txt"), b"nested\n").expect("write nested");
    xattr::set(root.join("hello.txt"), XATTR_NAME, XATTR_VALUE)
        .expect("set user xattr (does the temp dir's filesystem support user xattrs?)");
}

// ---------------------------------------------------------------------------------------------
// The daemon under test.

/// Shows the daemon's logs with `RUST_LOG=skiff=debug cargo test --test vhost_device`.
fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

const TAG: &str = "skiff-test";
const TIMEOUT: Duration = Duration::from_secs(10);

/// A running daemon serving the test tree on a socket in a temp directory.
struct Daemon {
    /// Keeps the tree and the socket directory alive.
    _dir: TempDir,
    socket: PathBuf,
    threads: usize,
    exit: ExitEvent,
    thread: Option<JoinHandle<Result<(), VhostError>>>,
}

impl Daemon {
    fn start(threads: usize) -> Self {
        Self::start_with(threads, |_| {})
    }

    /// Starts the daemon after `prepare` ran on the socket path.
    fn start_with(threads: usize, prepare: impl FnOnce(&Path)) -> Self {
        Self::start_serving(threads, prepare, filesystem_under_test)
    }

    /// Starts the daemon serving the filesystem `make_fs` builds over the test tree.
    fn start_serving(
        threads: usize,
        prepare: impl FnOnce(&Path),
        make_fs: impl FnOnce(&Path) -> Arc<FsUnderTest>,
    ) -> Self {
        init_logging();
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        fs::create_dir(&root).expect("mkdir root");
        make_tree(&root);
        let socket = dir.path().join("vfs.sock");
        prepare(&socket);

        let fs = make_fs(&root);
        let mut opts = ServeOptions::new(&socket, TAG);
        opts.threads = threads;
        opts.queue_size = 256;
        opts.advertise_config = true;
        let exit = ExitEvent::new().expect("exit event");
        let exit2 = exit.clone();
        let thread = thread::spawn(move || serve_until(fs, &opts, &exit2));
        let daemon = Daemon {
            _dir: dir,
            socket,
            threads,
            exit,
            thread: Some(thread),
        };
        daemon.wait_for_listener();
        daemon
    }

    fn wait_for_listener(&self) {
        let deadline = Instant::now() + TIMEOUT;
        // The stale-socket case starts with a socket file there: wait until ours is bound,
        // which is when a connection succeeds.
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(Instant::now() < deadline, "daemon did not start listening");
            thread::sleep(Duration::from_millis(5));
        }
        // That probe connection is served and dropped like a VMM that went away at once.
    }

    /// Connects a new VMM and sets the device up, with or without EVENT_IDX.
    fn connect(&self, event_idx: bool) -> Guest {
        Guest::connect(&self.socket, self.threads, event_idx)
    }

    /// Stops the daemon and returns what `serve_until` returned.
    fn shutdown(mut self) -> Result<(), VhostError> {
        self.exit.notify(ExitReason::Requested);
        let thread = self.thread.take().expect("daemon thread");
        let deadline = Instant::now() + TIMEOUT;
        while !thread.is_finished() {
            assert!(Instant::now() < deadline, "daemon did not stop");
            thread::sleep(Duration::from_millis(5));
        }
        thread.join().expect("daemon thread panicked")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.exit.notify(ExitReason::Requested);
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal guest: shared memory, split virtqueues, and a vhost-user frontend.

const MEM_BASE: u64 = 0x10_0000;
const MEM_SIZE: usize = 0x40_0000;
const QUEUE_SIZE: u16 = 256;
/// Guest memory reserved per queue for its descriptor table and rings.
const QUEUE_AREA: u64 = 0x1_0000;
/// Start of the area request and reply buffers are allocated from.
const DATA_BASE: u64 = MEM_BASE + 0x10_0000;
const DATA_END: u64 = MEM_BASE + MEM_SIZE as u64;
/// Most queues a test guest sets up: each gets its own slice of the data area.
const MAX_QUEUES: u64 = 16;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;

const HIPRIO_QUEUE: usize = 0;
const REQUEST_QUEUE: usize = 1;
const ROOT: u64 = 1;

/// One descriptor of a chain to submit.
#[derive(Clone, Debug)]
enum Desc {
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
struct Chain {
    descs: Vec<Desc>,
    indirect: bool,
}

impl Chain {
    fn new(descs: Vec<Desc>) -> Self {
        Chain {
            descs,
            indirect: false,
        }
    }

    /// A request in one readable buffer and room for a reply of `reply` bytes.
    fn request(req: Vec<u8>, reply: u32) -> Self {
        Chain::new(vec![Desc::In(req), Desc::Out(reply)])
    }
}

/// A batch of chains made available but not yet waited for: their heads and the writable
/// buffers of each.
struct Pending {
    heads: Vec<u16>,
    outs: Vec<Vec<(u64, u32)>>,
}

/// A used descriptor chain, with the bytes the device wrote.
#[derive(Debug)]
struct Completion {
    used_len: u32,
    data: Vec<u8>,
}

struct GuestQueue {
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

/// The VMM and guest driver side of one connection.
struct Guest {
    /// The vhost-user connection; dropping it disconnects the VMM.
    _frontend: Frontend,
    mem: GuestMemoryMmap,
    queues: Vec<GuestQueue>,
    next_unique: u64,
    event_idx: bool,
}

fn write_desc(mem: &GuestMemoryMmap, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(at))
        .expect("write descriptor");
}

/// Makes `heads` available on `q` and kicks the device, without waiting.
fn publish(mem: &GuestMemoryMmap, q: &mut GuestQueue, heads: &[u16]) {
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
    fn connect(socket: &Path, request_queues: usize, event_idx: bool) -> Self {
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
    fn submit_many(&mut self, qi: usize, chains: &[Chain]) -> (Vec<Completion>, bool) {
        let pending = self.start(qi, chains);
        self.finish(qi, pending)
    }

    /// Lays `chains` out in queue `qi`'s descriptor table and data area, makes them available
    /// and kicks the device, without waiting. At most one batch per queue may be in flight.
    fn start(&mut self, qi: usize, chains: &[Chain]) -> Pending {
        self.start_in(qi, chains, 0)
    }

    /// Like [`Guest::start`], using half `half` (0 or 1) of the queue's descriptors and data
    /// area: two batches may then be in flight on one queue at once.
    fn start_in(&mut self, qi: usize, chains: &[Chain], half: u16) -> Pending {
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
    fn finish(&mut self, qi: usize, pending: Pending) -> (Vec<Completion>, bool) {
        self.finish_with(qi, pending, Duration::from_secs(2))
    }

    /// Like [`Guest::finish`], waiting at most `for_signal` for the device's call (after the
    /// batch is used). A batch that completes after a later one may get none: the used event
    /// index the guest published is behind by then, as a guest driver that did not re-arm.
    fn finish_with(
        &mut self,
        qi: usize,
        pending: Pending,
        for_signal: Duration,
    ) -> (Vec<Completion>, bool) {
        let Pending { heads, outs } = pending;
        let mem = &self.mem;
        let q = &mut self.queues[qi];
        let target = q.last_used.wrapping_add(heads.len() as u16);
        let deadline = Instant::now() + TIMEOUT;
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
            thread::sleep(Duration::from_millis(1));
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
        let deadline = Instant::now() + for_signal;
        while !signalled && Instant::now() < deadline {
            signalled = q.call.read().is_ok();
            if !signalled {
                thread::sleep(Duration::from_millis(1));
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
    fn publish(&mut self, qi: usize, heads: &[u16]) {
        publish(&self.mem, &mut self.queues[qi], heads);
    }

    fn submit(&mut self, qi: usize, chain: Chain) -> Completion {
        let (mut done, signalled) = self.submit_many(qi, &[chain]);
        assert!(signalled, "device did not signal the used queue");
        done.pop().expect("one completion")
    }

    fn unique(&mut self) -> u64 {
        self.next_unique += 1;
        self.next_unique
    }

    /// Sends one FUSE request on the request queue and checks the reply's framing.
    fn fuse(&mut self, opcode: Opcode, nodeid: u64, body: &[u8], reply: u32) -> Reply {
        let unique = self.unique();
        let req = fuse_request(opcode as u32, nodeid, unique, body);
        let done = self.submit(REQUEST_QUEUE, Chain::request(req, reply));
        Reply::parse(done, unique)
    }

    fn init(&mut self) -> InitOut {
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 128 * 1024,
            flags: FsOptions::DO_READDIRPLUS.bits() as u32,
        };
        self.fuse(Opcode::Init, 0, init.as_slice(), 4096).ok_obj()
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        let name = CString::new(name).expect("name");
        self.fuse(Opcode::Lookup, parent, name.as_bytes_with_nul(), 4096)
            .obj()
    }

    fn getattr(&mut self, nodeid: u64) -> Result<AttrOut, i32> {
        let body = GetattrIn::default();
        self.fuse(Opcode::Getattr, nodeid, body.as_slice(), 4096)
            .obj()
    }

    fn open(&mut self, nodeid: u64, opcode: Opcode) -> Result<OpenOut, i32> {
        let body = OpenIn {
            flags: libc::O_RDONLY as u32,
            fuse_flags: 0,
        };
        self.fuse(opcode, nodeid, body.as_slice(), 4096).obj()
    }

    fn read_in(fh: u64, offset: u64, size: u32) -> ReadIn {
        ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        }
    }

    fn read(&mut self, nodeid: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let body = Self::read_in(fh, offset, size);
        self.fuse(Opcode::Read, nodeid, body.as_slice(), 16 + size)
            .bytes()
    }

    fn readdirplus(&mut self, nodeid: u64, fh: u64) -> Result<Vec<(String, EntryOut)>, i32> {
        let body = Self::read_in(fh, 0, 8192);
        let data = self
            .fuse(Opcode::Readdirplus, nodeid, body.as_slice(), 16 + 8192)
            .bytes()?;
        Ok(parse_direntplus(&data))
    }

    fn readlink(&mut self, nodeid: u64) -> Result<Vec<u8>, i32> {
        self.fuse(Opcode::Readlink, nodeid, &[], 4096).bytes()
    }

    fn getxattr(&mut self, nodeid: u64, name: &str, size: u32) -> Result<Vec<u8>, i32> {
        let mut body = GetxattrIn { size, padding: 0 }.as_slice().to_vec();
        body.extend_from_slice(CString::new(name).expect("name").as_bytes_with_nul());
        self.fuse(Opcode::Getxattr, nodeid, &body, 4096).bytes()
    }

    fn statfs(&mut self, nodeid: u64) -> Result<Kstatfs, i32> {
        self.fuse(Opcode::Statfs, nodeid, &[], 4096)
            .obj::<StatfsOut>()
            .map(|s| s.st)
    }

    /// A request that must succeed: the daemon still serves after what came before.
    fn assert_alive(&mut self) {
        let attr = self
            .getattr(ROOT)
            .expect("GETATTR of the root after a bad request");
        assert_eq!(attr.attr.mode & libc::S_IFMT, libc::S_IFDIR);
    }
}

fn fuse_request(opcode: u32, nodeid: u64, unique: u64, body: &[u8]) -> Vec<u8> {
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
fn decode<T: ByteValued + Default>(bytes: &[u8]) -> T {
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

fn parse_direntplus(mut data: &[u8]) -> Vec<(String, EntryOut)> {
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
struct Reply {
    header: OutHeader,
    body: Vec<u8>,
}

impl Reply {
    fn parse(done: Completion, unique: u64) -> Self {
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
    fn bytes(self) -> Result<Vec<u8>, i32> {
        if self.header.error != 0 {
            assert!(self.body.is_empty(), "error reply with a body");
            return Err(-self.header.error);
        }
        Ok(self.body)
    }

    fn obj<T: ByteValued + Default>(self) -> Result<T, i32> {
        self.bytes().map(|b| decode(&b))
    }

    fn ok_obj<T: ByteValued + Default>(self) -> T {
        match self.obj() {
            Ok(v) => v,
            Err(errno) => panic!("request failed with errno {errno}"),
        }
    }
}

/// A daemon, a connected guest, and a completed FUSE INIT.
fn session(threads: usize) -> (Daemon, Guest) {
    let daemon = Daemon::start(threads);
    let mut guest = daemon.connect(true);
    let init = guest.init();
    assert_eq!(init.major, 7);
    (daemon, guest)
}

// ---------------------------------------------------------------------------------------------
// Protocol negotiation and lifecycle.

#[test]
fn negotiates_features_config_and_queues() {
    let daemon = Daemon::start(2);
    let mut frontend = Frontend::connect(&daemon.socket, 3).expect("connect");
    frontend.set_owner().expect("set_owner");
    let features = frontend.get_features().expect("features");
    for bit in [
        virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1,
        virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX,
        virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC,
    ] {
        assert_ne!(features & (1 << bit), 0, "feature bit {bit} offered");
    }
    assert_ne!(
        features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    frontend.set_features(features).expect("set_features");
    let proto = frontend.get_protocol_features().expect("protocol features");
    assert!(proto.contains(VhostUserProtocolFeatures::MQ));
    assert!(proto.contains(VhostUserProtocolFeatures::CONFIG));
    frontend.set_protocol_features(proto).expect("ack protocol");
    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert_eq!(frontend.get_queue_num().expect("queue num"), 3);

    let (_, config) = frontend
        .get_config(0, 40, VhostUserConfigFlags::empty(), &[0; 40])
        .expect("config space");
    assert_eq!(&config[..TAG.len()], TAG.as_bytes());
    assert!(config[TAG.len()..36].iter().all(|&b| b == 0));
    assert_eq!(&config[36..40], &2u32.to_le_bytes());
    // A partial read of just num_request_queues, as a VMM may do.
    let (_, nrq) = frontend
        .get_config(36, 4, VhostUserConfigFlags::empty(), &[0; 4])
        .expect("config field");
    assert_eq!(nrq, 2u32.to_le_bytes());
    // (An out-of-range read is answered with an empty payload, as the vhost-user spec says
    // for errors; the vhost crate's frontend then waits for the payload it asked for, so that
    // case is covered by the device's unit tests instead.)
    assert_eq!(frontend.get_queue_num().expect("queue num"), 3);

    drop(frontend);
    daemon.shutdown().expect("clean shutdown");
}

#[test]
fn serves_a_new_vmm_after_disconnect() {
    let daemon = Daemon::start(1);
    for round in 0..3 {
        let mut guest = daemon.connect(true);
        assert_eq!(guest.init().major, 7, "round {round}");
        let hello = guest.lookup(ROOT, "hello.txt").expect("lookup");
        assert_eq!(hello.attr.size, HELLO.len() as u64);
        // The VMM goes away (VM shut down or rebooted); the next round reconnects.
        drop(guest);
    }
    let socket = daemon.socket.clone();
    daemon.shutdown().expect("clean shutdown");
    assert!(!socket.exists(), "socket removed on shutdown");
}

#[test]
fn replaces_a_stale_socket_and_removes_it_on_stop() {
    let daemon = Daemon::start_with(1, |socket| {
        // Left behind by a daemon that died: a socket file nobody listens on.
        drop(UnixListener::bind(socket).expect("stale socket"));
        assert!(socket.exists());
    });
    let mut guest = daemon.connect(true);
    guest.init();
    guest.assert_alive();
    drop(guest);
    let socket = daemon.socket.clone();
    daemon.shutdown().expect("clean shutdown");
    assert!(!socket.exists());
}

#[test]
fn stop_while_a_vmm_is_connected() {
    let (daemon, guest) = session(1);
    let socket = daemon.socket.clone();
    daemon.shutdown().expect("shutdown with a VMM connected");
    assert!(!socket.exists());
    drop(guest);
}

#[test]
fn refuses_bad_options_and_foreign_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    fs::create_dir(&root).expect("mkdir");
    make_tree(&root);
    let fs = filesystem_under_test(&root);
    let stop = ExitEvent::new().expect("exit event");
    stop.notify(ExitReason::Requested);
    let socket = dir.path().join("s.sock");

    let mut opts = ServeOptions::new(&socket, "x".repeat(37));
    assert!(matches!(
        serve_until(fs.clone(), &opts, &stop),
        Err(VhostError::InvalidTag { .. })
    ));
    opts.tag = TAG.to_owned();
    opts.threads = 0;
    assert!(matches!(
        serve_until(fs.clone(), &opts, &stop),
        Err(VhostError::InvalidThreads(0))
    ));
    opts.threads = 1;
    opts.queue_size = 1000;
    assert!(matches!(
        serve_until(fs.clone(), &opts, &stop),
        Err(VhostError::InvalidQueueSize(1000))
    ));
    assert!(!socket.exists(), "nothing created for bad options");

    // A regular file where the socket should go is not deleted.
    opts.queue_size = 1024;
    fs::write(&socket, b"precious").expect("write");
    assert!(matches!(
        serve_until(fs.clone(), &opts, &stop),
        Err(VhostError::Socket(SocketError::NotASocket { .. }))
    ));
    assert_eq!(fs::read(&socket).expect("still there"), b"precious");

    // A missing parent directory is a listen error with its cause.
    opts.socket = dir.path().join("missing/s.sock");
    let err = serve_until(fs.clone(), &opts, &stop).expect_err("no parent dir");
    assert!(matches!(err, VhostError::Socket(SocketError::Io { .. })));
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn serve_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    fs::create_dir(&root).expect("mkdir");
    make_tree(&root);
    let socket = dir.path().join("sig.sock");
    let opts = ServeOptions::new(&socket, TAG);
    let fs = filesystem_under_test(&root);
    let thread = thread::spawn(move || serve(fs, &opts));

    // The handlers are installed before the socket is bound.
    let deadline = Instant::now() + TIMEOUT;
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "serve did not start");
        thread::sleep(Duration::from_millis(5));
    }
    let mut guest = Guest::connect(&socket, 1, true);
    guest.init();
    guest.assert_alive();

    signal_hook::low_level::raise(libc::SIGTERM).expect("raise SIGTERM");
    let deadline = Instant::now() + TIMEOUT;
    while !thread.is_finished() {
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        thread::sleep(Duration::from_millis(5));
    }
    thread
        .join()
        .expect("serve panicked")
        .expect("clean exit on SIGTERM");
    assert!(!socket.exists(), "socket removed on SIGTERM");
    drop(guest);
}

// ---------------------------------------------------------------------------------------------
// FUSE requests.

#[test]
fn init_negotiates_the_fuse_protocol() {
    let daemon = Daemon::start(1);
    let mut guest = daemon.connect(true);
    let init = guest.init();
    assert_eq!(init.major, 7);
    assert!(init.minor >= 27, "minor {}", init.minor);
    assert_ne!(
        u64::from(init.flags) & FsOptions::DO_READDIRPLUS.bits(),
        0,
        "READDIRPLUS negotiated"
    );
    assert!(init.max_write > 0);

    // DESTROY (sent by the guest on unmount) is answered, with no body.
    let reply = guest.fuse(Opcode::Destroy, 0, &[], 4096);
    assert_eq!(reply.bytes().expect("DESTROY succeeds"), b"");
}

#[test]
fn lookup_and_getattr() {
    let (_daemon, mut guest) = session(1);

    let hello = guest.lookup(ROOT, "hello.txt").expect("lookup hello.txt");
    assert_ne!(hello.nodeid, 0);
    assert_eq!(hello.attr.size, HELLO.len() as u64);
    assert_eq!(hello.attr.mode & libc::S_IFMT, libc::S_IFREG);

    let link = guest.lookup(ROOT, "link").expect("lookup link");
    assert_eq!(link.attr.mode & libc::S_IFMT, libc::S_IFLNK);

    let subdir = guest.lookup(ROOT, "subdir").expect("lookup subdir");
    assert_eq!(subdir.attr.mode & libc::S_IFMT, libc::S_IFDIR);
    let nested = guest.lookup(subdir.nodeid, "nested.txt").expect("nested");
    assert_eq!(nested.attr.size, 7);

    assert_eq!(guest.lookup(ROOT, "missing").map(|_| ()), Err(libc::ENOENT));

    let attr = guest.getattr(hello.nodeid).expect("getattr");
    assert_eq!(attr.attr.ino, hello.attr.ino);
    assert_eq!(attr.attr.size, HELLO.len() as u64);
    let root = guest.getattr(ROOT).expect("getattr root");
    assert_eq!(root.attr.mode & libc::S_IFMT, libc::S_IFDIR);
}

#[test]
fn open_and_read() {
    let (_daemon, mut guest) = session(1);
    let hello = guest.lookup(ROOT, "hello.txt").expect("lookup");
    let fh = guest.open(hello.nodeid, Opcode::Open).expect("open").fh;

    assert_eq!(guest.read(hello.nodeid, fh, 0, 4096).expect("read"), HELLO);
    assert_eq!(
        guest.read(hello.nodeid, fh, 6, 4).expect("read at offset"),
        &HELLO[6..10]
    );
    assert!(guest
        .read(hello.nodeid, fh, 4096, 100)
        .expect("read past EOF")
        .is_empty());

    // A larger read whose reply spans several writable descriptors, with the request itself
    // split across two readable ones.
    let big = guest.lookup(ROOT, "big.bin").expect("lookup big");
    let fh = guest.open(big.nodeid, Opcode::Open).expect("open big").fh;
    let unique = guest.unique();
    let req = fuse_request(
        Opcode::Read as u32,
        big.nodeid,
        unique,
        Guest::read_in(fh, 1000, 20_000).as_slice(),
    );
    let (head, tail) = req.split_at(17);
    let chain = Chain::new(vec![
        Desc::In(head.to_vec()),
        Desc::In(tail.to_vec()),
        Desc::Out(10),
        Desc::Out(5000),
        Desc::Out(16_000),
    ]);
    let reply = Reply::parse(guest.submit(REQUEST_QUEUE, chain), unique);
    assert_eq!(
        reply.bytes().expect("big read"),
        &big_content()[1000..21_000]
    );
}

#[test]
fn readdirplus_lists_the_root() {
    let (_daemon, mut guest) = session(1);
    let fh = guest.open(ROOT, Opcode::Opendir).expect("opendir").fh;
    let entries = guest.readdirplus(ROOT, fh).expect("readdirplus");
    let by_name: HashMap<_, _> = entries.into_iter().collect();
    for name in ["hello.txt", "big.bin", "link", "subdir"] {
        assert!(
            by_name.contains_key(name),
            "{name} listed: {:?}",
            by_name.keys()
        );
    }
    let hello = &by_name["hello.txt"];
    assert_eq!(hello.attr.size, HELLO.len() as u64);
    assert_eq!(hello.attr.mode & libc::S_IFMT, libc::S_IFREG);
    assert_eq!(by_name["link"].attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(by_name["subdir"].attr.mode & libc::S_IFMT, libc::S_IFDIR);
}

#[test]
fn readlink_getxattr_and_statfs() {
    let (_daemon, mut guest) = session(1);
    let link = guest.lookup(ROOT, "link").expect("lookup link");
    assert_eq!(guest.readlink(link.nodeid).expect("readlink"), b"hello.txt");
    let hello = guest.lookup(ROOT, "hello.txt").expect("lookup");
    assert!(
        guest.readlink(hello.nodeid).is_err(),
        "READLINK of a regular file"
    );

    // Size probe, then the value, then a too-small buffer, then a missing attribute.
    let probe = guest.getxattr(hello.nodeid, XATTR_NAME, 0).expect("size");
    let size: GetxattrOut = decode(&probe);
    assert_eq!(size.size as usize, XATTR_VALUE.len());
    assert_eq!(
        guest
            .getxattr(hello.nodeid, XATTR_NAME, 256)
            .expect("value"),
        XATTR_VALUE
    );
    assert_eq!(
        guest.getxattr(hello.nodeid, XATTR_NAME, 2),
        Err(libc::ERANGE)
    );
    assert_eq!(
        guest.getxattr(hello.nodeid, "user.missing", 256),
        Err(libc::ENODATA)
    );

    let st = guest.statfs(ROOT).expect("statfs");
    assert!(st.bsize > 0);
    assert!(st.namelen > 0);
    assert!(st.blocks > 0);
}

#[test]
fn indirect_descriptors_and_batches() {
    let (_daemon, mut guest) = session(1);
    let hello = guest.lookup(ROOT, "hello.txt").expect("lookup");

    // One request through an indirect descriptor table.
    let unique = guest.unique();
    let req = fuse_request(
        Opcode::Getattr as u32,
        hello.nodeid,
        unique,
        GetattrIn::default().as_slice(),
    );
    let mut chain = Chain::request(req, 4096);
    chain.indirect = true;
    let attr: AttrOut = Reply::parse(guest.submit(REQUEST_QUEUE, chain), unique).ok_obj();
    assert_eq!(attr.attr.size, HELLO.len() as u64);

    // Many requests made available at once with a single kick.
    let mut uniques = Vec::new();
    let mut chains = Vec::new();
    for i in 0..16 {
        let unique = guest.unique();
        uniques.push(unique);
        let name = if i % 2 == 0 { "hello.txt" } else { "big.bin" };
        let name = CString::new(name).expect("name");
        let req = fuse_request(
            Opcode::Lookup as u32,
            ROOT,
            unique,
            name.as_bytes_with_nul(),
        );
        let mut chain = Chain::request(req, 1024);
        chain.indirect = i % 3 == 0;
        chains.push(chain);
    }
    let (done, signalled) = guest.submit_many(REQUEST_QUEUE, &chains);
    assert!(signalled);
    for (i, (done, unique)) in done.into_iter().zip(uniques).enumerate() {
        let entry: EntryOut = Reply::parse(done, unique).ok_obj();
        let want = if i % 2 == 0 { HELLO.len() } else { BIG_LEN };
        assert_eq!(entry.attr.size, want as u64);
    }
}

#[test]
fn works_without_event_idx() {
    let daemon = Daemon::start(1);
    let mut guest = daemon.connect(false);
    assert!(!guest.event_idx);
    assert_eq!(guest.init().major, 7);
    // `submit` asserts that every completion was signalled.
    for _ in 0..5 {
        guest.assert_alive();
    }
}

#[test]
fn every_request_queue_is_served() {
    let (_daemon, mut guest) = session(3);
    for queue in 1..=3 {
        let unique = guest.unique();
        let name = CString::new("hello.txt").expect("name");
        let req = fuse_request(
            Opcode::Lookup as u32,
            ROOT,
            unique,
            name.as_bytes_with_nul(),
        );
        let done = guest.submit(queue, Chain::request(req, 1024));
        let entry: EntryOut = Reply::parse(done, unique).ok_obj();
        assert_eq!(entry.attr.size, HELLO.len() as u64, "queue {queue}");
    }
}

#[test]
fn request_queues_work_in_parallel() {
    let (_daemon, mut guest) = session(3);
    let big = guest.lookup(ROOT, "big.bin").expect("lookup big");
    let fh = guest.open(big.nodeid, Opcode::Open).expect("open big").fh;
    let content = big_content();

    // A batch of reads on every request queue at once, each queue on its own worker.
    let mut in_flight = Vec::new();
    for queue in 1..=3 {
        let mut wants = Vec::new();
        let mut chains = Vec::new();
        for i in 0..8u64 {
            let unique = guest.unique();
            let offset = (queue as u64 * 8 + i) * 1024;
            let body = Guest::read_in(fh, offset, 4096);
            let req = fuse_request(Opcode::Read as u32, big.nodeid, unique, body.as_slice());
            chains.push(Chain::request(req, 16 + 4096));
            wants.push((unique, offset as usize));
        }
        in_flight.push((queue, guest.start(queue, &chains), wants));
    }
    for (queue, pending, wants) in in_flight {
        let (done, signalled) = guest.finish(queue, pending);
        assert!(signalled, "queue {queue} signalled");
        for (done, (unique, offset)) in done.into_iter().zip(wants) {
            let data = Reply::parse(done, unique).bytes().expect("read");
            assert_eq!(data, &content[offset..offset + 4096], "queue {queue}");
        }
    }
}

#[test]
fn hiprio_queue_takes_forget_without_reply() {
    let (_daemon, mut guest) = session(1);
    let hello = guest.lookup(ROOT, "hello.txt").expect("lookup");
    let unique = guest.unique();
    let req = fuse_request(
        Opcode::Forget as u32,
        hello.nodeid,
        unique,
        &1u64.to_le_bytes(),
    );
    let done = guest.submit(HIPRIO_QUEUE, Chain::new(vec![Desc::In(req)]));
    assert_eq!(done.used_len, 0, "FORGET has no reply");
    guest.assert_alive();
}

// ---------------------------------------------------------------------------------------------
// Requests off the queue thread: no head-of-line blocking, deadlines.

/// How long the backend stalls the one slow chunk.
const STALL: Duration = Duration::from_secs(5);

/// A filesystem over the test image whose chunk source reads the blob through a fault
/// injector and keeps chunks in a disk cache (as for a remote backend); reads of the first
/// chunk of `big.bin` stall for `stall`.
fn stalling_filesystem(root: &Path, stall: Duration, fs_opts: RafsFsOptions) -> Arc<FsUnderTest> {
    let cache = root.with_file_name("cache");
    filesystem_over(root, fs_opts, move |blobs, image| {
        let big = image.lookup(0, b"big.bin").expect("big.bin in the image");
        let first = image.file_chunks(big)[0].compressed_offset.get();
        let faulty = FaultyBackend::new(LocalFsBackend::new(blobs));
        faulty.stall_at(first, stall);
        let metrics = Arc::new(Metrics::default());
        let policy = RetryPolicy {
            attempts: 2,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(10),
            max_in_flight: 8,
        };
        let backend = RetryingBackend::new(faulty, policy, metrics.clone());
        let disk = ChunkDiskCache::open(&cache, 0, metrics.clone()).expect("disk cache");
        Arc::new(CachedChunkSource::new(
            backend,
            1 << 20,
            Some(disk),
            metrics,
        ))
    })
}

/// One request chain on queue `qi` in its own half of the queue, started without waiting.
fn start_one(
    guest: &mut Guest,
    half: u16,
    opcode: Opcode,
    nodeid: u64,
    body: &[u8],
    reply: u32,
) -> (Pending, u64) {
    let unique = guest.unique();
    let req = fuse_request(opcode as u32, nodeid, unique, body);
    (
        guest.start_in(REQUEST_QUEUE, &[Chain::request(req, reply)], half),
        unique,
    )
}

#[test]
fn a_stalled_read_holds_up_no_other_request_on_its_queue() {
    let daemon = Daemon::start_serving(
        1,
        |_| {},
        |root| stalling_filesystem(root, STALL, RafsFsOptions::default()),
    );
    let mut guest = daemon.connect(true);
    guest.init();
    let hello = guest.lookup(ROOT, "hello.txt").expect("lookup hello");
    let big = guest.lookup(ROOT, "big.bin").expect("lookup big");
    let hello_fh = guest.open(hello.nodeid, Opcode::Open).expect("open").fh;
    let big_fh = guest.open(big.nodeid, Opcode::Open).expect("open big").fh;
    // hello.txt is read once: from then on its chunk is in the cache.
    assert_eq!(
        guest.read(hello.nodeid, hello_fh, 0, 4096).expect("read"),
        HELLO
    );

    // The cold read of big.bin's first chunk waits on the stalled backend...
    let started = Instant::now();
    let (stalled, stalled_unique) = start_one(
        &mut guest,
        0,
        Opcode::Read,
        big.nodeid,
        Guest::read_in(big_fh, 0, 4096).as_slice(),
        16 + 4096,
    );
    // ...while other requests on the same queue, one after the other, finish at once.
    let mut others = Vec::new();
    for _ in 0..3 {
        let (p, unique) = start_one(
            &mut guest,
            1,
            Opcode::Read,
            hello.nodeid,
            Guest::read_in(hello_fh, 0, 4096).as_slice(),
            16 + 4096,
        );
        let (mut done, _) = guest.finish(REQUEST_QUEUE, p);
        let data = Reply::parse(done.pop().expect("one"), unique).bytes();
        assert_eq!(
            data.as_deref(),
            Ok(HELLO),
            "cached read beside the stalled one"
        );
        let (p, unique) = start_one(
            &mut guest,
            1,
            Opcode::Getattr,
            ROOT,
            GetattrIn::default().as_slice(),
            4096,
        );
        let (mut done, _) = guest.finish(REQUEST_QUEUE, p);
        let attr: AttrOut = Reply::parse(done.pop().expect("one"), unique).ok_obj();
        assert_eq!(attr.attr.mode & libc::S_IFMT, libc::S_IFDIR);
        let name = CString::new("subdir").expect("name");
        let (p, unique) = start_one(
            &mut guest,
            1,
            Opcode::Lookup,
            ROOT,
            name.as_bytes_with_nul(),
            4096,
        );
        let (mut done, _) = guest.finish(REQUEST_QUEUE, p);
        let entry: EntryOut = Reply::parse(done.pop().expect("one"), unique).ok_obj();
        assert_eq!(entry.attr.mode & libc::S_IFMT, libc::S_IFDIR);
        others.push(started.elapsed());
    }
    let others_done = started.elapsed();
    assert!(
        others_done < STALL / 2,
        "the other requests took {others_done:?} beside a read stalled for {STALL:?}"
    );
    // The stalled read itself completes, right, once the backend answers.
    let (mut done, _) = guest.finish_with(REQUEST_QUEUE, stalled, Duration::ZERO);
    let data = Reply::parse(done.pop().expect("one"), stalled_unique).bytes();
    let stalled_done = started.elapsed();
    assert_eq!(data.as_deref(), Ok(&big_content()[..4096]));
    assert!(
        stalled_done >= STALL,
        "the stall was real: {stalled_done:?}"
    );
    eprintln!("other requests done after {others:?}; the stalled read after {stalled_done:?}");
}

#[test]
fn a_read_past_its_deadline_gets_eio_and_the_daemon_serves_on() {
    let timeout = Duration::from_millis(800);
    let fs_opts = RafsFsOptions {
        request_timeout: timeout,
        // Only the guest's own reads: nothing fetches the stalled chunk ahead.
        readahead: false,
        ..RafsFsOptions::default()
    };
    let daemon = Daemon::start_serving(
        1,
        |_| {},
        |root| stalling_filesystem(root, Duration::from_secs(60), fs_opts),
    );
    let mut guest = daemon.connect(true);
    guest.init();
    let big = guest.lookup(ROOT, "big.bin").expect("lookup big");
    let fh = guest.open(big.nodeid, Opcode::Open).expect("open big").fh;
    let t = Instant::now();
    assert_eq!(guest.read(big.nodeid, fh, 0, 4096), Err(libc::EIO));
    let took = t.elapsed();
    assert!(
        took >= timeout && took < timeout * 4,
        "EIO after {took:?}, the deadline being {timeout:?}"
    );
    // The daemon serves on: other files, and other parts of the same one.
    let hello = guest.lookup(ROOT, "hello.txt").expect("lookup after EIO");
    let hfh = guest.open(hello.nodeid, Opcode::Open).expect("open").fh;
    assert_eq!(guest.read(hello.nodeid, hfh, 0, 4096).expect("read"), HELLO);
    let tail = guest
        .read(big.nodeid, fh, (BIG_LEN - 100) as u64, 100)
        .expect("tail of big.bin");
    assert_eq!(tail, &big_content()[BIG_LEN - 100..]);
    guest.assert_alive();
}

/// A filesystem whose GETATTR panics: a bug in a request handler.
struct PanickingFs;

impl fuse_backend_rs::api::filesystem::FileSystem for PanickingFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, _: FsOptions) -> std::io::Result<FsOptions> {
        Ok(FsOptions::empty())
    }

    fn getattr(
        &self,
        _: &fuse_backend_rs::api::filesystem::Context,
        _: u64,
        _: Option<u64>,
    ) -> std::io::Result<(libc::stat64, Duration)> {
        panic!("a bug in GETATTR");
    }
}

#[test]
fn a_panicking_request_stops_the_daemon_with_a_report() {
    init_logging();
    skiff::runtime::panic::install_hook();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("panic.sock");
    let mut opts = ServeOptions::new(&socket, TAG);
    opts.queue_size = QUEUE_SIZE;
    let exit = ExitEvent::new().expect("exit event");
    let exit2 = exit.clone();
    let daemon = thread::spawn(move || serve_until(Arc::new(PanickingFs), &opts, &exit2));
    let deadline = Instant::now() + TIMEOUT;
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "daemon did not start listening");
        thread::sleep(Duration::from_millis(5));
    }
    let mut guest = Guest::connect(&socket, 1, true);
    guest.init();
    let _pending = start_one(
        &mut guest,
        0,
        Opcode::Getattr,
        ROOT,
        GetattrIn::default().as_slice(),
        4096,
    );
    while !daemon.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the daemon went on after a worker panicked"
        );
        thread::sleep(Duration::from_millis(5));
    }
    match daemon
        .join()
        .expect("serve_until returns, it does not panic")
    {
        Err(VhostError::Fatal(report)) => {
            assert!(report.contains("skiff-worker"), "{report}");
            assert!(report.contains("a bug in GETATTR"), "{report}");
        }
        other => panic!("serve_until returned {other:?}"),
    }
    assert!(!socket.exists(), "the socket is removed on the way out");
    drop(guest);
}

#[test]
fn skiff_serve_exits_non_zero_with_a_report_when_a_worker_panics() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    fs::create_dir(&root).expect("mkdir root");
    make_tree(&root);
    // Builds the image next to the tree, as every test does.
    drop(filesystem_under_test(&root));
    let image = dir.path().join("image");
    let socket = dir.path().join("serve.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args(["serve", "--tag", TAG, "--bootstrap"])
        .arg(image.join("bootstrap"))
        .arg("--blob-dir")
        .arg(image.join("blobs"))
        .arg("--socket")
        .arg(&socket)
        .env("SKIFF_INJECT_PANIC", "worker")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start skiff serve");
    let deadline = Instant::now() + TIMEOUT;
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "skiff serve did not start listening"
        );
        assert!(
            matches!(child.try_wait(), Ok(None)),
            "skiff serve exited early"
        );
        thread::sleep(Duration::from_millis(5));
    }
    let mut guest = Guest::connect(&socket, 1, true);
    // FUSE_INIT is the first request a worker answers: it panics.
    let unique = guest.unique();
    let init = InitIn {
        major: 7,
        minor: 31,
        max_readahead: 128 * 1024,
        flags: 0,
    };
    let req = fuse_request(Opcode::Init as u32, 0, unique, init.as_slice());
    let _pending = guest.start(REQUEST_QUEUE, &[Chain::request(req, 4096)]);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("skiff serve went on serving after a worker panicked");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(!status.success(), "exit status {status}\n{stderr}");
    assert!(
        stderr.contains("skiff-worker") && stderr.contains("injected worker panic"),
        "no report of the panic:\n{stderr}"
    );
    assert!(stderr.contains("fatal error"), "{stderr}");
    assert!(!socket.exists(), "the socket is removed on the way out");
    drop(guest);
}

// ---------------------------------------------------------------------------------------------
// Malformed requests: each gets an error or is returned empty, and serving goes on.

#[test]
fn truncated_header_is_returned_empty() {
    let (_daemon, mut guest) = session(1);
    let unique = guest.unique();
    let req = fuse_request(Opcode::Getattr as u32, ROOT, unique, &[]);
    let done = guest.submit(REQUEST_QUEUE, Chain::request(req[..20].to_vec(), 4096));
    assert_eq!(done.used_len, 0);
    // No readable descriptor at all.
    let done = guest.submit(REQUEST_QUEUE, Chain::new(vec![Desc::Out(4096)]));
    assert_eq!(done.used_len, 0);
    guest.assert_alive();
}

#[test]
fn unknown_opcode_gets_enosys() {
    let (_daemon, mut guest) = session(1);
    let unique = guest.unique();
    let req = fuse_request(9999, ROOT, unique, &[0; 16]);
    let reply = Reply::parse(
        guest.submit(REQUEST_QUEUE, Chain::request(req, 4096)),
        unique,
    );
    assert_eq!(reply.bytes(), Err(libc::ENOSYS));
    guest.assert_alive();
}

#[test]
fn bad_length_fields_get_einval() {
    let (_daemon, mut guest) = session(1);

    // `len` claims more than the buffer holds.
    let unique = guest.unique();
    let mut req = fuse_request(Opcode::Lookup as u32, ROOT, unique, b"hello.txt\0");
    req[..4].copy_from_slice(&4000u32.to_le_bytes());
    let reply = Reply::parse(
        guest.submit(REQUEST_QUEUE, Chain::request(req, 4096)),
        unique,
    );
    assert_eq!(reply.bytes(), Err(libc::EINVAL));
    guest.assert_alive();

    // `len` smaller than the header itself.
    let unique = guest.unique();
    let mut req = fuse_request(Opcode::Lookup as u32, ROOT, unique, b"hello.txt\0");
    req[..4].copy_from_slice(&8u32.to_le_bytes());
    let reply = Reply::parse(
        guest.submit(REQUEST_QUEUE, Chain::request(req, 4096)),
        unique,
    );
    assert_eq!(reply.bytes(), Err(libc::EINVAL));
    guest.assert_alive();

    // A body shorter than the request's fixed part (READ without its ReadIn).
    let unique = guest.unique();
    let req = fuse_request(Opcode::Read as u32, ROOT, unique, &[1, 2, 3]);
    let reply = Reply::parse(
        guest.submit(REQUEST_QUEUE, Chain::request(req, 4096)),
        unique,
    );
    assert_eq!(reply.bytes(), Err(libc::EINVAL));

    // A name without its NUL terminator.
    let unique = guest.unique();
    let req = fuse_request(Opcode::Lookup as u32, ROOT, unique, b"hello.txt");
    let reply = Reply::parse(
        guest.submit(REQUEST_QUEUE, Chain::request(req, 4096)),
        unique,
    );
    assert_eq!(reply.bytes(), Err(libc::EINVAL));
    guest.assert_alive();
}

#[test]
fn descriptors_outside_guest_memory_are_returned_empty() {
    let (_daemon, mut guest) = session(1);
    let unique = guest.unique();
    let req = fuse_request(Opcode::Getattr as u32, ROOT, unique, &[0; 16]);

    // Readable descriptor far outside guest memory.
    let chain = Chain::new(vec![Desc::RawIn(0xdead_0000_0000, 56), Desc::Out(4096)]);
    assert_eq!(guest.submit(REQUEST_QUEUE, chain).used_len, 0);
    // Readable descriptor below the start of guest memory.
    let chain = Chain::new(vec![Desc::RawIn(0x1000, 56), Desc::Out(4096)]);
    assert_eq!(guest.submit(REQUEST_QUEUE, chain).used_len, 0);
    // Readable descriptor running past the end of guest memory.
    let chain = Chain::new(vec![Desc::RawIn(DATA_END - 16, 4096), Desc::Out(4096)]);
    assert_eq!(guest.submit(REQUEST_QUEUE, chain).used_len, 0);
    // Writable descriptor outside guest memory.
    let chain = Chain::new(vec![Desc::In(req), Desc::RawOut(u64::MAX - 4095, 4096)]);
    assert_eq!(guest.submit(REQUEST_QUEUE, chain).used_len, 0);
    guest.assert_alive();
}

#[test]
fn reply_buffer_too_small() {
    let (_daemon, mut guest) = session(1);
    // Room for the reply header but not the attributes: the guest gets an error.
    let unique = guest.unique();
    let req = fuse_request(Opcode::Getattr as u32, ROOT, unique, &[0; 16]);
    let reply = Reply::parse(guest.submit(REQUEST_QUEUE, Chain::request(req, 24)), unique);
    assert!(reply.bytes().is_err());
    // No room even for a header: returned empty.
    let unique = guest.unique();
    let req = fuse_request(Opcode::Getattr as u32, ROOT, unique, &[0; 16]);
    let done = guest.submit(REQUEST_QUEUE, Chain::request(req, 8));
    assert_eq!(done.used_len, 0);
    // No writable descriptor at all.
    let unique = guest.unique();
    let req = fuse_request(Opcode::Getattr as u32, ROOT, unique, &[0; 16]);
    let done = guest.submit(REQUEST_QUEUE, Chain::new(vec![Desc::In(req)]));
    assert_eq!(done.used_len, 0);
    guest.assert_alive();
}

#[test]
fn bad_ring_entries_do_not_stop_the_queue() {
    let (_daemon, mut guest) = session(1);
    // An available-ring entry naming a descriptor outside the queue: it cannot be returned,
    // and the request made available after it is still answered.
    guest.publish(REQUEST_QUEUE, &[QUEUE_SIZE + 7]);
    guest.assert_alive();
    // A descriptor loop (a chain whose `next` points back at itself).
    let q = &guest.queues[REQUEST_QUEUE];
    let buf = DATA_BASE;
    write_desc(&guest.mem, q.desc, buf, 64, VIRTQ_DESC_F_NEXT, 0);
    guest.publish(REQUEST_QUEUE, &[0]);
    let q = &mut guest.queues[REQUEST_QUEUE];
    // The looped chain is used (empty); account for it before the next request.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let used: u16 = guest
            .mem
            .load(GuestAddress(q.used + 2), Ordering::Acquire)
            .expect("used idx");
        if used == q.last_used.wrapping_add(1) {
            q.last_used = used;
            break;
        }
        assert!(Instant::now() < deadline, "looped chain not returned");
        thread::sleep(Duration::from_millis(1));
    }
    guest.assert_alive();
}
