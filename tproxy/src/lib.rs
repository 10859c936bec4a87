//! netfault-tproxy: the transparent L4/L7 fault proxy (work in progress).
