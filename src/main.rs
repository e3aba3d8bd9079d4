//! Entry point: parse the command line, load the configuration, build the server, run.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use nvidia_sidecar::cli::Cli;
use nvidia_sidecar::{config, server, App};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let source = cli.conf.as_deref().unwrap_or("(embedded default)");
    let settings = match config::load(cli.conf.as_deref()) {
        Ok(settings) => settings,
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
    nvidia_sidecar::init_logging(&settings.log_level);
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
    server::build(App::new(settings), mode).run_forever()
}
