//! The `quad` binary: anyhow at the edge, exit codes that mean something (see `cli::exit`).
use std::io::IsTerminal;
use std::sync::atomic::Ordering;

use clap::Parser;
use quad::cli::{exit, Cli};
use quad::error::{SpecError, StateError};
use tracing_subscriber::EnvFilter;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let handler = ctrlc::set_handler(|| {
        if quad::dataflow::STOP.swap(true, Ordering::SeqCst) {
            std::process::exit(exit::INTERRUPTED);
        }
        eprintln!("stopping: finishing the epochs in flight (press Ctrl-C again to abort)");
    });
    if let Err(e) = handler {
        tracing::warn!("cannot install the Ctrl-C handler: {e}");
    }
    let cli = Cli::parse();
    let code = match quad::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            if err.downcast_ref::<SpecError>().is_some()
                || matches!(
                    err.downcast_ref::<StateError>(),
                    Some(StateError::SpecChanged { .. } | StateError::Layout { .. })
                )
            {
                exit::USAGE
            } else {
                exit::FAILED
            }
        }
    };
    std::process::exit(code);
}
