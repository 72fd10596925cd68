//! Unit tests of the mapped engine ([`super`]): real files, real mappings, real SIGBUS.
use std::os::unix::fs::FileExt;

use super::super::{CrcSink, Engine, EngineKind, IoVec};
use super::*;

fn image(len: usize) -> (tempfile::NamedTempFile, File) {
    let t = tempfile::NamedTempFile::new().unwrap();
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    std::fs::write(t.path(), &data).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(t.path())
        .unwrap();
    (t, f)
}

fn run(e: &mut Engine, op: Op<'_>) -> i32 {
    // SAFETY: the test's buffers outlive the reap below.
    unsafe { e.push(op, job(1)) };
    e.submit();
    let mut out = Vec::new();
    while out.is_empty() {
        e.wait().unwrap();
        e.reap(&mut out);
    }
    assert_eq!(out.len(), 1);
    out[0].1
}

fn iov(b: &mut [u8]) -> IoVec {
    IoVec {
        base: b.as_mut_ptr() as usize,
        len: b.len(),
    }
}

/// A WRITE of `iov` at image byte `offset`.
fn write_at(offset: u64, iov: &[IoVec]) -> Op<'_> {
    Op::Write { offset, iov }
}

/// A READ into `iov` from image byte `offset`.
fn read_at(offset: u64, iov: &[IoVec]) -> Op<'_> {
    Op::Read { offset, iov }
}

/// The tag of the request in worker slot `slot`.
fn job(slot: u32) -> Tag {
    Tag::Job { slot, op: 0 }
}

#[test]
fn reads_and_writes_go_through_the_mapping_and_complete_inline() {
    let (_t, f) = image(65536);
    let mut e = Engine::mapped(&f, 8, 65536, true).unwrap();
    assert!(e.completes_inline());
    let (mut a, mut b) = (vec![0u8; 1000], vec![0u8; 3096]);
    let r = run(
        &mut e,
        Op::Read {
            offset: 4096,
            iov: &[iov(&mut a), iov(&mut b)],
        },
    );
    assert_eq!(r, 4096);
    assert_eq!(a[0], (4096 % 251) as u8);
    assert_eq!(b[3095], ((4096 + 4095) % 251) as u8);
    let mut w = vec![0xabu8; 8192];
    assert_eq!(
        run(
            &mut e,
            Op::Write {
                offset: 8192,
                iov: &[iov(&mut w)]
            }
        ),
        8192
    );
    let mut back = vec![0u8; 8192];
    f.read_exact_at(&mut back, 8192).unwrap();
    assert!(back.iter().all(|&x| x == 0xab), "the file sees the write");
    assert!(matches!(&e, Engine::Mapped(m) if m.mapped()));
}

#[test]
fn past_the_end_goes_to_io_uring_with_its_short_read() {
    let (_t, f) = image(8192);
    let mut e = Engine::mapped(&f, 8, 8192, true).unwrap();
    let mut buf = vec![0u8; 8192];
    // io_uring's preadv: a short read of the 4096 bytes left.
    let r = run(
        &mut e,
        Op::Read {
            offset: 4096,
            iov: &[iov(&mut buf)],
        },
    );
    assert_eq!(r, 4096);
}

#[test]
fn a_truncated_image_falls_back_to_io_uring_instead_of_dying() {
    let (_t, f) = image(65536);
    let mut e = Engine::mapped(&f, 8, 65536, true).unwrap();
    assert_eq!(e.kind(), EngineKind::Mapped);
    f.set_len(16384).unwrap();
    let mut buf = vec![7u8; 8192];
    // Without the SIGBUS watch this read kills the test process.
    let r = run(
        &mut e,
        Op::Read {
            offset: 32768,
            iov: &[iov(&mut buf)],
        },
    );
    assert_eq!(
        r, 0,
        "io_uring's preadv past the new end of file reads 0 bytes"
    );
    assert!(matches!(&e, Engine::Mapped(m) if !m.mapped()));
    assert_eq!(
        e.kind(),
        EngineKind::UringAfterSigbus,
        "query-stats shows it"
    );
    // Later operations use io_uring: a write past the end extends the file.
    let mut w = vec![0x5au8; 4096];
    let r = run(
        &mut e,
        Op::Write {
            offset: 20480,
            iov: &[iov(&mut w)],
        },
    );
    assert_eq!(r, 4096);
    let mut back = vec![0u8; 4096];
    f.read_exact_at(&mut back, 20480).unwrap();
    assert!(back.iter().all(|&x| x == 0x5a));
}

