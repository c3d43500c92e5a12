//! GeoDNS from the topology: the gdnsd configuration it renders, gdnsd run
//! as a process, and a DNS client that asks what a client subnet is
//! answered (EDNS client subnet, RFC 7871).
//!
//! Every edge is a gdnsd "datacenter" of one address, health-checked with
//! `http_status` on its `/readyz`. Each `[[geodns.clients]]` network maps to
//! its jurisdiction's edges only, in failover order, so when every EU edge
//! is down an EU client is still answered with an EU edge (gdnsd answers
//! the first of a list whose members are all down), never a US one.
//! Clients in no listed network get the default jurisdiction's edges first.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use earshot_common::topology::{GeoDns, Topology};

/// The gdnsd service type every edge is checked with.
const SERVICE: &str = "edge_readyz";

/// The geoip map and resource names in the rendered configuration.
const MAP: &str = "earshot";

/// The topology's `[geodns]`, or an error that says to add it.
pub fn settings(topology: &Topology) -> anyhow::Result<&GeoDns> {
    topology
        .geodns()
        .context("the topology has no [geodns] table: add one (see topology/local.toml)")
}

/// The fully qualified name clients resolve, e.g. `listen.earshot.test`.
pub fn client_name(g: &GeoDns) -> String {
    format!("{}.{}", g.name, g.zone)
}

