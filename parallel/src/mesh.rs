//! The device mesh: `world = tp × dp` ranks, tensor-parallel innermost.
//!
//! Rank `r` sits at `(dp_index, tp_index) = (r / tp, r % tp)`, so the ranks of one tensor-parallel
//! group are consecutive (one node, the fast links) and a data-parallel group strides by `tp`.
//! Every tp group holds one full model; every dp group holds one shard position (the split of
//! each layer is in [`crate::layers`]).

use serde::Serialize;
use thiserror::Error;

/// Why a mesh shape was refused, with the fix.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MeshError {
    /// `tp` or `dp` was zero.
    #[error("mesh axis {axis} is 0; every mesh axis needs at least 1 rank (use {axis}=1 to switch that kind of parallelism off)")]
    ZeroAxis {
        /// `"tp"` or `"dp"`.
        axis: &'static str,
    },
    /// The launched world size is not the mesh's `tp · dp`.
    #[error(
        "world size {world} does not match the mesh tp={tp} × dp={dp} = {product}; \
         launch {product} ranks, or choose tp and dp whose product is {world}"
    )]
    WorldMismatch {
        /// Number of ranks actually launched.
        world: usize,
        /// Requested tensor-parallel degree.
        tp: usize,
        /// Requested data-parallel degree.
        dp: usize,
        /// `tp · dp`.
        product: usize,
    },
}

/// A `tp × dp` mesh of ranks; rank = `dp_index · tp + tp_index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Mesh {
    tp: usize,
    dp: usize,
}

impl Mesh {
    /// A mesh of `tp · dp` ranks; refuses a zero axis.
    pub fn new(tp: usize, dp: usize) -> Result<Self, MeshError> {
        if tp == 0 {
            return Err(MeshError::ZeroAxis { axis: "tp" });
        }
        if dp == 0 {
            return Err(MeshError::ZeroAxis { axis: "dp" });
        }
        Ok(Self { tp, dp })
    }

    /// A mesh for `world` launched ranks; refuses a zero axis and `world != tp · dp`.
    pub fn for_world(world: usize, tp: usize, dp: usize) -> Result<Self, MeshError> {
        let mesh = Self::new(tp, dp)?;
        if mesh.world() != world {
            return Err(MeshError::WorldMismatch { world, tp, dp, product: mesh.world() });
        }
        Ok(mesh)
    }

    /// The one-rank mesh (tp = dp = 1).
    pub fn single() -> Self {
        Self { tp: 1, dp: 1 }
    }

    /// Tensor-parallel degree (size of a tp group).
    pub fn tp(&self) -> usize {
        self.tp
    }

    /// Data-parallel degree (size of a dp group).
    pub fn dp(&self) -> usize {
        self.dp
    }

    /// Number of ranks, `tp · dp`.
    pub fn world(&self) -> usize {
        self.tp * self.dp
    }

    /// `(dp_index, tp_index)` of `rank`.
    ///
    /// # Panics
    /// If `rank >= world()`.
    pub fn coords(&self, rank: usize) -> (usize, usize) {
        assert!(rank < self.world(), "rank {rank} is outside the mesh tp={} × dp={}", self.tp, self.dp);
        (rank / self.tp, rank % self.tp)
    }

    /// The rank at `(dp_index, tp_index)`.
    ///
    /// # Panics
    /// If an index is outside its axis.
    pub fn rank_of(&self, dp_index: usize, tp_index: usize) -> usize {
        assert!(
            dp_index < self.dp && tp_index < self.tp,
            "coordinates (dp_index {dp_index}, tp_index {tp_index}) are outside the mesh tp={} × dp={}",
            self.tp,
            self.dp
        );
        dp_index * self.tp + tp_index
    }

    /// The ranks sharing `rank`'s dp_index (its tensor-parallel group), in tp_index order, so a
    /// rank's position in this list is its tp_index.
    pub fn tp_group(&self, rank: usize) -> Vec<usize> {
        let (d, _) = self.coords(rank);
        (0..self.tp).map(|t| self.rank_of(d, t)).collect()
    }

    /// The ranks sharing `rank`'s tp_index (its data-parallel group), in dp_index order, so a
    /// rank's position in this list is its dp_index.
    pub fn dp_group(&self, rank: usize) -> Vec<usize> {
        let (_, t) = self.coords(rank);
        (0..self.dp).map(|d| self.rank_of(d, t)).collect()
    }
}

impl std::fmt::Display for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tp={} × dp={}", self.tp, self.dp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_tp_innermost() {
        let m = Mesh::new(2, 3).unwrap();
        assert_eq!(m.world(), 6);
        assert_eq!(m.coords(0), (0, 0));
        assert_eq!(m.coords(1), (0, 1));
        assert_eq!(m.coords(2), (1, 0));
        assert_eq!(m.coords(5), (2, 1));
        for r in 0..m.world() {
            let (d, t) = m.coords(r);
            assert_eq!(m.rank_of(d, t), r);
        }
        assert_eq!(m.tp_group(3), vec![2, 3]);
        assert_eq!(m.dp_group(3), vec![1, 3, 5]);
        assert_eq!(m.dp_group(4), vec![0, 2, 4]);
        assert_eq!(Mesh::single().world(), 1);
        assert_eq!(Mesh::single().tp_group(0), vec![0]);
    }

    #[test]
    fn validation_names_problem_and_fix() {
        let e = Mesh::new(0, 2).unwrap_err();
        assert_eq!(e, MeshError::ZeroAxis { axis: "tp" });
        let msg = e.to_string();
        assert!(msg.contains("tp is 0") && msg.contains("tp=1"), "{msg}");
        assert_eq!(Mesh::new(2, 0).unwrap_err(), MeshError::ZeroAxis { axis: "dp" });
        assert_eq!(Mesh::for_world(4, 0, 4).unwrap_err(), MeshError::ZeroAxis { axis: "tp" });

        let e = Mesh::for_world(6, 2, 2).unwrap_err();
        assert_eq!(e, MeshError::WorldMismatch { world: 6, tp: 2, dp: 2, product: 4 });
        let msg = e.to_string();
        assert!(msg.contains("world size 6") && msg.contains("launch 4 ranks"), "{msg}");
        assert_eq!(Mesh::for_world(8, 4, 2).unwrap(), Mesh::new(4, 2).unwrap());
    }

    #[test]
    #[should_panic(expected = "outside the mesh")]
    fn coords_out_of_range_panics() {
        Mesh::new(2, 2).unwrap().coords(4);
    }
}
