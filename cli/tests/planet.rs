//! The planet of `topology/local.toml` (`earshot up`, on free ports): three
//! regions with Redis, sync agents and the model published through the
//! embedded S3 registry, three edges on their own loopback addresses, and
//! gdnsd. Asked with real DNS clients (`dig +subnet` and hickory).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use earshot_cli::client::{self, StreamOptions, Transcript};
use earshot_cli::cluster::metric;
use earshot_cli::geodns;
use earshot_cli::planet::{Planet, PlanetOptions, with_free_ports};
use earshot_cli::{assets, speech};
use earshot_common::client::ClientErrorCode;
use earshot_common::receipt::ReceiptVerifier;

/// Each test runs a planet of 20-odd processes: one at a time on two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const EU: &str = "10.1.0.0/16";
const US: &str = "10.2.0.0/16";

async fn start(dir: &Path) -> Planet {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../topology/local.toml");
    let text = with_free_ports(&std::fs::read_to_string(local).unwrap()).unwrap();
    let topology = dir.join("topology.toml");
    std::fs::write(&topology, text).unwrap();
    Planet::start(&PlanetOptions {
        topology,
        run_dir: dir.join("run"),
        model: assets::real_model("whisper-tiny.en").unwrap(),
        workers: 1,
    })
    .await
    .unwrap()
}

