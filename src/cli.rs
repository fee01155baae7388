//! The `tollgate` command line: `serve`, `check-config` and `bootstrap`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::{lifecycle, server, store};

/// Tollgate: an authentication gateway.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and print every error with its YAML path.
    CheckConfig {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Create an org's first admin user and print their token (once).
    Bootstrap {
        /// The YAML config file (for the store and argon2 settings).
        #[arg(long, short)]
        config: PathBuf,
        /// The org to create or use.
        #[arg(long)]
        org: String,
        /// The admin's email.
        #[arg(long)]
        email: String,
    },
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| anyhow::anyhow!("invalid config {}:\n{e}", path.display()))
}

fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs the command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => {
            let config = load(&config)?;
            init_logging(&config.log_level);
            server::run(config)
        }
        Command::CheckConfig { config: path } => {
            let config = load(&path)?;
            println!("{}: ok ({} routes)", path.display(), config.routes.iter().count());
            Ok(())
        }
        Command::Bootstrap { config, org, email } => {
            let config = load(&config)?;
            init_logging("warn");
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let store = store::open(&config.store)?;
                let (user, token) = lifecycle::bootstrap(&store, config.argon2.params, &org, &email)
                    .await
                    .with_context(|| format!("bootstrapping org {org:?}"))?;
                println!("Created admin user {email:?} ({}) in org {org:?}.", user.id);
                println!("Access token: {}", token.token);
                println!("Store it now: it will not be shown again.");
                Ok(())
            })
        }
    }
}
