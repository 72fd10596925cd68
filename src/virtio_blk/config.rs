//! Device identity: virtio feature bits and the virtio-blk configuration
//! space (virtio 1.2 §5.2.3, §5.2.4), and the vhost-user protocol features.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Largest DISCARD / WRITE_ZEROES request, in 512-byte sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Largest number of segments in one DISCARD / WRITE_ZEROES request.
pub const MAX_DISCARD_SEG: u32 = 32;

/// Limits of DISCARD or WRITE_ZEROES as offered in the config space
/// (virtio 1.2 §5.2.4: `max_discard_sectors`, `max_discard_seg`,
/// `discard_sector_alignment`; `max_write_zeroes_sectors`,
/// `max_write_zeroes_seg`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentLimits {
    /// Largest segment, in 512-byte sectors (at most [`MAX_DISCARD_SECTORS`]).
    pub max_sectors: u32,
    /// Most segments in one request (at most [`MAX_DISCARD_SEG`]).
    pub max_seg: u32,
    /// DISCARD alignment, in 512-byte sectors (the guest's
    /// `discard_granularity`); raised to the logical block. Unused for
    /// WRITE_ZEROES.
    pub sector_alignment: u32,
}

impl Default for SegmentLimits {
    /// What a file image offers: 1 GiB segments, 32 of them, aligned to the logical block.
    fn default() -> Self {
        SegmentLimits {
            max_sectors: MAX_DISCARD_SECTORS,
            max_seg: MAX_DISCARD_SEG,
            sector_alignment: 1,
        }
    }
}

/// The geometry and optional commands the driver is told about beyond
/// capacity and block size (virtio 1.2 §5.2.4, VIRTIO_BLK_F_TOPOLOGY,
/// VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES). [`Topology::default`]
/// is what a file image offers: no physical block or I/O size hints,
/// DISCARD and WRITE_ZEROES with the default limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    /// `physical_block_exp`: log2 of physical blocks per logical block.
    pub physical_block_exp: u8,
    /// `alignment_offset`: offset of the first aligned logical block, in logical blocks.
    pub alignment_offset: u8,
    /// `min_io_size`: suggested minimum I/O size, in logical blocks.
    pub min_io_size: u16,
    /// `opt_io_size`: optimal sustained I/O size, in logical blocks (0: none).
    pub opt_io_size: u32,
    /// DISCARD limits; `None`: VIRTIO_BLK_F_DISCARD not offered.
    pub discard: Option<SegmentLimits>,
    /// WRITE_ZEROES limits; `None`: VIRTIO_BLK_F_WRITE_ZEROES not offered.
    pub write_zeroes: Option<SegmentLimits>,
    /// `write_zeroes_may_unmap`: a WRITE_ZEROES with the UNMAP flag may deallocate.
    pub write_zeroes_may_unmap: bool,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            physical_block_exp: 0,
            alignment_offset: 0,
            min_io_size: 1,
            opt_io_size: 0,
            discard: Some(SegmentLimits::default()),
            write_zeroes: Some(SegmentLimits::default()),
            write_zeroes_may_unmap: true,
        }
    }
}

/// What the device looks like to the driver.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Logical block size in bytes (512 or 4096), offered with VIRTIO_BLK_F_BLK_SIZE.
    pub logical_block_size: u32,
    /// Number of request virtqueues (VIRTIO_BLK_F_MQ).
    pub num_queues: u16,
    /// Largest virtqueue size accepted.
    pub queue_size: u16,
    /// Offer VIRTIO_BLK_F_RO and refuse writes.
    pub read_only: bool,
    /// Serial returned by GET_ID (at most 20 bytes are used).
    pub serial: String,
    /// Largest READ or WRITE data buffer in bytes (`--max-transfer`): the
    /// config space offers `size_max` so that `seg_max` × `size_max` does
    /// not exceed it, and larger requests are refused with IOERR.
    pub max_transfer: u32,
    /// Topology, DISCARD and WRITE_ZEROES: a block device's queue limits,
    /// or [`Topology::default`] for a file.
    pub topology: Topology,
}