/// `dig +short +subnet=<subnet>` against the planet's gdnsd.
fn dig(dns: SocketAddr, name: &str, subnet: &str) -> Vec<IpAddr> {
    let out = Command::new("dig")
        .args(["+short", "+tries=1", "+time=2"])
        .arg(format!("+subnet={subnet}"))
        .arg(format!("@{}", dns.ip()))
        .args(["-p", &dns.port().to_string(), name])
        .output()
        .expect("dig is installed by make setup (dnsutils)");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

fn edge_ip(planet: &Planet, edge: &str) -> IpAddr {
    let e = planet.topology.edge(edge).unwrap();
    e.address.as_deref().unwrap().parse().unwrap()
}

async fn stream(url: &str, pcm: &[u8]) -> Transcript {
    let options = StreamOptions {
        chunk_bytes: 3200,
        pace: None,
    };
    client::stream(url, pcm, options, |_| {}).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geodns_moves_eu_clients_to_the_other_eu_edge_and_eu_audio_never_leaves_the_eu() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut planet = start(dir.path()).await;
    let g = planet.topology.geodns().unwrap().clone();
    let name = geodns::client_name(&g);
    let dns = planet.dns();
    let (eu1, eu2, us) = (
        edge_ip(&planet, "edge-eu-1"),
        edge_ip(&planet, "edge-eu-2"),
        edge_ip(&planet, "edge-us"),
    );
    assert_eq!(dig(dns, &name, EU), [eu1]);
    assert_eq!(dig(dns, &name, US), [us]);

    // An EU client, sent where GeoDNS says, is answered in the EU, and its
    // receipts say so.
    let said =
        speech::synthesize(&[earshot_cli::demo::SENTENCES[2]], 1.0, 0.5, dir.path()).unwrap();
    let pcm: Vec<u8> = said.samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    let verifier = ReceiptVerifier::load(&planet.ca, planet.topology.clone()).unwrap();
    let url = geodns::edge_url(dns, &g, EU).await.unwrap();
    let first = stream(&url, &pcm).await;
    assert_eq!(first.finals().len(), 1, "{:?}", first.errors());
    for f in first.finals() {
        verifier.verify(f, Some("eu")).unwrap();
    }

    // edge-eu-1 drains (SIGTERM): EU clients move to edge-eu-2, never to
    // the US edge; US clients keep theirs.
    planet
        .terminate("edge-eu-1", Duration::from_secs(30))
        .unwrap();
    let down_at = Instant::now();
    let mut seen = Vec::new();
    loop {
        let answer = geodns::query(dns, &name, Some(EU)).await.unwrap();
        assert!(
            !answer.addresses.contains(&us),
            "EU client sent to the US edge: {answer:?}"
        );
        seen.extend(answer.addresses.iter().copied());
        if answer.addresses == [eu2] {
            break;
        }
        assert!(
            down_at.elapsed() < Duration::from_secs(30),
            "still {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "EU answers moved to edge-eu-2 {:.1} s after edge-eu-1 went down (health interval {} s × {})",
        down_at.elapsed().as_secs_f64(),
        g.health.interval_s,
        g.health.down_after
    );
    assert_eq!(dig(dns, &name, EU), [eu2]);
    assert_eq!(dig(dns, &name, US), [us]);
    let url = geodns::edge_url(dns, &g, EU).await.unwrap();
    assert!(url.contains(&eu2.to_string()), "{url}");
    let moved = stream(&url, &pcm).await;
    assert_eq!(moved.finals().len(), 1, "{:?}", moved.errors());

    // Both EU regions down: EU audio is refused with `unavailable`, and
    // us-east never receives a stream of an EU session.
    planet.kill("eu-west").unwrap();
    planet.kill("eu-central").unwrap();
    let refused = stream(&url, &pcm).await;
    assert!(refused.finals().is_empty(), "{:?}", refused.finals());
    let errors = refused.errors();
    assert!(!errors.is_empty());
    for e in &errors {
        assert_eq!(e.code, ClientErrorCode::Unavailable, "{e:?}");
        assert!(e.retry_after.is_some(), "{e:?}");
    }
    let us_east = planet.metrics("us-east").await.unwrap();
    assert_eq!(
        metric(
            &us_east,
            r#"earshot_regional_received_total{jurisdiction="eu"}"#
        ),
        Some(0.0),
        "{us_east}"
    );
    // While US clients are still served by us-east.
    let url = geodns::edge_url(dns, &g, US).await.unwrap();
    let american = stream(&url, &pcm).await;
    assert_eq!(american.finals().len(), 1, "{:?}", american.errors());
    assert_eq!(american.finals()[0].region, "us-east");
    let us_east = planet.metrics("us-east").await.unwrap();
    assert_eq!(
        metric(
            &us_east,
            r#"earshot_regional_received_total{jurisdiction="us"}"#
        ),
        Some(1.0)
    );
    assert!(planet.stop().is_empty());
}

/// A short version of every drill scenario, one after the other on one
/// planet, through the control API as `earshot drill` uses it: each must
/// report 0 lost, 0 duplicated and 0 residency violations, and write its
/// report and a plot naming every region. Times are printed, not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_drill_scenario_loses_duplicates_and_leaks_nothing() {
    use earshot_cli::drill::{self, DrillOptions, Scenario, Target};
    use tokio_util::sync::CancellationToken;

    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let planet = start(dir.path()).await;
    let run_dir = planet.run_dir.clone();
    let regions: Vec<String> = planet
        .topology
        .regions()
        .iter()
        .map(|r| r.name.clone())
        .collect();
    let shared = std::sync::Arc::new(tokio::sync::Mutex::new(planet));
    let shutdown = CancellationToken::new();
    let (_, server) = earshot_cli::up::start_control(shared.clone(), shutdown.clone())
        .await
        .unwrap();
    let target = Target::open(&run_dir).unwrap();
    let options = DrillOptions {
        before: Duration::from_secs(7),
        during: Duration::from_secs(4),
        after: Duration::from_secs(5),
        eu_clients: 2,
        us_clients: 1,
        sentences_per_session: 2,
        flaps: 2,
        flap_half: Duration::from_secs(2),
        progress: false,
        ..DrillOptions::default()
    };
    let scenarios = [
        ("region-down", vec!["eu-west"]),
        ("redis-down", vec!["eu-west"]),
        ("worker-kill", vec!["eu-west"]),
        ("edge-down", vec!["edge-eu-1"]),
        ("partition", vec!["edge-eu-1", "eu-west"]),
        ("az-flap", vec!["eu-west"]),
    ];
    for (name, targets) in scenarios {
        let targets: Vec<String> = targets.into_iter().map(str::to_owned).collect();
        let scenario = Scenario::parse(name, &targets).unwrap();
        let report = drill::run(&target, &scenario, &options, &dir.path().join("speech"))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let out = dir.path().join("drills").join(name);
        drill::write(&report, &out).unwrap();
        eprintln!(
            "{}: sent {} finals {} errors {:?} recovery max {:?} s",
            report.title, report.sent, report.finals, report.errors, report.recovery_max_s
        );
        assert!(
            report.sent > 0 && report.finals > 0,
            "{}",
            drill::markdown(&report)
        );
        assert_eq!(report.lost, 0, "{}", drill::markdown(&report));
        assert_eq!(report.duplicated, 0, "{}", drill::markdown(&report));
        assert_eq!(
            report.residency_violations,
            0,
            "{}",
            drill::markdown(&report)
        );
        // EU clients are only ever served in the EU.
        assert_eq!(report.served.get("us-east").and_then(|m| m.get("eu")), None);
        let svg = std::fs::read_to_string(out.join("timeline.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for region in &regions {
            assert!(
                svg.contains(&format!(">{region}</text>")),
                "{name}: plot lacks {region}"
            );
        }
        assert!(out.join("report.json").is_file() && out.join("report.md").is_file());
        // Everything broken came back.
        let p = shared.lock().await;
        for process in p.names() {
            assert!(p.is_running(&process), "{name}: {process} was not restored");
        }
    }
    shutdown.cancel();
    server.await.unwrap().unwrap();
    let planet = std::sync::Arc::try_unwrap(shared)
        .ok()
        .unwrap()
        .into_inner();
    assert!(planet.stop().is_empty());
}

/// The commands as an SRE types them: `earshot up --detach`, `earshot dns`,
/// a short `earshot drill` against it, `earshot down` — every process of
/// the planet gone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn earshot_up_detach_dns_drill_and_down_from_the_command_line() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../topology/local.toml");
    let topology = dir.path().join("topology.toml");
    std::fs::write(
        &topology,
        with_free_ports(&std::fs::read_to_string(local).unwrap()).unwrap(),
    )
    .unwrap();
    let run_dir = dir.path().join("run");
    let earshot = assets::binary("earshot").unwrap();
    let cli = |args: &[&str]| {
        let out = Command::new(&earshot)
            .args(args)
            .args(["--run-dir".as_ref(), run_dir.as_os_str()])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, out) = cli(&["up", "--detach", "--topology", topology.to_str().unwrap()]);
    assert!(ok, "{out}");
    for process in [
        "s3",
        "redis-eu-west",
        "eu-central-worker",
        "edge-us",
        "gdnsd",
    ] {
        assert!(out.contains(process), "the table lacks {process}:\n{out}");
    }
    let run = earshot_cli::planet::RunFile::read(&run_dir).unwrap();
    let alive = earshot_cli::processes::alive;
    assert!(run.processes.len() >= 20, "{:?}", run.processes);
    assert!(run.processes.iter().all(|p| alive(p.pid)));

    let (ok, out) = cli(&["dns", "10.1.0.0/16"]);
    assert!(ok && out.contains("edge-eu-1"), "{out}");
    let (ok, out) = cli(&["dns", "10.2.0.0/16"]);
    assert!(ok && out.contains("edge-us"), "{out}");

    let report = dir.path().join("report");
    let (ok, out) = cli(&[
        "drill",
        "worker-kill",
        "eu-central",
        "--before",
        "5",
        "--during",
        "2",
        "--after",
        "3",
        "--eu-clients",
        "1",
        "--us-clients",
        "1",
        "--out",
        report.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("# Drill: worker-kill eu-central — PASS"),
        "{out}"
    );
    assert!(report.join("timeline.svg").is_file());

    // The drill restarted what it killed: up.json has its new pid.
    let run = earshot_cli::planet::RunFile::read(&run_dir).unwrap();
    assert!(
        run.processes.iter().all(|p| alive(p.pid)),
        "{:?}",
        run.processes
    );
    let (ok, out) = cli(&["down"]);
    assert!(ok, "{out}");
    assert!(!alive(run.pid), "earshot up still runs");
    for p in &run.processes {
        assert!(
            !alive(p.pid),
            "{} (pid {}) still runs after earshot down",
            p.name,
            p.pid
        );
    }
}
