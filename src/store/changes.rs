//! Change notifications for watchers, in process: who watches which job,
//! and the fan-out of what is known about a change to them.
//!
//! A store feeds the hub from two sides. Its own writes push the job as
//! written ([`Notice::Snapshot`]), so a watcher in the same process learns
//! the new state without reading it back. Writes made elsewhere (another
//! orchd replica) arrive as a bare "changed" ([`Notice::Reread`]) from the
//! Redis subscription ([`super::subscriber`]). One registry entry per
//! watched job, however many watchers: the entry, and the Redis
//! subscription behind it, go when its last watcher does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::stream::{BoxStream, Stream, StreamExt};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use uuid::Uuid;

use crate::proto::v1::Job;

/// Notices one watcher may fall behind by before it is told to re-read.
const NOTICES_BUFFERED: usize = 16;

/// What a watcher learns about a change of its job.
#[derive(Debug, Clone)]
pub enum Notice {
    /// The job as this process just wrote it. Writes can finish in a
    /// different order than they reach the watcher, so a snapshot may be
    /// older than one seen before: compare history lengths.
    Snapshot(Arc<Job>),
    /// The job may have changed: read it again.
    Reread,
}

/// Called once when the last watcher of a job is gone, with the hub's lock
/// held, so that whatever it queues (an UNSUBSCRIBE) is ordered before the
/// next watcher's subscription of the same job.
pub type OnLastGone = Box<dyn FnOnce(Uuid) + Send>;

struct Entry {
    sender: broadcast::Sender<Notice>,
    watchers: usize,
    /// Tells this entry from a later one for the same job, after
    /// [`ChangeHub::end_all`] dropped it while watchers still held it.
    epoch: u64,
}

#[derive(Default)]
struct Registry {
    entries: HashMap<Uuid, Entry>,
    next_epoch: u64,
}

/// The registry of watched jobs; cheap to clone, clones share it.
#[derive(Clone, Default)]
pub struct ChangeHub {
    registry: Arc<Mutex<Registry>>,
}

impl ChangeHub {
    /// An empty hub.
    pub fn new() -> Self {
        ChangeHub::default()
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock left the map consistent: every
        // change to it is a single insert, remove or counter step.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a watcher of `id` and returns its notices. `on_last_gone`
    /// runs when the returned stream's watcher was the last one and is
    /// dropped.
    pub fn watch(&self, id: Uuid, on_last_gone: Option<OnLastGone>) -> BoxStream<'static, Notice> {
        let mut registry = self.lock();
        let Registry {
            entries,
            next_epoch,
        } = &mut *registry;
        let entry = entries.entry(id).or_insert_with(|| {
            *next_epoch += 1;
            let (sender, _) = broadcast::channel(NOTICES_BUFFERED);
            Entry {
                sender,
                watchers: 0,
                epoch: *next_epoch,
            }
        });
        entry.watchers += 1;
        let receiver = entry.sender.subscribe();
        let epoch = entry.epoch;
        drop(registry);
        Watcher {
            notices: BroadcastStream::new(receiver),
            _guard: Guard {
                hub: self.clone(),
                id,
                epoch,
                on_last_gone,
            },
        }
        .boxed()
    }

    /// Tells the watchers of `id`, if any, what `notice` makes; it is only
    /// built when someone watches.
    pub fn notify(&self, id: Uuid, notice: impl FnOnce() -> Notice) {
        let registry = self.lock();
        if let Some(entry) = registry.entries.get(&id) {
            // No receiver left is a watcher being dropped right now.
            let _ = entry.sender.send(notice());
        }
    }

    /// Ends every watcher's stream (the source of notices is gone); later
    /// watchers start afresh.
    pub fn end_all(&self) {
        self.lock().entries.clear();
    }

    /// Whether anyone watches `id` right now.
    pub fn is_watched(&self, id: Uuid) -> bool {
        self.lock().entries.contains_key(&id)
    }

    /// How many jobs are watched (for tests and metrics).
    pub fn watched(&self) -> usize {
        self.lock().entries.len()
    }

    fn release(&self, id: Uuid, epoch: u64, on_last_gone: Option<OnLastGone>) {
        let mut registry = self.lock();
        let Some(entry) = registry.entries.get_mut(&id) else {
            return;
        };
        if entry.epoch != epoch {
            return;
        }
        entry.watchers -= 1;
        if entry.watchers == 0 {
            registry.entries.remove(&id);
            if let Some(gone) = on_last_gone {
                gone(id);
            }
        }
    }
}