/// gdnsd's `config` file for `topology`, with its run and state
/// directories under `dir`.
pub fn render_config(topology: &Topology, dir: &Path) -> anyhow::Result<String> {
    let g = settings(topology)?;
    let h = &g.health;
    let mut t = String::from("# Generated from the topology by earshot: do not edit.\n");
    let _ = write!(
        t,
        r#"options => {{
  listen => [ {listen} ]
  run_dir => "{run}"
  state_dir => "{state}"
  edns_client_subnet => true
}}
service_types => {{
  {SERVICE} => {{
    plugin => http_status
    port => {port}
    url_path => /readyz
    ok_codes => [ 200 ]
    interval => {interval}
    timeout => {timeout}
    down_thresh => {down}
    ok_thresh => {up}
    up_thresh => {up}
  }}
}}
plugins => {{
  geoip => {{
    maps => {{
      {MAP} => {{
        datacenters => [ {datacenters} ]
        nets => {{
"#,
        listen = g.listen,
        run = dir.join("run").display(),
        state = dir.join("state").display(),
        port = g.port,
        interval = h.interval_s,
        timeout = h.timeout_s,
        down = h.down_after,
        up = h.up_after,
        datacenters = datacenter_order(topology, g).join(", "),
    );
    for clients in &g.clients {
        let edges: Vec<&str> = topology
            .geodns_edges(clients)
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        for net in &clients.nets {
            let _ = writeln!(t, "          {net} => [ {} ]", edges.join(", "));
        }
    }
    let _ = write!(
        t,
        r#"        }}
      }}
    }}
    resources => {{
      {name} => {{
        map => {MAP}
        service_types => [ {SERVICE} ]
        dcmap => {{
"#,
        name = g.name,
    );
    for edge in topology.edges() {
        let address = edge.address.as_deref().unwrap_or_default();
        let _ = writeln!(t, "          {0} => {{ {0} => {address} }}", edge.name);
    }
    t.push_str("        }\n      }\n    }\n  }\n}\n");
    Ok(t)
}

/// The default order of datacenters (edges): the default jurisdiction's
/// edges first, as gdnsd answers unlisted clients in this order.
fn datacenter_order<'a>(topology: &'a Topology, g: &GeoDns) -> Vec<&'a str> {
    let mut order: Vec<&str> = topology
        .edges_for(&g.default)
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    for edge in topology.edges() {
        if edge.jurisdiction != g.default {
            order.push(&edge.name);
        }
    }
    order
}

/// The zone file: the client name answered dynamically by the geoip
/// resource, with the topology's TTL.
pub fn render_zone(topology: &Topology) -> anyhow::Result<String> {
    let g = settings(topology)?;
    let ns = g.listen.parse::<SocketAddr>()?.ip();
    Ok(format!(
        "; Generated from the topology by earshot: do not edit.\n\
         $TTL {ttl}\n\
         @ SOA ns1 hostmaster 1 7200 1800 259200 {ttl}\n\
         @ NS ns1\n\
         ns1 {kind} {ns}\n\
         {name} {ttl} DYNA geoip!{name}\n",
        ttl = g.ttl,
        kind = if ns.is_ipv4() { "A" } else { "AAAA" },
        name = g.name,
    ))
}

/// Writes gdnsd's configuration directory for `topology` into `dir`
/// (`config`, `zones/<zone>`, `run/`, `state/`).
pub fn write_config(topology: &Topology, dir: &Path) -> anyhow::Result<()> {
    let g = settings(topology)?;
    for sub in ["zones", "run", "state"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    std::fs::write(dir.join("config"), render_config(topology, dir)?)?;
    std::fs::write(dir.join("zones").join(&g.zone), render_zone(topology)?)?;
    Ok(())
}

/// gdnsd serving the topology's zone, as a child process (stopped on drop).
pub struct Gdnsd {
    child: Child,
    pub listen: SocketAddr,
    pub log: PathBuf,
}

impl Gdnsd {
    /// Writes the configuration into `dir`, checks it with `gdnsd
    /// checkconf` and starts `gdnsd start` (logging to `log`); returns once
    /// it answers queries for the client name.
    pub async fn start(topology: &Topology, dir: &Path, log: &Path) -> anyhow::Result<Gdnsd> {
        let g = settings(topology)?;
        write_config(topology, dir)?;
        let program = gdnsd_binary()?;
        let check = Command::new(&program)
            .arg("-c")
            .arg(dir)
            .arg("checkconf")
            .output()
            .with_context(|| format!("cannot run {}", program.display()))?;
        if !check.status.success() {
            bail!(
                "gdnsd rejected the rendered configuration in {}:\n{}",
                dir.display(),
                String::from_utf8_lossy(&check.stderr)
            );
        }
        let out = std::fs::File::create(log)?;
        let child = Command::new(&program)
            .arg("-c")
            .arg(dir)
            .arg("start")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        let mut gdnsd = Gdnsd {
            child,
            listen: g.listen.parse()?,
            log: log.to_owned(),
        };
        let name = client_name(g);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = gdnsd.child.try_wait()? {
                bail!(
                    "gdnsd exited ({status}) at start; its log ends:\n{}",
                    crate::cluster::log_tail(&std::fs::read_to_string(log).unwrap_or_default(), 10)
                );
            }
            if query(gdnsd.listen, &name, None).await.is_ok() {
                return Ok(gdnsd);
            }
            if Instant::now() > deadline {
                bail!("gdnsd on {} did not answer within 20 s", gdnsd.listen);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, and a bounded wait for the exit.
    pub fn stop(&mut self) {
        crate::processes::terminate(&mut self.child, Duration::from_secs(5));
    }
}

impl Drop for Gdnsd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// gdnsd from the PATH or Debian's `/usr/sbin`.
pub fn gdnsd_binary() -> anyhow::Result<PathBuf> {
    let sbin = PathBuf::from("/usr/sbin/gdnsd");
    if sbin.exists() {
        return Ok(sbin);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("gdnsd"))
        .find(|p| p.exists())
        .context("gdnsd is not installed: run `make setup` (it installs Debian's gdnsd)")
}

/// What a DNS server answered for a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub addresses: Vec<IpAddr>,
    pub ttl: Option<u32>,
    /// The scope prefix the server returned for the client subnet (how
    /// much of it decided the answer), when the query carried one.
    pub scope: Option<u8>,
}

/// Asks `server` (UDP) for the A and AAAA addresses of `name`, as a
/// resolver would for a client in `subnet` (`address/prefix`, sent as EDNS
/// client subnet). Fails on a timeout (2 s) or an error response.
pub async fn query(server: SocketAddr, name: &str, subnet: Option<&str>) -> anyhow::Result<Answer> {
    use hickory_proto::op::{Edns, Message, Query};
    use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
    use hickory_proto::rr::{Name, RData, RecordType};
    use std::str::FromStr;

    let qname = Name::from_str(name).with_context(|| format!("{name:?} is not a DNS name"))?;
    let mut message = Message::query();
    message.add_query(Query::query(qname, RecordType::A));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    if let Some(subnet) = subnet {
        let subnet = ClientSubnet::from_str(subnet).map_err(|e| {
            anyhow::anyhow!("client subnet {subnet:?}: {e} (expected e.g. 10.1.0.0/16)")
        })?;
        edns.options_mut().insert(EdnsOption::Subnet(subnet));
    }
    message.set_edns(edns);
    let id = message.metadata.id;
    let bytes = message.to_vec()?;

    let bind = if server.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    };
    let socket = tokio::net::UdpSocket::bind(bind).await?;
    socket.connect(server).await?;
    socket.send(&bytes).await?;
    let mut buf = vec![0u8; 4096];
    let response = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let n = socket.recv(&mut buf).await?;
            match Message::from_vec(&buf[..n]) {
                Ok(m) if m.metadata.id == id => return anyhow::Ok(m),
                _ => continue,
            }
        }
    })
    .await
    .with_context(|| format!("no answer from {server} within 2 s"))??;
    let code = response.metadata.response_code;
    if code != hickory_proto::op::ResponseCode::NoError {
        bail!("{server} answered {name} with {code}");
    }
    let mut addresses = Vec::new();
    let mut ttl = None;
    for record in &response.answers {
        match &record.data {
            RData::A(a) => addresses.push(IpAddr::V4(a.0)),
            RData::AAAA(a) => addresses.push(IpAddr::V6(a.0)),
            _ => continue,
        }
        ttl = Some(record.ttl);
    }
    let scope = response.edns.as_ref().and_then(|e| {
        match e
            .options()
            .get(hickory_proto::rr::rdata::opt::EdnsCode::Subnet)
        {
            Some(EdnsOption::Subnet(s)) => Some(s.scope_prefix()),
            _ => None,
        }
    });
    Ok(Answer {
        addresses,
        ttl,
        scope,
    })
}

/// The `/v1/listen` URL a client in `subnet` is sent to: the first address
/// `server` answers for the client name, on the edges' port.
pub async fn edge_url(server: SocketAddr, g: &GeoDns, subnet: &str) -> anyhow::Result<String> {
    let answer = query(server, &client_name(g), Some(subnet)).await?;
    let ip = answer.addresses.first().with_context(|| {
        format!(
            "{server} gave no address for {} to {subnet}",
            client_name(g)
        )
    })?;
    Ok(format!("ws://{}/v1/listen", SocketAddr::new(*ip, g.port)))
}

/// The edges of `topology` whose address is in `answer`, in answer order.
pub fn answered_edges(topology: &Topology, answer: &Answer) -> Vec<String> {
    answer
        .addresses
        .iter()
        .map(|a| {
            topology
                .edges()
                .iter()
                .find(|e| e.address.as_deref().and_then(|x| x.parse().ok()) == Some(*a))
                .map_or_else(|| a.to_string(), |e| e.name.clone())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> Topology {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../topology/local.toml");
        Topology::load(&path).unwrap()
    }

    #[test]
    fn eu_networks_map_only_to_eu_edges_and_unlisted_clients_to_the_default() {
        let config = render_config(&local(), Path::new("/run/x")).unwrap();
        assert!(
            config.contains("10.1.0.0/16 => [ edge-eu-1, edge-eu-2 ]"),
            "{config}"
        );
        assert!(
            config.contains("192.0.2.0/24 => [ edge-eu-1, edge-eu-2 ]"),
            "{config}"
        );
        assert!(config.contains("10.2.0.0/16 => [ edge-us ]"), "{config}");
        assert!(
            config.contains("datacenters => [ edge-us, edge-eu-1, edge-eu-2 ]"),
            "{config}"
        );
        assert!(
            config.contains("edge-eu-2 => { edge-eu-2 => 127.0.1.2 }"),
            "{config}"
        );
        assert!(config.contains("interval => 2\n"), "{config}");
        assert!(config.contains("down_thresh => 2\n"), "{config}");
        assert!(config.contains("listen => [ 127.0.0.1:5353 ]"), "{config}");
        assert!(config.contains("run_dir => \"/run/x/run\""), "{config}");
    }

    #[test]
    fn the_zone_answers_the_client_name_dynamically_with_the_ttl() {
        let zone = render_zone(&local()).unwrap();
        assert!(zone.contains("$TTL 5\n"), "{zone}");
        assert!(zone.contains("listen 5 DYNA geoip!listen\n"), "{zone}");
        assert!(zone.contains("ns1 A 127.0.0.1\n"), "{zone}");
    }

    #[test]
    fn answers_name_their_edges() {
        let answer = Answer {
            addresses: vec!["127.0.1.2".parse().unwrap(), "192.0.2.9".parse().unwrap()],
            ttl: Some(5),
            scope: Some(16),
        };
        assert_eq!(
            answered_edges(&local(), &answer),
            ["edge-eu-2", "192.0.2.9"]
        );
    }
}
