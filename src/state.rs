//! The job state in one embedded transactional store (redb): shards seen and done, epochs
//! committed with their output files, accepted document ids (for duplicate detection across
//! restarts) and rejected rows. An epoch's output file is recorded in the same transaction as
//! the epoch itself, which is what makes the output exactly-once.
//!
//! Three tables grow with the pool, one row per document: the accepted ids, and each member in
//! exactly one of the unsampled members (in draw order) and the sampled ones. Their keys and
//! values are fixed-width big-endian bytes (see `layout`): redb stores fixed-width pairs with
//! no per-entry overhead, and big-endian bytes sort as the numbers they hold. The ids and the
//! unsampled members are keyed by hashes, so each is kept as ranked sorted runs (`runs`) that
//! an epoch's commit appends to instead of rewriting.
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::StateError;
use crate::source::Reject;

mod blob_blocks;
mod processes;
mod runs;

/// The store's page cache: bounded, so that the job's memory does not grow with the store
/// (redb's default is 1 GiB); what a round touches is a few pages per drawn member.
const STORE_CACHE_BYTES: usize = 128 << 20;

/// The layout of the tables below. A store written with another layout is refused (it would be
/// misread); bump it with every change to a table's key or value.
pub const STORE_LAYOUT: &str = "11";
const LAYOUT_KEY: &str = "layout";
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const SHARDS: TableDefinition<&str, &str> = TableDefinition::new("shards");
const EPOCHS: TableDefinition<u64, &str> = TableDefinition::new("epochs");
const OUTPUTS: TableDefinition<&str, u64> = TableDefinition::new("outputs");
/// Accepted ids by their key (`layout::id_key`, 96 bits) -> the epoch that first accepted them
/// (`layout::id_value`). The row is not kept: 4 bytes a document less, and a duplicate of a
/// committed epoch is reported with its first epoch only.
/// Kept as ranked sorted runs (`runs`): the keys are hashes, so one table would have most of its
/// pages rewritten by every epoch's commit.
const IDS: runs::LeveledTable<12, 4> = runs::LeveledTable::new("ids");

/// The key of a document id: 96 bits of its xxh3-128 hash. A collision (a new document taken
/// for a duplicate) needs about 2^48 ids.
pub fn id_key(id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(id.as_bytes()) >> 32
}
const REJECTS: TableDefinition<(u64, u64), &str> = TableDefinition::new("rejects");
/// Exact dedup: the hash of a kept document's normalised text (`dedup::text_hash`) -> its
/// location (`layout::location`), the first kept document with that text. Leveled, as `IDS`.
const TEXTS: runs::LeveledTable<8, 8> = runs::LeveledTable::new("texts");
/// Near dedup's band index: a band key (`dedup::MinHasher::band_keys`) -> the location of the
/// first kept document with that band. Leveled, as `IDS`.
const BANDS: runs::LeveledTable<8, 8> = runs::LeveledTable::new("bands");
/// Near dedup: the sketch (`dedup::sketch`) of each kept document that the band index points
/// to, in blocks of documents keyed by (epoch, first row) (`blob_blocks`). Keyed in epoch
/// order, so a commit appends.
const SKETCHES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("sketch_blocks");
/// `semdedup`'s band index: a sign-projection band key of a kept document's embedding
/// (`cluster::semdedup`) -> the location of the first kept document with it. Leveled, as `IDS`.
const SEMANTIC_BANDS: runs::LeveledTable<8, 8> = runs::LeveledTable::new("semantic_bands");
/// `semdedup`: the quantised embedding of each kept document the band index points to, in
/// blocks as `SKETCHES`.
const SEMANTIC_VECTORS: TableDefinition<(u64, u64), &[u8]> =
    TableDefinition::new("semantic_vector_blocks");
/// The Quad loop: one record per bandit round (JSON `report::RoundRecord`).
const ROUNDS: TableDefinition<u64, &str> = TableDefinition::new("rounds");
/// Values of the run as a whole (JSON): the bandit state after the last round, the pool's mix,
/// the costs.
const RUN: TableDefinition<&str, &str> = TableDefinition::new("run");
const BANDIT_KEY: &str = "bandit";
/// The outcome of the last decided round (JSON `bandit::RoundOutcome`), replayed to the
/// clusters' owners after a restart.
const LAST_OUTCOME_KEY: &str = "last_outcome";
/// `applied_round/<worker>`: the last round whose part that worker carried out in this store.
const APPLIED_ROUND_PREFIX: &str = "applied_round/";
/// Selected tokens by the rows' `source` column, summed over closed output files.
const SELECTED_MIX_KEY: &str = "selected_tokens_by_source";
/// Per cluster: bincode of `ClusterInfo` (centroid, size, tokens).
const CLUSTERS: TableDefinition<u32, &[u8]> = TableDefinition::new("clusters");
/// The assign stage's state after the last committed epoch (opaque bytes; see `assign`).
const CLUSTERER: TableDefinition<&str, &[u8]> = TableDefinition::new("clusterer");
/// Members not yet sampled, in draw order: `layout::unsampled_key` (cluster, sample key, epoch,
/// row) -> `layout::member_value` (row group, tokens). A round's draw reads O(n) entries from a
/// seeded start (see `bandit::draw`). Never the text, nor the id (fetched back by location).
/// Kept as ranked sorted runs (`runs`), as the ids are: an epoch's members spread over each
/// cluster's whole key range.
const UNSAMPLED: runs::LeveledTable<20, 8> = runs::LeveledTable::new("unsampled");
/// Members a round has sampled (scored or taken; they leave `UNSAMPLED`):
/// `layout::sampled_key` (cluster, epoch, row) -> `layout::sampled_value` (row group, tokens,
/// `member_flags`).
const SAMPLED: TableDefinition<&[u8; 12], &[u8; 9]> = TableDefinition::new("sampled");
/// Selected rows not yet in a closed output file: (cluster, round, epoch, row) -> (row group,
/// tokens, influence; NaN when taken unscored).
const PENDING: TableDefinition<(u32, u64, u64, u64), (u32, u64, f64)> =
    TableDefinition::new("pending");
/// The seeded pool sample for fitting the K-FAC factors (bottom-k by a seeded hash of the id,
/// kept during ingest): (priority, epoch, row) -> row group.
const FIT_SAMPLE: TableDefinition<(u64, u64, u64), u32> = TableDefinition::new("fit_sample");
const CLUSTERER_KEY: &str = "state";
/// A job of several processes: epoch -> tokens `random` or `dsir` selected in it, for every
/// epoch the admit stage decided (`StateStore::record_admitted`; process 0's store only).
const ADMITTED: TableDefinition<u64, u64> = TableDefinition::new("admitted");

/// Member flags (bit set), for the bandit.
pub mod member_flags {
    /// Chosen for the output.
    pub const SELECTED: u8 = 1;
    /// Its influence was computed.
    pub const SCORED: u8 = 2;
    /// Drawn to be scored but could not be (rejected with the reason in the rejects table).
    pub const UNSCORABLE: u8 = 4;
}

/// A round's part as a store carried it out (`StateStore::apply_round_part`).
#[derive(Debug, Clone)]
pub struct AppliedPart {
    pub part: crate::bandit::RoundPart,
    /// Members that left the unsampled ones, per cluster.
    pub left: BTreeMap<u32, u64>,
}

/// A cluster as the state store holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub cluster: u32,
    /// Unit vector.
    pub centroid: Vec<f32>,
    /// Members.
    pub size: u64,
    /// Tokens of its members.
    pub tokens: u64,
    /// Members neither scored nor taken (kept by the store: epochs add, rounds remove).
    #[serde(default)]
    pub fresh: u64,
}

/// A document's membership: where to fetch it again (the shard of `epoch`, row group, row),
/// never its text nor its id (both are in the shard, at that row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub cluster: u32,
    /// The epoch (shard) it was read in; `StateStore::shard_paths` maps it to the file.
    pub epoch: u64,
    pub row_group: u32,
    /// Row in the shard, over all row groups.
    pub row: u64,
    pub tokens: u32,
    /// `member_flags` bits.
    pub flags: u8,
}

impl Member {
    /// A member as the store's tables hold it: 32-bit (epoch, row group, row).
    fn stored(
        cluster: u32,
        (epoch, row_group, row): (u32, u32, u32),
        tokens: u32,
        flags: u8,
    ) -> Member {
        Member {
            cluster,
            epoch: u64::from(epoch),
            row_group,
            row: u64::from(row),
            tokens,
            flags,
        }
    }

