//! The store's error type and a helper that adds the file path to I/O errors.

use std::io;
use std::path::{Path, PathBuf};

/// Errors returned by [`crate::Store`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file system operation failed. The message names the operation and
    /// the path, and [`io::Error::kind`] keeps the original kind.
    #[error("{0}")]
    Io(io::Error),

    /// A file failed a checksum or structure check.
    #[error("corrupt data in {path}: {detail}")]
    Corrupt { path: PathBuf, detail: String },

    /// Another `Store` (in this or another process) has the directory open.
    #[error("store directory {path} is locked by another process or Store instance")]
    Locked { path: PathBuf },

    /// An argument is outside what the store accepts, for example a
    /// timestamp outside the storable range or a non-finite float.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl StoreError {
    pub(crate) fn corrupt(path: &Path, detail: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }
}

/// Wraps `err` so that its message names the failed action and the path.
pub(crate) fn io_error(action: &str, path: &Path, err: io::Error) -> StoreError {
    StoreError::Io(io::Error::new(
        err.kind(),
        format!("failed to {action} {}: {err}", path.display()),
    ))
}

/// Converts `io::Result` into `StoreError::Io` with an action and a path.
pub(crate) trait IoContext<T> {
    fn context(self, action: &str, path: &Path) -> Result<T, StoreError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, action: &str, path: &Path) -> Result<T, StoreError> {
        self.map_err(|err| io_error(action, path, err))
    }
}
