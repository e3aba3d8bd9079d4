//! The process's limit of open files, against what the config can open: every proxy
//! connection (`server.max_connections`), the admin plane's, and a reserve for the upstream
//! connections, the listeners, the logs and Redis. systemd's default soft limit is 1024,
//! far below the default `max_connections`; the unit raises it, and a start by hand raises
//! the soft limit up to the hard one.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

use crate::admin::ADMIN_CONNECTIONS_MAX;

/// Files besides the proxy and admin connections: upstream connections of requests in
/// flight, listeners, logs, Redis.
const RESERVE: u64 = 1024;

/// The open files `max_connections` proxy connections need, with the rest.
pub fn needed(max_connections: usize) -> u64 {
    max_connections as u64 + ADMIN_CONNECTIONS_MAX as u64 + RESERVE
}

/// What is wrong with a limit `(soft, hard)` (`None`: unlimited) for `max_connections`, if
/// anything: raising the soft limit is `raise`'s to do, so only a hard limit below the need
/// is a problem here. (After `raise`, pass the soft limit as both.)
pub fn problem(limit: (Option<u64>, Option<u64>), max_connections: usize) -> Option<String> {
    let need = needed(max_connections);
    match limit.1 {
        Some(hard) if hard < need => Some(format!(
            "the open-file limit is {hard}, below the {need} that server.max_connections ({max_connections}) needs with the admin plane and upstream connections: raise LimitNOFILE (ulimit -n) or lower server.max_connections"
        )),
        _ => None,
    }
}

/// The process's limit now, `(soft, hard)`.
pub fn current() -> (Option<u64>, Option<u64>) {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    (current, maximum)
}

/// Raises the soft limit towards what `max_connections` needs, as far as the hard limit
/// allows; the limit in force afterwards.
pub fn raise(max_connections: usize) -> (Option<u64>, Option<u64>) {
    let (soft, hard) = current();
    let need = needed(max_connections);
    if soft.is_some_and(|soft| soft < need) {
        let target = hard.map_or(need, |hard| hard.min(need));
        let raised = Rlimit {
            current: Some(target),
            maximum: hard,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            log::warn!("could not raise the open-file limit to {target}: {e}");
        }
    }
    current()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hard_limit_below_the_need_is_named_and_enough_is_not() {
        let need = needed(16_384);
        assert_eq!(need, 16_384 + 128 + 1024);
        let told = problem((Some(1024), Some(4096)), 16_384).unwrap();
        assert!(
            told.contains("4096") && told.contains("LimitNOFILE"),
            "{told}"
        );
        assert_eq!(problem((Some(1024), Some(524_288)), 16_384), None);
        assert_eq!(problem((Some(1024), None), 16_384), None);
        assert_eq!(problem((Some(100), Some(2000)), 100), None);
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_need_and_never_lowered() {
        let before = current();
        let need = needed(64); // 1216 files
        if before.1.is_some_and(|hard| hard < need + 16) {
            eprintln!("skipped: the hard open-file limit {before:?} is below {need}");
            return;
        }
        let set = |soft: Option<u64>| {
            let limit = Rlimit {
                current: soft,
                maximum: before.1,
            };
            setrlimit(Resource::Nofile, limit).unwrap();
        };
        // Below the need: raised to it, the hard limit left as it is.
        set(Some(need - 16));
        assert_eq!(raise(64), (Some(need), before.1));
        // Above the need: left as it is.
        set(Some(need + 16));
        assert_eq!(raise(64), (Some(need + 16), before.1));
        set(before.0);
    }
}