    /// Where the bandit fetches it again.
    pub fn loc(&self) -> crate::bandit::DocLoc {
        crate::bandit::DocLoc {
            shard: self.epoch,
            row_group: self.row_group,
            row: self.row,
        }
    }
}

/// The fixed-width keys and values of the tables with a row per document. Big-endian, so that
/// the byte order redb sorts by is the order of the numbers. Epochs and rows are held in 32
/// bits (4 billion shards, 4 billion rows a shard; `narrow` refuses more).
pub mod layout {
    fn be32(bytes: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
    }

    /// (cluster, sample key, epoch, row): the draw order of the unsampled members.
    pub fn unsampled_key(cluster: u32, sample_key: u64, epoch: u32, row: u32) -> [u8; 20] {
        let mut key = [0u8; 20];
        key[..4].copy_from_slice(&cluster.to_be_bytes());
        key[4..12].copy_from_slice(&sample_key.to_be_bytes());
        key[12..16].copy_from_slice(&epoch.to_be_bytes());
        key[16..].copy_from_slice(&row.to_be_bytes());
        key
    }

    /// (cluster, sample key, epoch, row) of an `unsampled_key`.
    pub fn parse_unsampled_key(key: &[u8; 20]) -> (u32, u64, u32, u32) {
        (
            be32(key, 0),
            u64::from_be_bytes(key[4..12].try_into().expect("8 bytes")),
            be32(key, 12),
            be32(key, 16),
        )
    }

    /// (cluster, epoch, row): a sampled member.
    pub fn sampled_key(cluster: u32, epoch: u32, row: u32) -> [u8; 12] {
        let mut key = [0u8; 12];
        key[..4].copy_from_slice(&cluster.to_be_bytes());
        key[4..8].copy_from_slice(&epoch.to_be_bytes());
        key[8..].copy_from_slice(&row.to_be_bytes());
        key
    }

    pub fn parse_sampled_key(key: &[u8; 12]) -> (u32, u32, u32) {
        (be32(key, 0), be32(key, 4), be32(key, 8))
    }

    /// (row group, tokens) of an unsampled member.
    pub fn member_value(row_group: u32, tokens: u32) -> [u8; 8] {
        let mut value = [0u8; 8];
        value[..4].copy_from_slice(&row_group.to_be_bytes());
        value[4..].copy_from_slice(&tokens.to_be_bytes());
        value
    }

    pub fn parse_member_value(value: &[u8]) -> (u32, u32) {
        (be32(value, 0), be32(value, 4))
    }

    /// (row group, tokens, flags) of a sampled member.
    pub fn sampled_value(row_group: u32, tokens: u32, flags: u8) -> [u8; 9] {
        let mut value = [0u8; 9];
        value[..8].copy_from_slice(&member_value(row_group, tokens));
        value[8] = flags;
        value
    }

    pub fn parse_sampled_value(value: &[u8; 9]) -> (u32, u32, u8) {
        let (row_group, tokens) = parse_member_value(value);
        (row_group, tokens, value[8])
    }

    /// An id's key (`super::id_key`, 96 bits) as the id table holds it.
    pub fn id_key(key: u128) -> [u8; 12] {
        key.to_be_bytes()[4..].try_into().expect("12 bytes")
    }

    pub fn parse_id_key(key: &[u8; 12]) -> u128 {
        let mut bytes = [0u8; 16];
        bytes[4..].copy_from_slice(key);
        u128::from_be_bytes(bytes)
    }

    /// The epoch where an id was first accepted.
    pub fn id_value(epoch: u32) -> [u8; 4] {
        epoch.to_be_bytes()
    }

    pub fn parse_id_value(value: &[u8; 4]) -> u64 {
        u64::from(u32::from_be_bytes(*value))
    }

    /// A document's location (epoch, row) as the dedup tables hold it.
    pub fn location(epoch: u32, row: u32) -> [u8; 8] {
        let mut value = [0u8; 8];
        value[..4].copy_from_slice(&epoch.to_be_bytes());
        value[4..].copy_from_slice(&row.to_be_bytes());
        value
    }

    pub fn parse_location(value: &[u8; 8]) -> (u64, u64) {
        let epoch = u32::from_be_bytes(value[..4].try_into().expect("4 bytes"));
        let row = u32::from_be_bytes(value[4..].try_into().expect("4 bytes"));
        (u64::from(epoch), u64::from(row))
    }
}

/// A selected row waiting for its output file.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PendingRow {
    pub member: crate::bandit::MemberRef,
    pub round: u64,
    /// `None` when taken unscored (block or explore).
    pub influence: Option<f64>,
}

/// What clustering adds to an epoch's commit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterCommit {
    /// Members assigned in this epoch (they may belong to earlier epochs: documents held for
    /// the initial fit are assigned when it runs).
    pub members: Vec<Member>,
    /// Clusters whose centroid, size or tokens changed.
    pub clusters: Vec<ClusterInfo>,
    /// The assign stage's state after this epoch, so a resumed job continues exactly.
    pub state: Vec<u8>,
    /// The job's seed: it fixes each member's place in the draw order.
    pub seed: u64,
    /// What `semdedup` adds to its index with this epoch.
    #[serde(default)]
    pub semantic: SemanticCommit,
}

/// What the `semdedup` strategy adds to the store with an epoch (`cluster::semdedup`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SemanticCommit {
    /// (band key, row) of band keys new to the index.
    pub bands: Vec<(u64, u64)>,
    /// (row, quantised vector) of the documents `bands` points to.
    pub vectors: Vec<(u64, Vec<u8>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardStatus {
    /// Seen and given an epoch, not yet committed.
    Pending,
    Done,
    /// Unreadable: reported, never retried.
    Quarantined,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardRecord {
    pub epoch: u64,
    pub status: ShardStatus,
    pub bytes: u64,
}

/// A shard waiting for its epoch to be processed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedShard {
    pub epoch: u64,
    pub path: PathBuf,
}

/// What one committed epoch did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub shard: String,
    pub quarantined: Option<String>,
    pub rows: u64,
    pub docs: u64,
    pub rejected: u64,
    /// Rows rejected for a repeated id.
    pub duplicates: u64,
    /// Rows rejected for a text an earlier document has (`duplicate-text`).
    #[serde(default)]
    pub duplicate_texts: u64,
    /// Rows rejected as semantic duplicates (`semantic-duplicate`, the `semdedup` strategy).
    #[serde(default)]
    pub semantic_duplicates: u64,
    /// Rows rejected as near duplicates of an earlier kept document (`near-duplicate`).
    #[serde(default)]
    pub near_duplicates: u64,
    pub selected: u64,
    pub tokens: u64,
    pub selected_tokens: u64,
    pub file: Option<String>,
    /// Tokens of the accepted documents by the shard's `source` column (empty when it has none).
    #[serde(default)]
    pub tokens_by_source: BTreeMap<String, u64>,
}

/// A rejected row as the store keeps it: (epoch, row) and the reject.
pub type RejectedRow = ((u64, u64), Reject);

/// What text dedup adds to an epoch's commit: the epoch's kept documents that are the first
/// with their text or band key (`select::text_dedup`), by row.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DedupCommit {
    /// (text hash, row).
    pub texts: Vec<(u64, u64)>,
    /// (band key, row).
    pub bands: Vec<(u64, u64)>,
    /// (row, sketch) of the documents `bands` points to.
    pub sketches: Vec<(u64, Vec<u8>)>,
}

pub struct EpochCommit {
    pub epoch: u64,
    pub record: EpochRecord,
    /// (id, row) of every document accepted in the epoch, selected or not.
    pub accepted: Vec<(String, u64)>,
    pub rejects: Vec<Reject>,
    /// Membership, clusters and clusterer state (clustering jobs only).
    pub clusters: Option<ClusterCommit>,
    /// The epoch's candidates for the factor-fitting sample: (priority, row, row group) of its
    /// documents with the lowest seeded priorities; the store keeps the lowest `fit_sample_size`
    /// of all epochs (a bottom-k sample: uniform without replacement, whatever the order).
    pub fit_sample: Vec<(u64, u64, u32)>,
    pub fit_sample_size: usize,
    pub dedup: DedupCommit,
}

pub struct StateStore {
    db: Database,
    path: PathBuf,
}

