//! What the driver is told about the image's geometry: a file gets
//! [`Topology::default`]; a block device its queue limits, converted to the
//! units of virtio 1.2 §5.2.4 (docs/DESIGN.md §6 "Block devices").

use crate::storage::blockdev::BlockDeviceInfo;
use crate::storage::Image;
use crate::virtio_blk::config::{SegmentLimits, Topology, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG};

/// The topology to offer for `image`.
pub(super) fn of(image: &Image) -> Topology {
    match image.block_device() {
        None => Topology::default(),
        Some(info) => of_device(info, image.logical_block_size()),
    }
}

/// The topology of block device `info` served with logical blocks of `lbs`
/// bytes. DISCARD is offered when `queue/discard_max_bytes` > 0,
/// WRITE_ZEROES when `queue/write_zeroes_max_bytes` > 0; neither when `lbs`
/// is below the device's own logical block (the kernel refuses a discard or
/// zeroing range not aligned to it).
pub(super) fn of_device(info: &BlockDeviceInfo, lbs: u32) -> Topology {
    let l = &info.limits;
    let lbs64 = u64::from(lbs.max(512));
    let physical = u64::from(info.physical_block_size).max(lbs64);
    let physical_block_exp = (physical / lbs64).max(1).ilog2() as u8;
    let min_io_size = (l.min_io_size / lbs64).clamp(1, u64::from(u16::MAX)) as u16;
    let opt_io_size = (l.opt_io_size / lbs64).min(u64::from(u32::MAX)) as u32;
    let alignment_offset = (l.alignment_offset / lbs64).min(u64::from(u8::MAX)) as u8;
    let aligned = lbs >= info.logical_block_size;
    let lbs_sectors = lbs64 / 512;
    // Largest segment in 512-byte sectors, a whole number of logical blocks.
    let max_sectors = |bytes: u64| {
        let s = (bytes / 512).min(u64::from(MAX_DISCARD_SECTORS));
        (s / lbs_sectors * lbs_sectors) as u32
    };
    let discard = (aligned && max_sectors(l.discard_max_bytes) > 0).then(|| SegmentLimits {
        max_sectors: max_sectors(l.discard_max_bytes),
        max_seg: MAX_DISCARD_SEG,
        sector_alignment: (l.discard_granularity.max(lbs64) / 512).min(u64::from(u32::MAX)) as u32,
    });
    let write_zeroes =
        (aligned && max_sectors(l.write_zeroes_max_bytes) > 0).then(|| SegmentLimits {
            max_sectors: max_sectors(l.write_zeroes_max_bytes),
            max_seg: MAX_DISCARD_SEG,
            sector_alignment: lbs_sectors as u32,
        });
    if !aligned {
        log::warn!(
            "logical block size {lbs} is below the {}-byte block of {}: DISCARD and WRITE_ZEROES not offered",
            info.logical_block_size,
            info.name
        );
    }
    Topology {
        physical_block_exp,
        alignment_offset,
        min_io_size,
        opt_io_size,
        write_zeroes_may_unmap: discard.is_some() && write_zeroes.is_some(),
        discard,
        write_zeroes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::blockdev::QueueLimits;

    fn info(logical: u32, physical: u32, limits: QueueLimits) -> BlockDeviceInfo {
        BlockDeviceInfo {
            name: "sdz".into(),
            size: 1 << 30,
            logical_block_size: logical,
            physical_block_size: physical,
            read_only: false,
            limits,
            identity: "wwid:x".into(),
        }
    }

    #[test]
    fn a_4k_physical_disk_with_discard_and_no_write_zeroes() {
        let limits = QueueLimits {
            min_io_size: 4096,
            opt_io_size: 1 << 20,
            alignment_offset: 0,
            discard_max_bytes: 2 << 30,
            discard_granularity: 4096,
            write_zeroes_max_bytes: 0,
        };
        let t = of_device(&info(512, 4096, limits), 512);
        assert_eq!(t.physical_block_exp, 3);
        assert_eq!(t.min_io_size, 8);
        assert_eq!(t.opt_io_size, 2048);
        let d = t.discard.unwrap();
        assert_eq!(d.max_sectors, MAX_DISCARD_SECTORS);
        assert_eq!(d.sector_alignment, 8);
        assert_eq!(t.write_zeroes, None);
        assert!(!t.write_zeroes_may_unmap);
    }

    #[test]
    fn a_4k_logical_device_served_at_4k_and_below() {
        let limits = QueueLimits {
            min_io_size: 4096,
            discard_max_bytes: 1 << 20,
            discard_granularity: 4096,
            write_zeroes_max_bytes: 1 << 20,
            ..Default::default()
        };
        let t = of_device(&info(4096, 4096, limits), 4096);
        assert_eq!((t.physical_block_exp, t.min_io_size), (0, 1));
        assert_eq!(t.discard.unwrap().max_sectors, 2048);
        assert_eq!(t.write_zeroes.unwrap().max_sectors, 2048);
        assert!(t.write_zeroes_may_unmap);
        // Buffered 512-byte blocks on a 4 KiB device: no discard, no zeroing.
        let t = of_device(&info(4096, 4096, limits), 512);
        assert_eq!(t.physical_block_exp, 3);
        assert_eq!((t.discard, t.write_zeroes), (None, None));
    }
}
