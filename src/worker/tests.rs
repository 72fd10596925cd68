//! Unit tests of the data path with virtio-queue MockSplitQueue.
