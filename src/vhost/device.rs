//! The virtio-fs device model as a vhost-user backend.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::queue::{answer, process_queue};
use super::VhostError;
use crate::runtime::pool::{WorkerPool, DEFAULT_WORKERS};
use crate::runtime::threads::{self, ThreadKind};
use crate::runtime::ExitEvent;
use crate::util::sync::{read, write};

/// Length of the `tag` field of the virtio-fs config space (not NUL-terminated when full).
pub const VIRTIO_FS_TAG_LEN: usize = 36;
/// Size of the virtio-fs config space: `tag[36]` followed by `le32 num_request_queues`.
pub const VIRTIO_FS_CONFIG_SIZE: usize = VIRTIO_FS_TAG_LEN + 4;
/// Number of high-priority queues (queue 0, used by the guest for FORGET and INTERRUPT).
pub const NUM_HIPRIO_QUEUES: usize = 1;
/// Largest queue size offered to the VMM.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Queue size offered to the VMM unless told otherwise.
pub const DEFAULT_QUEUE_SIZE: u16 = MAX_QUEUE_SIZE;
/// Largest number of request queues: the vhost-user-backend maps queues to worker threads
/// with a 64-bit mask, and the high-priority queue takes one bit.
pub const MAX_REQUEST_QUEUES: usize = 64 - NUM_HIPRIO_QUEUES;

/// A virtio-fs device serving the FUSE filesystem `F` over vhost-user.
///
/// Queue 0 is the high-priority queue; queues `1..=num_request_queues` are request queues.
/// Each request queue has its own queue thread, the high-priority queue shares the first
/// one's. A queue thread only pops chains: requests run on the device's worker pool and
/// complete in any order, so that one waiting on the network holds up no other. The
/// high-priority queue's requests (FORGET, INTERRUPT) never wait, and are answered on its
/// queue thread.
pub struct VirtioFsDevice<F: FileSystem + Send + Sync + 'static> {
    server: Arc<Server<Arc<F>>>,
    pool: Arc<WorkerPool>,
    /// The exit event of the daemon serving the device, for the queue threads' panic reports.
    exit: Option<ExitEvent>,
    config: [u8; VIRTIO_FS_CONFIG_SIZE],
    num_request_queues: usize,
    queue_size: u16,
    event_idx: AtomicBool,
    mem: RwLock<GuestMemoryAtomic<GuestMemoryMmap>>,
    advertise_config: bool,
}

