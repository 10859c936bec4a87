//! Root-only: the object passes the verifier on this kernel and the netns
//! cookie helper is usable from tc programs.

#[test]
fn datapath_loads_and_netns_cookie_is_readable() {
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
    let c = netfault_ebpf::netns_cookie_here().expect("SO_NETNS_COOKIE");
    assert_ne!(c, 0);
}
