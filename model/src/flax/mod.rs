//! Flax's msgpack serialisation (`flax.serialization.to_bytes` / `from_bytes`), read and written
//! generically: a checkpoint is a nested msgpack map with string keys whose leaves are arrays.
//!
//! * ext type 1: an ndarray, payload = msgpack `[shape, dtype name, raw C-order LE bytes]`;
//! * ext type 3: a numpy scalar, same payload with shape `[]`;
//! * arrays over 1 GiB: a map `{"__msgpack_chunked_array__": true, "shape": {"0": n0, …},
//!   "chunks": {"0": ext1, …}}` of flat chunks, joined back into one array here;
//! * plain msgpack numbers and booleans as leaves are scalars (int → int64, float → float64).
//!
//! Reading streams: [`visit_file`] hands each array (its '.'-joined Flax path, shape, dtype, raw
//! bytes) to a callback as soon as it is decoded, so a caller that converts and drops holds at
//! most one raw tensor beyond what it keeps. [`read_file`] collects them all. Sharded
//! transformers checkpoints (`flax_model-0000k-of-0000n.msgpack` + `flax_model.msgpack.index.json`)
//! are read by [`visit_checkpoint`]. Writing ([`write_file`]) is atomic and splits large arrays
//! into chunks exactly as flax does.

mod dtype;
mod read;
mod write;

pub use dtype::FlaxDtype;
pub use read::{read_file, visit_checkpoint, visit_file, visit_reader, FlaxArray, INDEX_FILE, WEIGHTS_FILE};
pub use write::{write_file, write_to, write_to_chunked, FlaxArrayRef, MAX_CHUNK_BYTES};