/// How long a job waits for a store another process holds open.
const OPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Opens (or creates) the store for a job. `quad status` and `quad inspect` hold the store
/// for the moment they read it when no job runs: a job that starts then waits for them
/// rather than failing. A store another job holds still fails, after `OPEN_WAIT`.
fn create_waiting(path: &Path) -> Result<Database, redb::DatabaseError> {
    let deadline = std::time::Instant::now() + OPEN_WAIT;
    loop {
        match Database::builder()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(path)
        {
            Err(redb::DatabaseError::DatabaseAlreadyOpen)
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            opened => return opened,
        }
    }
}

impl StateStore {
    /// Opens (or creates) the store. A store made by a job with other selection settings is
    /// refused, since resuming it would mix two selections in one output.
    pub fn open(path: &Path, fingerprint: &serde_json::Value) -> Result<StateStore, StateError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| StateError::store(path, e))?;
        }
        let db = create_waiting(path).map_err(|e| StateError::store(path, e))?;
        let store = StateStore {
            db,
            path: path.to_path_buf(),
        };
        let wanted = fingerprint.to_string();
        let txn = store.db.begin_write().map_err(|e| store.err(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| store.err(e))?;
            let existing = meta
                .get("fingerprint")
                .map_err(|e| store.err(e))?
                .map(|v| v.value().to_string());
            match existing {
                Some(existing) if existing != wanted => {
                    let old: serde_json::Value =
                        serde_json::from_str(&existing).unwrap_or_default();
                    let changed = fingerprint
                        .as_object()
                        .map(|new| {
                            new.iter()
                                .filter(|(k, v)| old.get(k.as_str()) != Some(v))
                                .map(|(k, _)| k.clone())
                                .collect::<Vec<_>>()
                                .join(", ")
                        })
                        .unwrap_or_default();
                    return Err(StateError::SpecChanged {
                        path: path.to_path_buf(),
                        changed,
                    });
                }
                Some(_) => {}
                None => {
                    meta.insert("fingerprint", wanted.as_str())
                        .map_err(|e| store.err(e))?;
                    meta.insert(LAYOUT_KEY, STORE_LAYOUT)
                        .map_err(|e| store.err(e))?;
                }
            }
            let layout = meta
                .get(LAYOUT_KEY)
                .map_err(|e| store.err(e))?
                .map(|v| v.value().to_string());
            store.check_layout(layout)?;
            // Create every table so readers never meet a missing one.
            txn.open_table(SHARDS).map_err(|e| store.err(e))?;
            txn.open_table(EPOCHS).map_err(|e| store.err(e))?;
            txn.open_table(OUTPUTS).map_err(|e| store.err(e))?;
            txn.open_table(runs::RANKS).map_err(|e| store.err(e))?;
            txn.open_table(REJECTS).map_err(|e| store.err(e))?;
            txn.open_table(CLUSTERS).map_err(|e| store.err(e))?;
            txn.open_table(CLUSTERER).map_err(|e| store.err(e))?;
            txn.open_table(SAMPLED).map_err(|e| store.err(e))?;
            txn.open_table(PENDING).map_err(|e| store.err(e))?;
            txn.open_table(FIT_SAMPLE).map_err(|e| store.err(e))?;
            txn.open_table(SKETCHES).map_err(|e| store.err(e))?;
            txn.open_table(SEMANTIC_VECTORS).map_err(|e| store.err(e))?;
            txn.open_table(ADMITTED).map_err(|e| store.err(e))?;
            txn.open_table(processes::HELD).map_err(|e| store.err(e))?;
            txn.open_table(processes::SEMANTIC_SELECTED)
                .map_err(|e| store.err(e))?;
            txn.open_table(processes::ASSIGNED)
                .map_err(|e| store.err(e))?;
        }
        txn.commit().map_err(|e| store.err(e))?;
        Ok(store)
    }

    /// Opens an existing store to read it (inspection, tests), whatever job made it.
    pub fn open_existing(path: &Path) -> Result<StateStore, StateError> {
        if !path.exists() {
            return Err(StateError::store(
                path,
                "no state store here (has the job run?)",
            ));
        }
        let db = Database::builder()
            .set_cache_size(STORE_CACHE_BYTES)
            .open(path)
            .map_err(|e| StateError::store(path, e))?;
        let store = StateStore {
            db,
            path: path.to_path_buf(),
        };
        let layout = {
            let txn = store.db.begin_read().map_err(|e| store.err(e))?;
            match txn.open_table(META) {
                Ok(meta) => meta
                    .get(LAYOUT_KEY)
                    .map_err(|e| store.err(e))?
                    .map(|v| v.value().to_string()),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(store.err(e)),
            }
        };
        store.check_layout(layout)?;
        Ok(store)
    }

    /// Refuses a store whose tables have another layout than this build's.
    fn check_layout(&self, found: Option<String>) -> Result<(), StateError> {
        match found.as_deref() {
            Some(STORE_LAYOUT) => Ok(()),
            found => Err(StateError::Layout {
                path: self.path.clone(),
                found: found.unwrap_or("1").to_string(),
                expected: STORE_LAYOUT,
            }),
        }
    }

    fn err(&self, e: impl std::fmt::Display) -> StateError {
        StateError::store(&self.path, e)
    }

    /// Moves the store's pages to the front of the file and cuts the free space off. redb grows
    /// the file by doubling it (until 4 GiB), and a merge of runs (`runs`) holds the old runs
    /// and the new one until its commit, so a run leaves up to twice its pages in the file.
    /// Needs the only handle on the store.
    pub fn compact(&mut self) -> Result<(), StateError> {
        while self.db.compact().map_err(|e| self.err(e))? {}
        Ok(())
    }

    /// An epoch or row as the member and id tables hold it (32 bits).
    fn narrow(&self, what: &str, value: u64) -> Result<u32, StateError> {
        u32::try_from(value).map_err(|_| {
            self.err(format!(
                "{what} {value} is past what the store holds (2^32 - 1)"
            ))
        })
    }

    /// Gives every shard not seen before the next epoch number (in path order) and returns
    /// all shards whose epoch is not committed yet, by epoch.
    pub fn register_shards(&self, paths: &[PathBuf]) -> Result<Vec<PlannedShard>, StateError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let mut planned = Vec::new();
        {
            let mut shards = txn.open_table(SHARDS).map_err(|e| self.err(e))?;
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            let mut next: u64 = meta
                .get("next_epoch")
                .map_err(|e| self.err(e))?
                .and_then(|v| v.value().parse().ok())
                .unwrap_or(0);
            for path in paths {
                let key = path.to_string_lossy();
                let existing = shards
                    .get(key.as_ref())
                    .map_err(|e| self.err(e))?
                    .map(|v| v.value().to_string());
                let record = match existing {
                    Some(json) => {
                        serde_json::from_str::<ShardRecord>(&json).map_err(|e| self.err(e))?
                    }
                    None => {
                        let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                        let record = ShardRecord {
                            epoch: next,
                            status: ShardStatus::Pending,
                            bytes,
                        };
                        next += 1;
                        let json = serde_json::to_string(&record).map_err(|e| self.err(e))?;
                        shards
                            .insert(key.as_ref(), json.as_str())
                            .map_err(|e| self.err(e))?;
                        record
                    }
                };
                if record.status == ShardStatus::Pending {
                    planned.push(PlannedShard {
                        epoch: record.epoch,
                        path: path.clone(),
                    });
                }
            }
            meta.insert("next_epoch", next.to_string().as_str())
                .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))?;
        planned.sort_by_key(|p| p.epoch);
        Ok(planned)
    }

    /// Epochs of shards registered but not yet committed.
    pub fn pending_epochs(&self) -> Result<std::collections::BTreeSet<u64>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(SHARDS).map_err(|e| self.err(e))?;
        let mut out = std::collections::BTreeSet::new();
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (_, v) = entry.map_err(|e| self.err(e))?;
            let record: ShardRecord = serde_json::from_str(v.value()).map_err(|e| self.err(e))?;
            if record.status == ShardStatus::Pending {
                out.insert(record.epoch);
            }
        }
        Ok(out)
    }

    /// Records an epoch: its summary, its output file, the shard's new status, accepted ids and
    /// rejected rows, all in one transaction.
    pub fn commit_epoch(&self, commit: &EpochCommit) -> Result<(), StateError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut epochs = txn.open_table(EPOCHS).map_err(|e| self.err(e))?;
            let json = serde_json::to_string(&commit.record).map_err(|e| self.err(e))?;
            epochs
                .insert(commit.epoch, json.as_str())
                .map_err(|e| self.err(e))?;
            if let Some(file) = &commit.record.file {
                let mut outputs = txn.open_table(OUTPUTS).map_err(|e| self.err(e))?;
                outputs
                    .insert(file.as_str(), commit.epoch)
                    .map_err(|e| self.err(e))?;
            }
            let mut shards = txn.open_table(SHARDS).map_err(|e| self.err(e))?;
            let existing = shards
                .get(commit.record.shard.as_str())
                .map_err(|e| self.err(e))?
                .map(|v| v.value().to_string());
            let mut record = match existing {
                Some(json) => {
                    serde_json::from_str::<ShardRecord>(&json).map_err(|e| self.err(e))?
                }
                None => ShardRecord {
                    epoch: commit.epoch,
                    status: ShardStatus::Pending,
                    bytes: 0,
                },
            };
            record.status = if commit.record.quarantined.is_some() {
                ShardStatus::Quarantined
            } else {
                ShardStatus::Done
            };
            let json = serde_json::to_string(&record).map_err(|e| self.err(e))?;
            shards
                .insert(commit.record.shard.as_str(), json.as_str())
                .map_err(|e| self.err(e))?;
            let accepted = commit.accepted.iter().map(|(id, _)| id_key(id));
            self.write_ids(&txn, commit.epoch, accepted)?;
            let mut rejects = txn.open_table(REJECTS).map_err(|e| self.err(e))?;
            for reject in &commit.rejects {
                let json = serde_json::to_string(reject).map_err(|e| self.err(e))?;
                rejects
                    .insert((commit.epoch, reject.row), json.as_str())
                    .map_err(|e| self.err(e))?;
            }
            if let Some(clusters) = &commit.clusters {
                self.write_clusters(&txn, commit.epoch, clusters)?;
                let semantic = &clusters.semantic;
                self.write_index(
                    &txn,
                    commit.epoch,
                    &[(&SEMANTIC_BANDS, &semantic.bands)],
                    (SEMANTIC_VECTORS, &semantic.vectors),
                )?;
            }
            let dedup = &commit.dedup;
            self.write_index(
                &txn,
                commit.epoch,
                &[(&TEXTS, &dedup.texts), (&BANDS, &dedup.bands)],
                (SKETCHES, &dedup.sketches),
            )?;
            let mut sample = txn.open_table(FIT_SAMPLE).map_err(|e| self.err(e))?;
            for &(priority, row, row_group) in &commit.fit_sample {
                sample
                    .insert((priority, commit.epoch, row), row_group)
                    .map_err(|e| self.err(e))?;
            }
            while sample.len().map_err(|e| self.err(e))? > commit.fit_sample_size as u64 {
                sample.pop_last().map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// A job of several processes: what the admit stage (process 0's first worker) decided for
    /// an epoch, written to process 0's store before the verdicts leave it, so before the
    /// epoch's owner can commit it: the ids accepted, the text-dedup keys and sketches, and
    /// the tokens selected. The owners' stores hold only their own epochs; this is what a
    /// restarted admit stage reads for every process's. An epoch decided again after a
    /// restart decides the same (a decision looks only at earlier epochs' entries), so what it
    /// writes again is what is there.
    pub fn record_admitted(
        &self,
        epoch: u64,
        accepted: &[u128],
        dedup: &DedupCommit,
        selected_tokens: u64,
    ) -> Result<(), StateError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            self.write_ids(&txn, epoch, accepted.iter().copied())?;
            self.write_index(
                &txn,
                epoch,
                &[(&TEXTS, &dedup.texts), (&BANDS, &dedup.bands)],
                (SKETCHES, &dedup.sketches),
            )?;
            let mut admitted = txn.open_table(ADMITTED).map_err(|e| self.err(e))?;
            admitted
                .insert(epoch, selected_tokens)
                .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// The tokens selected in every epoch the admit stage recorded (`record_admitted`).
    pub fn admitted_tokens(&self) -> Result<BTreeMap<u64, u64>, StateError> {
        self.tokens_by_epoch(ADMITTED)
    }

    /// A table of epoch -> tokens, whole.
    fn tokens_by_epoch(
        &self,
        definition: TableDefinition<u64, u64>,
    ) -> Result<BTreeMap<u64, u64>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(definition).map_err(|e| self.err(e))?;
        let mut out = BTreeMap::new();
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (epoch, tokens) = entry.map_err(|e| self.err(e))?;
            out.insert(epoch.value(), tokens.value());
        }
        Ok(out)
    }

    /// The ids an epoch accepted (their keys), as a new run of `IDS`: key -> epoch.
    fn write_ids(
        &self,
        txn: &redb::WriteTransaction,
        epoch: u64,
        keys: impl Iterator<Item = u128>,
    ) -> Result<(), StateError> {
        let value = layout::id_value(self.narrow("epoch", epoch)?);
        let mut keyed: Vec<([u8; 12], [u8; 4])> =
            keys.map(|key| (layout::id_key(key), value)).collect();
        keyed.sort_unstable_by_key(|(key, _)| *key);
        keyed.dedup_by_key(|(key, _)| *key);
        IDS.insert_sorted(txn, &keyed).map_err(|e| self.err(e))
    }

    /// An epoch's additions to a dedup index: (key, row) of keys new to each leveled table
    /// (the first kept document with them), and (row, bytes) of what they point to.
    #[allow(clippy::type_complexity)]
    fn write_index(
        &self,
        txn: &redb::WriteTransaction,
        epoch: u64,
        firsts: &[(&runs::LeveledTable<8, 8>, &Vec<(u64, u64)>)],
        (blob_table, blobs): (TableDefinition<(u64, u64), &[u8]>, &Vec<(u64, Vec<u8>)>),
    ) -> Result<(), StateError> {
        let epoch32 = self.narrow("epoch", epoch)?;
        for &(table, entries) in firsts {
            // Sorted as integers (big-endian bytes sort the same way, and slower).
            let mut sorted = entries.clone();
            sorted.sort_unstable_by_key(|&(key, _)| key);
            // The admit stage sends only keys new to the store, each once.
            sorted.dedup_by_key(|(key, _)| *key);
            let mut keyed = Vec::with_capacity(sorted.len());
            for (key, row) in sorted {
                let row = self.narrow("row", row)?;
                keyed.push((key.to_be_bytes(), layout::location(epoch32, row)));
            }
            table.insert_sorted(txn, &keyed).map_err(|e| self.err(e))?;
        }
        let mut narrowed = Vec::with_capacity(blobs.len());
        for (row, bytes) in blobs {
            narrowed.push((self.narrow("row", *row)?, bytes.as_slice()));
        }
        let mut table = txn.open_table(blob_table).map_err(|e| self.err(e))?;
        blob_blocks::write(&mut table, epoch, &narrowed).map_err(|e| self.err(e))
    }

    fn write_clusters(
        &self,
        txn: &redb::WriteTransaction,
        epoch: u64,
        commit: &ClusterCommit,
    ) -> Result<(), StateError> {
        let mut sampled = txn.open_table(SAMPLED).map_err(|e| self.err(e))?;
        let mut joined: BTreeMap<u32, u64> = BTreeMap::new();
        let mut held: BTreeMap<u32, processes::Joined> = BTreeMap::new();
        let mut rows: Vec<([u8; 20], [u8; 8])> = Vec::with_capacity(commit.members.len());
        for m in &commit.members {
            let share = held.entry(m.cluster).or_default();
            share.docs += 1;
            share.tokens += u64::from(m.tokens);
            let (epoch, row) = (self.narrow("epoch", m.epoch)?, self.narrow("row", m.row)?);
            if m.flags != 0 {
                let value = layout::sampled_value(m.row_group, m.tokens, m.flags);
                sampled
                    .insert(&layout::sampled_key(m.cluster, epoch, row), &value)
                    .map_err(|e| self.err(e))?;
                continue;
            }
            let sample_key = crate::bandit::draw::sample_key(commit.seed, &m.loc());
            rows.push((
                layout::unsampled_key(m.cluster, sample_key, epoch, row),
                layout::member_value(m.row_group, m.tokens),
            ));
        }
        // A new run in key order. An epoch's members are new to the table: its commit is the
        // only one that adds them.
        rows.sort_unstable_by_key(|row| row.0);
        rows.dedup_by_key(|row| row.0);
        for (key, _) in &rows {
            *joined
                .entry(layout::parse_unsampled_key(key).0)
                .or_default() += 1;
        }
        UNSAMPLED
            .insert_sorted(txn, &rows)
            .map_err(|e| self.err(e))?;
        let mut clusters = txn.open_table(CLUSTERS).map_err(|e| self.err(e))?;
        for c in &commit.clusters {
            let before = match clusters.get(c.cluster).map_err(|e| self.err(e))? {
                Some(v) => {
                    bincode::deserialize::<ClusterInfo>(v.value())
                        .map_err(|e| self.err(e))?
                        .fresh
                }
                None => 0,
            };
            let info = ClusterInfo {
                fresh: before + joined.remove(&c.cluster).unwrap_or(0),
                ..c.clone()
            };
            let value = bincode::serialize(&info).map_err(|e| self.err(e))?;
            clusters
                .insert(c.cluster, value.as_slice())
                .map_err(|e| self.err(e))?;
        }
        if let Some((cluster, _)) = joined.first_key_value() {
            return Err(self.err(format!(
                "internal: members joined cluster {cluster}, which the commit does not update"
            )));
        }
        drop(clusters);
        self.add_held(txn, epoch, &held, &commit.clusters)?;
        let mut state = txn.open_table(CLUSTERER).map_err(|e| self.err(e))?;
        state
            .insert(CLUSTERER_KEY, commit.state.as_slice())
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Every cluster with its centroid, size and tokens, by cluster id.
    pub fn clusters(&self) -> Result<Vec<ClusterInfo>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(CLUSTERS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (_, v) = entry.map_err(|e| self.err(e))?;
            out.push(bincode::deserialize(v.value()).map_err(|e| self.err(e))?);
        }
        Ok(out)
    }

    /// The members of one cluster, in (epoch, row) order: the unsampled ones (flags 0) and
    /// the sampled ones.
    pub fn members(&self, cluster: u32) -> Result<Vec<Member>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        let unsampled = UNSAMPLED.open(&txn).map_err(|e| self.err(e))?;
        let (low, high) = (
            layout::unsampled_key(cluster, 0, 0, 0),
            layout::unsampled_key(cluster, u64::MAX, u32::MAX, u32::MAX),
        );
        unsampled
            .for_each_in(&low, &high, |k, v| {
                let (cluster, _, epoch, row) = layout::parse_unsampled_key(k);
                let (row_group, tokens) = layout::parse_member_value(v);
                out.push(Member::stored(cluster, (epoch, row_group, row), tokens, 0));
            })
            .map_err(|e| self.err(e))?;
        let sampled = txn.open_table(SAMPLED).map_err(|e| self.err(e))?;
        let (low, high) = (
            layout::sampled_key(cluster, 0, 0),
            layout::sampled_key(cluster, u32::MAX, u32::MAX),
        );
        for entry in sampled
            .range::<&[u8; 12]>(&low..=&high)
            .map_err(|e| self.err(e))?
        {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let (cluster, epoch, row) = layout::parse_sampled_key(k.value());
            let (row_group, tokens, flags) = layout::parse_sampled_value(v.value());
            out.push(Member::stored(
                cluster,
                (epoch, row_group, row),
                tokens,
                flags,
            ));
        }
        out.sort_unstable_by_key(|m| (m.epoch, m.row));
        Ok(out)
    }

    /// The assign stage's state after the last committed epoch; None before the first.
    pub fn clusterer_state(&self) -> Result<Option<Vec<u8>>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(CLUSTERER).map_err(|e| self.err(e))?;
        Ok(table
            .get(CLUSTERER_KEY)
            .map_err(|e| self.err(e))?
            .map(|v| v.value().to_vec()))
    }

    /// The shard file of every registered epoch.
    pub fn shard_paths(&self) -> Result<BTreeMap<u64, PathBuf>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(SHARDS).map_err(|e| self.err(e))?;
        let mut out = BTreeMap::new();
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let record: ShardRecord = serde_json::from_str(v.value()).map_err(|e| self.err(e))?;
            out.insert(record.epoch, PathBuf::from(k.value()));
        }
        Ok(out)
    }

    /// The committed epoch where each id was first accepted. One read transaction for the
    /// whole batch.
    pub fn first_seen<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<Option<u64>>, StateError> {
        let keys: Vec<u128> = ids.into_iter().map(id_key).collect();
        self.first_seen_keys(&keys)
    }

    /// `first_seen` by the ids' keys (`id_key`).
    pub fn first_seen_keys(&self, keys: &[u128]) -> Result<Vec<Option<u64>>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let ids = IDS.open(&txn).map_err(|e| self.err(e))?;
        keys.iter()
            .map(|&key| {
                Ok(ids
                    .get(&layout::id_key(key))
                    .map_err(|e| self.err(e))?
                    .map(|v| layout::parse_id_value(&v)))
            })
            .collect()
    }

    /// Calls `f` with the key of every accepted id, in no particular order (to fill a dedup
    /// filter).
    pub fn for_each_id_key(&self, mut f: impl FnMut(u128)) -> Result<(), StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let ids = IDS.open(&txn).map_err(|e| self.err(e))?;
        ids.for_each_in(&[0; 12], &[0xff; 12], |k, _| f(layout::parse_id_key(k)))
            .map_err(|e| self.err(e))
    }

    /// The location (epoch, row) of the first kept document with each text hash (exact dedup).
    pub fn first_texts(&self, keys: &[u64]) -> Result<Vec<Option<(u64, u64)>>, StateError> {
        self.first_locations(&TEXTS, keys)
    }

    /// The location (epoch, row) of the first kept document with each band key (near dedup).
    pub fn first_bands(&self, keys: &[u64]) -> Result<Vec<Option<(u64, u64)>>, StateError> {
        self.first_locations(&BANDS, keys)
    }

    /// The location (epoch, row) of the first kept document with each `semdedup` band key.
    pub fn first_semantic_bands(
        &self,
        keys: &[u64],
    ) -> Result<Vec<Option<(u64, u64)>>, StateError> {
        self.first_locations(&SEMANTIC_BANDS, keys)
    }

    fn first_locations(
        &self,
        table: &runs::LeveledTable<8, 8>,
        keys: &[u64],
    ) -> Result<Vec<Option<(u64, u64)>>, StateError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let runs = table.open(&txn).map_err(|e| self.err(e))?;
        keys.iter()
            .map(|&key| {
                Ok(runs
                    .get(&key.to_be_bytes())
                    .map_err(|e| self.err(e))?
                    .map(|v| layout::parse_location(&v)))
            })
            .collect()
    }

    /// The stored sketches of kept documents, by location (None where there is none).
    pub fn sketches(&self, locations: &[(u64, u64)]) -> Result<Vec<Option<Vec<u8>>>, StateError> {
        self.blobs(SKETCHES, locations)
    }

    /// The stored quantised vectors of `semdedup`'s kept documents, by location (None where
    /// there is none).
    pub fn semantic_vectors(
        &self,
        locations: &[(u64, u64)],
    ) -> Result<Vec<Option<Vec<u8>>>, StateError> {
        self.blobs(SEMANTIC_VECTORS, locations)
    }

    fn blobs(
        &self,
        definition: TableDefinition<(u64, u64), &[u8]>,
        locations: &[(u64, u64)],
    ) -> Result<Vec<Option<Vec<u8>>>, StateError> {
        if locations.is_empty() {
            return Ok(Vec::new());
        }
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(definition).map_err(|e| self.err(e))?;
        locations
            .iter()
            .map(|&location| blob_blocks::read(&table, location).map_err(|e| self.err(e)))
            .collect()
    }

    /// Calls `f` with every stored text hash (`texts`) or band key (`bands`), to fill the
    /// dedup filters of a resumed run.
    pub fn for_each_dedup_key(
        &self,
        bands: bool,
        mut f: impl FnMut(u64),
    ) -> Result<(), StateError> {
        let table = if bands { &BANDS } else { &TEXTS };
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let runs = table.open(&txn).map_err(|e| self.err(e))?;
        runs.for_each_in(&[0; 8], &[0xff; 8], |k, _| f(u64::from_be_bytes(*k)))
            .map_err(|e| self.err(e))
    }

    /// Every rejected row: (epoch, row) and the reject, in that order.
    pub fn rejects(&self) -> Result<Vec<RejectedRow>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(REJECTS).map_err(|e| self.err(e))?;
        let rows = table.iter().map_err(|e| self.err(e))?;
        rows.map(|entry| {
            let (at, json) = entry.map_err(|e| self.err(e))?;
            let reject = serde_json::from_str(json.value()).map_err(|e| self.err(e))?;
            Ok((at.value(), reject))
        })
        .collect()
    }

    /// Whether epoch `epoch` is committed.
    pub fn epoch_committed(&self, epoch: u64) -> Result<bool, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(EPOCHS).map_err(|e| self.err(e))?;
        Ok(table.get(epoch).map_err(|e| self.err(e))?.is_some())
    }

    pub fn epochs(&self) -> Result<BTreeMap<u64, EpochRecord>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(EPOCHS).map_err(|e| self.err(e))?;
        let mut out = BTreeMap::new();
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            out.insert(
                k.value(),
                serde_json::from_str(v.value()).map_err(|e| self.err(e))?,
            );
        }
        Ok(out)
    }

    /// Every rejected row, in (epoch, row) order, to `f`, which returns false to stop.
    pub fn for_each_reject(
        &self,
        mut f: impl FnMut(u64, Reject) -> bool,
    ) -> Result<(), StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(REJECTS).map_err(|e| self.err(e))?;
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (key, json) = entry.map_err(|e| self.err(e))?;
            let reject: Reject = serde_json::from_str(json.value()).map_err(|e| self.err(e))?;
            if !f(key.value().0, reject) {
                break;
            }
        }
        Ok(())
    }

    pub fn outputs(&self) -> Result<HashSet<String>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(OUTPUTS).map_err(|e| self.err(e))?;
        let mut out = HashSet::new();
        for entry in table.iter().map_err(|e| self.err(e))? {
            out.insert(entry.map_err(|e| self.err(e))?.0.value().to_string());
        }
        Ok(out)
    }
}

