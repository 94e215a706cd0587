//! What the open-loop load generators (`weir-load`, `weir-grpc-load`) share: a periodic
//! timer on a `timerfd`, because tokio's timer has a 1 ms resolution that would add up to a
//! millisecond to every measured latency.

use rustix::time::{
    Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec, timerfd_create,
    timerfd_settime,
};
use std::os::fd::OwnedFd;
use tokio::io::{Interest, unix::AsyncFd};

/// A timer that fires first at `first_ns` (CLOCK_MONOTONIC, absolute) and then every
/// `period_ns`; read it to learn how many periods passed.
pub fn periodic_timer(first_ns: u128, period_ns: u64) -> std::io::Result<AsyncFd<OwnedFd>> {
    let fd = timerfd_create(
        TimerfdClockId::Monotonic,
        TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
    )?;
    let spec = Itimerspec {
        it_value: Timespec {
            tv_sec: (first_ns / 1_000_000_000) as _,
            tv_nsec: (first_ns % 1_000_000_000) as _,
        },
        it_interval: Timespec {
            tv_sec: (period_ns / 1_000_000_000) as _,
            tv_nsec: (period_ns % 1_000_000_000) as _,
        },
    };
    timerfd_settime(&fd, TimerfdTimerFlags::ABSTIME, &spec)?;
    // `with_interest` is deprecated because an arbitrary `AsRawFd` may change its fd; an
    // `OwnedFd` moved into the `AsyncFd` keeps the same one until dropped, which is the
    // contract the unsafe replacement asks for (and this crate forbids `unsafe`).
    #[allow(deprecated)]
    AsyncFd::with_interest(fd, Interest::READABLE)
}

/// Waits for `timer` to fire and returns how many periods passed since the last read.
pub async fn expirations(timer: &AsyncFd<OwnedFd>) -> std::io::Result<u64> {
    loop {
        let mut guard = timer.readable().await?;
        let mut buf = [0u8; 8];
        match rustix::io::read(guard.get_inner(), &mut buf) {
            Ok(8) => return Ok(u64::from_ne_bytes(buf)),
            Ok(_) => continue,
            Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
            Err(e) => return Err(e.into()),
        }
    }
}
