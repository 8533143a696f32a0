//! One sink call, guarded: bounded by the sink timeout and the shutdown deadline, with a panic caught wherever
//! the sink raises it (making its future, polling it, dropping it) and counted.

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::SinkError;
use crate::sink::BoxFuture;
use crate::stats::{Counters, add};

/// `d` from now, or a year from now when `d` is longer (a `Duration::MAX` setting means "no limit", not a
/// panic).
pub(crate) fn after(d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(365 * 24 * 3600);
    Instant::now() + d.min(FAR)
}

/// The shutdown deadline, once a handle has asked for shutdown.
#[derive(Debug, Clone)]
pub(crate) struct Deadline(pub(crate) watch::Receiver<Option<Instant>>);

/// How a bounded wait ended.
pub(crate) enum Within<T> {
    Done(T),
    /// The limit given passed first.
    Limit,
    /// The shutdown deadline passed first (or had passed already: the future was not polled).
    Deadline,
}

impl Deadline {
    pub(crate) fn get(&self) -> Option<Instant> {
        *self.0.borrow()
    }

    pub(crate) fn passed(&self) -> bool {
        self.get().is_some_and(|d| Instant::now() >= d)
    }

    /// Runs `future` until it completes, `limit` passes, or the shutdown deadline passes (a deadline set
    /// meanwhile is obeyed too). A deadline already passed means the future is not polled at all.
    pub(crate) async fn within<F: Future>(&self, limit: Option<Duration>, future: F) -> Within<F::Output> {
        let mut deadline = self.0.clone();
        let until = limit.map(after);
        tokio::pin!(future);
        loop {
            let shutdown = *deadline.borrow_and_update();
            if shutdown.is_some_and(|d| Instant::now() >= d) {
                return Within::Deadline;
            }
            let (end, is_shutdown) = match (until, shutdown) {
                (Some(a), Some(b)) if b <= a => (Some(b), true),
                (Some(a), _) => (Some(a), false),
                (None, b) => (b, true),
            };
            let expired = async {
                match end {
                    Some(end) => tokio::time::sleep_until(end).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                output = &mut future => return Within::Done(output),
                () = expired => return if is_shutdown { Within::Deadline } else { Within::Limit },
                Ok(()) = deadline.changed() => {}
            }
        }
    }
}

impl Deadline {
    /// Waits until `until`; `false` as soon as a shutdown deadline is known that comes first (then there is
    /// no point waiting: whatever was to start at `until` would start too late).
    pub(crate) async fn wait_before_it(&self, until: Instant) -> bool {
        let mut deadline = self.0.clone();
        loop {
            if deadline.borrow_and_update().is_some_and(|d| d <= until) {
                return false;
            }
            tokio::select! {
                () = tokio::time::sleep_until(until) => return true,
                Ok(()) = deadline.changed() => {}
            }
        }
    }
}

/// Why one attempt failed.
pub(crate) enum Failure {
    Sink(SinkError),
    Timeout,
    Panic(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Sink(e) => write!(f, "{e}"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Panic(msg) => write!(f, "panicked: {msg}"),
        }
    }
}

/// How one guarded call ended.
pub(crate) enum Called {
    Ok,
    Failed(Failure),
    /// The shutdown deadline passed before or during the call: its outcome is unknown.
    Deadline,
}

/// Makes and runs one sink call (`make` is the sink's method), bounded by `timeout` and the deadline.
pub(crate) async fn call<'a>(
    make: impl FnOnce() -> BoxFuture<'a, Result<(), SinkError>>,
    timeout: Duration,
    deadline: &Deadline,
    counters: &'a Counters,
) -> Called {
    if deadline.passed() {
        return Called::Deadline;
    }
    let future = match catch_unwind(AssertUnwindSafe(make)) {
        Ok(future) => future,
        Err(panic) => return panicked(counters, panic),
    };
    let guarded = Guarded { inner: Some(future), panicked: false, drop_panics: &counters.sink_panics };
    match deadline.within(Some(timeout), guarded).await {
        Within::Done(Ok(Ok(()))) => Called::Ok,
        Within::Done(Ok(Err(e))) => Called::Failed(Failure::Sink(e)),
        Within::Done(Err(panic)) => panicked(counters, panic),
        Within::Limit => {
            add(&counters.sink_timeouts, 1);
            Called::Failed(Failure::Timeout)
        }
        Within::Deadline => Called::Deadline,
    }
}

fn panicked(counters: &Counters, panic: Box<dyn Any + Send>) -> Called {
    add(&counters.sink_panics, 1);
    let message = panic_message(&*panic);
    drop_payload(panic);
    Called::Failed(Failure::Panic(message))
}

/// Drops a panic's payload, whose own `Drop` may panic too (then that payload is leaked: it cannot be dropped).
fn drop_payload(panic: Box<dyn Any + Send>) {
    if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(panic))) {
        std::mem::forget(again);
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_owned())
}

/// A sink's future, polled and dropped under `catch_unwind`.
struct Guarded<'a> {
    inner: Option<BoxFuture<'a, Result<(), SinkError>>>,
    /// The call already panicked when polled (and is counted as such): a panic when dropping it is not another.
    panicked: bool,
    /// A panic while dropping the future (after a timeout, or once done) is counted here.
    drop_panics: &'a AtomicU64,
}

impl Guarded<'_> {
    fn drop_inner(&mut self) {
        if let Some(future) = self.inner.take()
            && let Err(panic) = catch_unwind(AssertUnwindSafe(move || drop(future)))
        {
            drop_payload(panic);
            if !self.panicked {
                add(self.drop_panics, 1);
            }
        }
    }
}

impl Future for Guarded<'_> {
    type Output = Result<Result<(), SinkError>, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(future) = self.inner.as_mut() else {
            return Poll::Ready(Err(Box::new("sink future polled after it completed")));
        };
        let output = match catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(result)) => Ok(result),
            Err(panic) => {
                self.panicked = true;
                Err(panic)
            }
        };
        self.drop_inner();
        Poll::Ready(output)
    }
}

impl Drop for Guarded<'_> {
    fn drop(&mut self) {
        self.drop_inner();
    }
}
