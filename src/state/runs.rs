//! Tables that grow by a batch of keys a commit, kept as sorted runs that merge like the digits
//! of a counter in base `FAN_IN` (Bentley and Saxe's logarithmic method, as the tiered
//! compaction of log-structured merge trees does).
//!
//! Why not one table: redb is a copy-on-write B-tree, and a commit writes every page it
//! touched. A batch whose keys are spread over the whole key space (hashed ids, the draw
//! order's random keys) touches nearly every leaf of a table that has fewer leaves than the
//! batch has keys, so an epoch's commit rewrote the whole table: O(pool) bytes written an
//! epoch, and ingest of a 10M-document pool fell from 235,000 to 42,000 documents/s by its
//! end. Here a batch becomes a new run written in key order into an empty table (appends:
//! packed leaves, each written once). Runs are ranked: a run of rank r holds the merge of
//! FAN_IN^r batches, and a rank holds at most FAN_IN - 1 runs. Adding a batch when ranks
//! 0..r are full merges their runs and the batch, in key order, into a new run of rank r, so a
//! key is rewritten once a rank it climbs: log_FAN_IN(batches) times in all, never the whole
//! pool an epoch. A point lookup reads one B-tree a run (at most FAN_IN - 1 a digit of the
//! batch count); a range read merges the runs' ranges. Removing a key removes it from the run
//! that holds it (a few pages, in place).
//!
//! A run stores its entries in blocks of up to `BLOCK_ENTRIES`, keyed by their first key (as an
//! SSTable does): a merge writes one B-tree entry a block, not a key, which made merges ~20x
//! cheaper than a B-tree insert a key (1.25 us a key and table, most of ingest at 10M). A lookup
//! finds the block with the greatest first key at or below the key and searches it.
use redb::{
    ReadOnlyTable, ReadTransaction, ReadableTable, StorageError, Table, TableDefinition,
    WriteTransaction,
};

/// The batches of every leveled table: its name -> the number of batches added, whose digits
/// in base `FAN_IN` are the runs each rank holds.
pub(super) const RANKS: TableDefinition<&str, u64> = TableDefinition::new("run_ranks");

/// Runs merged at once. Against 2 (a binary counter), 8 rewrites a key a third as often for
/// at most 7 runs a rank to read, not 1; reads are few (a draw's first entries of each run,
/// the dedup filter's positives), merges were most of ingest (BENCHMARKS.md, Scale).
const FAN_IN: u64 = 8;

/// A run's entry, copied out of its page.
pub(super) type Entry<const K: usize, const V: usize> = ([u8; K], [u8; V]);

/// A table of fixed-width keys and values kept as ranked sorted runs.
pub(super) struct LeveledTable<const K: usize, const V: usize> {
    name: &'static str,
}

/// A run: blocks of sorted entries (key then value, packed), keyed by their first key.
type RunDefinition<'a, const K: usize> = TableDefinition<'a, &'static [u8; K], &'static [u8]>;
/// A run open in a write transaction.
type WriteRun<'txn, const K: usize> = Table<'txn, &'static [u8; K], &'static [u8]>;

/// Entries a block holds at most: about 1 KiB for the ids' and draw order's 16- and 18-byte
/// entries, a quarter of a page.
const BLOCK_ENTRIES: usize = 64;

/// A transaction the runs can be opened in: read, or write (to remove from them too).
pub(super) trait OpenRuns<const K: usize, const V: usize> {
    type Run;
    fn open_run(&self, name: &str) -> Result<Self::Run, redb::TableError>;
    fn batches(&self, table: &str) -> Result<u64, redb::Error>;
}

impl<const K: usize, const V: usize> OpenRuns<K, V> for &ReadTransaction {
    type Run = ReadOnlyTable<&'static [u8; K], &'static [u8]>;

    fn open_run(&self, name: &str) -> Result<Self::Run, redb::TableError> {
        self.open_table(RunDefinition::<K>::new(name))
    }

    fn batches(&self, table: &str) -> Result<u64, redb::Error> {
        batches_in(&self.open_table(RANKS)?, table)
    }
}

impl<'txn, const K: usize, const V: usize> OpenRuns<K, V> for &'txn WriteTransaction {
    type Run = WriteRun<'txn, K>;

    fn open_run(&self, name: &str) -> Result<Self::Run, redb::TableError> {
        self.open_table(RunDefinition::<K>::new(name))
    }

