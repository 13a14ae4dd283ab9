//! The NCCL id rendezvous: every NCCL group needs an `ncclUniqueId` made by one member and
//! handed to the others. [`exchange_id`] passes it through the run's rendezvous store
//! ([`crate::rendezvous::Store`]: served by world rank 0, reached by process ranks over TCP and
//! by thread ranks in memory) as 256 hex digits under `nccl/<group key>`. The communicator itself
//! ([`super::nccl::NcclComm`]) only consumes the id.

use cudarc::nccl::sys;

use super::nccl::{dev_err, nccl_available, nccl_msg};
use super::Result;
use crate::rendezvous::{Store, StoreError};

/// An `ncclUniqueId`: 128 opaque bytes that one rank makes and every member of the group needs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId(pub [u8; 128]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclId({}…)", &self.to_hex()[..16])
    }
}

impl NcclId {
    /// A fresh id (`ncclGetUniqueId`; this process hosts the group's bootstrap root until the
    /// group is initialised).
    pub fn new() -> Result<Self> {
        nccl_available()?;
        let id = cudarc::nccl::result::get_uniqueid().map_err(|e| dev_err("ncclGetUniqueId", nccl_msg(e.0)))?;
        let mut bytes = [0u8; 128];
        for (b, c) in bytes.iter_mut().zip(id.internal.iter()) {
            *b = *c as u8;
        }
        Ok(Self(bytes))
    }

    /// The 256 lowercase hex digits of the id (what the rendezvous exchanges).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`NcclId::to_hex`]'s output (surrounding whitespace allowed).
    pub fn from_hex(s: &str) -> Option<Self> {
        let s = s.trim();
        if s.len() != 256 {
            return None;
        }
        let mut bytes = [0u8; 128];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self(bytes))
    }

    pub(super) fn raw(&self) -> sys::ncclUniqueId {
        let mut internal = [0 as std::ffi::c_char; 128];
        for (c, b) in internal.iter_mut().zip(self.0.iter()) {
            *c = *b as std::ffi::c_char;
        }
        sys::ncclUniqueId { internal }
    }
}

/// This rank's place in the group whose world ranks are `members` (in group-rank order) and the
/// group's id: `members[0]` makes the id and publishes it under `nccl/<key>` in `store`; every
/// other member waits for it there (the store's timeout applies). Errors name the group.
pub fn exchange_id(store: &Store, key: &str, members: &[usize], world_rank: usize) -> Result<(usize, NcclId)> {
    let rank = members
        .iter()
        .position(|&m| m == world_rank)
        .ok_or_else(|| dev_err("rendezvous", format!("world rank {world_rank} is not in group {key}")))?;
    let store_err = |e: StoreError| dev_err("rendezvous", e.to_string());
    let key = format!("nccl/{key}");
    let id = if rank == 0 {
        let id = NcclId::new()?;
        store.set(&key, &id.to_hex()).map_err(store_err)?;
        id
    } else {
        let hex = store.get(&key).map_err(store_err)?;
        NcclId::from_hex(&hex).ok_or_else(|| dev_err("rendezvous", format!("malformed id under {key}")))?
    };
    Ok((rank, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_hex() {
        let mut b = [0u8; 128];
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i * 37 % 256) as u8;
        }
        let id = NcclId(b);
        let hex = id.to_hex();
        assert_eq!(hex.len(), 256);
        assert_eq!(NcclId::from_hex(&hex), Some(id));
        assert_eq!(NcclId::from_hex(&format!("{hex}\n")), Some(id));
        assert_eq!(NcclId::from_hex(&hex[..254]), None);
        assert_eq!(NcclId::from_hex(&hex.replace('0', "g")), None);
        assert_eq!(id.raw().internal[1] as u8, 37);
    }
}
