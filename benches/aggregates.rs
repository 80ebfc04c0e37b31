//! The per-cluster aggregates the bandit reads (issue 12, item 3): documents, tokens and
//! unsampled members per cluster, kept from the ingest sink's changes. Three ways of keeping
//! them in a 2-worker timely dataflow, over the same synthetic stream of documents (each with a
//! cluster among 64 and a token count, derived from a hash of its location), shards owned by
//! `epoch % workers` as in a job:
//!
//! - `tally`: what a job does today. The sink that commits an epoch tallies it per cluster
//!   (one change per touched cluster), the changes go to worker 0, which adds them up.
//! - `differential, per document`: every document is an update `(cluster, epoch, +(1, tokens,
//!   1))` of a differential collection of cluster ids whose difference carries (documents,
//!   tokens, unsampled); `consolidate` (exchanged by cluster id) reduces it to one record per
//!   cluster and epoch, which worker 0 adds up.
//! - `differential, per document, consolidate_stream first`: as above, with each batch
//!   consolidated where it is made before the exchange.
//! - `differential, tallied`: the sink's per-epoch tally as the collection's updates, then
//!   `consolidate`, as above.
//!
//!     cargo bench --bench aggregates                     # 10M documents
//!     QUAD_AGG_DOCS=1000000 cargo bench --bench aggregates
//!
//! Prints documents per second for each, as a Markdown table, and checks that the three agree.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use differential_dataflow::difference::Semigroup;
use differential_dataflow::AsCollection;
use quad::bandit::aggregates::ClusterDelta;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Exchange as _, Inspect, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle};
use xxhash_rust::xxh3::xxh3_64;

const CLUSTERS: u64 = 64;
const SHARD_DOCS: u64 = 125_000;
const WORKERS: usize = 2;

/// The cluster and tokens of document `row` of shard `epoch`.
fn document(epoch: u64, row: u64) -> (u32, u64) {
    let h = xxh3_64(&[epoch.to_le_bytes(), row.to_le_bytes()].concat());
    ((h % CLUSTERS) as u32, 20 + (h >> 32) % 400)
}

fn tally(epoch: u64) -> BTreeMap<u32, ClusterDelta> {
    let mut by_cluster: BTreeMap<u32, ClusterDelta> = BTreeMap::new();
    for row in 0..SHARD_DOCS {
        let (cluster, tokens) = document(epoch, row);
        by_cluster
            .entry(cluster)
            .or_default()
            .plus_equals(&ClusterDelta::member(tokens, true));
    }
    by_cluster
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    Tally,
    DifferentialPerDocument,
    DifferentialPerDocumentPreConsolidated,
    DifferentialTallied,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Tally => "tally (today)",
            Variant::DifferentialPerDocument => "differential, per document",
            Variant::DifferentialPerDocumentPreConsolidated => {
                "differential, per document, consolidate_stream first"
            }
            Variant::DifferentialTallied => "differential, tallied per epoch",
        }
    }
}

/// Runs one variant over `epochs` shards; returns the seconds and worker 0's totals.
fn run(variant: Variant, epochs: u64) -> (f64, BTreeMap<u32, ClusterDelta>) {
    let totals: Arc<Mutex<BTreeMap<u32, ClusterDelta>>> = Arc::default();
    let seconds: Arc<Mutex<f64>> = Arc::default();
    let (t, s) = (totals.clone(), seconds.clone());
    timely::execute(timely::Config::process(WORKERS), move |worker| {
        let index = worker.index() as u64;
        let peers = worker.peers() as u64;
        let mut input = InputHandleVec::<u64, u64>::new();
        let probe = ProbeHandle::new();
        let sum = t.clone();
        worker.dataflow::<u64, _, _>(|scope| {
            let epochs = input.to_stream(scope);
            let add = move |(cluster, _time, diff): (u32, u64, ClusterDelta)| {
                sum.lock()
                    .expect("totals")
                    .entry(cluster)
                    .or_default()
                    .plus_equals(&diff);
            };
            match variant {
                Variant::Tally => {
                    epochs
                        .flat_map(|epoch| tally(epoch).into_iter())
                        .unary::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
                            Exchange::new(|_: &(u32, ClusterDelta)| 0),
                            "Apply",
                            |_, _| {
                                move |input, _output: &mut _| {
                                    input.for_each_stamp(|_cap, data| {
                                        for container in data {
                                            for (cluster, diff) in container.drain(..) {
                                                add((cluster, 0, diff));
                                            }
                                        }
                                    });
                                }
                            },
                        )
                        .probe_with(&probe);
                }
                _ => {
                    let updates = if variant == Variant::DifferentialTallied {
                        epochs
                            .flat_map(|epoch| {
                                tally(epoch)
                                    .into_iter()
                                    .map(move |(cluster, diff)| (cluster, epoch, diff))
                            })
                            .as_collection()
                    } else {
                        epochs
                            .flat_map(|epoch| {
                                (0..SHARD_DOCS).map(move |row| {
                                    let (cluster, tokens) = document(epoch, row);
                                    (cluster, epoch, ClusterDelta::member(tokens, true))
                                })
                            })
                            .as_collection()
                    };
                    let updates = if variant == Variant::DifferentialPerDocumentPreConsolidated {
                        updates.consolidate_stream()
                    } else {
                        updates
                    };
                    updates
                        .consolidate()
                        .inner
                        .exchange(|_| 0)
                        .inspect(move |update| add(update.clone()))
                        .probe_with(&probe);
                }
            }
        });
        let start = Instant::now();
        for epoch in 0..epochs {
            if epoch % peers == index {
                input.send(epoch);
            }
            input.advance_to(epoch + 1);
            worker.step();
        }
        drop(input);
        while !probe.done() {
            worker.step();
        }
        if index == 0 {
            *s.lock().expect("seconds") = start.elapsed().as_secs_f64();
        }
    })
    .expect("timely");
    let seconds = *seconds.lock().expect("seconds");
    let totals = totals.lock().expect("totals").clone();
    (seconds, totals)
}

fn main() {
    let docs: u64 = std::env::var("QUAD_AGG_DOCS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000_000);
    let epochs = docs.div_ceil(SHARD_DOCS).max(WORKERS as u64);
    let docs = epochs * SHARD_DOCS;
    println!(
        "{docs} documents in {epochs} shards of {SHARD_DOCS}, {CLUSTERS} clusters, {WORKERS} workers"
    );
    println!();
    println!("| aggregates kept by | seconds | documents/s | vs tally |");
    println!("|---|---:|---:|---:|");
    let mut first: Option<(f64, BTreeMap<u32, ClusterDelta>)> = None;
    for variant in [
        Variant::Tally,
        Variant::DifferentialPerDocument,
        Variant::DifferentialPerDocumentPreConsolidated,
        Variant::DifferentialTallied,
    ] {
        let (seconds, totals) = run(variant, epochs);
        let base = first.get_or_insert_with(|| (seconds, totals.clone()));
        assert_eq!(
            base.1,
            totals,
            "{} disagrees with the tally",
            variant.name()
        );
        assert_eq!(
            totals.values().map(|t| t.docs).sum::<i64>(),
            docs as i64,
            "every document counted once"
        );
        println!(
            "| {} | {seconds:.2} | {:.0} | {:.2}x |",
            variant.name(),
            docs as f64 / seconds,
            seconds / base.0
        );
    }
}