struct Guard {
    hub: ChangeHub,
    id: Uuid,
    epoch: u64,
    on_last_gone: Option<OnLastGone>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.hub
            .release(self.id, self.epoch, self.on_last_gone.take());
    }
}

/// One watcher's notices; unregisters itself when dropped.
struct Watcher {
    notices: BroadcastStream<Notice>,
    /// Held for its drop: unregisters the watcher.
    _guard: Guard,
}

impl Stream for Watcher {
    type Item = Notice;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Notice>> {
        self.notices.poll_next_unpin(cx).map(|item| {
            item.map(|notice| match notice {
                Ok(notice) => notice,
                // Missed notices may have been about anything: read again.
                Err(BroadcastStreamRecvError::Lagged(_)) => Notice::Reread,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn job(history: usize) -> Arc<Job> {
        Arc::new(Job {
            history: vec![Default::default(); history],
            ..Job::default()
        })
    }

    #[tokio::test]
    async fn every_watcher_of_a_job_gets_its_notices_and_no_other() {
        let hub = ChangeHub::new();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut first = hub.watch(a, None);
        let mut second = hub.watch(a, None);
        let mut other = hub.watch(b, None);
        hub.notify(a, || Notice::Snapshot(job(3)));
        for stream in [&mut first, &mut second] {
            match stream.next().await {
                Some(Notice::Snapshot(j)) => assert_eq!(j.history.len(), 3),
                got => panic!("expected the snapshot, got {got:?}"),
            }
        }
        hub.notify(b, || Notice::Reread);
        assert!(matches!(other.next().await, Some(Notice::Reread)));
    }

    #[tokio::test]
    async fn notices_are_built_only_for_watched_jobs() {
        let hub = ChangeHub::new();
        let built = AtomicUsize::new(0);
        hub.notify(Uuid::new_v4(), || {
            built.fetch_add(1, Ordering::SeqCst);
            Notice::Reread
        });
        assert_eq!(built.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn watchers_of_one_job_share_an_entry_and_the_last_one_runs_the_hook() {
        let hub = ChangeHub::new();
        let id = Uuid::new_v4();
        let gone = Arc::new(AtomicUsize::new(0));
        let watch = || {
            let gone = gone.clone();
            hub.watch(
                id,
                Some(Box::new(move |_| {
                    gone.fetch_add(1, Ordering::SeqCst);
                })),
            )
        };
        let one = watch();
        let two = watch();
        assert_eq!(hub.watched(), 1, "one entry for both");
        drop(one);
        assert_eq!(gone.load(Ordering::SeqCst), 0, "one watcher is left");
        drop(two);
        assert_eq!(gone.load(Ordering::SeqCst), 1);
        assert_eq!(hub.watched(), 0);
        let three = watch();
        assert_eq!(hub.watched(), 1, "a new entry");
        drop(three);
        assert_eq!(gone.load(Ordering::SeqCst), 2, "its own hook, once");
    }

    #[tokio::test]
    async fn a_lagging_watcher_is_told_to_reread() {
        let hub = ChangeHub::new();
        let id = Uuid::new_v4();
        let mut slow = hub.watch(id, None);
        for n in 0..(NOTICES_BUFFERED + 5) {
            hub.notify(id, || Notice::Snapshot(job(n)));
        }
        assert!(matches!(slow.next().await, Some(Notice::Reread)));
    }

    #[tokio::test]
    async fn end_all_ends_streams_and_old_watchers_leave_new_entries_alone() {
        let hub = ChangeHub::new();
        let id = Uuid::new_v4();
        let gone = Arc::new(AtomicUsize::new(0));
        let counted = |gone: &Arc<AtomicUsize>| -> Option<OnLastGone> {
            let gone = gone.clone();
            Some(Box::new(move |_| {
                gone.fetch_add(1, Ordering::SeqCst);
            }))
        };
        let mut old = hub.watch(id, counted(&gone));
        hub.end_all();
        assert!(old.next().await.is_none(), "the stream ends");
        let mut new = hub.watch(id, counted(&gone));
        drop(old);
        assert_eq!(
            gone.load(Ordering::SeqCst),
            0,
            "the old watcher's drop is a no-op"
        );
        hub.notify(id, || Notice::Reread);
        assert!(matches!(new.next().await, Some(Notice::Reread)));
        drop(new);
        assert_eq!(gone.load(Ordering::SeqCst), 1);
    }
}