/// The Quad loop's records (additions for the bandit; tables are created on first write).
impl StateStore {
    /// Records the bandit's decision of round `record.round` (on the bandit's worker): its
    /// record, the bandit state after it (O(k)), and the round's outcome, from which the
    /// clusters' owners carry out their parts again after a restart (`last_outcome`). Nothing of
    /// the pool is read or written: the owners' stores hold the members.
    pub fn commit_decision(
        &self,
        record: &crate::bandit::record::RoundRecord,
        bandit: &crate::bandit::Bandit,
        outcome: &crate::bandit::RoundOutcome,
    ) -> Result<(), StateError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut rounds = txn.open_table(ROUNDS).map_err(|e| self.err(e))?;
            let json = serde_json::to_string(record).map_err(|e| self.err(e))?;
            rounds
                .insert(record.round, json.as_str())
                .map_err(|e| self.err(e))?;
            let mut run = txn.open_table(RUN).map_err(|e| self.err(e))?;
            for (key, json) in [
                (BANDIT_KEY, serde_json::to_string(bandit)),
                (LAST_OUTCOME_KEY, serde_json::to_string(outcome)),
            ] {
                let json = json.map_err(|e| self.err(e))?;
                run.insert(key, json.as_str()).map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// The outcome of the last decided round (`commit_decision`), if any.
    pub fn last_outcome(&self) -> Result<Option<crate::bandit::RoundOutcome>, StateError> {
        self.run_value(LAST_OUTCOME_KEY)
    }

    /// Carries out a decided round's part of the members this store holds, in one transaction,
    /// once (worker `worker` answers for the store): the sampled members leave the draw order
    /// (and their clusters' unsampled counts), their flags are set, unscorable members are
    /// rejected, and the selected rows join the pending output. `every_member_here`: the store
    /// holds every member of the job (one process), so a member it lacks is an error; otherwise
    /// the members of other stores are left to them. Returns the part carried out, or None,
    /// writing nothing, when this store had carried out the round already (a round replayed
    /// after a restart). With the part: how many members left the unsampled ones, per cluster.
    pub fn apply_round_part(
        &self,
        worker: u64,
        seed: u64,
        part: &crate::bandit::RoundPart,
        every_member_here: bool,
    ) -> Result<Option<AppliedPart>, StateError> {
        let key = format!("{APPLIED_ROUND_PREFIX}{worker}");
        if let Some(done) = self.run_value::<u64>(&key)? {
            if done >= part.round {
                return Ok(None);
            }
        }
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let part = if every_member_here {
            part.clone()
        } else {
            self.held_part(&txn, seed, part)?
        };
        let left = self.write_part(&txn, seed, &part)?;
        {
            let mut run = txn.open_table(RUN).map_err(|e| self.err(e))?;
            run.insert(key.as_str(), part.round.to_string().as_str())
                .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))?;
        Ok(Some(AppliedPart { part, left }))
    }

