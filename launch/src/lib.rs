//! The `dalle-mesh` command's library half: each subcommand is a module with a `run` function
//! that returns a serialisable report, so tests drive exactly what the binary runs.

pub mod bench;
pub mod parity;
