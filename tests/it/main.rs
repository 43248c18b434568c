//! The integration tests: one binary, one module per area. Fixtures are written by the tests.

mod common;
mod data;
mod foundation;
mod hub;
mod lifecycle;
mod models;
mod ops;
mod precision;
mod reference;
mod reliability;
mod runs;
mod sam;
mod sam_family;
mod variants;