    /// The part of `part` whose members this store holds (unsampled or sampled before).
    fn held_part(
        &self,
        txn: &redb::WriteTransaction,
        seed: u64,
        part: &crate::bandit::RoundPart,
    ) -> Result<crate::bandit::RoundPart, StateError> {
        let unsampled = UNSAMPLED.open(txn).map_err(|e| self.err(e))?;
        let sampled = txn.open_table(SAMPLED).map_err(|e| self.err(e))?;
        let mut held = HashSet::new();
        for m in part.sampled() {
            let (epoch, row) = (
                self.narrow("epoch", m.loc.shard)?,
                self.narrow("row", m.loc.row)?,
            );
            let sample_key = crate::bandit::draw::sample_key(seed, &m.loc);
            let here = unsampled
                .get(&layout::unsampled_key(m.cluster, sample_key, epoch, row))
                .map_err(|e| self.err(e))?
                .is_some()
                || sampled
                    .get(&layout::sampled_key(m.cluster, epoch, row))
                    .map_err(|e| self.err(e))?
                    .is_some();
            if here {
                held.insert(m);
            }
        }
        Ok(part.clone().only(|m| held.contains(m)))
    }

    fn write_part(
        &self,
        txn: &redb::WriteTransaction,
        seed: u64,
        part: &crate::bandit::RoundPart,
    ) -> Result<BTreeMap<u32, u64>, StateError> {
        let mut flags: BTreeMap<(u32, u64, u64), u8> = BTreeMap::new();
        for (m, _) in &part.scored {
            *flags
                .entry((m.cluster, m.loc.shard, m.loc.row))
                .or_default() |= member_flags::SCORED;
        }
        for (m, _) in &part.selected {
            *flags
                .entry((m.cluster, m.loc.shard, m.loc.row))
                .or_default() |= member_flags::SELECTED;
        }
        let mut rejects = txn.open_table(REJECTS).map_err(|e| self.err(e))?;
        for (m, reason) in &part.unscorable {
            *flags
                .entry((m.cluster, m.loc.shard, m.loc.row))
                .or_default() |= member_flags::UNSCORABLE;
            let reject = Reject {
                row: m.loc.row,
                column: "quad_influence".into(),
                reason: reason.clone(),
                matched: None,
            };
            let json = serde_json::to_string(&reject).map_err(|e| self.err(e))?;
            rejects
                .insert((m.loc.shard, m.loc.row), json.as_str())
                .map_err(|e| self.err(e))?;
        }
        let left = self.mark_sampled(txn, seed, part, &flags)?;
        self.decrement_fresh(txn, &left)?;
        let mut pending = txn.open_table(PENDING).map_err(|e| self.err(e))?;
        for (m, influence) in &part.selected {
            pending
                .insert(
                    (m.cluster, part.round, m.loc.shard, m.loc.row),
                    (m.loc.row_group, m.tokens, influence.unwrap_or(f64::NAN)),
                )
                .map_err(|e| self.err(e))?;
        }
        Ok(left)
    }

