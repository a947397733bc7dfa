//! Skiff: lazily loaded, verified and shared RAFS container images for VM-based containers.
//!
//! The crate is layered so that data flows one way, each layer talking only to the one below:
//!
//! ```text
//! storage  (blob bytes by range, verified chunks, cache)
//!   -> format  (the loaded bootstrap: inodes, entries, chunk lists)
//!     -> fs      (FUSE semantics over a bootstrap and a chunk source)
//!       -> fuse | vhost  (transports: /dev/fuse or vhost-user virtqueues)
//!         -> daemon | api  (Kata: several images and a shared directory under one
//!                           pseudo root, driven over nydusd's HTTP API)
//! ```
//!
//! `build` writes what `format` reads; the CLI in `cli` is a thin front end over all of it.

pub mod accel;
pub mod api;
pub mod build;
pub mod check;
pub mod cli;
pub mod daemon;
pub mod format;
pub mod fs;
pub mod fuse;
pub mod oci;
pub mod runtime;
pub mod sandbox;
pub mod share;
pub mod storage;
pub mod util;
pub mod vhost;
