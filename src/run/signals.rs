//! The signals that end a run early: SIGINT (Ctrl-C), SIGTERM (`timeout`, Slurm preemption,
//! `docker stop`) and SIGHUP (a closed terminal). The first one asks the run to stop after the
//! step in progress (the interrupt flag the session polls), so the run writes its checkpoint,
//! summary and plots; a second one of any kind ends the process at once, with `128 + signal`.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// Signals received so far (any kind).
static RECEIVED: AtomicUsize = AtomicUsize::new(0);
/// The first signal received (0: none).
static FIRST: AtomicI32 = AtomicI32::new(0);
/// The flag the session polls.
static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Records signal `sig`: the first sets the interrupt flag, a second ends the process.
fn received(sig: i32) {
    if RECEIVED.fetch_add(1, Ordering::SeqCst) > 0 {
        // SAFETY: _exit is async-signal-safe and takes no pointers.
        unsafe { libc::_exit(128 + sig) };
    }
    FIRST.store(sig, Ordering::SeqCst);
    if let Some(flag) = FLAG.get() {
        flag.store(true, Ordering::SeqCst);
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    received(sig);
}

/// Installs the handlers once per process; `flag` (the session's interrupt flag) is set by the
/// first signal. A second run in the same process keeps the first run's flag.
pub fn install(flag: Arc<AtomicBool>) {
    if FLAG.set(flag).is_err() {
        return;
    }
    // SIGINT through the ctrlc crate (its own thread), the others through sigaction.
    let _ = ctrlc::set_handler(|| received(libc::SIGINT));
    for sig in [libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only touches atomics and calls _exit, both async-signal-safe;
        // the sigaction struct is zeroed and then filled as the C API expects.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            action.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// The first signal this process received (0: none).
pub fn first() -> i32 {
    FIRST.load(Ordering::SeqCst)
}

/// Takes `sig` as this process's first signal unless it received one itself: another rank of a
/// data-parallel run was signalled, and every rank stops alike, with the same exit code.
pub fn adopt(sig: i32) {
    let _ = FIRST.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    if let Some(flag) = FLAG.get() {
        flag.store(true, Ordering::SeqCst);
    }
}

/// The exit code of a run stopped by a signal: 130 (SIGINT), 143 (SIGTERM), 129 (SIGHUP); 130
/// when the interrupt flag was set another way.
pub fn exit_code() -> i32 {
    match FIRST.load(Ordering::SeqCst) {
        0 => 130,
        sig => 128 + sig,
    }
}

/// The name of the signal that stopped the run, for messages.
pub fn name() -> &'static str {
    match FIRST.load(Ordering::SeqCst) {
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "Ctrl-C",
    }
}