    fn decrement_fresh(
        &self,
        txn: &redb::WriteTransaction,
        left: &BTreeMap<u32, u64>,
    ) -> Result<(), StateError> {
        let mut clusters = txn.open_table(CLUSTERS).map_err(|e| self.err(e))?;
        for (&cluster, &n) in left {
            let current = clusters
                .get(cluster)
                .map_err(|e| self.err(e))?
                .map(|v| v.value().to_vec());
            let Some(current) = current else {
                return Err(self.err(format!("cluster {cluster} is not in the store")));
            };
            let mut info: ClusterInfo = bincode::deserialize(&current).map_err(|e| self.err(e))?;
            info.fresh = info.fresh.saturating_sub(n);
            let bytes = bincode::serialize(&info).map_err(|e| self.err(e))?;
            clusters
                .insert(cluster, bytes.as_slice())
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Moves the round's sampled members from the unsampled table to the sampled one with
    /// their flags (or adds the flags of one sampled before); returns how many left the
    /// unsampled table, per cluster.
    fn mark_sampled(
        &self,
        txn: &redb::WriteTransaction,
        seed: u64,
        part: &crate::bandit::RoundPart,
        flags: &BTreeMap<(u32, u64, u64), u8>,
    ) -> Result<BTreeMap<u32, u64>, StateError> {
        let mut unsampled = UNSAMPLED.open(txn).map_err(|e| self.err(e))?;
        let mut sampled = txn.open_table(SAMPLED).map_err(|e| self.err(e))?;
        let mut left: BTreeMap<u32, u64> = BTreeMap::new();
        let round = part.round;
        for m in part.sampled() {
            let (epoch, row) = (
                self.narrow("epoch", m.loc.shard)?,
                self.narrow("row", m.loc.row)?,
            );
            let bits = flags
                .get(&(m.cluster, m.loc.shard, m.loc.row))
                .copied()
                .unwrap_or(0);
            let sample_key = crate::bandit::draw::sample_key(seed, &m.loc);
            let key = layout::unsampled_key(m.cluster, sample_key, epoch, row);
            let was_unsampled = unsampled
                .remove(&key)
                .map_err(|e| self.err(e))?
                .map(|v| layout::parse_member_value(&v));
            let sampled_key = layout::sampled_key(m.cluster, epoch, row);
            let value = match was_unsampled {
                Some((row_group, tokens)) => {
                    *left.entry(m.cluster).or_default() += 1;
                    layout::sampled_value(row_group, tokens, bits)
                }
                None => {
                    let before = sampled
                        .get(&sampled_key)
                        .map_err(|e| self.err(e))?
                        .map(|v| layout::parse_sampled_value(v.value()));
                    let Some((row_group, tokens, old)) = before else {
                        return Err(self.err(format!(
                            "round {round}: member {:?} of cluster {} is not in the store",
                            m.loc, m.cluster
                        )));
                    };
                    layout::sampled_value(row_group, tokens, old | bits)
                }
            };
            sampled
                .insert(&sampled_key, &value)
                .map_err(|e| self.err(e))?;
        }
        Ok(left)
    }

    /// Draws round `round`'s pull of `request.cluster` from this store alone: the unsampled
    /// members that follow the round's seeded start in the draw order (wrapping), O(n) entries
    /// read.
    pub fn draw(
        &self,
        seed: u64,
        round: u64,
        request: &crate::bandit::PullRequest,
    ) -> Result<crate::bandit::Pull, StateError> {
        let drawn = self.draw_candidates(seed, round, request)?;
        Ok(crate::bandit::draw::merge_candidates(request, drawn))
    }

    /// This store's part of a draw: its first `sample + block` unsampled members of the cluster
    /// in the round's draw order, each with its place in that order. A job on several processes
    /// keeps each cluster's members in several stores; the first of all their candidates, in
    /// that order, are the draw (`bandit::draw::merge_candidates`).
    pub fn draw_candidates(
        &self,
        seed: u64,
        round: u64,
        request: &crate::bandit::PullRequest,
    ) -> Result<Vec<crate::bandit::draw::DrawCandidate>, StateError> {
        use crate::bandit::draw::DrawCandidate;
        use crate::bandit::{DocLoc, MemberRef};
        let c = request.cluster;
        let start = crate::bandit::draw::start_key(seed, round, c);
        let want = request.sample + request.block;
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let unsampled = UNSAMPLED.open(&txn).map_err(|e| self.err(e))?;
        let mut drawn = Vec::with_capacity(want);
        let ranges = [
            (
                layout::unsampled_key(c, start, 0, 0),
                layout::unsampled_key(c, u64::MAX, u32::MAX, u32::MAX),
            ),
            (
                layout::unsampled_key(c, 0, 0, 0),
                layout::unsampled_key(c, start.saturating_sub(1), u32::MAX, u32::MAX),
            ),
        ];
        for (i, (low, high)) in ranges.iter().enumerate() {
            if drawn.len() == want || (i == 1 && start == 0) {
                break;
            }
            let entries = unsampled
                .first_in(low, high, want - drawn.len())
                .map_err(|e| self.err(e))?;
            for (k, v) in entries {
                let (cluster, sample_key, shard, row) = layout::parse_unsampled_key(&k);
                let (row_group, tokens) = layout::parse_member_value(&v);
                drawn.push(DrawCandidate {
                    wrapped: i == 1,
                    sample_key,
                    member: MemberRef {
                        cluster,
                        loc: DocLoc {
                            shard: u64::from(shard),
                            row_group,
                            row: u64::from(row),
                        },
                        tokens: u64::from(tokens),
                    },
                });
            }
        }
        Ok(drawn)
    }

    /// Selected rows not yet in a closed output file, of the clusters `owned` accepts, in
    /// (cluster, round, epoch, row) order.
    pub fn pending_rows(
        &self,
        owned: impl Fn(&crate::bandit::MemberRef) -> bool,
    ) -> Result<Vec<PendingRow>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(PENDING).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let (cluster, round, epoch, row) = k.value();
            let (row_group, tokens, influence) = v.value();
            let member = crate::bandit::MemberRef {
                cluster,
                loc: crate::bandit::DocLoc {
                    shard: epoch,
                    row_group,
                    row,
                },
                tokens,
            };
            if !owned(&member) {
                continue;
            }
            out.push(PendingRow {
                member,
                round,
                influence: (!influence.is_nan()).then_some(influence),
            });
        }
        Ok(out)
    }

