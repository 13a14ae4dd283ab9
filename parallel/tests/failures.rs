//! A failing, panicking or missing rank must stop every other rank promptly, with an error that
//! names it, and never hang the group.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use dm_parallel::comm::threads::{parse_timeout_s, DEFAULT_TIMEOUT};
use dm_parallel::{run_ranks_on, CommError, Mesh, RankComms, ReduceOp, ThreadComm};

/// Long enough that only an abort (not the timeout) can explain a fast stop.
const LONG: Duration = Duration::from_secs(30);

/// One training-like "step": collectives on every communicator of the rank.
fn step(comms: &RankComms, fail_rank: Option<usize>, rank: usize, panic: bool) -> Result<(), CommError> {
    for i in 0..3 {
        if i == 2 && fail_rank == Some(rank) {
            if panic {
                panic!("injected panic in rank {rank}");
            }
            // Returning an error: the caller returns it from the rank closure.
            return Err(CommError::Device { op: "matmul", detail: format!("injected failure in rank {rank}") });
        }
        let mut b = vec![rank as f32; 8];
        comms.tp.all_reduce_slice(&mut b, ReduceOp::Sum)?;
        comms.dp.all_reduce_slice(&mut b, ReduceOp::Avg)?;
        comms.world.barrier()?;
    }
    Ok(())
}

fn check_induced(seen: &Mutex<Vec<(usize, CommError)>>, failed: usize) {
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3, "every other rank must stop with an error: {seen:?}");
    for (r, e) in seen.iter() {
        assert_ne!(*r, failed);
        match e {
            CommError::Aborted { rank, reason } => {
                assert_eq!(*rank, failed, "rank {r} blames the wrong rank: {e}");
                assert!(reason.contains("injected"), "{reason}");
                assert!(e.to_string().contains(&format!("rank {failed} failed")), "{e}");
            }
            other => panic!("rank {r}: expected Aborted, got {other:?}"),
        }
    }
}

#[test]
fn a_rank_returning_an_error_mid_step_stops_every_rank() {
    let mesh = Mesh::new(2, 2).unwrap();
    let seen = Mutex::new(Vec::new());
    let start = Instant::now();
    let err = run_ranks_on(ThreadComm::mesh_with_timeout(&mesh, LONG), |rank, comms| {
        let r = step(&comms, Some(1), rank, false);
        if let Err(e) = &r {
            if rank != 1 {
                seen.lock().unwrap().push((rank, e.clone()));
            }
        }
        r
    })
    .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5), "abort took {:?}", start.elapsed());
    assert_eq!(err.rank, 1);
    assert!(err.reason.contains("injected failure in rank 1"), "{}", err.reason);
    assert!(err.to_string().starts_with("rank 1 failed: device error in matmul"), "{err}");
    assert_eq!(err.failures.len(), 4);
    check_induced(&seen, 1);
}

#[test]
fn a_panicking_rank_stops_every_rank() {
    let mesh = Mesh::new(2, 2).unwrap();
    let seen = Mutex::new(Vec::new());
    let start = Instant::now();
    let err = run_ranks_on(ThreadComm::mesh_with_timeout(&mesh, LONG), |rank, comms| {
        let r = step(&comms, Some(2), rank, true);
        if let Err(e) = &r {
            seen.lock().unwrap().push((rank, e.clone()));
        }
        r
    })
    .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5), "abort took {:?}", start.elapsed());
    assert_eq!(err.rank, 2);
    assert_eq!(err.reason, "panicked: injected panic in rank 2");
    assert_eq!(err.to_string(), "rank 2 failed: panicked: injected panic in rank 2");
    check_induced(&seen, 2);
}

