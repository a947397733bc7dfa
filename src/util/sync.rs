//! Skiff's one policy for poisoned locks: **recover the guard**.
//!
//! A `Mutex` or `RwLock` is poisoned when a thread panics while holding it. Every lock in
//! Skiff guards data that stays consistent at each point where a panic could happen: the
//! critical sections are short, and their updates are single inserts, removals or assignments
//! (a byte count and the index it sums are updated together, with nothing that can panic in
//! between). So the data behind a poisoned lock is as good as before, and refusing it would
//! only turn one panic into silent loss elsewhere: a disk cache that stops evicting and grows
//! past its limit, a claim never released, a counter that stops counting.
//!
//! A panic is still never ignored: in the daemons (`serve`, `virtiofs`, `mount`) any panic is
//! reported and ends the process with a non-zero exit code (see [`crate::runtime`]), so a
//! recovered lock is only used on the way out, or by library callers that handle the panic
//! themselves. Always take locks through these helpers, never with `lock().ok()` or
//! `if let Ok(..) = lock()`, which skip work silently after a panic.

use std::sync::{
    Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
    WaitTimeoutResult,
};
use std::time::Duration;

/// Locks `m`, recovering the guard if another thread panicked while holding it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Takes a read lock on `l`, recovering it from poison.
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

/// Takes a write lock on `l`, recovering it from poison.
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `cv`, recovering the guard from poison.
pub fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `cv` for at most `timeout`, recovering the guard from poison.
pub fn wait_timeout<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> (MutexGuard<'a, T>, WaitTimeoutResult) {
    cv.wait_timeout(guard, timeout)
        .unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_poisoned_lock_still_gives_its_data() {
        let m = Arc::new(Mutex::new(41));
        let m2 = m.clone();
        let panicked = std::thread::spawn(move || {
            let mut g = lock(&m2);
            *g += 1;
            panic!("injected");
        })
        .join();
        assert!(panicked.is_err());
        assert!(m.is_poisoned());
        assert_eq!(*lock(&m), 42);
        let l = RwLock::new(1);
        *write(&l) += 1;
        assert_eq!(*read(&l), 2);
    }
}