    /// Rejects selected rows that could not be fetched for output (null now, the shard gone or
    /// unreadable): each is recorded with its reason and leaves the pending table, in one
    /// transaction, so a restart neither writes nor rejects it twice.
    pub fn reject_pending(&self, rejected: &[(PendingRow, Reject)]) -> Result<(), StateError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut pending = txn.open_table(PENDING).map_err(|e| self.err(e))?;
            let mut rejects = txn.open_table(REJECTS).map_err(|e| self.err(e))?;
            for (r, reject) in rejected {
                let m = &r.member;
                pending
                    .remove((m.cluster, r.round, m.loc.shard, m.loc.row))
                    .map_err(|e| self.err(e))?;
                let json = serde_json::to_string(reject).map_err(|e| self.err(e))?;
                rejects
                    .insert((m.loc.shard, m.loc.row), json.as_str())
                    .map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Records a closed output file with the pending rows it holds, which leave the pending
    /// table, and adds its tokens by source to the run's tally, in one transaction.
    pub fn commit_output_file(
        &self,
        file: &str,
        round: u64,
        rows: &[PendingRow],
        tokens_by_source: &BTreeMap<String, u64>,
    ) -> Result<(), StateError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut outputs = txn.open_table(OUTPUTS).map_err(|e| self.err(e))?;
            outputs.insert(file, round).map_err(|e| self.err(e))?;
            let mut pending = txn.open_table(PENDING).map_err(|e| self.err(e))?;
            for r in rows {
                pending
                    .remove((
                        r.member.cluster,
                        r.round,
                        r.member.loc.shard,
                        r.member.loc.row,
                    ))
                    .map_err(|e| self.err(e))?;
            }
            let mut run = txn.open_table(RUN).map_err(|e| self.err(e))?;
            let mut tally: BTreeMap<String, u64> =
                match run.get(SELECTED_MIX_KEY).map_err(|e| self.err(e))? {
                    Some(v) => serde_json::from_str(v.value()).map_err(|e| self.err(e))?,
                    None => BTreeMap::new(),
                };
            for (source, tokens) in tokens_by_source {
                *tally.entry(source.clone()).or_default() += tokens;
            }
            let json = serde_json::to_string(&tally).map_err(|e| self.err(e))?;
            run.insert(SELECTED_MIX_KEY, json.as_str())
                .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// The selected tokens by the rows' `source` column, over every closed output file.
    pub fn selected_tokens_by_source(&self) -> Result<BTreeMap<String, u64>, StateError> {
        Ok(self.run_value(SELECTED_MIX_KEY)?.unwrap_or_default())
    }

    /// The factor-fitting pool sample: the `n` kept documents in sample order, each as its
    /// priority (a seeded hash of its id) and its location.
    pub fn fit_sample(&self, n: usize) -> Result<Vec<(u64, crate::bandit::DocLoc)>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(FIT_SAMPLE).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.err(e))?.take(n) {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let (priority, shard, row) = k.value();
            let loc = crate::bandit::DocLoc {
                shard,
                row_group: v.value(),
                row,
            };
            out.push((priority, loc));
        }
        Ok(out)
    }

    /// The bandit state of the last committed round, if any.
    pub fn bandit(&self) -> Result<Option<crate::bandit::Bandit>, StateError> {
        self.run_value(BANDIT_KEY)
    }

    /// Every round record, by round.
    pub fn round_records(&self) -> Result<Vec<crate::bandit::record::RoundRecord>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = match txn.open_table(ROUNDS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(e)),
        };
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (_, v) = entry.map_err(|e| self.err(e))?;
            out.push(serde_json::from_str(v.value()).map_err(|e| self.err(e))?);
        }
        Ok(out)
    }

    /// Stores a value of the run (e.g. `report::COSTS_KEY`, `report::POOL_MIX_KEY`).
    pub fn put_run_value<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StateError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut run = txn.open_table(RUN).map_err(|e| self.err(e))?;
            let json = serde_json::to_string(value).map_err(|e| self.err(e))?;
            run.insert(key, json.as_str()).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    pub fn run_value<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = match txn.open_table(RUN) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        let json = match table.get(key).map_err(|e| self.err(e))? {
            Some(v) => v.value().to_string(),
            None => return Ok(None),
        };
        serde_json::from_str(&json)
            .map(Some)
            .map_err(|e| self.err(format!("run value '{key}': {e}")))
    }
}