impl<F> VirtioFsDevice<F>
where
    F: FileSystem + Send + Sync + 'static,
{
    /// Creates a device serving `fs` under `tag` with `num_request_queues` request queues of
    /// at most `queue_size` descriptors each.
    pub fn new(
        fs: Arc<F>,
        tag: &str,
        num_request_queues: usize,
        queue_size: u16,
    ) -> Result<Self, VhostError> {
        if tag.is_empty() || tag.len() > VIRTIO_FS_TAG_LEN {
            return Err(VhostError::InvalidTag {
                tag: tag.to_owned(),
            });
        }
        if num_request_queues == 0 || num_request_queues > MAX_REQUEST_QUEUES {
            return Err(VhostError::InvalidThreads(num_request_queues));
        }
        if !queue_size.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&queue_size) {
            return Err(VhostError::InvalidQueueSize(queue_size));
        }

        let mut config = [0u8; VIRTIO_FS_CONFIG_SIZE];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        // The bound above keeps this far below u32::MAX.
        let nrq = num_request_queues as u32;
        config[VIRTIO_FS_TAG_LEN..].copy_from_slice(&nrq.to_le_bytes());

        Ok(VirtioFsDevice {
            server: Arc::new(Server::new(fs)),
            pool: Arc::new(WorkerPool::new(DEFAULT_WORKERS)),
            exit: None,
            config,
            num_request_queues,
            queue_size,
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(GuestMemoryAtomic::new(GuestMemoryMmap::new())),
            advertise_config: false,
        })
    }

    /// Runs requests on `pool` (shared by the devices of successive connections), in a daemon
    /// whose exit event is `exit`.
    pub(crate) fn with_runtime(mut self, pool: Arc<WorkerPool>, exit: ExitEvent) -> Self {
        self.pool = pool;
        self.exit = Some(exit);
        self
    }

    /// Offers `VHOST_USER_PROTOCOL_F_CONFIG`, so that the VMM can read the tag from the device.
    ///
    /// Off by default: QEMU 7.1 to 8.0 (Debian 12 ships 7.2) abort when a vhost-user-fs backend
    /// offers it, and every VMM takes the tag from its own command line anyway.
    pub fn with_config_space(mut self, advertise: bool) -> Self {
        self.advertise_config = advertise;
        self
    }

    /// The virtio-fs config space: the tag, then the number of request queues (le32).
    pub fn config_space(&self) -> &[u8; VIRTIO_FS_CONFIG_SIZE] {
        &self.config
    }

    /// Number of request queues (not counting the high-priority queue).
    pub fn num_request_queues(&self) -> usize {
        self.num_request_queues
    }

    /// Global queue index of the `event`-th queue handled by worker `thread_id`, following
    /// the layout of [`VhostUserBackend::queues_per_thread`].
    fn queue_index(thread_id: usize, event: u16) -> usize {
        if thread_id == 0 {
            usize::from(event)
        } else {
            thread_id + NUM_HIPRIO_QUEUES + usize::from(event)
        }
    }
}

