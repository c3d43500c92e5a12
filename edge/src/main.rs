//! `earshot-edge --config edge.toml`

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use earshot_edge::{Edge, EdgeConfig};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "earshot edge node: client WebSocket, VAD, QUIC uplink"
)]
struct Args {
    /// Path of the edge's TOML config.
    #[arg(long, env = "EARSHOT_EDGE_CONFIG")]
    config: PathBuf,
}

/// Exit code for bad configuration or usage (EX_USAGE).
const EX_CONFIG: u8 = 64;

fn main() -> ExitCode {
    // Candle (live partials) would otherwise run its kernels on every core
    // from each partials thread: one core per partials thread, so that
    // `partials.threads` is what partials may take from the VAD.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        #[allow(unsafe_code)]
        // SAFETY: no other thread exists yet (nothing has been spawned:
        // the runtime starts below), so nothing reads the environment
        // concurrently.
        unsafe {
            std::env::set_var("RAYON_NUM_THREADS", "1");
        }
    }
    let args = Args::parse();
    let config = match EdgeConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("earshot-edge: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    earshot_common::telemetry::init(config.debug_content);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("earshot-edge: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let listen = config.listen;
        let edge = match Edge::build(config, shutdown.clone()) {
            Ok(edge) => edge,
            Err(e) => {
                eprintln!("earshot-edge: {e}");
                return ExitCode::from(EX_CONFIG);
            }
        };
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("earshot-edge: cannot listen on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        tokio::spawn(earshot_common::signals::cancel_on_signal(shutdown));
        match edge.serve(listener).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("earshot-edge: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
