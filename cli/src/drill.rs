//! `earshot drill <scenario>`: breaks one part of a running planet (`earshot
//! up`) through its control API while EU and US clients stream speech,
//! restores it, and reports what the clients saw: lost, duplicated and
//! residency-violating finals (each must be 0), time until finals flow
//! again for the affected clients, word error rate and latency before,
//! during and after, DNS answers, and who served whom — with a timeline
//! plot (SVG).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use earshot_common::receipt::ReceiptVerifier;
use earshot_common::topology::Topology;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::loadtest::{self, LoadConfig, Outcome, Record, Summary};
use crate::planet::{RunFile, proxy_name};
use crate::{geodns, up};

/// What a drill breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "scenario", rename_all = "kebab-case")]
pub enum Scenario {
    /// `kill -9` of every process of the region (node, workers, sync agent,
    /// Redis).
    RegionDown { region: String },
    /// `kill -9` of the region's Redis.
    RedisDown { region: String },
    /// `kill -9` of the region's worker process.
    WorkerKill { region: String },
    /// SIGTERM of an edge (it drains; its clients reconnect through GeoDNS).
    EdgeDown { edge: String },
    /// The UDP path between an edge and a region goes dark.
    Partition { edge: String, region: String },
    /// The region's node and workers killed and restarted, repeatedly.
    AzFlap { region: String },
}

