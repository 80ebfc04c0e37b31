//! Per-document byte strings of an epoch (near dedup's sketches, `semdedup`'s quantised
//! vectors) stored a block of documents a B-tree entry, keyed by the epoch and the block's
//! first row, as the leveled tables store their runs (`runs`): a commit makes one B-tree insert
//! for about 29 sketches instead of one each (median near-dedup ingest over 30 alternated runs
//! 232 -> 213 ms, the best run unchanged; `BENCHMARKS.md`, Text dedup); a lookup, which only a
//! band match makes, reads one block.
//!
//! A block holds entries in row order, each its row (u32, little-endian), its length (u32)
//! and its bytes, up to `BLOCK_BYTES`.
use redb::{ReadableTable, StorageError, Table};

/// A block's bytes at most (unless one entry is longer): within a 4 KiB page.
const BLOCK_BYTES: usize = 3_584;
/// An entry's row and length.
const ENTRY_HEADER: usize = 8;

/// Writes `blobs` (row, bytes; rows narrowed to u32 already, in any order) of `epoch` as blocks.
/// The same blobs make the same blocks, so writing an epoch again rewrites what is there.
pub(super) fn write(
    table: &mut Table<(u64, u64), &[u8]>,
    epoch: u64,
    blobs: &[(u32, &[u8])],
) -> Result<(), StorageError> {
    let mut sorted = blobs.to_vec();
    sorted.sort_unstable_by_key(|&(row, _)| row);
    let mut block: Vec<u8> = Vec::with_capacity(BLOCK_BYTES);
    let mut first: Option<u32> = None;
    for (row, bytes) in sorted {
        if let Some(start) = first {
            if block.len() + ENTRY_HEADER + bytes.len() > BLOCK_BYTES {
                table.insert((epoch, u64::from(start)), block.as_slice())?;
                block.clear();
                first = None;
            }
        }
        first.get_or_insert(row);
        block.extend_from_slice(&row.to_le_bytes());
        block.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        block.extend_from_slice(bytes);
    }
    if let Some(start) = first {
        table.insert((epoch, u64::from(start)), block.as_slice())?;
    }
    Ok(())
}

/// The bytes stored for (epoch, row), if any.
pub(super) fn read(
    table: &impl ReadableTable<(u64, u64), &'static [u8]>,
    (epoch, row): (u64, u64),
) -> Result<Option<Vec<u8>>, StorageError> {
    // The block that would hold the row: the last one of the epoch starting at or before it.
    let Some(block) = table.range(..=(epoch, row))?.next_back() else {
        return Ok(None);
    };
    let (key, value) = block?;
    if key.value().0 != epoch {
        return Ok(None);
    }
    Ok(find(value.value(), row).map(<[u8]>::to_vec))
}

/// The bytes of `row` in a block.
fn find(mut block: &[u8], row: u64) -> Option<&[u8]> {
    while block.len() >= ENTRY_HEADER {
        let at = u64::from(u32::from_le_bytes(block[..4].try_into().expect("4 bytes")));
        let length = u32::from_le_bytes(block[4..8].try_into().expect("4 bytes")) as usize;
        let bytes = block.get(ENTRY_HEADER..ENTRY_HEADER + length)?;
        if at >= row {
            return (at == row).then_some(bytes);
        }
        block = &block[ENTRY_HEADER + length..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{Database, ReadableDatabase, ReadableTableMetadata, TableDefinition};

    const BLOBS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("blobs");

    #[test]
    fn every_row_is_found_in_its_block_and_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("blobs.redb")).unwrap();
        // Rows with gaps, in no order, of several lengths (one longer than a block), in three
        // epochs: many blocks an epoch.
        let bytes = |epoch: u64, row: u32| -> Vec<u8> {
            let length = if row == 77 {
                5_000
            } else {
                (row as usize * 7) % 200
            };
            (0..length)
                .map(|i| (i as u64 + epoch * 31 + u64::from(row)) as u8)
                .collect()
        };
        let rows: Vec<u32> = (0..400).rev().filter(|r| r % 3 != 1).collect();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(BLOBS).unwrap();
            for epoch in [2, 3, 5] {
                let owned: Vec<(u32, Vec<u8>)> =
                    rows.iter().map(|&r| (r, bytes(epoch, r))).collect();
                let blobs: Vec<(u32, &[u8])> =
                    owned.iter().map(|(r, b)| (*r, b.as_slice())).collect();
                write(&mut table, epoch, &blobs).unwrap();
                // Again: the same blocks.
                write(&mut table, epoch, &blobs).unwrap();
            }
            // About 34 KB an epoch: several blocks each.
            assert!(table.len().unwrap() >= 3 * 8);
        }
        txn.commit().unwrap();
        let read_txn = db.begin_read().unwrap();
        let table = read_txn.open_table(BLOBS).unwrap();
        for epoch in 0..7u64 {
            for row in 0..420u32 {
                let stored = [2, 3, 5].contains(&epoch) && row < 400 && row % 3 != 1;
                let expected = stored.then(|| bytes(epoch, row));
                assert_eq!(
                    read(&table, (epoch, u64::from(row))).unwrap(),
                    expected,
                    "epoch {epoch} row {row}"
                );
            }
        }
    }
}
