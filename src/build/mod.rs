//! Building RAFS images.
