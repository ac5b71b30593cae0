//! `orchctl`: parses the command line, runs the command and exits with the
//! code of its outcome (see `orchctl --help`).

use std::process::ExitCode;

use clap::Parser;
use orchestrator_cli::Cli;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match orchestrator_cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // A reader that went away (`orchctl list | head`) is not an error.
            if !err.is_broken_pipe() {
                eprintln!("error: {err}");
            }
            ExitCode::from(err.exit_code())
        }
    }
}
