//! The committed C header (`include/memlayer.h`) is what cbindgen makes of
//! `src/lib.rs` today: a stale header fails here, naming how to refresh it.

use std::path::Path;

#[test]
fn the_committed_header_is_current() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("config");
    let bindings = cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let path = crate_dir.join("../../include/memlayer.h");
    if std::env::var("MEMLAYER_BLESS").as_deref() == Ok("1") {
        std::fs::write(&path, &fresh).expect("write the header");
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/memlayer.h is stale: run `MEMLAYER_BLESS=1 cargo test --release -p memlayer-capi \
         --test header` and commit it"
    );
}
