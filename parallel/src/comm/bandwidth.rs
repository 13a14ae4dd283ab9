//! Bus-bandwidth factors of the collectives, as nccl-tests defines them
//! (`doc/PERFORMANCE.md` there): `busbw = algbw × factor(n)`, where `algbw = size / time` and
//! `size` is the larger buffer of the call (the recv buffer of an all-gather, the send buffer of
//! a reduce-scatter, the buffer of an all-reduce or broadcast). The factor is the fraction of
//! `size` that crosses the slowest link of an optimal (ring) algorithm, so busbw is comparable
//! with the link's peak bandwidth whatever the group size. The performance model
//! (`dm_model::perf_model`) uses the same factors to turn a collective's payload into wire bytes.

use super::CollectiveKind;

/// nccl-tests' busbw factor of `kind` over `n` ranks: all-reduce `2(n−1)/n`, all-gather and
/// reduce-scatter `(n−1)/n`, broadcast 1, barrier 0. A group of one rank moves nothing (0).
pub fn bus_factor(kind: CollectiveKind, n: usize) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    let n = n as f64;
    match kind {
        CollectiveKind::AllReduce => 2.0 * (n - 1.0) / n,
        CollectiveKind::AllGather | CollectiveKind::ReduceScatter => (n - 1.0) / n,
        CollectiveKind::Broadcast => 1.0,
        CollectiveKind::Barrier => 0.0,
    }
}

/// `size` of a collective in nccl-tests' sense from the payload [`super::CommStats`] counts
/// (the buffer this rank passes in): all-gather counts its send buffer, so `size = n × payload`;
/// every other kind counts its larger buffer already.
pub fn nccl_size(kind: CollectiveKind, payload_bytes: f64, n: usize) -> f64 {
    match kind {
        CollectiveKind::AllGather => payload_bytes * n as f64,
        _ => payload_bytes,
    }
}

/// Bytes a ring implementation sends over each rank's link: `bus_factor × size`.
pub fn wire_bytes(kind: CollectiveKind, payload_bytes: f64, n: usize) -> f64 {
    bus_factor(kind, n) * nccl_size(kind, payload_bytes, n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use CollectiveKind::*;

    #[test]
    fn factors_are_nccl_tests_factors() {
        assert_eq!(bus_factor(AllReduce, 8), 2.0 * 7.0 / 8.0);
        assert_eq!(bus_factor(AllReduce, 2), 1.0);
        assert_eq!(bus_factor(AllGather, 4), 0.75);
        assert_eq!(bus_factor(ReduceScatter, 4), 0.75);
        assert_eq!(bus_factor(Broadcast, 16), 1.0);
        assert_eq!(bus_factor(Barrier, 4), 0.0);
        for k in CollectiveKind::ALL {
            assert_eq!(bus_factor(k, 1), 0.0);
        }
    }

    #[test]
    fn wire_bytes_of_a_ring() {
        // A ring all-reduce of 1 MB over 4 ranks sends 2·3/4 MB per rank; an all-gather whose
        // send buffer is 1 MB sends the 3 other ranks' MB.
        assert_eq!(wire_bytes(AllReduce, 1e6, 4), 1.5e6);
        assert_eq!(wire_bytes(AllGather, 1e6, 4), 3e6);
        assert_eq!(wire_bytes(ReduceScatter, 4e6, 4), 3e6);
        assert_eq!(nccl_size(AllGather, 1e6, 4), 4e6);
    }
}
