//! Prints the NetworkFault CRD manifest (daemonset/networkfault-crd.yaml):
//! `cargo run -p netfault-k8s --bin netfault-crd > daemonset/networkfault-crd.yaml`.

fn main() -> Result<(), netfault_k8s::resource::CrdError> {
    print!("{}", netfault_k8s::crd_yaml()?);
    Ok(())
}
