//! Prints the path of the workload image's OCI archive (busybox-static,
//! `docker.io/library/nfbox:dev`), building it first if needed, for
//! `scripts/e2e-kind.sh` to load into the cluster. The same image the CRI
//! level uses (`e2e_cri::box_image`): no registry involved.

use std::process::ExitCode;

fn main() -> ExitCode {
    match e2e_cri::box_image() {
        Ok(path) => {
            println!("{}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("e2e-kind-box-image: error: {e}");
            ExitCode::FAILURE
        }
    }
}
