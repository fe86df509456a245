//! A panic inside a training run (a bug, in our code or a dependency) becomes the run's one-line
//! error, after which the state of the last completed step is saved like for any other error
//! (issue 16 item 2), instead of a backtrace and a torn run directory.
//!
//! While a [`QuietPanics`] guard lives, the panic hook records where a panic happened instead of
//! printing it; `catch_unwind` (the training loop, the loader's workers) then reports it once.

use std::{
    any::Any,
    panic::{self, PanicHookInfo},
    sync::Mutex,
};

type Hook = Box<dyn Fn(&PanicHookInfo<'_>) + Sync + Send + 'static>;

/// The previous hook and how many guards are alive (runs in parallel threads share one hook).
static STATE: Mutex<(usize, Option<Hook>)> = Mutex::new((0, None));
/// `file:line` of the most recent panic while quiet.
static LAST_LOCATION: Mutex<Option<String>> = Mutex::new(None);

/// Keeps panics quiet while alive; the first guard installs the recording hook, the last one
/// puts the previous hook back.
pub(crate) struct QuietPanics(());

impl QuietPanics {
    pub(crate) fn install() -> Self {
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        if state.0 == 0 {
            state.1 = Some(panic::take_hook());
            panic::set_hook(Box::new(|info| {
                let at = info.location().map(|l| format!("{}:{}", l.file(), l.line()));
                *LAST_LOCATION.lock().unwrap_or_else(|e| e.into_inner()) = at;
            }));
        }
        state.0 += 1;
        QuietPanics(())
    }
}

impl Drop for QuietPanics {
    fn drop(&mut self) {
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        state.0 -= 1;
        if state.0 == 0 {
            if let Some(prev) = state.1.take() {
                panic::set_hook(prev);
            }
        }
    }
}

/// The text of a caught panic's payload, with where it happened when known.
pub(crate) fn message(payload: &(dyn Any + Send)) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    match LAST_LOCATION.lock().unwrap_or_else(|e| e.into_inner()).take() {
        Some(at) => format!("{what} (at {at})"),
        None => what,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caught_panic_gives_its_message_and_place() {
        let _quiet = QuietPanics::install();
        let payload = panic::catch_unwind(|| panic!("the {} is cursed", "example")).unwrap_err();
        let m = message(payload.as_ref());
        assert!(m.starts_with("the example is cursed (at ") && m.contains("panics.rs:"), "{m}");
        let payload = panic::catch_unwind(|| std::panic::panic_any(7u8)).unwrap_err();
        assert!(message(payload.as_ref()).starts_with("a panic without a message"));
    }
}
