//! Fuzzes the body of `POST /jobs` and `POST /jobs:batchSubmit`: decoding
//! and validation must accept or reject with an error naming a field, and
//! whatever is accepted must round-trip; see [`orchestrator_fuzz::rest_submit_body`].

#![no_main]

libfuzzer_sys::fuzz_target!(
    init: orchestrator_fuzz::abort_on_panics_outside_json_decoders(),
    |data: &[u8]| {
        orchestrator_fuzz::rest_submit_body(data);
    }
);
