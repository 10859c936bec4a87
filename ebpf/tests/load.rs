//! Root-only: the object passes the verifier on this kernel and the netns
//! cookie helper is usable from tc programs.

#[test]
fn datapath_loads_and_binds_addresses() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: requires root");
        return;
    }
    let dp = match netfault_ebpf::Datapath::load() {
        Ok(dp) => dp,
        Err(e) => panic!("datapath failed to load: {e:?}"),
    };
    let fds = dp.program_fds();
    assert!(fds.egress > 0 && fds.ingress > 0);
    let mut dp = dp;
    let addr = "198.18.255.1".parse().expect("literal");
    dp.bind_address(addr, 3).expect("bind");
    dp.unbind_address(addr).expect("unbind");
    dp.unbind_address(addr).expect("unbinding twice is fine");
}
