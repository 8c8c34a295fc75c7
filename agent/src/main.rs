//! The `mycel` binary: parses the command line, sets up logging and the runtime, and calls
//! into the library.

use clap::Parser as _;
use mycel_agent::{
    cli::{self, Cli, Command},
    config::{self, Config},
};

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|e| {
        eprintln!("invalid --log {:?}: {e}", cli.log);
        std::process::exit(config::EXIT_USAGE);
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mycel: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };

    let result = match &cli.command {
        Command::Agent(args) => {
            let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
            let cfg = match Config::from_args(args, &mounts) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("mycel: {e}");
                    std::process::exit(config::EXIT_USAGE);
                }
            };
            runtime.block_on(mycel_agent::app::run(cfg))
        }
        Command::Status(args) => runtime.block_on(cli::status(args)),
        Command::Services(args) => runtime.block_on(cli::services(args)),
        Command::Flows(args) => runtime.block_on(cli::flows(args)),
    };
    if let Err(e) = result {
        eprintln!("mycel: {e:#}");
        std::process::exit(1);
    }
}