#[test]
fn a_rank_that_skips_a_collective_times_out_instead_of_hanging() {
    let mesh = Mesh::new(1, 3).unwrap();
    let timeout = Duration::from_millis(300);
    let seen = Mutex::new(Vec::new());
    let start = Instant::now();
    let err = run_ranks_on(ThreadComm::mesh_with_timeout(&mesh, timeout), |rank, comms| {
        comms.world.barrier()?;
        if rank == 1 {
            return Ok(()); // leaves without the all_reduce the others wait in
        }
        let r = comms.dp.all_reduce_slice(&mut [1.0], ReduceOp::Sum);
        if let Err(e) = &r {
            seen.lock().unwrap().push((rank, e.clone()));
        }
        r
    })
    .unwrap_err();
    let elapsed = start.elapsed();
    assert!(elapsed >= timeout && elapsed < Duration::from_secs(5), "{elapsed:?}");
    // The first rank to time out aborts the mesh; its reason names the missing rank.
    assert!(err.rank == 0 || err.rank == 2, "{err}");
    assert!(err.reason.contains("timed out") && err.reason.contains("waiting for ranks [1]"), "{}", err.reason);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    let timeouts = seen.iter().filter(|(_, e)| matches!(e, CommError::Timeout { .. })).count();
    assert!(timeouts >= 1, "{seen:?}");
    for (_, e) in seen.iter() {
        match e {
            CommError::Timeout { op, missing, waited_s, .. } => {
                assert_eq!(*op, "all_reduce");
                assert_eq!(missing, &vec![1]);
                assert!(*waited_s >= 0.3);
                assert!(e.to_string().contains("DALLE_MESH_COMM_TIMEOUT_S"));
            }
            CommError::Aborted { rank, reason } => {
                assert_eq!(*rank, err.rank);
                assert!(reason.contains("timed out"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn aborting_one_communicator_fails_every_communicator_of_the_mesh() {
    let mesh = Mesh::new(2, 2).unwrap();
    let start = Instant::now();
    let err = run_ranks_on(ThreadComm::mesh_with_timeout(&mesh, LONG), |rank, comms| -> Result<(), CommError> {
        if rank == 0 {
            std::thread::sleep(Duration::from_millis(50));
            comms.tp.abort("operator asked to stop");
            // Its own communicators refuse further work too.
            let e = comms.dp.barrier().unwrap_err();
            assert_eq!(e, CommError::Aborted { rank: 0, reason: "operator asked to stop".into() });
            assert_eq!(comms.world.failure(), Some((0, "operator asked to stop".into())));
            return Ok(());
        }
        // Ranks blocked on each kind of group: world, tp (rank 1 with 0), dp (rank 3 with 1).
        let e = match rank {
            1 => comms.tp.all_reduce_slice(&mut [0.0], ReduceOp::Sum).unwrap_err(),
            2 => comms.world.barrier().unwrap_err(),
            _ => comms.dp.all_gather_slice(&[0.0], &mut [0.0; 2]).unwrap_err(),
        };
        assert_eq!(e, CommError::Aborted { rank: 0, reason: "operator asked to stop".into() });
        Err(e)
    })
    .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5));
    // Rank 0 returned Ok, but it aborted the mesh: the run failed, and it is the one named.
    assert_eq!(err.rank, 0);
    assert_eq!(err.reason, "operator asked to stop");
    assert_eq!(err.failures.iter().map(|f| f.0).collect::<Vec<_>>(), vec![1, 2, 3]);
}

#[test]
fn separate_groups_do_not_share_failures() {
    let a = ThreadComm::group_with_timeout(1, LONG);
    let b = ThreadComm::group_with_timeout(1, LONG);
    a[0].abort("a failed");
    assert!(a[0].barrier().is_err());
    b[0].barrier().unwrap();
}

#[test]
fn timeout_configuration() {
    assert_eq!(DEFAULT_TIMEOUT, Duration::from_secs(300));
    assert_eq!(parse_timeout_s("2"), Some(Duration::from_secs(2)));
    assert_eq!(parse_timeout_s(" 0.25 "), Some(Duration::from_millis(250)));
    assert_eq!(parse_timeout_s("0"), None);
    assert_eq!(parse_timeout_s("-1"), None);
    assert_eq!(parse_timeout_s("inf"), None);
    assert_eq!(parse_timeout_s("five"), None);
    let c = ThreadComm::group_with_timeout(2, Duration::from_millis(700));
    assert_eq!(c[1].timeout(), Duration::from_millis(700));
    assert_eq!(c[1].label(), "group of 2");
}