impl DeviceConfig {
    /// Virtio feature bits offered (virtio 1.2 §5.2.3), plus
    /// VHOST_USER_F_PROTOCOL_FEATURES and VHOST_F_LOG_ALL (vhost-user spec,
    /// "Migration": the backend logs its writes to guest memory while the
    /// frontend has it acked).
    pub fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits();
        if self.topology.discard.is_some() {
            f |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        if self.topology.write_zeroes.is_some() {
            f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    /// vhost-user protocol features: CONFIG (QEMU and libblkio read the
    /// config space), MQ, REPLY_ACK and CONFIGURE_MEM_SLOTS (libblkio),
    /// INFLIGHT_SHMFD (restart, docs/DESIGN.md §12) and LOG_SHMFD (the
    /// dirty-page log arrives as a shared-memory fd in SET_LOG_BASE; live
    /// migration, §13).
    pub fn protocol_features() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    /// Most data descriptors in one request (`seg_max`): QEMU's choice, queue size - 2.
    pub fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }

    /// Largest data segment in bytes (`size_max`, VIRTIO_BLK_F_SIZE_MAX,
    /// virtio 1.2 §5.2.4): [`DeviceConfig::max_transfer`] / `seg_max`,
    /// rounded down to 4 KiB, at least 4 KiB. A driver's largest request is
    /// then `seg_max` × `size_max` bytes (Linux: `max_segments` ×
    /// `max_segment_size`), at most `max_transfer`.
    pub fn size_max(&self) -> u32 {
        (self.max_transfer / self.seg_max() / 4096 * 4096).max(4096)
    }

    /// The `struct virtio_blk_config` bytes (little-endian, 60 bytes, up to
    /// `write_zeroes_may_unmap` and its padding; virtio 1.2 §5.2.4).
    pub fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; 60];
        let put32 =
            |c: &mut Vec<u8>, off: usize, v: u32| c[off..off + 4].copy_from_slice(&v.to_le_bytes());
        c[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        put32(&mut c, 8, self.size_max());
        put32(&mut c, 12, self.seg_max());
        // geometry (16..20) not offered.
        put32(&mut c, 20, self.logical_block_size);
        // topology: physical_block_exp, alignment_offset, min_io_size and
        // opt_io_size (both in logical blocks).
        let t = &self.topology;
        c[24] = t.physical_block_exp;
        c[25] = t.alignment_offset;
        c[26..28].copy_from_slice(&t.min_io_size.max(1).to_le_bytes());
        put32(&mut c, 28, t.opt_io_size);
        // writeback (32): 0, no CONFIG_WCE.
        c[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        let lbs_sectors = (self.logical_block_size / 512).max(1);
        if let Some(d) = t.discard {
            put32(&mut c, 36, d.max_sectors.min(MAX_DISCARD_SECTORS));
            put32(&mut c, 40, d.max_seg.min(MAX_DISCARD_SEG));
            put32(&mut c, 44, d.sector_alignment.max(lbs_sectors));
        }
        if let Some(z) = t.write_zeroes {
            put32(&mut c, 48, z.max_sectors.min(MAX_DISCARD_SECTORS));
            put32(&mut c, 52, z.max_seg.min(MAX_DISCARD_SEG));
            c[56] = u8::from(t.write_zeroes_may_unmap);
        }
        c
    }

    /// `size` bytes of the config space from `offset`, zero-filled past its end
    /// (vhost-user GET_CONFIG must answer exactly the size asked).
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(space.len());
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(space.len());
        out[..end - start].copy_from_slice(&space[start..end]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DeviceConfig {
        DeviceConfig {
            capacity_sectors: 2048,
            logical_block_size: 4096,
            num_queues: 2,
            queue_size: 256,
            read_only: true,
            serial: "x".into(),
            max_transfer: 32 << 20,
            topology: Topology::default(),
        }
    }

    #[test]
    fn config_space_layout() {
        let c = cfg().config_space();
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        // size_max: 32 MiB / 254 segments, rounded down to 4 KiB.
        assert_eq!(u32::from_le_bytes(c[8..12].try_into().unwrap()), 128 << 10);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 254);
        assert!(cfg().features() & (1 << VIRTIO_BLK_F_SIZE_MAX) != 0);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        assert!(cfg().features() & (1 << VIRTIO_BLK_F_RO) != 0);
    }

    #[test]
    fn topology_and_optional_commands_follow_the_device() {
        let file = cfg();
        assert!(file.features() & (1 << VIRTIO_BLK_F_DISCARD) != 0);
        assert!(file.features() & (1 << VIRTIO_BLK_F_WRITE_ZEROES) != 0);
        let c = file.config_space();
        assert_eq!(
            u32::from_le_bytes(c[36..40].try_into().unwrap()),
            MAX_DISCARD_SECTORS
        );
        assert_eq!(c[56], 1);

        let mut dev = cfg();
        dev.logical_block_size = 512;
        dev.topology = Topology {
            physical_block_exp: 3,
            alignment_offset: 0,
            min_io_size: 8,
            opt_io_size: 256,
            discard: Some(SegmentLimits {
                max_sectors: 8192,
                max_seg: 1,
                sector_alignment: 8,
            }),
            write_zeroes: None,
            write_zeroes_may_unmap: false,
        };
        assert!(dev.features() & (1 << VIRTIO_BLK_F_DISCARD) != 0);
        assert!(dev.features() & (1 << VIRTIO_BLK_F_WRITE_ZEROES) == 0);
        let c = dev.config_space();
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(c[24], 3);
        assert_eq!(u16::from_le_bytes(c[26..28].try_into().unwrap()), 8);
        assert_eq!(u32::from_le_bytes(c[28..32].try_into().unwrap()), 256);
        assert_eq!(u32::from_le_bytes(c[36..40].try_into().unwrap()), 8192);
        assert_eq!(u32::from_le_bytes(c[40..44].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        assert_eq!(&c[48..57], &[0; 9]);
    }

    #[test]
    fn read_config_returns_exactly_the_size_asked() {
        let c = cfg();
        assert_eq!(c.read_config(0, 96).len(), 96);
        assert_eq!(c.read_config(200, 8), vec![0; 8]);
        assert_eq!(c.read_config(34, 2), vec![2, 0]);
    }
}
