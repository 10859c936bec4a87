mod api;
mod cni;
mod ctl;
mod delay;
mod lifecycle;
mod loss;
mod packet_actions;
mod support;
