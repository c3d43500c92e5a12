//! A throwaway `redis-server` on a free loopback port, for tests and the
//! demo, persistent like a production one: append-only file on, fsync on
//! every write (`appendfsync always`), so an entry the ingress was told is
//! queued survives `kill -9` of Redis. Killed when dropped.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: std::path::PathBuf,
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// redis-server's arguments: loopback `port`, no snapshots, every write in
/// the append-only file under `dir` before it is acknowledged.
pub fn args(port: u16, dir: &Path) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = [
        "--bind",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--save",
        "",
        "--protected-mode",
        "yes",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
    ]
    .iter()
    .map(Into::into)
    .collect();
    args.push(dir.into());
    args
}

impl RedisServer {
    /// Starts redis-server with its append-only file in `dir`, and waits
    /// until it answers PING.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut server = RedisServer {
            child: None,
            port: free_port()?,
            dir: dir.to_owned(),
        };
        server.restart()?;
        Ok(server)
    }

    /// Starts the server again (after [`RedisServer::stop`]) on the same port and files: what was
    /// acknowledged before is there again.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let child = Command::new("redis-server")
            .args(args(self.port, &self.dir))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server: install it with `make setup` (Debian package redis-server)")?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(10))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let client = redis::Client::open(self.url())?;
        loop {
            if let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(200))
                && redis::cmd("PING").query::<String>(&mut conn).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "redis-server on port {} did not answer within {within:?}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server now with SIGKILL (to test behaviour while Redis is
    /// down).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
