//! The exit codes of `dalle-mesh`, fixed for the whole project (README, *Exit codes*), and the
//! error types that select them.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success (also a run that stopped at `training.time_limit_minutes` after saving) |
//! | 1 | error |
//! | 2 | bad input, usage or environment (a config, data, checkpoint or CLI value; clap uses 2 for usage) |
//! | 3 | diverged: the divergence guard stopped the run; nothing diverged was saved |
//! | 75 | stopped by a signal after saving a checkpoint: requeue me (`EX_TEMPFAIL`) |
//! | 130 | a second SIGINT: immediate exit (128 + 2) |
//! | 143 | a second SIGTERM: immediate exit (128 + 15) |

use std::fmt;

pub const SUCCESS: i32 = 0;
pub const ERROR: i32 = 1;
pub const BAD_INPUT: i32 = 2;
pub const DIVERGED: i32 = 3;
/// `EX_TEMPFAIL` of sysexits.h: the run saved a checkpoint and can be resumed.
pub const STOPPED_REQUEUE: i32 = 75;
/// 128 + SIGINT.
pub const SECOND_SIGINT: i32 = 130;
/// 128 + SIGTERM.
pub const SECOND_SIGTERM: i32 = 143;

/// An error caused by what the user gave (a config, a file, a CLI value, a folder another run
/// holds): exit code [`BAD_INPUT`]. The message names the problem, the file and the fix.
#[derive(Debug)]
pub struct BadInput(pub String);

impl fmt::Display for BadInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// `anyhow::Error` of a [`BadInput`] built like `format!`.
#[macro_export]
macro_rules! bad_input {
    ($($arg:tt)*) => {
        anyhow::Error::new($crate::exit_code::BadInput(format!($($arg)*)))
    };
}

/// The divergence guard tripped (or a non-finite value was about to be saved): exit code
/// [`DIVERGED`].
#[derive(Debug)]
pub struct Diverged(pub String);

impl fmt::Display for Diverged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Diverged {}

/// The exit code for an error: the first [`Diverged`] or [`BadInput`] (or a data-file error)
/// anywhere in its chain, else [`ERROR`].
pub fn for_error(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if cause.downcast_ref::<Diverged>().is_some() {
            return DIVERGED;
        }
        if cause.downcast_ref::<BadInput>().is_some() || cause.downcast_ref::<dm_data::DataError>().is_some() {
            return BAD_INPUT;
        }
    }
    ERROR
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn codes_follow_the_error_chain() {
        let plain = anyhow::anyhow!("disk on fire");
        assert_eq!(for_error(&plain), ERROR);
        let bad: anyhow::Result<()> = Err(bad_input!("training.steps must be positive"));
        assert_eq!(for_error(&bad.context("in run.yaml").unwrap_err()), BAD_INPUT);
        let div: anyhow::Result<()> = Err(anyhow::Error::new(Diverged("loss is NaN".into())));
        assert_eq!(for_error(&div.context("step 3").context("rank 0").unwrap_err()), DIVERGED);
        let data: anyhow::Result<()> =
            Err(dm_data::DataError::InvalidArgument("x".into())).context("opening the dataset");
        assert_eq!(for_error(&data.unwrap_err()), BAD_INPUT);
    }
}
