//! orchd's entry point: parse flags, set up logging, run until SIGINT or
//! SIGTERM.

use clap::Parser;
use orchestrator::auth::{TokenEntry, new_token};
use orchestrator::process;
use orchestrator_server::config::{Cli, Command, LogFormat, TokenCommand};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Token(TokenCommand::New {
        name,
        role,
        namespace,
    }) = &cli.command
    {
        // The token goes to stdout alone (for `TOKEN=$(...)`), the file
        // line to stderr, as a comment and an entry that can be appended
        // to the tokens file as they are.
        let token = new_token();
        let entry =
            TokenEntry::for_token(name, *role, namespace, &token).map_err(anyhow::Error::msg)?;
        println!("{token}");
        eprintln!(
            "# {name}: role {role}, namespace {namespace}; add the next line to the tokens file (--tokens-file)\n{}",
            entry.line()
        );
        return Ok(());
    }
    process::init_logs(cli.log_format == LogFormat::Json);
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        process::shutdown_signal().await;
        tracing::info!("shutting down");
        on_signal.cancel();
    });
    match cli.command {
        Command::Serve(config) => orchestrator_server::run(config, shutdown).await?,
        Command::Dev(config) => orchestrator_server::dev::run(config, shutdown).await?,
        Command::Token(_) => unreachable!("handled above"),
    }
    tracing::info!("orchd stopped");
    Ok(())
}
