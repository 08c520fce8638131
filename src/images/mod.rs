//! The image format (docs/image-format.md): a directory with JSON records,
//! a content-addressed page store and a manifest of checksums.

pub mod pagestore;
pub mod prune;
pub mod records;
pub mod show;
pub mod dir;

pub use dir::{ImageReader, ImageWriter};
pub use pagestore::{ChainStore, PageHash, PageStoreReader, PageStoreWriter};
