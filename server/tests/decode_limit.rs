//! A frame of millions of empty samples is refused at the sample limit without building the
//! samples first: peak heap while decoding it stays small.
//!
//! Its own test binary, so the counting allocator below sees only this test's allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use guardian_server::batch::{Batch, DecodeError, MAX_SAMPLES_PER_BATCH};
use prost::bytes::Bytes;

/// The system allocator, counting live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// `SampleBatch { seq: 1, samples: [Sample {}; count] }`, encoded by hand: each empty sample
/// is two bytes (tag 2, length 0).
fn frame_of_empty_samples(count: usize) -> Bytes {
    let mut frame = Vec::with_capacity(2 + 2 * count);
    frame.extend_from_slice(&[0x08, 0x01]);
    for _ in 0..count {
        frame.extend_from_slice(&[0x12, 0x00]);
    }
    Bytes::from(frame)
}

#[test]
fn a_four_mib_frame_of_empty_samples_is_refused_at_the_limit_with_little_memory() {
    // 4 MiB (the default max_frame_bytes) of empty samples: ~2 million of them.
    let frame = frame_of_empty_samples(2 * 1024 * 1024 - 1);
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let decoded = Batch::decode(&frame);
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert!(
        matches!(decoded, Err(DecodeError::TooManySamples)),
        "{:?}",
        decoded.map(|b| b.samples.len())
    );
    // Building every sample first took hundreds of MiB; stopping at the limit holds at most
    // MAX_SAMPLES_PER_BATCH of them.
    assert!(
        peak < 8 * 1024 * 1024,
        "decoding peaked at {} KiB over the frame",
        peak / 1024
    );
}

#[test]
fn a_batch_at_the_limit_still_decodes() {
    let batch = Batch::decode(&frame_of_empty_samples(MAX_SAMPLES_PER_BATCH)).expect("decodes");
    assert_eq!(batch.samples.len(), MAX_SAMPLES_PER_BATCH);
    assert!(matches!(
        Batch::decode(&frame_of_empty_samples(MAX_SAMPLES_PER_BATCH + 1)),
        Err(DecodeError::TooManySamples)
    ));
}
