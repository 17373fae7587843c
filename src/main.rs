//! `deftfs`: parse the command line and run it.

use clap::Parser;

fn main() -> std::process::ExitCode {
    deftfs::daemon::limit_malloc_arenas();
    let cli = deftfs::cli::Cli::parse();
    match deftfs::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deftfs: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