#[test]
fn a_large_read_is_copied_inline_while_the_copier_is_busy() {
    let len = 4 * COPIER_MIN;
    let (_t, f) = image(len);
    let mut e = MappedEngine::new(&f, 8, len as u64, true).unwrap();
    let mut w = vec![0x5au8; COPIER_MIN];
    let mut w2 = vec![0xa5u8; COPIER_MIN];
    let mut r = vec![0u8; COPIER_MIN];
    let (wv, w2v, rv) = ([iov(&mut w)], [iov(&mut w2)], [iov(&mut r)]);
    // SAFETY (every push below): the buffers and iovec arrays outlive the
    // reaps at the end.
    unsafe { e.push(write_at(0, &wv), job(1)) };
    // Holding the copier's lock keeps that WRITE unfinished: the copier
    // cannot take it, or cannot hand it back.
    let shared = e.copier.shared.clone();
    let held = shared.state.lock().unwrap();
    assert!(e.copier.busy());
    // A large READ meanwhile: copied on this thread, complete at once.
    unsafe { e.push(read_at(2 * COPIER_MIN as u64, &rv), job(2)) };
    assert!(e.has_completions());
    let mut out = Vec::new();
    e.reap(&mut out);
    assert_eq!(out, vec![(job(2), COPIER_MIN as i32)]);
    let at = 2 * COPIER_MIN;
    assert!(r
        .iter()
        .enumerate()
        .all(|(i, &b)| b == ((at + i) % 251) as u8));
    drop(held);
    // A large WRITE goes to the copier however busy it is (this thread has
    // its R3 checksums to take meanwhile): one more in its hands, none
    // ready here, whether the first WRITE is done by now or not.
    unsafe { e.push(write_at(COPIER_MIN as u64, &w2v), job(3)) };
    assert_eq!(e.copier.in_flight, 2);
    assert!(e.ready.is_empty());
    out.clear();
    while out.len() < 2 {
        e.wait().unwrap();
        e.reap(&mut out);
    }
    out.sort_by_key(|(t, _)| format!("{t:?}"));
    assert_eq!(
        out,
        vec![(job(1), COPIER_MIN as i32), (job(3), COPIER_MIN as i32)]
    );
    let mut back = vec![0u8; 2 * COPIER_MIN];
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(back[..COPIER_MIN].iter().all(|&x| x == 0x5a));
    assert!(back[COPIER_MIN..].iter().all(|&x| x == 0xa5));
}

#[test]
fn large_copies_go_to_the_copier_and_complete_later() {
    let len = 4 * COPIER_MIN;
    let (_t, f) = image(len);
    let mut e = Engine::mapped(&f, 8, len as u64, true).unwrap();
    let mut w = vec![0x3cu8; COPIER_MIN];
    let mut r = vec![0u8; 2 * COPIER_MIN];
    // The iovec arrays too, not temporaries of the push statements: the
    // copier reads them after `push` returns (a temporary array was freed at
    // the `;`, and a release build reused its stack slot: SIGSEGV).
    let (wv, rv) = ([iov(&mut w)], [iov(&mut r)]);
    // SAFETY: both buffers and both iovec arrays outlive the reaps below.
    unsafe {
        e.push(write_at(0, &wv), job(1));
        e.push(read_at(2 * COPIER_MIN as u64, &rv), job(2))
    };
    e.submit();
    // Copies in the copier's hands: the worker does not busy-poll for them.
    assert!(e.copying());
    // The copier signals the completion eventfd the worker sleeps on. Asked
    // before `wait`, which consumes the signal: once both copies are done
    // before the first `wait`, nothing is left to see afterwards (a release
    // build got there first, and this check, made last, failed).
    assert!(crate::sys::wait_readable(
        e.completion_fd(),
        std::time::Duration::from_secs(10)
    ));
    let mut out = Vec::new();
    while out.len() < 2 {
        e.wait().unwrap();
        e.reap(&mut out);
    }
    assert!(!e.copying(), "both reaped");
    out.sort_by_key(|(t, _)| format!("{t:?}"));
    assert_eq!(
        out,
        vec![(job(1), COPIER_MIN as i32), (job(2), 2 * COPIER_MIN as i32)]
    );
    let at = 2 * COPIER_MIN;
    assert!(r
        .iter()
        .enumerate()
        .all(|(i, &b)| b == ((at + i) % 251) as u8));
    let mut back = vec![0u8; COPIER_MIN];
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|&x| x == 0x3c));
}

