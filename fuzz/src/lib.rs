//! Fuzz bodies of pinblk, shared by the libFuzzer targets (`fuzz_targets/`)
//! and by `cargo test` in this crate, which replays the checked-in corpus
//! (the CI smoke, README "Testing").
//!
//! [`parse_request`] interprets its input as a virtqueue plus guest memory
//! ([`Input`]), pops one descriptor chain and runs pinblk's request parser
//! ([`pinblk::virtio_blk::parse`]) on it, then checks the answer against an
//! independent model of virtio 1.2 §2.7.4 (message framing) and §5.2.6
//! (virtio-blk requests) written here ([`model`]): same verdict (accepted or
//! refused), the same status byte (or none) whatever the verdict, and for an
//! accepted request the same command, sector ranges and data buffer. A
//! disagreement or a panic is a finding.

pub mod input;
pub mod model;
pub mod seeds;

pub use input::Input;

use pinblk::virtio_blk::chain::ParseError;
use pinblk::virtio_blk::{parse, Command, RequestError};
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::{Queue, QueueT};

use model::{Expected, Verdict};

/// What [`parse_request`] saw, for the corpus tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The queue had no chain to pop (the avail ring could not be read).
    NoChain,
    /// Accepted: the command's name ("READ", "WRITE", ...).
    Accepted(&'static str),
    /// Refused with this status byte (`None`: the chain has no status byte).
    Refused(Option<u8>),
}

/// Runs one fuzz input: builds guest memory and a split virtqueue from
/// `data` ([`Input::decode`]), pops the chain the avail ring names, parses
/// it, and panics if the parser and [`model::expect`] disagree or a
/// property of the answer does not hold.
pub fn parse_request(data: &[u8]) -> Outcome {
    let input = Input::decode(data);
    let mem = input.guest_memory();
    let mock = input.write_queue(&mem);
    let mut queue: Queue = mock
        .create_queue()
        .expect("mock queue parameters are valid");
    let Some(chain) = queue.pop_descriptor_chain(&mem) else {
        return Outcome::NoChain;
    };
    let head = chain.head_index();
    let descs: Vec<model::Desc> = chain.clone().map(model::Desc::from).collect();
    let verdict = model::expect(&mem, &descs, &input.limits);
    let want_status = model::status_byte(&descs);
    match (parse(chain, &input.limits), verdict) {
        (Ok(req), Verdict::Accept(want)) => {
            assert_eq!(
                Some(want.status),
                want_status,
                "the model's status byte of an accepted request is not its chain's"
            );
            check_accepted(&req, &want, head, &input);
            Outcome::Accepted(req.command.name())
        }
        (Ok(req), Verdict::Refuse(why)) => {
            panic!("parser accepted {req:?}, the model refuses it: {why}\ndescriptors {descs:?}")
        }
        (Err(refused), Verdict::Accept(want)) => {
            panic!(
                "parser refused ({refused:?}) a request the model accepts: {want:?}\n\
                 descriptors {descs:?}"
            )
        }
        (Err(refused), Verdict::Refuse(_)) => {
            assert_eq!(refused.head, head, "refusal names another head");
            let status = refused.error.status();
            assert!(
                status == VIRTIO_BLK_S_IOERR as u8 || status == VIRTIO_BLK_S_UNSUPP as u8,
                "refusal status {status} is neither IOERR nor UNSUPP"
            );
            if status == VIRTIO_BLK_S_UNSUPP as u8 {
                assert!(
                    model::may_be_unsupported(&mem, &descs),
                    "UNSUPP ({refused:?}) for a known request type without segment flags"
                );
            }
            assert_eq!(
                refused.status_addr.map(|a| a.0),
                want_status,
                "refusal ({refused:?}) puts the status byte elsewhere than the model\n\
                 descriptors {descs:?}"
            );
            if model::unterminated(&descs) {
                assert!(
                    matches!(
                        refused.error,
                        RequestError::Chain(ParseError::Unterminated { .. })
                    ),
                    "a chain that breaks off refused as {refused:?}"
                );
            }
            if let Some(addr) = refused.status_addr {
                assert!(
                    descs
                        .iter()
                        .any(|d| d.write && d.len > 0 && d.contains(addr.0)),
                    "status byte {addr:?} of a refusal is in no device-writable descriptor: \
                     {descs:?}"
                );
                assert!(
                    input::in_guest_memory(addr.0, 1),
                    "status byte {addr:?} outside guest memory"
                );
            }
            Outcome::Refused(refused.status_addr.map(|_| status))
        }
    }
}

/// The properties of an accepted request: equal to the model's, and inside
/// guest memory and the device's capacity on its own terms.
fn check_accepted(req: &pinblk::virtio_blk::Request, want: &Expected, head: u16, input: &Input) {
    assert_eq!(req.head, head, "request names another head");
    assert_eq!(req.status_addr.0, want.status, "status byte misplaced");
    assert_eq!(req.command, want.command, "command differs from the model");
    assert_eq!(
        model::normalize(&req.data),
        model::normalize(&want.data),
        "data buffer differs from the model"
    );
    let total: u64 = req.data.iter().map(|r| u64::from(r.len)).sum();
    assert_eq!(
        u64::from(req.data_len),
        total,
        "data_len is not the sum of data"
    );
    for r in &req.data {
        assert!(r.len > 0, "empty data range {r:?}");
        assert!(
            input::in_guest_memory(r.addr, u64::from(r.len)),
            "data range {r:?} outside guest memory"
        );
    }
    assert!(
        input::in_guest_memory(req.status_addr.0, 1),
        "status outside guest memory"
    );
    let limits = &input.limits;
    let in_capacity = |sector: u64, sectors: u64| {
        u128::from(sector) + u128::from(sectors) <= u128::from(limits.capacity)
    };
    match &req.command {
        Command::Read { sector } | Command::Write { sector } => {
            let lbs = u64::from(limits.logical_block_size);
            assert!(
                total <= u64::from(limits.max_transfer),
                "transfer larger than the largest transfer"
            );
            assert_eq!(total % lbs, 0, "length not a multiple of the logical block");
            assert_eq!(sector.0 % (lbs / 512), 0, "sector not on a logical block");
            assert!(in_capacity(sector.0, total / 512), "transfer past capacity");
            if matches!(req.command, Command::Write { .. }) {
                assert!(!limits.read_only, "WRITE accepted on a read-only device");
            }
        }
        Command::Discard(segs) | Command::WriteZeroes(segs) => {
            assert!(
                !limits.read_only,
                "{} accepted on a read-only device",
                req.command.name()
            );
            assert!(req.data.is_empty(), "segments left in the data buffer");
            for s in segs {
                assert!(s.sectors > 0, "empty segment kept");
                assert!(
                    in_capacity(s.sector.0, u64::from(s.sectors)),
                    "segment past capacity"
                );
            }
        }
        Command::Flush => assert!(req.data.is_empty(), "FLUSH with a data buffer"),
        Command::GetId => {}
    }
}
