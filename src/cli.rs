//! The command line: `nvidia-sidecar [-c FILE] [-t|--test] [-d|--daemon] [-u|--upgrade] [--version]`.

use clap::Parser;

/// Egress proxy that lets many clients share one quota-limited upstream API.
#[derive(Debug, Parser)]
#[command(name = "nvidia-sidecar", version, about)]
pub struct Cli {
    /// Configuration file (YAML). Without it the embedded default configuration is used.
    #[arg(short = 'c', long = "conf", value_name = "FILE")]
    pub conf: Option<String>,
    /// Check the configuration, print every problem, and exit (0 valid, 1 invalid).
    #[arg(short = 't', long = "test")]
    pub test: bool,
    /// Run in the background.
    #[arg(short = 'd', long = "daemon")]
    pub daemon: bool,
    /// Take over the listeners of the running instance (graceful upgrade).
    #[arg(short = 'u', long = "upgrade")]
    pub upgrade: bool,
}
