//! `earshot udp-proxy`: relays UDP datagrams between peers on one address
//! and a server on another, each peer through its own upstream socket (so
//! the server sees one source per peer, as QUIC expects).
//!
//! `earshot up` puts one between every edge and each region it dials; the
//! `partition` drill kills it (the path goes dark: QUIC sees silence, not
//! an error, as with a real partition) and starts it again on the same
//! port to heal it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Peers relayed at once; datagrams from more are dropped (and logged).
pub const MAX_PEERS: usize = 256;

/// Relays between `listen` and `server` until `shutdown`.
pub async fn run(
    listen: SocketAddr,
    server: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let front = Arc::new(UdpSocket::bind(listen).await?);
    tracing::info!(%listen, %server, "udp proxy relaying");
    let mut peers: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, peer) = tokio::select! {
            r = front.recv_from(&mut buf) => match r {
                Ok(r) => r,
                // ICMP errors surface here on Linux; the relay goes on.
                Err(e) => {
                    tracing::debug!(error = %e, "udp proxy: receive failed");
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let upstream = match peers.get(&peer) {
            Some(u) => u.clone(),
            None => {
                if peers.len() >= MAX_PEERS {
                    tracing::warn!(%peer, "udp proxy: at its peer limit; datagram dropped");
                    continue;
                }
                let bind = if server.is_ipv4() {
                    "127.0.0.1:0"
                } else {
                    "[::1]:0"
                };
                let upstream = Arc::new(UdpSocket::bind(bind).await?);
                upstream.connect(server).await?;
                peers.insert(peer, upstream.clone());
                let (up, front, token) = (upstream.clone(), front.clone(), shutdown.child_token());
                let span = tracing::info_span!("udp_relay", %peer);
                tasks.spawn(
                    async move {
                        let mut buf = vec![0u8; 65_535];
                        loop {
                            let n = tokio::select! {
                                r = up.recv(&mut buf) => match r {
                                    Ok(n) => n,
                                    Err(_) => continue,
                                },
                                _ = token.cancelled() => return,
                            };
                            let _ = front.send_to(&buf[..n], peer).await;
                        }
                    }
                    .instrument(span),
                );
                upstream
            }
        };
        let _ = upstream.send(&buf[..n]).await;
    }
    tasks.shutdown().await;
    Ok(())
}