impl Scenario {
    /// Parses `name` and its targets as the command line gives them.
    pub fn parse(name: &str, targets: &[String]) -> anyhow::Result<Scenario> {
        let one = || -> anyhow::Result<String> {
            match targets {
                [t] => Ok(t.clone()),
                _ => bail!(
                    "{name} takes one target (a {})",
                    if name == "edge-down" {
                        "edge"
                    } else {
                        "region"
                    }
                ),
            }
        };
        Ok(match name {
            "region-down" => Scenario::RegionDown { region: one()? },
            "redis-down" => Scenario::RedisDown { region: one()? },
            "worker-kill" => Scenario::WorkerKill { region: one()? },
            "edge-down" => Scenario::EdgeDown { edge: one()? },
            "az-flap" => Scenario::AzFlap { region: one()? },
            "partition" => match targets {
                [edge, region] => Scenario::Partition {
                    edge: edge.clone(),
                    region: region.clone(),
                },
                _ => bail!(
                    "partition takes an edge and a region: `earshot drill partition edge-eu-1 eu-west`"
                ),
            },
            other => bail!(
                "unknown scenario {other:?}: use region-down, redis-down, worker-kill, edge-down, partition or az-flap"
            ),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Scenario::RegionDown { .. } => "region-down",
            Scenario::RedisDown { .. } => "redis-down",
            Scenario::WorkerKill { .. } => "worker-kill",
            Scenario::EdgeDown { .. } => "edge-down",
            Scenario::Partition { .. } => "partition",
            Scenario::AzFlap { .. } => "az-flap",
        }
    }

    pub fn title(&self) -> String {
        match self {
            Scenario::RegionDown { region }
            | Scenario::RedisDown { region }
            | Scenario::WorkerKill { region }
            | Scenario::AzFlap { region } => format!("{} {region}", self.name()),
            Scenario::EdgeDown { edge } => format!("edge-down {edge}"),
            Scenario::Partition { edge, region } => format!("partition {edge} {region}"),
        }
    }

    /// Checks the targets exist in `topology`.
    fn check(&self, topology: &Topology) -> anyhow::Result<()> {
        let region = |r: &str| {
            topology
                .region(r)
                .map(|_| ())
                .with_context(|| format!("no region {r:?} in the topology"))
        };
        let edge = |e: &str| {
            topology
                .edge(e)
                .map(|_| ())
                .with_context(|| format!("no edge {e:?} in the topology"))
        };
        match self {
            Scenario::RegionDown { region: r }
            | Scenario::RedisDown { region: r }
            | Scenario::WorkerKill { region: r }
            | Scenario::AzFlap { region: r } => region(r),
            Scenario::EdgeDown { edge: e } => edge(e),
            Scenario::Partition { edge: e, region: r } => {
                edge(e)?;
                region(r)?;
                if !topology.permitted_regions(e)?.iter().any(|x| x.name == *r) {
                    bail!("edge {e} does not dial region {r}: nothing to partition");
                }
                Ok(())
            }
        }
    }

    /// The processes broken, in the order they are broken (the reverse of
    /// the planet's start order, which restores them), and how.
    fn faults(&self) -> Vec<(String, &'static str)> {
        match self {
            Scenario::RegionDown { region } => vec![
                (format!("{region}-worker"), "kill"),
                (region.clone(), "kill"),
                (format!("sync-{region}"), "kill"),
                (format!("redis-{region}"), "kill"),
            ],
            Scenario::RedisDown { region } => vec![(format!("redis-{region}"), "kill")],
            Scenario::WorkerKill { region } => vec![(format!("{region}-worker"), "kill")],
            Scenario::EdgeDown { edge } => vec![(edge.clone(), "terminate")],
            Scenario::Partition { edge, region } => vec![(proxy_name(edge, region), "kill")],
            Scenario::AzFlap { region } => {
                vec![
                    (region.clone(), "kill"),
                    (format!("{region}-worker"), "kill"),
                ]
            }
        }
    }

    /// Does a final of `r` show it was served through the broken part?
    fn touches(&self, r: &Record, region: &str) -> bool {
        match self {
            Scenario::RegionDown { region: x }
            | Scenario::RedisDown { region: x }
            | Scenario::WorkerKill { region: x }
            | Scenario::AzFlap { region: x } => region == x,
            Scenario::EdgeDown { edge } => r.edge == *edge,
            Scenario::Partition { edge, region: x } => r.edge == *edge && region == x,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DrillOptions {
    pub before: Duration,
    pub during: Duration,
    pub after: Duration,
    pub eu_clients: usize,
    pub us_clients: usize,
    pub speed: f64,
    pub sentences_per_session: usize,
    /// az-flap: down/up cycles, and how long each half lasts.
    pub flaps: usize,
    pub flap_half: Duration,
    pub progress: bool,
}

impl Default for DrillOptions {
    fn default() -> Self {
        DrillOptions {
            before: Duration::from_secs(15),
            during: Duration::from_secs(15),
            after: Duration::from_secs(15),
            eu_clients: 4,
            us_clients: 2,
            speed: 1.0,
            sentences_per_session: 3,
            flaps: 3,
            flap_half: Duration::from_secs(3),
            progress: true,
        }
    }
}

/// The drill's report (written as `report.json` and `report.md`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub title: String,
    /// Seconds from the load's start.
    pub fault_at: f64,
    pub restored_at: f64,
    pub ended_at: f64,
    pub sessions: usize,
    pub failed_sessions: BTreeMap<String, usize>,
    pub sent: usize,
    pub finals: usize,
    pub errors: BTreeMap<String, usize>,
    pub lost: usize,
    pub duplicated: usize,
    pub residency_violations: usize,
    /// Sentences an edge did not read before closing a session (it said so
    /// in `closing`); a client sends them again.
    pub not_accepted: usize,
    /// Per affected client: seconds from the fault (or from the end of its
    /// sentence, when later) to its first final after the fault.
    pub recovery_s: Vec<f64>,
    pub recovery_max_s: Option<f64>,
    /// Affected clients that got no final after the fault at all.
    pub unrecovered: usize,
    pub before: Summary,
    pub during: Summary,
    pub after: Summary,
    /// Edges GeoDNS answered for each test subnet: before the fault, just
    /// before the restore, after.
    pub dns: BTreeMap<String, [Vec<String>; 3]>,
    /// Finals by region and client jurisdiction over the whole drill.
    pub served: BTreeMap<String, BTreeMap<String, usize>>,
    pub regions: Vec<String>,
    #[serde(skip)]
    pub records: Vec<Record>,
}

impl Report {
    /// The three figures that must be zero.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.residency_violations == 0
    }
}

/// A planet to drill: what `up.json` says about it.
pub struct Target {
    pub run: RunFile,
    pub topology: Arc<Topology>,
    pub verifier: Arc<ReceiptVerifier>,
    pub control: SocketAddr,
}

impl Target {
    pub fn open(run_dir: &Path) -> anyhow::Result<Target> {
        let run = RunFile::read(run_dir)?;
        let topology = Arc::new(Topology::load(&run.topology)?);
        let verifier = Arc::new(ReceiptVerifier::load(&run.ca, topology.clone())?);
        let control = run
            .control
            .context("up.json names no control API: is `earshot up` still starting?")?;
        Ok(Target {
            run,
            topology,
            verifier,
            control,
        })
    }
}

/// Runs `scenario` against `target`; speech is synthesized into `workdir`.
pub async fn run(
    target: &Target,
    scenario: &Scenario,
    options: &DrillOptions,
    workdir: &Path,
) -> anyhow::Result<Report> {
    scenario.check(&target.topology)?;
    let g = geodns::settings(&target.topology)?.clone();
    let populations = loadtest::default_populations(options.eu_clients, options.us_clients);
    let load = LoadConfig {
        dns: target.run.dns,
        geodns: g.clone(),
        verifier: target.verifier.clone(),
        populations: populations.clone(),
        speed: options.speed,
        sentences_per_session: options.sentences_per_session,
        progress: options.progress,
    };
    let speech = loadtest::prepare(&load, workdir)?;
    let dns_now = || async {
        let mut out = BTreeMap::new();
        for p in &populations {
            let answer =
                geodns::query(target.run.dns, &geodns::client_name(&g), Some(&p.subnet)).await;
            let edges = match answer {
                Ok(a) => geodns::answered_edges(&target.topology, &a),
                Err(e) => vec![format!("error: {e}")],
            };
            out.insert(format!("{} ({})", p.subnet, p.jurisdiction), edges);
        }
        out
    };
    let dns_before = dns_now().await;

    let start = Instant::now();
    let stop = CancellationToken::new();
    let load_task = tokio::spawn(loadtest::run(load, speech, start, stop.child_token()));
    let secs = |t: Instant| t.saturating_duration_since(start).as_secs_f64();

    tokio::time::sleep(options.before).await;
    let fault_at = secs(Instant::now());
    let mut restored_at = fault_at;
    let outcome: anyhow::Result<BTreeMap<String, Vec<String>>> = async {
        let faults = scenario.faults();
        let cycles = if matches!(scenario, Scenario::AzFlap { .. }) {
            options.flaps.max(1)
        } else {
            1
        };
        let mut dns_during = BTreeMap::new();
        for cycle in 0..cycles {
            for (name, action) in &faults {
                up::control(target.control, name, action).await?;
            }
            let hold = if cycles > 1 {
                options.flap_half
            } else {
                options.during
            };
            tokio::time::sleep(hold).await;
            if cycle + 1 == cycles {
                dns_during = dns_now().await;
            }
            // Restore in start order (faults are listed in reverse of it).
            for (name, _) in faults.iter().rev() {
                up::control(target.control, name, "restart").await?;
            }
            restored_at = secs(Instant::now());
            if cycle + 1 < cycles {
                tokio::time::sleep(options.flap_half).await;
            }
        }
        Ok(dns_during)
    }
    .await;
    let dns_during = match outcome {
        Ok(d) => d,
        Err(e) => {
            // Leave the planet whole: start again whatever is still down
            // ("already running" answers are expected and ignored).
            for (name, _) in scenario.faults().iter().rev() {
                let _ = up::control(target.control, name, "restart").await;
            }
            stop.cancel();
            let _ = load_task.await;
            return Err(e.context("breaking or restoring the planet"));
        }
    };
    tokio::time::sleep(options.after).await;
    let dns_after = dns_now().await;
    stop.cancel();
    let result = load_task.await.context("the load generator panicked")??;
    let ended_at = secs(Instant::now());

    let records = result.records;
    let phase = |lo: f64, hi: f64| -> Summary {
        loadtest::summarize(
            records
                .iter()
                .filter(|r| r.spoken_at >= lo && r.spoken_at < hi),
        )
    };
    let all = loadtest::summarize(&records);
    let mut dns = BTreeMap::new();
    for (k, before) in dns_before {
        let during = dns_during.get(&k).cloned().unwrap_or_default();
        let after = dns_after.get(&k).cloned().unwrap_or_default();
        dns.insert(k, [before, during, after]);
    }
    let recovered = recovery(scenario, &records, fault_at);
    let recovery_s = recovered.seconds;
    let report = Report {
        scenario: scenario.clone(),
        title: scenario.title(),
        fault_at,
        restored_at,
        ended_at,
        sessions: result.sessions,
        failed_sessions: result.failed_sessions,
        sent: all.sentences,
        finals: all.finals,
        errors: all.errors.clone(),
        lost: all.lost,
        duplicated: result.duplicates,
        not_accepted: result.not_accepted,
        residency_violations: all.residency_violations,
        recovery_max_s: recovery_s.iter().copied().reduce(f64::max),
        recovery_s,
        unrecovered: recovered.unrecovered,
        before: phase(f64::MIN, fault_at),
        during: phase(fault_at, restored_at),
        after: phase(restored_at, f64::MAX),
        dns,
        served: all.served,
        regions: target
            .topology
            .regions()
            .iter()
            .map(|r| r.name.clone())
            .collect(),
        records,
    };
    Ok(report)
}

/// For each client served through the broken part just before the fault:
/// seconds from the fault, or from the end of its sentence when that came
/// later, to its first final after the fault (for `edge-down`, from the
/// fault: the client had to reconnect before it could speak again).
fn recovery(scenario: &Scenario, records: &[Record], fault_at: f64) -> Recovery {
    let mut last_before: BTreeMap<usize, &Record> = BTreeMap::new();
    for r in records {
        if let Outcome::Final { at, .. } = &r.outcome
            && *at < fault_at
            && last_before.get(&r.client).is_none_or(|p| final_at(p) < *at)
        {
            last_before.insert(r.client, r);
        }
    }
    let affected: BTreeMap<usize, &Record> = last_before
        .into_iter()
        .filter(|(_, r)| match &r.outcome {
            Outcome::Final { region, .. } => scenario.touches(r, region),
            _ => false,
        })
        .collect();
    // Per affected client: (arrival, wait) of its earliest final after the
    // fault. A final before its sentence ended is one a draining edge cut
    // short, and a client whose edge went away recovers only in a new
    // session, counted from the fault (it could not speak until it
    // reconnected). Others kept speaking: from the fault or the end of
    // their sentence, whichever is later.
    let edge_down = matches!(scenario, Scenario::EdgeDown { .. });
    let mut first_after: BTreeMap<usize, (f64, f64)> = BTreeMap::new();
    for r in records {
        let Outcome::Final { at, .. } = &r.outcome else {
            continue;
        };
        let Some(before) = affected.get(&r.client) else {
            continue;
        };
        if *at < fault_at || *at < r.spoken_at || (edge_down && r.session == before.session) {
            continue;
        }
        let waited = if edge_down {
            at - fault_at
        } else {
            at - r.spoken_at.max(fault_at)
        };
        let entry = first_after.entry(r.client).or_insert((*at, waited));
        if *at < entry.0 {
            *entry = (*at, waited);
        }
    }
    let mut seconds: Vec<f64> = first_after.values().map(|(_, waited)| *waited).collect();
    seconds.sort_by(f64::total_cmp);
    Recovery {
        unrecovered: affected.len() - first_after.len(),
        seconds,
    }
}

/// Recovery of the affected clients.
struct Recovery {
    seconds: Vec<f64>,
    /// Affected clients with no final after the fault at all.
    unrecovered: usize,
}

fn final_at(r: &Record) -> f64 {
    match &r.outcome {
        Outcome::Final { at, .. } => *at,
        _ => f64::MIN,
    }
}

/// Writes `report.json`, `report.md` and `timeline.svg` into `dir`.
pub fn write(report: &Report, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let json = dir.join("report.json");
    let md = dir.join("report.md");
    let svg = dir.join("timeline.svg");
    let records = dir.join("records.jsonl");
    std::fs::write(&json, serde_json::to_string_pretty(report)?)?;
    std::fs::write(&md, markdown(report))?;
    std::fs::write(&svg, timeline_svg(report))?;
    let mut lines = String::new();
    for r in &report.records {
        lines.push_str(&serde_json::to_string(r)?);
        lines.push('\n');
    }
    std::fs::write(&records, lines)?;
    Ok(vec![md, json, svg, records])
}

fn opt(v: Option<f64>, scale: f64, unit: &str) -> String {
    v.map_or("–".into(), |v| format!("{:.2}{unit}", v * scale))
}

/// The report as Markdown.
pub fn markdown(r: &Report) -> String {
    let mut t = String::new();
    let verdict = if r.clean() { "PASS" } else { "FAIL" };
    let _ = writeln!(t, "# Drill: {} — {verdict}\n", r.title);
    let _ = writeln!(
        t,
        "Fault at {:.1} s, restored at {:.1} s, load stopped at {:.1} s; {} sessions.\n",
        r.fault_at, r.restored_at, r.ended_at, r.sessions
    );
    let _ = writeln!(t, "| must be 0 | value |\n| --- | --- |");
    let _ = writeln!(t, "| lost utterances | {} |", r.lost);
    let _ = writeln!(t, "| duplicated finals | {} |", r.duplicated);
    let _ = writeln!(
        t,
        "| residency violations (receipts) | {} |\n",
        r.residency_violations
    );
    let _ = writeln!(
        t,
        "Sent {} sentences ({} more not read by a closing edge, to be sent again): {} finals, errors {}.\n",
        r.sent,
        r.not_accepted,
        r.finals,
        if r.errors.is_empty() {
            "none".into()
        } else {
            r.errors
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    if !r.failed_sessions.is_empty() {
        let _ = writeln!(t, "Sessions that could not start:\n");
        for (why, n) in &r.failed_sessions {
            let _ = writeln!(t, "- {n} × {why}");
        }
        t.push('\n');
    }
    let _ = writeln!(
        t,
        "Recovery (affected clients: first final after the fault): {} clients, {} without any, max {}, all {:?}\n",
        r.recovery_s.len(),
        r.unrecovered,
        opt(r.recovery_max_s, 1.0, " s"),
        r.recovery_s
            .iter()
            .map(|v| (v * 100.0).round() / 100.0)
            .collect::<Vec<_>>()
    );
    let _ = writeln!(
        t,
        "| phase | sentences | finals | errors | lost | WER | p50 latency | p99 latency |"
    );
    let _ = writeln!(t, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (name, s) in [
        ("before", &r.before),
        ("during", &r.during),
        ("after", &r.after),
    ] {
        let errors: usize = s.errors.values().sum();
        let _ = writeln!(
            t,
            "| {name} | {} | {} | {errors} | {} | {} | {} | {} |",
            s.sentences,
            s.finals,
            s.lost,
            opt(s.wer, 100.0, "%"),
            opt(s.p50_latency_s, 1.0, " s"),
            opt(s.p99_latency_s, 1.0, " s"),
        );
    }
    let _ = writeln!(t, "\nDNS answers (before / during / after):\n");
    for (subnet, [b, d, a]) in &r.dns {
        let _ = writeln!(
            t,
            "- {subnet}: {} / {} / {}",
            b.join(","),
            d.join(","),
            a.join(",")
        );
    }
    let _ = writeln!(
        t,
        "\nWho served whom (finals by region and client jurisdiction):\n"
    );
    let jurisdictions: Vec<&String> = {
        let mut j: Vec<&String> = r.served.values().flat_map(|m| m.keys()).collect();
        j.sort();
        j.dedup();
        j
    };
    let _ = writeln!(
        t,
        "| region | {} |\n| --- |{}",
        jurisdictions
            .iter()
            .map(|j| j.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
        " --- |".repeat(jurisdictions.len())
    );
    for region in &r.regions {
        let row: Vec<String> = jurisdictions
            .iter()
            .map(|j| {
                r.served
                    .get(region)
                    .and_then(|m| m.get(*j))
                    .copied()
                    .unwrap_or(0)
                    .to_string()
            })
            .collect();
        let _ = writeln!(t, "| {region} | {} |", row.join(" | "));
    }
    let _ = writeln!(t, "\n![timeline](timeline.svg)");
    t
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

/// Finals per second and p99 latency per region over time, with the fault
/// shaded: an SVG drawn by hand (no plotting dependency).
pub fn timeline_svg(r: &Report) -> String {
    let (w, h) = (900.0, 520.0);
    let (left, right) = (70.0, 150.0);
    let panel = [(40.0, 200.0), (290.0, 200.0)];
    let end = r.ended_at.max(1.0);
    let x = |t: f64| left + (t / end).clamp(0.0, 1.0) * (w - left - right);
    let bucket = 2.0;
    let buckets = (end / bucket).ceil() as usize + 1;
    // Per region: finals per second and p99 latency per bucket.
    let mut rate: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut lat: BTreeMap<&str, Vec<Vec<f64>>> = BTreeMap::new();
    for region in &r.regions {
        rate.insert(region, vec![0.0; buckets]);
        lat.insert(region, vec![Vec::new(); buckets]);
    }
    for rec in &r.records {
        if let Outcome::Final {
            region,
            at,
            latency_s,
            ..
        } = &rec.outcome
        {
            let b = ((at / bucket) as usize).min(buckets - 1);
            if let Some(v) = rate.get_mut(region.as_str()) {
                v[b] += 1.0 / bucket;
            }
            if let Some(v) = lat.get_mut(region.as_str()) {
                v[b].push(*latency_s);
            }
        }
    }
    let max_rate = rate.values().flatten().copied().fold(0.5f64, f64::max) * 1.15;
    let p99: BTreeMap<&str, Vec<Option<f64>>> = lat
        .iter()
        .map(|(k, v)| {
            let series = v
                .iter()
                .map(|xs| {
                    let mut xs = xs.clone();
                    xs.sort_by(f64::total_cmp);
                    loadtest::percentile(&xs, 0.99)
                })
                .collect();
            (*k, series)
        })
        .collect();
    let max_lat = p99
        .values()
        .flatten()
        .flatten()
        .copied()
        .fold(0.5f64, f64::max)
        * 1.15;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="22" font-size="15" font-weight="bold">{} — finals per second and p99 final latency per region</text>"#,
        xml(&r.title)
    );
    for (i, (top, height)) in panel.iter().enumerate() {
        let (ymax, label) = if i == 0 {
            (max_rate, "finals / s")
        } else {
            (max_lat, "p99 latency (s)")
        };
        let y = |v: f64| top + height - (v / ymax).clamp(0.0, 1.0) * height;
        // The fault, shaded.
        let _ = writeln!(
            s,
            r##"<rect x="{:.1}" y="{top}" width="{:.1}" height="{height}" fill="#f4cccc"/>"##,
            x(r.fault_at),
            (x(r.restored_at) - x(r.fault_at)).max(2.0)
        );
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{top}" width="{:.1}" height="{height}" fill="none" stroke="#444"/>"##,
            w - left - right
        );
        for k in 0..=4 {
            let v = ymax * f64::from(k) / 4.0;
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{v:.1}</text><line x1="{left}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/>"##,
                left - 6.0,
                y(v) + 4.0,
                w - right,
                y(v),
                y(v)
            );
        }
        let _ = writeln!(
            s,
            r#"<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">{label}</text>"#,
            top + height / 2.0
        );
        for (c, region) in r.regions.iter().enumerate() {
            let color = COLORS[c % COLORS.len()];
            let points: Vec<String> = if i == 0 {
                rate[region.as_str()]
                    .iter()
                    .enumerate()
                    .map(|(b, v)| format!("{:.1},{:.1}", x((b as f64 + 0.5) * bucket), y(*v)))
                    .collect()
            } else {
                p99[region.as_str()]
                    .iter()
                    .enumerate()
                    .filter_map(|(b, v)| {
                        v.map(|v| format!("{:.1},{:.1}", x((b as f64 + 0.5) * bucket), y(v)))
                    })
                    .collect()
            };
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                points.join(" ")
            );
        }
    }
    // Time axis.
    let bottom = panel[1].0 + panel[1].1;
    let step = if end > 120.0 {
        20.0
    } else if end > 40.0 {
        10.0
    } else {
        5.0
    };
    let mut t = 0.0;
    while t <= end {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{t:.0}</text>"#,
            x(t),
            bottom + 16.0
        );
        t += step;
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds since the load started (shaded: fault until restored)</text>"#,
        left + (w - left - right) / 2.0,
        bottom + 34.0
    );
    // Legend: every region by name.
    for (c, region) in r.regions.iter().enumerate() {
        let y = 60.0 + 20.0 * c as f64;
        let color = COLORS[c % COLORS.len()];
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" x2="{:.1}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            w - right + 12.0,
            w - right + 36.0,
            w - right + 42.0,
            y + 4.0,
            xml(region)
        );
    }
    let verdict = format!(
        "lost {} · duplicated {} · residency violations {}",
        r.lost, r.duplicated, r.residency_violations
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}">{verdict}</text>"#,
        w - right + 12.0,
        60.0 + 20.0 * r.regions.len() as f64 + 10.0
    );
    s.push_str("</svg>\n");
    s
}

fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(client: usize, edge: &str, region: &str, spoken_at: f64, at: f64) -> Record {
        Record {
            client,
            jurisdiction: "eu".into(),
            session: "s".into(),
            edge: edge.into(),
            sentence: 0,
            spoken_at,
            outcome: Outcome::Final {
                region: region.into(),
                at,
                latency_s: at - spoken_at,
                text: "t".into(),
                word_errors: 0,
                words: 5,
                receipt_failure: None,
            },
        }
    }

    #[test]
    fn scenarios_parse_with_their_targets_and_name_what_they_break() {
        let s = Scenario::parse("region-down", &["eu-west".into()]).unwrap();
        assert_eq!(s.faults()[1], ("eu-west".to_owned(), "kill"));
        assert_eq!(s.faults()[3], ("redis-eu-west".to_owned(), "kill"));
        assert_eq!(s.faults().len(), 4);
        let p = Scenario::parse("partition", &["edge-eu-1".into(), "eu-west".into()]).unwrap();
        assert_eq!(p.faults(), [("proxy-edge-eu-1-eu-west".to_owned(), "kill")]);
        assert!(Scenario::parse("partition", &["edge-eu-1".into()]).is_err());
        assert!(
            Scenario::parse("meteor", &[])
                .unwrap_err()
                .to_string()
                .contains("region-down")
        );
        let e = Scenario::parse("edge-down", &["edge-eu-1".into()]).unwrap();
        assert_eq!(e.faults(), [("edge-eu-1".to_owned(), "terminate")]);
    }

    #[test]
    fn recovery_counts_only_clients_served_through_the_broken_part() {
        let s = Scenario::RegionDown {
            region: "eu-west".into(),
        };
        let records = [
            record(0, "edge-eu-1", "eu-west", 1.0, 1.5),
            // In flight at the fault (10 s): answered 1.2 s after it.
            record(0, "edge-eu-1", "eu-central", 9.5, 11.2),
            record(1, "edge-eu-2", "eu-central", 2.0, 2.4),
            record(1, "edge-eu-2", "eu-central", 12.0, 12.4),
        ];
        let r = recovery(&s, &records, 10.0);
        assert_eq!((r.seconds.len(), r.unrecovered), (1, 0));
        assert!((r.seconds[0] - 1.2).abs() < 1e-9, "{:?}", r.seconds);

        // edge-down: the drain's cut final (before its sentence ended) is
        // no recovery; the reconnected session's first final is, counted
        // from the fault.
        let e = Scenario::EdgeDown {
            edge: "edge-eu-1".into(),
        };
        let mut next = record(0, "edge-eu-2", "eu-west", 14.5, 15.0);
        next.session = "t".into();
        let records = [
            record(0, "edge-eu-1", "eu-west", 1.0, 1.5),
            record(0, "edge-eu-1", "eu-west", 11.0, 10.2),
            // Spoken before the fault, answered in the drain: old session.
            record(0, "edge-eu-1", "eu-west", 9.5, 10.3),
            next,
            // A client that never got a final again.
            record(1, "edge-eu-1", "eu-west", 2.0, 2.5),
        ];
        let r = recovery(&e, &records, 10.0);
        assert_eq!((r.seconds.len(), r.unrecovered), (1, 1));
        assert!((r.seconds[0] - 5.0).abs() < 1e-9, "{:?}", r.seconds);
    }
}
