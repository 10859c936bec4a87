#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = netfault_fuzz::dns_message(data);
});
