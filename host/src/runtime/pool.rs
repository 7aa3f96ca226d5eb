//! Threads of one service that run its queries: guests never run on the
//! async runtime's workers (HTTP, Kafka I/O) nor on its shared blocking
//! pool, and get a native stack that holds the deepest Wasm stack.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

use super::CALL_THREAD_STACK;

type Job = Box<dyn FnOnce() + Send>;

/// Runs `job` on a thread of its own named `name`, with the stack a guest
/// gets (a compile and trial instantiation, a candidate's trial over dead
/// letters): its result, or why there is none.
pub(crate) async fn on_own_thread<R: Send + 'static>(
    name: String,
    job: impl FnOnce() -> R + Send + 'static,
) -> Result<R, String> {
    let (reply, result) = oneshot::channel();
    std::thread::Builder::new()
        .name(name)
        .stack_size(CALL_THREAD_STACK)
        .spawn(move || {
            let _ = reply.send(job());
        })
        .map_err(|err| format!("no thread for it: {err}"))?;
    result.await.map_err(|_| "its thread failed".to_owned())
}

/// A fixed number of threads, started at first use, ended when the pool is
/// dropped (after the job each is running).
pub(crate) struct GuestPool {
    name: String,
    threads: usize,
    jobs: Mutex<Option<Sender<Job>>>,
}

impl GuestPool {
    /// A pool of `threads` threads named after `name`.
    pub(crate) fn new(name: &str, threads: usize) -> Self {
        Self { name: name.to_owned(), threads: threads.max(1), jobs: Mutex::new(None) }
    }

    /// Runs `job` on one of the pool's threads; its result comes through
    /// the receiver (closed if the job panicked or no thread could start).
    pub(crate) fn run<R: Send + 'static>(&self, job: impl FnOnce() -> R + Send + 'static) -> oneshot::Receiver<R> {
        let (reply, result) = oneshot::channel();
        // A panicking job drops `reply` (its caller sees a failure) and
        // leaves the thread serving.
        let job: Job = Box::new(move || {
            if let Ok(result) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)) {
                let _ = reply.send(result);
            }
        });
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        let sender = jobs.get_or_insert_with(|| self.start());
        // A send fails only if every thread is gone: the receiver then
        // reports the job as failed.
        let _ = sender.send(job);
        result
    }

    fn start(&self) -> Sender<Job> {
        let (sender, receiver) = std::sync::mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        for i in 0..self.threads {
            let receiver = receiver.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("guest-{}-{i}", self.name))
                .stack_size(CALL_THREAD_STACK)
                .spawn(move || work(&receiver));
            if let Err(err) = spawned {
                tracing::error!(component = %self.name, "cannot start a query thread: {err}");
            }
        }
        sender
    }
}

fn work(jobs: &Mutex<Receiver<Job>>) {
    loop {
        // The lock is held only while waiting for the next job.
        let job = jobs.lock().unwrap_or_else(PoisonError::into_inner).recv();
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}
