//! Fuzzes the decoding of a dispatch message as a worker receives it from
//! RabbitMQ; see [`orchestrator_fuzz::amqp_dispatch`].

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    orchestrator_fuzz::amqp_dispatch(data);
});