impl<F> VhostUserBackend for VirtioFsDevice<F>
where
    F: FileSystem + Send + Sync + 'static,
{
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_HIPRIO_QUEUES + self.num_request_queues
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        tracing::debug!(
            features = format_args!("{features:#x}"),
            "VMM acked features"
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        if self.advertise_config {
            VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG
        } else {
            VhostUserProtocolFeatures::MQ
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // An empty reply tells the VMM the request was invalid.
        let Ok(start) = usize::try_from(offset) else {
            return Vec::new();
        };
        let Some(end) = usize::try_from(size)
            .ok()
            .and_then(|size| start.checked_add(size))
        else {
            return Vec::new();
        };
        match self.config.get(start..end) {
            Some(bytes) => bytes.to_vec(),
            None => {
                tracing::debug!(offset, size, "config space read out of range");
                Vec::new()
            }
        }
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        tracing::debug!(
            offset,
            len = buf.len(),
            "ignoring write to read-only config space"
        );
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *write(&self.mem) = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // Worker 0: the high-priority queue and the first request queue; worker i: request
        // queue i (global queue index i + 1).
        let mut masks = vec![0b11u64];
        masks.extend((1..self.num_request_queues).map(|i| 1u64 << (i + NUM_HIPRIO_QUEUES)));
        masks
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::warn!(thread_index, error = %e, "cannot create worker exit event");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        // This runs on a queue thread, which the vhost-user library starts.
        threads::enter(ThreadKind::Queue, self.exit.as_ref());
        // Returning an error here would kill the queue thread: everything the guest can
        // cause is logged and swallowed instead.
        let queue = Self::queue_index(thread_id, device_event);
        if evset != EventSet::IN {
            tracing::warn!(queue, ?evset, "unexpected event set on queue kick");
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            tracing::warn!(
                queue,
                thread_id,
                "event for a queue this worker does not own"
            );
            return Ok(());
        };
        let mem = read(&self.mem).memory();
        let event_idx = self.event_idx.load(Ordering::Acquire);
        // Every chain goes to a worker, the hiprio queue's too: the guest puts what it likes
        // there (not only FORGET and INTERRUPT), and only a worker may do the filesystem's
        // work (in a sandbox, the queue thread's seccomp list has no file calls at all).
        let dispatched = process_queue(&mem, vring, event_idx, |chain, ring| {
            let (server, vring) = (self.server.clone(), vring.clone());
            self.pool
                .submit(move || answer(&server, chain, &vring, ring));
        });
        if let Err(e) = dispatched {
            tracing::warn!(queue, error = %e, "processing virtqueue failed");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuse_backend_rs::api::filesystem::FileSystem;

    /// A filesystem that implements nothing: every request gets ENOSYS.
    struct NullFs;
    impl FileSystem for NullFs {
        type Inode = u64;
        type Handle = u64;
    }

    fn device(queues: usize) -> VirtioFsDevice<NullFs> {
        match VirtioFsDevice::new(Arc::new(NullFs), "myfs", queues, 256) {
            Ok(d) => d,
            Err(e) => panic!("device: {e}"),
        }
    }

    #[test]
    fn config_space_holds_tag_and_queue_count() {
        let d = device(3);
        let cfg = d.get_config(0, VIRTIO_FS_CONFIG_SIZE as u32);
        assert_eq!(&cfg[..4], b"myfs");
        assert!(cfg[4..VIRTIO_FS_TAG_LEN].iter().all(|&b| b == 0));
        assert_eq!(&cfg[VIRTIO_FS_TAG_LEN..], &3u32.to_le_bytes());
        assert_eq!(
            d.get_config(VIRTIO_FS_TAG_LEN as u32, 4),
            3u32.to_le_bytes()
        );
        assert!(d.get_config(38, 4).is_empty());
        assert!(d.get_config(u32::MAX, 4).is_empty());
        assert!(d.set_config(0, b"x").is_err());
    }

    #[test]
    fn rejects_bad_options() {
        let fs = Arc::new(NullFs);
        let long = "x".repeat(VIRTIO_FS_TAG_LEN + 1);
        assert!(VirtioFsDevice::new(fs.clone(), "", 1, 256).is_err());
        assert!(VirtioFsDevice::new(fs.clone(), &long, 1, 256).is_err());
        assert!(VirtioFsDevice::new(fs.clone(), &long[1..], 1, 256).is_ok());
        assert!(VirtioFsDevice::new(fs.clone(), "t", 0, 256).is_err());
        assert!(VirtioFsDevice::new(fs.clone(), "t", MAX_REQUEST_QUEUES + 1, 256).is_err());
        assert!(VirtioFsDevice::new(fs.clone(), "t", 1, 100).is_err());
        assert!(VirtioFsDevice::new(fs.clone(), "t", 1, 2048).is_err());
        assert!(VirtioFsDevice::new(fs, "t", MAX_REQUEST_QUEUES, 1024).is_ok());
    }

    #[test]
    fn features_and_queue_layout() {
        let d = device(3);
        assert!(!d
            .protocol_features()
            .contains(VhostUserProtocolFeatures::CONFIG));
        let d = d.with_config_space(true);
        let f = d.features();
        assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
        assert_ne!(f & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
        assert_ne!(f & (1 << VIRTIO_RING_F_INDIRECT_DESC), 0);
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        let p = d.protocol_features();
        assert!(p.contains(VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG));
        assert_eq!(d.num_queues(), 4);
        assert_eq!(d.queues_per_thread(), vec![0b11, 0b100, 0b1000]);
        // Every queue is owned by exactly one worker.
        let all = d.queues_per_thread().iter().fold(0u64, |acc, m| {
            assert_eq!(acc & m, 0);
            acc | m
        });
        assert_eq!(all, 0b1111);
        assert_eq!(VirtioFsDevice::<NullFs>::queue_index(0, 0), 0);
        assert_eq!(VirtioFsDevice::<NullFs>::queue_index(0, 1), 1);
        assert_eq!(VirtioFsDevice::<NullFs>::queue_index(2, 0), 3);
        let max = device(MAX_REQUEST_QUEUES);
        assert_eq!(max.queues_per_thread().last(), Some(&(1u64 << 63)));
    }
}
