//! Entry point: parse the command line, load the configuration, build the server, run.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use nvidia_sidecar::cli::Cli;
use nvidia_sidecar::{config, server, App};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let source = cli.conf.as_deref().unwrap_or("(embedded default)");
    let loaded = config::read_file(cli.conf.as_deref()).and_then(|file| {
        let settings = config::validate_with_env(&file)?;
        Ok((file, settings))
    });
    let (file, settings) = match loaded {
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
    let layers = config::ConfigLayers {
        path: cli.conf.clone(),
        file,
        overrides: config::Overrides::default(),
    };
    match server::build(App::new(layers, settings), mode) {
        Ok(server) => server.run_forever(),
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(1)
        }
    }
}