#[test]
fn a_copier_copy_that_faults_is_redone_through_io_uring() {
    let len = 4 * COPIER_MIN;
    let (_t, f) = image(len);
    let mut e = Engine::mapped(&f, 8, len as u64, true).unwrap();
    f.set_len(COPIER_MIN as u64).unwrap();
    let mut r = vec![9u8; COPIER_MIN];
    let got = run(
        &mut e,
        Op::Read {
            offset: 2 * COPIER_MIN as u64,
            iov: &[iov(&mut r)],
        },
    );
    assert_eq!(got, 0, "preadv past the new end of file");
    assert!(matches!(&e, Engine::Mapped(m) if !m.mapped()));
    assert_eq!(
        e.kind(),
        EngineKind::UringAfterSigbus,
        "query-stats shows it"
    );
}

#[test]
fn a_read_only_mapping_sends_writes_to_io_uring() {
    let (t, _) = image(8192);
    let ro = File::open(t.path()).unwrap();
    let mut e = Engine::mapped(&ro, 8, 8192, false).unwrap();
    let mut w = vec![1u8; 4096];
    let r = run(
        &mut e,
        Op::Write {
            offset: 0,
            iov: &[iov(&mut w)],
        },
    );
    assert_eq!(r, -libc::EBADF, "a read-only file refuses the write");
}

#[test]
fn a_guarded_read_gets_the_crc_of_each_4k_chunk_inline_and_from_the_copier() {
    let len = 4 * COPIER_MIN;
    let (_t, f) = image(len);
    let mut e = Engine::mapped(&f, 8, len as u64, true).unwrap();
    for (offset, n) in [(4096u64, 8192usize), (COPIER_MIN as u64, 2 * COPIER_MIN)] {
        let mut buf = vec![0u8; n];
        let mut crcs = vec![0u32; n / 4096];
        let mut done = true;
        // SAFETY: `crcs` and `done` outlive the completion reaped by `run`.
        let sink = unsafe { CrcSink::new(&mut crcs, &mut done) };
        assert!(!done, "a new sink starts not done");
        let r = run(
            &mut e,
            Op::ReadGuarded {
                offset,
                iov: &[iov(&mut buf)],
                crcs: sink,
            },
        );
        assert_eq!(r, n as i32);
        assert!(done, "{n} bytes at {offset}: the engine filled the sink");
        let want: Vec<u32> = buf.chunks(4096).map(crc_fast::crc32_iscsi).collect();
        assert_eq!(crcs, want);
    }
    // Past the mapped end the READ goes to io_uring: no guard CRCs.
    let mut buf = vec![0u8; 8192];
    let mut crcs = vec![0u32; 2];
    let mut done = false;
    // SAFETY: as above.
    let sink = unsafe { CrcSink::new(&mut crcs, &mut done) };
    let r = run(
        &mut e,
        Op::ReadGuarded {
            offset: len as u64 - 4096,
            iov: &[iov(&mut buf)],
            crcs: sink,
        },
    );
    assert_eq!(r, 4096);
    assert!(!done);
}
