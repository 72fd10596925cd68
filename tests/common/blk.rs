//! virtio-blk requests (virtio 1.2 §5.2.6) as the hand-built frontend lays
//! them out in guest memory, and process statistics for the tests.

/// virtio 1.2 §5.2.6 request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// WRITE.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// FLUSH.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// GET_ID.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Status byte values (virtio 1.2 §5.2.6).
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// IOERR.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// UNSUPP.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// One virtio-blk request as `TestFrontend::write_request` lays it out.
#[derive(Clone, Copy, Debug)]
pub struct BlkRequest {
    /// `type` of `virtio_blk_outhdr` (VIRTIO_BLK_T_*).
    pub kind: u32,
    /// `sector` (512 bytes).
    pub sector: u64,
    /// GPA of the 16-byte header.
    pub hdr: u64,
    /// Data buffer (GPA, bytes), if any.
    pub data: Option<(u64, u32)>,
    /// GPA of the status byte.
    pub status: u64,
}

impl BlkRequest {
    /// A READ of `len` bytes at `sector` into `data`, header and status at
    /// `meta` (16 bytes header, status at `meta + 16`).
    pub fn read(sector: u64, data: u64, len: u32, meta: u64) -> BlkRequest {
        BlkRequest {
            kind: VIRTIO_BLK_T_IN,
            sector,
            hdr: meta,
            data: Some((data, len)),
            status: meta + 16,
        }
    }

    /// A WRITE of `len` bytes from `data` at `sector`.
    pub fn write(sector: u64, data: u64, len: u32, meta: u64) -> BlkRequest {
        BlkRequest {
            kind: VIRTIO_BLK_T_OUT,
            ..Self::read(sector, data, len, meta)
        }
    }

    /// A FLUSH (no data buffer).
    pub fn flush(meta: u64) -> BlkRequest {
        BlkRequest {
            kind: VIRTIO_BLK_T_FLUSH,
            sector: 0,
            hdr: meta,
            data: None,
            status: meta + 16,
        }
    }
}

/// A ready-made arena for many small requests on one queue: request `n`
/// uses descriptors `3n..3n+2`, its header and status at `meta + 32 n` and
/// its data at `data + n * stride`.
#[derive(Clone, Copy, Debug)]
pub struct Arena {
    /// GPA of the headers/status area (32 bytes per request).
    pub meta: u64,
    /// GPA of the data area.
    pub data: u64,
    /// Bytes of data per request.
    pub stride: u32,
}

impl Arena {
    /// Request `n`'s READ of `stride` bytes at `sector`.
    pub fn read(&self, n: u16, sector: u64) -> BlkRequest {
        BlkRequest::read(
            sector,
            self.data + u64::from(n) * u64::from(self.stride),
            self.stride,
            self.meta + 32 * u64::from(n),
        )
    }

    /// Request `n`'s WRITE of `stride` bytes at `sector`.
    pub fn write(&self, n: u16, sector: u64) -> BlkRequest {
        BlkRequest {
            kind: VIRTIO_BLK_T_OUT,
            ..self.read(n, sector)
        }
    }

    /// Request `n`'s FLUSH.
    pub fn flush(&self, n: u16) -> BlkRequest {
        BlkRequest::flush(self.meta + 32 * u64::from(n))
    }

    /// First descriptor of request `n`.
    pub fn first_desc(n: u16) -> u16 {
        n.wrapping_mul(3)
    }
}

/// CPU time (user + system, in clock ticks) a process has used, from
/// `/proc/PID/stat` (proc(5): fields 14 and 15).
pub fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 → index 11.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}