    fn batches(&self, table: &str) -> Result<u64, redb::Error> {
        batches_in(&self.open_table(RANKS)?, table)
    }
}

fn batches_in(
    ranks: &impl ReadableTable<&'static str, u64>,
    table: &str,
) -> Result<u64, redb::Error> {
    Ok(ranks.get(table)?.map(|v| v.value()).unwrap_or(0))
}

impl<const K: usize, const V: usize> LeveledTable<K, V> {
    pub(super) const fn new(name: &'static str) -> Self {
        LeveledTable { name }
    }

    fn run_name(&self, rank: u32, slot: u64) -> String {
        format!("{}#{rank}.{slot}", self.name)
    }

    /// The runs' names after `batches` batches, newest first: rank 0 up, the last slot of a
    /// rank first.
    fn run_names(&self, batches: u64) -> Vec<String> {
        let mut names = Vec::new();
        let (mut rest, mut rank) = (batches, 0);
        while rest > 0 {
            for slot in (0..rest % FAN_IN).rev() {
                names.push(self.run_name(rank, slot));
            }
            rest /= FAN_IN;
            rank += 1;
        }
        names
    }

    /// Adds `batch`, sorted by key, keys unique and new to the table, as a run: the batch and
    /// the runs of ranks 0..r (all full, r the lowest rank that is not) are merged in key order
    /// into a new run of rank r, and those runs are dropped.
    pub(super) fn insert_sorted(
        &self,
        txn: &WriteTransaction,
        batch: &[Entry<K, V>],
    ) -> Result<(), redb::Error> {
        if batch.is_empty() {
            return Ok(());
        }
        debug_assert!(batch.windows(2).all(|w| w[0].0 < w[1].0));
        let batches = OpenRuns::<K, V>::batches(&txn, self.name)?;
        // The full ranks' runs, newest first, and the rank and slot of the merged run.
        let (mut rest, mut rank) = (batches, 0u32);
        while rest % FAN_IN == FAN_IN - 1 {
            rest /= FAN_IN;
            rank += 1;
        }
        let merged: Vec<String> = self
            .run_names(batches)
            .into_iter()
            .take((rank as u64 * (FAN_IN - 1)) as usize)
            .collect();
        let target_name = self.run_name(rank, rest % FAN_IN);
        {
            let sources = merged
                .iter()
                .map(|name| txn.open_table(RunDefinition::<K>::new(name)))
                .collect::<Result<Vec<_>, _>>()?;
            let mut out = txn.open_table(RunDefinition::<K>::new(&target_name))?;
            let mut writer = BlockWriter::new(&mut out);
            if sources.is_empty() {
                // A run of rank 0 is the batch itself (most commits): no merge.
                for &(key, value) in batch {
                    writer.put(&key, &value)?;
                }
            } else {
                // Newest first: the batch, then the runs; a key in two runs keeps the newest.
                let mut inputs = vec![Cursor::new(Box::new(std::iter::once(Ok(batch.to_vec()))))?];
                for table in &sources {
                    inputs.push(Cursor::new(Box::new(blocks_of::<K, V>(table.iter()?)))?);
                }
                merge_in_key_order(inputs, |key, value| writer.put(key, value))?;
            }
            writer.finish()?;
        }
        for name in &merged {
            txn.delete_table(RunDefinition::<K>::new(name))?;
        }
        let mut ranks = txn.open_table(RANKS)?;
        ranks.insert(self.name, batches + 1)?;
        Ok(())
    }

    /// The runs, newest first, to read (in a read transaction) or to read and remove from (in
    /// a write transaction).
    pub(super) fn open<X: OpenRuns<K, V>>(
        &self,
        txn: X,
    ) -> Result<Runs<X::Run, K, V>, redb::Error> {
        let batches = txn.batches(self.name)?;
        let tables = self
            .run_names(batches)
            .iter()
            .map(|name| txn.open_run(name))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Runs { tables })
    }
}

/// Calls `put` with the union of `inputs` (each sorted by key) in key order; for a key in
/// several inputs, the value of the first input that holds it.
fn merge_in_key_order<const K: usize, const V: usize>(
    mut inputs: Vec<Cursor<'_, K, V>>,
    mut put: impl FnMut(&[u8; K], &[u8; V]) -> Result<(), redb::Error>,
) -> Result<(), redb::Error> {
    loop {
        // At most FAN_IN - 1 inputs a rank plus the batch: a scan beats a heap at this size.
        let mut least: Option<(usize, &Entry<K, V>)> = None;
        for (i, input) in inputs.iter().enumerate() {
            if let Some(head) = input.head() {
                if least.is_none_or(|(_, l)| head.0 < l.0) {
                    least = Some((i, head));
                }
            }
        }
        let Some((_, &(key, value))) = least else {
            return Ok(());
        };
        put(&key, &value)?;
        for input in &mut inputs {
            if input.head().is_some_and(|(k, _)| *k == key) {
                input.advance()?;
            }
        }
    }
}

