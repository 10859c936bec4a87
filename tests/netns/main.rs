mod api;
mod cni;
mod ctl;
mod lifecycle;
mod loss;
mod support;
