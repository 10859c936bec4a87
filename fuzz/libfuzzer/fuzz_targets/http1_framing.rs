#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = netfault_fuzz::http1_framing(data);
});
