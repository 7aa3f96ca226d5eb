//! Group commit: the batches of every component a host serves go to disk in
//! shared write transactions, one fsync for all of them.
//!
//! A component's executor applies its batch to the group's open
//! transaction itself (checking its reads first), then waits. While a
//! transaction is being committed (its fsync), the next one stays open and
//! gathers every batch that arrives meanwhile; it is committed as soon as
//! the one before is durable, by whichever of its members gets there first.
//! Under load a commit thus carries the batches of several services; alone,
//! a batch commits at once and waits for nobody (PostgreSQL's group commit
//! with `commit_delay = 0`). Each member learns its transaction's outcome:
//! durable, or not applied at all.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use redb::{Database, Durability, WriteTransaction};

use super::super::StoreError;

/// What applying a batch to the open transaction gave.
pub(super) enum Applied {
    /// Applied; durable once the transaction is.
    Joined,
    /// Refused before any change (a conflict): the transaction is untouched.
    Refused(StoreError),
    /// Failed part way: the transaction cannot be committed.
    Broken(StoreError),
}

/// The host's group commit.
#[derive(Default)]
pub(super) struct Group {
    state: Mutex<State>,
    /// Signalled when a transaction's outcome is known.
    settled: Condvar,
}

#[derive(Default)]
struct State {
    /// The transaction batches join, if one is open.
    open: Option<Open>,
    /// A transaction is being committed (outside the lock).
    committing: bool,
    /// Generation of the next transaction opened.
    next: u64,
    /// Outcomes not yet collected by every member, by generation.
    outcomes: HashMap<u64, Outcome>,
    /// Commits made and batches they carried, since start, and the time
    /// spent in them (writing and syncing).
    commits: u64,
    batches: u64,
    committing_for: std::time::Duration,
}

struct Open {
    write: WriteTransaction,
    generation: u64,
    members: usize,
}

struct Outcome {
    result: Result<(), StoreError>,
    /// Members that have not collected it yet.
    waiting: usize,
}

impl Group {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies a batch with `apply` to the open transaction of `db` (opening
    /// one if none is), then returns once that transaction is durable.
    ///
    /// # Errors
    /// A conflict `apply` found (nothing was applied), or
    /// [`StoreError::Unavailable`] when the transaction could not be opened,
    /// applied to or committed (nothing of it was applied).
    pub(super) fn commit(
        &self,
        db: &Database,
        apply: impl FnOnce(&WriteTransaction) -> Applied,
        err: impl Fn(&dyn std::fmt::Display) -> StoreError,
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        if state.open.is_none() {
            // Blocks while the previous transaction commits: batches that
            // come meanwhile wait on the lock and then join this one.
            let mut write = db.begin_write().map_err(|x| err(&x))?;
            write.set_durability(Durability::Immediate).map_err(|x| err(&x))?;
            let generation = state.next;
            state.next += 1;
            state.open = Some(Open { write, generation, members: 0 });
        }
        let Some(open) = state.open.as_mut() else { return Err(err(&"no transaction open")) };
        let generation = open.generation;
        match apply(&open.write) {
            Applied::Joined => open.members += 1,
            Applied::Refused(reason) => {
                // Nobody else in it: it goes (an open write transaction
                // would hold up every other writer of the file).
                if open.members == 0 {
                    state.open = None;
                }
                return Err(reason);
            }
            Applied::Broken(reason) => {
                // Its members' batches go with it: they are told so.
                let members = open.members;
                state.open = None;
                if members > 0 {
                    let result =
                        Err(StoreError::Unavailable(format!("a batch committed with this one failed: {reason}")));
                    state.outcomes.insert(generation, Outcome { result, waiting: members });
                    self.settled.notify_all();
                }
                return Err(reason);
            }
        }
        loop {
            if let Some(outcome) = state.outcomes.get_mut(&generation) {
                let result = outcome.result.clone();
                outcome.waiting -= 1;
                if outcome.waiting == 0 {
                    state.outcomes.remove(&generation);
                }
                return result;
            }
            if !state.committing
                && let Some(open) = state.open.take_if(|open| open.generation == generation)
            {
                return self.commit_open(state, open, &err);
            }
            state = self.settled.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Commits the open transaction (this member's) outside the lock and
    /// hands its outcome to the other members.
    fn commit_open(
        &self,
        mut state: MutexGuard<'_, State>,
        open: Open,
        err: &impl Fn(&dyn std::fmt::Display) -> StoreError,
    ) -> Result<(), StoreError> {
        state.committing = true;
        drop(state);
        let started = std::time::Instant::now();
        let result = open.write.commit().map_err(|x| err(&x));
        let took = started.elapsed();
        let mut state = self.lock();
        state.committing = false;
        state.committing_for += took;
        state.commits += 1;
        state.batches += open.members as u64;
        if open.members > 1 {
            state.outcomes.insert(open.generation, Outcome { result: result.clone(), waiting: open.members - 1 });
        }
        self.settled.notify_all();
        result
    }

    /// Aborts the open transaction, if any (before the database closes: it
    /// waits for every write transaction to end).
    pub(super) fn close(&self) {
        self.lock().open = None;
    }

    /// Commits made and the batches they carried, since start.
    pub(super) fn counts(&self) -> (u64, u64) {
        let state = self.lock();
        (state.commits, state.batches)
    }

    /// The time spent committing (writing and syncing), since start.
    pub(super) fn committing_for(&self) -> std::time::Duration {
        self.lock().committing_for
    }
}
