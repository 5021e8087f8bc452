//! Counters that every execution writes, kept in copies, one per thread that writes.
//!
//! An atomic that both cores add to on every execution makes its cache line travel between
//! them each time; with several such counters per execution that cost more than the
//! additions (docs/PERFORMANCE.md, "Per-request overhead"). Each thread adds to its own
//! copy, on cache lines of its own, and readers sum the copies.
//!
//! A leaf module: it knows nothing of the daemon.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

/// Copies of a sharded value: threads that write share one only beyond this many.
pub const SHARDS: usize = 4;

/// The shard of the calling thread: threads take one in turn the first time they ask.
pub fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local!(static SHARD: Cell<usize> = const { Cell::new(usize::MAX) });
    SHARD.with(|s| match s.get() {
        usize::MAX => {
            let i = NEXT.fetch_add(1, Relaxed) % SHARDS;
            s.set(i);
            i
        }
        i => i,
    })
}

/// A value on cache lines of its own (two, for the prefetcher that pulls lines in pairs).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Padded<T>(pub T);

/// One copy of `T` per shard.
#[derive(Debug)]
pub struct Sharded<T>([Padded<T>; SHARDS]);

impl<T> Sharded<T> {
    pub fn new(f: impl Fn() -> T) -> Sharded<T> {
        Sharded(std::array::from_fn(|_| Padded(f())))
    }

    /// The calling thread's copy.
    pub fn mine(&self) -> &T {
        &self.0[shard()].0
    }

    /// Copy `i` (of [`shard`]).
    pub fn get(&self, i: usize) -> &T {
        &self.0[i].0
    }

    /// Every copy.
    pub fn all(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|p| &p.0)
    }

    /// The sum over the copies of the counter `f` picks.
    pub fn sum(&self, f: impl Fn(&T) -> &AtomicU64) -> u64 {
        self.all().map(|s| f(s).load(Relaxed)).sum()
    }

    /// The largest over the copies of the figure `f` picks.
    pub fn max(&self, f: impl Fn(&T) -> &AtomicU64) -> u64 {
        self.all().map(|s| f(s).load(Relaxed)).max().unwrap_or(0)
    }
}

impl<T: Default> Default for Sharded<T> {
    fn default() -> Self {
        Sharded::new(T::default)
    }
}

/// A count that many threads add to.
pub type Counter = Sharded<AtomicU64>;

impl Counter {
    pub fn add(&self, n: u64) {
        self.mine().fetch_add(n, Relaxed);
    }

    pub fn total(&self) -> u64 {
        self.sum(|c| c)
    }
}

/// Store `v` in `peak` if it is larger: no write (and so no cache line taken from the other
/// cores) when it is not.
pub fn raise(peak: &AtomicU64, v: u64) {
    if v > peak.load(Relaxed) {
        peak.fetch_max(v, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_add_to_their_own_copy_and_readers_see_the_sum() {
        let c = Counter::default();
        std::thread::scope(|s| {
            for _ in 0..2 * SHARDS {
                s.spawn(|| (0..1000).for_each(|_| c.add(1)));
            }
        });
        assert_eq!(c.total(), 2000 * SHARDS as u64);
        assert!(c.all().filter(|n| n.load(Relaxed) > 0).count() > 1);
        let peak = AtomicU64::new(5);
        raise(&peak, 3);
        raise(&peak, 9);
        assert_eq!(peak.load(Relaxed), 9);
        assert_eq!(std::mem::align_of::<Padded<u8>>(), 128);
    }
}
