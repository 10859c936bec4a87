//! The CRI scenarios (issue 9, part 5). Each test starts its own node
//! (containerd + runc in a node netns, see the `e2e_cri` crate doc); run one
//! with `scripts/e2e-cri.sh FOCUS`.

mod node;
