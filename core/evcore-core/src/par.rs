//! Work split over two threads on large sites. Every element is computed by the same code as on
//! one thread and every sum is made in the same order, so the results are bit for bit the same
//! whether a call splits its work or not; only the time differs.
use std::sync::Mutex;

use crate::topology::{Halves, Topology};

/// Below this many chargers a call stays on one thread: starting a second thread and handing
/// its work over costs about what the half it takes saves (allocator benchmark, second core
/// free, one thread against two: 10,000 chargers slower, 20,000 even, 40,000 and 100,000
/// faster; with the second core busy, no gain at any size).
pub const MIN_CHARGERS: usize = 20_000;

/// `split_at(self, at)` for a struct of `base: usize` (its first charger) and per-charger
/// `&mut` slices: the rows of the chargers before `at` (an absolute charger index) and from `at`
/// on, each half a struct of the same kind, to hand one half to each thread.
macro_rules! split_rows {
    ($name:ident { $($field:ident),+ $(,)? }) => {
        impl<'a> $name<'a> {
            /// Chargers before `at` and from `at` on.
            fn split_at(self, at: usize) -> ($name<'a>, $name<'a>) {
                let at = at - self.base;
                $(let $field = self.$field.split_at_mut(at);)+
                (
                    $name { base: self.base, $($field: $field.0,)+ },
                    $name { base: self.base + at, $($field: $field.1,)+ },
                )
            }
        }
    };
}
pub(crate) use split_rows;

/// The halves to split a call's work into, when `split` and the site is large enough to gain.
pub(crate) fn halves(topo: &Topology, split: bool) -> Option<Halves> {
    if split && topo.n_chargers() >= MIN_CHARGERS {
        topo.halves()
    } else {
        None
    }
}

/// `(a(), b())`, `b` on a second thread when `on`. A thread that cannot be started leaves both
/// on this one; a panic on the second thread carries on on this one as if it happened here.
pub(crate) fn join<A: Send, B: Send>(
    on: bool,
    a: impl FnOnce() -> A + Send,
    b: impl FnOnce() -> B + Send,
) -> (A, B) {
    if !on {
        return (a(), b());
    }
    let slot = Mutex::new(Some(b));
    let take = || slot.lock().ok().and_then(|mut g| g.take());
    std::thread::scope(|s| {
        let spawned = std::thread::Builder::new().spawn_scoped(s, || take().map(|f| f()));
        let ra = a();
        let rb = match spawned {
            Ok(h) => match h.join() {
                Ok(rb) => rb,
                Err(e) => std::panic::resume_unwind(e),
            },
            Err(_) => None,
        };
        // Not started (or it found nothing to take): run it here.
        let rb = match rb {
            Some(rb) => rb,
            None => match take() {
                Some(f) => f(),
                None => unreachable_b(),
            },
        };
        (ra, rb)
    })
}

/// `out[c] = value(c)` for every charger `c`, each half on its own thread when `halves`.
pub(crate) fn each<T: Send>(
    halves: Option<Halves>,
    out: &mut [T],
    value: impl Fn(usize) -> T + Sync,
) {
    let set = |base: usize, out: &mut [T]| {
        for (i, x) in out.iter_mut().enumerate() {
            *x = value(base + i);
        }
    };
    match halves {
        Some(h) => {
            let (first, second) = out.split_at_mut(h.charger_at);
            join(true, || set(0, first), || set(h.charger_at, second));
        }
        None => set(0, out),
    }
}

#[cold]
fn unreachable_b() -> ! {
    // `b` is taken exactly once: by the thread (which then returns Some) or here.
    panic!("par::join: the second half ran nowhere")
}
