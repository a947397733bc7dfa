//! What a panic does in a daemon: it is reported (thread, kind, place, message) and sets the
//! exit event of the daemon the thread belongs to as fatal, so the daemon stops and exits with
//! an error instead of serving on with a dead queue or worker.

use std::panic::PanicHookInfo;
use std::sync::Once;

use super::{threads, ExitReason};

/// Installs the panic hook (once per process; later calls do nothing). The standard report
/// (message, place, backtrace hint) is printed first, as without it.
pub fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            report(info);
        }));
    });
}

/// The panic's message, when it is a string (it nearly always is).
fn message(info: &PanicHookInfo<'_>) -> String {
    let payload = info.payload();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

fn report(info: &PanicHookInfo<'_>) {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("unnamed");
    let kind = threads::current().map_or("unknown", |k| k.as_str());
    let place = info
        .location()
        .map(|l| format!("{}:{}", l.file(), l.line()))
        .unwrap_or_default();
    let report = format!(
        "thread {name} ({kind}) panicked at {place}: {}",
        message(info)
    );
    match threads::current_exit() {
        Some(exit) => {
            tracing::error!(thread = name, kind, place = %place, "{report}; the daemon stops");
            exit.notify(ExitReason::Fatal(report));
        }
        // A thread that belongs to no daemon (a library's, a test's): reported only.
        None => tracing::error!(thread = name, kind, place = %place, "{report}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{ExitEvent, ThreadKind};

    #[test]
    fn a_panic_in_a_daemon_thread_sets_its_exit_event_as_fatal() {
        install_hook();
        let exit = ExitEvent::new().expect("eventfd");
        let e2 = exit.clone();
        let r = std::thread::spawn(move || {
            threads::enter(ThreadKind::Main, Some(&e2));
            threads::spawn(ThreadKind::Worker, "skiff-test-worker", || {
                panic!("injected worker panic")
            })
            .expect("spawn")
            .join()
        })
        .join()
        .expect("main thread");
        assert!(r.is_err(), "the worker panicked");
        match exit.reason() {
            Some(ExitReason::Fatal(report)) => {
                assert!(report.contains("skiff-test-worker (worker)"), "{report}");
                assert!(report.contains("injected worker panic"), "{report}");
            }
            other => panic!("exit reason {other:?}"),
        }
    }
}
