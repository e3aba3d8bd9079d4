//! Entry point: parse the command line, load the configuration, build the server, run.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use nvidia_sidecar::cli::Cli;
use nvidia_sidecar::{config, server, App};

/// mimalloc instead of the C library's allocator: fewer cycles per request, and memory that
/// does not creep under sustained load (BENCHMARKS.md, scenario 5 and the soak).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let source = cli.conf.as_deref().unwrap_or("(embedded default)");
    let rejected = |errors: Vec<config::ConfigError>| {
        for e in &errors {
            eprintln!("{source}: {e}");
        }
        eprintln!(
            "{source}: {} problem(s); configuration rejected",
            errors.len()
        );
        ExitCode::from(1)
    };
    let layers = match config::read_file(cli.conf.as_deref()) {
        Ok(file) => config::ConfigLayers {
            path: cli.conf.clone(),
            file,
            overrides: config::Overrides::default(),
        },
        Err(errors) => return rejected(errors),
    };
    // The file alone, for `-t` and for what must be known before the app starts (the log
    // level, the listen addresses); runtime overrides change neither.
    let file_settings = match layers.settings() {
        Ok(settings) => settings,
        Err(errors) => return rejected(errors),
    };
    let max_connections = file_settings.server.max_connections;
    if cli.test {
        let limit = nvidia_sidecar::file_limit::current();
        if let Some(problem) = nvidia_sidecar::file_limit::problem(limit, max_connections) {
            eprintln!("{source}: warning: {problem}");
        }
        println!("{source}: configuration OK");
        return ExitCode::SUCCESS;
    }
    // A daemon forks after this, and a forked process keeps no threads: it writes each line
    // itself.
    nvidia_sidecar::init_logging(&file_settings.log_level, !cli.daemon);
    let mode = server::RunMode {
        upgrade: cli.upgrade,
        daemon: cli.daemon,
    };
    if !mode.upgrade {
        // Pingora binds later, in a thread of its own whose failure would leave the process
        // running without a proxy; find out now and stop with a clear line.
        if let Err(e) = server::check_listen_addresses(&file_settings) {
            log::error!("{e}");
            log::logger().flush();
            eprintln!("{source}: {e}");
            return ExitCode::from(1);
        }
    }
    let (soft, _) = nvidia_sidecar::file_limit::raise(max_connections);
    if let Some(problem) = nvidia_sidecar::file_limit::problem((soft, soft), max_connections) {
        log::warn!("{problem}");
    }
    let app = match App::start(layers) {
        Ok(app) => app,
        Err(errors) => return rejected(errors),
    };
    let settings = app.settings();
    log::info!(
        "nvidia-sidecar {} starting: proxy {}:{} -> {}, {} rpm, {} upstream key(s), config {source}",
        env!("CARGO_PKG_VERSION"),
        settings.listen_host,
        settings.listen_port,
        settings.default_route.upstream,
        settings
            .default_route
            .bucket
            .as_ref()
            .map_or(0.0, |b| b.base_rpm),
        settings.upstream.keys.len(),
    );
    if settings
        .upstream
        .keys
        .iter()
        .all(|k| k.authorization.is_none())
    {
        log::info!(
            "no upstream API key configured: clients' own Authorization headers are forwarded"
        );
    }
    server::build(app, mode).run(pingora::server::RunArgs::default());
    log::logger().flush();
    ExitCode::SUCCESS
}
