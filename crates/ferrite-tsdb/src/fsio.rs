//! Positional file I/O and directory sync.
//!
//! Segments are read with positional reads so that queries share one file
//! handle without a lock, and a segment that compaction has unlinked stays
//! readable through handles that queries still hold.

#[cfg(not(unix))]
compile_error!(
    "ferrite-tsdb needs Unix file semantics: positional I/O, directory fsync and unlink of open files"
);

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    file.read_exact_at(buf, offset)
}

pub(crate) fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    file.write_all_at(buf, offset)
}

/// Makes renames, creations and deletions inside `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
