//! Entry point: parse the command line, load the configuration, build the server, run.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use nvidia_sidecar::cli::Cli;
use nvidia_sidecar::{config, server, state, App};

/// mimalloc instead of the C library's allocator: fewer cycles per request, and memory that
/// does not creep under sustained load (BENCHMARKS.md, scenario 5 and the soak).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let source = cli.conf.as_deref().unwrap_or("(embedded default)");
    let loaded = config::read_file(cli.conf.as_deref()).and_then(|file| {
        let settings = config::validate_with_env(&file)?;
        Ok((file, settings))
    });
    let (file, mut settings) = match loaded {
        Ok(loaded) => loaded,
        Err(errors) => {
            for e in &errors {
                eprintln!("{source}: {e}");
            }
            eprintln!(
                "{source}: {} problem(s); configuration rejected",
                errors.len()
            );
            return ExitCode::from(1);
        }
    };
    if cli.test {
        println!("{source}: configuration OK");
        return ExitCode::SUCCESS;
    }
    // A daemon forks after this, and a forked process keeps no threads: it writes each line
    // itself.
    nvidia_sidecar::init_logging(&settings.log_level, !cli.daemon);
    log::info!(
        "nvidia-sidecar {} starting: proxy {}:{} -> {}, {} rpm, config {source}",
        env!("CARGO_PKG_VERSION"),
        settings.listen_host,
        settings.listen_port,
        settings.default_route.upstream,
        settings
            .default_route
            .bucket
            .as_ref()
            .map_or(0.0, |b| b.base_rpm),
    );
    if settings.upstream.api_key.is_none() {
        log::info!(
            "no upstream API key configured: clients' own Authorization headers are forwarded"
        );
    }
    let mode = server::RunMode {
        upgrade: cli.upgrade,
        daemon: cli.daemon,
    };
    if !mode.upgrade {
        // Pingora binds later, in a thread of its own whose failure would leave the process
        // running without a proxy; find out now and stop with a clear line.
        if let Err(e) = server::check_listen_addresses(&settings) {
            log::error!("{e}");
            log::logger().flush();
            eprintln!("{source}: {e}");
            return ExitCode::from(1);
        }
    }
    let mut layers = config::ConfigLayers {
        path: cli.conf.clone(),
        file,
        overrides: config::Overrides::default(),
    };
    if let Some(dir) = settings.state_dir.clone() {
        match state::load_overrides(&dir) {
            Ok(overrides) if !overrides.is_empty() => {
                layers.overrides = overrides;
                match config::validate_with_env(&layers.effective()) {
                    Ok(layered) => {
                        log::info!(
                            "runtime overrides from {}: {}",
                            dir.display(),
                            layers.overrides.names().join(", ")
                        );
                        settings = layered;
                    }
                    Err(errors) => {
                        let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
                        log::error!(
                            "ignoring the saved overrides, they no longer validate: {}",
                            list.join("; ")
                        );
                        layers.overrides = config::Overrides::default();
                    }
                }
            }
            Ok(_) => {}
            Err(e) => log::error!("ignoring unreadable overrides {e}"),
        }
    }
    let app = App::new(layers, settings);
    if let Some(dir) = app.settings().state_dir.clone() {
        state::restore_limiters(&dir, &app);
    }
    server::build(app, mode).run(pingora::server::RunArgs::default());
    log::logger().flush();
    ExitCode::SUCCESS
}
