//! `earshot-regional --config regional.toml`

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use earshot_regional::{Regional, RegionalConfig};
use tokio_util::sync::CancellationToken;

/// Whisper allocates and frees tensors of megabytes on every layer; glibc's
/// malloc returns such blocks to the kernel each time (page faults on every
/// reuse), mimalloc keeps them. See docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "earshot regional node: QUIC ingress, Redis Streams queue, Whisper workers"
)]
struct Args {
    /// Path of the region's TOML config.
    #[arg(long, env = "EARSHOT_REGIONAL_CONFIG")]
    config: PathBuf,
}

/// Exit code for bad configuration or usage (EX_USAGE).
const EX_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match RegionalConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("earshot-regional: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    earshot_common::telemetry::init(config.debug_content);
    let http_listen = config.http_listen;
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("earshot-regional: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let regional = match Regional::build(config, shutdown.clone()) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("earshot-regional: {e}");
                return ExitCode::from(EX_CONFIG);
            }
        };
        let quic_listen = match regional.quic_listen() {
            Ok(a) => a,
            Err(e) => {
                eprintln!("earshot-regional: {e}");
                return ExitCode::from(EX_CONFIG);
            }
        };
        let quic = match quic_listen.map(|addr| (addr, std::net::UdpSocket::bind(addr))) {
            None => None,
            Some((_, Ok(s))) => Some(s),
            Some((addr, Err(e))) => {
                eprintln!("earshot-regional: cannot bind QUIC on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let http = match tokio::net::TcpListener::bind(http_listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("earshot-regional: cannot listen on {http_listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        tokio::spawn(earshot_common::signals::cancel_on_signal(shutdown));
        match regional.serve(quic, http).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("earshot-regional: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
