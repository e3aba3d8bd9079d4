//! Background tasks that must not end silently: a task that panics ends the process, so that
//! the service manager restarts the sidecar.

/// Runs a background service's body; if it panics, the process ends (exit code 70) with the
/// reason logged, so that the service manager restarts the sidecar. A background task must
/// never be lost silently: without its lifecycle a sidecar takes no more reloads and saves no
/// state, without its sampler the status stops moving.
pub async fn supervise(name: &str, body: impl std::future::Future<Output = ()>) {
    if let Err(reason) = catch_panic(body).await {
        log::error!(
            "the {name} task stopped after a panic ({reason}); exiting so that the service manager restarts the sidecar"
        );
        crate::logging::exit(70);
    }
}

/// Runs `body`, turning a panic into its message.
async fn catch_panic(body: impl std::future::Future<Output = ()>) -> Result<(), String> {
    use futures_util::FutureExt;
    std::panic::AssertUnwindSafe(body)
        .catch_unwind()
        .await
        .map_err(|panic| {
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".to_string())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_task_is_caught_with_its_reason() {
        assert_eq!(catch_panic(async {}).await, Ok(()));
        let reason = catch_panic(async { panic!("state dir vanished") }).await;
        assert_eq!(reason, Err("state dir vanished".to_string()));
        let n = 3;
        let reason = catch_panic(async move { panic!("{n} saves failed") }).await;
        assert_eq!(reason, Err("3 saves failed".to_string()));
    }
}
