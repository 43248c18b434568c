//! The integration tests: one binary, one module per area. Fixtures are written by the tests.

mod common;
mod compose;
mod data;
mod diagnostics;
mod dist;
mod foundation;
mod fuzz;
mod hub;
mod init;
mod lifecycle;
mod models;
mod ops;
mod optim;
mod precision;
mod reference;
mod reliability;
mod res_block;
mod runs;
mod sam;
mod sam_family;
mod sweep;
mod tensorboard;
mod variants;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    /// While `Some`, the largest single allocation made on this thread (the file fuzzer's bound).
    pub static TRACK_LARGEST: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The system allocator, noting the largest allocation of a thread that asks (fuzz.rs).
struct Tracking;

// SAFETY: every call is forwarded to the system allocator unchanged; the bookkeeping touches
// only a const-initialised thread-local Cell, which never allocates.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn note(size: usize) {
    let _ = TRACK_LARGEST.try_with(|t| {
        if let Some(m) = t.get() {
            t.set(Some(m.max(size)));
        }
    });
}

#[global_allocator]
static ALLOC: Tracking = Tracking;
