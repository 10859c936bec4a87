//! A temporary directory removed on drop.

use std::path::{Path, PathBuf};

use crate::error::{Context, Result};

/// A fresh directory under the system temp dir (`/tmp/PREFIX-UNIQUE`), mode
/// 0700, removed with its content on drop. Paths stay short enough for unix
/// sockets.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> Result<TempDir> {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!("{prefix}-{}", crate::unique_name("")));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .ctx(|| format!("creating {}", path.display()))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("testbed: cannot remove {}: {e}", self.path.display());
            }
        }
    }
}
