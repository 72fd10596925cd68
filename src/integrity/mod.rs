//! Integrity: per-block CRC32C of every write and the checksum store.
