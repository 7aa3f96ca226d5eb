//! The wall-clock deadline of a call in the host's own waits.
//!
//! The epoch ticker interrupts guest code only: a guest that sleeps
//! (`std::thread::sleep` becomes `wasi:io/poll`) waits inside the host, where
//! no epoch check runs. The two WASI functions that wait, `poll` and
//! `pollable.block`, are replaced here by ones that wait at most until the
//! call's deadline and then trap with [`DeadlineExceeded`], which ends the
//! call like a trip of the epoch deadline. Every other import returns
//! without waiting (no sockets, files or stdin are granted), and guest code
//! is stopped by the epoch trap at its next check after the deadline.

use std::time::Instant;

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::p2::DynPollable;
use wasmtime_wasi::p2::bindings::io::poll::{Host as _, HostPollable as _};
use wasmtime_wasi::runtime::in_tokio;

use super::HostState;

/// The interface whose waits are bounded; the version wasmtime-wasi links
/// (components importing an older 0.2 version are matched to it).
const POLL: &str = "wasi:io/poll@0.2.12";

/// A call reached its wall-clock deadline while waiting in the host.
#[derive(Debug, thiserror::Error)]
#[error("the call reached its deadline while waiting")]
pub struct DeadlineExceeded;

/// Replaces the waiting functions of `wasi:io/poll` in `linker` with ones
/// that end at the call's deadline ([`HostState::deadline`]).
///
/// # Errors
/// When the linker has no such interface to replace.
pub fn bound_waits(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut poll = linker.instance(POLL)?;
    poll.func_wrap(
        "poll",
        |mut store: StoreContextMut<'_, HostState>, (pollables,): (Vec<Resource<DynPollable>>,)| {
            let state = store.data_mut();
            Ok((until(state.deadline, &mut state.idle, state.table.poll(pollables))??,))
        },
    )?;
    poll.func_wrap(
        "[method]pollable.block",
        |mut store: StoreContextMut<'_, HostState>, (pollable,): (Resource<DynPollable>,)| {
            let state = store.data_mut();
            until(state.deadline, &mut state.idle, state.table.block(pollable))?
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Runs `wait` until it ends or `deadline` passes, adding the time it took
/// to `idle` (a wait, not the guest's CPU: see `throttle`).
fn until<T>(
    deadline: Instant,
    idle: &mut std::time::Duration,
    wait: impl Future<Output = T>,
) -> Result<T, DeadlineExceeded> {
    let waiting = Instant::now();
    if waiting >= deadline {
        return Err(DeadlineExceeded);
    }
    // The timer is made inside the runtime `in_tokio` enters.
    let ready = in_tokio(async move { tokio::time::timeout_at(deadline.into(), wait).await });
    *idle += waiting.elapsed();
    ready.map_err(|_| DeadlineExceeded)
}
