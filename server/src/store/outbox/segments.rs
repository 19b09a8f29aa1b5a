//! Outbox blobs in append-only segment files beside a SQLite ledger.
//!
//! With ClickHouse as the telemetry store every committed batch waits in the outbox until
//! ClickHouse holds it. Kept as a SQLite BLOB, each batch was written twice (WAL, then the
//! checkpoint into the database file), spread over overflow pages and walked again to free
//! them: ~34 % of the server's CPU at 50 k samples/s (BENCHMARKS.md). Here the group commit
//! appends the group's batches to the current segment file and syncs it *before* the ledger
//! transaction that records them (row: id, segment, offset, length), so a committed row always
//! points at durable bytes; bytes whose transaction failed are never referenced and go with
//! their segment. A segment file is removed once no outbox row points into it.
//!
//! # Guarantees
//! - [`Segments::append`] returns only after the bytes are on disk (`fdatasync`).
//! - A segment is never appended to after a restart (a new one starts), so a torn tail of a
//!   crashed append is never followed by committed data in the same file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use prost::bytes::Bytes;

use crate::store::StoreError;

/// A segment grows to about this size before the next one starts.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// Where one blob lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Segment number (1, 2, ...; 0 in the outbox table means "the blob is in the row").
    pub segment: u64,
    /// Byte offset in the segment.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The append side of one ledger's segment folder.
#[derive(Debug)]
pub struct Segments {
    dir: PathBuf,
    current: Mutex<Current>,
}

#[derive(Debug)]
struct Current {
    number: u64,
    file: File,
    len: u64,
}

impl Segments {
    /// Opens (creating) `dir` and starts a new segment after the highest one there.
    ///
    /// # Errors
    /// The folder or the file cannot be created.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            // The folder's own name must survive a power loss too.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                File::open(parent)?.sync_all()?;
            }
        }
        let highest = numbers(dir)?.into_iter().max().unwrap_or(0);
        let current = Current::create(dir, highest + 1)?;
        Ok(Self {
            dir: dir.to_owned(),
            current: Mutex::new(current),
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `blobs` and syncs them; returns where each one lies.
    ///
    /// # Errors
    /// Writing or syncing failed: nothing may refer to these locations then.
    pub fn append(&self, blobs: &[Bytes]) -> std::io::Result<Vec<Location>> {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.len >= SEGMENT_BYTES {
            *current = Current::create(&self.dir, current.number + 1)?;
        }
        let mut locations = Vec::with_capacity(blobs.len());
        let mut offset = current.len;
        for blob in blobs {
            let len = blob.len() as u64;
            locations.push(Location {
                segment: current.number,
                offset,
                len,
            });
            offset += len;
        }
        // On an error `len` stays where it was: the next append writes over the partial tail
        // (positioned writes), which no row refers to. One `pwrite` for the whole group: a
        // write per batch cost a syscall and the filesystem's per-write bookkeeping each.
        let mut group = Vec::with_capacity(usize::try_from(offset - current.len).unwrap_or(0));
        for blob in blobs {
            group.extend_from_slice(blob);
        }
        current.file.write_all_at(&group, current.len)?;
        current.file.sync_data()?;
        current.len = offset;
        Ok(locations)
    }

    /// The segment being appended to.
    pub fn current(&self) -> u64 {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .number
    }
}

/// Reads the blobs at `locations` from the segments in `dir`.
///
/// # Errors
/// A segment is missing or shorter than a location says.
pub fn read(dir: &Path, locations: &[Location]) -> std::io::Result<Vec<Vec<u8>>> {
    let mut open: Option<(u64, File)> = None;
    locations
        .iter()
        .map(|location| {
            if open.as_ref().is_none_or(|(n, _)| *n != location.segment) {
                let file = File::open(path(dir, location.segment))?;
                open = Some((location.segment, file));
            }
            let mut blob = vec![0; usize::try_from(location.len).unwrap_or(usize::MAX)];
            if let Some((_, file)) = &open {
                file.read_exact_at(&mut blob, location.offset)?;
            }
            Ok(blob)
        })
        .collect()
}

/// Removes the segments in `dir` numbered below `below` (the oldest one an outbox row still
/// refers to, and never above the one being appended to). Returns how many went.
///
/// # Errors
/// The folder cannot be listed or a file removed.
pub fn remove_below(dir: &Path, below: u64) -> std::io::Result<usize> {
    let mut removed = 0;
    for number in numbers(dir)? {
        if number < below {
            std::fs::remove_file(path(dir, number))?;
            removed += 1;
        }
    }
    Ok(removed)
}

impl Current {
    /// A new, empty segment numbered `number` or, where a file of that number exists (left
    /// by a creation that failed half-way), the next free number.
    fn create(dir: &Path, number: u64) -> std::io::Result<Self> {
        let mut number = number;
        let file = loop {
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path(dir, number))
            {
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => number += 1,
                opened => break opened?,
            }
        };
        // The new name must survive a power loss as well as the bytes in it.
        File::open(dir)?.sync_all()?;
        Ok(Self {
            number,
            file,
            len: 0,
        })
    }
}

