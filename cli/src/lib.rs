//! `orchctl`, the command-line client of the orchestrator, as a library:
//! [`run`] executes a parsed [`Cli`] against orchd and returns a
//! [`CliError`] whose [`CliError::exit_code`] is the process exit code.
//!
//! The binary (`main.rs`) only parses the arguments, calls [`run`] and maps
//! the error to an exit code; tests call [`run_to`] with their own writer.

pub mod args;
pub mod bench;
pub mod client;
pub mod commands;
pub mod exit;
pub mod output;
pub mod request;

use std::io::Write;

pub use args::{Cli, Command, OutputFormat};
pub use exit::CliError;

/// Runs one command, printing its output on stdout.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    run_to(cli, &mut std::io::stdout()).await
}

/// Runs one command, printing its output on `out` (errors are returned, not
/// printed).
pub async fn run_to(cli: Cli, out: &mut impl Write) -> Result<(), CliError> {
    let global = commands::Global {
        server: cli.server,
        token: cli.token,
        tls: orchestrator::tls::ClientTls {
            ca_cert: cli.ca_cert,
            client_cert: cli.client_cert,
            client_key: cli.client_key,
        },
        output: cli.output,
    };
    let result = match &cli.command {
        Command::Submit(args) => commands::submit(&global, args, out).await,
        Command::Status(args) => commands::status(&global, args, out).await,
        Command::Cancel(args) => commands::cancel(&global, args, out).await,
        Command::List(args) => commands::list(&global, args, out).await,
        Command::Watch(args) => commands::watch(&global, args, out).await,
        Command::Bench(args) => crate::bench::bench(&global, args, out).await,
    };
    result.map_err(|err| with_tls_hint(err, &global))
}

/// A server that drops the connection right after connecting usually wants
/// something this client did not do: TLS (plain text to a TLS port), or a
/// client certificate (TLS 1.3 servers refuse a missing one only after the
/// handshake, so the client sees a broken connection, not an alert).
fn with_tls_hint(err: CliError, global: &commands::Global) -> CliError {
    let CliError::Rpc(status) = &err else {
        return err;
    };
    if status.code() != tonic::Code::Unavailable
        || !status.message().starts_with(exit::CONNECTION_FAILED)
    {
        return err;
    }
    let https = client::normalize_server(&global.server).starts_with("https://");
    let hint = if !https {
        "if orchd serves TLS, use an https:// --server URL (and --ca-cert for a private CA)"
    } else if global.tls.client_cert.is_none() {
        "if orchd requires client certificates (--client-ca), pass --client-cert and --client-key"
    } else {
        "orchd may not accept this client certificate: is it signed by orchd's --client-ca?"
    };
    CliError::Rpc(tonic::Status::unavailable(format!(
        "{} ({hint})",
        status.message()
    )))
}
