//! The fixed smoke of the `parse_request` fuzz target (run by ci/test):
//! the seeds give their expected outcome, the checked-in corpus equals the
//! seeds, every file of the corpus (seeds plus inputs kept from fuzzing)
//! passes the target's properties, and so do the inputs of a fixed
//! pseudo-random mutation walk from the seeds (the same inputs every run).

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use pinblk_fuzz::{parse_request, seeds::seeds};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus/parse_request")
}

#[test]
fn seeds_give_their_outcome() {
    for (name, input, want) in seeds() {
        let bytes = input.encode();
        assert_eq!(
            pinblk_fuzz::Input::decode(&bytes),
            input,
            "{name}: encode/decode"
        );
        assert_eq!(parse_request(&bytes), want, "seed {name}");
    }
}

/// Set PINBLK_WRITE_SEEDS=1 to (re)write the seed files.
#[test]
fn seeds_are_checked_in() {
    let dir = corpus_dir();
    for (name, input, _) in seeds() {
        let path = dir.join(format!("seed-{name}"));
        if std::env::var_os("PINBLK_WRITE_SEEDS").is_some() {
            fs::create_dir_all(&dir).unwrap();
            fs::write(&path, input.encode()).unwrap();
        }
        let on_disk = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            on_disk,
            input.encode(),
            "{} differs from its seed",
            path.display()
        );
    }
}

#[test]
fn corpus_passes_the_properties() {
    let mut n = 0;
    for entry in fs::read_dir(corpus_dir()).unwrap() {
        let path = entry.unwrap().path();
        let data = fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| parse_request(&data));
        assert!(result.is_ok(), "{} fails the properties", path.display());
        n += 1;
    }
    assert!(n > 0, "empty corpus");
}

/// Inputs of the mutation walk: about 5 s in a debug build on a CI core.
const WALK: usize = 40_000;

/// Values that sit on a boundary of some check (lengths, sectors, indexes,
/// addresses at region ends), written little endian.
const INTERESTING: [u64; 16] = [
    0,
    1,
    2,
    15,
    16,
    17,
    511,
    512,
    4096,
    0xffff,
    0x1_0000,
    0x2_0000,
    0x10_0000,
    0xffff_ffff,
    1 << 32,
    u64::MAX,
];

/// One mutation of `d`, biased to the queue header and descriptor table.
fn mutate(rng: &mut fastrand::Rng, d: &mut Vec<u8>) {
    if d.is_empty() {
        d.push(rng.u8(..));
        return;
    }
    let table_end = (pinblk_fuzz::input::HEADER_LEN
        + 16 * usize::from(d.get(12).copied().unwrap_or(0)))
    .min(d.len());
    let at = if rng.bool() && table_end > 0 {
        rng.usize(..table_end)
    } else {
        rng.usize(..d.len())
    };
    match rng.u8(..6) {
        0 => d[at] ^= 1 << rng.u8(..8),
        1 => d[at] = rng.u8(..),
        2 => {
            let v = INTERESTING[rng.usize(..INTERESTING.len())]
                .wrapping_add(rng.u64(0..3))
                .wrapping_sub(1);
            let width = [1, 2, 4, 8][rng.usize(..4)];
            for (i, b) in v.to_le_bytes().iter().take(width).enumerate() {
                if let Some(x) = d.get_mut(at + i) {
                    *x = *b;
                }
            }
        }
        3 => d.truncate(at),
        4 => {
            // Copy a 16-byte block (a descriptor, a header, a segment) elsewhere.
            let from = rng.usize(..d.len());
            let block: Vec<u8> = d[from..d.len().min(from + 16)].to_vec();
            for (i, b) in block.into_iter().enumerate() {
                if let Some(x) = d.get_mut(at + i) {
                    *x = b;
                }
            }
        }
        _ => d.insert(at, rng.u8(..)),
    }
}

#[test]
fn fixed_mutation_walk_passes_the_properties() {
    let mut rng = fastrand::Rng::with_seed(13);
    let seeds: Vec<Vec<u8>> = seeds().into_iter().map(|(_, i, _)| i.encode()).collect();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for n in 0..WALK {
        let mut d = seeds[rng.usize(..seeds.len())].clone();
        for _ in 0..rng.usize(1..5) {
            mutate(&mut rng, &mut d);
        }
        let result = std::panic::catch_unwind(|| parse_request(&d));
        let Ok(outcome) = result else {
            panic!("walk input {n} fails the properties: {d:02x?}");
        };
        *seen.entry(format!("{outcome:?}")).or_default() += 1;
    }
    // The walk reaches every kind of answer, or it tests little.
    for kind in [
        "Accepted(\"READ\")",
        "Accepted(\"WRITE\")",
        "Accepted(\"DISCARD\")",
        "Refused(Some(1))",
        "Refused(Some(2))",
        "Refused(None)",
    ] {
        assert!(seen.contains_key(kind), "walk never gave {kind}: {seen:?}");
    }
}