fn path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:012}.seg"))
}

/// The segment numbers in `dir`.
fn numbers(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        if let Some(number) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push(number);
        }
    }
    Ok(out)
}

/// A ledger's segment folder as the store uses it: file I/O on blocking threads, the append
/// side opened on the first append (an embedded-store ledger never creates one).
#[derive(Debug)]
pub struct Folder {
    dir: PathBuf,
    append: Mutex<Option<Arc<Segments>>>,
}

impl Folder {
    /// The folder at `dir` (nothing is created yet).
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            append: Mutex::new(None),
        }
    }

    /// The append side, opened (a new segment) on first use.
    fn segments(&self) -> std::io::Result<Arc<Segments>> {
        let mut append = self
            .append
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match append.as_ref() {
            Some(segments) => Ok(Arc::clone(segments)),
            None => {
                let opened = Arc::new(Segments::open(&self.dir)?);
                *append = Some(Arc::clone(&opened));
                Ok(opened)
            }
        }
    }

    /// Runs `work` on a blocking thread (file I/O and fdatasync must not stall the async
    /// workers); its I/O error becomes [`StoreError::Segment`] naming the folder.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Self) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let folder = Arc::clone(self);
        tokio::task::spawn_blocking(move || work(&folder))
            .await
            .map_err(|join| std::io::Error::other(join.to_string()))
            .and_then(|done| done)
            .map_err(|source| StoreError::Segment {
                path: self.dir.display().to_string(),
                source,
            })
    }

    /// [`Segments::append`].
    ///
    /// # Errors
    /// [`StoreError::Segment`].
    pub async fn append(self: &Arc<Self>, blobs: Vec<Bytes>) -> Result<Vec<Location>, StoreError> {
        self.blocking(move |folder| folder.segments()?.append(&blobs))
            .await
    }

    /// [`read`].
    ///
    /// # Errors
    /// [`StoreError::Segment`].
    pub async fn read(
        self: &Arc<Self>,
        locations: Vec<Location>,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        self.blocking(move |folder| read(&folder.dir, &locations))
            .await
    }

    /// The segment being appended to (opening one if none is yet). Read it *before* asking
    /// the ledger which segments rows still refer to: every segment below it was written by
    /// groups already committed (the writer only starts a new segment after the previous
    /// group's transaction), so the ledger's answer covers them all, and appends racing with
    /// the clean-up go to this segment or a newer one.
    ///
    /// # Errors
    /// [`StoreError::Segment`].
    pub async fn current(self: &Arc<Self>) -> Result<u64, StoreError> {
        self.blocking(|folder| Ok(folder.segments()?.current()))
            .await
    }

    /// Removes the segments numbered below `below`.
    ///
    /// # Errors
    /// [`StoreError::Segment`].
    pub async fn remove_below(self: &Arc<Self>, below: u64) -> Result<usize, StoreError> {
        self.blocking(move |folder| remove_below(&folder.dir, below))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_left_by_a_half_failed_creation_is_skipped() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        File::create(path(dir.path(), 5))?;
        let current = Current::create(dir.path(), 5)?;
        assert_eq!(current.number, 6);
        Ok(())
    }

    #[test]
    fn blobs_read_back_across_segments_and_reopening() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let segments = Segments::open(dir.path())?;
        let blobs: Vec<Bytes> = (0..5u8)
            .map(|i| Bytes::from(vec![i; 10 + i as usize]))
            .collect();
        let at = segments.append(&blobs)?;
        assert_eq!(at[0].segment, 1);
        assert_eq!(at[1].offset, 10);
        let back = read(dir.path(), &at)?;
        assert_eq!(back, blobs.iter().map(|b| b.to_vec()).collect::<Vec<_>>());
        // A restart starts a new segment; the old one still reads.
        drop(segments);
        let segments = Segments::open(dir.path())?;
        let more = segments.append(&blobs[..1])?;
        assert_eq!((more[0].segment, more[0].offset), (2, 0));
        assert_eq!(read(dir.path(), &at[2..3])?, vec![blobs[2].to_vec()]);
        // Segment 1 goes once nothing refers to it.
        assert_eq!(segments.current(), 2);
        assert_eq!(remove_below(dir.path(), 2)?, 1);
        assert!(read(dir.path(), &at[..1]).is_err());
        assert_eq!(remove_below(dir.path(), 2)?, 0);
        assert_eq!(read(dir.path(), &more)?, vec![blobs[0].to_vec()]);
        Ok(())
    }
}
