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
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, EntryOut, FsOptions, GetattrIn, GetxattrOut, InitIn, Opcode,
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
use vhost::VhostBackend;
use vm_memory::{ByteValued, Bytes, GuestAddress};

mod vhost_guest;
use vhost_guest::*;

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
        blob_id_sha256: false,
        node_compat: false,
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
// The guest (tests/vhost_guest): shared memory, split virtqueues, and a vhost-user frontend.

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

/// Every request the guest puts on the hiprio queue, not only FORGET and INTERRUPT, is
/// answered under the worker's seccomp list: in a confined `skiff serve`, a READ there reads
/// the blob (pread) and must neither be refused by the queue thread's list (SIGSYS ends the
/// daemon) nor go unanswered.
#[test]
fn confined_serve_answers_any_request_on_the_hiprio_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, socket) = spawn_serve(dir.path(), &[]);
    let mut guest = Guest::connect(&socket, 1, true);
    let q = HIPRIO_QUEUE;
    let init = InitIn {
        major: 7,
        minor: 31,
        max_readahead: 128 * 1024,
        flags: 0,
    };
    guest
        .fuse_on(q, Opcode::Init, 0, init.as_slice(), 4096)
        .ok_obj::<fuse_backend_rs::abi::fuse_abi::InitOut>();
    let name = CString::new("hello.txt").expect("name");
    let hello: EntryOut = guest
        .fuse_on(q, Opcode::Lookup, ROOT, name.as_bytes_with_nul(), 4096)
        .obj()
        .expect("lookup on hiprio");
    let open = fuse_backend_rs::abi::fuse_abi::OpenIn {
        flags: libc::O_RDONLY as u32,
        fuse_flags: 0,
    };
    let fh = guest
        .fuse_on(q, Opcode::Open, hello.nodeid, open.as_slice(), 4096)
        .obj::<fuse_backend_rs::abi::fuse_abi::OpenOut>()
        .expect("open on hiprio")
        .fh;
    let read = Guest::read_in(fh, 0, 4096);
    let data = guest
        .fuse_on(q, Opcode::Read, hello.nodeid, read.as_slice(), 16 + 4096)
        .bytes()
        .expect("read on hiprio");
    assert_eq!(data, HELLO);
    // And the request queue still works.
    assert_eq!(guest.read(hello.nodeid, fh, 0, 4096).expect("read"), HELLO);
    assert!(
        matches!(child.try_wait(), Ok(None)),
        "skiff serve ended: {:?}",
        child.try_wait()
    );
    // SAFETY: kill(2) on the child this test started, by its PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(status.success(), "exit status {status}\n{stderr}");
    assert!(stderr.contains("sandbox:"), "not confined:\n{stderr}");
    drop(guest);
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

/// `skiff serve` (confined, as by default) of an image of [`make_tree`] in `dir`, listening;
/// its socket.
fn spawn_serve(dir: &Path, env: &[(&str, &str)]) -> (std::process::Child, PathBuf) {
    init_logging();
    let root = dir.join("root");
    fs::create_dir(&root).expect("mkdir root");
    make_tree(&root);
    // Builds the image next to the tree, as every test does.
    drop(filesystem_under_test(&root));
    start_serve(dir, env)
}

/// `skiff serve` of the image [`spawn_serve`] built in `dir`, listening; its socket.
fn start_serve(dir: &Path, env: &[(&str, &str)]) -> (std::process::Child, PathBuf) {
    let image = dir.join("image");
    let socket = dir.join("serve.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args(["serve", "--tag", TAG, "--bootstrap"])
        .arg(image.join("bootstrap"))
        .arg("--blob-dir")
        .arg(image.join("blobs"))
        .arg("--socket")
        .arg(&socket)
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start skiff serve");
    let deadline = Instant::now() + TIMEOUT;
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "skiff serve did not start listening"
        );
        if !matches!(child.try_wait(), Ok(None)) {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
            }
            panic!("skiff serve exited early:\n{stderr}");
        }
        thread::sleep(Duration::from_millis(5));
    }
    (child, socket)
}

/// What a VMM that reconnects to a restarted daemon needs of Skiff (Cloud Hypervisor does so;
/// QEMU's vhost-user-fs does not, docs/serve.md "A daemon restart"): `skiff serve` killed
/// with SIGKILL mid-session leaves its socket behind; started again on the same path it
/// replaces it, and answers the guest's FUSE session where it was, with no new FUSE_INIT
/// (the guest's kernel sends none) and the node ids and handle the dead daemon gave out.
#[test]
fn a_restarted_serve_carries_on_the_session_of_the_one_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut first, socket) = spawn_serve(dir.path(), &[]);
    let mut guest = Guest::connect(&socket, 1, true);
    guest.init();
    let hello = guest.lookup(ROOT, "hello.txt").expect("lookup");
    let subdir = guest.lookup(ROOT, "subdir").expect("lookup subdir");
    // `skiff serve` answers the first OPEN with ENOSYS (no opens needed): handle 0 then.
    let fh = guest.open(hello.nodeid, Opcode::Open).map_or(0, |o| o.fh);
    assert_eq!(guest.read(hello.nodeid, fh, 0, 4096).expect("read"), HELLO);

    first.kill().expect("SIGKILL skiff serve");
    first.wait().expect("wait");
    assert!(socket.exists(), "a killed daemon cannot remove its socket");
    drop(guest);

    let (mut second, socket) = start_serve(dir.path(), &[]);
    // A new vhost-user session (features, memory table, rings), as a reconnecting VMM sends.
    let mut guest = Guest::connect(&socket, 1, true);
    assert_eq!(
        guest
            .read(hello.nodeid, fh, 0, 4096)
            .expect("read after restart"),
        HELLO
    );
    let attr = guest.getattr(hello.nodeid).expect("getattr after restart");
    assert_eq!(attr.attr.size, HELLO.len() as u64);
    let nested = guest
        .lookup(subdir.nodeid, "nested.txt")
        .expect("lookup under a directory looked up before the restart");
    assert_eq!(
        guest.read(nested.nodeid, 0, 0, 4096).expect("read nested"),
        b"nested\n"
    );
    assert!(
        matches!(second.try_wait(), Ok(None)),
        "the restarted skiff serve ended"
    );
    // SAFETY: kill(2) on the child this test started, by its PID.
    unsafe { libc::kill(second.id() as i32, libc::SIGTERM) };
    let status = second.wait().expect("wait");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(status.success(), "exit status {status}\n{stderr}");
    assert!(stderr.contains("replacing a stale socket"), "{stderr}");
    drop(guest);
}

#[test]
fn skiff_serve_exits_non_zero_with_a_report_when_a_worker_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, socket) = spawn_serve(dir.path(), &[("SKIFF_INJECT_PANIC", "worker")]);
    let deadline = Instant::now() + TIMEOUT;
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
