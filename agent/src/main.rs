//! The `mycel` binary: parses the command line, sets up logging and the runtime, and calls
//! into the library.

use clap::Parser as _;
use mycel_agent::{
    cli::{self, Cli, Command},
    config::{self, Config},
};

fn main() {
    limit_malloc_arenas();
    let cli = Cli::parse();
    // One TLS crypto provider for the whole process (aws-lc-rs), before anything builds a
    // TLS configuration.
    mycel_agent::identity::crypto::install_process_default();
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
        Command::Ca(args) => cli::ca(args),
        Command::IdentityServer(args) => runtime.block_on(cli::identity_server(args)),
        Command::Uninstall(args) => cli::uninstall(args),
    };
    if let Err(e) = result {
        eprintln!("mycel: {e:#}");
        std::process::exit(1);
    }
}

/// glibc gives threads that contend for the allocator arenas of their own (up to 8 per
/// core) and keeps what is freed in each. The agent allocates most while it lists the
/// cluster, on the runtime's threads; with an arena per thread, the memory of the list
/// phase stays reserved several times over. Measured with `cargo xtask bench
/// controlplane` (10,000 services, 100,000 endpoints, 20,000 pods): 174 MiB RSS with
/// glibc's default, 162 MiB with two arenas, 143 MiB with one, and the same change → map
/// latency (the agent's two worker threads rarely allocate at the same moment).
/// `MALLOC_ARENA_MAX` in the environment still wins: glibc reads it first.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; it is called before any thread
        // is started, as glibc requires for M_ARENA_MAX to take effect reliably.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}