/// A merge's input: its entries in key order, a block at a time (one dynamic call a block,
/// not an entry).
struct Cursor<'a, const K: usize, const V: usize> {
    blocks: BlockSource<'a, K, V>,
    block: Vec<Entry<K, V>>,
    at: usize,
}

type BlockSource<'a, const K: usize, const V: usize> =
    Box<dyn Iterator<Item = Result<Vec<Entry<K, V>>, StorageError>> + 'a>;

impl<'a, const K: usize, const V: usize> Cursor<'a, K, V> {
    fn new(blocks: BlockSource<'a, K, V>) -> Result<Self, StorageError> {
        let mut cursor = Cursor {
            blocks,
            block: Vec::new(),
            at: 0,
        };
        cursor.refill()?;
        Ok(cursor)
    }

    fn head(&self) -> Option<&Entry<K, V>> {
        self.block.get(self.at)
    }

    fn advance(&mut self) -> Result<(), StorageError> {
        self.at += 1;
        if self.at == self.block.len() {
            self.refill()?;
        }
        Ok(())
    }

    /// The next block that has entries (none at the end).
    fn refill(&mut self) -> Result<(), StorageError> {
        self.at = 0;
        self.block.clear();
        while self.block.is_empty() {
            match self.blocks.next() {
                Some(block) => self.block = block?,
                None => break,
            }
        }
        Ok(())
    }
}

/// Writes a run's entries, given in key order, as blocks of `BLOCK_ENTRIES`.
struct BlockWriter<'r, 'txn, const K: usize, const V: usize> {
    run: &'r mut WriteRun<'txn, K>,
    block: Vec<Entry<K, V>>,
    packed: Vec<u8>,
}

impl<'r, 'txn, const K: usize, const V: usize> BlockWriter<'r, 'txn, K, V> {
    fn new(run: &'r mut WriteRun<'txn, K>) -> Self {
        BlockWriter {
            run,
            block: Vec::with_capacity(BLOCK_ENTRIES),
            packed: Vec::with_capacity(BLOCK_ENTRIES * (K + V)),
        }
    }

    fn put(&mut self, key: &[u8; K], value: &[u8; V]) -> Result<(), redb::Error> {
        self.block.push((*key, *value));
        if self.block.len() == BLOCK_ENTRIES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), redb::Error> {
        if let Some(&(first, _)) = self.block.first() {
            pack_into(&self.block, &mut self.packed);
            self.run.insert(&first, self.packed.as_slice())?;
            self.block.clear();
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), redb::Error> {
        self.flush()
    }
}

/// A block's entries, packed key then value.
fn pack<const K: usize, const V: usize>(block: &[Entry<K, V>]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(block.len() * (K + V));
    pack_into(block, &mut bytes);
    bytes
}

/// `pack` into `bytes` (cleared first), so that a writer reuses one buffer.
fn pack_into<const K: usize, const V: usize>(block: &[Entry<K, V>], bytes: &mut Vec<u8>) {
    bytes.clear();
    for (key, value) in block {
        bytes.extend_from_slice(key);
        bytes.extend_from_slice(value);
    }
}

/// A packed block's entries.
fn unpack<const K: usize, const V: usize>(bytes: &[u8]) -> impl Iterator<Item = Entry<K, V>> + '_ {
    bytes.chunks_exact(K + V).map(|entry| {
        let (key, value) = entry.split_at(K);
        (
            key.try_into().expect("K bytes"),
            value.try_into().expect("V bytes"),
        )
    })
}

/// The blocks of a run, unpacked, in key order.
fn blocks_of<'a, const K: usize, const V: usize>(
    blocks: impl Iterator<
            Item = Result<
                (
                    redb::AccessGuard<'a, &'static [u8; K]>,
                    redb::AccessGuard<'a, &'static [u8]>,
                ),
                StorageError,
            >,
        > + 'a,
) -> impl Iterator<Item = Result<Vec<Entry<K, V>>, StorageError>> + 'a {
    blocks.map(|block| block.map(|(_, bytes)| unpack::<K, V>(bytes.value()).collect()))
}

