//! Integration tests live beside this crate root (see Cargo.toml); fixtures in `fixtures/`.
