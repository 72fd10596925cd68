//! The fixed smoke of the `parse_request` fuzz target (run by ci/test):
//! the seeds give their expected outcome, the checked-in corpus equals the
//! seeds, and every file of the corpus (seeds plus inputs the fuzzer kept)
//! passes the target's properties.

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
        assert_eq!(pinblk_fuzz::Input::decode(&bytes), input, "{name}: encode/decode");
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
        assert_eq!(on_disk, input.encode(), "{} differs from its seed", path.display());
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