/// Calls `f` with the block that would hold `key` (the one whose first key is the greatest at
/// or below it): its first key and its packed entries. None when every block starts above
/// `key`. One B-tree lookup: the block comes with its key.
fn with_block_of<const K: usize, T>(
    run: &impl ReadableTable<&'static [u8; K], &'static [u8]>,
    key: &[u8; K],
    f: impl FnOnce(&[u8; K], &[u8]) -> T,
) -> Result<Option<T>, StorageError> {
    match run.range::<&[u8; K]>(..=key)?.next_back() {
        Some(block) => {
            let (start, bytes) = block?;
            Ok(Some(f(start.value(), bytes.value())))
        }
        None => Ok(None),
    }
}

/// Calls `f` with the entries of `run` whose keys are in `low..=high`, in key order, until `f`
/// says stop (false).
fn scan_run<const K: usize, const V: usize>(
    run: &impl ReadableTable<&'static [u8; K], &'static [u8]>,
    low: &[u8; K],
    high: &[u8; K],
    mut f: impl FnMut(&[u8; K], &[u8; V]) -> bool,
) -> Result<(), redb::Error> {
    // The block holding `low` may start below it.
    let start = with_block_of(run, low, |start, _| *start)?.unwrap_or(*low);
    for block in run.range::<&[u8; K]>(&start..=high)? {
        let (_, bytes) = block?;
        for (key, value) in unpack::<K, V>(bytes.value()) {
            if &key < low {
                continue;
            }
            if &key > high || !f(&key, &value) {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The open runs of a leveled table, newest first.
pub(super) struct Runs<T, const K: usize, const V: usize> {
    tables: Vec<T>,
}

impl<T, const K: usize, const V: usize> Runs<T, K, V>
where
    T: ReadableTable<&'static [u8; K], &'static [u8]>,
{
    /// The value of `key`, from the newest run that holds it.
    pub(super) fn get(&self, key: &[u8; K]) -> Result<Option<[u8; V]>, redb::Error> {
        for table in &self.tables {
            let found = with_block_of(table, key, |_, bytes| {
                unpack::<K, V>(bytes).find(|(k, _)| k == key)
            })?;
            if let Some(Some((_, value))) = found {
                return Ok(Some(value));
            }
        }
        Ok(None)
    }

    /// The first `n` entries with keys in `low..=high`, in key order: O(n) entries read from
    /// each run.
    pub(super) fn first_in(
        &self,
        low: &[u8; K],
        high: &[u8; K],
        n: usize,
    ) -> Result<Vec<Entry<K, V>>, redb::Error> {
        let mut out: Vec<Entry<K, V>> = Vec::new();
        if n == 0 {
            return Ok(out);
        }
        for table in &self.tables {
            let mut taken = 0;
            scan_run(table, low, high, |key, value| {
                out.push((*key, *value));
                taken += 1;
                taken < n
            })?;
        }
        // Stable: of equal keys, the newest run's entry comes first and is kept.
        out.sort_by_key(|entry| entry.0);
        out.dedup_by(|later, earlier| later.0 == earlier.0);
        out.truncate(n);
        Ok(out)
    }

    /// Calls `f` with every entry whose key is in `low..=high`, run by run (not in key order).
    pub(super) fn for_each_in(
        &self,
        low: &[u8; K],
        high: &[u8; K],
        mut f: impl FnMut(&[u8; K], &[u8; V]),
    ) -> Result<(), redb::Error> {
        for table in &self.tables {
            scan_run(table, low, high, |key, value| {
                f(key, value);
                true
            })?;
        }
        Ok(())
    }

    /// Entries in all runs, the removed ones not counted.
    #[cfg(test)]
    pub(super) fn len(&self) -> Result<u64, redb::Error> {
        let mut n = 0;
        for table in &self.tables {
            for block in table.iter()? {
                n += (block?.1.value().len() / (K + V)) as u64;
            }
        }
        Ok(n)
    }
}

impl<const K: usize, const V: usize> Runs<WriteRun<'_, K>, K, V> {
    /// Removes `key` from the run that holds it; its value, or None if no run does.
    pub(super) fn remove(&mut self, key: &[u8; K]) -> Result<Option<[u8; V]>, redb::Error> {
        for table in &mut self.tables {
            let found = with_block_of(&*table, key, |start, bytes| {
                (*start, unpack::<K, V>(bytes).collect::<Vec<Entry<K, V>>>())
            })?;
            let Some((start, block)) = found else {
                continue;
            };
            let Some(at) = block.iter().position(|(k, _)| k == key) else {
                continue;
            };
            let value = block[at].1;
            let rest: Vec<Entry<K, V>> = block
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != at)
                .map(|(_, e)| *e)
                .collect();
            // The block keeps its first key (still at or below its entries) unless it empties.
            if rest.is_empty() {
                table.remove(&start)?;
            } else {
                table.insert(&start, pack(&rest).as_slice())?;
            }
            return Ok(Some(value));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use redb::{Database, ReadableDatabase};

    const T: LeveledTable<4, 2> = LeveledTable::new("t");

    fn batch(keys: &mut Vec<u32>, tag: u16) -> Vec<Entry<4, 2>> {
        keys.sort_unstable();
        keys.dedup();
        keys.iter()
            .map(|k| (k.to_be_bytes(), tag.to_be_bytes()))
            .collect()
    }

    /// Against a BTreeMap: random batches, removals, lookups and range reads, with the runs
    /// merging as ranks fill (23 batches: merges into ranks 1 and 2 with a fan-in of 4, into
    /// rank 1 with 8), then removals that empty whole blocks.
    #[test]
    fn runs_hold_what_a_sorted_map_holds_through_merges_and_removals() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("runs.redb")).unwrap();
        let mut model = std::collections::BTreeMap::<u32, u16>::new();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for tag in 0..23u16 {
            let mut keys: Vec<u32> = (0..rng.random_range(1..300))
                .map(|_| rng.random_range(0..5_000u32))
                .filter(|k| !model.contains_key(k))
                .collect();
            let entries = batch(&mut keys, tag);
            let txn = db.begin_write().unwrap();
            T.insert_sorted(&txn, &entries).unwrap();
            let mut runs = T.open(&txn).unwrap();
            for &k in &keys {
                model.insert(k, tag);
            }
            // Remove a few, present and absent.
            for _ in 0..20 {
                let k = rng.random_range(0..5_000u32);
                let removed = runs.remove(&k.to_be_bytes()).unwrap();
                assert_eq!(removed.map(u16::from_be_bytes), model.remove(&k), "key {k}");
            }
            drop(runs);
            txn.commit().unwrap();
        }
        // Empty whole blocks: every key of 1_000..1_400 (some blocks start inside it).
        let txn = db.begin_write().unwrap();
        let mut runs = T.open(&txn).unwrap();
        for k in 1_000..1_400u32 {
            let removed = runs.remove(&k.to_be_bytes()).unwrap();
            assert_eq!(removed.map(u16::from_be_bytes), model.remove(&k), "key {k}");
        }
        drop(runs);
        txn.commit().unwrap();
        let txn = db.begin_read().unwrap();
        assert_eq!(OpenRuns::<4, 2>::batches(&&txn, "t").unwrap(), 23);
        let runs = T.open(&txn).unwrap();
        // One run a unit of each digit of the batch count in base FAN_IN.
        let digits: u64 = (0..4).map(|r| 23 / FAN_IN.pow(r) % FAN_IN).sum();
        assert_eq!(runs.tables.len() as u64, digits);
        assert_eq!(runs.len().unwrap(), model.len() as u64);
        for k in 0..5_000u32 {
            let got = runs.get(&k.to_be_bytes()).unwrap().map(u16::from_be_bytes);
            assert_eq!(got, model.get(&k).copied(), "key {k}");
        }
        for (low, high, n) in [
            (0u32, 4_999u32, 7usize),
            (1_234, 1_300, 50),
            (990, 1_500, 30),
            (4_990, 4_999, 3),
        ] {
            let got: Vec<(u32, u16)> = runs
                .first_in(&low.to_be_bytes(), &high.to_be_bytes(), n)
                .unwrap()
                .into_iter()
                .map(|(k, v)| (u32::from_be_bytes(k), u16::from_be_bytes(v)))
                .collect();
            let want: Vec<(u32, u16)> = model
                .range(low..=high)
                .take(n)
                .map(|(k, v)| (*k, *v))
                .collect();
            assert_eq!(got, want, "range {low}..={high}");
        }
        let mut all = Vec::new();
        runs.for_each_in(&[0; 4], &[0xff; 4], |k, _| all.push(u32::from_be_bytes(*k)))
            .unwrap();
        all.sort_unstable();
        assert_eq!(all, model.keys().copied().collect::<Vec<_>>());
    }
}
