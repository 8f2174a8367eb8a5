//! `ops_vs_model`: the fuzzing twin of the differential proptest. 1–3 disks and a sequence of
//! engine operations (control, device and image I/O, faults, torn writes, growth failures,
//! parameter changes, clock) through [`Harness::apply`] on the model and the engine side by
//! side; after every operation [`Harness::check_state`], at the end [`Harness::teardown`]. Any
//! mismatch panics with the harness's text (a crash for libFuzzer).
#![no_main]

use arbitrary::Unstructured;
use blksnap_fuzz::ops_input;
use blksnap_model::DeviceId;
use blksnap_sim_tests::{DiskSetup, Harness};
use libfuzzer_sys::fuzz_target;

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
    for (step, op) in input.ops.iter().enumerate() {
        if let Err(m) = h.apply(op) {
            panic!("step {step} {op:?}: {m}\ninput: {input:?}");
        }
        if let Err(m) = h.check_state() {
            panic!("after step {step} {op:?}: {m}\ninput: {input:?}");
        }
    }
    if let Err(m) = h.teardown() {
        panic!("teardown: {m}\ninput: {input:?}");
    }
});
