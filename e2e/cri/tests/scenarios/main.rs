//! The CRI scenarios (issue 9, part 5). Each test starts its own node
//! (containerd + runc in a node netns, see the `e2e_cri` crate doc); run one
//! with `scripts/e2e-cri.sh FOCUS` (a substring of the test names below).

mod bad_input;
mod birth;
mod lifecycle;
mod node;
mod packaging;
mod seccomp;
mod socket;
mod support;
