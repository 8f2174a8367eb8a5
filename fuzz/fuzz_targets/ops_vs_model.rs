//! `ops_vs_model`: the fuzzing twin of the differential proptest. 1–3 disks and a sequence of
//! engine operations (control, device and image I/O, faults, torn writes, growth failures,
//! parameter changes, clock) through [`Harness::apply`] on the model and the engine side by
//! side; after every operation [`Harness::check_state`], at the end [`Harness::teardown`]. Any
//! mismatch panics with the harness's text (a crash for libFuzzer).
//!
//! `BLKSNAP_FUZZ_TRACE=1` prints each operation and its agreed outcome (to read a seed or an
//! artifact: `BLKSNAP_FUZZ_TRACE=1 cargo +nightly fuzz run ops_vs_model FILE`).
#![no_main]

use arbitrary::Unstructured;
use blksnap_fuzz::ops_input;
use blksnap_model::DeviceId;
use blksnap_sim_tests::{DiskSetup, Harness};
use libfuzzer_sys::fuzz_target;

fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("BLKSNAP_FUZZ_TRACE").is_some())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let input = ops_input(&mut u);
    let setups: Vec<DiskSetup> = input
        .disks
        .iter()
        .enumerate()
        .map(|(i, &(sectors, io_min_sectors))| DiskSetup {
            id: DeviceId::new(7, i as u32),
            sectors,
            io_min_sectors,
        })
        .collect();
    let mut h = Harness::new(input.params, &setups, input.seed);
    if trace() {
        eprintln!("disks {:?}, params {:?}", input.disks, input.params);
    }
    for (step, op) in input.ops.iter().enumerate() {
        if let Err(m) = h.apply(op) {
            panic!("step {step} {op:?}: {m}\ninput: {input:?}");
        }
        if trace() {
            eprintln!("{step:3} {op:?} -> {}", h.last.summary);
        }
        if let Err(m) = h.check_state() {
            panic!("after step {step} {op:?}: {m}\ninput: {input:?}");
        }
    }
    if let Err(m) = h.teardown() {
        panic!("teardown: {m}\ninput: {input:?}");
    }
});