/// Where the state store lives (`[state]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// The redb file; defaults to `<sink.path>/_state/quad.redb`.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_assigned_once_in_path_order_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let fp = serde_json::json!({"seed": 1});
        let paths: Vec<PathBuf> = ["b.parquet", "a.parquet"]
            .iter()
            .map(PathBuf::from)
            .collect();
        let mut sorted = paths.clone();
        sorted.sort();
        {
            let store = StateStore::open(&path, &fp).unwrap();
            let plan = store.register_shards(&sorted).unwrap();
            assert_eq!(plan.iter().map(|p| p.epoch).collect::<Vec<_>>(), [0, 1]);
            let record = EpochRecord {
                shard: "a.parquet".into(),
                file: Some("part-000000.parquet".into()),
                ..Default::default()
            };
            store
                .commit_epoch(&EpochCommit {
                    epoch: 0,
                    record,
                    accepted: vec![("x".into(), 3)],
                    rejects: vec![],
                    clusters: None,
                    fit_sample: vec![],
                    fit_sample_size: 0,
                    dedup: Default::default(),
                })
                .unwrap();
        }
        let store = StateStore::open(&path, &fp).unwrap();
        let mut more = sorted.clone();
        more.push("c.parquet".into());
        let plan = store.register_shards(&more).unwrap();
        assert_eq!(
            plan,
            vec![
                PlannedShard {
                    epoch: 1,
                    path: "b.parquet".into()
                },
                PlannedShard {
                    epoch: 2,
                    path: "c.parquet".into()
                }
            ]
        );
        assert_eq!(store.first_seen(["x", "y"]).unwrap(), vec![Some(0), None]);
        assert!(store.outputs().unwrap().contains("part-000000.parquet"));
        drop(store);
        let err = StateStore::open(&path, &serde_json::json!({"seed": 2}))
            .err()
            .unwrap();
        assert!(err.to_string().contains("seed"), "{err}");
    }

    fn empty_epoch(epoch: u64, accepted: Vec<(String, u64)>) -> EpochCommit {
        EpochCommit {
            epoch,
            record: EpochRecord::default(),
            accepted,
            rejects: vec![],
            clusters: None,
            fit_sample: vec![],
            fit_sample_size: 0,
            dedup: Default::default(),
        }
    }

    #[test]
    fn a_store_of_another_layout_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let fp = serde_json::json!({"seed": 1});
        drop(StateStore::open(&path, &fp).unwrap());
        {
            // What a store of the first layout looks like: a fingerprint, no layout.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().remove(LAYOUT_KEY).unwrap();
            txn.commit().unwrap();
        }
        for err in [
            StateStore::open(&path, &fp).err().unwrap(),
            StateStore::open_existing(&path).err().unwrap(),
        ] {
            assert!(matches!(err, StateError::Layout { .. }), "{err}");
            assert!(err.to_string().contains("--reset"), "{err}");
        }
    }

    #[test]
    fn sampled_members_move_out_of_the_draw_order_and_keep_their_flags() {
        use crate::bandit::{DocLoc, MemberRef, PullRequest, RoundOutcome};
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(&dir.path().join("s.redb"), &serde_json::json!({})).unwrap();
        let members: Vec<Member> = (0..50)
            .map(|row| Member {
                cluster: 3,
                epoch: 1,
                row_group: (row / 10) as u32,
                row,
                tokens: 7,
                flags: 0,
            })
            .collect();
        let mut commit = empty_epoch(1, vec![]);
        commit.clusters = Some(ClusterCommit {
            members: members.clone(),
            clusters: vec![ClusterInfo {
                cluster: 3,
                centroid: vec![1.0],
                size: 50,
                tokens: 350,
                fresh: 0,
            }],
            state: vec![],
            seed: 9,
            semantic: Default::default(),
        });
        store.commit_epoch(&commit).unwrap();
        assert_eq!(store.members(3).unwrap(), members);
        assert_eq!(store.clusters().unwrap()[0].fresh, 50);
        let request = PullRequest {
            cluster: 3,
            sample: 4,
            block: 0,
            score: true,
            cluster_score: None,
        };
        let pull = store.draw(9, 0, &request).unwrap();
        assert_eq!(pull.members.len(), 4);
        let reference: Vec<MemberRef> = members
            .iter()
            .map(|m| MemberRef {
                cluster: 3,
                loc: m.loc(),
                tokens: 7,
            })
            .collect();
        assert!(pull.members.iter().all(|m| reference.contains(m)));
        let scored: Vec<(MemberRef, f64)> = pull.members.iter().map(|m| (*m, 1.0)).collect();
        let outcome = RoundOutcome {
            round: 0,
            selected: vec![(pull.members[0], Some(1.0))],
            scored,
            ..Default::default()
        };
        let bandit = crate::bandit::Bandit::new(
            9,
            crate::bandit::Strategy::Quad,
            crate::bandit::BanditConfig::default(),
        )
        .unwrap();
        store
            .commit_decision(&Default::default(), &bandit, &outcome)
            .unwrap();
        let part = outcome.part();
        assert!(store.apply_round_part(0, 9, &part, true).unwrap().is_some());
        assert!(store.apply_round_part(0, 9, &part, true).unwrap().is_none());
        let after = store.members(3).unwrap();
        assert_eq!(after.len(), 50, "every member is in one of the two tables");
        let flags_of = |loc: DocLoc| after.iter().find(|m| m.loc() == loc).unwrap().flags;
        assert_eq!(
            flags_of(pull.members[0].loc),
            member_flags::SCORED | member_flags::SELECTED
        );
        assert_eq!(flags_of(pull.members[1].loc), member_flags::SCORED);
        assert_eq!(after.iter().filter(|m| m.flags == 0).count(), 46);
        assert_eq!(store.clusters().unwrap()[0].fresh, 46);
        let next = store.draw(9, 0, &request).unwrap();
        assert!(next.members.iter().all(|m| !pull.members.contains(m)));
    }

    /// The target is at most 128 bytes of store per document; this checks the layout
    /// against it on a pool large enough for the B-trees' fill to show, with the ids and the
    /// draw order in several runs (4 epochs: one run of rank 2), compacted as a run leaves it.
    #[test]
    fn the_store_holds_a_document_in_at_most_128_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let mut store = StateStore::open(&path, &serde_json::json!({})).unwrap();
        let (epochs, per_epoch) = (4u64, 50_000u64);
        for epoch in 0..epochs {
            let mut commit = empty_epoch(
                epoch,
                (0..per_epoch)
                    .map(|row| (format!("doc-{epoch}-{row}"), row))
                    .collect(),
            );
            let members: Vec<Member> = (0..per_epoch)
                .map(|row| Member {
                    cluster: (row % 64) as u32,
                    epoch,
                    row_group: (row / 1000) as u32,
                    row,
                    tokens: 12,
                    flags: 0,
                })
                .collect();
            commit.clusters = Some(ClusterCommit {
                members,
                clusters: (0..64)
                    .map(|c| ClusterInfo {
                        cluster: c,
                        centroid: vec![0.0; 32],
                        size: 0,
                        tokens: 0,
                        fresh: 0,
                    })
                    .collect(),
                state: vec![],
                seed: 1,
                semantic: Default::default(),
            });
            store.commit_epoch(&commit).unwrap();
        }
        store.compact().unwrap();
        drop(store);
        let bytes = std::fs::metadata(&path).unwrap().len() as f64;
        let per_doc = bytes / (epochs * per_epoch) as f64;
        assert!(per_doc <= 128.0, "{per_doc:.1} bytes per document");
    }
}
