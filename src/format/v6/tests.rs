//! Unit tests of the v6 reader.
