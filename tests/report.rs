//! `quad report`: a run's records in the state store become an HTML page whose every plot
//! renders in headless Chromium (Debian's package; `scripts/setup-chromium.sh` installs it).
mod common;
mod planted;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use quad::bandit::{BanditConfig, Budget};
use quad::cost::Costs;
use quad::report::{COSTS_KEY, POOL_MIX_KEY};

const DOMAINS: [&str; 4] = ["news", "email", "fiction", "tweets"];

fn domain(shard: u64) -> &'static str {
    DOMAINS[shard as usize % DOMAINS.len()]
}

fn chromium() -> PathBuf {
    std::env::var_os("QUAD_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("chromium"))
}

/// A job spec and its state store holding a simulated quad run on the planted pool.
fn simulated_run(dir: &Path) -> PathBuf {
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            "name = \"report <test>\"\nseed = 3\n[source]\nshards = \"{0}/none/*.parquet\"\n[select]\nstrategy = \"quad\"\n[cluster]\nenabled = true\n[bandit]\ntau = 0.25\nbudget = {{ ratio = 0.15 }}\n[sink]\npath = \"{0}/out\"\n",
            dir.display()
        ),
    )
    .unwrap();
    let spec = quad::config::JobSpec::load(&job).unwrap();
    let cfg = BanditConfig {
        tau: 0.25,
        budget: Budget::Ratio(0.15),
        ..BanditConfig::default()
    };
    let store = planted::store_with_pool(&spec.state_path(), 3, &spec.selection_fingerprint());
    let mut bandit = planted::bandit_from_store(&store, 3, &cfg);
    let mut selected_mix: BTreeMap<String, u64> = BTreeMap::new();
    while !bandit.is_done() {
        let (_, outcome) = planted::store_round(&store, &mut bandit);
        for (m, _) in &outcome.selected {
            *selected_mix
                .entry(domain(m.loc.shard).to_string())
                .or_insert(0) += m.tokens;
        }
    }
    // The selected rows as the round sinks would close them into one file.
    let rows = store.pending_rows(|_| true).unwrap();
    store
        .commit_output_file("part-r000000-w000.parquet", 0, &rows, &selected_mix)
        .unwrap();
    let mut mix: BTreeMap<String, u64> = BTreeMap::new();
    for c in planted::pool() {
        for m in c.members {
            *mix.entry(domain(m.loc.shard).to_string()).or_insert(0) += m.tokens;
        }
    }
    store.put_run_value(POOL_MIX_KEY, &mix).unwrap();
    let costs = Costs {
        embed_flops: 3.1e12,
        factor_flops: 8.0e11,
        score_flops: 5.5e12,
        docs_scored: bandit.scored_docs(),
        pool_docs: bandit.pool_docs(),
        ..Default::default()
    };
    store.put_run_value(COSTS_KEY, &costs).unwrap();
    job
}

/// Counts, per `<svg>` of the page, the drawn data elements with a non-empty box, as laid out
/// by the browser; the checker script writes them into the DOM that --dump-dom prints.
const CHECKER: &str = r#"<script>
const counts = [...document.querySelectorAll('figure.plot svg')].map(svg =>
  [...svg.querySelectorAll('polyline.series, circle, rect.bar, line.marker')]
    .filter(e => { const b = e.getBBox(); return b.width > 0 || b.height > 0; }).length);
const p = document.createElement('pre');
p.id = 'drawn';
p.textContent = 'drawn=' + counts.join(',') + ';';
document.body.appendChild(p);
</script>"#;

#[test]
fn every_plot_of_the_report_renders_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let job = simulated_run(dir.path());
    let out = common::quad().arg("report").arg(&job).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert_eq!(path, dir.path().join("out/report.html"));
    let html = std::fs::read_to_string(&path).unwrap();
    let svgs = html.matches("<svg").count();
    assert_eq!(
        svgs, 6,
        "rewards, cluster scores, pulls, influence, source mix, costs"
    );
    assert!(html.contains("tau = 0.25"));
    assert!(html.contains("report &lt;test&gt;"));

    let checked = dir.path().join("checked.html");
    std::fs::write(
        &checked,
        html.replace("</body>", &format!("{CHECKER}</body>")),
    )
    .unwrap();
    let browser = Command::new(chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        .arg(format!("file://{}", checked.display()))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): run scripts/setup-chromium.sh (Debian's chromium) or set QUAD_CHROMIUM",
                chromium().display()
            )
        });
    let dom = String::from_utf8_lossy(&browser.stdout);
    let drawn = dom
        .split(r#"<pre id="drawn">drawn="#)
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap_or_else(|| {
            panic!(
                "no check result in the DOM; stderr: {}",
                String::from_utf8_lossy(&browser.stderr)
            )
        });
    let counts: Vec<usize> = drawn.split(',').map(|n| n.parse().unwrap()).collect();
    assert_eq!(counts.len(), svgs, "every svg was laid out: {counts:?}");
    assert!(counts.iter().all(|&n| n > 0), "an empty plot: {counts:?}");
    // The influence histogram has its tau marker drawn.
    assert!(dom.contains(r#"class="marker""#));
}

#[test]
fn report_without_a_state_store_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "name = \"x\"\n[source]\nshards = \"a/*.parquet\"\n[sink]\npath = \"{}/out\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = common::quad().arg("report").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no state store") && err.contains("run the job first"),
        "{err}"
    );
}
