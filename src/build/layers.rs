//! Building from OCI layer tarballs (being written).

use std::path::PathBuf;

use super::chunker::Chunker;
use super::tree::Tree;
use super::{BuildError, Progress};

/// Applies `layers` in order into a new tree.
pub fn apply(_layers: &[PathBuf], _chunker: &mut Chunker, _progress: &Progress) -> Result<Tree, BuildError> {
    Err(BuildError::Invalid("layer tarballs are not supported yet".into()))
}
