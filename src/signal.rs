//! Ctrl-C (and SIGTERM) handling: the first signal asks running work to stop after its current
//! step, once its state is written; a second one exits at once (status 130).
use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the handler (once per process; later calls do nothing).
pub fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting now");
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: stopping after this step, once its state is saved (Ctrl-C again to quit at once)");
        });
    });
}

/// Whether a stop was asked for.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Asks for a stop as a signal would (tests, embedding code).
pub fn request_stop() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Clears a stop request.
pub fn reset() {
    INTERRUPTED.store(false, Ordering::SeqCst);
}
