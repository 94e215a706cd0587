//! Live load of one endpoint (requests in flight and a Peak-EWMA latency estimate), shared by
//! all worker threads and kept across table rebuilds; the only mutable state the pickers read.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Time constant τ of the Peak-EWMA latency estimate, in nanoseconds (Finagle's and Linkerd's
/// default): a sample's weight is `1 - exp(-Δt/τ)`, so the estimate follows a lasting drop in
/// latency within tens of seconds, whatever the request rate.
pub(crate) const EWMA_DECAY_NANOS: f64 = 10e9;

#[cfg(test)]
/// Latency assumed for an endpoint that has answered nothing yet, when nothing better is
/// known (see [`EndpointLoad::cost`]); a typical in-cluster round trip.
pub(crate) const DEFAULT_RTT: Duration = Duration::from_millis(1);

/// Floor of a decayed estimate: keeps `cost` proportional to the requests in flight even for
/// an endpoint idle so long that its estimate decayed to nothing.
pub(super) const MIN_RTT_NANOS: f64 = 1_000.0;
/// `rtt` bits meaning "no sample yet" (a NaN pattern that arithmetic never produces).
pub(super) const NO_SAMPLE: u64 = u64::MAX;

/// Live load of one endpoint, shared by all worker threads and kept across routing-table
/// rebuilds (the table looks it up by address when it is rebuilt). All atomics, on a cache
/// line of its own so that busy endpoints do not slow each other down through false sharing.
#[derive(Debug)]
#[repr(align(64))]
pub(crate) struct EndpointLoad {
    pub(super) in_flight: AtomicU32,
    /// `f64` bits of the latency estimate in nanoseconds, or [`NO_SAMPLE`].
    pub(super) rtt: AtomicU64,
    /// `now_nanos` of the latest latency sample.
    pub(super) stamp: AtomicU64,
}

impl Default for EndpointLoad {
    fn default() -> Self {
        Self::new()
    }
}

impl EndpointLoad {
    /// An endpoint with nothing in flight and no latency sample.
    pub(crate) fn new() -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            rtt: AtomicU64::new(NO_SAMPLE),
            stamp: AtomicU64::new(0),
        }
    }

    /// Requests started and not yet ended.
    #[inline]
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// A request to this endpoint starts. Prefer [`InFlight`], which cannot leak a count.
    #[inline]
    pub(crate) fn start(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request to this endpoint ends after `latency` (for [`Picker::PeakEwma`], the time to
    /// the response head is the useful measure), observed at `now_nanos`.
    pub(crate) fn end(&self, latency: Duration, now_nanos: u64) {
        self.release();
        self.observe(latency, now_nanos);
    }

    /// A request ends without a latency sample (cancelled, or not worth measuring).
    #[inline]
    pub(super) fn release(&self) {
        // Saturating: an unpaired `end` must not wrap the count to 4 billion and make the
        // endpoint look saturated forever.
        let _ = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Folds one latency sample into the peak-sensitive EWMA.
    pub(super) fn observe(&self, latency: Duration, now_nanos: u64) {
        let sample = latency.as_nanos() as f64;
        // `fetch_max` hands each concurrent sample its own slice of elapsed time, so the total
        // decay equals the wall-clock decay however the samples interleave.
        let previous = self.stamp.fetch_max(now_nanos, Ordering::Relaxed);
        let elapsed = now_nanos.saturating_sub(previous) as f64;
        let w = (-elapsed / EWMA_DECAY_NANOS).exp();
        // A CAS loop rather than load+store: two requests ending together must not lose a
        // peak. Contention is per endpoint and brief.
        let _ = self
            .rtt
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let next = if bits == NO_SAMPLE {
                    sample
                } else {
                    let current = f64::from_bits(bits);
                    if sample > current {
                        // Peak: trust bad news at once, so a slowing endpoint sheds load
                        // within one response.
                        sample
                    } else {
                        current * w + sample * (1.0 - w)
                    }
                };
                Some(next.to_bits())
            });
    }

    /// The latency estimate in nanoseconds at `now_nanos`, or `None` before the first sample.
    /// It decays toward zero while no sample arrives (Finagle's rule), so that an endpoint
    /// avoided for being slow is eventually probed again instead of starving.
    #[inline]
    pub(super) fn estimate(&self, now_nanos: u64) -> Option<f64> {
        let bits = self.rtt.load(Ordering::Relaxed);
        if bits == NO_SAMPLE {
            return None;
        }
        let age = now_nanos.saturating_sub(self.stamp.load(Ordering::Relaxed)) as f64;
        let decayed = f64::from_bits(bits) * (-age / EWMA_DECAY_NANOS).exp();
        Some(decayed.max(MIN_RTT_NANOS))
    }

    /// The latency estimate as of its latest sample, in milliseconds, or `None` before the
    /// first sample: what a load report carries. Without the idle decay of `estimate`, which
    /// is how a picker comes back to an endpoint it avoided; the controller compares
    /// endpoints across agents, where one would look faster merely for having been idle
    /// for a few seconds. One relaxed load.
    pub(crate) fn latency_ewma_ms(&self) -> Option<f64> {
        let bits = self.rtt.load(Ordering::Relaxed);
        (bits != NO_SAMPLE).then(|| f64::from_bits(bits) / 1e6)
    }

    #[cfg(test)]
    /// The latency estimate at `now_nanos` (decayed as the pickers see it), or `None` before
    /// the first sample.
    pub(crate) fn latency_ewma(&self, now_nanos: u64) -> Option<Duration> {
        self.estimate(now_nanos)
            .map(|nanos| Duration::from_nanos(nanos.min(u64::MAX as f64) as u64))
    }

    #[cfg(test)]
    /// Peak-EWMA cost at `now_nanos`: the latency estimate (in nanoseconds; [`DEFAULT_RTT`]
    /// before the first sample) × (requests in flight + 1), i.e. roughly how long a new request
    /// would wait. Weights are applied by the picker, which also replaces the default by the
    /// rival's estimate (see [`Picker::PeakEwma`]).
    pub(crate) fn cost(&self, now_nanos: u64) -> f64 {
        let rtt = self
            .estimate(now_nanos)
            .unwrap_or(DEFAULT_RTT.as_nanos() as f64);
        rtt * (f64::from(self.in_flight()) + 1.0)
    }
}

/// RAII guard for one request: [`EndpointLoad::start`] on creation, [`EndpointLoad::end`] on
/// [`InFlight::finish`]; if dropped without `finish` (request cancelled, error before the
/// response) it still decrements in-flight, without a latency sample.
#[derive(Debug)]
#[must_use = "dropping the guard ends the request at once"]
pub(crate) struct InFlight {
    /// `None` once finished, so `Drop` does not count the end twice.
    pub(super) load: Option<Arc<EndpointLoad>>,
}

impl InFlight {
    /// Counts a request to the endpoint whose load is `load`.
    pub(crate) fn new(load: Arc<EndpointLoad>) -> Self {
        load.start();
        Self { load: Some(load) }
    }

    /// The request got its response head after `latency`, at `now_nanos`.
    pub(crate) fn finish(mut self, latency: Duration, now_nanos: u64) {
        if let Some(load) = self.load.take() {
            load.end(latency, now_nanos);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(load) = self.load.take() {
            load.release();
        }
    }
}
